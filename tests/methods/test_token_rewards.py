"""LLMDoctor's token-reward builder (methods/token_rewards.py) and its faces (methods/faces.py) on a tiny Llama.

The builder is checked token for token against a slow reference that shares none of its machinery: each face
sequence is built by hand (Python lists: a ChatML system turn or a text line written out before the row, or the
whole conversation with the face as its system message rendered and encoded) and run through the model's full
logits (right-padded, no mask, no positions: a causal model), and Δ, Δ̂, S and r are computed in NumPy float64.
Where a face goes is checked on the published chat templates of SmolLM2, Llama 3, Qwen2 and Mistral
(tests/methods/chat_templates.py) and on the embedded SmolLM2 tokenizer. Then the cache: resumable parts, keys that
invalidate it, ``load_cache`` and the renderings.
"""

from __future__ import annotations

import functools
import html
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers import models as token_models
from transformers import PreTrainedTokenizerFast

from jaxalign import data, models
from jaxalign.methods import token_rewards as tr
from jaxalign.methods.faces import (
    DEFAULT_FACES,
    Face,
    chat_face_ids,
    face_conversation,
    resolve_face_format,
    resolve_faces,
    text_face_ids,
)
from jaxalign.methods.token_rewards import FaceRows, RewardSettings, build_token_rewards, load_cache
from tests.methods.chat_templates import FAMILIES, word_tokenizer
from tests.test_cli import CHAT_TEMPLATE, VOCAB, tiny_tokenizer

FACE = Face(positive="Hi sky blue .", negative="Go away")
# Pairs of different lengths (a response of 1 to 12 words), so batches pad differently.
PAIRS = [("Hi", "sky blue .", "Go away ."), ("sky ?", "blue", "away away away away away away away ."),
         ("Go Go Go Go", "Hi . Hi . sky blue sky blue sky blue sky .", "away"), ("Hi ?", "blue sky", "Go away"),
         ("away ?", "Hi Hi", "Go"), ("blue", "sky .", "away . Go . away")]
REF_ROWS, REF_LENGTH = 8, 96  # the reference's one compiled shape
IM_START, IM_END, NEWLINE, SYSTEM = VOCAB["<|im_start|>"], VOCAB["<|im_end|>"], VOCAB["\n"], VOCAB["system"]
BOS_VOCAB = {("<s>" if token == "w0" else token): index for token, index in VOCAB.items()}
BOS = BOS_VOCAB["<s>"]
REAL_FACED_BATCH = tr.faced_batch


def bos_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """The word-level tokenizer with a BOS ``<s>`` that encoding adds in front (and, given, a chat template)."""
    backend = Tokenizer(token_models.WordLevel(BOS_VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s|\w+|[^\w\s]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="<|im_end|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = chat_template
    return tokenizer


def write_pairs(path: Path, pairs=PAIRS, *, chat: bool = True) -> Path:
    if chat:
        rows = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
                 "rejected": [{"role": "assistant", "content": r}]} for p, c, r in pairs]
    else:
        rows = [{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in pairs]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def dataset_of(tmp_path: Path, tokenizer, *, chat: bool = True, pairs=PAIRS) -> data.TokenizedDataset:
    source = write_pairs(tmp_path / f"pairs_{chat}_{len(pairs)}.jsonl", pairs, chat=chat)
    return data.build_dataset(data.DataConfig(str(source), max_length=48), tokenizer)


@pytest.fixture(scope="module")
def patient(checkpoint):
    return models.load_hf(checkpoint)


@pytest.fixture(scope="module")
def pairs(checkpoint, tmp_path_factory):
    return dataset_of(tmp_path_factory.mktemp("pairs"), tiny_tokenizer())


# ------------------------------------------------------------------------------------------ the slow reference


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, ids):
    return nnx.merge(graphdef, state)(ids)[0]


def reference_logps(patient, sequences: list[list[int]]) -> list[np.ndarray]:
    """Each sequence's next-token log-probs ``[len - 1]`` from the model's full logits, log-softmax in float64.
    Rows are right-padded to one shape; a causal model's logits at a position do not see what follows it."""
    graphdef, state = nnx.split(patient)
    out = []
    for start in range(0, len(sequences), REF_ROWS):
        chunk = sequences[start:start + REF_ROWS]
        ids = np.zeros((REF_ROWS, REF_LENGTH), np.int32)
        for row, sequence in enumerate(chunk):
            assert len(sequence) <= REF_LENGTH
            ids[row, :len(sequence)] = sequence
        logits = np.asarray(_logits(graphdef, state, ids), np.float64)
        logps = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        for row, sequence in enumerate(chunk):
            out.append(np.array([logps[row, t, sequence[t + 1]] for t in range(len(sequence) - 1)]))
    return out


def chat_face(text: str, tokenizer) -> list[int]:
    """A ChatML system turn, written out by hand."""
    return [IM_START, SYSTEM, NEWLINE, *tokenizer.encode(text, add_special_tokens=False), IM_END, NEWLINE]


def text_face(text: str, tokenizer) -> list[int]:
    return [*tokenizer.encode(text, add_special_tokens=False), NEWLINE, NEWLINE]


def prefixed_rows(dataset, faces: tuple[list[int], list[int]], bos: int | None = None) -> list[list[list[int]]]:
    """``[sequence][face]``: each face's ids put before each sequence (after its BOS when it starts with one)."""
    rows = []
    for example in dataset.examples:
        for sequence in example.sequences:
            ids = [int(i) for i in sequence.ids]
            rows.append([ids[:1] + face + ids[1:] if bos is not None and ids[0] == bos else face + ids
                         for face in faces])
    return rows


def rendered_rows(tokenizer, pairs, face: Face) -> list[list[list[int]]]:
    """``[sequence][face]``: each whole conversation (prompt, response) rendered with the face as its system
    message and encoded, as the data pipeline encodes a rendered conversation."""
    rows = []
    for prompt, chosen, rejected in pairs:
        for response in (chosen, rejected):
            rows.append([tokenizer(tokenizer.apply_chat_template(
                [{"role": "system", "content": text}, {"role": "user", "content": prompt},
                 {"role": "assistant", "content": response}], tokenize=False), add_special_tokens=False)["input_ids"]
                for text in (face.positive, face.negative)])
    return rows


def reference_rewards(patient, dataset, faced: list[list[list[int]]],
                      settings: RewardSettings) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per pair, per side: r aligned with input_ids, from Δ, Δ̂, S computed in float64 (the paper's formulas).
    ``faced[k]`` are sequence ``k``'s two faced rows, each ending with the sequence's response ids."""
    sequences, rows = [], []
    for example in dataset.examples:
        for sequence in example.sequences:
            ids = [int(i) for i in sequence.ids]
            rows.append((ids, sequence.prompt_length))
    assert len(faced) == len(rows)
    for (ids, prompt_length), per_face in zip(rows, faced, strict=True):
        for row in per_face:
            assert row[len(row) - len(ids) + prompt_length:] == ids[prompt_length:]  # the same response tokens
            sequences.append(row)
    logps = reference_logps(patient, sequences)
    out = []
    for index, (ids, prompt_length) in enumerate(rows):
        per_face = []
        for k, row in enumerate(faced[index]):
            # Row token j sits at j + shift of the faced row: predicted at j + shift - 1.
            shift = len(row) - len(ids)
            per_face.append(np.array([logps[2 * index + k][j + shift - 1] for j in range(1, len(ids))]))
        response = np.arange(1, len(ids)) >= max(prompt_length, 1)
        gap = np.abs(per_face[0] - per_face[1])[response]
        importance = np.tanh(gap / (gap.mean() + settings.eps) / settings.tau)
        sign = 1.0 if index % 2 == 0 else -1.0
        rewards = np.zeros(len(ids))
        rewards[np.flatnonzero(response) + 1] = sign * importance * (importance > settings.threshold)
        out.append(rewards)
    return [(out[2 * i], out[2 * i + 1]) for i in range(len(dataset))]


def assert_matches_reference(result, dataset, expected):
    assert result.value_keys[-1] == "token_rewards" and len(result) == len(dataset)
    rewarded = 0
    for i, (example, want) in enumerate(zip(result.examples, expected, strict=True)):
        for got_sequence, sequence in zip(example.sequences, dataset.examples[i].sequences, strict=True):
            np.testing.assert_array_equal(got_sequence.ids, sequence.ids)  # the pairs themselves unchanged
            assert got_sequence.prompt_length == sequence.prompt_length
        for side, (got, reference) in enumerate(zip(example.values["token_rewards"], want, strict=True)):
            sequence = example.sequences[side]
            assert got.dtype == np.float32 and got.shape == (len(sequence),)
            np.testing.assert_allclose(got, reference, rtol=1e-5, atol=2e-6, err_msg=f"pair {i}, side {side}")
            assert np.all(got[:max(sequence.prompt_length, 1)] == 0)  # prompt (and first) tokens: no reward
            assert np.all(got >= 0) if side == 0 else np.all(got <= 0)
            rewarded += np.count_nonzero(got)
    assert rewarded > 10  # a comparison of zeros would prove nothing


# ------------------------------------------------------------------------------------------ equal to the reference


def test_chat_faces_equal_the_float64_reference_with_a_partial_last_batch(patient, pairs):
    tokenizer = tiny_tokenizer()
    assert len(set(pairs.lengths.tolist())) >= 4 and len(pairs) % 4  # several lengths; 6 pairs = 4 + a partial 2
    settings = RewardSettings(eps=1e-6, tau=0.7, threshold=0.35)
    result = build_token_rewards(patient, tokenizer, pairs, FACE, settings=settings, batch_size=4)
    faces = (chat_face(FACE.positive, tokenizer), chat_face(FACE.negative, tokenizer))
    assert faces[0] != faces[1] and len(faces[0]) != len(faces[1])  # faces of different lengths
    expected = reference_rewards(patient, pairs, prefixed_rows(pairs, faces), settings)
    assert_matches_reference(result, pairs, expected)
    # The threshold acts: some response tokens fall below it (0), some pass it.
    response = np.concatenate([r[p:] for e, want in zip(pairs.examples, expected, strict=True)
                               for r, p in zip(want, (s.prompt_length for s in e.sequences), strict=True)])
    assert np.any(response == 0) and np.all((response == 0) | (np.abs(response) > 0.35))


def test_a_template_with_a_default_system_message_gets_the_face_in_its_place(patient, tmp_path):
    """SmolLM2's template writes a default system turn when the conversation has none, and its first token
    (``<|im_start|>``) is also its BOS: each face is the conversation's system message, the default turn gone."""
    family = FAMILIES["smollm2"]
    texts = [t for pair in PAIRS for t in pair] + [FACE.positive, FACE.negative]
    tokenizer = word_tokenizer(family, texts, size=97)  # the tiny patient's vocabulary size
    source = write_pairs(tmp_path / "pairs.jsonl", PAIRS[:4])
    dataset = data.build_dataset(data.DataConfig(str(source)), tokenizer)
    assert tokenizer.decode(dataset.examples[0].sequences[0].ids).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    settings = RewardSettings(eps=1e-6, tau=0.7, threshold=0.2)
    result = build_token_rewards(patient, tokenizer, dataset, FACE, settings=settings, batch_size=3)
    expected = reference_rewards(patient, dataset, rendered_rows(tokenizer, PAIRS[:4], FACE), settings)
    assert_matches_reference(result, dataset, expected)


def test_text_faces_after_a_bos_equal_the_reference(patient, tmp_path):
    tokenizer = bos_tokenizer()  # no chat template: plain-text pairs, each starting with the BOS
    dataset = dataset_of(tmp_path, tokenizer, chat=False, pairs=PAIRS[:3])
    assert all(s.ids[0] == BOS for e in dataset.examples for s in e.sequences)
    settings = RewardSettings(eps=0.0, tau=2.0, threshold=0.0)
    result = build_token_rewards(patient, tokenizer, dataset, FACE, settings=settings, batch_size=2)
    faces = (text_face(FACE.positive, tokenizer), text_face(FACE.negative, tokenizer))
    assert_matches_reference(result, dataset, reference_rewards(patient, dataset, prefixed_rows(dataset, faces, BOS),
                                                                settings))
    # At θ = 0 every response token is rewarded with ±S_t, S_t = tanh(Δ̂_t/τ) where Δ̂ averages to 1 over each
    # response (ε = 0): so τ·arctanh(|r|) averages to 1.
    for example in result.examples:
        for side, (sequence, rewards) in enumerate(zip(example.sequences, example.values["token_rewards"],
                                                       strict=True)):
            response = rewards[sequence.prompt_length:].astype(np.float64)
            assert np.all(response > 0) if side == 0 else np.all(response < 0)
            np.testing.assert_allclose(np.mean(2.0 * np.arctanh(np.abs(response))), 1.0, rtol=1e-4)


def test_a_chat_template_that_writes_a_bos_gets_one_bos(patient, tmp_path):
    """A template that starts with the BOS (Llama 3's): the faced rendering has one BOS, then the face's turn."""
    tokenizer = bos_tokenizer("{{ bos_token }}" + CHAT_TEMPLATE)
    dataset = dataset_of(tmp_path, tokenizer, chat=True, pairs=PAIRS[:3])
    assert resolve_face_format("auto", dataset.examples[0].prompt) == "chat"
    faces = (chat_face(FACE.positive, tokenizer), chat_face(FACE.negative, tokenizer))
    heads = FaceRows(dataset, tokenizer, FACE, "auto").heads(0)
    assert [list(heads[k][0][0]) for k in (0, 1)] == [
        [BOS, *face, IM_START, VOCAB["user"], NEWLINE, VOCAB["Hi"], IM_END, NEWLINE, IM_START, VOCAB["assistant"],
         NEWLINE] for face in faces]
    result = build_token_rewards(patient, tokenizer, dataset, FACE, batch_size=2)  # the paper's θ = 0.1
    assert_matches_reference(result, dataset, reference_rewards(patient, dataset, prefixed_rows(dataset, faces, BOS),
                                                                RewardSettings()))


def test_faced_batch_lays_out_rows_and_their_shifts():
    sequences = [data.TokenSequence(np.array([7, 8, 9], np.int32), 2), None,
                 data.TokenSequence(np.array([BOS, 8], np.int32), 1)]
    ids, mask, positions, shift = tr.faced_batch(sequences, [((50, 51, 52), 2), None, ((BOS, 50), 1)], 6,
                                                 pad_token_id=1)
    np.testing.assert_array_equal(ids, [[50, 51, 52, 9, 1, 1], [1, 1, 1, 1, 1, 1], [BOS, 50, 8, 1, 1, 1]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(positions, [[0, 1, 2, 3, 0, 0], [0, 0, 0, 0, 0, 0], [0, 1, 2, 0, 0, 0]])
    np.testing.assert_array_equal(shift, [1, 0, 1])


# ------------------------------------------------------------------------------------------ every template

CONVERSATIONS = [  # (prompt, response)
    ([{"role": "user", "content": "Why is the sky blue?"}], "Light scatters off the air."),
    ([{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hello there"}],
     "Bonjour !"),
    ([{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
      {"role": "user", "content": "Another one?"}], "Green, then."),
]
TEMPLATE_FACE = Face(positive="You are kind and warm.", negative="You are cold and rude.")


def template_tokenizer(name: str):
    texts = [m["content"] for prompt, _ in CONVERSATIONS for m in prompt] + [r for _, r in CONVERSATIONS]
    return word_tokenizer(FAMILIES[name], texts + [TEMPLATE_FACE.positive, TEMPLATE_FACE.negative])


@pytest.fixture(scope="module")
def embedded_tokenizer():
    return models.load_gguf_tokenizer(models.default_model_path())


@pytest.mark.parametrize("name", ["smollm2", "llama3", "qwen2", "mistral", "embedded"])
def test_a_faced_prompt_is_the_chat_its_template_renders_with_the_face_as_system_message(name, request):
    tokenizer = (request.getfixturevalue("embedded_tokenizer") if name == "embedded" else template_tokenizer(name))
    family = FAMILIES["smollm2" if name == "embedded" else name]
    records = [data.PreferenceRecord(prompt=prompt, chosen=[{"role": "assistant", "content": response}],
                                     rejected=[{"role": "assistant", "content": "No."}])
               for prompt, response in CONVERSATIONS]
    dataset = data.tokenize(records, tokenizer)
    rows = FaceRows(dataset, tokenizer, TEMPLATE_FACE, "auto")
    assert rows.format == "chat"
    for index, ((prompt, response), example) in enumerate(zip(CONVERSATIONS, dataset.examples, strict=True)):
        if not family.system_in_every_rendering and prompt[0]["role"] == "system":
            # Mistral's template drops the system message from the whole conversation: the data's response ids
            # start inside the prompt, and the builder says so rather than score them.
            assert example.sequences[0].prompt_length < len(tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=True)["input_ids"])
            with pytest.raises(ValueError, match=rf"pair {index}: its response ids start inside its prompt"):
                rows.heads(index)
            continue
        heads = rows.heads(index)
        for face_index, text in enumerate((TEMPLATE_FACE.positive, TEMPLATE_FACE.negative)):
            messages = face_conversation(prompt, text)
            assert messages[0] == {"role": "system", "content": text}
            assert [m for m in messages if m["role"] == "system"] == messages[:1]  # the face replaced the own one
            expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            for side, sequence in enumerate(example.sequences):
                head, cut = heads[face_index][side]
                assert cut == sequence.prompt_length
                assert tokenizer.decode(list(head), skip_special_tokens=False) == expected
                assert list(head) == chat_face_ids(prompt, text, tokenizer)
                if side == 0 and family.system_in_every_rendering:
                    whole = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                                          tokenize=False)
                    faced = list(head) + sequence.ids[cut:].tolist()
                    assert tokenizer.decode(faced, skip_special_tokens=False) == whole
        if name in ("smollm2", "embedded"):  # the reported defect: the default turn is gone, not cut in two
            assert "You are a helpful AI assistant" not in tokenizer.decode(list(heads[0][0][0]))


def test_a_text_face_goes_before_a_rendered_chat_turn_on_the_embedded_tokenizer(embedded_tokenizer):
    """SmolLM2's ``bos_token`` is ``<|im_start|>`` and its tokenizer adds no BOS: a plain-text prompt that is a
    rendered chat starts with it, and the text face goes before that turn, not inside it."""
    prompt = embedded_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                                    add_generation_prompt=True)
    records = [data.PreferenceRecord(prompt=prompt, chosen="Hello!", rejected="No.")]
    dataset = data.tokenize(records, embedded_tokenizer)
    assert dataset.examples[0].sequences[0].ids[0] == embedded_tokenizer.bos_token_id
    rows = FaceRows(dataset, embedded_tokenizer, TEMPLATE_FACE, "auto")
    assert rows.format == "text"
    head, cut = rows.heads(0)[0][0]
    sequence = dataset.examples[0].sequences[0]
    faced = embedded_tokenizer.decode([*head, *sequence.ids[cut:].tolist()], skip_special_tokens=False)
    assert prompt.startswith("<|im_start|>system\n")
    assert faced.startswith(f"{TEMPLATE_FACE.positive}\n\n{prompt}Hello!")


def test_a_truncated_prompt_is_rendered_whole_behind_the_face(tmp_path):
    tokenizer = template_tokenizer("qwen2")
    long_prompt = [{"role": "user", "content": " ".join(["Why is the sky blue?"] * 6)}]
    records = [data.PreferenceRecord(prompt=long_prompt, chosen=[{"role": "assistant", "content": "Light."}],
                                     rejected=[{"role": "assistant", "content": "No."}])]
    dataset = data.tokenize(records, tokenizer, truncation=data.Truncation(max_length=40, mode="keep_end"))
    sequence = dataset.examples[0].sequences[0]
    assert dataset.report.truncated["prompt"] == 2  # the prompt lost its start
    head, cut = FaceRows(dataset, tokenizer, TEMPLATE_FACE, "chat").heads(0)[0][0]
    assert cut == sequence.prompt_length
    assert tokenizer.decode(list(head)) == tokenizer.apply_chat_template(
        face_conversation(long_prompt, TEMPLATE_FACE.positive), tokenize=False, add_generation_prompt=True)


# ------------------------------------------------------------------------------------------ bad input


def test_bad_data_and_faces_are_named(patient, pairs, tmp_path):
    tokenizer = tiny_tokenizer()
    sft_file = tmp_path / "sft.jsonl"
    sft_file.write_text(json.dumps({"prompt": [{"role": "user", "content": "Hi"}],
                                    "completion": [{"role": "assistant", "content": "sky"}]}) + "\n")
    sft = data.build_dataset(data.DataConfig(str(sft_file)), tokenizer)
    with pytest.raises(ValueError, match=r"token rewards need preference pairs \(chosen, rejected\); the data holds "
                                         r"'sft' records"):
        build_token_rewards(patient, tokenizer, sft, FACE)
    group = data.tokenize([data.PreferenceGroup(pairs=[data.PreferenceRecord(
        prompt=[{"role": "user", "content": "Hi"}], chosen=[{"role": "assistant", "content": "sky"}],
        rejected=[{"role": "assistant", "content": "away"}], dimension="helpfulness")])], tokenizer)
    with pytest.raises(ValueError, match=r"grouped pairs: pick one dimension with data\.dimension, one of "
                                         r"\['helpfulness'\]"):
        build_token_rewards(patient, tokenizer, group, FACE)
    with pytest.raises(ValueError, match="the data holds no pair"):
        build_token_rewards(patient, tokenizer, data.TokenizedDataset("preference", (2,), [], 1), FACE)
    long_face = Face(positive=" ".join(["sky"] * 60), negative="Go away")
    with pytest.raises(ValueError, match=r"token rewards: pair 2 behind its face is \d+ tokens, beyond the "
                                         r"patient's 128 positions: shorten data\.max_length or the face"):
        build_token_rewards(patient, tokenizer, pairs, long_face)
    with pytest.raises(ValueError, match=r"face_format must be one of \('auto', 'chat', 'text'\), got 'xml'"):
        build_token_rewards(patient, tokenizer, pairs, FACE, face_format="xml")
    text_pairs = dataset_of(tmp_path, tokenizer, chat=False, pairs=PAIRS[:2])
    with pytest.raises(ValueError, match=r"doctor\.face_format=chat puts the face in a conversation's system message; "
                                         r"these examples have plain-text prompts: use face_format text"):
        build_token_rewards(patient, tokenizer, text_pairs, FACE, face_format="chat")
    with pytest.raises(ValueError, match=r"face_format=chat needs a chat template \(the tokenizer's or "
                                         r"data\.chat_template\); use text"):
        chat_face_ids([{"role": "user", "content": "Hi"}], "Go", bos_tokenizer())
    other = tiny_tokenizer()  # the same ids, but the data were rendered by another template
    other.chat_template = CHAT_TEMPLATE.replace("'\n'", "' '")
    with pytest.raises(ValueError, match=r"token rewards: pair 0: its prompt ids are not the chat template's "
                                         r"rendering of its prompt"):
        build_token_rewards(patient, other, pairs, FACE)


@pytest.mark.parametrize("settings, message", [
    (dict(eps=-1.0), r"doctor\.eps must be a finite number >= 0, got -1\.0"),
    (dict(tau=0.0), r"doctor\.tau must be a finite number > 0, got 0\.0"),
    (dict(tau=float("nan")), r"doctor\.tau must be a finite number > 0, got nan"),
    (dict(threshold=1.0), r"doctor\.threshold must be in \[0, 1\), got 1\.0"),
    (dict(threshold=-0.1), r"doctor\.threshold must be in \[0, 1\)"),
])
def test_settings_out_of_range_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        RewardSettings(**settings)


def test_faces_resolve_and_refuse_what_is_wrong():
    faces = resolve_faces(("helpfulness", "politeness"), {"politeness": {"positive": "Hi", "negative": "Go"}})
    assert faces == {"helpfulness": DEFAULT_FACES["helpfulness"], "politeness": Face("Hi", "Go")}
    assert resolve_faces(("safety",), None)["safety"] == DEFAULT_FACES["harmlessness"]
    with pytest.raises(ValueError, match=r"doctor\.dimensions: no face for 'politeness': give "
                                         r"doctor\.faces\.politeness = \{positive: \.\.\., negative: \.\.\.\} "
                                         r"\(defaults exist for \['conciseness', 'harmlessness'"):
        resolve_faces(("helpfulness", "politeness"), {})
    with pytest.raises(ValueError, match=r"doctor\.faces names \['politeness'\], which are not in "
                                         r"doctor\.dimensions \['helpfulness'\]"):
        resolve_faces(("helpfulness",), {"politeness": {"positive": "Hi", "negative": "Go"}})
    with pytest.raises(ValueError, match=r"doctor\.faces\.politeness: a face's positive and negative prompts are the "
                                         r"same text"):
        resolve_faces(("politeness",), {"politeness": {"positive": "Hi", "negative": "Hi"}})
    with pytest.raises(ValueError, match=r"doctor\.faces\.politeness must be \{positive: TEXT, negative: TEXT\}"):
        resolve_faces(("politeness",), {"politeness": {"positive": "Hi"}})
    with pytest.raises(ValueError, match=r"doctor\.faces\.politeness: a face's negative prompt must be non-empty"):
        resolve_faces(("politeness",), {"politeness": {"positive": "Hi", "negative": "  "}})


def test_face_formats_resolve_from_the_data(tmp_path):
    chat = tiny_tokenizer()
    chat_pairs = dataset_of(tmp_path, chat, pairs=PAIRS[:1])
    assert resolve_face_format("auto", chat_pairs.examples[0].prompt) == "chat"
    text_pairs = dataset_of(tmp_path, chat, chat=False, pairs=PAIRS[:1])  # a template, but plain-text data
    assert resolve_face_format("auto", text_pairs.examples[0].prompt) == "text"
    assert resolve_face_format("auto", None) == "text"  # an example made by hand
    assert resolve_face_format("text", chat_pairs.examples[0].prompt) == "text"
    assert text_face_ids("Hi", chat) == [VOCAB["Hi"], NEWLINE, NEWLINE]
    assert chat_face_ids([{"role": "user", "content": "Hi"}], "Go", chat) == [
        *chat_face("Go", chat), IM_START, VOCAB["user"], NEWLINE, VOCAB["Hi"], IM_END, NEWLINE, IM_START,
        VOCAB["assistant"], NEWLINE]
    # text faces on chat data: the line goes before the rendered chat
    heads = FaceRows(chat_pairs, chat, FACE, "text").heads(0)
    assert heads[1][0] == (tuple(text_face(FACE.negative, chat)), 0)


# ------------------------------------------------------------------------------------------ the cache


@pytest.fixture(scope="module")
def uncached(patient, pairs):
    """The rewards built in batches of 2 without a cache (the batches every cached build below makes)."""
    return build_token_rewards(patient, tiny_tokenizer(), pairs, FACE, batch_size=2)


def rewards_of(dataset) -> list[np.ndarray]:
    return [r for example in dataset.examples for r in example.values["token_rewards"]]


def assert_same_rewards(a, b):
    for x, y in zip(rewards_of(a), rewards_of(b), strict=True):
        np.testing.assert_array_equal(x, y)


class CountingBatches:
    """``faced_batch`` that counts the batches laid out (one call per face and batch) and fails when batch
    ``fail_at`` is."""

    def __init__(self, fail_at: int | None = None):
        self.faces, self.fail_at = 0, fail_at

    @property
    def calls(self) -> int:
        return self.faces // 2

    def __call__(self, *args, **kwargs):
        self.faces += 1
        if self.fail_at is not None and self.faces > 2 * (self.fail_at - 1):
            raise KeyboardInterrupt("interrupted")
        return REAL_FACED_BATCH(*args, **kwargs)


def build(patient, pairs, cache, monkeypatch, *, fail_at=None, face=FACE, **options) -> tuple[object, int]:
    counter = CountingBatches(fail_at)
    monkeypatch.setattr(tr, "faced_batch", counter)
    try:
        result = build_token_rewards(patient, tiny_tokenizer(), pairs, face, batch_size=2, cache_dir=cache,
                                     save_every=1, **options)
    finally:
        monkeypatch.undo()
    return result, counter.calls


def parts(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.glob("part-*.npz"))


def test_an_interrupted_build_resumes_after_its_last_part(patient, pairs, uncached, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    # Batches 1 and 2 are dispatched, batch 1 is fetched and saved, then dispatching batch 3 fails.
    with pytest.raises(KeyboardInterrupt):
        build(patient, pairs, cache, monkeypatch, fail_at=3)
    assert parts(cache) == ["part-00000000.npz"]
    resumed, computed = build(patient, pairs, cache, monkeypatch)
    assert computed == 2  # the pairs 2..5 only
    assert_same_rewards(resumed, uncached)
    assert parts(cache) == ["part-00000000.npz", "part-00000002.npz", "part-00000004.npz"]
    # Finished: read back without any computation.
    again, computed = build(patient, pairs, cache, monkeypatch, fail_at=1)
    assert computed == 0
    assert_same_rewards(again, uncached)
    assert again.fingerprint == uncached.fingerprint


def test_lost_or_torn_parts_are_rebuilt(patient, pairs, uncached, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    build(patient, pairs, cache, monkeypatch)
    (cache / "part-00000004.npz").unlink()  # the last part lost
    result, computed = build(patient, pairs, cache, monkeypatch)
    assert computed == 1
    assert_same_rewards(result, uncached)
    (cache / "part-00000002.npz").unlink()  # a gap: what follows it is rebuilt too
    result, computed = build(patient, pairs, cache, monkeypatch)
    assert computed == 2 and parts(cache) == ["part-00000000.npz", "part-00000002.npz", "part-00000004.npz"]
    assert_same_rewards(result, uncached)
    # A build killed while writing a part leaves its temporary file (never a torn part): the next build resumes.
    (cache / "part-00000004.npz").unlink()
    real_savez = np.savez

    def killed_while_saving(file, **arrays):
        real_savez(file, **{name: value for name, value in list(arrays.items())[:1]})
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(tr.np, "savez", killed_while_saving)
    with pytest.raises(KeyboardInterrupt):
        build_token_rewards(patient, tiny_tokenizer(), pairs, FACE, batch_size=2, cache_dir=cache, save_every=1)
    monkeypatch.undo()
    assert parts(cache) == ["part-00000000.npz", "part-00000002.npz"]
    result, computed = build(patient, pairs, cache, monkeypatch)
    assert computed == 1
    assert_same_rewards(result, uncached)


@pytest.mark.parametrize("change", ["face", "settings", "face_format", "data", "patient", "chat_template",
                                    "older_builder"])
def test_a_changed_key_invalidates_the_cache(patient, pairs, tmp_path, monkeypatch, change):
    cache = tmp_path / "cache"
    build(patient, pairs, cache, monkeypatch)
    assert len(parts(cache)) == 3 and build(patient, pairs, cache, monkeypatch, fail_at=1)[1] == 0  # reused
    options, face, dataset = {}, FACE, pairs
    if change == "older_builder":  # a cache whose rows were built another way: its key is that of the old builder
        meta = json.loads((cache / tr.META_FILE).read_text())
        old_key = {name: value for name, value in meta["key"].items() if name not in ("format", "chat_template")}
        (cache / tr.META_FILE).write_text(json.dumps({**meta, "key": old_key}))
    elif change == "chat_template":
        options = {"chat_template": CHAT_TEMPLATE + "{# the same rendering, another template #}"}
    elif change == "face":
        face = Face(positive="Hi sky blue .", negative="Go away .")
    elif change == "settings":
        options = {"settings": RewardSettings(threshold=0.2)}
    elif change == "face_format":
        options = {"face_format": "text"}
    elif change == "patient":
        options = {"identity": {"path": "another"}}
    else:
        dataset = data.TokenizedDataset(pairs.kind, pairs.layout, pairs.examples[:5], pairs.pad_token_id)
    # The stale parts are removed and the build starts again from the first batch (stopped there: what it would
    # compute is not the point).
    with pytest.raises(KeyboardInterrupt):
        build(patient, dataset, cache, monkeypatch, fail_at=1, face=face, **options)
    assert parts(cache) == []
    meta = json.loads((cache / tr.META_FILE).read_text())
    assert meta["examples"] == len(dataset) and meta["key"]["data"] == dataset.fingerprint
    assert meta["key"]["face"]["negative"] == face.negative and meta["key"]["patient"] == (
        options.get("identity") or tr.patient_identity(patient, None))


def test_load_cache_and_the_renderings(patient, pairs, uncached, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    build(patient, pairs, cache, monkeypatch)
    loaded, tokenizer, meta = load_cache(cache)
    assert tokenizer.get_vocab() == tiny_tokenizer().get_vocab()
    assert meta["key"]["face"] == {"positive": FACE.positive, "negative": FACE.negative}
    assert meta["key"]["format"] == tr.FACE_ROWS_FORMAT and meta["face_format"] == "chat"
    assert meta["faced_prompts"] == [tokenizer.apply_chat_template(face_conversation(
        [{"role": "user", "content": "Hi"}], text), tokenize=False, add_generation_prompt=True)
        for text in (FACE.positive, FACE.negative)]
    assert len(loaded) == len(pairs)
    for pair, example in zip(loaded, uncached.examples, strict=True):
        for side in (0, 1):
            np.testing.assert_array_equal(pair.ids[side], example.sequences[side].ids)
            np.testing.assert_array_equal(pair.rewards[side], example.values["token_rewards"][side])
            assert pair.prompt_lengths[side] == example.sequences[side].prompt_length

    pair = loaded[0]  # Hi -> "sky blue ." / "Go away ."
    plain = tr.render_terminal(tokenizer, pair, colour=False)
    assert plain.startswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n--- chosen")
    for side, name in enumerate(("chosen", "rejected")):
        start = pair.prompt_lengths[side]
        pieces = tr._pieces(tokenizer, pair.ids[side])[start:]
        assert "".join(pieces) == tokenizer.decode(pair.ids[side][start:])
        marked = "".join(piece if reward == 0 else f"[{piece}|{float(reward):+.2f}]"
                         for piece, reward in zip(pieces, pair.rewards[side][start:], strict=True))
        assert f"tokens of {len(pieces)})\n{marked}" in plain
        assert f"--- {name} (sum of rewards {float(np.sum(pair.rewards[side])):+.2f}" in plain
    assert "[sky|+" in plain and "[away|-" in plain
    coloured = tr.render_terminal(tokenizer, pair)
    assert "\x1b[48;2;0;" in coloured and "m\x1b[97msky\x1b[0m" in coloured  # green background on a chosen token
    assert ";0;0m\x1b[97maway\x1b[0m" in coloured  # red on a rejected one
    page = tr.render_html(tokenizer, loaded[:2], title="two <pairs>")
    assert "<title>two &lt;pairs&gt;</title>" in page and page.count("<section>") == 2
    assert "rgba(22,163,74," in page and "rgba(220,38,38," in page and ">sky</span>" in page
    assert html.escape("<|im_start|>") in page and "<|im_start|>" not in page.split("<body>")[1]
    assert (cache / tr.PREVIEW_FILE).read_text().count("<section>") == len(pairs)
    with pytest.raises(FileNotFoundError, match=r"no token_rewards\.json; a token-reward cache is written by"):
        load_cache(tmp_path)
