"""LLMDoctor token-level rewards from a patient model's behavioural variants (arXiv 2601.10416).

This is the paper's first stage, "token-level reward acquisition". The frozen "patient" LM scores the
*same* response twice: once behind a prompt that asks for the desired behaviour ("positive face") and once
behind one that asks for the opposite ("negative face"). Tokens whose log-likelihood moves most between the
two faces are the ones that carry the preference; they receive a reward whose sign is the human label of the
response. These rewards train the TFPO doctor (:mod:`jaxalign.losses.tfpo`).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from jaxalign.losses.core import F32, as_mask, masked_mean

__all__ = ["token_importance", "token_rewards"]


def token_importance(
    pos_logps: Float[Array, "B T"],
    neg_logps: Float[Array, "B T"],
    mask: Array | None = None,
    *,
    eps: float = 1e-8,
    tau: float = 1.0,
) -> Float[Array, "B T"]:
    """Importance ``S_t ∈ [0, 1)`` of each response token: how much the two behavioural faces disagree on it.

    Formula (per response, over its valid tokens j)::

        Δ_t = |log π_pos(y_t | x_pos, y_<t) − log π_neg(y_t | x_neg, y_<t)|
        Δ̂_t = Δ_t / (mean_j Δ_j + ε)
        S_t = tanh(Δ̂_t / τ)

    The mean normalisation makes ``S`` invariant to a common scale of the log-probability gaps (up to ε),
    so responses of different lengths and styles share one threshold in :func:`token_rewards`.

    Args:
        pos_logps: ``[B, T]`` per-token log-probs of the response under the positive-face prompt
            (from :func:`jaxalign.losses.core.token_logps`).
        neg_logps: ``[B, T]`` log-probs of the *same* response tokens under the negative-face prompt.
        mask: ``[B, T]`` response mask (1 on response tokens); padding may hold anything, NaN included.
        eps: ``ε ≥ 0`` in the denominator.
        tau: temperature ``τ > 0`` of the tanh squashing.

    Returns:
        ``[B, T]`` float32 importances, 0 at masked positions (and everywhere in a response whose gaps are
        all 0).

    References:
        Shen et al. 2026, LLMDoctor (arXiv 2601.10416), token-level reward acquisition (the gap Δ_t, its
        mean-normalised Δ̂_t and the tanh-smoothed S_t).

    Notes:
        - The two faces see different prompts, so the caller aligns the response tokens of both passes
          (same ``[B, T]`` positions); only the response's own tokens are scored.
        - With ``ε = 0`` a response whose gaps are all 0 would give 0/0; it returns 0 instead.
        - Differentiable, but in LLMDoctor both inputs come from the frozen patient: the result is data.
    """
    if eps < 0:
        raise ValueError(f"token_importance: eps must be >= 0, got {eps}")
    if tau <= 0:
        raise ValueError(f"token_importance: tau must be > 0, got {tau}")
    pos = jnp.asarray(pos_logps, F32)
    neg = jnp.asarray(neg_logps, F32)
    valid = as_mask(mask, pos)
    gap = jnp.abs(jnp.where(valid, pos, 0.0) - jnp.where(valid, neg, 0.0))
    denominator = masked_mean(gap, valid, axis=-1)[:, None] + eps
    positive = denominator > 0
    normalised = jnp.where(positive, gap / jnp.where(positive, denominator, 1.0), 0.0)
    return jnp.where(valid, jnp.tanh(normalised / tau), 0.0)


def token_rewards(
    importance: Float[Array, "B T"],
    preferred: Bool[Array, " B"],
    mask: Array | None = None,
    *,
    threshold: float = 0.1,
) -> Float[Array, "B T"]:
    """Sparse, signed token rewards: the importance of the tokens above a threshold, signed by the label.

    Formula::

        r_t = sign(y)·S_t·1[S_t > θ],   sign(y) = +1 for the preferred response, −1 for the rejected one

    Args:
        importance: ``[B, T]`` importances ``S_t`` from :func:`token_importance`; masked slots may hold
            anything, NaN included.
        preferred: ``[B]`` bool, True where the response is the human-preferred one of its pair.
        mask: ``[B, T]`` response mask (None: all valid).
        threshold: sparsity threshold ``θ`` (strict ``>``, as in the paper).

    Returns:
        ``[B, T]`` float32 rewards in ``(−1, 1)``, 0 at masked and sub-threshold tokens.

    Raises:
        ValueError: if ``importance`` is not ``[B, T]`` or ``preferred`` not ``[B]`` (which also catches a
            call with the mask before ``preferred``).

    References:
        Shen et al. 2026, LLMDoctor (arXiv 2601.10416), token-level reward acquisition (the directional,
        sparsity-thresholded reward r_t).

    Notes:
        The paper's ``sign(y)`` is the binary human preference; a pair therefore gives two rows, the chosen
        response with ``preferred=True`` and the rejected one with ``preferred=False``.
    """
    importance = jnp.asarray(importance, F32)
    preferred = jnp.asarray(preferred, bool)
    if importance.ndim != 2 or preferred.shape != importance.shape[:1]:
        raise ValueError(
            f"token_rewards: expected importance [B, T] and preferred [B], got {tuple(importance.shape)} and "
            f"{tuple(preferred.shape)} (the argument order is importance, preferred, mask)"
        )
    valid = as_mask(mask, importance)
    sign = jnp.where(preferred, 1.0, -1.0)[:, None]
    return jnp.where(valid & (importance > threshold), sign * importance, 0.0)
