"""The feedback store of the human-in-the-loop app: records, durable appends, recovery after a kill, and
exports that jaxalign.data reads."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jaxalign import data
from jaxalign.serve.feedback import (
    ACTIONS,
    DEFAULT_MAX_CHARS,
    Choice,
    FeedbackError,
    FeedbackRecord,
    FeedbackStore,
    export_preferences,
    export_sft,
    export_unpaired,
    read_feedback,
)

ROOT = Path(__file__).resolve().parents[2]


def make(action: str, index: int = 0, /, **overrides) -> FeedbackRecord:
    """A valid record of ``action`` (``overrides`` replace its fields, ``action`` included)."""
    values = dict(prompt=f"Why is the sky blue? ({index})", action=action, model_version="v0")
    if action == "pick":
        values["choice"] = Choice(responses=(f"Rayleigh scattering {index}.", f"It reflects the sea {index}."),
                                  chosen=0, model_versions=("v0", "v1"))
    else:
        values["response"] = f"It reflects the sea {index}."
    if action == "edit":
        values["edit"] = f"Rayleigh scattering {index}."
    values.update(overrides)
    return FeedbackRecord(**values)


def lines_of(path: Path) -> list[dict]:
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    return [json.loads(line) for line in raw.split(b"\n")[:-1]]


# ------------------------------------------------------------------------------------------------ records


@pytest.mark.parametrize("action", ACTIONS)
def test_every_action_round_trips_through_the_file(tmp_path, action):
    record = make(action, note="checked by Dr. Ruiz", system="You are a careful tutor.")
    path = tmp_path / "feedback.jsonl"
    with FeedbackStore(path) as store:
        store.append(record)
    (line,) = lines_of(path)
    assert line["action"] == action and line["schema"] == 1 and line["id"] == record.id
    assert FeedbackRecord.from_json(line) == record
    with FeedbackStore(path) as store:
        assert store.records() == [record] and store.recovered == []


def test_record_json_shape_of_a_pick():
    record = make("pick", note="A is right")
    assert record.response == "Rayleigh scattering 0."  # filled in from the choice
    assert record.to_json() == {
        "schema": 1, "id": record.id, "time": record.time, "action": "pick", "model_version": "v0",
        "prompt": "Why is the sky blue? (0)", "response": "Rayleigh scattering 0.",
        "choice": {"responses": ["Rayleigh scattering 0.", "It reflects the sea 0."], "chosen": 0,
                   "model_versions": ["v0", "v1"]},
        "note": "A is right"}
    assert len(record.id) == 32 and record.time.endswith("+00:00")
    line = record.to_line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1


def test_texts_with_newlines_and_unicode_stay_on_one_line():
    record = make("edit", prompt="Zeile 1\nZeile 2\u2028 — ✓", edit="ja\r\nnein")
    line = record.to_line()
    assert line.count(b"\n") == 1
    assert FeedbackRecord.from_json(json.loads(line)) == record


@pytest.mark.parametrize("overrides, field, fragment", [
    (dict(prompt="   "), "prompt", "is empty"),
    (dict(prompt=3), "prompt", "expected a string"),
    (dict(action="like"), "action", "unknown action 'like'"),
    (dict(model_version=""), "model_version", "is empty"),
    (dict(response=""), "response", "is empty"),
    (dict(response=None), "response", "missing"),
    (dict(time="2025-01-02T03:04:05"), "time", "must be UTC"),
    (dict(time="yesterday"), "time", "not an ISO-8601"),
    (dict(edit="Better."), "edit", "only an 'edit'"),
    (dict(choice=Choice(responses=("a", "b"), chosen=0)), "choice", "only a 'pick'"),
    (dict(response="x" * (DEFAULT_MAX_CHARS + 1)), "response", "over the limit of 20,000 characters"),
    (dict(note="n" * 31, max_chars=30), "note", "over the limit of 30 characters"),
    (dict(prompt="cut \ud800 pair"), "prompt", "lone surrogate"),
    (dict(model_version="v" * 257), "model_version", "over the limit of 256 for a name"),
])
def test_validation_names_the_field(overrides, field, fragment):
    with pytest.raises(FeedbackError, match=fragment) as caught:
        make("accept", **overrides)
    assert caught.value.field == field
    assert f"field {field!r}" in str(caught.value)


@pytest.mark.parametrize("action, overrides, field, fragment", [
    ("edit", dict(edit=None), "edit", "missing"),
    ("edit", dict(edit="  It reflects the sea 0.\n"), "edit", "the same as 'response'"),
    ("pick", dict(choice=None), "choice", "missing"),
    ("pick", dict(choice={"responses": ["a", "b"], "chosen": 2}), "choice.chosen", "must be 0"),
    ("pick", dict(choice={"responses": ["a", "b"], "chosen": True}), "choice.chosen", "must be 0"),
    ("pick", dict(choice={"responses": ["a"], "chosen": 0}), "choice.responses", "exactly two"),
    ("pick", dict(choice={"responses": ["same", " same "], "chosen": 0}), "choice.responses", "the same"),
    ("pick", dict(choice={"responses": ["a", ""], "chosen": 0}), "choice.responses[1]", "is empty"),
    ("pick", dict(choice={"responses": ["a", "b"], "chosen": 0, "winner": "a"}), "choice.winner", "not a field"),
    ("pick", dict(response="b"), "response", "not the chosen answer"),
    ("pick", dict(choice={"responses": ["a", "b" * 31], "chosen": 0}, max_chars=30), "choice.responses[1]",
     "over the limit of 30"),
])
def test_edit_and_pick_validation(action, overrides, field, fragment):
    with pytest.raises(FeedbackError, match=fragment) as caught:
        make(action, **overrides)
    assert caught.value.field == field


def test_from_json_errors_name_the_place_and_field():
    line = make("accept").to_json()
    where = data.Location("fb.jsonl", 4, 7)
    with pytest.raises(FeedbackError, match=r"^fb.jsonl, line 7, field 'action': unknown action"):
        FeedbackRecord.from_json({**line, "action": "meh"}, where=where)
    with pytest.raises(FeedbackError, match=r"field 'rating': is not a field"):
        FeedbackRecord.from_json({**line, "rating": 5}, where=where)
    with pytest.raises(FeedbackError, match=r"field 'schema': expected 1"):
        FeedbackRecord.from_json({**line, "schema": 2}, where=where)
    without_prompt = {key: value for key, value in line.items() if key != "prompt"}
    with pytest.raises(FeedbackError, match=r"field 'prompt': missing"):
        FeedbackRecord.from_json(without_prompt, where=where)


REQUEST = {"prompt": "q", "action": "accept", "model_version": "v0", "response": "r"}


@pytest.mark.parametrize("missing", ["prompt", "action", "model_version", "response"])
def test_a_request_without_a_required_field_names_it(missing):
    body = {key: value for key, value in REQUEST.items() if key != missing}
    with pytest.raises(FeedbackError, match=f"field '{missing}': missing") as caught:
        FeedbackRecord.from_request(body)
    assert caught.value.field == missing
    with pytest.raises(FeedbackError, match=f"field '{missing}': missing"):
        FeedbackRecord.from_request({**body, missing: None})


@pytest.mark.parametrize(("overrides", "field", "fragment"), [
    ({"prompt": ["q"]}, "prompt", "expected a string, got a list"),
    ({"action": 3}, "action", "unknown action 3"),
    ({"action": "love"}, "action", "unknown action 'love'"),
    ({"model_version": {"v": 0}}, "model_version", "expected a string, got an object"),
    ({"system": 1.5}, "system", "expected a string, got a number"),
    ({"note": True}, "note", "expected a string, got a boolean"),
    ({"id": "mine"}, "id", "is not a field a client sends"),
    ({"time": "2025-01-01T00:00:00+00:00"}, "time", "is not a field a client sends"),
    ({"action": "pick", "response": None, "choice": ["a", "b"]}, "choice", "expected an object, got a list"),
    ({"action": "pick", "response": None, "choice": {"responses": ["a", "b"], "chosen": 1.0}}, "choice.chosen",
     "must be 0"),
])
def test_a_request_of_the_wrong_type_names_the_field(overrides, field, fragment):
    with pytest.raises(FeedbackError, match=fragment) as caught:
        FeedbackRecord.from_request({**REQUEST, **overrides})
    assert caught.value.field == field


def test_a_request_gets_a_new_id_and_time():
    first, second = FeedbackRecord.from_request(REQUEST), FeedbackRecord.from_request(REQUEST)
    assert first.id != second.id and first.time.endswith("+00:00")
    assert (first.prompt, first.action, first.model_version, first.response) == ("q", "accept", "v0", "r")
    with pytest.raises(FeedbackError, match="expected a JSON object, got a list"):
        FeedbackRecord.from_request([REQUEST])


# ------------------------------------------------------------------------------------------------ appending


def test_concurrent_appends_give_whole_lines(tmp_path):
    path = tmp_path / "feedback.jsonl"
    store = FeedbackStore(path)
    made: list[list[str]] = [[] for _ in range(8)]
    errors = []

    def clicks(thread: int) -> None:
        try:
            for index in range(50):
                record = make(ACTIONS[index % len(ACTIONS)], thread * 1000 + index)
                store.append(record)
                made[thread].append(record.id)
        except Exception as error:  # reported below: a failing thread must fail the test
            errors.append(error)

    threads = [threading.Thread(target=clicks, args=(thread,)) for thread in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    lines = lines_of(path)
    assert len(lines) == 400 == len(store)
    assert {line["id"] for line in lines} == {id_ for ids in made for id_ in ids}
    store.close()
    with FeedbackStore(path) as reopened:
        assert [r.id for r in reopened.records()] == [line["id"] for line in lines]


def test_duplicate_id_closed_store_and_second_writer_are_refused(tmp_path):
    path = tmp_path / "feedback.jsonl"
    record = make("accept")
    store = FeedbackStore(path)
    store.append(record)
    with pytest.raises(FeedbackError, match="already in the store"):
        store.append(record)
    with pytest.raises(FeedbackError, match="already open in another FeedbackStore"):
        FeedbackStore(path)
    with pytest.raises(FeedbackError, match="over the limit of 5 characters"):
        FeedbackStore(tmp_path / "other.jsonl", max_chars=5).append(make("thumbs_up"))
    store.close()
    with pytest.raises(FeedbackError, match="is closed"):
        store.append(make("reject"))
    with FeedbackStore(path) as reopened:
        assert reopened.records() == [record]


def test_a_failed_write_is_rolled_back(tmp_path, monkeypatch):
    path = tmp_path / "feedback.jsonl"
    store = FeedbackStore(path)
    store.append(make("accept", 1))
    size = path.stat().st_size
    real_write = os.write

    def half_then_full(fd, data):  # a short write, then a full disk
        if fd == store._fd:
            monkeypatch.setattr(os, "write", failing_write)
            return real_write(fd, bytes(data[: len(data) // 2]))
        return real_write(fd, data)

    def failing_write(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        store.append(make("accept", 2))
    monkeypatch.setattr(os, "write", real_write)
    assert path.stat().st_size == size and len(store) == 1
    store.append(make("accept", 3))
    store.close()
    assert [line["prompt"] for line in lines_of(path)] == ["Why is the sky blue? (1)", "Why is the sky blue? (3)"]


# ------------------------------------------------------------------------------------------------ recovery


def _run_writer(path: Path, *, kill_after: int, stall: bool) -> tuple[int, list[str], bool]:
    """Start the writer, SIGKILL it after ``kill_after`` confirmed appends (or <= 1.5 s after it opened the
    store), or, with ``stall``, once it has stalled inside the next line. Returns ``(records it found on
    opening, ids it confirmed, whether it stalled)``."""
    command = [sys.executable, "-m", "tests.serve.feedback_writer", str(path), "3000"]
    child = subprocess.Popen(command + ([str(kill_after)] if stall else []), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read() -> None:
        for line in child.stdout:
            lines.append(line.strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60  # interpreter start and imports
        while not lines and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.01)
        assert lines and lines[0].startswith("open"), child.stderr.read() if child.poll() is not None else lines
        stop = time.monotonic() + (10 if stall else 1.5)
        while time.monotonic() < stop and child.poll() is None:
            if (lines[-1] == "stalled") if stall else len(lines) > kill_after:
                break
            time.sleep(0.001)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        reader.join(timeout=30)
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    stalled = lines[-1] == "stalled"
    ids = [line for line in lines[1:] if line != "stalled"]
    return int(lines[0].split()[1]), ids, stalled


@pytest.mark.parametrize("stall", [False, True], ids=["free", "mid-line"])
@pytest.mark.parametrize("round_", range(2))
def test_sigkill_during_writes_loses_no_confirmed_record(tmp_path, caplog, stall, round_):
    path = tmp_path / "feedback.jsonl"
    confirmed: list[str] = []
    for kill in range(2):  # the second writer first recovers what the first one left
        found, ids, stalled = _run_writer(path, kill_after=3 + 4 * round_ + 5 * kill, stall=stall)
        assert ids, "the writer confirmed nothing before the kill"
        assert stalled == stall
        # Every record confirmed before, and at most one appended but not yet printed when the last writer died.
        assert len(confirmed) <= found <= len(confirmed) + 1
        confirmed += ids
    with caplog.at_level(logging.WARNING, logger="jaxalign.serve.feedback"):
        store = FeedbackStore(path)
    records = store.records()
    assert set(confirmed) <= {record.id for record in records}, "a confirmed record was lost"
    assert len(records) - len(confirmed) <= 2  # appended but not yet printed when killed (at most one per kill)
    sidecars = sorted(tmp_path.glob("feedback.jsonl.torn-*"))
    if stall:  # one torn line per kill: the second writer set aside the first's, this store the second's
        assert len(sidecars) == 2 and len(store.recovered) == 1
        assert "set aside a torn last line" in store.recovered[0] and str(sidecars[-1]) in store.recovered[0]
        assert [r.getMessage() for r in caplog.records if r.name == "jaxalign.serve.feedback"] == store.recovered
    for sidecar in sidecars:  # half a line each: no newline, not JSON
        torn = sidecar.read_bytes()
        assert torn.startswith(b'{"schema":1,') and b"\n" not in torn
    after = make("thumbs_up", 99)
    store.append(after)
    store.close()
    assert [line["id"] for line in lines_of(path)] == [*(record.id for record in records), after.id]


def _three_records(path: Path) -> list[FeedbackRecord]:
    records = [make("accept", 1), make("pick", 2), make("edit", 3)]
    with FeedbackStore(path) as store:
        for record in records:
            store.append(record)
    return records


@pytest.mark.parametrize("torn, problem", [
    (make("reject", 4).to_line()[:57], "no newline and is not valid JSON"),
    (make("reject", 4).to_line()[:-1], "its append (record '"),
    (b"\0" * 100, "no newline"),
    (b"\0" * 100 + b"\n", "the last line is not valid JSON"),
    (b'{"schema": 1, "id": "x", \n\n', "the last line is not valid JSON"),
])
def test_torn_tail_is_set_aside_with_a_message(tmp_path, caplog, torn, problem):
    path = tmp_path / "feedback.jsonl"
    records = _three_records(path)
    intact = path.read_bytes()
    with path.open("ab") as handle:
        handle.write(torn)
    with caplog.at_level(logging.WARNING, logger="jaxalign.serve.feedback"):
        store = FeedbackStore(path)
    assert store.records() == records
    (message,) = store.recovered
    (sidecar,) = tmp_path.glob("feedback.jsonl.torn-*")
    assert sidecar.read_bytes() == torn
    assert f"byte offset {len(intact)}" in message and "line 4" in message and str(sidecar) in message
    assert problem in message
    assert [r.getMessage() for r in caplog.records if r.name == "jaxalign.serve.feedback"] == [message]
    assert path.read_bytes() == intact
    store.append(make("thumbs_down", 5))
    store.close()
    with FeedbackStore(path) as reopened:
        assert len(reopened) == 4 and reopened.recovered == []
    records, notes = read_feedback(path)
    assert len(records) == 4 and notes == []


def test_read_feedback_leaves_a_torn_tail_in_place(tmp_path):
    path = tmp_path / "feedback.jsonl"
    _three_records(path)
    with path.open("ab") as handle:
        handle.write(b'{"schema": 1, "id')
    before = path.read_bytes()
    records, notes = read_feedback(path)
    assert len(records) == 3
    assert len(notes) == 1 and "left out line 4" in notes[0]
    assert path.read_bytes() == before


@pytest.mark.parametrize("bad, fragment", [
    (b"{not json\n", "line 2: not valid JSON"),
    (b"\xff\xfe\n", "line 2: not UTF-8"),
    (b'{"schema": 1, "id": "a", "id": "b"}\n', "line 2: not usable JSON .*'id'"),
])
def test_a_corrupt_middle_line_is_a_clear_error_and_changes_nothing(tmp_path, bad, fragment):
    path = tmp_path / "feedback.jsonl"
    _three_records(path)
    first, second, third = path.read_bytes().split(b"\n")[:3]
    path.write_bytes(first + b"\n" + bad + third + b"\n")
    before = path.read_bytes()
    with pytest.raises(FeedbackError, match=fragment) as caught:
        FeedbackStore(path)
    assert str(path) in str(caught.value) and "not the last line" in str(caught.value)
    assert path.read_bytes() == before and not list(tmp_path.glob("*.torn-*"))
    FeedbackStore(tmp_path / "unrelated.jsonl").close()


def test_an_invalid_record_anywhere_is_a_clear_error(tmp_path):
    path = tmp_path / "feedback.jsonl"
    _three_records(path)
    lines = path.read_bytes().split(b"\n")[:3]
    broken = json.loads(lines[2])
    broken["action"] = "shrug"
    path.write_bytes(b"\n".join([lines[0], lines[1], json.dumps(broken).encode()]) + b"\n")
    with pytest.raises(FeedbackError, match=r"line 3, field 'action': unknown action 'shrug'"):
        FeedbackStore(path)
    duplicate = b"\n".join([lines[0], lines[1], lines[0]]) + b"\n"
    path.write_bytes(duplicate)
    with pytest.raises(FeedbackError, match=r"line 3, field 'id': .* already used by line 1"):
        FeedbackStore(path)


# ------------------------------------------------------------------------------------------------ exports


@pytest.fixture
def mixed_store(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.jsonl")
    for record in [
        make("accept", 1),
        make("edit", 2, system="You are a physics tutor."),
        make("reject", 3),
        make("pick", 4, choice=Choice(responses=("Sky is blue .", "Rayleigh scattering ."), chosen=1,
                                      model_versions=("v0", "v1"))),
        make("thumbs_up", 5),
        make("thumbs_down", 6),
    ]:
        store.append(record)
    yield store
    store.close()


def _read(path: Path):
    records, report = data.read_records(str(path))  # format detected, as `jaxalign train` does
    assert report.kept == len(records) and not report.skipped
    return records


def test_exports_are_read_by_the_data_layer(tmp_path, mixed_store):
    from tests.test_cli import tiny_tokenizer

    out = tmp_path / "out"
    assert mixed_store.export_sft(out / "sft.jsonl") == 2
    assert mixed_store.export_preferences(out / "pairs.jsonl") == 2
    assert mixed_store.export_unpaired(out / "kto.jsonl") == 6

    user = lambda index: data.Message("user", f"Why is the sky blue? ({index})")  # noqa: E731
    assistant = lambda text: (data.Message("assistant", text),)  # noqa: E731
    system = data.Message("system", "You are a physics tutor.")

    sft = _read(out / "sft.jsonl")
    assert sft == [data.SFTRecord((user(1),), assistant("It reflects the sea 1.")),
                   data.SFTRecord((system, user(2)), assistant("Rayleigh scattering 2."))]
    pairs = _read(out / "pairs.jsonl")
    assert pairs == [
        data.PreferenceRecord((system, user(2)), assistant("Rayleigh scattering 2."),
                              assistant("It reflects the sea 2.")),
        data.PreferenceRecord((user(4),), assistant("Rayleigh scattering ."), assistant("Sky is blue .")),
    ]
    kto = _read(out / "kto.jsonl")
    assert [(r.prompt[-1].content[-3:], r.completion[0].content, r.label) for r in kto] == [
        ("(1)", "It reflects the sea 1.", True),
        ("(2)", "Rayleigh scattering 2.", True),
        ("(2)", "It reflects the sea 2.", False),
        ("(3)", "It reflects the sea 3.", False),
        ("(5)", "It reflects the sea 5.", True),
        ("(6)", "It reflects the sea 6.", False),
    ]
    row = json.loads((out / "pairs.jsonl").read_text().splitlines()[1])
    assert row["feedback_id"] == mixed_store.records()[3].id and row["action"] == "pick"
    assert (row["chosen_model_version"], row["rejected_model_version"]) == ("v1", "v0")

    # All the way to token batches, through the chat template, as `jaxalign train` reads them.
    for name in ("sft", "pairs", "kto"):
        dataset = data.build_dataset(data.DataConfig(str(out / f"{name}.jsonl"), max_length=64),
                                     tiny_tokenizer())
        assert len(dataset) == {"sft": 2, "pairs": 2, "kto": 6}[name]


def test_plain_text_exports_and_empty_subsets(tmp_path, mixed_store):
    plain = [r for r in mixed_store.records() if r.system is None]
    assert export_sft(plain, tmp_path / "sft.jsonl", chat=False) == 1
    assert _read(tmp_path / "sft.jsonl") == [data.SFTRecord("Why is the sky blue? (1)", "It reflects the sea 1.")]
    with pytest.raises(FeedbackError, match=r"field 'system': a plain-text export \(chat=False\)"):
        mixed_store.export_sft(tmp_path / "lost.jsonl", chat=False)
    # No records since the last version (retrain.py's slice of the store): an empty file and a count of 0.
    for export in (export_sft, export_preferences, export_unpaired):
        target = tmp_path / f"{export.__name__}.jsonl"
        assert export(mixed_store.records()[len(mixed_store):], target) == 0
        assert target.read_bytes() == b""
    assert not list(tmp_path.glob("*.tmp-*"))  # each export was written atomically: no temp file left
    thumbs = [r for r in mixed_store.records() if r.action.startswith("thumbs")]
    assert export_sft(thumbs, tmp_path / "none.jsonl") == 0
