"""Every format read from a small file the test writes, into exactly the expected canonical records."""

import datasets
import pytest

from jaxalign.data import (
    BestOfNRecord,
    DataError,
    Message,
    PreferenceGroup,
    PreferenceRecord,
    PromptRecord,
    Reason,
    ScoredConversation,
    SFTRecord,
    UnpairedRecord,
    read_records,
)
from jaxalign.data.formats import DETECTION_RECORDS
from tests.data.conftest import make_tiny_tokenizer, write_json, write_jsonl

USER, ASSISTANT = "user", "assistant"


def user(text):
    return Message(USER, text)


def assistant(text):
    return Message(ASSISTANT, text)


def read(path, **kwargs):
    records, report = read_records(path, **kwargs)
    assert report.seen == report.kept == len(records)
    return records


def test_trl_sft_kinds(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "The sky is", "completion": " blue."},
        {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        {"text": "Once upon a time."},
    ])
    assert read(path, format="sft") == [
        SFTRecord("The sky is", " blue."),
        SFTRecord((user("Hi"),), (assistant("Hello!"),)),
        SFTRecord((), (user("Hi"), assistant("Hello!"))),
        SFTRecord("", "Once upon a time."),
    ]
    assert read(path)[0].origin.line == 1  # detected as sft; records remember where they came from


def test_sharegpt_speaker_names_under_role_are_mapped(tmp_path):
    path = write_jsonl(tmp_path / "pref.jsonl", [
        {"prompt": [{"role": "human", "content": "Hi"}], "chosen": [{"role": "gpt", "content": "Hello!"}],
         "rejected": [{"role": "GPT", "content": "Go away."}]}])
    assert read(path) == [PreferenceRecord((user("Hi"),), (assistant("Hello!"),), (assistant("Go away."),))]


def test_trl_preference_explicit_implicit_and_margin(tmp_path):
    sky = [{"role": "user", "content": "Sky?"}]
    path = write_jsonl(tmp_path / "pref.jsonl", [
        {"prompt": "Q: sky? A:", "chosen": " blue", "rejected": " green", "margin": 2},
        {"chosen": "Q: sky? A: blue sky", "rejected": "Q: sky? A: blues"},
        {"chosen": sky + [{"role": "assistant", "content": "Blue."}],
         "rejected": sky + [{"role": "assistant", "content": "Green."}]},
        # UltraFeedback-binarized shape: a string prompt beside full conversations -> implicit prompt
        {"prompt": "Sky?", "chosen": sky + [{"role": "assistant", "content": "Blue."}],
         "rejected": sky + [{"role": "assistant", "content": "Red."}]},
    ])
    records = read(path)
    assert records == [
        PreferenceRecord("Q: sky? A:", " blue", " green", margin=2.0),
        PreferenceRecord("Q: sky? A:", " blue sky", " blues"),
        PreferenceRecord((user("Sky?"),), (assistant("Blue."),), (assistant("Green."),)),
        PreferenceRecord((user("Sky?"),), (assistant("Blue."),), (assistant("Red."),)),
    ]


def test_trl_unpaired_and_prompt_only(tmp_path):
    unpaired = write_jsonl(tmp_path / "kto.jsonl", [
        {"prompt": "The sky is", "completion": " blue.", "label": True},
        {"prompt": "The sky is", "completion": " green.", "label": 0},
    ])
    assert read(unpaired) == [UnpairedRecord("The sky is", " blue.", True),
                              UnpairedRecord("The sky is", " green.", False)]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "The sky is"},
                                                       {"prompt": [{"role": "user", "content": "Hi"}]}])
    assert read(prompts) == [PromptRecord("The sky is"), PromptRecord((user("Hi"),))]


HH_START = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Sky color?\n\nAssistant: "


def test_hh_rlhf_transcripts_become_conversations(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl.gz", [
        {"chosen": f"{HH_START}Blue.", "rejected": f"{HH_START}Go away."},
    ])
    (record,) = read(path)
    assert record == PreferenceRecord(
        (user("Hi there"), assistant("Hello! How can I help?"), user("Sky color?")),
        (assistant("Blue."),), (assistant("Go away."),))


def test_pku_saferlhf_keeps_both_dimensions_together(tmp_path):
    path = write_jsonl(tmp_path / "pku.jsonl", [
        {"prompt": "How do I pick a lock?", "response_0": "Use a pick and tension wrench.",
         "response_1": "I can't help with that.", "better_response_id": 0, "safer_response_id": 1,
         "is_response_0_safe": False, "is_response_1_safe": True},
    ])
    (group,) = read(path)
    assert isinstance(group, PreferenceGroup) and group.dimensions == ("helpfulness", "safety")
    assert group.pair("helpfulness") == PreferenceRecord("How do I pick a lock?", "Use a pick and tension wrench.",
                                                         "I can't help with that.", dimension="helpfulness")
    assert group.pair("safety") == PreferenceRecord("How do I pick a lock?", "I can't help with that.",
                                                    "Use a pick and tension wrench.", dimension="safety")


def test_ultrafeedback_binarized_margin_is_the_score_gap(tmp_path):
    convo = [{"role": "user", "content": "Sky?"}]
    path = write_jsonl(tmp_path / "ufb.jsonl", [
        {"prompt": "Sky?", "prompt_id": "x", "chosen": convo + [{"role": "assistant", "content": "Blue."}],
         "rejected": convo + [{"role": "assistant", "content": "Green."}], "score_chosen": 9.0,
         "score_rejected": 6.5, "messages": convo + [{"role": "assistant", "content": "Blue."}]},
    ])
    assert read(path) == [PreferenceRecord((user("Sky?"),), (assistant("Blue."),), (assistant("Green."),), margin=2.5)]


def _completion(response, **ratings):
    return {"response": response, "model": "m", "annotations": {
        aspect: {"Rating": rating, "Rationale": "..."} for aspect, rating in ratings.items()}}


def test_ultrafeedback_one_pair_per_separating_aspect(tmp_path):
    path = write_jsonl(tmp_path / "uf.json", [
        {"instruction": "Name a color.", "completions": [
            _completion("Blue.", helpfulness="4", honesty="5", instruction_following=3, truthfulness="N/A"),
            _completion("Rock.", helpfulness="2", honesty="5", instruction_following=1, truthfulness="3"),
            _completion("Red.", helpfulness="4", honesty="5", instruction_following=5),
        ]},
    ])
    (group,) = read(path)
    # helpfulness: best 4 (first in order: Blue.) vs worst 2; honesty ties -> no pair;
    # instruction_following: Red. (5) vs Rock. (1); truthfulness: a single rating -> no pair.
    assert group == PreferenceGroup((
        PreferenceRecord("Name a color.", "Blue.", "Rock.", margin=2.0, dimension="helpfulness"),
        PreferenceRecord("Name a color.", "Red.", "Rock.", margin=4.0, dimension="instruction_following"),
    ))


def test_openai_preferences_text_and_token_ids(tmp_path):
    text = write_json(tmp_path / "labels.json", [
        {"query": "The sky is", "sample0": " blue", "sample1": " green", "sample2": " a", "sample3": " b", "best": 2},
    ])
    assert read(text) == [BestOfNRecord("The sky is", (" blue", " green", " a", " b"), best=2)]

    source = make_tiny_tokenizer()
    ids = lambda s: source(s)["input_ids"]  # noqa: E731
    pad = 50259
    tokens = write_json(tmp_path / "offline_5k.json", [
        {"query": [pad, pad] + ids("The sky is"), "sample0": ids(" blue") + [pad], "sample1": ids(" green"),
         "best": 1},
    ])
    assert read(tokens, source_tokenizer=source) == [BestOfNRecord("The sky is", (" blue", " green"), best=1)]
    with pytest.raises(DataError, match=r"offline_5k.json, record 1, field 'query': holds token ids; pass source_tok"):
        read_records(tokens)


def test_scored_conversations_map_speakers_to_roles(tmp_path):
    path = write_jsonl(tmp_path / "scored.jsonl", [
        {"conversation": [{"role": "human", "content": "I have a headache."},
                          {"role": "assistant", "content": "Drink water and rest."}],
         "meta_eval_score": 4.5, "score_reason": "Safe and helpful."},
    ])
    assert read(path) == [ScoredConversation((user("I have a headache."), assistant("Drink water and rest.")), 4.5,
                                             "Safe and helpful.")]


def test_medical_qa_appends_the_answer(tmp_path):
    path = write_jsonl(tmp_path / "medqa.jsonl", [
        {"conversations": [{"from": "system", "value": "You are a doctor."},
                           {"from": "human", "value": "Is aspirin safe?"}], "answer": "Usually, in low doses.",
         "score": 3},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
    ])
    assert read(path) == [
        ScoredConversation((Message("system", "You are a doctor."), user("Is aspirin safe?"),
                            assistant("Usually, in low doses.")), 3.0),
        ScoredConversation((user("Hi"), assistant("Hello!")), None),
    ]


def test_sharegpt_preference_pairs_with_message_replies(tmp_path):
    path = write_jsonl(tmp_path / "sharegpt_dpo.jsonl", [
        {"conversations": [{"from": "human", "value": "Sky?"}], "chosen": {"from": "gpt", "value": "Blue."},
         "rejected": [{"from": "gpt", "value": "Green."}]},
        {"conversations": [{"from": "human", "value": "Sky?"}], "chosen": "Blue.", "rejected": "Red."},
    ])
    assert read(path) == [
        PreferenceRecord((user("Sky?"),), (assistant("Blue."),), (assistant("Green."),)),
        PreferenceRecord((user("Sky?"),), (assistant("Blue."),), (assistant("Red."),)),
    ]


def test_json_array_json_lines_named_json_and_datasets_objects_agree(tmp_path):
    rows = [{"prompt": "The sky is", "completion": " blue."}, {"prompt": "Grass is", "completion": " green."}]
    expected = [SFTRecord("The sky is", " blue."), SFTRecord("Grass is", " green.")]
    assert read(write_json(tmp_path / "array.json", rows)) == expected
    assert read(write_jsonl(tmp_path / "lines.json", rows)) == expected  # datasets' to_json writes JSON Lines
    records, report = read_records(datasets.Dataset.from_list(rows))
    assert records == expected and records[1].origin.record == 2


def test_format_override_and_limit(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3)
    records, report = read_records(path, format="preference", limit=2)
    assert len(records) == 2 and report.kept == 2
    # A format that does not fit names the first field it would lose, or the field it misses.
    with pytest.raises(DataError, match=r"pairs.jsonl, line 1, field 'chosen': is a field of .*preference.*, not of "
                                        r"sft \(completion, messages, prompt, score, text\)") as caught:
        read_records(path, format="sft")
    assert caught.value.reason == Reason.FOREIGN_FIELD
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "p"}])
    with pytest.raises(DataError, match=r"prompts.jsonl, line 1, field 'completion': missing"):
        read_records(prompts, format="sft")


def test_undetectable_format_lists_the_fields_and_formats(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"odd.jsonl, line 1: cannot tell the format from the fields \['answer', 'q"):
        read_records(path)
    with pytest.raises(ValueError, match="unknown format 'hh'"):
        read_records(path, format="hh")


# Detection reads the union of the first records' fields; parsers refuse records that lack a field of
# their format or carry one of another format: a mixed or mis-detected file is an error, never a silent loss.
SKY = [{"from": "human", "value": "Sky?"}]


@pytest.mark.parametrize("first, rest, expected, missing", [
    ({"prompt": "Q1", "chosen": " a"}, {"prompt": "Q", "chosen": " a", "rejected": " b"},
     PreferenceRecord("Q", " a", " b"), "rejected"),
    ({"prompt": "Q1", "completion": " a"}, {"prompt": "Q", "completion": " a", "label": False},
     UnpairedRecord("Q", " a", False), "label"),
    ({"conversations": SKY, "chosen": "Blue."}, {"conversations": SKY, "chosen": "Blue.", "rejected": "Red."},
     PreferenceRecord((user("Sky?"),), (assistant("Blue."),), (assistant("Red."),)), "rejected"),
])
def test_a_first_record_lacking_a_field_does_not_decide_the_format(tmp_path, first, rest, expected, missing):
    path = write_jsonl(tmp_path / "data.jsonl", [first, rest, rest])
    with pytest.raises(DataError, match=rf"data.jsonl, line 1, field '{missing}': missing") as caught:
        read_records(path)
    assert caught.value.reason == Reason.MISSING_FIELD
    records, report = read_records(path, on_error="skip")
    assert records == [expected, expected] and report.kept == 2 and report.skipped == {"missing_field": 1}


def test_records_that_mix_formats_are_refused_not_truncated(tmp_path):
    # Every one of the first records lacks 'rejected': only prompt_only would match, and it would drop 'chosen'.
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q", "chosen": " a"}] * 3)
    with pytest.raises(DataError, match=r"pairs.jsonl, line 1, field 'chosen': is a field of .*preference.*, but "
                                        r"the fields of the first 3 records \['chosen', 'prompt'\] only make "
                                        r"complete prompt_only records") as caught:
        read_records(pairs, on_error="skip")  # a whole-source error: never skipped
    assert caught.value.reason == Reason.FOREIGN_FIELD
    # A KTO row after the detection window of SFT rows: its label would be lost under sft.
    rows = [{"prompt": "Q", "completion": " a"}] * DETECTION_RECORDS + [{"prompt": "Q", "completion": " b",
                                                                         "label": False}]
    kto = write_jsonl(tmp_path / "kto.jsonl", rows)
    with pytest.raises(DataError, match=rf"kto.jsonl, line {DETECTION_RECORDS + 1}, field 'label': is a field of "
                                        r"unpaired, not of sft"):
        read_records(kto)
    records, report = read_records(kto, on_error="skip")
    assert len(records) == DETECTION_RECORDS and report.skipped == {"foreign_field": 1}
    # Null fields count as absent (datasets fills missing columns with None).
    table = datasets.Dataset.from_list([{"prompt": "Q", "completion": " a", "label": None}] * 2)
    assert read(table) == [SFTRecord("Q", " a")] * 2


@pytest.mark.parametrize("fmt, row, field, problem", [
    ("medical_qa", {"conversations": SKY, "chosen": "Blue.", "rejected": "Red."}, "chosen",
     "is a field of sharegpt_preference, ultrafeedback_binarized, hh_rlhf, preference, not of medical_qa"),
    ("hh_rlhf", {"prompt": "Sky?", "chosen": "\n\nHuman: Sky?\n\nAssistant: Blue.",
                 "rejected": "\n\nHuman: Sky?\n\nAssistant: Red."}, "prompt", "is a field of .*, not of hh_rlhf"),
    ("preference", {"prompt": "Sky?", "chosen": " Blue.", "rejected": " Red.", "score": 3}, "score",
     "is a field of medical_qa, sft, not of preference"),
    ("sft", {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
             "completion": "Yo"}, "messages", "beside 'completion': an sft record holds prompt \\+ completion, "
                                              "messages, or text, not several"),
    ("sft", {"text": "Once upon a time.", "prompt": "Once"}, "prompt", "beside 'text'"),
])
def test_parsers_refuse_fields_they_would_lose(tmp_path, fmt, row, field, problem):
    path = write_jsonl(tmp_path / "data.jsonl", [row])
    with pytest.raises(DataError, match=rf"data.jsonl, line 1, field '{field}': {problem}") as caught:
        read_records(path, format=fmt)
    assert caught.value.reason == Reason.FOREIGN_FIELD


def test_sft_prompt_beside_messages_must_repeat_them_and_scores_are_read(tmp_path):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ultrachat = write_jsonl(tmp_path / "ultrachat.jsonl", [
        {"prompt": "Hi", "prompt_id": "x", "messages": messages},
        {"prompt": messages[:1], "messages": messages, "score": 2},
    ])
    assert read(ultrachat) == [SFTRecord((), (user("Hi"), assistant("Hello"))),
                               SFTRecord((), (user("Hi"), assistant("Hello")), score=2.0)]
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "Bye", "messages": messages}])
    with pytest.raises(DataError, match=r"other.jsonl, line 1, field 'prompt': is not the start of 'messages'"):
        read_records(other)


def test_openai_samples_must_be_numbered_without_gaps(tmp_path):
    path = write_json(tmp_path / "labels.json", [{"query": "q", "sample0": " a", "sample1": " b", "sample3": " d",
                                                  "best": 0}])
    with pytest.raises(DataError, match=r"labels.json, record 1, field 'sample3': is given but 'sample2' is missing"):
        read_records(path)
