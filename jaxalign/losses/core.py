"""Log-probabilities, entropy and masked reductions: the primitives every loss is built from.

Conventions (see docs/architecture.md):

- Every function is pure and jittable; hyperparameters are keyword-only.
- Computation happens in float32 whatever the input dtype (bf16 logits are upcast inside the fused
  reductions, so no full-vocabulary float32 copy is kept).
- Masks are {0, 1} (bool or numeric) arrays broadcastable to the values; masked positions may hold any
  finite *or non-finite* value: reductions select with ``jnp.where`` instead of multiplying, so a NaN in a
  padded slot never leaks into a sum or its gradient.
- Reductions return ``(sum, count)`` so that micro-batching, gradient accumulation and sharding can
  combine partial results exactly: ``mean = Σ sums / Σ counts``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

F32 = jnp.float32

__all__ = [
    "AGGREGATIONS",
    "aggregate",
    "as_mask",
    "entropy",
    "masked_mean",
    "masked_sum",
    "safe_divide",
    "sequence_logps",
    "token_logps",
]


def as_mask(mask: Array | None, like: Array) -> Bool[Array, "..."]:
    """Return ``mask`` as a boolean array broadcast to ``like``'s shape (all-true when ``mask`` is None).

    Args:
        mask: {0, 1} or boolean array broadcastable to ``like``, or None.
        like: the array the mask applies to.

    Returns:
        boolean array of ``like.shape``.
    """
    if mask is None:
        return jnp.ones(like.shape, dtype=bool)
    return jnp.broadcast_to(jnp.asarray(mask).astype(bool), like.shape)


def safe_divide(numerator: Array, denominator: Array) -> Float[Array, "..."]:
    """``numerator / max(count, 1)`` for a *count* denominator: the mean of an empty selection is 0, not NaN.

    Only for counts (integers ≥ 0): a fractional denominator such as a sum of weights below 1 would be
    silently clamped to 1.

    Args:
        numerator: any shape.
        denominator: a count, broadcastable to ``numerator``.

    Returns:
        float32 quotient.
    """
    return jnp.asarray(numerator, F32) / jnp.maximum(jnp.asarray(denominator, F32), 1.0)


def masked_sum(
    values: Array, mask: Array | None = None, *, axis: int | tuple[int, ...] | None = None
) -> tuple[Float[Array, "..."], Float[Array, "..."]]:
    """Sum of ``values`` over the positions where ``mask`` is true, and how many there were.

    Formula: ``(Σ_i m_i·x_i, Σ_i m_i)`` over ``axis`` (all axes when None).

    Args:
        values: any shape; upcast to float32.
        mask: broadcastable to ``values``; None means every position is valid.
        axis: axes to reduce.

    Returns:
        ``(sum, count)``, both float32, with ``axis`` removed. Combine partial results across
        micro-batches or devices by adding sums and counts separately.
    """
    values = jnp.asarray(values, F32)
    mask = as_mask(mask, values)
    total = jnp.sum(jnp.where(mask, values, 0.0), axis=axis)
    count = jnp.sum(mask, axis=axis, dtype=F32)
    return total, count


def masked_mean(
    values: Array, mask: Array | None = None, *, axis: int | tuple[int, ...] | None = None
) -> Float[Array, "..."]:
    """Mean over valid positions: ``Σ m·x / max(Σ m, 1)`` (0 for an empty selection, never NaN).

    Args:
        values: any shape; upcast to float32.
        mask: broadcastable to ``values``; None means every position is valid.
        axis: axes to reduce (all when None).

    Returns:
        float32 mean with ``axis`` removed. For exact accumulation across micro-batches use
        :func:`masked_sum` and divide once at the end.
    """
    total, count = masked_sum(values, mask, axis=axis)
    return safe_divide(total, count)


def token_logps(
    logits: Float[Array, "... V"], targets: Int[Array, "..."], mask: Array | None = None
) -> Float[Array, "..."]:
    """Log-probability of each target token under ``softmax(logits)``, in float32.

    Formula: ``log p(y_t) = z_t[y_t] − m_t − log Σ_v exp(z_t[v] − m_t)`` with ``m_t = max_v z_t[v]``.

    This is the only place logits meet targets. The caller aligns them: for next-token prediction pass
    ``logits[:, :-1]`` with ``targets = tokens[:, 1:]``.

    Args:
        logits: ``[..., V]`` in any float dtype; upcast to float32 inside the reductions (XLA fuses the
            convert into the reduction, so no float32 copy of the full vocabulary is stored).
        targets: ``[...]`` integer token ids. Out-of-range ids (e.g. a ``-100`` ignore label or a pad id)
            are clipped into ``[0, V)`` so they yield a finite, meaningless value: mask them out.
        mask: optional ``[...]`` validity mask. Where it is 0 the logits are replaced by zeros *before* the
            log-softmax and the result is 0, so non-finite logits at padded positions (e.g. from fully
            masked attention rows) reach neither the value nor the gradient. Without a mask, every position
            must hold finite logits for the gradient to be finite.

    Returns:
        ``[...]`` float32 log-probabilities (≤ 0); 0 where ``mask`` is 0.

    Notes:
        Accuracy is absolute, not relative: float32 resolves ``log p`` to about 1e-7, so a very confident
        prediction (``log p ≈ −3e-7``) carries a large relative error. That is what importance ratios
        ``exp(log p − log p_old)`` need; perplexities of ~1 are not meaningful beyond that resolution.
    """
    vocab = logits.shape[-1]
    targets = jnp.clip(jnp.asarray(targets), 0, vocab - 1)
    valid = None if mask is None else as_mask(mask, targets)
    if valid is not None:
        logits = jnp.where(valid[..., None], logits, jnp.zeros((), logits.dtype))
    # Shifting by the row max (held constant: its gradient cancels) keeps exp() in range.
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True).astype(F32))
    log_normaliser = jnp.log(jnp.sum(jnp.exp(logits.astype(F32) - row_max), axis=-1))
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0].astype(F32)
    logps = target_logits - row_max[..., 0] - log_normaliser
    return logps if valid is None else jnp.where(valid, logps, 0.0)


def sequence_logps(
    token_logps: Float[Array, "B T"], mask: Array | None = None, *, average: bool = False
) -> Float[Array, " B"]:
    """Log-probability of each sequence: the masked sum over tokens (or its per-token mean).

    Formula: ``log π(y|x) = Σ_t m_t·log π(y_t|x, y_<t)``; with ``average=True``,
    ``Σ_t m_t·log π(y_t|·) / max(Σ_t m_t, 1)`` (the length-normalised score of SimPO / IPO-style losses).

    Args:
        token_logps: ``[B, T]`` per-token log-probabilities (from :func:`token_logps`).
        mask: ``[B, T]`` completion mask (1 for tokens that belong to the scored response).
        average: return the per-token mean instead of the sum.

    Returns:
        ``[B]`` float32.
    """
    total, count = masked_sum(token_logps, mask, axis=-1)
    return safe_divide(total, count) if average else total


def entropy(logits: Float[Array, "... V"]) -> Float[Array, "..."]:
    """Entropy of ``softmax(logits)`` at each position, in float32.

    Formula: ``H = logsumexp(z) − Σ_v softmax(z)_v·z_v``.

    Args:
        logits: ``[..., V]`` in any float dtype.

    Returns:
        ``[...]`` float32 entropies (nats, ≥ 0).
    """
    logits = logits.astype(F32)
    normaliser = jax.nn.logsumexp(logits, axis=-1)
    probs = jax.nn.softmax(logits, axis=-1)
    # A vocabulary entry masked with -inf has p = 0 and its true share p·z is 0. Replace z itself (not just
    # the product): otherwise the backward pass still forms 0·(−inf) = NaN and spreads it over the row.
    finite_logits = jnp.where(probs > 0, logits, 0.0)
    return normaliser - jnp.sum(probs * finite_logits, axis=-1)


#: The ``mode`` values of :func:`aggregate`: how per-token values of a batch reduce to one loss.
AGGREGATIONS = ("token_mean", "sequence_mean", "sequence_sum", "sequence_sum_normalized")


def aggregate(
    per_token: Float[Array, "B T"],
    mask: Array | None = None,
    *,
    mode: str = "token_mean",
    max_tokens: int | None = None,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Reduce a per-token loss to ``(sum, count)`` so that ``sum / count`` is the requested mean.

    Modes (``n_b = Σ_t m_bt``, ``B' = #{b : n_b > 0}``):

    - ``token_mean``: ``(Σ_bt m·x, Σ_bt m)`` — every token weighs the same (TRL SFT, DAPO, "bnpo").
    - ``sequence_mean``: ``(Σ_b Σ_t m·x / n_b, B')`` — mean over sequences of the per-sequence token
      mean (original GRPO "sequence-mean-token-mean"; SFT sequence-mean). Rows with no valid token are
      not counted (TRL's "grpo" divides by all B rows; the two agree when every row has a token).
    - ``sequence_sum``: ``(Σ_bt m·x, B')`` — per-sequence token *sum*, averaged over sequences.
    - ``sequence_sum_normalized``: ``(Σ_bt m·x, B·L)`` with the constant ``L = max_tokens`` (default
      ``T``) — Dr. GRPO's "sequence-mean-token-sum-normalised", which removes the length bias of
      ``sequence_mean`` (arXiv 2503.20783, Sec. 3.1).

    Because sums and counts add, ``Σ sums / Σ counts`` over micro-batches equals the full-batch value
    in every mode (for ``sequence_sum_normalized`` give the full batch's ``L``; ``B`` adds up).

    Args:
        per_token: ``[B, T]`` values.
        mask: ``[B, T]`` validity mask.
        mode: one of :data:`AGGREGATIONS`.
        max_tokens: the constant ``L`` of ``sequence_sum_normalized``.

    Returns:
        ``(sum, count)`` float32 scalars.
    """
    total_bt = jnp.asarray(per_token, F32)
    mask = as_mask(mask, total_bt)
    row_sum, row_count = masked_sum(total_bt, mask, axis=-1)
    valid_rows = jnp.sum(row_count > 0, dtype=F32)
    if mode == "token_mean":
        return jnp.sum(row_sum), jnp.sum(row_count)
    if mode == "sequence_mean":
        return jnp.sum(safe_divide(row_sum, row_count)), valid_rows
    if mode == "sequence_sum":
        return jnp.sum(row_sum), valid_rows
    if mode == "sequence_sum_normalized":
        length = total_bt.shape[-1] if max_tokens is None else max_tokens
        return jnp.sum(row_sum), jnp.asarray(total_bt.shape[0] * length, F32)
    raise ValueError(f"aggregate: unknown mode {mode!r}; expected one of {AGGREGATIONS}")
