"""Host-side prompt batches: left padding, checks, and the bucketed static shapes the engine compiles for.

The compiled loop's shapes are ``[batch bucket, length bucket]`` prompts and ``max_new_tokens`` responses, so
prompts of any length up to a bucket, in batches of any size up to a bucket, reuse one program. Padding
columns go on the left (the last slot of every row is then its last prompt token, where decoding starts)
and padding rows have no real token at all (they generate nothing and are dropped from the output).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Without explicit buckets, prompt lengths round up to 16, 24, 32, 48, 64, 96, ... (powers of two and their
# midpoints): the prefill, a large share of a short rollout's time, pads at most 1.5x, and prompts up to
# 4096 tokens need 17 programs at most. Batch sizes round up to powers of two.
MIN_LENGTH_BUCKET = 16


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token-id lists as a left-padded ``[B, max length]`` int32 batch and its 0/1 mask.

    Raises:
        ValueError: no sequences.
    """
    if not sequences:
        raise ValueError("no prompts to pad")
    length = max(len(s) for s in sequences)
    tokens = np.full((len(sequences), length), pad_token_id, np.int32)
    mask = np.zeros((len(sequences), length), np.int32)
    for row, sequence in enumerate(sequences):
        if len(sequence):
            tokens[row, length - len(sequence):] = sequence
            mask[row, length - len(sequence):] = 1
    return tokens, mask


def check_left_padded(mask: np.ndarray) -> None:
    """Raise unless every row of ``mask [B, P]`` is zeros then ones (left padding, no holes).

    Decoding continues from each row's last slot, so a right-padded prompt would continue from padding.
    """
    mask = np.asarray(mask).astype(bool)
    # Left padded: once a row has a real token, every later slot is real.
    seen_real = np.maximum.accumulate(mask, axis=1)
    bad = np.flatnonzero((seen_real & ~mask).any(axis=1))
    if bad.size:
        raise ValueError(f"prompt row {int(bad[0])} is not left-padded (its mask has a 0 after a 1): pad "
                         "prompts on the left, e.g. with jaxalign.rollout.left_pad or a prompt-only "
                         "jaxalign.data batch")


def bucket(size: int, buckets: Sequence[int] | None, *, minimum: int = 1, multiple: int = 1,
           half_octaves: bool = False, what: str = "size") -> int:
    """The smallest bucket ``>= size``, rounded up to a multiple of ``multiple`` (the data-parallel devices).

    The bucket comes from ``buckets`` when given; otherwise it is the next power of two ``>= max(size,
    minimum)``, or with ``half_octaves`` the next of ``2^k`` and ``1.5·2^k``.

    Raises:
        ValueError: ``size`` exceeds the largest explicit bucket.
    """
    if buckets:
        fitting = [b for b in sorted(buckets) if b >= size]
        if not fitting:
            raise ValueError(f"{what} {size} exceeds the largest bucket {max(buckets)}; add a larger bucket")
        chosen = fitting[0]
    else:
        size = max(size, minimum)
        chosen = 1 << (size - 1).bit_length()
        if half_octaves and chosen >= 4 and 3 * chosen // 4 >= size:
            chosen = 3 * chosen // 4
    return -(-chosen // multiple) * multiple


def pad_batch(tokens: np.ndarray, mask: np.ndarray, *, rows: int, length: int,
              pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``[B, P]`` left-padded prompts grown to ``[rows, length]``: padding columns on the left, padding rows
    (no real token) at the bottom."""
    batch, width = tokens.shape
    out_tokens = np.full((rows, length), pad_token_id, np.int32)
    out_mask = np.zeros((rows, length), np.int32)
    out_tokens[:batch, length - width:] = np.where(mask.astype(bool), tokens, pad_token_id)
    out_mask[:batch, length - width:] = mask
    return out_tokens, out_mask
