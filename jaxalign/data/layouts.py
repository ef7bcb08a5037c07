"""How a method wants its sequences laid out in a batch: the shared prompt of a pair, and the target slots.

Two options a method sets on its dataset (:meth:`~jaxalign.data.TokenizedDataset.batched_as`); both are
exact, they only change the work:

- **shared prompts** (preference pairs): one row per pair, ``[prompt, chosen completion, rejected completion]``,
  with ``branch_ids`` 0 / 1 / 2 (the model's shared-prefix mask, :mod:`jaxalign.models.masks`: each
  completion sees the prompt and itself, never the other) and each completion's positions continuing from
  the prompt's end. The prompt runs through the model once per pair instead of twice. The shared part is the
  longest common prefix of the two sequences within both prompts (normally the whole prompt; less when the
  tokenizer merged a token across the prompt's end differently, and nothing when the prompts differ).
- **target slots**: ``source_slots`` / ``target_slots`` ``[B, *layout, K]``: for each loss target of a
  sequence (its completion tokens, as ``loss_mask``), the slot of the token it is and the slot of the token
  before it in its own sequence, whose hidden state predicts it; 0 where there is none (slot 0 is never a
  target). ``K`` is static per batch (the data loader pads it as it pads ``T``), so the LM head and its
  log-softmax run on ``[N, K]`` gathered hidden states instead of every position
  (:func:`jaxalign.models.scoring.slot_logps`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxalign.data.truncation import TokenSequence


def target_count(sequence: TokenSequence) -> int:
    """Loss targets of a sequence: its completion tokens, never the first token (as ``loss_mask``)."""
    return len(sequence) - max(sequence.prompt_length, 1)


def shared_prefix(chosen: TokenSequence, rejected: TokenSequence) -> int:
    """How many leading tokens a pair's two sequences share inside both prompts."""
    limit = min(chosen.prompt_length, rejected.prompt_length, len(chosen), len(rejected))
    differ = np.flatnonzero(chosen.ids[:limit] != rejected.ids[:limit])
    return int(differ[0]) if differ.size else limit


def shared_length(chosen: TokenSequence, rejected: TokenSequence) -> int:
    """Slots of a pair's shared-prompt row: the prefix once and both continuations."""
    return len(chosen) + len(rejected) - shared_prefix(chosen, rejected)


def target_slot_arrays(sequences: Sequence[TokenSequence | None], offsets: Sequence[int], width: int,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """``(source_slots, target_slots)`` ``[len(sequences), width]`` of sequences that sit unshared at
    ``offsets`` of their row (0 each in an unpacked batch): targets ``j`` and sources ``j − 1``."""
    sources = np.zeros((len(sequences), width), np.int32)
    targets = np.zeros((len(sequences), width), np.int32)
    for index, (sequence, offset) in enumerate(zip(sequences, offsets, strict=True)):
        if sequence is None:
            continue
        slots = offset + np.arange(max(sequence.prompt_length, 1), len(sequence))
        targets[index, :len(slots)] = slots
        sources[index, :len(slots)] = slots - 1
    return sources, targets


def collate_shared_pairs(pairs: Sequence[tuple[TokenSequence, TokenSequence] | None], length: int, targets: int,
                         pad_token_id: int) -> dict[str, np.ndarray]:
    """Token arrays of shared-prompt rows (None: an all-padding row), ``S = length`` slots, ``K = targets``.

    Returns ``input_ids``, ``attention_mask``, ``positions``, ``branch_ids`` ``[B, S]`` and ``source_slots``,
    ``target_slots`` ``[B, 2, K]`` (index 0 chosen).
    """
    batch = len(pairs)
    out = {"input_ids": np.full((batch, length), pad_token_id, np.int32)}
    for name in ("attention_mask", "positions", "branch_ids"):
        out[name] = np.zeros((batch, length), np.int32)
    out["source_slots"] = np.zeros((batch, 2, targets), np.int32)
    out["target_slots"] = np.zeros((batch, 2, targets), np.int32)
    for row, pair in enumerate(pairs):
        if pair is None:
            continue
        prefix = shared_prefix(*pair)
        out["input_ids"][row, :prefix] = pair[0].ids[:prefix]
        out["positions"][row, :prefix] = np.arange(prefix)
        start = prefix
        for side, sequence in enumerate(pair):
            # slot_of[j]: where token j of this sequence sits in the row (the prefix is shared).
            slot_of = np.concatenate([np.arange(prefix), start + np.arange(len(sequence) - prefix)])
            span = slice(start, start + len(sequence) - prefix)
            out["input_ids"][row, span] = sequence.ids[prefix:]
            out["positions"][row, span] = np.arange(prefix, len(sequence))
            out["branch_ids"][row, span] = side + 1
            wanted = np.arange(max(sequence.prompt_length, 1), len(sequence))
            out["target_slots"][row, side, :len(wanted)] = slot_of[wanted]
            out["source_slots"][row, side, :len(wanted)] = slot_of[wanted - 1]
            start = span.stop
        out["attention_mask"][row, :start] = 1
    return out
