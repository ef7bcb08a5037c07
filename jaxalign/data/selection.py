"""Which records a run keeps: de-duplication (``data.dedup``) and the length filter (``data.filter``).

- ``dedup: exact`` leaves out a record equal to an earlier one in every field its format reads (texts, scores,
  labels, margins; not where it was found). ``dedup: prompt`` leaves out a record whose prompt an earlier record
  already had, so each prompt is trained once; a record without a prompt (plain text, a whole conversation as
  the completion) is compared whole, as with ``exact``. "Earlier" is in the order sources are listed, then
  file order: the first occurrence is kept, across sources too.
- ``filter: {min_length, max_length}`` leaves out an example whose longest sequence (prompt + response, the
  longer side of a pair, a prompt-only record's prompt) has fewer than ``min_length`` or more than
  ``max_length`` tokens, counted *before* truncation, so ``max_length`` drops what ``data.max_length`` would
  otherwise cut.

Both count what they remove per source (``duplicates``, ``too_short``, ``too_long``), in the stage reports
and the dataset's composition (:class:`~jaxalign.data.mixture.MixtureSource`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jaxalign.data.errors import Report
from jaxalign.data.records import Record, ScoredConversation

#: The values of ``data.dedup``: drop records equal to an earlier one, or whose prompt an earlier one had.
DEDUP_MODES = ("exact", "prompt")


def check_dedup(mode: Any) -> None:
    if mode is not None and mode not in DEDUP_MODES:
        raise ValueError(f"dedup must be one of {', '.join(DEDUP_MODES)} or null, got {mode!r}")


@dataclass(frozen=True)
class LengthFilter:
    """Keep examples whose longest sequence has ``min_length`` to ``max_length`` tokens (either may be None)."""

    min_length: int | None = None
    max_length: int | None = None

    def __post_init__(self):
        for name in ("min_length", "max_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"filter.{name} must be a positive number of tokens or null, got {value!r}")
        if None not in (self.min_length, self.max_length) and self.min_length > self.max_length:
            raise ValueError(f"filter.min_length {self.min_length} is above filter.max_length {self.max_length}: "
                             "no example could be kept")

    @classmethod
    def parse(cls, value: Any) -> LengthFilter | None:
        """``data.filter`` as written in a config (None, a filter, or ``{min_length, max_length}``), validated."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"filter must be a mapping {{min_length, max_length}}, got {value!r}")
        unknown = sorted(set(value) - {"min_length", "max_length"})
        if unknown:
            raise ValueError(f"filter: unknown key(s) {unknown} (known: min_length, max_length)")
        return cls(**value)

    def verdict(self, length: int) -> str | None:
        """``"too_short"``, ``"too_long"`` or None (kept)."""
        if self.min_length is not None and length < self.min_length:
            return "too_short"
        if self.max_length is not None and length > self.max_length:
            return "too_long"
        return None


def _prompt_key(record: Record) -> Hashable:
    prompt = record.messages[:-1] if isinstance(record, ScoredConversation) else getattr(record, "prompt", ())
    return ("prompt", prompt) if len(prompt) else ("record", record)


def deduplicate(groups: Sequence[tuple[str, Sequence[Record]]], mode: str) -> tuple[list[list[Record]], list[Report]]:
    """Each group's records without those an earlier record (of any group) duplicates, and a report per group
    (``notes["duplicates"]``); see the module docstring for ``mode``."""
    check_dedup(mode)
    key = (lambda record: record) if mode == "exact" else _prompt_key
    seen: set = set()
    kept_groups, reports = [], []
    for name, records in groups:
        report = Report("dedup", name, seen=len(records))
        kept = []
        for record in records:
            k = key(record)
            if k in seen:
                report.notes["duplicates"] += 1
                continue
            seen.add(k)
            kept.append(record)
        report.kept = len(kept)
        kept_groups.append(kept)
        reports.append(report.finish())
    return kept_groups, reports
