"""Bad input: :class:`DataError` names the source, the line or record and the field; :class:`Report` counts skips.

Every stage that can meet a bad record (reading a file, tokenising records) takes ``on_error``:

- ``"raise"`` (default): the first bad record stops the run with a :class:`DataError` whose message reads
  ``"hh.jsonl, line 7, field 'chosen': empty response"``;
- ``"skip"``: bad records are left out and counted per reason in the stage's :class:`Report`, which keeps
  the first few messages and is logged (``logging.getLogger("jaxalign.data")``) when the stage ends. A
  stage that would keep nothing raises instead, so skipping never silently empties a dataset.
"""

from __future__ import annotations

import enum
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger("jaxalign.data")

OnError = Literal["raise", "skip"]
ON_ERROR = ("raise", "skip")

# How many skipped records a report quotes in full.
QUOTED_EXAMPLES = 5


class Reason(enum.StrEnum):
    """Why a record is unusable; the keys of :attr:`Report.skipped`."""

    MALFORMED = "malformed"  # not JSON, not UTF-8, not an object
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    EMPTY_RESPONSE = "empty_response"
    INVALID_VALUE = "invalid_value"
    IDENTICAL_RESPONSES = "identical_responses"  # chosen == rejected: nothing to prefer
    FOREIGN_FIELD = "foreign_field"  # a field of another format: a mixed or mis-detected source
    PROMPT_TOO_LONG = "prompt_too_long"


@dataclass(frozen=True)
class Location:
    """Where a record came from: its source (a path or a dataset name) and its 1-based record number.

    ``line`` is the 1-based line of a JSON Lines file; sources without lines (a JSON array, a
    ``datasets.Dataset``, records built in Python) are cited by record number.
    """

    source: str
    record: int
    line: int | None = None

    def __str__(self) -> str:
        return f"{self.source}, line {self.line}" if self.line is not None else f"{self.source}, record {self.record}"


class DataError(ValueError):
    """A record (or a whole source) that cannot be used.

    The message is ``"<source>, line <n>, field '<name>': <problem>"`` (parts that do not apply are left
    out); the parts are also attributes, and ``reason`` groups errors in a skip :class:`Report`.
    """

    def __init__(self, problem: str, *, where: Location | str | None = None, field: str | None = None,
                 reason: Reason = Reason.INVALID_VALUE):
        self.problem = problem
        self.where = where
        self.field = field
        self.reason = Reason(reason)
        context = ", ".join(part for part in (str(where) if where else "", f"field {field!r}" if field else "") if part)
        super().__init__(f"{context}: {problem}" if context else problem)


@dataclass
class Report:
    """What one stage did with a source's records.

    Attributes:
        stage: ``"read"``, ``"dedup"`` or ``"tokenize"``.
        source: the file or dataset the records came from.
        seen: records the stage was given.
        kept: records it passed on.
        skipped: ``{reason: count}`` of the records left out (only with ``on_error="skip"``).
        examples: the messages of the first :data:`QUOTED_EXAMPLES` skipped records.
        truncated: ``{what: count}`` of sequences shortened by the truncation policy
            (``"prompt"``: its start was cut; ``"completion"``: its end was cut) and ``"tokens"`` dropped.
        notes: ``{what: count}`` of things that are not errors but change the data (e.g.
            ``"prompt_boundary"``: the tokenised prompt was not a prefix of prompt + completion;
            ``"duplicates"``, ``"too_short"``, ``"too_long"``: records ``data.dedup`` or ``data.filter`` left out).
    """

    stage: str
    source: str
    seen: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    truncated: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)

    def handle(self, error: DataError, on_error: OnError) -> None:
        """Raise ``error``, or count it as skipped when ``on_error == "skip"``."""
        if on_error != "skip":
            raise error
        self.skipped[error.reason.value] += 1
        if len(self.examples) < QUOTED_EXAMPLES:
            self.examples.append(str(error))

    def finish(self) -> Report:
        """Close the stage: log (as a warning) what was skipped, truncated or changed; raise if every record
        was skipped."""
        if self.seen and not self.kept:
            if not self.skipped:  # removed on purpose (duplicates, the length filter), not for being bad
                raise DataError(f"every record was left out ({self})", where=self.source)
            (most_common, _), = self.skipped.most_common(1)
            raise DataError(f"every record was skipped ({self})", where=self.source, reason=Reason(most_common))
        if self.skipped or self.truncated or self.notes:  # all change the data: shown by default
            log.warning("%s", self)
        return self

    def __str__(self) -> str:
        lines = [f"{self.stage} {self.source}: kept {self.kept} of {self.seen} records"]
        if self.skipped:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in self.skipped.most_common())
            lines.append(f"skipped {sum(self.skipped.values())} ({reasons}); first ones:")
            lines.extend(f"  {example}" for example in self.examples)
        if self.truncated:
            truncated = ", ".join(f"{what}: {count}" for what, count in sorted(self.truncated.items()))
            lines.append(f"truncated: {truncated}")
        if self.notes:
            lines.append("notes: " + ", ".join(f"{what}: {count}" for what, count in sorted(self.notes.items())))
        return "\n".join(lines)


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
