"""Batching: deterministic epoch-aware shuffling, per-process shards, static shapes, packing, exact resume."""

import json

import numpy as np
import pytest

from jaxalign.data import BatchIterator, PreferenceRecord, SFTRecord, epoch_order, tokenize

WORDS = "abcdef"


def _text(n: int, offset: int) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n))


@pytest.fixture(scope="module")
def sft(tiny_tokenizer):
    """13 SFT examples of 4 to 16 tokens (prompt "a" + a completion of 1..7 words + EOS)."""
    records = [SFTRecord("a", " " + _text(1 + i % 7, i)) for i in range(13)]
    return tokenize(records, tiny_tokenizer)


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _example_ids(dataset, batch):
    """The dataset index of every real row of an unpacked SFT batch (by matching its tokens)."""
    by_tokens = {tuple(e.sequences[0].ids.tolist()): i for i, e in enumerate(dataset.examples)}
    rows = []
    for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
        if mask.any():
            rows.append(by_tokens[tuple(ids[mask.astype(bool)].tolist())])
    return rows


def _same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_shuffling_is_deterministic_per_seed_and_epoch(sft):
    order = lambda seed, epoch: epoch_order(len(sft), seed=seed, epoch=epoch).tolist()  # noqa: E731
    assert order(0, 0) == order(0, 0) and sorted(order(0, 0)) == list(range(len(sft)))
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    assert epoch_order(5, seed=0, epoch=3, shuffle=False).tolist() == [0, 1, 2, 3, 4]

    first = BatchIterator(sft, batch_size=4, seed=7, drop_last=False, num_epochs=2)
    second = BatchIterator(sft, batch_size=4, seed=7, drop_last=False, num_epochs=2)
    batches = list(first)
    for a, b in zip(batches, second, strict=True):
        _same(a, b)
    assert len(batches) == 2 * first.steps_per_epoch == 8
    for epoch in range(2):
        seen = [i for batch in batches[4 * epoch:4 * epoch + 4] for i in _example_ids(sft, batch)]
        assert seen == order(7, epoch)  # every example once per epoch, in the epoch's order
    assert batches[3]["example_mask"].tolist() == [1, 0, 0, 0]  # the padded end of an epoch


def test_drop_last_leaves_out_the_incomplete_batch(sft):
    iterator = BatchIterator(sft, batch_size=4, seed=0, num_epochs=1)
    assert iterator.steps_per_epoch == 3 and len(list(iterator)) == 3
    with pytest.raises(ValueError, match="13 examples make no complete global batch of 16 rows"):
        next(BatchIterator(sft, batch_size=8, process_count=2))


def test_processes_take_disjoint_slices_of_the_same_global_batch(sft):
    whole = BatchIterator(sft, batch_size=6, seed=3, buckets=(8, 12, 16))
    shards = [BatchIterator(sft, batch_size=3, seed=3, buckets=(8, 12, 16), process_index=p, process_count=2)
              for p in range(2)]
    for _ in range(4):  # crosses an epoch boundary (2 global batches per epoch)
        global_batch = next(whole)
        parts = [next(shard) for shard in shards]
        assert parts[0]["input_ids"].shape == parts[1]["input_ids"].shape  # every host agrees on T
        for key in global_batch:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), global_batch[key], err_msg=key)


@pytest.mark.parametrize("options", [dict(batch_size=2), dict(batch_size=2, buckets=(8, 16)),
                                     dict(batch_size=1, pack_length=16), dict(batch_size=2, drop_last=False)])
def test_resume_mid_epoch_equals_the_uninterrupted_run(sft, options):
    uninterrupted = _take(BatchIterator(sft, seed=11, **options), 14)  # crosses into the second epoch
    interrupted = BatchIterator(sft, seed=11, **options)
    _take(interrupted, 4)
    state = json.loads(json.dumps(interrupted.state_dict()))  # what a checkpoint stores
    assert state["epoch"] == 0 and 0 < state["position"] < len(sft)
    resumed = BatchIterator(sft, seed=11, **options)
    resumed.load_state_dict(state)
    for expected, actual in zip(uninterrupted[4:], _take(resumed, 10), strict=True):
        _same(expected, actual)


def test_resume_refuses_other_data_or_seed(sft, tiny_tokenizer):
    state = BatchIterator(sft, batch_size=2, seed=1).state_dict()
    with pytest.raises(ValueError, match="the state's seed 1 differs"):
        BatchIterator(sft, batch_size=2, seed=2).load_state_dict(state)
    other = tokenize([SFTRecord("a", " b")] * 4, tiny_tokenizer)
    with pytest.raises(ValueError, match="the state's fingerprint .* differs"):
        BatchIterator(other, batch_size=2, seed=1).load_state_dict(state)


def test_buckets_and_multiples_give_only_the_configured_shapes(sft):
    iterator = BatchIterator(sft, batch_size=2, seed=0, buckets=(6, 10, 16), drop_last=False, num_epochs=3)
    lengths = {next(iter(b.values())).shape[-1] for b in iterator}
    assert lengths <= {6, 10, 16} and len(lengths) > 1 and iterator.shapes == (6, 10, 16)
    for batch in BatchIterator(sft, batch_size=2, seed=0, buckets=(6, 10, 16), num_epochs=1):
        longest = batch["attention_mask"].sum(-1).max()
        assert batch["input_ids"].shape[-1] == min(b for b in (6, 10, 16) if b >= longest)
    multiples = BatchIterator(sft, batch_size=3, seed=0, pad_to_multiple_of=5, num_epochs=2)
    assert {b["input_ids"].shape[-1] for b in multiples} <= {5, 10, 15, 20} == set(multiples.shapes)
    fixed = BatchIterator(sft, batch_size=3, seed=0, num_epochs=1)
    assert {b["input_ids"].shape for b in fixed} == {(3, 16)} and fixed.shapes == (16,)
    with pytest.raises(ValueError, match="the longest sequence has 16 tokens, more than the largest bucket 12"):
        BatchIterator(sft, batch_size=2, buckets=(8, 12))


def test_packing_places_every_sequence_once_with_restarting_positions(sft):
    iterator = BatchIterator(sft, batch_size=2, seed=5, pack_length=20, drop_last=False, num_epochs=1)
    seen = []
    for batch in iterator:
        assert batch["input_ids"].shape == (2, 20)
        for row in range(2):
            segments = batch["segment_ids"][row]
            for segment in range(1, segments.max() + 1):
                span = np.flatnonzero(segments == segment)
                assert (np.diff(span) == 1).all()  # contiguous
                tokens = batch["input_ids"][row, span].tolist()
                index = next(i for i, e in enumerate(sft.examples) if e.sequences[0].ids.tolist() == tokens)
                sequence = sft.examples[index].sequences[0]
                seen.append(index)
                np.testing.assert_array_equal(batch["positions"][row, span], np.arange(len(span)))
                # Loss on the completion only, never on the segment's first token.
                untrained = max(sequence.prompt_length, 1)
                expected_mask = [0] * untrained + [1] * (len(span) - untrained)
                np.testing.assert_array_equal(batch["loss_mask"][row, span], expected_mask)
            padding = segments == 0
            assert not batch["attention_mask"][row, padding].any() and not batch["loss_mask"][row, padding].any()
    assert sorted(seen) == list(range(len(sft)))  # each sequence exactly once per epoch


def test_packing_fills_rows_first_fit_in_shuffled_order(tiny_tokenizer):
    # Lengths 4, 8, 6, 4 (prompt "a", completion words + EOS) into rows of 10, two rows per batch.
    records = [SFTRecord("a", " b"), SFTRecord("a", " b c d"), SFTRecord("a", " b c"), SFTRecord("a", " d")]
    dataset = tokenize(records, tiny_tokenizer)
    assert dataset.lengths.tolist() == [4, 8, 6, 4]
    batch = next(BatchIterator(dataset, batch_size=2, shuffle=False, pack_length=10))
    # 0 -> row 0 (space 6); 1 -> row 1 (space 2); 2 -> row 0 (space 0); 3 fits nowhere: opens the next batch.
    assert batch["segment_ids"].tolist() == [[1] * 4 + [2] * 6, [1] * 8 + [0] * 2]


def test_packing_and_sizes_are_validated(sft, tiny_tokenizer):
    pairs = tokenize([PreferenceRecord("a", " b", " c")] * 2, tiny_tokenizer)
    with pytest.raises(ValueError, match="packing applies to SFT datasets, not 'preference'"):
        BatchIterator(pairs, batch_size=1, pack_length=8)
    with pytest.raises(ValueError, match="more than pack_length=8"):
        BatchIterator(sft, batch_size=1, pack_length=8)
    with pytest.raises(ValueError, match="at most one of buckets, pad_to_multiple_of and pack_length"):
        BatchIterator(sft, batch_size=1, buckets=(16,), pad_to_multiple_of=8)
    with pytest.raises(ValueError, match="process_index 2 is not in"):
        BatchIterator(sft, batch_size=1, process_index=2, process_count=2)
    with pytest.raises(ValueError, match=r"buckets must be ascending positive lengths, got \(16, 8\)"):
        BatchIterator(sft, batch_size=1, buckets=(16, 8))
