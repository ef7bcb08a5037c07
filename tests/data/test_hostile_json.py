"""Hostile JSON: deep nesting, huge integers and duplicate keys are DataErrors naming the file, the line (or
record) and the field, never a RecursionError, a bare ValueError or a silently kept last value."""

import gzip
import json
import re

import pytest

from jaxalign.data import DataError, PreferenceRecord, Reason, read_records
from tests.data.conftest import write_jsonl

GOOD = {"prompt": "The sky is", "chosen": " blue", "rejected": " green"}
DEEP = "[" * 200_000 + "]" * 200_000
BIG = "1" + "0" * 4999  # 5,000 digits: past Python's limit on converting digits to an int (4,300)


def _error(where, field, problem):
    """The expected message of a DataError, as a regex; ``where`` is the path and ``line 2`` / ``record 2``."""
    path, part = where
    where = f"{re.escape(str(path))}, {part}"
    return f"^{where}, field '{re.escape(field)}': {problem}" if field else f"^{where}: {problem}"


def _write(path, text: str):
    data = text.encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


# Nesting deeper than Python's json parser recurses.
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json"])
@pytest.mark.parametrize("raw, field", [
    (DEEP, None),
    ('{"prompt": "a", "chosen": " b", "rejected": " c", "meta": {"tags": ' + DEEP + "}}", "meta.tags"),
    ('{"prompt": "a", "chosen": [{"role": "assistant", "content": ' + DEEP + '}], "rejected": " c"}',
     "chosen[0].content"),
])
def test_deeply_nested_line(tmp_path, suffix, raw, field):
    path = write_jsonl(tmp_path / f"pairs{suffix}", [GOOD, GOOD, GOOD], raw_lines={2: raw})
    problem = r"nested too deeply \(at column \d+\): over \d+ levels of arrays/objects \(Python's json parser stops"
    with pytest.raises(DataError, match=_error((path, "line 2"), field, problem)) as caught:
        read_records(path, format="preference")
    assert caught.value.reason == Reason.MALFORMED and caught.value.where.line == 2
    records, report = read_records(path, format="preference", on_error="skip")  # one bad line, not the file
    assert len(records) == 2 and report.skipped == {"malformed": 1}


@pytest.mark.parametrize("suffix", [".json", ".json.gz"])
def test_deeply_nested_json_document(tmp_path, suffix):
    array = _write(tmp_path / f"pairs{suffix}", "[\n" + json.dumps(GOOD) + ',\n{"prompt": ' + DEEP + "}\n]")
    with pytest.raises(DataError, match=_error((array, "record 2"), "prompt", r"nested too deeply \(at line 3, column "
                                               r"\d+\)")) as caught:
        read_records(array, on_error="skip")  # the document does not parse: nothing of it can be read
    assert caught.value.reason == Reason.MALFORMED and caught.value.where.record == 2
    bare = _write(tmp_path / f"bare{suffix}", DEEP)
    with pytest.raises(DataError, match=_error((bare, "record 1"), None, r"nested too deeply \(at line 1, ")):
        read_records(bare)
    wrapped = _write(tmp_path / f"wrapped{suffix}", json.dumps({"data": [GOOD, GOOD]})[:-2] + ', {"chosen": '
                     + DEEP + "}]}")
    with pytest.raises(DataError, match=_error((wrapped, "record 3"), "chosen", "nested too deeply")):
        read_records(wrapped)


# Integers longer than Python converts (sys.get_int_max_str_digits(), 4,300 by default).
@pytest.mark.parametrize("fmt, raw, field", [
    ("preference", '{"prompt": "a", "chosen": " b", "rejected": " c", "margin": ' + BIG + "}", "margin"),
    ("preference", '{"prompt": "a", "chosen": " b", "rejected": " c", "margin": -' + BIG + "}", "margin"),
    ("openai_preferences", '{"query": "q", "sample0": "a", "sample1": "b", "best": ' + BIG + "}", "best"),
    ("ultrafeedback", '{"instruction": "i", "completions": [{"response": "a", "annotations": {"honesty": '
     '{"Rating": ' + BIG + "}}}]}", "completions[0].annotations.honesty.Rating"),
])
def test_huge_integer(tmp_path, fmt, raw, field):
    path = write_jsonl(tmp_path / "rows.jsonl", [{}], raw_lines={1: raw})
    with pytest.raises(DataError, match=_error((path, "line 1"), field, r"an integer of 5000 digits \(at column "
                                               r"\d+\), over Python's limit of 4300 \(")) as caught:
        read_records(path, format=fmt)
    assert caught.value.reason == Reason.MALFORMED and caught.value.field == field


def test_huge_integer_in_files_and_documents(tmp_path):
    row = '{"prompt": "a", "chosen": " b", "rejected": " c", "margin": ' + BIG + "}"
    gz = write_jsonl(tmp_path / "pairs.jsonl.gz", [GOOD, GOOD], raw_lines={2: row})
    with pytest.raises(DataError, match=_error((gz, "line 2"), "margin", "an integer of 5000 digits")):
        read_records(gz)
    records, report = read_records(gz, on_error="skip")
    assert len(records) == 1 and report.skipped == {"malformed": 1}
    array = _write(tmp_path / "pairs.json", "[\n" + json.dumps(GOOD) + ",\n" + row + "\n]")
    with pytest.raises(DataError, match=_error((array, "record 2"), "margin", r"an integer of 5000 digits \(at line 3, "
                                               r"column 61\)")):
        read_records(array)


def test_large_integers_that_parse_are_checked_too(tmp_path):
    # 401 digits: Python reads the integer, but no float holds it.
    row = {"prompt": "a", "chosen": " b", "rejected": " c", "margin": 10 ** 400}
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, row])
    with pytest.raises(DataError, match=_error((path, "line 2"), "margin", "expected a finite number, got an integer "
                                               "of 401 digits")):
        read_records(path)
    best = write_jsonl(tmp_path / "best.jsonl", [{"query": "q", "sample0": "a", "sample1": "b", "best": 10 ** 400}])
    with pytest.raises(DataError, match=_error((best, "line 1"), "best", r"must be in \[0, 1\], got an integer of 401 "
                                               "digits$")):
        read_records(best)
    rating = write_jsonl(tmp_path / "uf.jsonl", [{"instruction": "i", "completions": [
        {"response": "a", "annotations": {"honesty": {"Rating": 10 ** 400}}}]}])
    with pytest.raises(DataError, match=_error((rating, "line 1"), "completions[0].annotations.honesty.Rating",
                                               "expected a number or 'N/A', got an integer of 401 digits$")):
        read_records(rating, format="ultrafeedback")


# Duplicate keys: Python's json keeps the last value silently; other readers keep the first.
@pytest.mark.parametrize("raw, field", [
    ('{"prompt": "a", "chosen": " b", "chosen": " x", "rejected": " c"}', "chosen"),
    ('{"prompt": "a", "chosen": " b", "rejected": " c", "chosen": " b"}', "chosen"),  # even with the same value
    ('{"prompt": "a", "chosen": " b", "ch\\u006fsen": " x", "rejected": " c"}', "chosen"),  # the same key, escaped
    ('{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "content": "b"}], '
     '"rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "c"}]}', "chosen[1].content"),
    ('{"prompt": "a", "chosen": " b", "rejected": " c", "meta": {"id": 1, "tags": [{"x": 1, "x": 2}]}}',
     "meta.tags[0].x"),  # in a field no format reads
], ids=["twice", "same_value", "escaped", "nested", "unread_field"])
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_duplicate_key(tmp_path, suffix, raw, field):
    path = write_jsonl(tmp_path / f"pairs{suffix}", [GOOD, GOOD], raw_lines={2: raw})
    key = field.rsplit(".", 1)[-1].split("[")[0]
    with pytest.raises(DataError, match=_error((path, "line 2"), field, rf"duplicate key '{key}' \(at column \d+\): "
                                               "the object holds it twice")) as caught:
        read_records(path, format="preference")
    assert caught.value.reason == Reason.MALFORMED and caught.value.field == field
    records, report = read_records(path, format="preference", on_error="skip")
    assert len(records) == 1 and report.skipped == {"malformed": 1}


def test_duplicate_key_in_json_documents(tmp_path):
    dup = '{"prompt": "a", "chosen": " b", "rejected": " c", "rejected": " d"}'
    array = _write(tmp_path / "pairs.json", "[\n" + json.dumps(GOOD) + ",\n" + dup + "\n]")
    with pytest.raises(DataError, match=_error((array, "record 2"), "rejected", r"duplicate key 'rejected' \(at line "
                                               r"3, column 51\)")):
        read_records(array, on_error="skip")
    one_line = _write(tmp_path / "wrapped.json", '{"data": [' + json.dumps(GOOD) + ", " + dup + "]}")
    with pytest.raises(DataError, match=_error((one_line, "record 2"), "rejected", "duplicate key 'rejected'")):
        read_records(one_line)
    outer = _write(tmp_path / "outer.json", '{"data": [' + json.dumps(GOOD) + '], "data": []}')
    with pytest.raises(DataError, match=rf"^{re.escape(str(outer))}: duplicate key 'data' \(at line 1, column 79\)"):
        read_records(outer)
    # JSON Lines under .json: the bad line alone.
    lines = write_jsonl(tmp_path / "lines.json", [GOOD, GOOD, GOOD], raw_lines={1: dup})
    records, report = read_records(lines, on_error="skip")
    assert len(records) == 2 and report.skipped == {"malformed": 1}


def test_repeated_keys_in_different_objects_are_fine(tmp_path):
    message = {"role": "user", "content": "q"}
    row = {"prompt": [message], "chosen": [message, {"role": "assistant", "content": "a"}],
           "rejected": [message, {"role": "assistant", "content": "b"}], "meta": {"prompt": {"prompt": 1}}}
    for path in (write_jsonl(tmp_path / "pairs.jsonl", [row]), _write(tmp_path / "pairs.json", json.dumps([row]))):
        (record,), _ = read_records(path, format="preference")
        assert record == PreferenceRecord([message], [{"role": "assistant", "content": "a"}],
                                          [{"role": "assistant", "content": "b"}])


def test_brackets_in_strings_and_moderate_nesting_are_fine(tmp_path):
    row = {"prompt": DEEP, "chosen": " {" * 1000, "rejected": " c", "meta": json.loads("[" * 200 + "]" * 200),
           "big": 10 ** 300}
    for path in (write_jsonl(tmp_path / "pairs.jsonl", [row]), _write(tmp_path / "pairs.json", json.dumps([row]))):
        (record,), report = read_records(path, format="preference")
        assert record == PreferenceRecord(DEEP, " {" * 1000, " c") and report.kept == 1
