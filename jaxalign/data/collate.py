"""Tokenised examples to a batch: a dict of NumPy int32/float32 arrays of static shape.

Token arrays are ``[B, *layout, T]`` (layout ``()``, ``(2,)`` with index 0 chosen, ``(D, 2)`` or ``(N,)``):

- ``input_ids``: token ids, ``pad_token_id`` on padding.
- ``attention_mask``: 1 on real tokens.
- ``loss_mask``: 1 on the tokens that are training targets: the completion tokens (its EOS included),
  never a sequence's first token (nothing precedes it) and never padding. It is aligned with
  ``input_ids``: a causal LM's targets are ``input_ids[..., 1:]`` and their mask is
  ``loss_mask[..., 1:]`` (``sft_loss(logits[:, :-1], input_ids[:, 1:], loss_mask[:, 1:])``).
  Prompt-only batches have none.
- ``positions``: RoPE positions, counting the real tokens of the sequence from 0 (0 on padding); with
  left padding a row's first real token is at position 0 although it sits in a later slot.
- ``segment_ids`` (packed batches only): 1, 2, ... per packed sequence, 0 on padding; positions restart
  at every segment and a token attends only within its segment (the model's ``segment_ids``).
- ``source_slots`` / ``target_slots`` ``[B, *layout, K]`` (datasets batched with compact targets): each loss
  target's slot and the slot that predicts it, 0 on padding (:mod:`jaxalign.data.layouts`).

Pairs batched with shared prompts are one row per pair instead, ``[B, S]`` (``input_ids``,
``attention_mask``, ``positions``, ``branch_ids``) with ``source_slots``/``target_slots`` ``[B, 2, K]`` and
no ``loss_mask`` (the target slots are the loss mask); see :mod:`jaxalign.data.layouts`.

Right padding for every training kind; left padding for prompt-only batches (generation appends on the
right). Per-example arrays: ``example_mask [B]`` (0 on rows that only pad a partial final batch) and,
depending on the kind, ``score [B]`` (packed: ``[B, T]``, each token its sequence's score), ``margin [B]``
or ``[B, D]``, ``label [B]`` (1 desirable), ``best [B]``, ``pair_mask [B, D]`` (0 where a group has no
pair on a dimension), ``candidate_mask [B, N]`` and, once a trainer has attached them with
:meth:`TokenizedDataset.with_values`, ``ref_logps [B, *layout]`` (a DPO reference's log-probabilities), or
with :meth:`TokenizedDataset.with_token_values`, ``token_rewards [B, *layout, T]`` (LLMDoctor's token rewards,
one per token, aligned with ``input_ids``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from jaxalign.data.layouts import collate_shared_pairs, target_slot_arrays
from jaxalign.data.tokenize import TOKEN_VALUES, TokenizedDataset

FLOAT_VALUES = ("score", "margin", "ref_logps", "difficulty")


def _value_shape(dataset: TokenizedDataset, key: str) -> tuple[int, ...]:
    if key == "pair_mask" or (key == "margin" and dataset.kind == "preference_group"):
        return (len(dataset.dimensions),)
    return dataset.layout if key in ("candidate_mask", "ref_logps") else ()


def collate(dataset: TokenizedDataset, rows: Sequence[int | None], length: int, targets: int | None = None,
            ) -> dict[str, np.ndarray]:
    """The batch of ``dataset.examples[i]`` for each ``i`` of ``rows`` (None: an all-padding row), ``T = length``.

    A dataset batched with shared prompts gives one ``[B, S]`` row per pair (``S = length``), and one with
    compact targets adds ``source_slots``/``target_slots`` ``[B, *layout, K]`` (``K = targets``, at least each
    sequence's target count; see :mod:`jaxalign.data.layouts`).
    """
    if (dataset.share_prompts or dataset.compact_targets) and targets is None:
        raise ValueError("collate: a dataset batched with shared prompts or compact targets needs `targets` (K)")
    if dataset.share_prompts:
        if any(key in TOKEN_VALUES for key in dataset.value_keys):
            raise ValueError(f"collate: per-token values {list(dataset.value_keys)} need one row per sequence; "
                             "batch this dataset without shared prompts")
        pairs = [None if index is None else dataset.examples[index].sequences for index in rows]
        out = collate_shared_pairs(pairs, length, targets, dataset.pad_token_id)
        out["example_mask"] = np.asarray([index is not None for index in rows], np.int32)
        out.update(_values(dataset, rows, length, left=False))
        return out
    batch, slots = len(rows), math.prod(dataset.layout)
    left = dataset.kind == "prompt"
    input_ids = np.full((batch, slots, length), dataset.pad_token_id, np.int32)
    attention_mask = np.zeros((batch, slots, length), np.int32)
    loss_mask = np.zeros((batch, slots, length), np.int32)
    positions = np.zeros((batch, slots, length), np.int32)
    for row, index in enumerate(rows):
        if index is None:
            continue
        for slot, sequence in enumerate(dataset.examples[index].sequences):
            if sequence is None:
                continue
            size = len(sequence)
            start = length - size if left else 0
            span = slice(start, start + size)
            input_ids[row, slot, span] = sequence.ids
            attention_mask[row, slot, span] = 1
            positions[row, slot, span] = np.arange(size)
            loss_mask[row, slot, start + max(sequence.prompt_length, 1):start + size] = 1
    shape = (batch, *dataset.layout, length)
    out = {"input_ids": input_ids.reshape(shape), "attention_mask": attention_mask.reshape(shape),
           "positions": positions.reshape(shape)}
    if not left:
        out["loss_mask"] = loss_mask.reshape(shape)
    out["example_mask"] = np.asarray([index is not None for index in rows], np.int32)
    if dataset.compact_targets:
        sequences = []
        for index in rows:
            sequences.extend((None,) * slots if index is None else dataset.examples[index].sequences)
        sources, target_slots = target_slot_arrays(sequences, [0] * len(sequences), targets)
        out["source_slots"] = sources.reshape(batch, *dataset.layout, targets)
        out["target_slots"] = target_slots.reshape(batch, *dataset.layout, targets)
    out.update(_values(dataset, rows, length, left))
    return out


def _values(dataset: TokenizedDataset, rows: Sequence[int | None], length: int, left: bool) -> dict[str, np.ndarray]:
    """The per-example (and per-token) values of ``rows``: ``{key: [B, ...]}``."""
    out, batch = {}, len(rows)
    for key in dataset.value_keys:
        if key in TOKEN_VALUES:
            out[key] = _token_values(dataset, key, rows, length, left)
            continue
        values = np.zeros((batch, *_value_shape(dataset, key)), np.float32 if key in FLOAT_VALUES else np.int32)
        for row, index in enumerate(rows):
            if index is not None:
                values[row] = dataset.examples[index].values.get(key, 0)
        out[key] = values
    return out


def _token_values(dataset: TokenizedDataset, key: str, rows: Sequence[int | None], length: int,
                  left: bool) -> np.ndarray:
    """``[B, *layout, T]`` float32: each sequence's per-token values where its tokens sit, 0 elsewhere."""
    values = np.zeros((len(rows), math.prod(dataset.layout), length), np.float32)
    for row, index in enumerate(rows):
        if index is None:
            continue
        for slot, per_token in enumerate(dataset.examples[index].values[key]):
            if per_token is not None:
                start = length - len(per_token) if left else 0
                values[row, slot, start:start + len(per_token)] = per_token
    return values.reshape(len(rows), *dataset.layout, length)


def collate_packed(dataset: TokenizedDataset, rows: Sequence[Sequence[int]], length: int) -> dict[str, np.ndarray]:
    """A packed SFT batch: row ``b`` holds ``dataset.examples[i]`` for each ``i`` of ``rows[b]``, in order.

    Returns ``[B, T]`` arrays with ``segment_ids``; ``score`` (when present) is per token, ``[B, T]``.
    """
    batch = len(rows)
    input_ids = np.full((batch, length), dataset.pad_token_id, np.int32)
    arrays = {name: np.zeros((batch, length), np.int32)
              for name in ("attention_mask", "loss_mask", "positions", "segment_ids")}
    score = np.zeros((batch, length), np.float32)
    for row, indices in enumerate(rows):
        offset = 0
        for segment, index in enumerate(indices, start=1):
            example = dataset.examples[index]
            (sequence,) = example.sequences
            size = len(sequence)
            span = slice(offset, offset + size)
            input_ids[row, span] = sequence.ids
            arrays["attention_mask"][row, span] = 1
            arrays["positions"][row, span] = np.arange(size)
            arrays["segment_ids"][row, span] = segment
            # The segment's first token is never a target: it must not be predicted from the previous segment.
            arrays["loss_mask"][row, offset + max(sequence.prompt_length, 1):offset + size] = 1
            score[row, span] = example.values.get("score", 0.0)
            offset += size
    out = {"input_ids": input_ids, **arrays, "example_mask": np.asarray([bool(r) for r in rows], np.int32)}
    if "score" in dataset.value_keys:
        out["score"] = score
    return out
