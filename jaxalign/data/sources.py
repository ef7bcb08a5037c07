"""Raw records from a source: a JSON Lines file, a JSON array file, a ``datasets.Dataset`` or a hub name.

Files may be gzip-compressed (``.gz``, as Anthropic ships HH-RLHF). A ``.json`` file holding a JSON
array is read as one list; any other ``.json`` file is read as JSON Lines (``datasets``' ``to_json``
writes JSON Lines under that suffix). A source that is not an existing path is loaded with
``datasets.load_dataset(source, split=split)``, which needs a machine that can reach the hub (or the
``datasets`` cache).

Rows of a JSON Lines file are parsed one by one, so a malformed line becomes a :class:`DataError` for
that line alone (``on_error="skip"`` can then leave it out); blank lines are ignored.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxalign.data.errors import DataError, Location, Reason

# Files at least this large show a reading progress bar (bytes, rate, ETA).
PROGRESS_MIN_BYTES = 64 << 20
FILE_SUFFIXES = (".json", ".jsonl", ".ndjson", ".gz")


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
                value = json.loads(value.decode("utf-8"))
            except UnicodeDecodeError as error:
                raise DataError(f"not UTF-8 text ({error.reason} at byte {error.start})", where=self.where,
                                reason=Reason.MALFORMED) from None
            except json.JSONDecodeError as error:
                raise DataError(f"not valid JSON ({error.msg} at column {error.colno})", where=self.where,
                                reason=Reason.MALFORMED) from None
        if not isinstance(value, dict):
            raise DataError(f"expected a JSON object, got {_json_type(value)}", where=self.where,
                            reason=Reason.MALFORMED)
        return value


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _is_json_array(path: Path) -> bool:
    """Whether a ``.json`` file starts with ``[`` (after whitespace)."""
    with _open_binary(path) as handle:
        while chunk := handle.read(256):
            stripped = chunk.lstrip()
            if stripped:
                return stripped.startswith(b"[")
    return False


def _json_lines(path: Path, progress: bool | None) -> Iterator[RawRecord]:
    from tqdm.auto import tqdm

    size = path.stat().st_size
    show = size >= PROGRESS_MIN_BYTES if progress is None else progress
    record = 0
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


def _json_array(path: Path) -> Iterator[RawRecord]:
    with _open_binary(path) as handle:
        text = io.TextIOWrapper(handle, encoding="utf-8")
        try:
            values = json.load(text)
        except UnicodeDecodeError as error:
            raise DataError(f"not UTF-8 text ({error.reason})", where=str(path), reason=Reason.MALFORMED) from None
        except json.JSONDecodeError as error:
            raise DataError(f"not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})",
                            where=str(path), reason=Reason.MALFORMED) from None
    for index, value in enumerate(values, start=1):
        yield RawRecord(Location(str(path), index), value)


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
    return Path(source).is_absolute() or source.endswith(FILE_SUFFIXES) or source.startswith(".")


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
        DataError: a JSON array file that does not parse as a whole.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_file():
            if path.name.removesuffix(".gz").endswith(".json") and _is_json_array(path):
                return _json_array(path)
            return _json_lines(path, progress)
        if path.exists():
            raise FileNotFoundError(f"{path} is not a file")
        if _looks_like_a_file(str(source)):
            raise FileNotFoundError(f"{path}: no such file")
        return _dataset_rows(_load_hub_dataset(str(source), split), f"{source}[{split}]")
    return _dataset_rows(source, source_name(source))
