"""Raw records from a source: a JSON Lines file, a JSON array file, a ``datasets.Dataset`` or a hub name.

Files may be gzip-compressed (``.gz``, as Anthropic ships HH-RLHF) and may start with a UTF-8 byte order
mark (read as ``utf-8-sig``). A ``.json`` file holds one of:

- a JSON array of records;
- a JSON object whose *only* field holds the list of records (``{"data": [...]}``, what ``datasets``
  reads with ``field="data"``); an object with other fields is an error, since they would be lost;
- JSON Lines (``datasets``' ``to_json`` writes JSON Lines under that suffix): a file whose first line is
  a complete JSON value, or that does not parse as one JSON document at all.

A pretty-printed object or array that does not parse is a file-level error citing the document's line and
column. A source that is not an existing path is loaded with ``datasets.load_dataset(source,
split=split)``, which needs a machine that can reach the hub (or the ``datasets`` cache).

Rows of a JSON Lines file are parsed one by one, so a malformed line becomes a :class:`DataError` for
that line alone (``on_error="skip"`` can then leave it out); blank lines are ignored. A ``.gz`` file that
is not gzip data, is corrupt or ends early (a truncated download) is a file-level :class:`DataError`
naming the line reading stopped at, raised even with ``on_error="skip"``: the records after it are lost,
so the file cannot pass for complete.

JSON text is parsed by :func:`jaxalign.data.strict_json.loads`: nesting deeper than Python's parser recurses,
an integer longer than ``sys.get_int_max_str_digits()`` and a key given twice in one object are ``malformed``
errors naming the column and field (on a JSON Lines line: that line's error; in a JSON document: a file-level
error citing the record, field, line and column), never a ``RecursionError``, a bare ``ValueError`` or a
silently kept last value.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxalign.data.errors import DataError, Location, Reason
from jaxalign.data.strict_json import StrictJSONError, loads

# Files at least this large show a reading progress bar (bytes, rate, ETA).
PROGRESS_MIN_BYTES = 64 << 20
FILE_SUFFIXES = (".json", ".jsonl", ".ndjson", ".gz")
# Data files this reader does not parse: named at once (and a missing one is not looked up on the hub).
OTHER_DATA_SUFFIXES = (".csv", ".tsv", ".parquet", ".arrow", ".bz2", ".xz", ".zst", ".zip")
BOM = b"\xef\xbb\xbf"
# What gzip raises on data that is not gzip (BadGzipFile), corrupt (zlib.error, a CRC mismatch) or cut short (EOFError).
GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


@dataclass(frozen=True)
class RawRecord:
    """One record of a source before it is understood: a JSON line (bytes) or an already parsed value."""

    where: Location
    payload: Any

    def load(self) -> dict[str, Any]:
        """The record as a dict; a :class:`DataError` (``malformed``) when it is not a JSON object."""
        value = self.payload
        if isinstance(value, bytes):
            try:
                value = loads(value.decode("utf-8-sig"))  # a BOM (first line, or concatenated files)
            except UnicodeDecodeError as error:
                raise DataError(f"not UTF-8 text ({error.reason} at byte {error.start})", where=self.where,
                                reason=Reason.MALFORMED) from None
            except json.JSONDecodeError as error:
                raise DataError(f"not valid JSON ({error.msg} at column {error.colno})", where=self.where,
                                reason=Reason.MALFORMED) from None
            except StrictJSONError as error:
                column = None if error.offset is None else f"column {error.offset + 1}"
                raise DataError(error.problem(column), where=self.where, field=error.field(),
                                reason=Reason.MALFORMED) from None
        if not isinstance(value, dict):
            raise DataError(f"expected a JSON object, got {_json_type(value)}", where=self.where,
                            reason=Reason.MALFORMED)
        return value


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def _gzip_error(path: Path, error: Exception, *, line: int | None = None, record: int = 0) -> DataError:
    """A file-level error for gzip data that is not gzip, corrupt or cut short.

    ``line``: how many lines of a JSON Lines file were read before it (the error cites the next one);
    None for a file read as one document.
    """
    problem = ("not gzip data" if isinstance(error, gzip.BadGzipFile) and str(error).startswith("Not a gzipped")
               else "corrupt or truncated gzip data")
    detail = f"{problem} ({type(error).__name__}: {error})"
    if line is None:
        return DataError(detail, where=str(path), reason=Reason.MALFORMED)
    read = f"; the {line} lines before it were read, the rest of the file is lost" if line else ""
    return DataError(f"{detail}{read}", where=Location(str(path), record + 1, line + 1), reason=Reason.MALFORMED)


def _leading_lines(path: Path, count: int) -> list[bytes]:
    """The first ``count`` non-blank lines of a file, stripped (a leading BOM removed)."""
    lines = []
    try:
        with _open_binary(path) as handle:
            for number, line in enumerate(handle):
                stripped = (line.removeprefix(BOM) if number == 0 else line).strip()
                if stripped:
                    lines.append(stripped)
                    if len(lines) == count:
                        break
    except GZIP_ERRORS as error:
        raise _gzip_error(path, error) from None
    return lines


def _json_value(line: bytes, *, strict: bool = True) -> Any:
    """``line`` parsed as JSON, or None when it is not a complete JSON value, or (``strict``) one that
    :func:`~jaxalign.data.strict_json.loads` refuses (nested too deeply, a huge integer, a duplicate key)."""
    try:
        text = line.decode("utf-8")
        return loads(text) if strict else json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: JSONDecodeError, StrictJSONError, ...
        return None


def _document(path: Path) -> Any:
    """The whole file as one JSON value; a file-level DataError (with line and column) when it is not one."""
    try:
        with _open_binary(path) as handle:
            text = io.TextIOWrapper(handle, encoding="utf-8-sig").read()
        return loads(text)
    except GZIP_ERRORS as error:
        raise _gzip_error(path, error) from None
    except UnicodeDecodeError as error:
        raise DataError(f"not UTF-8 text ({error.reason})", where=str(path), reason=Reason.MALFORMED) from None
    except json.JSONDecodeError as error:
        raise DataError(f"not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})",
                        where=str(path), reason=Reason.MALFORMED) from None
    except StrictJSONError as error:
        raise _document_error(path, text, error) from None


def _document_error(path: Path, text: str, error: StrictJSONError) -> DataError:
    """A file-level error for a document that does not read, citing the record (of an array, or of an object
    wrapping one) and its field when the path leads into one, and the line and column."""
    position = None
    if error.offset is not None:
        line, column = text.count("\n", 0, error.offset) + 1, error.offset - text.rfind("\n", 0, error.offset)
        position = f"line {line}, column {column}"
    route = error.path
    start = 1 if route and isinstance(route[0], int) else 2 if len(route) > 1 and isinstance(route[1], int) else 0
    where = Location(str(path), route[start - 1] + 1) if start else str(path)
    return DataError(error.problem(position), where=where, field=error.field(start) if start else None,
                     reason=Reason.MALFORMED)


def _is_wrapper(value: Any) -> bool:
    """An object that holds records rather than being one: its only field, which no format reads, lists objects."""
    from jaxalign.data.formats import field_owners  # the registry knows which fields belong to records

    if not isinstance(value, dict) or len(value) != 1:
        return False
    (key, field), = value.items()
    return not field_owners(key) and isinstance(field, list) and all(isinstance(item, dict) for item in field)


def _records(path: Path, values: list) -> Iterator[RawRecord]:
    for index, value in enumerate(values, start=1):
        yield RawRecord(Location(str(path), index), value)


def _json_file(path: Path, progress: bool | None) -> Iterator[RawRecord]:
    """The records of a ``.json`` file: an array, an object wrapping one, or JSON Lines (module docstring)."""
    lines = _leading_lines(path, 2)
    if lines and lines[0].startswith(b"["):
        return _records(path, _document(path))
    if lines and lines[0].startswith(b"{"):
        first = _json_value(lines[0])
        if first is None and not (len(lines) > 1 and isinstance(_json_value(lines[1], strict=False), dict)):
            # Not JSON Lines with a bad first line (its second line would be a record): one multi-line document.
            document = _document(path)
            if not _is_wrapper(document):
                fields = ", ".join(map(repr, document)) or "none"
                raise DataError(f"holds one JSON object (fields: {fields}), not a list of records: expected a JSON "
                                "array of records, JSON Lines (one object per line), or an object whose only field "
                                "holds the list of records", where=str(path), reason=Reason.MALFORMED)
            return _records(path, next(iter(document.values())))
        if len(lines) == 1 and _is_wrapper(first):  # {"data": [...]} written on one line
            return _records(path, next(iter(first.values())))
    return _json_lines(path, progress)


def _json_lines(path: Path, progress: bool | None) -> Iterator[RawRecord]:
    from tqdm.auto import tqdm

    size = path.stat().st_size
    show = size >= PROGRESS_MIN_BYTES if progress is None else progress
    record = line_number = 0
    try:
        with _open_binary(path) as handle, tqdm(total=size, unit="B", unit_scale=True, desc=f"reading {path.name}",
                                                disable=not show) as bar:
            raw = handle.fileobj if isinstance(handle, gzip.GzipFile) else handle
            for line_number, line in enumerate(handle, start=1):
                if show:
                    bar.update(raw.tell() - bar.n)  # compressed bytes for .gz, so the bar matches the file size
                if not line.strip():
                    continue
                record += 1
                yield RawRecord(Location(str(path), record, line_number), line.rstrip(b"\r\n"))
    except GZIP_ERRORS as error:
        raise _gzip_error(path, error, line=line_number, record=record) from None


def _dataset_rows(dataset, name: str) -> Iterator[RawRecord]:
    for index, row in enumerate(dataset, start=1):
        yield RawRecord(Location(name, index), row)


def _load_hub_dataset(name: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as error:  # datasets raises many types (connection, missing config, missing split...)
        raise FileNotFoundError(
            f"{name!r} is not an existing file, and loading it as a Hugging Face dataset (split {split!r}) "
            f"failed: {type(error).__name__}: {error}"
        ) from error


def _looks_like_a_file(source: str) -> bool:
    """A missing path that cannot be a hub name: answered at once, not after the hub's network retries."""
    return (Path(source).is_absolute() or source.lower().endswith(FILE_SUFFIXES + OTHER_DATA_SUFFIXES)
            or source.startswith("."))


def source_name(source) -> str:
    """How error messages and reports cite ``source``."""
    if isinstance(source, (str, Path)):
        return str(source)
    info = getattr(source, "info", None)
    return getattr(info, "dataset_name", None) or type(source).__name__


def iter_raw_records(source, *, split: str = "train", progress: bool | None = None) -> Iterator[RawRecord]:
    """The records of ``source`` in order, each with its location.

    Args:
        source: a path (``.jsonl``, ``.json``, optionally ``.gz``), a ``datasets.Dataset`` (or any iterable
            of dicts), or a hub dataset name.
        split: the split to load for a hub name.
        progress: show a progress bar while reading a file (None: only for files of 64 MiB or more).

    Raises:
        FileNotFoundError: ``source`` is neither a file nor a loadable dataset.
        DataError: a JSON document (array or object) that does not parse as a whole (strictly: see the
            module docstring), an object that does not wrap a list of records, or a ``.gz`` file that is not
            gzip data, corrupt or truncated (raised while reading, at the line reached).
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_file():
            if path.suffix.lower() in OTHER_DATA_SUFFIXES:
                raise DataError(f"a {path.suffix} file: jaxalign reads JSON Lines or JSON, optionally .gz; convert it "
                                f"(e.g. datasets.load_dataset(..., data_files=...)['train'].to_json('x.jsonl')) "
                                "or pass the datasets.Dataset to read_records",
                                where=str(path), reason=Reason.MALFORMED)
            if path.name.lower().removesuffix(".gz").endswith(".json"):
                return _json_file(path, progress)
            return _json_lines(path, progress)
        if path.exists():
            raise FileNotFoundError(f"{path} is not a file")
        if _looks_like_a_file(str(source)):
            raise FileNotFoundError(f"{path}: no such file")
        return _dataset_rows(_load_hub_dataset(str(source), split), f"{source}[{split}]")
    return _dataset_rows(source, source_name(source))
