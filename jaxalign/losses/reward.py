"""Reward-model objectives: Bradley–Terry pairs (optionally multi-dimensional), best-of-N choices, and regression
on scalar scores (squared error or a Gaussian likelihood).

A reward model maps (prompt, response) to a scalar (or to ``D`` scalars, one per preference dimension such as
helpfulness and harmlessness). These losses take those scalars, never the model.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxalign.losses.core import F32, as_mask, masked_mean, masked_sum

__all__ = ["REGRESSION_LOSSES", "best_of_n_loss", "bradley_terry_loss", "preference_accuracy", "regression_loss"]

#: The ``kind`` values of :func:`regression_loss`: squared error, or a Gaussian likelihood with a learned
#: log-variance.
REGRESSION_LOSSES = ("mse", "gaussian_nll")
# The smallest variance the Gaussian likelihood uses (torch.nn.GaussianNLLLoss's eps): a head predicting less
# would otherwise be rewarded without bound for fitting a score exactly.
MIN_VARIANCE = 1e-6


def preference_accuracy(
    chosen_rewards: Float[Array, "..."],
    rejected_rewards: Float[Array, "..."],
    mask: Array | None = None,
    *,
    axis: int | tuple[int, ...] | None = None,
) -> tuple[Float[Array, "..."], Float[Array, "..."]]:
    """Count of valid pairs whose chosen reward is strictly higher, and the number of valid pairs.

    Formula: ``(Σ m·1[r⁺ > r⁻], Σ m)`` over ``axis`` (all axes when None); ``hits / count`` is the accuracy.

    Returned as ``(hits, count)`` so that accuracies over an evaluation set split into batches (or shards)
    combine exactly: ``Σ hits / Σ counts``.

    Args:
        chosen_rewards: rewards of the preferred responses, any shape (``[B]`` or ``[B, D]``).
        rejected_rewards: same shape, rewards of the rejected responses.
        mask: broadcastable validity mask (e.g. ``[B, D]`` when a pair lacks a label for one dimension).
        axis: axes to reduce (e.g. ``0`` for one accuracy per dimension of ``[B, D]`` rewards).

    Returns:
        ``(hits, count)``, float32, with ``axis`` removed.

    Notes:
        A tie counts as wrong, as in TRL's ``RewardTrainer`` (``rewards_chosen > rewards_rejected``) and
        RewardBench; a reward model that collapsed to a constant therefore scores 0, not 0.5.
    """
    chosen = jnp.asarray(chosen_rewards, F32)
    rejected = jnp.asarray(rejected_rewards, F32)
    return masked_sum(chosen > rejected, as_mask(mask, chosen), axis=axis)


def _per_pair(name: str, value: Array, rewards: Float[Array, " B *D"]) -> Array:
    """Broadcast a margin or mask to the rewards, a ``[B]`` array applying to whole pairs.

    NumPy broadcasting would align a ``[B]`` array with the *last* axis of ``[B, D]`` rewards: silently wrong
    when ``B == D``, a cryptic error otherwise. Accepted: a scalar, ``[B]``, or an array of the rewards' rank
    whose every axis is 1 or the rewards' (``[B, 1]``, ``[1, D]``, ``[B, D]``).
    """
    value = jnp.asarray(value)
    if rewards.ndim == 2 and value.shape == rewards.shape[:1]:
        value = value[:, None]
    fits = value.ndim == 0 or (
        value.ndim == rewards.ndim and all(v in (1, r) for v, r in zip(value.shape, rewards.shape))
    )
    if not fits:
        allowed = "a scalar or [B]" + (", [B, 1], [1, D] or [B, D]" if rewards.ndim == 2 else "")
        raise ValueError(
            f"bradley_terry_loss: {name} of shape {tuple(value.shape)} does not fit rewards of shape "
            f"{tuple(rewards.shape)}; expected {allowed}"
        )
    return jnp.broadcast_to(value, rewards.shape)


def bradley_terry_loss(
    chosen_rewards: Float[Array, " B *D"],
    rejected_rewards: Float[Array, " B *D"],
    mask: Array | None = None,
    *,
    margin: float | Float[Array, " B *D"] | None = None,
    center_coef: float = 0.0,
    weights: Float[Array, " D"] | None = None,
) -> tuple[Float[Array, " B"], dict[str, Float[Array, ""]]]:
    """Pairwise Bradley–Terry reward-model loss with an optional margin and reward-centering penalty.

    Formula, per pair b and dimension d (``m`` the margin, ``λ`` = ``center_coef``, ``w`` = ``weights``,
    ``v_bd`` the validity mask)::

        ℓ_bd = −log σ(r⁺_bd − r⁻_bd − m_bd) + λ·(r⁺_bd + r⁻_bd)²
        loss_b = Σ_d w_d·v_bd·ℓ_bd

    The mean of ``loss_b`` over the pairs of a ``[B]`` batch is exactly TRL's ``RewardTrainer`` loss
    ``−mean(logsigmoid(r⁺ − r⁻ − margin)) + λ·mean((r⁺ + r⁻)²)``.

    Args:
        chosen_rewards: ``[B]`` rewards of the preferred responses, or ``[B, D]`` for a multi-dimensional
            reward model (one head per preference dimension, PKU-SafeRLHF-style "better" and "safer").
        rejected_rewards: same shape, rewards of the rejected responses. For ``[B, D]`` the "chosen" side of
            column d is the response preferred *on dimension d* (the caller orders each column).
        mask: 0 where a pair (or a pair's label on one dimension) is missing: ``[B]`` (whole pairs, also for
            ``[B, D]`` rewards), or for ``[B, D]`` rewards ``[B, 1]``, ``[1, D]`` or ``[B, D]``. Invalid entries
            may hold any value, NaN included.
        margin: ``m``: a scalar, a per-pair ``[B]`` array (TRL's per-example ``"margin"`` column, e.g. the gap
            between two Likert ratings as in Llama 2; applied to every dimension of ``[B, D]`` rewards), or
            for ``[B, D]`` rewards ``[B, 1]``, ``[1, D]`` or ``[B, D]``. None means 0.
        center_coef: ``λ ≥ 0``, TRL's ``center_rewards_coefficient`` (0 disables it; TRL suggests 0.01).
        weights: ``[D]`` weights of the per-dimension losses (default: all ones, i.e. the plain sum).
            Only for ``[B, D]`` rewards.

    Returns:
        ``(loss, metrics)``: ``loss`` is ``[B]`` float32 (0 for a pair with no valid entry). Reduce it with
        ``core.masked_mean(loss, pair_mask)`` where ``pair_mask`` marks pairs with at least one valid entry
        (for ``[B]`` rewards, the mask itself). Metrics (over valid entries; 0, not NaN, for an empty
        batch): ``loss`` (that mean),
        ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (mean ``r⁺ − r⁻``, margin not
        subtracted, as TRL logs it), ``rewards/accuracies`` (pooled over dimensions) and, when ``D > 1``,
        ``rewards/accuracies/{d}`` per dimension.

    Raises:
        ValueError: on mismatched reward shapes, a ``mask``/``margin``/``weights`` whose shape does not fit
            (a ``[B]`` array is always per pair, never broadcast along D), or ``center_coef < 0``.

    References:
        Bradley & Terry 1952; Ouyang et al. 2022 (arXiv 2203.02155, eq. 1); margin: Touvron et al. 2023
        (arXiv 2307.09288, eq. 2); centering: Eisenstein et al. 2023 (arXiv 2312.09244, eq. 2); TRL 1.16
        ``RewardTrainer.compute_loss``.

    Notes:
        - TRL has no multi-dimensional reward model or validity mask; with ``[B]`` rewards and no mask this
          function is TRL's loss exactly (parity-tested). For ``[B, D]`` every dimension gets its own
          centering term, and a pair's loss is the weighted *sum* over its valid dimensions (a pair labelled
          on fewer dimensions contributes less; it is not re-normalised).
        - TRL applies the margin only when the batch has a ``"margin"`` column; here ``margin=None`` and
          ``margin=0`` are the same.
    """
    chosen = jnp.asarray(chosen_rewards, F32)
    rejected = jnp.asarray(rejected_rewards, F32)
    if chosen.shape != rejected.shape or chosen.ndim not in (1, 2):
        raise ValueError(
            "bradley_terry_loss: chosen and rejected rewards must both be [B] or [B, D], "
            f"got {chosen.shape} and {rejected.shape}"
        )
    if center_coef < 0:
        raise ValueError(f"bradley_terry_loss: center_coef must be >= 0, got {center_coef}")
    if weights is not None and chosen.ndim == 1:
        raise ValueError("bradley_terry_loss: weights apply to [B, D] rewards only")
    if weights is not None and jnp.shape(weights) != chosen.shape[1:]:
        raise ValueError(
            f"bradley_terry_loss: weights of shape {tuple(jnp.shape(weights))} do not fit rewards of shape "
            f"{tuple(chosen.shape)}; expected [D] = {tuple(chosen.shape[1:])}"
        )
    valid = as_mask(None if mask is None else _per_pair("mask", mask, chosen), chosen)
    # Select before any arithmetic: a NaN reward in an unlabelled slot must reach neither loss nor gradient.
    chosen = jnp.where(valid, chosen, 0.0)
    rejected = jnp.where(valid, rejected, 0.0)
    margin = 0.0 if margin is None else jnp.where(valid, _per_pair("margin", jnp.asarray(margin, F32), chosen), 0.0)
    logits = chosen - rejected - margin
    per_entry = -jax.nn.log_sigmoid(logits)
    if center_coef:
        per_entry = per_entry + center_coef * jnp.square(chosen + rejected)
    per_entry = jnp.where(valid, per_entry, 0.0)
    if chosen.ndim == 1:
        loss, pair_valid = per_entry, valid
    else:
        dim_weights = jnp.ones(chosen.shape[-1], F32) if weights is None else jnp.asarray(weights, F32)
        loss = jnp.sum(per_entry * dim_weights, axis=-1)
        pair_valid = jnp.any(valid, axis=-1)
    hits, count = preference_accuracy(chosen, rejected, valid)
    metrics = {
        "loss": masked_mean(loss, pair_valid),
        "rewards/chosen": masked_mean(chosen, valid),
        "rewards/rejected": masked_mean(rejected, valid),
        "rewards/margins": masked_mean(chosen - rejected, valid),
        "rewards/accuracies": hits / jnp.maximum(count, 1.0),
    }
    if chosen.ndim == 2 and chosen.shape[-1] > 1:
        dim_hits, dim_count = preference_accuracy(chosen, rejected, valid, axis=0)
        dim_accuracy = dim_hits / jnp.maximum(dim_count, 1.0)
        for d in range(chosen.shape[-1]):
            metrics[f"rewards/accuracies/{d}"] = dim_accuracy[d]
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def best_of_n_loss(
    rewards: Float[Array, "B N"],
    best: Int[Array, " B"],
    mask: Array | None = None,
) -> tuple[Float[Array, " B"], dict[str, Float[Array, ""]]]:
    """Softmax cross-entropy of the labeller's choice among N candidate responses (Ziegler et al. 2019).

    Formula (over the valid candidates i of row b)::

        loss_b = −log( exp(r_b,best) / Σ_i exp(r_b,i) ) = logsumexp_i r_b,i − r_b,best

    With ``N = 2`` this is the Bradley–Terry loss ``−log σ(r_best − r_other)``.

    Args:
        rewards: ``[B, N]`` rewards of the N candidates shown to the labeller (N = 4 in OpenAI's
            lm-human-preferences data).
        best: ``[B]`` int, index of the chosen candidate.
        mask: ``[B, N]``; 0 marks a missing candidate, which is excluded from the softmax (it may hold any
            value, NaN included). None means all candidates are valid.

    Returns:
        ``(loss, metrics)``: ``loss`` is ``[B]`` float32, 0 for a row whose ``best`` candidate is masked
        (such rows are not counted in the metrics; reduce with ``core.masked_mean(loss, row_valid)``).
        Metrics over valid rows: ``loss``, ``rewards/accuracies`` (the arg-max valid candidate is ``best``;
        ties resolve to the lowest index), ``rewards/best`` (mean reward of the chosen candidate) and
        ``rewards/others`` (mean reward of the other valid candidates).

    References:
        Ziegler et al. 2019 (arXiv 1909.08593, Sec. 2, eq. 1); OpenAI lm-human-preferences
        (``best`` label of the 4-way comparison format).

    Notes:
        lm-human-preferences always shows 4 candidates; the mask is our extension for datasets with
        fewer candidates in some rows.
    """
    rewards = jnp.asarray(rewards, F32)
    valid = as_mask(mask, rewards)
    best = jnp.asarray(best)
    num_candidates = rewards.shape[-1]
    is_best = jnp.arange(num_candidates) == best[:, None]
    row_valid = jnp.any(is_best & valid, axis=-1)
    # The lowest float32, not −inf: exp underflows to exactly 0 for masked entries, and a row with every
    # candidate masked stays finite (its loss is then zeroed below), so no inf−inf ever forms.
    logits = jnp.where(valid, rewards, jnp.finfo(F32).min)
    best_logit = jnp.sum(jnp.where(is_best, logits, 0.0), axis=-1)
    loss = jnp.where(row_valid, jax.nn.logsumexp(logits, axis=-1) - best_logit, 0.0)
    correct = jnp.argmax(logits, axis=-1) == best
    clean = jnp.where(valid, rewards, 0.0)
    metrics = {
        "loss": masked_mean(loss, row_valid),
        "rewards/accuracies": masked_mean(correct, row_valid),
        "rewards/best": masked_mean(best_logit, row_valid),
        "rewards/others": masked_mean(clean, valid & ~is_best & row_valid[:, None]),
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def regression_loss(
    predictions: Float[Array, " B"],
    targets: Float[Array, " B"],
    mask: Array | None = None,
    *,
    kind: str = "mse",
    log_variance: Float[Array, " B"] | None = None,
) -> tuple[Float[Array, " B"], dict[str, Float[Array, ""]]]:
    """A reward model regressed on scalar scores: squared error, or the negative log-likelihood of a Gaussian.

    Formula, per example b (``ŷ`` the prediction, ``y`` the target, ``s`` the predicted log-variance)::

        mse:           ℓ_b = (ŷ_b − y_b)²
        gaussian_nll:  ℓ_b = ½·(s'_b + (ŷ_b − y_b)²·exp(−s'_b)),   s'_b = max(s_b, log 1e-6)

    The Gaussian form learns how noisy each score is: an example the model finds hard to fit may raise its
    variance and so weigh less, at the price of ``½·s`` (heteroscedastic regression).

    Args:
        predictions: ``[B]`` the model's scores (in the targets' units: normalise the targets, not the loss).
        targets: ``[B]`` the scores to fit.
        mask: ``[B]``, 0 for an example to leave out (its values may be anything, NaN included).
        kind: ``mse`` or ``gaussian_nll`` (:data:`REGRESSION_LOSSES`).
        log_variance: ``[B]`` the predicted ``log σ²`` of each score; ``gaussian_nll`` only.

    Returns:
        ``(loss, metrics)``: ``loss`` is ``[B]`` float32, 0 where masked; reduce with ``masked_sum(loss, mask)``.
        Metrics over the valid examples (0 for none): ``loss``, ``mse``, ``mae``, ``predictions`` and ``targets``
        (their means) and, for ``gaussian_nll``, ``log_variance`` (its mean).

    Raises:
        ValueError: an unknown ``kind``, ``log_variance`` missing for ``gaussian_nll`` or given for ``mse``, or
            shapes that differ.

    References:
        Mean-variance estimation: Nix & Weigend 1994; Kendall & Gal 2017 (arXiv 1703.04977, eq. 8, the
        log-variance parameterisation); PyTorch ``GaussianNLLLoss`` (``full=False``).

    Notes:
        - The constant ``½·log 2π`` is left out, as PyTorch's ``GaussianNLLLoss`` does by default.
        - The variance floor is PyTorch's ``eps`` (1e-6). PyTorch clamps the variance without stopping its
          gradient; here the floor is a ``max``, so a log-variance below it receives no gradient.
    """
    if kind not in REGRESSION_LOSSES:
        raise ValueError(f"regression_loss: kind must be one of {REGRESSION_LOSSES}, got {kind!r}")
    if (kind == "gaussian_nll") != (log_variance is not None):
        raise ValueError(f"regression_loss: log_variance is {'needed' if log_variance is None else 'unused'} for "
                         f"kind={kind!r}")
    predictions = jnp.asarray(predictions, F32)
    targets = jnp.asarray(targets, F32)
    shapes = {predictions.shape, targets.shape} | ({jnp.shape(log_variance)} if log_variance is not None else set())
    if len(shapes) != 1 or predictions.ndim != 1:
        raise ValueError(f"regression_loss: predictions, targets (and log_variance) must all be [B], got "
                         f"{sorted(shapes)}")
    valid = as_mask(mask, predictions)
    # Select before any arithmetic: a NaN in a left-out slot must reach neither loss nor gradient.
    error = jnp.where(valid, predictions, 0.0) - jnp.where(valid, targets, 0.0)
    squared = jnp.square(error)
    metrics = {}
    if kind == "mse":
        loss = squared
    else:
        log_var = jnp.maximum(jnp.where(valid, jnp.asarray(log_variance, F32), 0.0), math.log(MIN_VARIANCE))
        loss = 0.5 * (log_var + squared * jnp.exp(-log_var))
        metrics["log_variance"] = masked_mean(log_var, valid)
    loss = jnp.where(valid, loss, 0.0)
    metrics.update({
        "loss": masked_mean(loss, valid),
        "mse": masked_mean(squared, valid),
        "mae": masked_mean(jnp.abs(error), valid),
        "predictions": masked_mean(jnp.where(valid, predictions, 0.0), valid),
        "targets": masked_mean(jnp.where(valid, targets, 0.0), valid),
    })
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
