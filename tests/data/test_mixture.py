"""Dataset mixtures (data.sources), de-duplication and the length filter: hand-computed orders, exact resume,
the counts of what was removed, and bad settings named in one line."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from jaxalign.data import (
    BatchIterator,
    DataConfig,
    DataError,
    LengthFilter,
    SourceSpec,
    build_batches,
    build_dataset,
    mixture_order,
)
from jaxalign.data.mixture import allocate, draws, interleave
from tests.data.conftest import write_jsonl


def sft_rows(prompt: str, completions: list[str]) -> list[dict]:
    return [{"prompt": prompt, "completion": completion} for completion in completions]


@pytest.fixture
def two_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", sft_rows("Hi", [" a", " b", " c", " d", " e", " f"]))
    b = write_jsonl(tmp_path / "b.jsonl", sft_rows("Go", [" a", " b", " c"]))
    return a, b


def test_counts_by_largest_remainder_never_zero():
    np.testing.assert_array_equal(allocate([3, 3], [2, 1]), [4, 2])
    # 10 examples at 1:1:1 -> 3.33 each: the remainder's one example goes to the first source (ties: earlier).
    np.testing.assert_array_equal(allocate([4, 3, 3], [1, 1, 1]), [4, 3, 3])
    # 0.5 / 10.5 / 0.... : a tiny weight still draws one example an epoch.
    np.testing.assert_array_equal(allocate([10, 1], [1000, 1]), [11, 1])
    assert allocate([7, 5], [0.3, 0.7]).tolist() == [4, 8]  # 12 x 0.3 = 3.6, 12 x 0.7 = 8.4


def test_interleaving_by_hand():
    # 4:2: draws of source 0 at 1/8, 3/8, 5/8, 7/8; of source 1 at 1/4, 3/4.
    assert interleave([4, 2]).tolist() == [0, 1, 0, 0, 1, 0]
    # 3:1: 1/6, 1/2, 5/6 and 1/2 -> the tie at 1/2 goes to the earlier source.
    assert interleave([3, 1]).tolist() == [0, 0, 1, 0]
    assert interleave([2, 2]).tolist() == [0, 1, 0, 1]
    assert interleave([1, 1, 2]).tolist() == [2, 0, 1, 2]  # 1/2, 1/2, 1/4 3/4


def test_every_stretch_of_an_epoch_holds_the_weights():
    slots = interleave([300, 100, 50])
    for start in range(0, len(slots) - 9, 9):
        window = np.bincount(slots[start:start + 9], minlength=3)
        np.testing.assert_allclose(window, [6, 2, 1], atol=1.0)


def test_mixture_order_by_hand_across_epochs():
    sources = np.array([0, 0, 0, 1, 1, 1])  # examples 0-2 from a, 3-5 from b
    # weights 2:1 over 6 examples: a gives 4 an epoch (its stream a0 a1 a2 a0 a1 ...), b gives 2 (b0 b1 b2 b0 ...)
    orders = [mixture_order(sources, [2.0, 1.0], seed=0, epoch=e, shuffle=False).tolist() for e in range(3)]
    assert orders == [[0, 3, 1, 2, 4, 0],   # a0 b0 a1 a2 b1 a0
                      [1, 5, 2, 0, 3, 1],   # a1 b2 a2 a0 b0 a1
                      [2, 4, 0, 1, 5, 2]]   # a2 b1 a0 a1 b2 a2


def test_shuffled_streams_draw_every_example_before_any_twice():
    stream = draws(5, 0, 15, seed=3, source=1, shuffle=True)
    for start in range(0, 15, 5):
        assert sorted(stream[start:start + 5]) == [0, 1, 2, 3, 4]
    assert stream[:5].tolist() != stream[5:10].tolist()  # each pass its own permutation
    # Any window of the stream is the same slice of it: what resuming an epoch relies on.
    np.testing.assert_array_equal(draws(5, 7, 6, seed=3, source=1, shuffle=True), stream[7:13])
    sources = np.repeat([0, 1], [5, 20])
    first = mixture_order(sources, [1.0, 1.0], seed=3, epoch=0)
    np.testing.assert_array_equal(first, mixture_order(sources, [1.0, 1.0], seed=3, epoch=0))
    assert not np.array_equal(first, mixture_order(sources, [1.0, 1.0], seed=4, epoch=0))
    # Weights 1:1 over 25 examples: 13 from the 5 of source 0 (every one at least twice), 12 of the 20 of source 1.
    counts = np.bincount(first, minlength=25)
    assert counts[:5].sum() == 13 and counts[:5].min() >= 2 and counts[5:].sum() == 12 and counts[5:].max() == 1


def test_config_reads_each_source_and_counts_per_source(two_files, tiny_tokenizer, caplog):
    a, b = two_files
    config = DataConfig(sources=[str(a), {"source": str(b), "weight": 3}], batch_size=4)
    assert config.sources == (SourceSpec(str(a)), SourceSpec(str(b), 3))
    with caplog.at_level(logging.WARNING, logger="jaxalign.data"):
        dataset = build_dataset(config, tiny_tokenizer)
    assert [e.source for e in dataset.examples] == [0] * 6 + [1] * 3
    assert [s.as_dict() for s in dataset.mixture] == [
        {"source": str(a), "weight": 1.0, "read": 6, "duplicates": 0, "too_short": 0, "too_long": 0, "skipped": 0,
         "examples": 6},
        {"source": str(b), "weight": 3.0, "read": 3, "duplicates": 0, "too_short": 0, "too_long": 0, "skipped": 0,
         "examples": 3}]
    # 9 examples at 1:3: 2 (2.25) from a, 7 (6.75) from b an epoch, logged with the passes that makes.
    assert f"{a}: read 6 -> 6 examples; weight 1 (25.0%), 2 per mixture epoch (0.33 passes)" in caplog.text
    assert f"{b}: read 3 -> 3 examples; weight 3 (75.0%), 7 per mixture epoch (2.33 passes)" in caplog.text
    batches = BatchIterator(dataset, batch_size=3, shuffle=False, drop_last=False)
    assert batches.epoch_length == 9 and batches.steps_per_epoch == 3
    sources = [int(dataset.examples[i].source) for i in batches.order(0)]
    assert sources == interleave([2, 7]).tolist() == [1, 1, 0, 1, 1, 1, 0, 1, 1]


def test_weights_as_one_list(two_files, tiny_tokenizer):
    a, b = two_files
    config = DataConfig(sources=[str(a), str(b)], weights=[1, 3])
    assert config.weights is None and [s.weight for s in config.sources] == [1, 3]
    assert config == DataConfig(sources=[{"source": str(a), "weight": 1}, {"source": str(b), "weight": 3}])
    assert config.name == f"{a} + {b}"


def run_batches(iterator, count):
    return [np.asarray(next(iterator)["input_ids"]).tolist() for _ in range(count)]


@pytest.mark.parametrize("stop_after", [1, 2, 5])
def test_resume_in_the_middle_of_a_mixture_gives_the_same_batches(two_files, tiny_tokenizer, stop_after):
    a, b = two_files
    config = DataConfig(sources=[str(a), {"source": str(b), "weight": 2}], batch_size=2, seed=7)
    uninterrupted = build_batches(config, tiny_tokenizer)
    expected = run_batches(uninterrupted, 9)  # 4 batches an epoch: runs into the third epoch
    first = build_batches(config, tiny_tokenizer)
    assert run_batches(first, stop_after) == expected[:stop_after]
    state = first.state_dict()
    # 4 batches of 2 an epoch; the 9th example of an epoch (dropped, drop_last) counts as drawn from its stream.
    assert state["mixture"]["sizes"] == [6, 3]
    assert sum(state["mixture"]["drawn"]) == 9 * state["epoch"] + state["position"] == 9 * (stop_after // 4) + 2 * (
        stop_after % 4)
    resumed = build_batches(config, tiny_tokenizer)
    resumed.load_state_dict(state)
    assert run_batches(resumed, 9 - stop_after) == expected[stop_after:]
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_resume_refuses_other_weights(two_files, tiny_tokenizer):
    a, b = two_files
    batches = build_batches(DataConfig(sources=[str(a), str(b)], batch_size=2), tiny_tokenizer)
    next(batches)
    other = build_batches(DataConfig(sources=[str(a), str(b)], weights=[1, 2], batch_size=2), tiny_tokenizer)
    with pytest.raises(ValueError, match=r"the state's mixture .*'weights': \[1.0, 1.0\].* differs from this "
                                         r"iterator's .*'weights': \[1.0, 2.0\]"):
        other.load_state_dict(batches.state_dict())
    plain = build_batches(DataConfig(str(a), batch_size=2), tiny_tokenizer)
    with pytest.raises(ValueError, match="fingerprint"):
        plain.load_state_dict(batches.state_dict())


def test_one_source_batches_as_before(two_files, tiny_tokenizer):
    """No mixture: the order, state and fingerprint of a plain source are unchanged by the mixture code."""
    a, _ = two_files
    dataset = build_dataset(DataConfig(str(a)), tiny_tokenizer)
    assert dataset.mixture == ()
    batches = BatchIterator(dataset, batch_size=2, seed=1)
    from jaxalign.data import epoch_order

    np.testing.assert_array_equal(batches.order(0), epoch_order(6, seed=1, epoch=0))
    assert set(batches.state_dict()) == {"epoch", "position", "seed", "shuffle", "fingerprint"}


def test_dedup_exact_and_by_prompt_across_sources(tmp_path, tiny_tokenizer, caplog):
    a = write_jsonl(tmp_path / "a.jsonl", [*sft_rows("Hi", [" a", " b", " a"]), *sft_rows("Go", [" c"])])
    b = write_jsonl(tmp_path / "b.jsonl", [*sft_rows("Hi", [" b", " d"]), *sft_rows("What", [" e"]),
                                           {"text": "The sky"}, {"text": "The sky"}, {"text": "is blue"}])
    with caplog.at_level(logging.WARNING, logger="jaxalign.data"):
        exact = build_dataset(DataConfig(sources=[str(a), str(b)], dedup="exact"), tiny_tokenizer)
    counts = [(s.counts["read"], s.counts["duplicates"], s.counts["examples"]) for s in exact.mixture]
    # a: the second "Hi a"; b: "Hi b" (in a already) and the second "The sky".
    assert counts == [(4, 1, 3), (6, 2, 4)]
    assert f"dedup {a}: kept 3 of 4 records" in caplog.text and "duplicates: 2" in caplog.text
    by_prompt = build_dataset(DataConfig(sources=[str(a), str(b)], dedup="prompt"), tiny_tokenizer)
    # a keeps one "Hi" and "Go"; b loses both "Hi"s, keeps "What"; text records have no prompt: compared whole.
    counts = [(s.counts["duplicates"], s.counts["examples"]) for s in by_prompt.mixture]
    assert counts == [(2, 2), (3, 3)]
    kept = [tiny_tokenizer.decode(e.sequences[0].ids) for e in by_prompt.examples]
    assert kept[:2] == ["Hi a<|im_end|>", "Go c<|im_end|>"]


def test_dedup_on_one_source_keeps_its_order(tmp_path, tiny_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", sft_rows("Hi", [" b", " a", " b", " c", " a"]))
    dataset = build_dataset(DataConfig(str(a), dedup="exact"), tiny_tokenizer)
    assert [tiny_tokenizer.decode(e.sequences[0].ids) for e in dataset.examples] == [
        "Hi b<|im_end|>", "Hi a<|im_end|>", "Hi c<|im_end|>"]
    assert dataset.mixture[0].counts["duplicates"] == 2
    # One source: the loader shuffles it as any dataset (no interleaving), over the kept examples.
    assert len(BatchIterator(dataset, batch_size=1).order(0)) == 3


def test_length_filter_counts_before_truncation(tmp_path, tiny_tokenizer, caplog):
    # Token counts (prompt + completion + EOS): "Hi" + " a" -> Hi, ' ', a, EOS = 4; each extra word adds 2.
    rows = sft_rows("Hi", [" a", " a b", " a b c", " a b c d e"])
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    lengths = build_dataset(DataConfig(str(path)), tiny_tokenizer).lengths.tolist()
    assert lengths == [4, 6, 8, 12]
    with caplog.at_level(logging.WARNING, logger="jaxalign.data"):
        dataset = build_dataset(DataConfig(str(path), max_length=6, filter={"min_length": 5, "max_length": 8}),
                                tiny_tokenizer)
    # Kept: 6 and 8 tokens (the 8 then truncated to max_length 6); 4 is too short, 12 too long.
    assert dataset.lengths.tolist() == [6, 6]
    assert dataset.report.notes["too_short"] == 1 and dataset.report.notes["too_long"] == 1
    assert dataset.report.truncated["completion"] == 1
    assert dict(dataset.mixture[0].counts) == {"read": 4, "duplicates": 0, "too_short": 1, "too_long": 1,
                                               "skipped": 0, "examples": 2}
    assert "too short 1, too long 1 -> 2 examples" in caplog.text
    # A prompt longer than max_length is an error unless the filter leaves its record out first.
    long_prompt = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "Hi Hi Hi Hi", "completion": " a"},
                                                        {"prompt": "Hi", "completion": " a"}])
    with pytest.raises(DataError, match="prompt_too_long|longer than|fill max_length"):
        build_dataset(DataConfig(str(long_prompt), max_length=6), tiny_tokenizer)
    kept = build_dataset(DataConfig(str(long_prompt), max_length=6, filter={"max_length": 6}), tiny_tokenizer)
    assert len(kept) == 1 and kept.report.notes["too_long"] == 1


def test_prompt_records_are_filtered_by_their_prompt(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}, {"prompt": "Hi Hi Hi"}])
    dataset = build_dataset(DataConfig(str(path), filter={"max_length": 2}), tiny_tokenizer)
    assert len(dataset) == 1 and dataset.report.notes["too_long"] == 1


def test_a_source_left_empty_is_named(two_files, tmp_path, tiny_tokenizer):
    a, _ = two_files
    copy = write_jsonl(tmp_path / "copy.jsonl", sft_rows("Hi", [" a", " b"]))
    with pytest.raises(DataError, match=rf"{copy}: every record was left out \(dedup {copy}: kept 0 of 2 records\s"
                                        r"notes: duplicates: 2\)"):
        build_dataset(DataConfig(sources=[str(a), str(copy)], dedup="exact"), tiny_tokenizer)
    with pytest.raises(DataError, match=rf"(?s){a}: every record was left out .*too_long: 6"):
        build_dataset(DataConfig(str(a), filter={"max_length": 2}), tiny_tokenizer)


@pytest.mark.parametrize("settings, message", [
    ({"source": "a.jsonl", "sources": ["b.jsonl"]}, r"give source \(one file\) or sources \(a mixture\), not both"),
    ({}, r"no data: give source \(one file\) or sources \(a mixture\)"),
    ({"source": ["a.jsonl", "b.jsonl"]}, r"source must be a file or dataset name, got \['a.jsonl', 'b.jsonl'\]; "
                                         r"mix several with sources: \[...\]"),
    ({"sources": []}, r"sources must be a list of one or more sources, got \[\]"),
    ({"sources": [{"source": "a.jsonl", "weight": 0}]}, r"data.sources\[0\].weight must be a positive number, got 0"),
    ({"sources": ["a.jsonl", {"source": "b.jsonl", "weight": -1.5}]},
     r"data.sources\[1\].weight must be a positive number, got -1.5"),
    ({"sources": [{"source": "a.jsonl", "weight": "heavy"}]}, r"sources\[0\].weight must be a positive number"),
    ({"sources": [{"weight": 2}]}, r"data.sources\[0\]: missing the key 'source'"),
    ({"sources": [{"source": "a.jsonl", "wieght": 2}]}, r"data.sources\[0\]: unknown key\(s\) \['wieght'\]"),
    ({"sources": ["a.jsonl", "b.jsonl"], "weights": [1]}, r"weights \[1\] do not match the 2 sources"),
    ({"sources": ["a.jsonl", "b.jsonl"], "weights": [1, 0]}, r"weights: weight must be a positive number, got 0"),
    ({"sources": [{"source": "a.jsonl", "weight": 2}, "b.jsonl"], "weights": [1, 1]},
     r"sources\[0\] gives its own weight and weights gives them all"),
    ({"source": "a.jsonl", "weights": [1]}, "weights are a mixture's"),
    ({"sources": [{"source": "a.jsonl", "format": "pku"}]}, "unknown format 'pku'"),
    ({"source": "a.jsonl", "dedup": "fuzzy"}, r"dedup must be one of exact, prompt or null, got 'fuzzy'"),
    ({"source": "a.jsonl", "filter": {"min_length": 9, "max_length": 4}},
     "filter.min_length 9 is above filter.max_length 4"),
    ({"source": "a.jsonl", "filter": {"min_length": 0}}, r"filter.min_length must be a positive number of tokens"),
    ({"source": "a.jsonl", "filter": {"max_tokens": 4}}, r"filter: unknown key\(s\) \['max_tokens'\]"),
])
def test_bad_settings_are_one_line_naming_the_field(settings, message):
    with pytest.raises(ValueError, match=message) as error:
        DataConfig(**settings)
    assert "\n" not in str(error.value) and str(error.value).startswith("DataConfig: ")


def test_length_filter_alone():
    assert LengthFilter(2, 5).verdict(1) == "too_short" and LengthFilter(2, 5).verdict(6) == "too_long"
    assert LengthFilter(2, 5).verdict(5) is None and LengthFilter(max_length=5).verdict(1) is None


def test_sources_of_different_kinds_are_named(two_files, tmp_path, tiny_tokenizer):
    a, _ = two_files
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Hi", "chosen": " a", "rejected": " b"}])
    with pytest.raises(ValueError, match=rf"data.sources mix kinds of records \({a}: sft; {pairs}: preference\)"):
        build_dataset(DataConfig(sources=[str(a), str(pairs)]), tiny_tokenizer)
