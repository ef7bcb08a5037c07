"""Canonical records: every file format is read into one of these frozen dataclasses.

Text comes in TRL's two kinds, and every field of a record holds the same kind:

- **standard**: a plain string (``"The sky is"``), tokenised as is;
- **conversational**: a tuple of :class:`Message` (role/content), rendered with a chat template (or the
  ``role_markers`` / ``turn_markers`` text layouts, see :mod:`jaxalign.data.render`).

Constructors accept lists of ``{"role", "content"}`` dicts and normalise them to tuples of
:class:`Message`, so records are immutable and comparable. ``origin`` (where a reader found the record)
is carried for error messages and takes no part in comparisons.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from jaxalign.data.errors import DataError, Location, Reason


@dataclass(frozen=True)
class Message:
    """One chat message."""

    role: str
    content: str

    def __post_init__(self):
        if not isinstance(self.role, str) or not self.role:
            raise ValueError(f"a message role must be a non-empty string, got {self.role!r}")
        if not isinstance(self.content, str):
            raise ValueError(f"a message content must be a string, got {type(self.content).__name__}")

    def as_dict(self) -> dict[str, str]:
        """The message as a chat-template dict: ``{"role": ..., "content": ...}``."""
        return {"role": self.role, "content": self.content}


Messages = tuple[Message, ...]
Turns = str | Messages


def as_turns(value: str | Sequence[Message | Mapping[str, str]]) -> Turns:
    """A string unchanged, or a sequence of messages (``Message`` or role/content dicts) as a tuple."""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence):
        return tuple(m if isinstance(m, Message) else Message(m["role"], m["content"]) for m in value)
    raise TypeError(f"expected a string or a list of messages, got {type(value).__name__}")


def is_conversational(turns: Turns) -> bool:
    return not isinstance(turns, str)


def is_empty(turns: Turns) -> bool:
    return len(turns) == 0


def _same_kind(owner: str, **fields: Turns) -> None:
    """All non-empty fields are strings, or all are messages (an empty prompt fits either kind)."""
    kinds = {name: is_conversational(value) for name, value in fields.items() if not is_empty(value)}
    if len(set(kinds.values())) > 1:
        described = ", ".join(f"{name}: {'messages' if conv else 'string'}" for name, conv in kinds.items())
        raise ValueError(f"{owner}: fields mix plain strings and message lists ({described})")


def _empty_like(prompt: Turns, reference: Turns) -> Turns:
    # An empty prompt takes the kind of the response it precedes, so "" and () mean the same thing.
    return (() if is_conversational(reference) else "") if is_empty(prompt) else prompt


@dataclass(frozen=True)
class SFTRecord:
    """A prompt and the completion to imitate; an empty prompt trains on the whole completion.

    ``score`` (optional) is an external quality score, batched as ``score [B]`` for score-weighted or
    score-conditioned SFT and for use as a reward.
    """

    prompt: Turns
    completion: Turns
    score: float | None = None
    origin: Location | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "completion", as_turns(self.completion))
        object.__setattr__(self, "prompt", _empty_like(as_turns(self.prompt), self.completion))
        _same_kind("SFTRecord", prompt=self.prompt, completion=self.completion)


@dataclass(frozen=True)
class PreferenceRecord:
    """A prompt with a preferred (``chosen``) and a dispreferred (``rejected``) response.

    ``margin`` (optional) is how strongly ``chosen`` wins (e.g. a rating gap; the reward-model margin);
    ``dimension`` names the preference axis (``"helpfulness"``, ``"safety"``) when a source has several.

    Identical ``chosen`` and ``rejected`` (equal strings, or equal message lists) are refused with a
    :class:`~jaxalign.data.errors.DataError` (reason ``identical_responses``, field ``rejected``, at
    ``origin``): such a pair carries no preference, and every reader builds its pairs here, so the check
    holds for all formats.
    """

    prompt: Turns
    chosen: Turns
    rejected: Turns
    margin: float | None = None
    dimension: str | None = None
    origin: Location | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "chosen", as_turns(self.chosen))
        object.__setattr__(self, "rejected", as_turns(self.rejected))
        object.__setattr__(self, "prompt", _empty_like(as_turns(self.prompt), self.chosen))
        _same_kind("PreferenceRecord", prompt=self.prompt, chosen=self.chosen, rejected=self.rejected)
        if self.chosen == self.rejected:
            raise identical_responses(self.origin, "rejected", "chosen")


def identical_responses(where: Location | None, field: str, other: str) -> DataError:
    """The error of a pair whose two responses are the same (shared by every reader that checks early)."""
    return DataError(f"is identical to {other!r}: a pair with the same response on both sides has no preference",
                     where=where, field=field, reason=Reason.IDENTICAL_RESPONSES)


@dataclass(frozen=True)
class PreferenceGroup:
    """Several preference pairs on one prompt, one per dimension, kept together.

    PKU-SafeRLHF gives a ``helpfulness`` and a ``safety`` pair over the same two responses; UltraFeedback
    one pair per rated aspect. Multi-dimensional reward models (``[B, D]`` rewards) and doctors train
    on all of them at once; ``pair(d)`` or :func:`flatten_groups` give single-dimension pairs.
    """

    pairs: tuple[PreferenceRecord, ...]
    origin: Location | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "pairs", tuple(self.pairs))
        if not self.pairs:
            raise ValueError("PreferenceGroup: needs at least one pair")
        dimensions = [pair.dimension for pair in self.pairs]
        if None in dimensions or len(set(dimensions)) != len(dimensions):
            raise ValueError(f"PreferenceGroup: every pair needs its own dimension, got {dimensions}")
        if any(pair.prompt != self.pairs[0].prompt for pair in self.pairs):
            raise ValueError("PreferenceGroup: all pairs must share the prompt")

    @property
    def prompt(self) -> Turns:
        """The prompt every pair of the group shares."""
        return self.pairs[0].prompt

    @property
    def dimensions(self) -> tuple[str, ...]:
        """The preference dimension of each pair, in order."""
        return tuple(pair.dimension for pair in self.pairs)

    def pair(self, dimension: str) -> PreferenceRecord | None:
        """The pair of ``dimension``, or None when this prompt has none (e.g. a tie)."""
        return next((pair for pair in self.pairs if pair.dimension == dimension), None)


@dataclass(frozen=True)
class UnpairedRecord:
    """A prompt and one completion labelled desirable (``True``) or undesirable (KTO-style feedback)."""

    prompt: Turns
    completion: Turns
    label: bool
    origin: Location | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "completion", as_turns(self.completion))
        object.__setattr__(self, "prompt", _empty_like(as_turns(self.prompt), self.completion))
        if not isinstance(self.label, bool):
            raise ValueError(f"UnpairedRecord: label must be a bool, got {self.label!r}")
        _same_kind("UnpairedRecord", prompt=self.prompt, completion=self.completion)


@dataclass(frozen=True)
class PromptRecord:
    """A prompt alone, for online methods (PPO, GRPO) that generate their own completions.

    ``difficulty`` (optional) orders a curriculum: easier (lower) prompts first.
    """

    prompt: Turns
    difficulty: float | None = None
    origin: Location | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "prompt", as_turns(self.prompt))


@dataclass(frozen=True)
class BestOfNRecord:
    """A prompt, N candidate responses and the index of the one a labeller picked (best-of-N reward loss)."""

    prompt: Turns
    samples: tuple[Turns, ...]
    best: int
    origin: Location | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        samples = tuple(as_turns(sample) for sample in self.samples)
        object.__setattr__(self, "samples", samples)
        if len(samples) < 2:
            raise ValueError(f"BestOfNRecord: needs at least 2 samples, got {len(samples)}")
        object.__setattr__(self, "prompt", _empty_like(as_turns(self.prompt), samples[0]))
        if not isinstance(self.best, int) or isinstance(self.best, bool) or not 0 <= self.best < len(samples):
            raise ValueError(f"BestOfNRecord: best must be an index in [0, {len(samples)}), got {self.best!r}")
        _same_kind("BestOfNRecord", prompt=self.prompt, **{f"samples[{i}]": s for i, s in enumerate(samples)})


@dataclass(frozen=True)
class ScoredConversation:
    """A whole conversation with an evaluation score (and the evaluator's reason).

    It ends with an assistant message: that last reply is what SFT trains on (see
    :func:`jaxalign.data.render.conversation_to_sft`), the score is its reward.
    """

    messages: Messages
    score: float | None
    reason: str | None = None
    origin: Location | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        messages = as_turns(self.messages)
        if isinstance(messages, str) or not messages:
            raise ValueError("ScoredConversation: messages must be a non-empty list of messages")
        if messages[-1].role != "assistant":
            raise ValueError(f"ScoredConversation: the last message must be the assistant's, got {messages[-1].role!r}")
        object.__setattr__(self, "messages", messages)


#: Any canonical record a format parser yields.
Record = (SFTRecord | PreferenceRecord | PreferenceGroup | UnpairedRecord | PromptRecord | BestOfNRecord
          | ScoredConversation)


def flatten_groups(groups: Sequence[PreferenceGroup], dimension: str | None = None) -> list[PreferenceRecord]:
    """The pairs of ``groups`` as single records: all of them, or only those of ``dimension``."""
    return [pair for group in groups for pair in group.pairs if dimension is None or pair.dimension == dimension]


def _user(text: str) -> Messages:
    return (Message("user", text),) if text else ()


def _assistant(text: Turns) -> Turns:
    return (Message("assistant", text),) if isinstance(text, str) else text


def text_as_chat(record: Record) -> Record:
    """A standard (plain-string) record as a single-turn conversation: prompt -> user, responses -> assistant.

    For instruct models fed plain-string datasets (PKU-SafeRLHF, UltraFeedback instructions, TRL standard
    files) so that the chat template applies. Conversational records are returned unchanged.
    """
    if isinstance(record, ScoredConversation):
        return record
    if isinstance(record, PreferenceGroup):
        return replace(record, pairs=tuple(text_as_chat(pair) for pair in record.pairs))
    prompt = _user(record.prompt) if isinstance(record.prompt, str) else record.prompt
    if isinstance(record, (SFTRecord, UnpairedRecord)):
        return replace(record, prompt=prompt, completion=_assistant(record.completion))
    if isinstance(record, PreferenceRecord):
        return replace(record, prompt=prompt, chosen=_assistant(record.chosen), rejected=_assistant(record.rejected))
    if isinstance(record, BestOfNRecord):
        return replace(record, prompt=prompt, samples=tuple(_assistant(s) for s in record.samples))
    return replace(record, prompt=prompt)
