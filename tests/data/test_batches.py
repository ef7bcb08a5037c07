"""Typed batches: each kind's loader output is its struct, its shape annotations checked at run time; a
malformed batch is an error naming the field; the structs are mappings and JAX pytrees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.data import (
    BatchIterator,
    BestOfNRecord,
    CandidateBatch,
    GroupBatch,
    PairBatch,
    PreferenceGroup,
    PreferenceRecord,
    PromptBatch,
    PromptRecord,
    SequenceBatch,
    SFTRecord,
    UnpairedRecord,
    tokenize,
)

RECORDS = {
    SequenceBatch: [SFTRecord("a", " b c"), SFTRecord("b", " c d e")],
    PromptBatch: [PromptRecord("a b"), PromptRecord("c")],
    PairBatch: [PreferenceRecord("a", " b", " c d", margin=1.0), PreferenceRecord("b", " c d", " e", margin=2.0)],
    GroupBatch: [PreferenceGroup((PreferenceRecord("a", " b", " c", dimension="help"),
                                  PreferenceRecord("a", " c", " b", dimension="safe")))] * 2,
    CandidateBatch: [BestOfNRecord("a", (" b", " c d", " e"), best=1),
                     BestOfNRecord("b", (" c", " d", " e f"), best=2)],
}


@pytest.mark.parametrize("struct", list(RECORDS), ids=lambda s: s.__name__)
def test_each_kind_yields_its_checked_struct(tiny_tokenizer, struct):
    batch = next(BatchIterator(tokenize(RECORDS[struct], tiny_tokenizer), batch_size=2))
    assert type(batch) is struct
    assert batch.check() is batch
    assert batch["input_ids"].shape[0] == 2 and "input_ids" in batch and batch.get("segment_ids") is None
    assert set(dict(batch)) == set(batch)


def test_unpaired_records_are_sequence_batches_with_labels(tiny_tokenizer):
    records = [UnpairedRecord("a", " b", True), UnpairedRecord("b", " c", False)]
    batch = next(BatchIterator(tokenize(records, tiny_tokenizer), batch_size=2))
    assert type(batch) is SequenceBatch and batch["label"].tolist() == [1, 0]


def _pairs(B=3, T=5, **changes):
    arrays = {name: np.zeros((B, 2, T), np.int32) for name in ("input_ids", "attention_mask", "positions", "loss_mask")}
    arrays["example_mask"] = np.ones(B, np.int32)
    return {**arrays, **changes}


@pytest.mark.parametrize("changes, message", [
    ({"loss_mask": np.zeros((3, 2, 6), np.int32)},
     r"PairBatch\.loss_mask: expected int \[B 2 T\], got int32 \(3, 2, 6\) \(consistent with input_ids \(3, 2, 5\)"),
    ({"input_ids": np.zeros((3, 5), np.int32)}, r"PairBatch\.input_ids: expected int \[B 2 T\], got int32 \(3, 5\)"),
    ({"example_mask": np.ones(4, np.int32)}, r"PairBatch\.example_mask: expected int \[ ?B\], got int32 \(4,\)"),
    ({"ref_logps": np.zeros((3, 2), np.int32)}, r"PairBatch\.ref_logps: expected float \[B 2\] or absent"),
    ({"features": np.zeros((2, 7), np.float32)}, r"PairBatch\.extra\['features'\]: expected 3 rows"),
])
def test_a_malformed_batch_names_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        PairBatch.from_arrays(_pairs(**changes)).check()


def test_a_missing_array_is_named():
    arrays = _pairs()
    del arrays["loss_mask"]
    with pytest.raises(ValueError, match=r"PairBatch: missing array\(s\) \['loss_mask'\]"):
        PairBatch.from_arrays(arrays)


def test_structs_are_pytrees_and_mappings():
    batch = PairBatch.from_arrays(_pairs(features=np.ones((3, 4), np.float32))).check()
    assert batch.extra.keys() == {"features"} and "features" in batch and "margin" not in batch
    doubled = jax.jit(lambda b: jax.tree.map(lambda x: x * 2, b))(batch)
    assert type(doubled) is PairBatch and float(jnp.sum(doubled["features"])) == 24.0
    subset = batch.select(np.array([2, 0]))
    assert type(subset) is PairBatch and subset["input_ids"].shape == (2, 2, 5) and subset.check() is subset
