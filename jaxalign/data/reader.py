"""Reading a source into canonical records: :func:`read_records`."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain, islice
from pathlib import Path
from typing import Any

from jaxalign.data.errors import DataError, Location, OnError, Report, check_on_error
from jaxalign.data.fields import Fields
from jaxalign.data.formats import DETECTION_RECORDS, Format, ReadOptions, detect_format, get_format, record_parser
from jaxalign.data.records import PromptRecord, Record
from jaxalign.data.sources import FILE_SUFFIXES, OTHER_DATA_SUFFIXES, RawRecord, iter_raw_records, source_name


def _loaded(raws) -> Iterator[tuple[RawRecord, dict | DataError]]:
    """Each raw record with its parsed object, or the DataError that parsing it gave."""
    for raw in raws:
        try:
            yield raw, raw.load()
        except DataError as error:
            yield raw, error


def read_records(
    source,
    *,
    format: str | None = None,
    split: str = "train",
    on_error: OnError = "raise",
    limit: int | None = None,
    source_tokenizer: Any = None,
    progress: bool | None = None,
) -> tuple[list[Record], Report]:
    """Read every record of ``source`` into canonical records.

    Args:
        source: a ``.jsonl`` / ``.json`` file (optionally ``.gz``), a ``datasets.Dataset``, or a hub dataset
            name (online machines only).
        format: a name from :data:`jaxalign.data.formats.FORMATS`; None detects it from the union of the
            fields of the first :data:`~jaxalign.data.formats.DETECTION_RECORDS` (100) records.
        split: the split of a hub dataset.
        on_error: ``"raise"`` stops at the first bad record with a :class:`DataError` naming the source,
            line/record and field; ``"skip"`` leaves bad records out and counts them in the report.
        limit: stop after this many records have been kept (for quick experiments).
        source_tokenizer: decodes token-id fields (OpenAI lm-human-preferences files hold GPT-2 ids).
        progress: reading progress bar; None shows it for files of 64 MiB or more.

    Returns:
        ``(records, report)``: all records have the format's type (e.g. ``PreferenceRecord`` for HH-RLHF,
        ``PreferenceGroup`` for PKU-SafeRLHF), each with its ``origin``; the report counts what was kept
        and skipped.

    Raises:
        DataError: a bad record (``on_error="raise"``), including one holding a field of another format;
            a source whose format cannot be detected, or whose first records mix formats; a corrupt or
            truncated ``.gz`` file (even with ``on_error="skip"``); an empty source, or one whose every
            record was skipped.
        FileNotFoundError: no such file or dataset.
    """
    check_on_error(on_error)
    chosen_format: Format | None = get_format(format) if format is not None else None
    options = ReadOptions(source_tokenizer=source_tokenizer)
    report = Report("read", source_name(source))
    parse = record_parser(chosen_format) if chosen_format is not None else None
    records: list[Record] = []
    loaded = _loaded(iter_raw_records(source, split=split, progress=progress))
    # Detection reads ahead: the first records are held back until the format is known.
    window = list(islice(loaded, DETECTION_RECORDS)) if chosen_format is None else []
    for raw, row in chain(window, loaded):
        if limit is not None and len(records) >= limit:
            break
        report.seen += 1
        if isinstance(row, DataError):
            report.handle(row, on_error)
            continue
        if chosen_format is None:  # an undetectable or mixed format concerns the whole source: never skipped
            # (every record of the window malformed: this later one decides alone)
            objects = [(r.where, o) for r, o in window if not isinstance(o, DataError)] or [(raw.where, row)]
            chosen_format = detect_format([o for _, o in objects], [w for w, _ in objects])
            parse = record_parser(chosen_format)
        try:
            records.append(parse(Fields(row, raw.where), options))
            report.kept += 1
        except DataError as error:
            report.handle(error, on_error)
    if not report.seen:
        raise DataError("holds no records", where=report.source)
    return records, report.finish()


def read_prompt_file(path, *, option: str = "prompts file") -> list[PromptRecord]:
    """Prompts for sampling: a prompt-only JSON Lines / JSON file (``.jsonl``, ``.ndjson``, ``.json``, any of
    them ``.gz``; the suffix in any case) with a ``prompt`` field, or else a text file with one prompt per
    non-blank line. ``option`` (a command-line option) is named in the errors."""
    path = Path(path)
    if path.name.lower().endswith(FILE_SUFFIXES + OTHER_DATA_SUFFIXES):  # read_records names the unsupported
        records, _ = read_records(path, format="prompt_only")
        return records
    if not path.is_file():
        raise FileNotFoundError(f"{option} {path}: no such file")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = [PromptRecord(line, origin=Location(str(path), number, line=number))
               for number, line in enumerate(lines, start=1) if line.strip()]
    if not records:
        raise ValueError(f"{option} {path}: no prompts (one per line)")
    return records
