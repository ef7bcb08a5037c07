"""Positions and attention masks for padded, packed and cached batches.

Two index spaces are kept apart on purpose:

- **slots**: where a token sits in the sequence / KV cache (``0..S-1``). Causality and the sliding window
  are defined on slots, as in transformers (whose masks use cache positions).
- **positions**: the RoPE position of a token, counting only real tokens of its own sequence. With left
  padding a row's first real token has position 0 although it sits in a later slot.

Two ways to put several sequences in one row:

- **segments** (``segment_ids``, packing): sequences one after the other, each attending only to itself.
- **branches** (``branch_ids``, a shared prefix): branch 0 is a prefix every token of the row sees; the
  tokens of branch ``k > 0`` see the prefix and the earlier tokens of branch ``k``, never another branch.
  ``[prompt, chosen, rejected]`` with ids ``0, 1, 2`` computes the prompt once for both continuations, and
  each continuation's hidden states are those of ``prompt + continuation`` on its own (its positions
  continue from the prompt's end). Causality stays on slots, so a branch's tokens must follow the prefix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int


def derive_positions(
    attention_mask: Bool[Array, "B T"],
    segment_ids: Int[Array, "B T"] | None = None,
    *,
    offset: Int[Array, " B"] | None = None,
    branch_ids: Int[Array, "B T"] | None = None,
) -> Int[Array, "B T"]:
    """RoPE positions from the mask: ``offset + cumsum(mask) − 1``, clipped at 0.

    A real token's position is the number of real tokens before it in its row (and in its segment when
    ``segment_ids`` is given: positions restart at each segment boundary, for packed sequences). This is
    what transformers' ``generate`` uses for left-padded prompts and equals ``arange(T)`` on the real
    tokens of a right-padded batch. Padding gets a meaningless but valid position.

    Args:
        attention_mask: ``[B, T]``, true (1) for real tokens.
        segment_ids: optional ``[B, T]`` ids; a boundary is wherever the id changes between neighbours.
        offset: optional ``[B]`` number of real tokens already consumed (the KV cache's next position).
        branch_ids: optional ``[B, T]`` branch of each token (0: the shared prefix, see the module notes): a
            token counts only the real tokens it can see, so a branch's positions continue from the prefix.

    Returns:
        ``[B, T]`` int32 positions.
    """
    if branch_ids is not None:
        # Count the real tokens each query may see (itself included): the attention mask's row sums. O(T²)
        # integer work, negligible beside the attention it sets up.
        slots = jnp.arange(attention_mask.shape[1])
        visible = _visible_keys(attention_mask.astype(bool), slots, query_segments=segment_ids,
                                 key_segments=segment_ids, query_branches=branch_ids, key_branches=branch_ids)
        seen = jnp.sum(visible, axis=-1, dtype=jnp.int32)
        if offset is not None:
            seen = seen + offset[:, None].astype(jnp.int32)
        return jnp.maximum(seen - 1, 0)
    real = attention_mask.astype(jnp.int32)
    seen = jnp.cumsum(real, axis=1)  # real tokens up to and including t
    if segment_ids is not None:
        starts = jnp.concatenate(
            [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
        )
        # Real tokens seen before the current segment began; cummax carries the latest start forward
        # because the count never decreases.
        before_segment = jax.lax.cummax(jnp.where(starts, seen - real, 0), axis=1)
        seen = seen - before_segment
    if offset is not None:
        seen = seen + offset[:, None].astype(jnp.int32)
    return jnp.maximum(seen - 1, 0)


def attention_mask(
    key_valid: Bool[Array, "B S"],
    query_slots: Int[Array, " T"],
    *,
    query_segments: Int[Array, "B T"] | None = None,
    key_segments: Int[Array, "B S"] | None = None,
    sliding_window: int | None = None,
    query_branches: Int[Array, "B T"] | None = None,
    key_branches: Int[Array, "B S"] | None = None,
) -> Bool[Array, "B T S"]:
    """Which keys each query may attend to: real, not in the future, same segment, visible branch, inside
    the window.

    Formula: ``m[b,t,s] = valid[b,s] ∧ s ≤ q_t ∧ (s > q_t − W) ∧ seg[b,t] = seg[b,s] ∧ (br[b,s] = 0 ∨
    br[b,s] = br[b,t])`` with ``q_t`` the query's slot and ``W`` the sliding window (transformers' Mistral
    convention: a window of ``W`` sees the current token and the ``W − 1`` before it). The window counts
    slots, which with branches would span the other branches' slots: the models refuse branches with a window.

    A padded query may see no key at all; the attention then softmaxes a row of equal large negative
    scores (uniform weights, finite output), never a row of ``-inf`` (NaN).

    Args:
        key_valid: ``[B, S]`` true where the key slot holds a real token.
        query_slots: ``[T]`` slot of each query (``cache_index + arange(T)`` when decoding).
        query_segments, key_segments: optional ``[B, T]`` / ``[B, S]`` segment ids (packed sequences).
        sliding_window: optional window size ``W``.
        query_branches, key_branches: optional ``[B, T]`` / ``[B, S]`` branch ids (a shared prefix, 0, and
            continuations that do not see each other; see the module notes).

    Returns:
        ``[B, T, S]`` boolean mask.
    """
    key_slots = jnp.arange(key_valid.shape[1])
    allowed = key_slots[None, :] <= query_slots[:, None]  # [T, S]
    if sliding_window is not None:
        allowed = allowed & (key_slots[None, :] > query_slots[:, None] - sliding_window)
    mask = key_valid[:, None, :] & allowed[None]
    if query_segments is not None:
        mask = mask & (query_segments[:, :, None] == key_segments[:, None, :])
    if query_branches is not None:
        mask = mask & ((key_branches[:, None, :] == 0) | (query_branches[:, :, None] == key_branches[:, None, :]))
    return mask


# derive_positions' argument ``attention_mask`` shadows the function inside it.
_visible_keys = attention_mask
