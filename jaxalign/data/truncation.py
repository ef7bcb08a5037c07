"""Truncation policies: fitting prompt + completion token ids into ``max_length``.

``Truncation(max_length, max_prompt_length, mode)``; every sequence shortened is counted in the tokenize
:class:`~jaxalign.data.errors.Report` (``truncated["prompt"]``: its prompt lost its start;
``truncated["completion"]``: its completion lost its end; ``truncated["completion_start"]``: keep_end cut
into the completion; ``truncated["tokens"]``: tokens dropped in all, summed over the sequences).

Modes (all sequences of a record share the prompt; for pairs the longer response decides):

- ``"keep_start"`` (TRL's default): cut the end of the completion. A prompt that leaves no room for any
  completion token is an error (``prompt_too_long``): nothing of it could be trained.
- ``"keep_end"``: cut the start, so each completion's end (its EOS) always survives: the shared prompt
  loses its oldest tokens, as many as the longest sequence is over ``max_length`` (so every sequence of
  the record keeps the same, shortened prompt); only once the prompt is gone does a completion that is
  still too long lose its own start.
- ``"prompt_first"`` (TRL 0.x DPO's ``max_prompt_length``): when a sequence is too long, first cut the
  prompt's start down to ``max_prompt_length`` (the cap), then the completions' ends.

``max_prompt_length`` is a limit in ``keep_start``/``keep_end``: a longer prompt is a ``prompt_too_long``
error (``on_error="skip"`` leaves the record out). In ``prompt_first`` it is the cap above. Prompt-only
records (generation) have no completion: a prompt longer than ``min(max_prompt_length, max_length)`` is an
error, or in ``prompt_first`` keeps its last tokens.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

import numpy as np

from jaxalign.data.errors import DataError, Location, Reason

TruncationMode = Literal["keep_start", "keep_end", "prompt_first"]
MODES = ("keep_start", "keep_end", "prompt_first")


@dataclass(frozen=True)
class TokenSequence:
    """One tokenised sequence: ``ids`` ``[L]`` int32, of which the first ``prompt_length`` are the prompt."""

    ids: np.ndarray
    prompt_length: int

    def __len__(self) -> int:
        return len(self.ids)


def _sequence(prompt: list[int], completion: list[int]) -> TokenSequence:
    return TokenSequence(np.asarray(prompt + completion, np.int32), len(prompt))


@dataclass(frozen=True)
class Truncation:
    """How sequences are fitted into ``max_length`` tokens (see the module docstring).

    Attributes:
        max_length: tokens per sequence (prompt + completion); None = no limit.
        max_prompt_length: the prompt limit (``keep_start``/``keep_end``) or cap (``prompt_first``).
        mode: ``"keep_start"``, ``"keep_end"`` or ``"prompt_first"``.
    """

    max_length: int | None = None
    max_prompt_length: int | None = None
    mode: TruncationMode = "keep_start"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"Truncation: mode must be one of {MODES}, got {self.mode!r}")
        for name in ("max_length", "max_prompt_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"Truncation: {name} must be a positive int or None, got {value!r}")
        if self.mode == "prompt_first" and (self.max_length is None or self.max_prompt_length is None):
            raise ValueError("Truncation: mode 'prompt_first' needs both max_length and max_prompt_length")
        if None not in (self.max_length, self.max_prompt_length) and self.max_prompt_length >= self.max_length:
            raise ValueError(f"Truncation: max_prompt_length ({self.max_prompt_length}) must be smaller than "
                             f"max_length ({self.max_length}) to leave room for a completion")

    def _too_long(self, length: int, limit: int, name: str, where: Location | None) -> DataError:
        return DataError(f"{length} tokens, longer than {name}={limit}", where=where, field="prompt",
                         reason=Reason.PROMPT_TOO_LONG)

    def fit_prompt(self, prompt: list[int], where: Location | None, events: Counter) -> TokenSequence:
        """A prompt-only sequence (left-padded for generation later)."""
        limits = [(v, n) for v, n in ((self.max_prompt_length, "max_prompt_length"), (self.max_length, "max_length"))
                  if v is not None]
        if limits:
            limit, name = min(limits)
            if len(prompt) > limit:
                if self.mode != "prompt_first":
                    raise self._too_long(len(prompt), limit, name, where)
                events["prompt"] += 1
                events["tokens"] += len(prompt) - limit
                prompt = prompt[-limit:]
        return _sequence(prompt, [])

    def fit(self, prompt: list[int], completions: list[list[int] | None], where: Location | None,
            events: Counter) -> list[TokenSequence | None]:
        """The sequences ``prompt + completion`` (None stays None), fitted to ``max_length``.

        Raises:
            DataError: ``prompt_too_long`` (see the module docstring).
        """
        cap = self.max_prompt_length
        if cap is not None and len(prompt) > cap and self.mode != "prompt_first":
            raise self._too_long(len(prompt), cap, "max_prompt_length", where)
        present = [c for c in completions if c is not None]
        if self.max_length is None or len(prompt) + max(map(len, present)) <= self.max_length:
            return [None if c is None else _sequence(prompt, c) for c in completions]
        if self.mode == "keep_end":
            return self._keep_end(prompt, completions, events)
        if self.mode == "prompt_first" and len(prompt) > cap:
            events["prompt"] += len(present)
            events["tokens"] += (len(prompt) - cap) * len(present)
            prompt = prompt[-cap:]
        room = self.max_length - len(prompt)
        if room <= 0:
            raise DataError(f"{len(prompt)} tokens fill max_length={self.max_length}: no completion token would "
                            "be trained", where=where, field="prompt", reason=Reason.PROMPT_TOO_LONG)
        fitted = []
        for completion in completions:
            if completion is not None and len(completion) > room:
                events["completion"] += 1
                events["tokens"] += len(completion) - room
                completion = completion[:room]
            fitted.append(None if completion is None else _sequence(prompt, completion))
        return fitted

    def _keep_end(self, prompt: list[int], completions: list[list[int] | None],
                  events: Counter) -> list[TokenSequence | None]:
        """Cut the shared prompt's start by the longest sequence's excess; then, the prompt gone, completions' starts.

        Every sequence keeps the same prompt tokens (a pair's two sides condition on the same context); a
        completion loses its start only when no prompt is left and it alone is still too long.
        """
        present = [c for c in completions if c is not None]
        excess = len(prompt) + max(map(len, present)) - self.max_length  # > 0: fit() returns early otherwise
        cut = min(excess, len(prompt))
        if cut:
            events["prompt"] += len(present)
            events["tokens"] += cut * len(present)
            prompt = prompt[cut:]
        fitted = []
        for completion in completions:
            if completion is not None and len(prompt) + len(completion) > self.max_length:  # prompt is empty here
                events["completion_start"] += 1
                events["tokens"] += len(completion) - self.max_length
                completion = completion[-self.max_length:]
            fitted.append(None if completion is None else _sequence(prompt, completion))
        return fitted
