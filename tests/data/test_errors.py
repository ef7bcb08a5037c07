"""Bad input: each error names the file, the line/record and the field; skipping reports counts and examples."""

import logging
import re

import pytest

from jaxalign.data import (
    DataError,
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
     Reason.INVALID_VALUE),
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
