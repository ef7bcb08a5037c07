"""The registry of file formats, their detection from a source's first records, and strict parsing.

Detection (:func:`detect_format`) looks at the first :data:`DETECTION_RECORDS` records that are JSON
objects: the union of their (non-null) fields is matched against the formats in :data:`FORMATS` order
(most specific first), so a first record that happens to lack a field (a preference pair without
``rejected``, a KTO row without ``label``) does not pull the whole source down to a less specific format.
If the matching format does not allow a field that another format reads, the records mix formats (or every
one of them lacks a field of the format they belong to): detection refuses to guess and names the field.
``format=`` overrides detection.

Parsing (:func:`parse_record`) is strict both ways: a record missing a field its format requires, or
holding a field that another format reads and its own does not allow (``foreign_field``), is a
:class:`~jaxalign.data.errors.DataError` naming the field, so a mis-detected or mixed source fails loudly
instead of losing fields. Fields no format reads (ids, sources, model names) are ignored. Each format's
module documents its fields.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jaxalign.data.errors import DataError, Location, Reason
from jaxalign.data.fields import Fields
from jaxalign.data.formats.base import OPENAI_PAD_TOKEN_ID, Format, ReadOptions
from jaxalign.data.formats.conversations import MEDICAL_QA, SCORED_CONVERSATION, SHAREGPT_PREFERENCE
from jaxalign.data.formats.hh_rlhf import HH_RLHF
from jaxalign.data.formats.openai import OPENAI_PREFERENCES
from jaxalign.data.formats.pku_saferlhf import PKU_SAFERLHF
from jaxalign.data.formats.trl import PREFERENCE, PROMPT_ONLY, SFT, UNPAIRED
from jaxalign.data.formats.ultrafeedback import ULTRAFEEDBACK, ULTRAFEEDBACK_BINARIZED
from jaxalign.data.records import Record

# How many records (JSON objects) format detection reads: the union of their fields decides.
DETECTION_RECORDS = 100

#: Every known format by its name (the values of ``data.format``).
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        SCORED_CONVERSATION,
        SHAREGPT_PREFERENCE,
        MEDICAL_QA,
        PKU_SAFERLHF,
        ULTRAFEEDBACK,
        ULTRAFEEDBACK_BINARIZED,
        OPENAI_PREFERENCES,
        HH_RLHF,
        PREFERENCE,
        UNPAIRED,
        SFT,
        PROMPT_ONLY,
    )
}


def get_format(name: str) -> Format:
    """The format called ``name`` (a key of :data:`FORMATS`); an unknown name raises ``ValueError`` listing them."""
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}")
    return FORMATS[name]


def _present(row: Mapping[str, Any]) -> list[str]:
    """The fields of ``row`` that hold a value (null counts as absent, as ``datasets`` fills missing columns)."""
    return [key for key, value in row.items() if value is not None]


def field_owners(key: str) -> list[str]:
    """The names of the formats that read ``key`` (empty for a field no format reads)."""
    return [f.name for f in FORMATS.values() if f.reads(key)]


def foreign_fields(fmt: Format, row: Mapping[str, Any], verdicts: dict[str, bool] | None = None) -> list[str]:
    """The fields of ``row`` that another format reads and ``fmt`` does not allow: ``fmt`` would lose them.

    A format that declares no ``fields`` is not checked. ``verdicts`` caches the answer per field name
    (for ``fmt`` only).
    """
    if not fmt.fields:
        return []
    verdicts = {} if verdicts is None else verdicts
    foreign = []
    for key, value in row.items():
        if value is None:  # null counts as absent
            continue
        verdict = verdicts.get(key)
        if verdict is None:
            verdict = verdicts[key] = not fmt.allows(key) and bool(field_owners(key))
        if verdict:
            foreign.append(key)
    return foreign


def _foreign_problem(fmt: Format, key: str) -> str:
    own = ", ".join(sorted(fmt.fields | ({f"/{fmt.field_pattern}/"} if fmt.field_pattern else set())))
    return (f"is a field of {', '.join(field_owners(key))}, not of {fmt.name} ({own}): the record mixes formats, "
            "and the field would be lost")


def record_parser(fmt: Format) -> Callable[[Fields, ReadOptions], Record]:
    """``fmt.parse``, after refusing fields of other formats (reason ``foreign_field``); one per source."""
    verdicts: dict[str, bool] = {}  # field name -> foreign to fmt, decided once per source

    def parse(fields: Fields, options: ReadOptions) -> Record:
        for key in foreign_fields(fmt, fields.data, verdicts):
            raise fields.error(key, _foreign_problem(fmt, key), Reason.FOREIGN_FIELD)
        return fmt.parse(fields, options)

    return parse


def parse_record(fmt: Format, fields: Fields, options: ReadOptions) -> Record:
    """One record in ``fmt``, refusing fields of other formats (see :func:`record_parser`)."""
    return record_parser(fmt)(fields, options)


def detect_format(rows: Mapping[str, Any] | Sequence[Mapping[str, Any]],
                  where: Location | str | Sequence[Location | str] | None = None) -> Format:
    """The format of a source, from the union of the fields of its first records (see the module docstring).

    Args:
        rows: the first records (the reader passes up to :data:`DETECTION_RECORDS`), or one record.
        where: their locations (one per row), or one location for all; errors cite them.

    Raises:
        DataError: no format matches the fields (the message lists them and the known formats), or the
            matching format does not allow a field the records carry (``foreign_field``, naming the first
            record that has it).
    """
    rows = [rows] if isinstance(rows, Mapping) else list(rows)
    if not rows:
        raise ValueError("detect_format: no records")
    wheres = list(where) if isinstance(where, Sequence) and not isinstance(where, str) else [where] * len(rows)
    merged: dict[str, Any] = {}
    for row in rows:
        for key in _present(row):
            merged.setdefault(key, row[key])
    among = f"the first {len(rows)} records" if len(rows) > 1 else "the first record"
    for candidate in FORMATS.values():
        if not candidate.detect(merged):
            continue
        foreign = foreign_fields(candidate, merged)
        if foreign:
            key = foreign[0]
            index = next(i for i, row in enumerate(rows) if row.get(key) is not None)
            raise DataError(
                f"is a field of {', '.join(field_owners(key))}, but the fields of {among} {sorted(merged)} only "
                f"make complete {candidate.name} records: the records mix formats, or every one of them lacks "
                f"a field of the format they belong to (fix them, or pass format=)",
                where=wheres[index], field=key, reason=Reason.FOREIGN_FIELD)
        return candidate
    known = "; ".join(f"{f.name} ({f.summary})" for f in FORMATS.values())
    raise DataError(f"cannot tell the format from the fields {sorted(merged)} of {among}; pass format= one of: "
                    f"{known}", where=wheres[0], reason=Reason.MISSING_FIELD)


__all__ = ["DETECTION_RECORDS", "FORMATS", "OPENAI_PAD_TOKEN_ID", "Format", "ReadOptions", "detect_format",
           "field_owners", "foreign_fields", "get_format", "parse_record", "record_parser"]
