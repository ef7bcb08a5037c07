"""The human-in-the-loop app's feedback store: one JSON line per action, appended durably, exported for training.

An expert asks a question, reads the model's answer and accepts it, edits it, rejects it, picks the better
of two answers (A/B), or gives a thumbs up or down. Each action is one :class:`FeedbackRecord`, appended by
:meth:`FeedbackStore.append` to a JSON Lines file: one ``os.write`` of the whole line on an ``O_APPEND``
descriptor, then ``os.fsync``, under a lock, before ``append`` returns. The app confirms to the page only
after that, so a confirmed action survives a kill (or a power cut) at any instant.

Record JSON (one line each; optional fields are left out when unset)::

    {"schema": 1, "id": "3f0c...", "time": "2025-01-02T03:04:05.678+00:00", "action": "pick",
     "model_version": "v3", "system": "You are ...", "prompt": "Why is the sky blue?",
     "response": "<the chosen answer>", "edit": "<edited text, action 'edit' only>",
     "choice": {"responses": ["<A>", "<B>"], "chosen": 1, "model_versions": ["v2", "v3"]},
     "note": "<free text>"}

Opening a store reads every line:

- **A torn tail** (the last line has no newline, or is not valid JSON: an append cut short by a crash, or
  a file system that lost the end of a block) was never confirmed to anyone. Its bytes are copied, unchanged,
  to a sidecar ``<file>.torn-<UTC time>`` (fsynced), then cut off the main file, and a warning naming the
  byte offset, the line and the sidecar is logged (``logging.getLogger("jaxalign.serve.feedback")``) and
  kept in :attr:`FeedbackStore.recovered` for the app to show. Nothing is dropped: the bytes are in the sidecar.
- **A corrupt line before the end** cannot come from a crash mid-append (each append is one write at the
  end), so it means something else is wrong: a hand edit, a disk fault, another writer. The store refuses to
  open with a :class:`FeedbackError` naming the file, the line and the problem, and changes nothing. Setting
  the line aside would hide that fault and quietly drop a record a person confirmed; a person must look.
  Valid JSON that is not a valid record (anywhere in the file) is refused the same way.

Exports (:func:`export_sft`, :func:`export_preferences`, :func:`export_unpaired`, or the store's methods of the
same names) write JSON Lines in TRL's formats that ``jaxalign.data`` reads and ``jaxalign train`` detects:

=====================  ================================  ============================================
export                 from                              row (format detected by ``jaxalign.data``)
=====================  ================================  ============================================
``export_sft``         accept: prompt -> response;       ``prompt``, ``completion`` (``sft``)
                       edit: prompt -> edit
``export_preferences`` pick: chosen vs the other answer;  ``prompt``, ``chosen``, ``rejected``
                       edit: edit vs the original         (``preference``)
``export_unpaired``    thumbs_up, accept: desirable;      ``prompt``, ``completion``, ``label``
                       thumbs_down, reject: undesirable;  (``unpaired``, KTO)
                       edit: the edit desirable AND the
                       original undesirable
=====================  ================================  ============================================

With ``chat=True`` (the default; the app talks to an instruct model through its chat template) the prompt is
a message list (the system message first, when there was one, then the user's question) and each response
is one assistant message, so training renders them exactly as serving did. ``chat=False`` writes plain
strings and refuses records with a system prompt (it would be lost). Every row also carries ``feedback_id``,
``action`` and ``model_version``, fields no format reads, to trace it back. A pick is left out of the unpaired
export: it says which answer is better, not that the other is bad. Each action is one example; nothing is
de-duplicated.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import InitVar, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from jaxalign.data.errors import DataError, Location, Reason
from jaxalign.data.strict_json import StrictJSONError, loads

log = logging.getLogger("jaxalign.serve.feedback")

SCHEMA = 1
ACTIONS = ("accept", "edit", "reject", "pick", "thumbs_up", "thumbs_down")
# The longest text (prompt, system, response, edit, note, each A/B answer) a new record may hold, in characters.
DEFAULT_MAX_CHARS = 20_000
# The longest id or model version (a name, not text).
MAX_NAME_CHARS = 256
_FIELDS = ("schema", "id", "time", "action", "model_version", "system", "prompt", "response", "edit", "choice",
           "note")
_CHOICE_FIELDS = ("responses", "chosen", "model_versions")
# What a client sends for a new record (FeedbackRecord.from_request); the id and the time are the server's.
REQUEST_FIELDS = ("prompt", "action", "model_version", "response", "system", "edit", "choice", "note")


class FeedbackError(DataError):
    """Bad feedback: a record that fails validation (``field`` names the field), a corrupt feedback file
    (``where`` names the file and line), or a store that cannot be used. A ``ValueError``."""


def _fail(field_name: str | None, problem: str, where: Location | str | None = None) -> FeedbackError:
    return FeedbackError(problem, where=where, field=field_name, reason=Reason.INVALID_VALUE)


def utc_now() -> str:
    """The current time as UTC ISO-8601 with milliseconds (``2025-01-02T03:04:05.678+00:00``)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_id() -> str:
    return uuid.uuid4().hex


def _type_name(value: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _text(name: str, value: Any, *, blank_ok: bool = False) -> str:
    """``value`` if it is a string holding valid Unicode (and not blank, unless ``blank_ok``)."""
    if value is None:
        raise _fail(name, "missing")
    if not isinstance(value, str):
        raise _fail(name, f"expected a string, got {_type_name(value)}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise _fail(name, f"holds invalid Unicode: a lone surrogate at character {error.start}") from None
    if not blank_ok and not value.strip():
        raise _fail(name, "is empty")
    return value


def _pair(name: str, value: Any) -> tuple[Any, Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise _fail(name, f"expected a list of two, got {_type_name(value)}")
    if len(value) != 2:
        raise _fail(name, f"expected exactly two (answers A and B), got {len(value)}")
    return tuple(value)


@dataclass(frozen=True)
class Choice:
    """An A/B pick: the two answers shown, which one the expert chose (0 or 1), and optionally the model
    version that wrote each answer."""

    responses: tuple[str, str]
    chosen: int
    model_versions: tuple[str, str] | None = None

    def __post_init__(self):
        responses = _pair("choice.responses", self.responses)
        for index, response in enumerate(responses):
            _text(f"choice.responses[{index}]", response)
        if responses[0].strip() == responses[1].strip():
            raise _fail("choice.responses", "the two answers are the same (up to surrounding whitespace): a pick "
                        "between them says nothing")
        object.__setattr__(self, "responses", responses)
        if not isinstance(self.chosen, int) or isinstance(self.chosen, bool) or self.chosen not in (0, 1):
            raise _fail("choice.chosen", f"must be 0 (answer A) or 1 (answer B), got {self.chosen!r}")
        if self.model_versions is not None:
            versions = _pair("choice.model_versions", self.model_versions)
            for index, version in enumerate(versions):
                _text(f"choice.model_versions[{index}]", version)
            object.__setattr__(self, "model_versions", versions)

    @property
    def chosen_response(self) -> str:
        return self.responses[self.chosen]

    @property
    def rejected_response(self) -> str:
        return self.responses[1 - self.chosen]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"responses": list(self.responses), "chosen": self.chosen}
        if self.model_versions is not None:
            out["model_versions"] = list(self.model_versions)
        return out

    @classmethod
    def from_json(cls, data: Any) -> Choice:
        if not isinstance(data, Mapping):
            raise _fail("choice", f"expected an object, got {_type_name(data)}")
        _known_fields(data, _CHOICE_FIELDS, "choice.")
        for key in ("responses", "chosen"):
            if data.get(key) is None:
                raise _fail(f"choice.{key}", "missing")
        return cls(responses=data["responses"], chosen=data["chosen"], model_versions=data.get("model_versions"))


def _known_fields(data: Mapping, known: Sequence[str], prefix: str = "") -> None:
    unknown = [key for key in data if key not in known]
    if unknown:
        raise _fail(f"{prefix}{unknown[0]}", f"is not a field of a feedback record (known: {', '.join(known)}); "
                    "it would be lost")


@dataclass(frozen=True, kw_only=True)
class FeedbackRecord:
    """One action of an expert on one answer of the model. Validates itself; frozen.

    Attributes:
        prompt: the user's question (a non-blank string).
        action: one of :data:`ACTIONS`: ``"accept"``, ``"edit"``, ``"reject"``, ``"pick"``, ``"thumbs_up"``,
            ``"thumbs_down"``.
        model_version: the version of the model that answered (``"v0"``).
        response: the model's answer the action is about. For ``"pick"`` it is the chosen answer and may be
            left out (it is filled in from ``choice``); after construction it is always a string.
        system: the system prompt the model saw, if any (kept as given, empty or not: a chat template
            renders "no system message" and "an empty one" differently).
        edit: the expert's corrected answer; required for ``"edit"`` (and different from ``response``),
            forbidden otherwise.
        choice: the A/B pick (:class:`Choice`, or its JSON object); required for ``"pick"``, forbidden otherwise.
        note: the expert's free-text comment, if any.
        id: a unique id (default: a new uuid4 hex).
        time: when the action happened, UTC ISO-8601 (default: now).
        max_chars: (init only, not stored) the longest text allowed in the prompt, system prompt, response,
            edit, note and each A/B answer: :data:`DEFAULT_MAX_CHARS` by default; None: no limit. Text over
            the limit is refused, and the message gives the limit.

    Raises:
        FeedbackError: a field is missing, of the wrong type, empty, too long, or not allowed with the
            action; the error's ``field`` (and message) names it.
    """

    prompt: str
    action: str
    model_version: str
    response: str | None = None
    system: str | None = None
    edit: str | None = None
    choice: Choice | None = None
    note: str | None = None
    id: str = field(default_factory=new_id)
    time: str = field(default_factory=utc_now)
    max_chars: InitVar[int | None] = DEFAULT_MAX_CHARS

    def __post_init__(self, max_chars: int | None):
        if not isinstance(self.action, str) or self.action not in ACTIONS:
            raise _fail("action", f"unknown action {self.action!r}; one of: {', '.join(ACTIONS)}")
        _text("id", self.id)
        _check_time(self.time)
        _text("prompt", self.prompt)
        _text("model_version", self.model_version)
        if self.system is not None:
            _text("system", self.system, blank_ok=True)
        if self.note is not None:
            _text("note", self.note, blank_ok=True)
        self._check_choice()
        self._check_edit()
        self._check_names()
        self.check_lengths(max_chars)

    def _check_choice(self) -> None:
        if self.action != "pick":
            if self.choice is not None:
                raise _fail("choice", f"only a 'pick' carries a choice, this action is {self.action!r}")
            _text("response", self.response)
            return
        if self.choice is None:
            raise _fail("choice", "missing: a 'pick' needs the two answers shown and the one chosen")
        choice = self.choice if isinstance(self.choice, Choice) else Choice.from_json(self.choice)
        object.__setattr__(self, "choice", choice)
        if self.response is None:
            object.__setattr__(self, "response", choice.chosen_response)
        elif _text("response", self.response) != choice.chosen_response:
            raise _fail("response", f"is not the chosen answer (choice.responses[{choice.chosen}]): for a "
                        "'pick' it is the chosen answer, or leave it out")

    def _check_edit(self) -> None:
        if self.action != "edit":
            if self.edit is not None:
                raise _fail("edit", f"only an 'edit' carries an edited text, this action is {self.action!r}")
            return
        if self.edit is None:
            raise _fail("edit", "missing: an 'edit' needs the edited text")
        if _text("edit", self.edit).strip() == self.response.strip():
            raise _fail("edit", "is the same as 'response' (up to surrounding whitespace): nothing was edited; "
                        "record an 'accept' instead")

    def texts(self) -> dict[str, str]:
        """Every text field that is set, by its name (``choice.responses[i]`` for the A/B answers): the texts
        that ``max_chars`` limits (ids and model versions are names, limited to :data:`MAX_NAME_CHARS`)."""
        named = {"prompt": self.prompt, "system": self.system, "response": self.response, "edit": self.edit,
                 "note": self.note}
        if self.choice is not None:
            named.update({f"choice.responses[{i}]": text for i, text in enumerate(self.choice.responses)})
        return {name: text for name, text in named.items() if text is not None}

    def _check_names(self) -> None:
        names = {"id": self.id, "model_version": self.model_version}
        if self.choice is not None:
            for i, version in enumerate(self.choice.model_versions or ()):
                names[f"choice.model_versions[{i}]"] = version
        for name, value in names.items():
            if len(value) > MAX_NAME_CHARS:
                raise _fail(name, f"is {len(value):,} characters long, over the limit of {MAX_NAME_CHARS} for a name")

    def check_lengths(self, max_chars: int | None) -> None:
        """Refuse any text field (:meth:`texts`) longer than ``max_chars`` characters (None: no limit)."""
        if max_chars is None:
            return
        if not isinstance(max_chars, int) or isinstance(max_chars, bool) or max_chars < 1:
            raise ValueError(f"max_chars must be a positive integer or None, got {max_chars!r}")
        for name, text in self.texts().items():
            if len(text) > max_chars:
                raise _fail(name, f"is {len(text):,} characters long, over the limit of {max_chars:,} characters "
                            "(max_chars)")

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON object (unset optional fields left out)."""
        out: dict[str, Any] = {"schema": SCHEMA, "id": self.id, "time": self.time, "action": self.action,
                               "model_version": self.model_version}
        if self.system is not None:
            out["system"] = self.system
        out["prompt"] = self.prompt
        out["response"] = self.response
        for key in ("edit", "choice", "note"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value.to_json() if isinstance(value, Choice) else value
        return out

    def to_line(self) -> bytes:
        """The record as one JSON line (UTF-8, ending in a newline; newlines inside texts are escaped)."""
        text = json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":"))
        return (text + "\n").encode("utf-8")

    @classmethod
    def from_request(cls, data: Any, *, max_chars: int | None = DEFAULT_MAX_CHARS) -> FeedbackRecord:
        """A new record from what a client sent (:data:`REQUEST_FIELDS`; the id and time are new).

        Raises:
            FeedbackError: not an object, an unknown field (``id``, ``time`` and ``schema`` included: they are
                the server's), a required field missing, or any check of the constructor; ``field`` names it.
        """
        if not isinstance(data, Mapping):
            raise _fail(None, f"expected a JSON object, got {_type_name(data)}")
        unknown = [key for key in data if key not in REQUEST_FIELDS]
        if unknown:
            raise _fail(str(unknown[0]), f"is not a field a client sends (the fields are {', '.join(REQUEST_FIELDS)})")
        for key in ("prompt", "action", "model_version"):
            if data.get(key) is None:
                raise _fail(key, "missing")
        return cls(**{key: data.get(key) for key in REQUEST_FIELDS}, max_chars=max_chars)

    @classmethod
    def from_json(cls, data: Any, *, where: Location | str | None = None,
                  max_chars: int | None = DEFAULT_MAX_CHARS) -> FeedbackRecord:
        """A record from its JSON object; errors name ``where`` (the file and line) and the field.

        Unknown fields are refused (they would be lost), as is a schema other than :data:`SCHEMA`.
        """
        try:
            if not isinstance(data, Mapping):
                raise _fail(None, f"expected a JSON object, got {_type_name(data)}")
            _known_fields(data, _FIELDS)
            if data.get("schema") != SCHEMA:
                raise _fail("schema", f"expected {SCHEMA}, got {data.get('schema')!r}")
            for key in ("id", "time", "action", "model_version", "prompt"):
                if data.get(key) is None:
                    raise _fail(key, "missing")
            values = {key: data.get(key) for key in _FIELDS if key != "schema"}
            return cls(**values, max_chars=max_chars)
        except FeedbackError as error:
            raise FeedbackError(error.problem, where=where, field=error.field, reason=error.reason) from None


def _check_time(value: Any) -> None:
    _text("time", value)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _fail("time", f"is not an ISO-8601 time: {value!r}") from None
    if moment.utcoffset() is None or moment.utcoffset().total_seconds() != 0:
        raise _fail("time", f"must be UTC (ending in +00:00 or Z), got {value!r}")


# ------------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class _Tail:
    offset: int  # byte offset of the torn line's start
    line: int  # its 1-based line number
    problem: str


def _parse(data: bytes, source: str, max_chars: int | None) -> tuple[list[FeedbackRecord], _Tail | None]:
    """The records of a feedback file's bytes, and its torn tail if it has one (see the module docstring)."""
    records: list[FeedbackRecord] = []
    ids: dict[str, int] = {}
    offset, line_number = 0, 0
    while offset < len(data):
        line_number += 1
        end = data.find(b"\n", offset)
        if end == -1:
            return records, _Tail(offset, line_number, _unterminated(data[offset:]))
        line, following = data[offset:end], end + 1
        if line.strip():
            where = Location(source, len(records) + 1, line_number)
            try:
                obj = _load_line(line)
            except ValueError as error:
                if not data[following:].strip():  # the last line: a torn tail
                    return records, _Tail(offset, line_number, f"the last line is {error}")
                raise FeedbackError(
                    f"{error}. It is not the last line, so it is not an append cut short by a "
                    "crash: the file was damaged or edited. Nothing was changed; repair or remove the line by hand",
                    where=where, reason=Reason.MALFORMED) from None
            record = FeedbackRecord.from_json(obj, where=where, max_chars=max_chars)
            if record.id in ids:
                raise _fail("id", f"{record.id!r} was already used by line {ids[record.id]}: a record was written "
                            "twice or the file was edited. Nothing was changed", where)
            ids[record.id] = line_number
            records.append(record)
        offset = following
    return records, None


def _load_line(line: bytes) -> Any:
    try:
        return loads(line.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"not UTF-8 ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg} at column {error.colno})") from None
    except StrictJSONError as error:
        raise ValueError(f"not usable JSON ({error})") from None


def _unterminated(tail: bytes) -> str:
    """Why an unterminated last line is torn, saying whether it would have parsed."""
    try:
        obj = _load_line(tail)
        record_id = obj.get("id") if isinstance(obj, dict) else None
    except ValueError:
        return "the last line has no newline and is not valid JSON: an append cut short"
    return (f"the last line has no newline: its append (record {record_id!r}) never finished, so it was never "
            "confirmed")


def read_feedback(path: str | os.PathLike, *,
                  max_chars: int | None = None) -> tuple[list[FeedbackRecord], list[str]]:
    """Read a feedback file without changing it (e.g. to export while the app runs).

    Returns:
        ``(records, notes)``: a torn or unfinished last line (possibly an append in flight) is left out and
        described in ``notes``; it stays in the file.

    Raises:
        FeedbackError: a corrupt line before the end, or an invalid record (see the module docstring).
        FileNotFoundError: no such file.
    """
    path = Path(path)
    data = path.read_bytes()
    records, tail = _parse(data, str(path), max_chars)
    notes = []
    if tail is not None:
        notes.append(f"{path}: left out line {tail.line} (byte offset {tail.offset}, {len(data) - tail.offset} "
                     f"bytes): {tail.problem}")
    return records, notes


# ------------------------------------------------------------------------------------------------ the store


def _fsync_directory(directory: Path) -> None:
    """Make a file's creation, rename or removal in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    # One write in practice; a short write (a signal, a full disk on the next call) continues at the end.
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` by a file holding ``data``: temp file, fsync, rename, fsync of the directory."""
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    os.close(fd)
    os.replace(temporary, path)
    _fsync_directory(path.parent)


class FeedbackStore:
    """A feedback JSON Lines file, opened for appending by one store at a time.

    Args:
        path: the feedback file (created, with its directory, when missing).
        max_chars: the longest text :meth:`append` accepts in any field (None: no limit). Records already in
            the file are read whatever their length: the limit guards new input, not history.

    Attributes:
        path, max_chars: as given.
        recovered: messages about what opening set aside (a torn tail), for the app to show; also logged.

    Raises:
        FeedbackError: a corrupt line before the end of the file, an invalid record, or a file already open
            in another store (this process or another): one store writes a file, so recovery never cuts a line
            another writer is appending.

    Appends are serialised by a lock: threads may share a store. Close it (or use ``with``) to release the file.
    """

    def __init__(self, path: str | os.PathLike, *, max_chars: int | None = DEFAULT_MAX_CHARS):
        if max_chars is not None and (not isinstance(max_chars, int) or isinstance(max_chars, bool) or max_chars < 1):
            raise ValueError(f"max_chars must be a positive integer or None, got {max_chars!r}")
        self.path = Path(path)
        self.max_chars = max_chars
        self.recovered: list[str] = []
        self._lock = threading.Lock()
        self._failed: str | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            self._open()
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise

    def _open(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FeedbackError("is already open in another FeedbackStore (in this process or another): one store "
                                "appends to a file; close the other one first", where=str(self.path)) from None
        _fsync_directory(self.path.parent)  # the file's creation
        data = self._read_all()
        self._records, tail = _parse(data, str(self.path), None)
        self._ids = {record.id for record in self._records}
        self._size = len(data)
        if tail is not None:
            self._set_aside(data, tail)

    def _read_all(self) -> bytes:
        os.lseek(self._fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(self._fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)

    def _set_aside(self, data: bytes, tail: _Tail) -> None:
        """Copy the torn tail to a sidecar (durably), then cut it off the file; log and keep a message."""
        torn = data[tail.offset:]
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        for attempt in range(100):
            sidecar = self.path.with_name(f"{self.path.name}.torn-{stamp}" + (f"-{attempt}" if attempt else ""))
            try:
                fd = os.open(sidecar, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                break
            except FileExistsError:
                continue
        else:
            raise FeedbackError(f"could not create a sidecar for its torn tail ({sidecar} exists)",
                                where=str(self.path))
        try:
            _write_all(fd, torn)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_directory(self.path.parent)
        # Only once the bytes are safe in the sidecar: a crash before this line leaves the tail in place, and
        # the next opening sets it aside again (a second copy, nothing lost).
        os.ftruncate(self._fd, tail.offset)
        os.fsync(self._fd)
        self._size = tail.offset
        message = (f"{self.path}: set aside a torn last line (line {tail.line}, {len(torn)} bytes from byte offset "
                   f"{tail.offset}) in {sidecar}: {tail.problem}. The {len(self._records)} records before it are "
                   "intact.")
        log.warning("%s", message)
        self.recovered.append(message)

    # ------------------------------------------------------------------------------------------- appending

    def append(self, record: FeedbackRecord) -> None:
        """Append ``record`` durably: one write of its JSON line, then fsync, before returning.

        Raises:
            FeedbackError: a text over the store's ``max_chars``, an id already in the store, or a closed store
                (or one whose earlier write failed and could not be undone).
            OSError: the write or fsync failed (a full disk); the record was NOT saved: the file is cut back
                to its last confirmed record.
        """
        if not isinstance(record, FeedbackRecord):
            raise TypeError(f"append takes a FeedbackRecord, got {type(record).__name__}")
        record.check_lengths(self.max_chars)
        line = record.to_line()
        with self._lock:
            if self._fd is None:
                raise FeedbackError("is closed", where=str(self.path))
            if self._failed is not None:
                raise FeedbackError(f"refuses appends after a failed write that could not be undone "
                                    f"({self._failed}); reopen the store to recover", where=str(self.path))
            if record.id in self._ids:
                raise _fail("id", f"{record.id!r} is already in the store: each action is appended once",
                            str(self.path))
            try:
                _write_all(self._fd, line)
                os.fsync(self._fd)
            except OSError as error:
                self._undo(error)
                raise
            self._size += len(line)
            self._records.append(record)
            self._ids.add(record.id)

    def _undo(self, error: OSError) -> None:
        """After a failed append, cut the file back to its last confirmed record (else refuse more appends,
        so the partial line stays the tail that the next opening sets aside)."""
        try:
            os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)
        except OSError as undo_error:
            self._failed = f"{error}; then {undo_error}"
            log.error("%s: a failed append could not be undone (%s); appends are refused until reopened",
                      self.path, self._failed)

    # ------------------------------------------------------------------------------------------- reading

    def records(self) -> list[FeedbackRecord]:
        """Every record, oldest first (a copy)."""
        with self._lock:
            return list(self._records)

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    # ------------------------------------------------------------------------------------------- exports

    def export_sft(self, path: str | os.PathLike, *, chat: bool = True) -> int:
        """:func:`export_sft` of every record."""
        return export_sft(self.records(), path, chat=chat)

    def export_preferences(self, path: str | os.PathLike, *, chat: bool = True) -> int:
        """:func:`export_preferences` of every record."""
        return export_preferences(self.records(), path, chat=chat)

    def export_unpaired(self, path: str | os.PathLike, *, chat: bool = True) -> int:
        """:func:`export_unpaired` of every record."""
        return export_unpaired(self.records(), path, chat=chat)

    # ------------------------------------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Release the file (appends then fail; records stay readable)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)  # releases the flock
                self._fd = None

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __repr__(self) -> str:
        return f"FeedbackStore({str(self.path)!r}, records={len(self._records)})"


# ------------------------------------------------------------------------------------------------ exports


def _prompt(record: FeedbackRecord, chat: bool) -> str | list[dict[str, str]]:
    if chat:
        system = [] if record.system is None else [{"role": "system", "content": record.system}]
        return [*system, {"role": "user", "content": record.prompt}]
    if record.system is not None:
        raise _fail("system", "a plain-text export (chat=False) has no place for the system prompt, which would "
                    "be lost: export with chat=True", f"feedback record {record.id}")
    return record.prompt


def _answer(text: str, chat: bool) -> str | list[dict[str, str]]:
    return [{"role": "assistant", "content": text}] if chat else text


def _trace(record: FeedbackRecord) -> dict[str, str]:
    return {"feedback_id": record.id, "action": record.action, "model_version": record.model_version}


def sft_rows(records: Iterable[FeedbackRecord], *, chat: bool = True) -> list[dict[str, Any]]:
    """SFT rows (``prompt``, ``completion``): accepted answers, and edited answers (the edit)."""
    rows = []
    for record in records:
        if record.action in ("accept", "edit"):
            text = record.edit if record.action == "edit" else record.response
            rows.append({"prompt": _prompt(record, chat), "completion": _answer(text, chat), **_trace(record)})
    return rows


def preference_rows(records: Iterable[FeedbackRecord], *, chat: bool = True) -> list[dict[str, Any]]:
    """Preference rows (``prompt``, ``chosen``, ``rejected``): A/B picks, and edits over the original answer."""
    rows = []
    for record in records:
        if record.action == "pick":
            chosen, rejected = record.choice.chosen_response, record.choice.rejected_response
        elif record.action == "edit":
            chosen, rejected = record.edit, record.response
        else:
            continue
        row = {"prompt": _prompt(record, chat), "chosen": _answer(chosen, chat), "rejected": _answer(rejected, chat),
               **_trace(record)}
        if record.action == "pick" and record.choice.model_versions is not None:
            versions = record.choice.model_versions
            row["chosen_model_version"] = versions[record.choice.chosen]
            row["rejected_model_version"] = versions[1 - record.choice.chosen]
        rows.append(row)
    return rows


# action -> (the text labelled, label) rows of the unpaired (KTO) export; picks are relative: left out.
_UNPAIRED = {
    "thumbs_up": (("response", True),),
    "accept": (("response", True),),
    "thumbs_down": (("response", False),),
    "reject": (("response", False),),
    "edit": (("edit", True), ("response", False)),
}


def unpaired_rows(records: Iterable[FeedbackRecord], *, chat: bool = True) -> list[dict[str, Any]]:
    """Unpaired (KTO) rows (``prompt``, ``completion``, ``label``): see the module docstring's table."""
    rows = []
    for record in records:
        for attribute, label in _UNPAIRED.get(record.action, ()):
            rows.append({"prompt": _prompt(record, chat), "completion": _answer(getattr(record, attribute), chat),
                         "label": label, **_trace(record)})
    return rows


def write_jsonl(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> int:
    """Write ``rows`` as JSON Lines, atomically (an existing file is replaced whole); returns their count.
    No rows give an empty file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    _write_atomically(path, text.encode("utf-8"))
    return len(rows)


def export_sft(records: Iterable[FeedbackRecord], path: str | os.PathLike, *, chat: bool = True) -> int:
    """Write the SFT rows of ``records`` (:func:`sft_rows`) to ``path``; returns how many."""
    return write_jsonl(path, sft_rows(records, chat=chat))


def export_preferences(records: Iterable[FeedbackRecord], path: str | os.PathLike, *, chat: bool = True) -> int:
    """Write the preference rows of ``records`` (:func:`preference_rows`) to ``path``; returns how many."""
    return write_jsonl(path, preference_rows(records, chat=chat))


def export_unpaired(records: Iterable[FeedbackRecord], path: str | os.PathLike, *, chat: bool = True) -> int:
    """Write the unpaired (KTO) rows of ``records`` (:func:`unpaired_rows`) to ``path``; returns how many."""
    return write_jsonl(path, unpaired_rows(records, chat=chat))


__all__ = ["ACTIONS", "DEFAULT_MAX_CHARS", "REQUEST_FIELDS", "SCHEMA", "Choice", "FeedbackError", "FeedbackRecord",
           "FeedbackStore", "export_preferences", "export_sft", "export_unpaired", "preference_rows", "read_feedback",
           "sft_rows", "unpaired_rows", "utc_now", "write_jsonl"]
