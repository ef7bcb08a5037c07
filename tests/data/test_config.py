"""DataConfig validation and file -> batches for the multi-response formats, with the tiny tokenizer."""

import dataclasses
import json

import numpy as np
import pytest

from jaxalign.data import DataConfig, DataError, build_batches, build_dataset, read_prompt_file
from tests.data.conftest import EOS_NEWLINE, GENERATION_PROMPT, IM_END, chatml, ids, write_jsonl


def test_config_validates_and_serialises():
    config = DataConfig("x.jsonl", buckets=[8, 16], batch_size=4)
    assert config.max_length == 16 and config.buckets == (8, 16)
    assert json.loads(json.dumps(dataclasses.asdict(config)))["buckets"] == [8, 16]
    with pytest.raises(ValueError, match="max_length 32 exceeds the largest bucket 16"):
        DataConfig("x.jsonl", buckets=(8, 16), max_length=32)
    with pytest.raises(ValueError, match="packing needs max_length"):
        DataConfig("x.jsonl", packing=True)
    with pytest.raises(ValueError, match="on_error must be one of"):
        DataConfig("x.jsonl", on_error="ignore")
    with pytest.raises(ValueError, match="unknown format 'pku'"):
        DataConfig("x.jsonl", format="pku")
    with pytest.raises(ValueError, match="conversation_style must be one of"):
        DataConfig("x.jsonl", conversation_style="chatml")
    with pytest.raises(ValueError, match="DataConfig: batch_size must be a positive int, got 0"):
        DataConfig("x.jsonl", batch_size=0)
    with pytest.raises(ValueError, match="DataConfig: dimension must be a dimension's name, got ''"):
        DataConfig("x.jsonl", dimension="")


def test_dimension_needs_grouped_data(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "The sky is", "chosen": " blue", "rejected": " green"}])
    with pytest.raises(ValueError, match=r"data.dimension='safety' picks one dimension of grouped preference data "
                                         r"\(PKU-SafeRLHF, UltraFeedback\); .*pairs.jsonl holds PreferenceRecord"):
        build_dataset(DataConfig(str(path), dimension="safety"), tiny_tokenizer)


@pytest.mark.parametrize("name", ["prompts.ndjson", "PROMPTS.JSONL", "prompts.jsonl.gz"])
def test_prompt_files_by_suffix_in_any_case(tmp_path, name):
    path = write_jsonl(tmp_path / name, [{"prompt": "Say hi."}, {"prompt": "Say bye."}])
    assert [record.prompt for record in read_prompt_file(path)] == ["Say hi.", "Say bye."]
    text = tmp_path / "prompts.txt"
    text.write_text("Say hi.\n\n  \nSay bye.\n")
    assert [(record.prompt, record.origin.line) for record in read_prompt_file(text)] == [("Say hi.", 1),
                                                                                          ("Say bye.", 4)]
    with pytest.raises(FileNotFoundError, match=r"--prompts .*missing.txt: no such file"):
        read_prompt_file(tmp_path / "missing.txt", option="--prompts")
    table = tmp_path / "prompts.csv"
    table.write_text("prompt\nSay hi.\n")
    with pytest.raises(DataError, match=r"prompts.csv: a .csv file: jaxalign reads JSON Lines or JSON"):
        read_prompt_file(table)


def test_pku_saferlhf_file_to_group_batches(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "pku.jsonl", [
        {"prompt": "Hi", "response_0": "yes", "response_1": "no", "better_response_id": 0, "safer_response_id": 1},
        {"prompt": "What", "response_0": "a", "response_1": "b", "better_response_id": 1, "safer_response_id": 1},
    ])
    config = DataConfig(str(path), batch_size=2, shuffle=False, text_as_chat=True, pad_to_multiple_of=8)
    batches = build_batches(config, tiny_tokenizer)
    batch = next(batches)
    assert batches.dataset.dimensions == ("helpfulness", "safety")
    assert batch["input_ids"].shape == (2, 2, 2, 16) and batch["pair_mask"].tolist() == [[1, 1], [1, 1]]
    prompt = chatml("user", "Hi") + GENERATION_PROMPT
    helpful_chosen, safe_chosen = batch["input_ids"][0, 0, 0], batch["input_ids"][0, 1, 0]
    np.testing.assert_array_equal(helpful_chosen[:12], prompt + ids("yes") + EOS_NEWLINE)
    np.testing.assert_array_equal(safe_chosen[:12], prompt + ids("no") + EOS_NEWLINE)
    assert [r.stage for r in batches.dataset.reports] == ["read", "tokenize"]


def test_openai_preferences_file_to_best_of_n_batches(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "labels.jsonl", [
        {"query": "The sky is", "sample0": " blue", "sample1": " green", "sample2": " a", "sample3": " b", "best": 1},
    ] * 3)
    batch = next(build_batches(DataConfig(str(path), batch_size=2, seed=1), tiny_tokenizer))
    assert batch["input_ids"].shape == (2, 4, 8) and batch["best"].tolist() == [1, 1]
    np.testing.assert_array_equal(batch["input_ids"][0, 1], ids("The", " ", "sky", " ", "is", " ", "green") + [IM_END])
    np.testing.assert_array_equal(batch["loss_mask"][0, 1], [0] * 5 + [1] * 3)


def test_scored_conversations_for_score_conditioned_sft_and_rewards(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "scored.jsonl", [
        {"conversation": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "yes"}],
         "meta_eval_score": 4, "score_reason": "fine"},
        {"conversation": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "no"}],
         "meta_eval_score": 1, "score_reason": "rude"},
    ])
    dataset = build_dataset(DataConfig(str(path), score_template="{score:g}"), tiny_tokenizer)
    conditioned = dataset.examples[0].sequences[0]
    # The score becomes the system message "4" (a word the tiny vocabulary lacks: <unk>).
    prompt = [2, 8, 4, 0, IM_END, 4] + chatml("user", "Hi") + GENERATION_PROMPT
    assert conditioned.ids.tolist() == prompt + ids("yes") + EOS_NEWLINE and conditioned.prompt_length == len(prompt)
    batch = next(build_batches(DataConfig(str(path), batch_size=2, shuffle=False, packing=True, max_length=32,
                                          drop_last=False),
                               tiny_tokenizer))
    # Packed: both conversations share one row; the score is per token, each segment its own.
    assert batch["segment_ids"][0].max() == 2
    scores = batch["score"][0][batch["attention_mask"][0] == 1]
    np.testing.assert_array_equal(np.unique(scores), [1.0, 4.0])


def test_skipping_reports_flow_through_the_pipeline(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Hi", "chosen": " yes", "rejected": " no"},
        {"prompt": "Hi", "chosen": " yes"},
        {"prompt": "a b c d e f", "chosen": " yes", "rejected": " no"},
    ])
    config = DataConfig(str(path), on_error="skip", max_length=12, max_prompt_length=8, batch_size=1)
    dataset = build_dataset(config, tiny_tokenizer)
    read, tokenized = dataset.reports
    assert (read.kept, read.skipped) == (2, {"missing_field": 1})
    assert (tokenized.kept, tokenized.skipped) == (1, {"prompt_too_long": 1})


def test_progress_bar_shows_rate_and_eta(tmp_path, tiny_tokenizer, capsys):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Hi", "completion": " yes"}] * 3)
    build_dataset(DataConfig(str(path)), tiny_tokenizer, progress=True)
    err = capsys.readouterr().err
    assert "tokenizing" in err and "rec/s" in err and "<" in err  # tqdm: "elapsed<remaining, rate"
