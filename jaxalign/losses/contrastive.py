"""Contrastive representation learning: InfoNCE over pooled sequence states, with in-batch and hard negatives.

A prompt's representation (the *anchor*) should lie closer to its preferred response than to its rejected one
and to the other prompts' responses. The representations are pooled final hidden states
(:func:`pool_states`); the loss (:func:`contrastive_loss`) is SimCSE's supervised objective with hard
negatives, which is CLIP's cross-entropy over a similarity matrix extended by one hard negative per row.

Exactness: the loss of a row depends on the other rows of its batch (its in-batch negatives), so it is not a
sum of independent per-row terms. Under ``jax.jit`` over a sharded batch the similarity matrix is formed on the
*global* batch (XLA gathers the other devices' representations for the matmul), so a sharded step computes
exactly the single-device loss. Under gradient accumulation every micro-batch is its own batch: a row's
negatives are the responses of its micro-batch only. The accumulated value is then the mean of the per-row
losses with negatives drawn from each row's micro-batch (a block-diagonal candidate set), not the full-batch
loss; it is exact *for that definition* (``(sum, count)`` add up over micro-batches).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from jaxalign.losses.core import F32, as_mask, masked_mean

__all__ = ["POOLINGS", "contrastive_loss", "pool_states"]

#: How a sequence's hidden states become one vector: its last real token's, or their mean over the mask.
POOLINGS = ("last", "mean")


def pool_states(hidden: Float[Array, "R S D"], mask: Bool[Array, "R N S"], *, pooling: str = "last",
                ) -> Float[Array, "R N D"]:
    """One vector per sequence from the final hidden states of the rows that hold it, in float32.

    Formula: ``last``: ``h[r, max{s : m[r, n, s]}]`` (the state of the sequence's last marked token, which has
    read every token before it); ``mean``: ``Σ_s m[r, n, s]·h[r, s] / max(Σ_s m[r, n, s], 1)``.

    Args:
        hidden: ``[R, S, D]`` final hidden states of ``R`` rows of ``S`` slots.
        mask: ``[R, N, S]`` the slots of each of a row's ``N`` sequences to pool (a shared-prompt pair row holds
            ``N = 2``: its chosen and rejected completions). A sequence with no marked slot pools to zeros.
        pooling: ``last`` or ``mean``.

    Returns:
        ``[R, N, D]`` float32.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pool_states: pooling must be one of {POOLINGS}, got {pooling!r}")
    mask = jnp.asarray(mask).astype(bool)
    hidden = hidden.astype(F32)
    if pooling == "mean":
        weights = mask.astype(F32)
        total = jnp.einsum("rsd,rns->rnd", hidden, weights)
        return total / jnp.maximum(jnp.sum(weights, axis=-1), 1.0)[..., None]
    slots = jnp.arange(mask.shape[-1])
    last = jnp.max(jnp.where(mask, slots, -1), axis=-1)  # [R, N]; -1: nothing marked
    picked = jnp.take_along_axis(hidden, jnp.maximum(last, 0)[..., None], axis=1)  # [R, N, D]
    return jnp.where((last >= 0)[..., None], picked, 0.0)


def _unit(x: Array) -> Array:
    # A zero vector (a sequence with nothing to pool) stays zero instead of becoming NaN.
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), 1e-24))


def contrastive_loss(
    anchors: Float[Array, "B D"],
    positives: Float[Array, "B D"],
    negatives: Float[Array, "B D"] | None = None,
    mask: Array | None = None,
    *,
    temperature: float = 0.07,
    in_batch: bool = True,
    normalize: bool = True,
) -> tuple[Float[Array, " B"], dict[str, Float[Array, ""]]]:
    """InfoNCE of each anchor against its positive, with hard negatives and the other rows' responses as negatives.

    Formula (``s(u, v) = cos(u, v) / τ``; the dot product when ``normalize`` is False; ``a_i`` anchor,
    ``p_i`` positive, ``n_i`` hard negative of row ``i``; ``j`` over the valid rows of the batch)::

        ℓ_i = −log  exp s(a_i, p_i) / Σ_j [exp s(a_i, p_j) + exp s(a_i, n_j)]

    With ``in_batch=False`` the sum runs over ``j = i`` only: ``ℓ_i = log(1 + exp(s(a_i, n_i) − s(a_i, p_i)))``.
    Without ``negatives`` only the other rows' positives are negatives.

    Args:
        anchors: ``[B, D]`` the prompts' representations (any float dtype; computed in float32).
        positives: ``[B, D]`` each prompt's preferred (chosen) response.
        negatives: ``[B, D]`` each prompt's rejected response, or None.
        mask: ``[B]`` valid rows; an invalid row (batch padding) has loss 0 and is nobody's negative.
        temperature: τ > 0 (0.07: CLIP's initial value, SimCSE's 0.05).
        in_batch: use the other rows' responses as negatives (else only the row's own ``negatives``).
        normalize: compare unit vectors (cosine similarity, as CLIP and SimCSE); else raw dot products.

    Returns:
        ``(loss, metrics)``: ``loss`` ``[B]`` float32, 0 on invalid rows. Reduce with
        :func:`jaxalign.losses.masked_sum` over ``mask`` (exact under sharding; under gradient accumulation
        see the module docstring). Metrics (means over valid rows): ``loss``, ``accuracy`` (the positive scores
        above every negative), ``negatives`` (negatives per row), ``positive_similarity``,
        ``negative_similarity`` (mean over the row's negatives), and ``rows_without_negative`` (a count: such a
        row has a single candidate and loss exactly 0).

    Raises:
        ValueError: ``temperature`` is not a finite number > 0; or a batch of one row without ``negatives``
            (no negative at all: the loss would be 0 whatever the model does).

    References:
        van den Oord et al. 2018, "Representation Learning with Contrastive Predictive Coding" (arXiv 1807.03748,
        Eq. 4); Gao et al. 2021, SimCSE (arXiv 2104.08821, Eq. 5: supervised, with hard negatives);
        Radford et al. 2021, CLIP (arXiv 2103.00020, Fig. 3: the row-wise cross-entropy over the similarity
        matrix).

    Notes:
        SimCSE and CLIP assume every row of the batch is real; here padded rows are left out of every sum.
        CLIP's loss is symmetric (it adds the column-wise cross-entropy); this one is row-wise only, as SimCSE:
        a response is asked to be found from its prompt, not a prompt from its response. A single valid row
        with a hard negative is the pairwise (logistic) case, the documented fallback of a one-pair batch.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"contrastive_loss: temperature must be a finite number > 0, got {temperature!r}")
    batch = anchors.shape[0]
    if negatives is None and batch < 2:
        raise ValueError("contrastive_loss: a batch of one row without negatives has nothing to contrast (its "
                         "loss would be 0): give negatives (the rejected responses) or at least two rows")
    valid = as_mask(mask, anchors[:, 0])
    unit = _unit if normalize else (lambda x: x)
    a = unit(anchors.astype(F32))
    candidates = [unit(positives.astype(F32))]
    if negatives is not None:
        candidates.append(unit(negatives.astype(F32)))
    logits = jnp.concatenate([a @ c.T for c in candidates], axis=1) / temperature  # [B, C·B]
    own = jnp.eye(batch, dtype=bool)
    others = (valid[None, :] & ~own) if in_batch else jnp.zeros_like(own)
    # Column blocks: the positives (row i's own is the target, always a candidate), then the hard negatives.
    is_negative = jnp.concatenate([others] + [others | (own & valid[None, :])] * (len(candidates) - 1), axis=1)
    target = jnp.concatenate([own] + [jnp.zeros_like(own)] * (len(candidates) - 1), axis=1)
    positive = jnp.diagonal(logits[:, :batch])
    normaliser = jax.nn.logsumexp(logits, axis=1, where=is_negative | target)
    per = jnp.where(valid, normaliser - positive, 0.0)
    count = jnp.sum(is_negative, axis=1, dtype=F32)
    masked_logits = jnp.where(is_negative, logits, -jnp.inf)
    metrics = {
        "loss": masked_mean(per, valid),
        "accuracy": masked_mean(positive > jnp.max(masked_logits, axis=1), valid),
        "negatives": masked_mean(count, valid),
        "positive_similarity": masked_mean(positive * temperature, valid),
        "negative_similarity": masked_mean(jnp.sum(jnp.where(is_negative, logits, 0.0), axis=1) * temperature
                                           / jnp.maximum(count, 1.0), valid & (count > 0)),
        "rows_without_negative": jnp.sum(valid & (count == 0), dtype=F32),
    }
    return per, jax.tree.map(jax.lax.stop_gradient, metrics)
