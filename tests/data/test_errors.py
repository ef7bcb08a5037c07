"""Bad input: each error names the file, the line/record and the field; skipping reports counts and examples."""

import gzip
import json
import logging
import re

import pytest

from jaxalign.data import (
    DataError,
    Message,
    PreferenceGroup,
    PreferenceRecord,
    Reason,
    Rendering,
    SFTRecord,
    Truncation,
    read_records,
    tokenize,
)
from jaxalign.data.tokenize import TokenizedDataset
from tests.data.conftest import make_tiny_tokenizer, write_json, write_jsonl

GOOD = {"prompt": "The sky is", "chosen": " blue", "rejected": " green"}


def _error(path, line, field, problem):
    """The expected message of a DataError, as a regex."""
    where = f"{re.escape(str(path))}, line {line}"
    return f"^{where}, field '{re.escape(field)}': {problem}" if field else f"^{where}: {problem}"


@pytest.mark.parametrize("raw, problem", [
    ('{"prompt": "a", "chosen": ', r"not valid JSON \(Expecting value at column 27\)"),
    ('[1, 2]', "expected a JSON object, got an array"),
    ('"text"', "expected a JSON object, got a string"),
])
def test_malformed_line(tmp_path, raw, problem):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, GOOD, GOOD], raw_lines={2: raw})
    with pytest.raises(DataError, match=_error(path, 2, None, problem)) as caught:
        read_records(path)
    assert caught.value.reason == Reason.MALFORMED and caught.value.where.line == 2


def test_invalid_utf8_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=_error(path, 2, None, r"not UTF-8 text")):
        read_records(path, format="preference")


@pytest.mark.parametrize("row, field, problem, reason", [
    ({"prompt": "a", "chosen": " b"}, "rejected", r"missing \(the record has: chosen, prompt\)", Reason.MISSING_FIELD),
    ({"prompt": "a", "chosen": None, "rejected": " c"}, "chosen", "is null", Reason.MISSING_FIELD),
    ({"prompt": "a", "chosen": 7, "rejected": " c"}, "chosen",
     "expected a string or a list of messages, got an integer", Reason.WRONG_TYPE),
    ({"prompt": "a", "chosen": "  ", "rejected": " c"}, "chosen", "empty response", Reason.EMPTY_RESPONSE),
    ({"prompt": "a", "chosen": " b", "rejected": " c", "margin": "big"}, "margin", "expected a number, got a string",
     Reason.WRONG_TYPE),
    ({"prompt": "a", "chosen": " b", "rejected": " c", "margin": float("nan")}, "margin",
     "expected a finite number, got nan", Reason.INVALID_VALUE),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}]},
     "chosen[1].content", "expected a string, got an integer", Reason.WRONG_TYPE),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}]},
     "chosen[1].content", "empty response", Reason.EMPTY_RESPONSE),
    ({"chosen": [{"role": "user", "content": "q"}, {"content": "x"}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "y"}]},
     "chosen[1].role", "missing", Reason.MISSING_FIELD),
    ({"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: blue"}, "rejected", "is identical to 'chosen'",
     Reason.IDENTICAL_RESPONSES),
    # A null prompt is not an implicit one (pandas writes a missing cell as null).
    ({"prompt": None, "chosen": "The capital is Paris.", "rejected": "The capital is London."}, "prompt", "is null",
     Reason.MISSING_FIELD),
    ({"prompt": "Q\ud800?", "chosen": " b", "rejected": " c"}, "prompt",
     r"holds invalid Unicode: a lone surrogate '\\ud800' at character 1", Reason.MALFORMED),
    ({"prompt": "a", "chosen": [{"role": "assistant", "content": "x\udc00"}],
      "rejected": [{"role": "assistant", "content": "y"}]}, "chosen[0].content", "holds invalid Unicode",
     Reason.MALFORMED),
    ({"prompt": "Tell me about dogs", "chosen": [{"role": "user", "content": "Tell me about cats"},
                                                 {"role": "assistant", "content": "Purr."}],
      "rejected": [{"role": "user", "content": "Tell me about cats"}, {"role": "assistant", "content": "Meh."}]},
     "prompt", "is not the first user message of 'chosen'/'rejected'", Reason.INVALID_VALUE),
    ({"prompt": "Hi", "chosen": [{"role": "assistant", "content": "Hello"}],
      "rejected": [{"role": "assistant", "content": "Go"}]}, "prompt",
     r"is a string while 'chosen' and 'rejected' are messages: give it as \[\{role: user", Reason.WRONG_TYPE),
    ({"prompt": [{"role": "user", "content": "Cats?"}], "chosen": "Cats are great.", "rejected": "Cats are bad."},
     "prompt", "is a message list while 'chosen' is a string", Reason.WRONG_TYPE),
    ({"prompt": [{"role": "user", "content": "2+2?"}],
      "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
      "rejected": [{"role": "assistant", "content": "5"}]},
     "rejected", "does not repeat the prompt's messages while the other response does", Reason.INVALID_VALUE),
    ({"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "user", "content": "4"}],
      "rejected": [{"role": "assistant", "content": "5"}]},
     "chosen", "starts with a 'user' message, not an assistant one", Reason.INVALID_VALUE),
])
def test_bad_field_names_line_and_field(tmp_path, row, field, problem, reason):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, GOOD, row])
    with pytest.raises(DataError, match=_error(path, 3, field, problem)) as caught:
        read_records(path, format="preference")
    assert caught.value.reason == reason and caught.value.field == field


@pytest.mark.parametrize("fmt, row, field, problem", [
    ("hh_rlhf", {"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant:"},
     "rejected", r"empty response \(the final Assistant turn\)"),
    ("hh_rlhf", {"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: bye\n\nAssistant: no"},
     "rejected", "its turns before the final Assistant reply differ"),
    ("pku_saferlhf", {"prompt": "p", "response_0": "a", "response_1": "b", "better_response_id": 2,
                      "safer_response_id": 0}, "better_response_id", r"must be in \[0, 1\], got 2"),
    ("pku_saferlhf", {"prompt": "p", "response_0": "a", "response_1": "a", "better_response_id": 0},
     "response_1", "is identical to 'response_0'"),
    ("ultrafeedback", {"instruction": "i", "completions": [
        {"response": "a", "annotations": {"honesty": {"Rating": "high"}}}]},
     "completions[0].annotations.honesty.Rating", "expected a number or 'N/A', got 'high'"),
    ("openai_preferences", {"query": "q", "sample0": "a", "sample1": "b", "best": 3}, "best",
     r"must be in \[0, 1\], got 3"),
    ("scored_conversation", {"conversation": [{"role": "human", "content": "hi"}], "meta_eval_score": 3},
     "conversation", "must end with the assistant's reply, ends with a 'user' message"),
    ("scored_conversation", {"conversation": [{"role": "human", "content": "hi"},
                                              {"role": "assistant", "content": "yo"}], "meta_eval_score": "4"},
     "meta_eval_score", "expected a number, got a string"),
    ("medical_qa", {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
                    "answer": "b"}, "conversations", "ends with an assistant message although 'answer' holds"),
])
def test_format_specific_errors(tmp_path, fmt, row, field, problem):
    path = write_jsonl(tmp_path / f"{fmt}.jsonl", [row])
    with pytest.raises(DataError, match=_error(path, 1, field, problem)):
        read_records(path, format=fmt)


def test_json_array_records_are_cited_by_number(tmp_path):
    path = write_json(tmp_path / "pairs.json", [GOOD, {"prompt": "a", "chosen": " b"}])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}, record 2, field 'rejected': missing"):
        read_records(path)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"prompt": "a"},\n {"prompt": }\n]')
    with pytest.raises(DataError, match=rf"^{re.escape(str(broken))}: not valid JSON \(Expecting value at line 3"):
        read_records(broken)


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        read_records(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: holds no records"):
        read_records(empty)
    # Other data files: named at once, and a missing one is not looked up on the hub (slow retries offline).
    with pytest.raises(FileNotFoundError, match="^pairs.csv: no such file"):
        read_records("pairs.csv")
    table = tmp_path / "pairs.CSV"
    table.write_text("prompt,chosen,rejected\na,b,c\n")
    with pytest.raises(DataError, match=r"pairs.CSV: a .CSV file: jaxalign reads JSON Lines or JSON, optionally .gz"):
        read_records(table)


def test_skip_reports_counts_per_reason_and_first_examples(tmp_path, caplog):
    rows = [GOOD, {"prompt": "a", "chosen": " b"}, GOOD, {"prompt": "a", "chosen": "", "rejected": " c"},
            GOOD, {"prompt": "a", "chosen": " b"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows + [GOOD], raw_lines={7: "{oops"})
    with caplog.at_level(logging.WARNING, logger="jaxalign.data"):
        records, report = read_records(path, on_error="skip")
    assert len(records) == report.kept == 3 and report.seen == 7
    assert report.skipped == {"missing_field": 2, "empty_response": 1, "malformed": 1}
    assert report.examples[0].startswith(f"{path}, line 2, field 'rejected': missing")
    assert [r.origin.line for r in records] == [1, 3, 5]
    assert "kept 3 of 7 records" in caplog.text and "missing_field: 2" in caplog.text


def test_skipping_everything_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    with pytest.raises(DataError, match=r"every record was skipped \(read .*kept 0 of 2 records"):
        read_records(path, format="preference", on_error="skip")


def test_prompt_longer_than_the_limit(tmp_path):
    tokenizer = make_tiny_tokenizer()
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, {"prompt": "a b c d e f", "chosen": " yes", "rejected": " no"}])
    records, _ = read_records(path)
    # "a b c d e f" is 11 tokens (letters and spaces) in the tiny word-level vocabulary.
    too_long = _error(path, 2, "prompt", "11 tokens, longer than max_prompt_length=8")
    with pytest.raises(DataError, match=too_long) as caught:
        tokenize(records, tokenizer, truncation=Truncation(max_length=16, max_prompt_length=8))
    assert caught.value.reason == Reason.PROMPT_TOO_LONG
    with pytest.raises(DataError, match=_error(path, 2, "prompt", "11 tokens fill max_length=10: no completion")):
        tokenize(records, tokenizer, truncation=Truncation(max_length=10))
    dataset = tokenize(records, tokenizer, truncation=Truncation(max_length=16, max_prompt_length=8), on_error="skip")
    assert len(dataset) == 1 and dataset.report.skipped == {"prompt_too_long": 1}


def test_explicit_message_prompt_repeated_by_both_responses_is_removed_from_them(tmp_path):
    question = [{"role": "user", "content": "2+2?"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": question, "chosen": question + [{"role": "assistant", "content": "4"}],
         "rejected": question + [{"role": "assistant", "content": "5"}]},
        {"prompt": "Cats?", "chosen": [{"role": "user", "content": "Cats?"}, {"role": "assistant", "content": "Yes"}],
         "rejected": [{"role": "user", "content": "Cats?"}, {"role": "assistant", "content": "No"}]}])
    first, second = read_records(path, format="preference")[0]
    assert first == PreferenceRecord(question, [{"role": "assistant", "content": "4"}],
                                     [{"role": "assistant", "content": "5"}])
    assert second.prompt == (Message("user", "Cats?"),) and second.chosen == (Message("assistant", "Yes"),)


@pytest.mark.parametrize("empty", ["", "  ", []])
def test_an_empty_explicit_prompt_is_an_implicit_one(tmp_path, empty):
    conversation = [{"role": "user", "content": "2+2?"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": empty, "chosen": conversation + [{"role": "assistant", "content": "4"}],
         "rejected": conversation + [{"role": "assistant", "content": "5"}]}])
    record, = read_records(path, format="preference")[0]
    assert record.prompt == (Message("user", "2+2?"),) and record.chosen == (Message("assistant", "4"),)


def test_pairs_identical_once_truncated_are_refused(tmp_path, caplog):
    tokenizer = make_tiny_tokenizer()
    shared = " a b c d e f"
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, {"prompt": "The sky is", "chosen": shared + " yes",
                                                         "rejected": shared + " no"}])
    records, _ = read_records(path)
    truncation = Truncation(max_length=12)  # "The sky is" is 5 tokens: 7 are left, inside the shared start
    with pytest.raises(DataError, match=_error(path, 2, "rejected", r"is identical to 'chosen' as tokens: they differ "
                                               r"only in the tokens truncation cut off \(max_length=12, "
                                               r"truncation='keep_start'\)")) as caught:
        tokenize(records, tokenizer, truncation=truncation)
    assert caught.value.reason == Reason.IDENTICAL_RESPONSES
    with caplog.at_level(logging.WARNING, logger="jaxalign.data"):
        dataset = tokenize(records, tokenizer, truncation=truncation, on_error="skip")
    assert len(dataset) == 1 and dataset.report.skipped == {"identical_responses": 1}
    assert "kept 1 of 2 records" in caplog.text


def test_a_group_loses_only_the_pair_that_ties_once_truncated():
    tokenizer = make_tiny_tokenizer()
    shared = " a b c d e f"
    group = PreferenceGroup((PreferenceRecord("The sky is", shared + " yes", shared + " no", dimension="honesty"),
                             PreferenceRecord("The sky is", " blue", " green", dimension="helpfulness")))
    dataset = tokenize([group], tokenizer, truncation=Truncation(max_length=12))
    honesty = dataset.dimensions.index("honesty")
    sequences = dataset.examples[0].sequences
    assert sequences[2 * honesty] is None and sequences[2 * honesty + 1] is None
    assert all(sequence is not None for sequence in sequences[2 * (1 - honesty):2 * (1 - honesty) + 2])
    assert dataset.report.notes == {"tied_after_tokenizing_honesty": 1}
    both_tie = PreferenceGroup((group.pairs[0], PreferenceRecord("The sky is", shared + " x", shared + " z",
                                                                 dimension="helpfulness")))
    with pytest.raises(DataError, match="every pair of the group has the same tokens on both sides"):
        tokenize([both_tie], tokenizer, truncation=Truncation(max_length=12))


def test_truncation_is_reported_as_a_warning(tmp_path, caplog):
    tokenizer = make_tiny_tokenizer()
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "The sky is", "chosen": " a b c yes",
                                                   "rejected": " no"}])
    records, _ = read_records(path)
    with caplog.at_level(logging.WARNING, logger="jaxalign.data"):
        dataset = tokenize(records, tokenizer, truncation=Truncation(max_length=8))
    assert dataset.report.truncated["completion"] == 1
    assert "truncated: completion: 1" in caplog.text


def test_tokenize_errors_on_records_without_origin():
    tokenizer = make_tiny_tokenizer()
    records = [SFTRecord("The sky is", " blue", score=1.0), SFTRecord("The sky is", " green")]
    with pytest.raises(DataError, match=r"^<records>, record 2, field 'score': is missing while the first record has"):
        tokenize(records, tokenizer)
    with pytest.raises(DataError, match=r"^mine, record 1, field 'prompt': ends with an assistant message"):
        tokenize([SFTRecord([{"role": "assistant", "content": "Hi"}], [{"role": "assistant", "content": "yes"}])],
                 tokenizer, source="mine")
    with pytest.raises(TypeError, match="records of one kind only"):
        tokenize([SFTRecord("a", " b"), PreferenceRecord("a", " b", " c")], tokenizer)


def test_missing_chat_template_is_a_configuration_error():
    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = None
    record = SFTRecord([{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Hello"}])
    with pytest.raises(ValueError, match="the tokenizer has no chat template"):
        tokenize([record], tokenizer)
    dataset = tokenize([record], tokenizer, rendering=Rendering(conversation_style="role_markers"))
    assert isinstance(dataset, TokenizedDataset) and len(dataset) == 1


# Identical chosen and rejected: one check where every reader builds its pairs, with its own skip reason.
HH = "\n\nHuman: Sky?\n\nAssistant: "
SAME = [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}]


@pytest.mark.parametrize("fmt, row", [
    ("hh_rlhf", {"chosen": HH + "Blue.", "rejected": HH + "Blue."}),
    ("preference", {"prompt": "Sky?", "chosen": " Blue.", "rejected": " Blue."}),
    ("sharegpt_preference", {"conversations": [{"from": "human", "value": "Sky?"}], "chosen": "Blue.",
                             "rejected": {"from": "gpt", "value": "Blue."}}),
    ("ultrafeedback_binarized", {"prompt": "Sky?", "chosen": SAME, "rejected": SAME, "score_chosen": 8,
                                 "score_rejected": 8}),
])
def test_identical_chosen_and_rejected_are_refused_for_every_format(tmp_path, fmt, row):
    good = {**row, "rejected": row["chosen"].replace("Blue", "Red") if isinstance(row["chosen"], str) else
            [SAME[0], {"role": "assistant", "content": "Red."}]}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, row])
    with pytest.raises(DataError, match=_error(path, 2, "rejected", "is identical to 'chosen'")) as caught:
        read_records(path)  # detected as fmt
    assert caught.value.reason == Reason.IDENTICAL_RESPONSES
    records, report = read_records(path, format=fmt, on_error="skip")
    assert len(records) == 1 and report.skipped == {"identical_responses": 1}
    assert "line 2, field 'rejected': is identical to 'chosen'" in report.examples[0]


def test_preference_record_refuses_identical_sides():
    with pytest.raises(DataError, match="^field 'rejected': is identical to 'chosen'") as caught:
        PreferenceRecord([Message("user", "Hi")], [Message("assistant", "yes")],
                         [{"role": "assistant", "content": "yes"}])
    assert caught.value.reason == Reason.IDENTICAL_RESPONSES


# Gzip: a corrupt or truncated archive is a file-level DataError at the line reached, even when skipping.
def _pairs_gz(count=2000):
    data = "".join(json.dumps({"prompt": f"p{i}", "chosen": " a", "rejected": " b"}) + "\n" for i in range(count))
    return data.encode(), gzip.compress(data.encode())


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_truncated_gzip_is_an_error_at_the_line_reached(tmp_path, on_error):
    _, compressed = _pairs_gz()
    half = tmp_path / "half.jsonl.gz"
    half.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(DataError, match=rf"^{re.escape(str(half))}, line (\d+): corrupt or truncated gzip data "
                                        r"\(EOFError: .*\); the \d+ lines before it were read") as caught:
        read_records(half, on_error=on_error)
    assert caught.value.reason == Reason.MALFORMED and caught.value.where.line > 1
    # Cut in the trailer: every line decompresses, but the archive is still incomplete.
    tail = tmp_path / "tail.jsonl.gz"
    tail.write_bytes(compressed[:-3])
    with pytest.raises(DataError, match=rf"^{re.escape(str(tail))}, line 2001: corrupt or truncated gzip data"):
        read_records(tail, on_error=on_error)


def test_corrupt_or_fake_gzip_is_an_error(tmp_path):
    data, compressed = _pairs_gz()
    flipped = bytearray(compressed)
    flipped[len(flipped) // 2] ^= 0xFF
    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(DataError, match=rf"^{re.escape(str(corrupt))}, line \d+: corrupt or truncated gzip data"):
        read_records(corrupt, on_error="skip")
    plain = tmp_path / "plain.jsonl.gz"
    plain.write_bytes(data)
    with pytest.raises(DataError, match=rf"^{re.escape(str(plain))}, line 1: not gzip data \(BadGzipFile"):
        read_records(plain)
    array = tmp_path / "array.json.gz"
    array.write_bytes(gzip.compress(json.dumps([GOOD] * 500).encode())[:-3])
    with pytest.raises(DataError, match=rf"^{re.escape(str(array))}: corrupt or truncated gzip data \(EOFError"):
        read_records(array)


# Byte order marks and top-level objects.
def test_utf8_bom_is_accepted(tmp_path):
    lines = tmp_path / "bom.jsonl"
    lines.write_bytes(b"\xef\xbb\xbf" + (json.dumps(GOOD) + "\n").encode() * 2)
    array = tmp_path / "bom.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps([GOOD, GOOD], indent=1).encode())
    for path in (lines, array):
        records, report = read_records(path)
        assert records == [PreferenceRecord("The sky is", " blue", " green")] * 2 and report.kept == 2


def test_top_level_objects(tmp_path):
    # An object whose only field holds the records is read as them (indented or on one line) ...
    for indent in (1, None):
        wrapped = tmp_path / f"wrapped{indent}.json"
        wrapped.write_text(json.dumps({"data": [GOOD, {"prompt": "a", "chosen": " b"}]}, indent=indent))
        with pytest.raises(DataError, match=rf"^{re.escape(str(wrapped))}, record 2, field 'rejected': missing"):
            read_records(wrapped)
    # ... any other object is an error that says what was expected, never "line 1: not valid JSON".
    for name, value in (("meta.json", {"version": 1, "data": [GOOD]}), ("one.json", GOOD)):
        path = tmp_path / name
        path.write_text(json.dumps(value, indent=2))
        with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: holds one JSON object \(fields: .*\), not a "
                                            r"list of records: expected a JSON array of records, JSON Lines"):
            read_records(path, on_error="skip")
    broken = tmp_path / "broken.json"
    broken.write_text('{\n "data": [\n  {"prompt": }\n ]\n}')
    with pytest.raises(DataError, match=rf"^{re.escape(str(broken))}: not valid JSON \(Expecting value at line 3"):
        read_records(broken)
    # JSON Lines under .json with a broken first line stays JSON Lines: that line alone is bad.
    lines = write_jsonl(tmp_path / "lines.json", [GOOD, GOOD], raw_lines={1: '{"prompt": "a", "chosen": '})
    records, report = read_records(lines, on_error="skip")
    assert len(records) == 1 and report.skipped == {"malformed": 1}
