"""LLMDoctor stage 1: token rewards of preference pairs from a frozen patient's two behavioural faces.

For one dimension with face ``(positive, negative)`` (:mod:`jaxalign.methods.faces`), every response of every
pair is teacher-forced through the patient twice, behind each face, and its tokens get::

    Δ_t = |log π_pos(y_t | face⁺, x, y<t) − log π_neg(y_t | face⁻, x, y<t)|,   S_t = tanh(Δ_t / (mean Δ + ε) / τ)
    r_t = sign(y)·S_t·1[S_t > θ]        (+1 on the chosen response, −1 on the rejected one)

(:func:`jaxalign.losses.token_importance`, :func:`jaxalign.losses.token_rewards`). The result is the pair dataset
with ``token_rewards`` attached (one float per token, aligned with ``input_ids``, 0 on prompt tokens), which the
TFPO doctor trains on (:mod:`jaxalign.methods.tfpo`).

The pass is batched and jitted (one compiled program per length bucket and face), with the patient's parameters
and the batch rows placed on the mesh like every other pass; two patient forward passes per response (one per
face), nothing else of size. It is cached and resumable: every ``save_every`` batches a part file is written to
``cache_dir`` (token ids, prompt lengths and rewards of its pairs), so an interrupted build continues after its
last part, and a finished one is read back instead of recomputed when its key (data fingerprint, patient, face,
how the face enters the prompt, chat template, settings) is unchanged. The cache is self-contained (its tokenizer
is saved beside it): :func:`load_cache` and ``jaxalign show-rewards DIR`` read it without the data or the patient.

A faced row is the pair's prompt rendered again with the face as its system message, then the pair's own response
ids (:class:`FaceRows`, :mod:`jaxalign.methods.faces`): the three passes (the neutral one the doctor trains on and
the two faces) score the same response tokens, at positions that differ per row.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from jaxalign import data as jdata
from jaxalign import losses, models
from jaxalign.methods.faces import (
    Face,
    added_bos_id,
    chat_face_ids,
    is_conversation,
    resolve_face_format,
    text_face_ids,
)
from jaxalign.models.scoring import DEFAULT_CHUNK, target_logps
from jaxalign.train.mesh import shard_batch

META_FILE = "token_rewards.json"
PREVIEW_FILE = "preview.html"
LENGTH_STEP = 32  # batches are padded to a multiple of this many tokens: few compiled shapes, little padding
# How a faced row is built, in every cache key: a cache written by another construction is rebuilt, not reused.
# 2: the prompt rendered again with the face as its system message (1 put a rendered face turn after the row's
# first token, which on SmolLM2 cut the default system turn's opening token).
FACE_ROWS_FORMAT = 2


@dataclasses.dataclass(frozen=True)
class RewardSettings:
    """``ε``, ``τ`` of the importance and ``θ`` of the sparse reward (the paper's defaults: θ = 0.1)."""

    eps: float = 1e-8
    tau: float = 1.0
    threshold: float = 0.1

    def __post_init__(self):
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"doctor.eps must be a finite number >= 0, got {self.eps!r}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"doctor.tau must be a finite number > 0, got {self.tau!r}")
        if not (math.isfinite(self.threshold) and 0 <= self.threshold < 1):
            raise ValueError(f"doctor.threshold must be in [0, 1), got {self.threshold!r}")


def pair_token_rewards(pos_logps, neg_logps, mask, settings: RewardSettings):
    """``[2B, T]`` rewards of flattened pairs (rows ``2b`` chosen, ``2b+1`` rejected) from both faces' log-probs."""
    importance = losses.token_importance(pos_logps, neg_logps, mask, eps=settings.eps, tau=settings.tau)
    preferred = jnp.arange(pos_logps.shape[0]) % 2 == 0
    return losses.token_rewards(importance, preferred, mask, threshold=settings.threshold)


Head = tuple[tuple[int, ...], int]  # (ids, cut): a faced row is ``ids + row[cut:]``


def _tail_after_stored_prompt(rendered: list[int], stored: list[int]) -> list[int] | None:
    """What of a rendered prompt follows the ids the data kept as the prompt, or None when they are not part of it.

    The data pipeline keeps the prompt's ids up to where the whole conversation's ids diverge from the prompt's
    (usually all of them), and truncation may have cut the prompt's start.
    """
    p, n = len(stored), len(rendered)
    if p > n:
        return None
    if rendered == stored or (p and rendered[:p] == stored):
        return rendered[p:]
    if rendered[n - p:] == stored:
        return []
    for start in range(1, n - p):
        if rendered[start:start + p] == stored:
            return rendered[start + p:]
    return None


class FaceRows:
    """Each pair's sequences behind each face of one dimension: ``heads(i)[face][side] = (ids, cut)``, the faced
    row being ``ids + row[cut:]`` (faces in the order positive, negative).

    ``chat``: ``ids`` is the prompt rendered with the face as its system message
    (:func:`jaxalign.methods.faces.chat_face_ids`), ``cut`` the row's prompt length, so the faced row is that
    rendering followed by the row's own response ids. A prompt that truncation shortened is rendered whole. When
    the data kept fewer prompt ids than the rendering has (the conversation's ids diverge from the prompt's
    before its end), the faced rendering loses the same tail. ``text``: ``ids`` is the face line (after the row's
    BOS when it starts with the one the tokenizer adds to every text: SmolLM2 adds none, and its ``bos_token``
    ``<|im_start|>`` opens a chat turn, so a row starting with it gets the face line before it).
    """

    def __init__(self, dataset: jdata.TokenizedDataset, tokenizer, face: Face, face_format: str, *,
                 chat_template: str | None = None):
        self.dataset, self.tokenizer, self.template = dataset, tokenizer, chat_template
        self.texts = (face.positive, face.negative)
        self.format = resolve_face_format(face_format, dataset.examples[0].prompt)
        self.text_ids = [tuple(text_face_ids(t, tokenizer)) for t in self.texts] if self.format == "text" else None
        self.bos = added_bos_id(tokenizer)
        self._rendered = functools.lru_cache(maxsize=256)(self._render)  # the pairs of a prompt are neighbours

    def _render(self, messages: tuple[tuple[str, str], ...]) -> tuple[list[int], list[list[int]]]:
        prompt = [{"role": role, "content": content} for role, content in messages]
        template = self.template or self.tokenizer.chat_template
        neutral = self.tokenizer(self.tokenizer.apply_chat_template(
            prompt, chat_template=template, tokenize=False, add_generation_prompt=True),
            add_special_tokens=False)["input_ids"] if prompt else []
        faced = [chat_face_ids(prompt, text, self.tokenizer, chat_template=self.template) for text in self.texts]
        return [int(i) for i in neutral], faced

    def heads(self, index: int) -> list[list[Head | None]]:
        """``[face][side]``: the head of each sequence of pair ``index`` behind each face (None: no sequence).

        Raises:
            ValueError: a ``chat`` face for a pair without a conversation as its prompt, or whose prompt ids are
                not the chat template's rendering of its prompt (naming the pair).
        """
        example = self.dataset.examples[index]
        if self.format == "text":
            return [[None if s is None else
                     ((int(s.ids[0]), *face) if self.bos is not None and len(s) and s.ids[0] == self.bos else face,
                      int(self.bos is not None and len(s) > 0 and s.ids[0] == self.bos))
                     for s in example.sequences] for face in self.text_ids]
        if not is_conversation(example.prompt):
            raise ValueError(f"token rewards: pair {index} has no conversation as its prompt; face_format chat "
                             "needs one for every pair (use face_format text)")
        neutral, faced = self._rendered(tuple((m.role, m.content) for m in example.prompt))
        out = [[], []]
        for sequence in example.sequences:
            if sequence is None:
                out[0].append(None), out[1].append(None)
                continue
            tail = _tail_after_stored_prompt(neutral, [int(i) for i in sequence.ids[:sequence.prompt_length]])
            if tail is None:
                raise ValueError(f"token rewards: pair {index}: its prompt ids are not the chat template's rendering "
                                 "of its prompt (was it tokenised with another template?)")
            for side, ids in enumerate(faced):
                if tail and ids[len(ids) - len(tail):] != tail:
                    raise ValueError(f"token rewards: pair {index}: its response ids start inside its prompt (the "
                                     "chat template renders the prompt otherwise within the whole conversation, as "
                                     "Mistral's drops a system message unless the user speaks last), so no face can "
                                     "be put before the response")
                out[side].append((tuple(ids[:len(ids) - len(tail)]), sequence.prompt_length))
        return out


def _faced_length(heads: list[list[Head | None]], sequences) -> int:
    """The longest faced row of a pair."""
    return max(len(head[0]) + len(sequence) - head[1] for per_face in heads
               for head, sequence in zip(per_face, sequences, strict=True) if head is not None)


def faced_batch(sequences: Sequence[jdata.TokenSequence | None], heads: Sequence[Head | None], length: int,
                pad_token_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded faced rows ``(ids, attention_mask, positions) [R, length]`` and each row's ``shift [R]``:
    token ``j`` of a sequence (at or after its head's cut) sits at ``j + shift`` of its faced row. Absent
    sequences are all-padding rows."""
    rows = len(sequences)
    ids = np.full((rows, length), pad_token_id, np.int32)
    mask = np.zeros((rows, length), np.int32)
    shift = np.zeros(rows, np.int32)
    for row, (sequence, head) in enumerate(zip(sequences, heads, strict=True)):
        if sequence is None:
            continue
        head_ids, cut = head
        faced = np.concatenate([np.asarray(head_ids, np.int32), sequence.ids[cut:]])
        ids[row, :len(faced)], mask[row, :len(faced)] = faced, 1
        shift[row] = len(head_ids) - cut
    positions = np.where(mask > 0, np.arange(length, dtype=np.int32)[None], 0).astype(np.int32)
    return ids, mask, positions, shift


def _cache_key(dataset: jdata.TokenizedDataset, face: Face, face_format: str, settings: RewardSettings,
               patient: Mapping[str, Any], template: str | None) -> dict[str, Any]:
    digest = None if template is None else hashlib.blake2b(template.encode(), digest_size=8).hexdigest()
    return {"format": FACE_ROWS_FORMAT, "data": dataset.fingerprint, "face": dataclasses.asdict(face),
            "face_format": face_format, "chat_template": digest, "settings": dataclasses.asdict(settings),
            "patient": dict(patient)}


def patient_identity(patient: nnx.Module, path: str | None) -> dict[str, Any]:
    """What names a patient in a cache key: its path, config and a hash of its embedding table."""
    embedding = next(value for p, value in nnx.to_flat_state(nnx.state(patient, nnx.Param))
                     if "embed" in "/".join(map(str, p)) or "wte" in "/".join(map(str, p)))
    digest = hashlib.blake2b(np.asarray(embedding[...], np.float32).tobytes(), digest_size=8).hexdigest()
    return {"path": path, "config": patient.config.to_hf() if hasattr(patient.config, "to_hf") else str(patient.config),
            "embedding": digest}


def _parts(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("part-*.npz"))


def _read_cached(cache_dir: Path, key: dict[str, Any]) -> tuple[int, list[np.ndarray]]:
    """``(examples done, their per-sequence rewards)`` from a cache with this key; ``(0, [])`` otherwise (a cache
    of another key is removed: it is stale)."""
    meta = cache_dir / META_FILE
    if not meta.is_file() or json.loads(meta.read_text()).get("key") != json.loads(json.dumps(key, default=str)):
        for part in _parts(cache_dir):
            part.unlink()
        return 0, []
    done, rewards = 0, []
    for part in _parts(cache_dir):
        start = int(part.stem.split("-")[1])
        if start != done:  # a gap: keep the contiguous prefix, rebuild the rest
            for later in _parts(cache_dir):
                if int(later.stem.split("-")[1]) >= start:
                    later.unlink()
            break
        with np.load(part) as arrays:
            rewards.extend(_split_rows(arrays["rewards"], arrays["lengths"]))
        done = len(rewards) // 2
    return done, rewards


def _split_rows(flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    return np.split(flat, np.cumsum(lengths.reshape(-1))[:-1])


def build_token_rewards(
    patient: nnx.Module,
    tokenizer,
    dataset: jdata.TokenizedDataset,
    face: Face,
    *,
    settings: RewardSettings = RewardSettings(),
    face_format: str = "auto",
    chat_template: str | None = None,
    batch_size: int = 8,
    cache_dir: str | Path | None = None,
    save_every: int = 16,
    mesh: Mesh | None = None,
    identity: Mapping[str, Any] | None = None,
    chunk_size: int | None = DEFAULT_CHUNK,
    desc: str = "token rewards",
) -> jdata.TokenizedDataset:
    """``dataset`` (preference pairs) with ``token_rewards`` from ``patient`` behind ``face`` (module docstring).

    Args:
        patient: the frozen causal LM whose faces are compared.
        tokenizer: the tokenizer ``dataset`` was made with (the patient's).
        dataset: tokenised preference pairs (``kind == "preference"``).
        face: the dimension's positive and negative system prompts.
        settings: ``ε``, ``τ``, ``θ``.
        face_format: ``chat``, ``text`` or ``auto`` (:mod:`jaxalign.methods.faces`).
        chat_template: the template the data was rendered with when not the tokenizer's (``data.chat_template``).
        batch_size: pairs per compiled batch (rounded up to a multiple of the mesh's data-parallel size).
        cache_dir: where parts, the key and a preview are written (None: nothing cached).
        save_every: batches per part file.
        mesh: a ``(data, fsdp, tensor)`` mesh: the patient's parameters follow the training sharding rules
            and the batch rows are split over ``data`` × ``fsdp``; None runs where the patient's arrays are.
        identity: what names the patient in the cache key (:func:`patient_identity`); None computes it.
        chunk_size: positions per LM-head chunk (:func:`jaxalign.models.target_logps`).

    Raises:
        ValueError: ``dataset`` does not hold preference pairs (naming its kind); a face that does not fit the
            patient's positions; a pair whose faced prompt cannot be built (:meth:`FaceRows.heads`).
    """
    if dataset.kind != "preference":
        hint = (f" (grouped pairs: pick one dimension with data.dimension, one of {list(dataset.dimensions)})"
                if dataset.kind == "preference_group" else "")
        raise ValueError(f"token rewards need preference pairs (chosen, rejected); the data holds {dataset.kind!r} "
                         f"records{hint}")
    if len(dataset) == 0:
        raise ValueError("token rewards: the data holds no pair")
    if jax.process_count() > 1:
        raise NotImplementedError("the token-reward pass runs in one process (its devices may be many)")
    rows_of = FaceRows(dataset, tokenizer, face, face_format, chat_template=chat_template)
    template = (chat_template or tokenizer.chat_template) if rows_of.format == "chat" else None
    key = _cache_key(dataset, face, rows_of.format, settings, identity or patient_identity(patient, None), template)
    cache = None if cache_dir is None else Path(cache_dir)
    done, rewards = (0, [])
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        done, rewards = _read_cached(cache, key)
    # Only the faced rows' lengths are kept for the whole set (the positions check, the batch lengths); each batch
    # builds its heads again, so the memory does not grow with the data's prompts.
    faced_lengths = {index: _faced_length(rows_of.heads(index), dataset.examples[index].sequences)
                     for index in range(done, len(dataset))}
    longest = max(faced_lengths.values(), default=0)
    if longest > patient.config.max_position_embeddings:
        index = max(faced_lengths, key=faced_lengths.get)
        raise ValueError(f"token rewards: pair {index} behind its face is {longest} tokens, beyond the patient's "
                         f"{patient.config.max_position_embeddings} positions: shorten data.max_length or the face")
    if cache is not None:
        first = rows_of.heads(0)
        faced_prompts = [tokenizer.decode(list(per_face[0][0]), skip_special_tokens=False) for per_face in first]
        (cache / META_FILE).write_text(json.dumps({"key": key, "examples": len(dataset), "face_format": rows_of.format,
                                                   "faced_prompts": faced_prompts}, indent=2, default=str) + "\n")
        tokenizer.save_pretrained(str(cache))

    shards = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))
    rows_per_batch = -(-batch_size // shards) * shards
    graphdef, state = nnx.split(patient)
    if mesh is not None:
        state = jax.device_put(state, models.named_shardings(state, mesh))
    score = _scorer(graphdef, settings, chunk_size)

    def bucket(length: int) -> int:
        return -(-length // LENGTH_STEP) * LENGTH_STEP

    def dispatch(rows: list[int]):
        length = bucket(int(max(dataset.lengths[i] for i in rows)))
        faced_length = bucket(max(faced_lengths[i] for i in rows))
        padding = rows_per_batch - len(rows)
        heads = {i: rows_of.heads(i) for i in rows}
        sequences = [s for i in rows for s in dataset.examples[i].sequences] + [None] * (2 * padding)
        response = np.zeros((len(sequences), length - 1), np.int32)  # targets 1.. of the neutral rows
        for row, sequence in enumerate(sequences):
            if sequence is not None:
                response[row, max(sequence.prompt_length, 1) - 1:len(sequence) - 1] = 1
        arrays = []
        for face_index in (0, 1):
            face_heads = [h for i in rows for h in heads[i][face_index]] + [None] * (2 * padding)
            arrays += faced_batch(sequences, face_heads, faced_length, dataset.pad_token_id)
        arrays = (*arrays, response)
        if mesh is not None:
            arrays = shard_batch(arrays, mesh)
        return rows, score(state, *arrays)

    def collect(rows: list[int], device_rewards) -> list[np.ndarray]:
        values = np.asarray(device_rewards)
        out = []
        for offset, index in enumerate(rows):
            for side, sequence in enumerate(dataset.examples[index].sequences):
                row = np.concatenate([[0.0], values[2 * offset + side]])  # aligned with input_ids
                out.append(row[:len(sequence)].astype(np.float32))
        return out

    pending, part_rewards, part_start, batches_in_part = None, [], done, 0
    starts = range(done, len(dataset), rows_per_batch)
    with tqdm(total=len(dataset), initial=done, unit="pair", desc=desc, dynamic_ncols=True) as bar:
        for start in starts:
            current = dispatch(list(range(start, min(start + rows_per_batch, len(dataset)))))
            if pending is not None:  # fetched while the device works on the next batch
                part_rewards += collect(*pending)
                bar.update(len(pending[0]))
                batches_in_part += 1
                if cache is not None and batches_in_part >= save_every:
                    part_start = _write_part(cache, dataset, part_start, part_rewards)
                    rewards += part_rewards
                    part_rewards, batches_in_part = [], 0
            pending = current
        if pending is not None:
            part_rewards += collect(*pending)
            bar.update(len(pending[0]))
    if cache is not None and part_rewards:
        _write_part(cache, dataset, part_start, part_rewards)
    rewards += part_rewards
    per_example = [tuple(rewards[2 * i:2 * i + 2]) for i in range(len(dataset))]
    result = dataset.with_token_values("token_rewards", per_example)
    if cache is not None:
        (cache / PREVIEW_FILE).write_text(render_html(tokenizer, cached_examples(result, range(min(16, len(result)))),
                                                      title=f"{desc}: first pairs"))
    return result


@functools.lru_cache(maxsize=8)  # the same patient structure and settings reuse the compiled programs
def _scorer(graphdef, settings: RewardSettings, chunk_size: int | None):
    @jax.jit
    def score(state, pos_ids, pos_mask, pos_positions, pos_shift, neg_ids, neg_mask, neg_positions, neg_shift,
              response_mask):
        patient = nnx.merge(graphdef, state)
        targets = jnp.arange(response_mask.shape[1])[None, :]
        logps = []
        for ids, mask, positions, shift in ((pos_ids, pos_mask, pos_positions, pos_shift),
                                            (neg_ids, neg_mask, neg_positions, neg_shift)):
            faced = target_logps(patient, ids, mask, positions, chunk_size=chunk_size)
            # Target j of a neutral row is target j + shift of its faced row (clipped where the mask is 0).
            index = jnp.clip(targets + shift[:, None], 0, faced.shape[1] - 1)
            logps.append(jnp.take_along_axis(faced, index, axis=1))
        return pair_token_rewards(logps[0], logps[1], response_mask, settings)

    return score


def _write_part(cache: Path, dataset: jdata.TokenizedDataset, start: int, rewards: list[np.ndarray]) -> int:
    count = len(rewards) // 2
    sequences = [s for i in range(start, start + count) for s in dataset.examples[i].sequences]
    path = cache / f"part-{start:08d}.npz"
    tmp = cache / f".{path.name}.tmp"  # not a part-*.npz name: a build killed while writing leaves no "part"
    with open(tmp, "wb") as file:
        np.savez(file, rewards=np.concatenate(rewards),
                 lengths=np.asarray([len(r) for r in rewards]).reshape(count, 2),
                 ids=np.concatenate([s.ids for s in sequences]).astype(np.int32),
                 prompt_lengths=np.asarray([s.prompt_length for s in sequences]).reshape(count, 2))
    tmp.replace(path)  # a part is whole or absent: a build stopped mid-write leaves no torn file
    return start + count


@dataclasses.dataclass(frozen=True)
class RewardedPair:
    """One pair of a token-reward cache: each side's ids, prompt length and per-token rewards."""

    ids: tuple[np.ndarray, np.ndarray]
    prompt_lengths: tuple[int, int]
    rewards: tuple[np.ndarray, np.ndarray]


def cached_examples(dataset: jdata.TokenizedDataset, indices) -> list[RewardedPair]:
    """The pairs ``indices`` of a dataset carrying ``token_rewards``."""
    out = []
    for i in indices:
        example = dataset.examples[i]
        out.append(RewardedPair(tuple(s.ids for s in example.sequences),
                                tuple(s.prompt_length for s in example.sequences), example.values["token_rewards"]))
    return out


def load_cache(cache_dir: str | Path) -> tuple[list[RewardedPair], Any, dict[str, Any]]:
    """``(pairs, tokenizer, meta)`` of a token-reward cache written by :func:`build_token_rewards`.

    Raises:
        FileNotFoundError: ``cache_dir`` holds no token-reward cache.
    """
    cache = Path(cache_dir)
    if not (cache / META_FILE).is_file():
        raise FileNotFoundError(f"{cache}: no {META_FILE}; a token-reward cache is written by `jaxalign train tfpo` "
                                "into <output_dir>/token_rewards/<split>")
    from transformers import AutoTokenizer

    meta = json.loads((cache / META_FILE).read_text())
    pairs = []
    for part in _parts(cache):
        with np.load(part) as arrays:
            lengths = arrays["lengths"]
            ids, rewards = _split_rows(arrays["ids"], lengths), _split_rows(arrays["rewards"], lengths)
            for i in range(len(lengths)):
                prompt_lengths = tuple(int(p) for p in arrays["prompt_lengths"][i])
                pairs.append(RewardedPair((ids[2 * i], ids[2 * i + 1]), prompt_lengths,
                                          (rewards[2 * i], rewards[2 * i + 1])))
    return pairs, AutoTokenizer.from_pretrained(str(cache)), meta


def _pieces(tokenizer, ids: np.ndarray) -> list[str]:
    """Each token's text, so that the pieces joined read as the decoded string (byte-level BPE safe)."""
    pieces, previous = [], ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end], skip_special_tokens=False)
        pieces.append(text[len(previous):] if text.startswith(previous) else tokenizer.decode(ids[end - 1:end]))
        previous = text
    return pieces


def render_terminal(tokenizer, pair: RewardedPair, *, colour: bool = True) -> str:
    """Both responses of a pair, each token on a background coloured by its reward (green +, red −; stronger
    for larger ``|r|``), after the prompt in plain text. Without ``colour``: ``[token|+0.42]`` marks instead."""
    lines = [tokenizer.decode(pair.ids[0][:pair.prompt_lengths[0]], skip_special_tokens=False).rstrip()]
    for side, name in enumerate(("chosen", "rejected")):
        start = pair.prompt_lengths[side]
        pieces = _pieces(tokenizer, pair.ids[side])[start:]
        text = []
        for piece, reward in zip(pieces, pair.rewards[side][start:], strict=True):
            if reward == 0:
                text.append(piece)
            elif colour:
                level = int(80 + 175 * min(abs(float(reward)), 1.0))
                rgb = (0, level, 0) if reward > 0 else (level, 0, 0)
                text.append(f"\x1b[48;2;{rgb[0]};{rgb[1]};{rgb[2]}m\x1b[97m{piece}\x1b[0m")
            else:
                text.append(f"[{piece}|{float(reward):+.2f}]")
        total = float(np.sum(pair.rewards[side]))
        lines.append(f"--- {name} (sum of rewards {total:+.2f}, {int(np.count_nonzero(pair.rewards[side]))} rewarded "
                     f"tokens of {len(pieces)})\n{''.join(text)}")
    return "\n".join(lines)


def render_html(tokenizer, pairs: Sequence[RewardedPair], *, title: str = "token rewards") -> str:
    """A self-contained HTML page of the pairs, each token coloured by its reward (hover: its value)."""
    def spans(ids, rewards, start):
        out = []
        for piece, reward in zip(_pieces(tokenizer, ids)[start:], rewards[start:], strict=True):
            alpha = min(abs(float(reward)), 1.0)
            colour = f"rgba(22,163,74,{alpha:.2f})" if reward > 0 else f"rgba(220,38,38,{alpha:.2f})"
            style = f' style="background:{colour}"' if reward != 0 else ""
            out.append(f'<span title="{float(reward):+.3f}"{style}>{html.escape(piece)}</span>')
        return "".join(out)

    blocks = []
    for index, pair in enumerate(pairs):
        prompt = tokenizer.decode(pair.ids[0][:pair.prompt_lengths[0]], skip_special_tokens=False)
        sides = "".join(
            f'<div class="side"><h3>{name} <small>(Σr = {float(np.sum(pair.rewards[s])):+.2f})</small></h3>'
            f'<pre>{spans(pair.ids[s], pair.rewards[s], pair.prompt_lengths[s])}</pre></div>'
            for s, name in enumerate(("chosen", "rejected")))
        blocks.append(f'<section><h2>pair {index}</h2><pre class="prompt">{html.escape(prompt)}</pre>'
                      f'<div class="pair">{sides}</div></section>')
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>
body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}} pre{{white-space:pre-wrap;font-size:14px;
line-height:1.6}} .prompt{{color:#555;background:#f4f4f5;padding:.5em}} .pair{{display:flex;gap:2em}}
.side{{flex:1}} .legend span{{padding:0 .4em}}</style></head><body><h1>{html.escape(title)}</h1>
<p class="legend">Each response token is coloured by its LLMDoctor reward: <span style="background:rgba(22,163,74,.8)">
positive</span> (chosen response), <span style="background:rgba(220,38,38,.8)">negative</span> (rejected response);
the stronger the colour, the larger |r|. Uncoloured tokens are below the threshold. Hover a token for its value.</p>
{''.join(blocks)}</body></html>
"""
