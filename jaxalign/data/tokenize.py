"""Records to token ids: chat templates, completion masks, EOS, truncation -> :class:`TokenizedDataset`.

How a record becomes ids (as TRL's SFT and DPO trainers do it):

- **conversational**: the prompt is rendered with the chat template *and the generation prompt*
  (``...<|im_start|>assistant\\n`` for ChatML), the whole conversation ``prompt + response`` without it;
  both are encoded (``add_special_tokens=False``: the template writes its own special tokens).
- **standard** (strings, including the ``role_markers``/``turn_markers`` renderings): ``prompt`` and
  ``prompt + response`` are encoded with the tokenizer's special tokens (a BOS where it adds one).
- The completion is what follows the *common prefix* of the two id lists. That prefix is normally the
  whole prompt; when the template renders the prompt differently alone, or BPE merges across the
  boundary, the completion starts where they diverge (counted as ``notes["prompt_boundary"]``). For
  pairs and best-of-N records the shortest such prefix is used, so every response shares the same prompt
  tokens.

EOS: a conversational completion ends as the template ends the assistant's turn, and those tokens are
trained, so the model learns to stop: for ChatML the content, ``<|im_end|>`` (SmolLM2's EOS, id 2) and
the template's trailing ``"\\n"`` (as TRL trains them). Nothing is added. A standard completion gets
``tokenizer.eos_token_id`` appended unless it already ends with it (``Rendering(add_eos=False)`` turns
this off); prompts never get one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np

from jaxalign.data.errors import DataError, Location, OnError, Reason, Report, check_on_error
from jaxalign.data.layouts import shared_length, target_count
from jaxalign.data.mixture import MixtureSource
from jaxalign.data.prompts import common_prefix_length
from jaxalign.data.records import (
    BestOfNRecord,
    PreferenceGroup,
    PreferenceRecord,
    PromptRecord,
    Record,
    ScoredConversation,
    SFTRecord,
    Turns,
    UnpairedRecord,
    is_conversational,
    is_empty,
    text_as_chat,
)
from jaxalign.data.render import STYLES, ConversationStyle, conversation_to_sft, record_as_text
from jaxalign.data.selection import LengthFilter
from jaxalign.data.truncation import TokenSequence, Truncation

KINDS = {
    SFTRecord: "sft",
    ScoredConversation: "sft",
    PreferenceRecord: "preference",
    PreferenceGroup: "preference_group",
    UnpairedRecord: "unpaired",
    PromptRecord: "prompt",
    BestOfNRecord: "best_of_n",
}
# Per-token values (one float per token of every sequence, attached with TokenizedDataset.with_token_values):
#: batched ``[B, *layout, T]`` like ``input_ids``, 0 on padding: LLMDoctor's token rewards and the log-probs of a
#: TFPO doctor's prior.
TOKEN_VALUES = ("token_rewards", "prior_logps")
# Records per batch of template rendering and (parallel, Rust-side) encoding.
ENCODE_CHUNK = 256
# Record counts from which the tokenising progress bar shows by default.
PROGRESS_MIN_RECORDS = 1000


@dataclass(frozen=True)
class Rendering:
    """How records become text before encoding.

    Attributes:
        conversation_style: ``"standard"`` (chat template), ``"role_markers"`` or ``"turn_markers"``
            (plain-text layouts, see :mod:`jaxalign.data.render`); applies to conversational records.
        score_template: score-conditioned SFT for scored conversations, e.g. ``"Score: {score:g}"``
            (see :func:`jaxalign.data.render.conversation_to_sft`).
        text_as_chat: turn standard records into single-turn conversations first (prompt -> user,
            response -> assistant), so plain-string datasets get the chat template.
        add_eos: append the EOS token to standard completions (see the module docstring).
        chat_template: a Jinja chat template replacing the tokenizer's.
    """

    conversation_style: ConversationStyle = "standard"
    score_template: str | None = None
    text_as_chat: bool = False
    add_eos: bool = True
    chat_template: str | None = None

    def __post_init__(self):
        if self.conversation_style not in STYLES:
            raise ValueError(f"Rendering: conversation_style must be one of {STYLES}, got {self.conversation_style!r}")

    def prepare(self, record: Record) -> Record:
        """``record`` as the encoder sees it: scored conversations as SFT, then text_as_chat, then the style."""
        if isinstance(record, ScoredConversation):
            if self.score_template is not None and record.score is None:
                raise DataError("is missing, and score_template conditions on it", where=record.origin,
                                field="score", reason=Reason.MISSING_FIELD)
            record = conversation_to_sft(record, score_template=self.score_template)
        if self.text_as_chat:
            record = text_as_chat(record)
        return record_as_text(record, self.conversation_style)


@dataclass(frozen=True)
class TokenizedExample:
    """One record's sequences (flattened layout; None = an absent pair or candidate) and per-record values.

    ``prompt`` is the record's prompt as it was rendered (text, or the conversation's messages), for a pass that
    renders it again with something changed (LLMDoctor's faces: :mod:`jaxalign.methods.faces`); None for
    examples made by hand. ``source`` is the index of the mixture source it came from (0 for one source), and
    ``origin`` where its record was read (for error messages; None for examples made by hand)."""

    sequences: tuple[TokenSequence | None, ...]
    values: dict[str, Any] = field(default_factory=dict)
    prompt: Turns | None = None
    source: int = 0
    origin: Location | None = field(default=None, compare=False, repr=False)


@dataclass
class TokenizedDataset:
    """Tokenised records of one kind, ready for :class:`jaxalign.data.loader.BatchIterator`.

    Attributes:
        kind: ``"sft"``, ``"preference"``, ``"preference_group"``, ``"unpaired"``, ``"prompt"`` or
            ``"best_of_n"``.
        layout: the sequence dims of one example: ``()`` for sft/unpaired/prompt, ``(2,)`` for a pair
            (index 0 chosen), ``(D, 2)`` for groups, ``(N,)`` for best-of-N.
        examples: one per kept record.
        pad_token_id: the tokenizer's pad id (its EOS when it has none, as TRL does); padding is also
            marked by ``attention_mask`` = 0, so the id itself is never attended to.
        dimensions: the D dimension names of a group dataset, in batch order.
        value_keys: per-record arrays batches carry (e.g. ``("margin",)``).
        reports: what each stage did (reading, then tokenising).
        share_prompts: pairs are batched one row per pair, the prompt once (:mod:`jaxalign.data.layouts`).
        compact_targets: batches carry the slots of their loss targets (``source_slots``/``target_slots``).
        mixture: the sources the examples came from (``example.source`` indexes it), their weights and counts;
            with two or more the loader interleaves them by weight (:mod:`jaxalign.data.mixture`). Empty for a
            dataset read from one source without ``dedup``/``filter``.
    """

    kind: str
    layout: tuple[int, ...]
    examples: list[TokenizedExample]
    pad_token_id: int
    dimensions: tuple[str, ...] = ()
    value_keys: tuple[str, ...] = ()
    reports: tuple[Report, ...] = ()
    share_prompts: bool = False
    compact_targets: bool = False
    mixture: tuple[MixtureSource, ...] = ()

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def report(self) -> Report:
        """The tokenising stage's report."""
        return self.reports[-1]

    @cached_property
    def lengths(self) -> np.ndarray:
        """``[N]`` int: the longest sequence of each example."""
        return np.asarray([max((len(s) for s in e.sequences if s is not None), default=0) for e in self.examples],
                          np.int64)

    @cached_property
    def row_lengths(self) -> np.ndarray:
        """``[N]`` int: the slots each example's batch row needs (:attr:`lengths`, or the shared-prompt row)."""
        if not self.share_prompts:
            return self.lengths
        return np.asarray([shared_length(*e.sequences) for e in self.examples], np.int64)

    @cached_property
    def target_counts(self) -> np.ndarray:
        """``[N]`` int: the most loss targets (completion tokens) of one sequence of each example."""
        return np.asarray([max((target_count(s) for s in e.sequences if s is not None), default=0)
                           for e in self.examples], np.int64)

    def batched_as(self, *, share_prompts: bool | None = None, compact_targets: bool | None = None,
                   ) -> TokenizedDataset:
        """A copy batched with the prompt of each pair once and/or with its targets' slots (see
        :mod:`jaxalign.data.layouts`; None keeps the current setting). Both are exact: the trainer sees the
        same log-probabilities, computed with less work.

        Raises:
            ValueError: shared prompts for a dataset that is not preference pairs, or target slots for one
                without loss targets (prompt-only, grouped, best-of-N).
        """
        share = self.share_prompts if share_prompts is None else bool(share_prompts)
        compact = self.compact_targets if compact_targets is None else bool(compact_targets)
        if share and self.kind != "preference":
            raise ValueError(f"share_prompts applies to preference pairs, not {self.kind!r} records")
        if compact and self.kind not in ("sft", "unpaired", "preference"):
            raise ValueError(f"compact_targets applies to sft, unpaired and preference records, not {self.kind!r}")
        return replace(self, share_prompts=share, compact_targets=compact)

    def with_values(self, key: str, values: np.ndarray) -> TokenizedDataset:
        """A copy whose example ``i`` carries ``values[i]`` under ``key`` (batched as ``batch[key]``).

        Raises:
            ValueError: ``values`` does not have one entry per example, or ``key`` is already carried.
        """
        values = np.asarray(values)
        if len(values) != len(self.examples):
            raise ValueError(f"with_values({key!r}): {len(values)} values for {len(self.examples)} examples")
        if key in self.value_keys:
            raise ValueError(f"with_values({key!r}): the dataset already carries {key!r}")
        examples = [replace(example, values={**example.values, key: value})
                    for example, value in zip(self.examples, values, strict=True)]
        return replace(self, examples=examples, value_keys=(*self.value_keys, key))

    def with_token_values(self, key: str, values: Sequence[Sequence[np.ndarray | None]]) -> TokenizedDataset:
        """A copy whose example ``i`` carries one float per token of each of its sequences: ``values[i][s]`` has
        ``len(sequence s)`` entries, aligned with its ids (None for an absent sequence); batched as
        ``batch[key] [B, *layout, T]`` (``key`` must be one of :data:`TOKEN_VALUES`).

        Raises:
            ValueError: an unknown key, one already carried, or values that do not fit the sequences (naming
                the example and sequence).
        """
        if key not in TOKEN_VALUES:
            raise ValueError(f"with_token_values({key!r}): per-token keys are {TOKEN_VALUES}")
        if key in self.value_keys:
            raise ValueError(f"with_token_values({key!r}): the dataset already carries {key!r}")
        if len(values) != len(self.examples):
            raise ValueError(f"with_token_values({key!r}): {len(values)} values for {len(self.examples)} examples")
        examples = []
        for index, (example, per_example) in enumerate(zip(self.examples, values, strict=True)):
            if len(per_example) != len(example.sequences):
                raise ValueError(f"with_token_values({key!r}): example {index} has {len(example.sequences)} "
                                 f"sequences, got values for {len(per_example)}")
            checked = []
            for slot, (sequence, per_token) in enumerate(zip(example.sequences, per_example, strict=True)):
                if (sequence is None) != (per_token is None) or (
                        sequence is not None and np.shape(per_token) != (len(sequence),)):
                    raise ValueError(f"with_token_values({key!r}): example {index}, sequence {slot}: "
                                     f"{None if per_token is None else np.shape(per_token)} values for "
                                     f"{None if sequence is None else len(sequence)} tokens")
                checked.append(None if per_token is None else np.asarray(per_token, np.float32))
            examples.append(replace(example, values={**example.values, key: tuple(checked)}))
        return replace(self, examples=examples, value_keys=(*self.value_keys, key))

    @cached_property
    def fingerprint(self) -> str:
        """A hash of every token id and value, so a resumed iterator can tell it got the same dataset."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"{self.kind}{self.layout}{self.dimensions}".encode())
        if len(self.mixture) > 1:  # which source each example belongs to decides the order
            digest.update(np.asarray([e.source for e in self.examples], np.int64).tobytes())
        for example in self.examples:
            for sequence in example.sequences:
                digest.update(b"-" if sequence is None else sequence.ids.tobytes() + b"|%d|" % sequence.prompt_length)
            per_token = {key: value for key, value in example.values.items() if key in TOKEN_VALUES}
            digest.update(repr(sorted((k, v) for k, v in example.values.items() if k not in per_token)).encode())
            for key, arrays in sorted(per_token.items()):  # every value, not repr's summary of long arrays
                digest.update(key.encode() + b"".join(b"-" if a is None else a.tobytes() for a in arrays))
        return digest.hexdigest()


def _pad_token_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def _units(record: Record, dimensions: tuple[str, ...], candidates: int) -> tuple[Turns, list[Turns | None]]:
    """The prompt and the responses of a prepared record in layout order (None = absent pair or candidate)."""
    if isinstance(record, (SFTRecord, UnpairedRecord)):
        return record.prompt, [record.completion]
    if isinstance(record, PreferenceRecord):
        return record.prompt, [record.chosen, record.rejected]
    if isinstance(record, BestOfNRecord):
        return record.prompt, list(record.samples) + [None] * (candidates - len(record.samples))
    if isinstance(record, PreferenceGroup):
        pairs = [record.pair(dimension) for dimension in dimensions]
        return record.prompt, [side for p in pairs for side in ((None, None) if p is None else (p.chosen, p.rejected))]
    return record.prompt, []


def _is_conversational(prompt: Turns, responses: list[Turns | None]) -> bool:
    """A record's kind, read off its first response (or its prompt when it has none)."""
    return is_conversational(next((r for r in responses if r is not None), prompt))


def _response_field(kind: str, index: int) -> str:
    if kind in ("preference", "preference_group"):
        return ("chosen", "rejected")[index % 2]
    return f"samples[{index}]" if kind == "best_of_n" else "completion"


@dataclass(frozen=True)
class _Prepared:
    """A record ready to encode: its units and the texts to encode (prompt, then each present response)."""

    prompt: Turns
    responses: list[Turns | None]
    values: dict[str, Any]
    where: Location
    conversational: bool
    texts: list[str]


class _Pipeline:
    """Renders, validates, encodes and fits the records of one dataset (see :func:`tokenize`)."""

    def __init__(self, kind, tokenizer, truncation: Truncation, rendering: Rendering, dimensions, candidates,
                 length_filter: LengthFilter | None = None):
        self.kind, self.tokenizer, self.truncation, self.rendering = kind, tokenizer, truncation, rendering
        self.length_filter = length_filter
        self.dimensions, self.candidates = dimensions, candidates
        self.template = rendering.chat_template or getattr(tokenizer, "chat_template", None)
        self.eos = tokenizer.eos_token_id if rendering.add_eos else None
        self.present: dict[str, bool] = {}  # optional value -> whether the dataset has it (set by its first record)

    def _chat(self, messages, *, generation_prompt: bool) -> str:
        import jinja2

        if self.template is None:
            raise ValueError("the tokenizer has no chat template; pass Rendering(chat_template=...) or a text "
                             "conversation_style ('role_markers' / 'turn_markers')")
        try:
            return self.tokenizer.apply_chat_template([m.as_dict() for m in messages], chat_template=self.template,
                                                      tokenize=False, add_generation_prompt=generation_prompt)
        except jinja2.TemplateError as error:
            raise DataError(f"the chat template refuses these messages ({error})") from None

    def prepare(self, original: Record, where: Location) -> _Prepared:
        record = self.rendering.prepare(original)
        prompt, responses = _units(record, self.dimensions, self.candidates)
        conversational = _is_conversational(prompt, responses)
        if conversational and prompt and prompt[-1].role == "assistant":
            raise DataError("ends with an assistant message; a prompt must end where the reply begins",
                            where=where, field="prompt")
        if self.kind == "prompt" and is_empty(prompt):
            raise DataError("is empty", where=where, field="prompt", reason=Reason.EMPTY_RESPONSE)
        for index, response in enumerate(responses):
            if response is not None and is_empty(response):
                raise DataError("empty response", where=where, field=_response_field(self.kind, index),
                                reason=Reason.EMPTY_RESPONSE)
        present = [r for r in responses if r is not None]
        if conversational:
            head = self._chat(prompt, generation_prompt=True) if prompt else ""
            texts = [head] + [self._chat(prompt + r, generation_prompt=False) for r in present]
        else:
            texts = [prompt] + [prompt + r for r in present]
        return _Prepared(prompt, responses, self.values(record, where), where, conversational, texts)

    def _optional(self, key: str, value: float | None, where: Location) -> float | None:
        """A value some sources lack (score, margin): a dataset's records all have it or all lack it."""
        expected = self.present.setdefault(key, value is not None)
        if (value is not None) != expected:
            raise DataError(f"is {'missing' if expected else 'given'} while the first record "
                            f"{'has' if expected else 'lacks'} one (all records must agree)", where=where, field=key,
                            reason=Reason.MISSING_FIELD if expected else Reason.INVALID_VALUE)
        return value

    def values(self, record: Record, where: Location) -> dict[str, Any]:
        """The per-record values a batch carries beside the tokens (see :mod:`jaxalign.data.collate`)."""
        if isinstance(record, SFTRecord):
            score = self._optional("score", record.score, where)
            return {} if score is None else {"score": float(score)}
        if isinstance(record, PreferenceRecord):
            margin = self._optional("margin", record.margin, where)
            return {} if margin is None else {"margin": float(margin)}
        if isinstance(record, UnpairedRecord):
            return {"label": int(record.label)}
        if isinstance(record, BestOfNRecord):
            return {"best": record.best,
                    "candidate_mask": tuple(int(i < len(record.samples)) for i in range(self.candidates))}
        if isinstance(record, PreferenceGroup):
            pairs = [record.pair(dimension) for dimension in self.dimensions]
            values = {"pair_mask": tuple(int(p is not None) for p in pairs)}
            margins = [self._optional("margin", p.margin, where) for p in pairs if p is not None]
            if margins[0] is not None:
                values["margin"] = tuple(0.0 if p is None else float(p.margin) for p in pairs)
            return values
        if isinstance(record, PromptRecord):
            difficulty = self._optional("difficulty", record.difficulty, where)
            return {} if difficulty is None else {"difficulty": float(difficulty)}
        return {}

    def encode(self, texts: list[str], conversational: bool) -> list[list[int]]:
        # The chat template writes its own special tokens; plain text gets the tokenizer's (e.g. a BOS).
        return self.tokenizer(texts, add_special_tokens=not conversational)["input_ids"] if texts else []

    def _filtered(self, length: int, report: Report) -> bool:
        """Whether the length filter leaves out an example whose longest sequence has ``length`` tokens
        (counted in ``report.notes``)."""
        verdict = None if self.length_filter is None else self.length_filter.verdict(length)
        if verdict is not None:
            report.notes[verdict] += 1
        return verdict is not None

    def example(self, item: _Prepared, ids: list[list[int]], report: Report, source: int = 0,
                ) -> TokenizedExample | None:
        """The example of a prepared record from its encoded texts (None when the length filter leaves it out);
        truncations and notes go to ``report``."""
        prompt_ids, full_ids = ids[0], iter(ids[1:])
        if self.kind == "prompt":
            if self._filtered(len(prompt_ids), report):
                return None
            return TokenizedExample((self.truncation.fit_prompt(prompt_ids, item.where, report.truncated),),
                                    item.values, item.prompt, source, item.where)
        full = [None if r is None else next(full_ids) for r in item.responses]
        prompt_length = min(common_prefix_length(prompt_ids, f) for f in full if f is not None)
        completions = [None if f is None else self._with_eos(f[prompt_length:], item.conversational) for f in full]
        if self._filtered(prompt_length + max(len(c) for c in completions if c is not None), report):
            return None  # before truncation: the filter's max_length drops what truncation would cut
        if prompt_length < len(prompt_ids):
            report.notes["prompt_boundary"] += 1
        sequences = self.truncation.fit(prompt_ids[:prompt_length], completions, item.where, report.truncated)
        if self.kind in ("preference", "preference_group"):
            sequences = self._without_tied_pairs(sequences, completions, item, report)
        return TokenizedExample(tuple(sequences), item.values, item.prompt, source, item.where)

    def _without_tied_pairs(self, sequences: list, completions: list, item: _Prepared, report: Report) -> list:
        """Pairs whose two sides are the same tokens carry no preference: different texts can tokenise alike,
        or differ only in the tokens truncation cut off. A plain pair is refused (``identical_responses``); in a
        group only that dimension's pair is left out (``pair_mask`` 0), counted in ``report.notes``."""
        sequences = list(sequences)
        for index in range(0, len(sequences), 2):
            chosen, rejected = sequences[index], sequences[index + 1]
            if chosen is None or rejected is None or not np.array_equal(chosen.ids, rejected.ids):
                continue
            if self.kind == "preference_group":
                dimension = self.dimensions[index // 2]
                report.notes[f"tied_after_tokenizing_{dimension}"] += 1
                sequences[index] = sequences[index + 1] = None
                continue
            if completions[index] == completions[index + 1]:
                why = "the two texts tokenise to the same ids"
            else:
                why = (f"they differ only in the tokens truncation cut off (max_length={self.truncation.max_length}, "
                       f"truncation={self.truncation.mode!r})")
            raise DataError(f"is identical to 'chosen' as tokens: {why}", where=item.where, field="rejected",
                            reason=Reason.IDENTICAL_RESPONSES)
        if self.kind == "preference_group" and all(sequence is None for sequence in sequences):
            raise DataError("every pair of the group has the same tokens on both sides: nothing to prefer",
                            where=item.where, reason=Reason.IDENTICAL_RESPONSES)
        return sequences

    def _with_eos(self, completion: list[int], conversational: bool) -> list[int]:
        if conversational or self.eos is None or completion[-1:] == [self.eos]:
            return completion
        return completion + [self.eos]


def _kind(records: Sequence[Record]) -> str:
    kinds = {KINDS.get(type(r), type(r).__name__) for r in records}
    unknown = kinds - set(KINDS.values())
    if unknown:
        raise TypeError(f"tokenize: not canonical records: {sorted(unknown)}")
    if len(kinds) != 1:
        raise TypeError(f"tokenize: records of one kind only, got {sorted(kinds)}")
    return kinds.pop()


def _layout(kind: str, records: Sequence[Record]) -> tuple[tuple[int, ...], tuple[str, ...], int]:
    """``(layout, dimensions, candidates)`` of a dataset."""
    if kind == "preference_group":
        dimensions = tuple(dict.fromkeys(d for group in records for d in group.dimensions))
        return (len(dimensions), 2), dimensions, 0
    if kind == "best_of_n":
        candidates = max(len(r.samples) for r in records)
        return (candidates,), (), candidates
    return ((2,) if kind == "preference" else ()), (), 0


def tokenize(
    records: Sequence[Record],
    tokenizer,
    *,
    truncation: Truncation | None = None,
    rendering: Rendering | None = None,
    on_error: OnError = "raise",
    progress: bool | None = None,
    source: str = "<records>",
    length_filter: LengthFilter | None = None,
) -> TokenizedDataset:
    """Tokenise canonical records of one kind into a :class:`TokenizedDataset`.

    Args:
        records: records of one type (scored conversations count as SFT).
        tokenizer: a ``transformers.PreTrainedTokenizerBase`` (for conversational records, with a chat
            template unless a text ``conversation_style`` is used).
        truncation: the length limits and policy (:class:`~jaxalign.data.truncation.Truncation`); None:
            no limit.
        rendering: chat template, conversation style, score conditioning, EOS (:class:`Rendering`); None:
            the defaults.
        on_error: ``"raise"``, or ``"skip"`` records that are too long, empty or refused by the template.
        progress: progress bar with rate and ETA; None shows it from 1000 records.
        source: how errors cite records that have no ``origin``.
        length_filter: leave out examples whose longest sequence, before truncation, is shorter or longer
            (:class:`~jaxalign.data.selection.LengthFilter`), counted in the report's ``notes``.

    Returns:
        The dataset; ``dataset.report`` counts kept, skipped, filtered and truncated records.

    Raises:
        DataError: a bad record (``on_error="raise"``) or every record skipped or filtered out.
        TypeError: records of several kinds, or not canonical records.
        ValueError: conversational records with a tokenizer that has no chat template.
    """
    return tokenize_sources([(source, records)], tokenizer, truncation=truncation, rendering=rendering,
                            on_error=on_error, progress=progress, length_filter=length_filter)


def tokenize_sources(
    groups: Sequence[tuple[str, Sequence[Record]]],
    tokenizer,
    *,
    truncation: Truncation | None = None,
    rendering: Rendering | None = None,
    on_error: OnError = "raise",
    progress: bool | None = None,
    length_filter: LengthFilter | None = None,
) -> TokenizedDataset:
    """:func:`tokenize` over the records of several sources at once: one dataset (one kind, layout and set of
    values for all), each example's ``source`` the index of its group, one report per group (``dataset.reports``
    in group order; each names its group, which also cites its records that have no ``origin``)."""
    from tqdm.auto import tqdm

    check_on_error(on_error)
    truncation, rendering = truncation or Truncation(), rendering or Rendering()
    records = [record for _, group in groups for record in group]
    if not records:
        raise ValueError("tokenize: no records")
    kind = _kind(records)
    layout, dimensions, candidates = _layout(kind, records)
    pipeline = _Pipeline(kind, tokenizer, truncation, rendering, dimensions, candidates, length_filter)
    reports, examples = [], []
    show = len(records) >= PROGRESS_MIN_RECORDS if progress is None else progress
    with tqdm(total=len(records), unit="rec", desc="tokenizing", disable=not show) as bar:
        for index, (source, group) in enumerate(groups):
            report = Report("tokenize", source, seen=len(group))
            for start in range(0, len(group), ENCODE_CHUNK):
                chunk = group[start:start + ENCODE_CHUNK]
                examples += _encode_chunk(pipeline, chunk, start, source, index, report, on_error)
                bar.update(len(chunk))
            reports.append(report.finish())
    value_keys = tuple(sorted({key for example in examples for key in example.values}))
    return TokenizedDataset(kind, layout, examples, _pad_token_id(tokenizer), dimensions, value_keys, tuple(reports))


def _encode_chunk(pipeline: _Pipeline, chunk: Sequence[Record], start: int, source: str, index: int,
                  report: Report, on_error: OnError) -> list[TokenizedExample]:
    prepared = []
    for offset, record in enumerate(chunk):
        where = record.origin or Location(source, start + offset + 1)
        try:
            prepared.append(pipeline.prepare(record, where))
        except DataError as error:
            if error.where is None:
                error = DataError(error.problem, where=where, field=error.field, reason=error.reason)
            report.handle(error, on_error)
    # One encoder call per kind of text and chunk: the Rust tokenizer encodes a batch in parallel.
    encoded = {}
    for conversational in (False, True):
        texts = [text for item in prepared if item.conversational == conversational for text in item.texts]
        encoded[conversational] = iter(pipeline.encode(texts, conversational))
    examples = []
    for item in prepared:
        ids = [next(encoded[item.conversational]) for _ in item.texts]
        try:
            example = pipeline.example(item, ids, report, index)
        except DataError as error:
            report.handle(error, on_error)
            continue
        if example is not None:
            examples.append(example)
            report.kept += 1
    return examples
