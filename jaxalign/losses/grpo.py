"""GRPO and its descendants (Dr. GRPO, DAPO, GSPO): group-relative advantages and the clipped token loss.

GRPO (Shao et al. 2024, arXiv 2402.03300) samples G completions per prompt, scores each with a scalar reward,
and uses the reward standardised within its group as the advantage of every token of the completion; the
policy is trained with PPO's clipped surrogate plus a k3 KL penalty to a frozen reference. The variants differ
in the advantage scale (group std, batch std, none) and in how the per-token loss is averaged, which is
:func:`jaxalign.losses.core.aggregate`'s ``mode`` (see :data:`TRL_LOSS_TYPES`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxalign.losses.core import F32, aggregate, as_mask, masked_mean, masked_sum, safe_divide
from jaxalign.losses.ppo import kl_estimate

__all__ = [
    "ADVANTAGE_SCALES",
    "IMPORTANCE_SAMPLING_LEVELS",
    "TRL_LOSS_TYPES",
    "grpo_loss",
    "grpo_objective",
    "group_advantages",
]

#: How GRPO scales advantages: by the group's reward std, the batch's, or not at all (Dr. GRPO).
ADVANTAGE_SCALES = ("group", "batch", "none")
#: Where the policy ratio is taken: per token (GRPO) or per sequence (GSPO).
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")

TRL_LOSS_TYPES = {
    "grpo": "sequence_mean",
    "bnpo": "token_mean",
    "dr_grpo": "sequence_sum_normalized",
    "dapo": "token_mean",
}
"""TRL ``GRPOConfig.loss_type`` → the ``core.aggregate`` mode that reproduces it (see :func:`grpo_objective`)."""


def _std(centred: Float[Array, "..."], valid: Array, axis, *, unbiased: bool) -> Float[Array, "..."]:
    """Standard deviation from already-centred values; 0 when fewer than two entries are valid."""
    total, count = masked_sum(jnp.square(centred), valid, axis=axis)
    dof = count - 1.0 if unbiased else count
    return jnp.where(count > 1, jnp.sqrt(total / jnp.maximum(dof, 1.0)), 0.0)


def group_advantages(
    rewards: Float[Array, " B"] | Float[Array, "n_groups G"],
    mask: Array | None = None,
    *,
    group_size: int,
    scale: str = "group",
    eps: float = 1e-4,
    std_unbiased: bool = True,
) -> Float[Array, " B"] | Float[Array, "n_groups G"]:
    """Group-relative advantages: each reward minus its group's mean, optionally divided by a std.

    Formula (group g of G completions of one prompt; μ_g, σ_g over its valid rewards)::

        scale="group":  A_i = (r_i − μ_g) / (σ_g + ε)        (GRPO)
        scale="batch":  A_i = (r_i − μ_g) / (σ_batch + ε)    (σ over every valid reward of the batch)
        scale="none":   A_i =  r_i − μ_g                      (Dr. GRPO)

    Args:
        rewards: ``[B]`` with the G completions of each prompt contiguous (``B = n_prompts·G``, TRL's
            layout), or ``[n_groups, G]``.
        mask: same shape, which rewards are valid (None: all). Invalid ones (e.g. unscorable completions) are
            left out of μ and σ and get advantage 0.
        group_size: G.
        scale: one of :data:`ADVANTAGE_SCALES` (TRL ``scale_rewards``).
        eps: ε added to the std (not to the variance), TRL's 1e-4.
        std_unbiased: Bessel-corrected std (``torch.std``'s default, used by TRL) or the population std.

    Returns:
        Advantages with the shape of ``rewards``, float32. Every token of completion i gets A_i: broadcast
        with ``adv_t[:, None]`` or pass ``[B]`` straight to :func:`grpo_loss`.

    References:
        Shao et al. 2024 (DeepSeekMath, GRPO), arXiv 2402.03300, Sec. 4.1.2 (outcome supervision);
        Liu et al. 2025 (Dr. GRPO), arXiv 2503.20783, Sec. 3.1 (no std normalisation);
        "batch" std: the Lite PPO paper, arXiv 2508.08221 (as cited by TRL's ``scale_rewards``).

    Notes:
        - Follows TRL 1.16 ``GRPOTrainer._generate_and_score_completions`` (``multi_objective_aggregation=
          "sum_then_normalize"``): group mean, ``nanstd`` (unbiased), ``/(std + 1e-4)``; with ``"batch"`` the
          mean stays per group and only the std is global, as in TRL. TRL's ``True``/``False`` aliases of
          ``scale_rewards`` are spelled "group"/"none" here.
        - TRL marks unscorable completions with NaN and uses nan-aware statistics, then ``nan_to_num`` → 0;
          ``mask`` does the same without NaNs.
        - With fewer than two valid rewards in a group, σ = 0 here (TRL gets NaN and then advantage 0); since
          r_i − μ_g = 0 for a lone reward, the advantage is 0 in both.
        - The paper's GRPO uses the std as is, without ε; TRL's ε keeps a group of equal rewards at 0.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"group_advantages: unknown scale {scale!r}; expected one of {ADVANTAGE_SCALES}")
    rewards = jnp.asarray(rewards, F32)
    shape = rewards.shape
    if rewards.ndim == 1:
        if shape[0] % group_size:
            raise ValueError(f"group_advantages: batch {shape[0]} is not a multiple of group_size {group_size}")
        grouped = rewards.reshape(-1, group_size)
    elif rewards.ndim == 2 and shape[1] == group_size:
        grouped = rewards
    else:
        raise ValueError(f"group_advantages: rewards must be [B] or [n_groups, G={group_size}], got shape {shape}")
    valid = as_mask(None if mask is None else jnp.asarray(mask).reshape(grouped.shape), grouped)
    grouped = jnp.where(valid, grouped, 0.0)
    total, count = masked_sum(grouped, valid, axis=-1)
    centred = jnp.where(valid, grouped - safe_divide(total, count)[:, None], 0.0)
    if scale == "group":
        centred = centred / (_std(centred, valid, -1, unbiased=std_unbiased)[:, None] + eps)
    elif scale == "batch":
        batch_centred = jnp.where(valid, grouped - masked_mean(grouped, valid), 0.0)
        centred = centred / (_std(batch_centred, valid, None, unbiased=std_unbiased) + eps)
    return jnp.where(valid, centred, 0.0).reshape(shape)


def grpo_loss(
    logps: Float[Array, "B T"],
    old_logps: Float[Array, "B T"] | None,
    ref_logps: Float[Array, "B T"] | None,
    adv_t: Float[Array, " B"] | Float[Array, "B T"],
    mask: Array | None = None,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    kl_coef: float = 0.0,
    delta: float | None = None,
    importance_sampling_level: str = "token",
    kl_importance_correction: bool = False,
) -> tuple[Float[Array, "B T"], dict[str, Float[Array, ""]]]:
    """Per-token GRPO loss: PPO's clipped surrogate with group advantages, plus β·k3 KL to the reference.

    Formula (w_t = exp(logps_t − old_logps_t); ε_l, ε_h = clip_eps, clip_eps_high or ε_l)::

        ℓ_t  = −min(w_t·A, clip(w_t, 1 − ε_l, 1 + ε_h)·A) + β·KL_t
        KL_t = π_ref/π − log(π_ref/π) − 1                  (k3, ≥ 0)

    With ``delta`` (two-sided clipping) the unclipped term uses min(w_t, δ). With
    ``importance_sampling_level="sequence"`` (GSPO) every token of row b uses the same
    w_b = exp(mean_t(logps_t − old_logps_t)) (gradients flow through the mean). With
    ``kl_importance_correction`` the KL term is KL_t·w_t (unbiased under off-policy sampling).

    Args:
        logps: ``[B, T]`` log π_θ of the completion tokens (differentiated).
        old_logps: ``[B, T]`` log π_old from sampling time, or None for a single on-policy step (TRL's
            ``num_iterations=1``), where π_old = stop_gradient(π_θ) so w = 1 with the policy gradient.
        ref_logps: ``[B, T]`` log π_ref, or None when ``kl_coef`` is 0.
        adv_t: ``[B]`` per-completion advantages (:func:`group_advantages`) or ``[B, T]`` per-token ones;
            treated as constants (stop-gradient).
        mask: ``[B, T]`` completion tokens (None: all).
        clip_eps: ε_l (TRL ``epsilon``).
        clip_eps_high: ε_h, DAPO's clip-higher (TRL ``epsilon_high``); None: ε_l.
        kl_coef: β (TRL ``beta``).
        delta: δ, the upper bound of two-sided clipping (TRL ``delta``, INTELLECT-2); None: off.
        importance_sampling_level: one of :data:`IMPORTANCE_SAMPLING_LEVELS`.
        kl_importance_correction: multiply the KL by w (TRL ``use_bias_correction_kl``).

    Returns:
        ``(loss, metrics)``: ``loss`` ``[B, T]`` float32, 0 at masked tokens; reduce it with
        :func:`grpo_objective` or ``core.aggregate``. Metrics (over valid tokens, TRL's names):
        ``clip_ratio/low_mean`` (w < 1 − ε_l with A < 0), ``clip_ratio/high_mean`` (w > 1 + ε_h with A > 0),
        ``clip_ratio/region_mean`` (either), ``clip_ratio/low_min`` / ``clip_ratio/high_max`` (min / max
        over rows of the per-row means), ``ratio/mean``, and ``kl`` (mean k3) when ``ref_logps`` is given.

    Examples:
        Two prompts with two completions each, on-policy (``old_logps`` equal to ``logps``: every ratio is 1),
        no KL term; each token's loss is minus its completion's advantage:

        >>> import jax.numpy as jnp
        >>> from jaxalign import losses
        >>> rewards = jnp.array([1.0, 0.0, 0.5, 0.5])
        >>> advantages = losses.group_advantages(rewards, group_size=2, scale="none")   # Dr. GRPO
        >>> advantages.tolist()
        [0.5, -0.5, 0.0, 0.0]
        >>> logps = jnp.full((4, 3), -1.0)
        >>> loss, metrics = losses.grpo_loss(logps, logps, None, advantages, jnp.ones((4, 3)))
        >>> loss[:, 0].tolist()
        [-0.5, 0.5, -0.0, -0.0]

    References:
        Shao et al. 2024, arXiv 2402.03300, Eq. 3 (objective) and Eq. 4 (k3 KL); DAPO: Yu et al. 2025,
        arXiv 2503.14476, Sec. 3.1 (clip-higher); GSPO: Zheng et al. 2025, arXiv 2507.18071 (sequence-level
        importance ratio); two-sided clipping: INTELLECT-2 report, arXiv 2505.07291.

    Notes:
        - Matches TRL 1.16 ``GRPOTrainer._compute_loss`` for ``loss_type`` "grpo", "bnpo", "dr_grpo" and
          "dapo" (tested, values and gradients), with ``top_entropy_quantile=1``, no off-policy mask, no vLLM
          importance-sampling correction and no entropy bonus (those are trainer features).
        - The paper's KL is KL(π_θ ‖ π_ref) estimated with k3 on π_θ's samples, exactly TRL's form; it is
          computed by :func:`jaxalign.losses.ppo.kl_estimate` (``expm1(x) − x`` with x = log(π_ref/π); TRL:
          ``exp(x) − x − 1``; equal to ~1e-7).
        - Clip metrics use the ratio before the δ clamp; TRL's use it after, which differs only when
          δ < 1 + ε_h (TRL recommends δ > 1 + ε).
        - ``clip_ratio/low_min`` / ``high_max`` skip rows without valid tokens (TRL's ``nanmin``/``nanmax``)
          and are 0 when no row has one (TRL: NaN).
    """
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"grpo_loss: unknown importance_sampling_level {importance_sampling_level!r}; "
            f"expected one of {IMPORTANCE_SAMPLING_LEVELS}"
        )
    if ref_logps is None and not (isinstance(kl_coef, (int, float)) and kl_coef == 0):
        raise ValueError("grpo_loss: kl_coef != 0 needs ref_logps")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    logps = jnp.asarray(logps, F32)
    valid = as_mask(mask, logps)
    logps = jnp.where(valid, logps, 0.0)
    # On-policy: π_old is π_θ itself, frozen, so w = 1 but ∇w = ∇log π_θ.
    old_logps = jax.lax.stop_gradient(logps) if old_logps is None else jnp.asarray(old_logps, F32)
    log_ratio = jnp.where(valid, logps - old_logps, 0.0)
    if importance_sampling_level == "sequence":
        total, count = masked_sum(log_ratio, valid, axis=-1)
        log_ratio = jnp.broadcast_to(safe_divide(total, count)[:, None], logps.shape)
    ratio = jnp.exp(log_ratio)
    adv_t = jnp.asarray(adv_t, F32)
    adv_t = adv_t[:, None] if adv_t.ndim == 1 else adv_t
    adv_t = jax.lax.stop_gradient(jnp.where(valid, adv_t, 0.0))
    clipped_ratio = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + eps_high)
    unclipped_ratio = ratio if delta is None else jnp.minimum(ratio, delta)
    loss = -jnp.minimum(unclipped_ratio * adv_t, clipped_ratio * adv_t)
    metrics = {}
    if ref_logps is not None:
        kl = kl_estimate(logps, ref_logps, valid, estimator="k3")
        kl_term = kl * ratio if kl_importance_correction else kl
        loss = loss + kl_coef * kl_term
        metrics["kl"] = masked_mean(jax.lax.stop_gradient(kl), valid)
    loss = jnp.where(valid, loss, 0.0)

    ratio = jax.lax.stop_gradient(ratio)
    low = (ratio < 1.0 - clip_eps) & (adv_t < 0)
    high = (ratio > 1.0 + eps_high) & (adv_t > 0)
    rows = jnp.any(valid, axis=-1)
    any_rows = jnp.any(rows)
    low_min = jnp.min(jnp.where(rows, masked_mean(low, valid, axis=-1), jnp.inf))
    high_max = jnp.max(jnp.where(rows, masked_mean(high, valid, axis=-1), -jnp.inf))
    metrics.update(
        {
            "clip_ratio/low_mean": masked_mean(low, valid),
            "clip_ratio/high_mean": masked_mean(high, valid),
            "clip_ratio/region_mean": masked_mean(low | high, valid),
            # An all-masked batch has no rows to take an extremum over: report 0, not ±inf.
            "clip_ratio/low_min": jnp.where(any_rows, low_min, 0.0),
            "clip_ratio/high_max": jnp.where(any_rows, high_max, 0.0),
            "ratio/mean": masked_mean(ratio, valid),
        }
    )
    return loss, metrics


def grpo_objective(
    logps: Float[Array, "B T"],
    old_logps: Float[Array, "B T"] | None,
    ref_logps: Float[Array, "B T"] | None,
    adv_t: Float[Array, " B"] | Float[Array, "B T"],
    mask: Array | None = None,
    *,
    aggregation: str = "token_mean",
    max_tokens: int | None = None,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    kl_coef: float = 0.0,
    delta: float | None = None,
    importance_sampling_level: str = "token",
    kl_importance_correction: bool = False,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """Scalar GRPO-family loss: :func:`grpo_loss` reduced with ``core.aggregate(mode=aggregation)``.

    Formula: ``Σ / count`` of :func:`jaxalign.losses.core.aggregate` applied to :func:`grpo_loss`'s ``[B, T]``
    loss. TRL ``loss_type`` → ``aggregation`` (also :data:`TRL_LOSS_TYPES`):

    - "grpo" → ``"sequence_mean"``: mean over completions of each completion's token mean (the paper's
      ``1/G·Σ_i 1/|o_i|·Σ_t``; length-biased).
    - "bnpo" → ``"token_mean"`` over the local (micro-)batch.
    - "dapo" → ``"token_mean"`` over the whole generation batch: accumulate ``(sum, count)`` across
      micro-batches (``aggregate`` itself) and divide once; for a single micro-batch it equals "bnpo".
    - "dr_grpo" → ``"sequence_sum_normalized"`` with ``max_tokens`` = TRL's ``max_completion_length``.

    Args:
        logps, old_logps, ref_logps, adv_t, mask: as :func:`grpo_loss`.
        aggregation: a ``core.AGGREGATIONS`` mode.
        max_tokens: L of ``sequence_sum_normalized`` (default T).
        clip_eps, clip_eps_high, kl_coef, delta, importance_sampling_level, kl_importance_correction:
            as :func:`grpo_loss`.

    Returns:
        ``(loss, metrics)``: the scalar float32 loss and :func:`grpo_loss`'s metrics plus ``loss``. For
        gradient accumulation call ``core.aggregate`` on :func:`grpo_loss`'s output instead and combine
        ``(sum, count)`` pairs.

    References:
        As :func:`grpo_loss`; aggregation modes: DAPO arXiv 2503.14476 Sec. 3.3 (token-level loss), Dr. GRPO
        arXiv 2503.20783 Sec. 3.1.

    Notes:
        - TRL's "grpo" divides by the number of completions B including completions with no valid token
          (their token mean is taken as 0); ``sequence_mean`` divides by the number of non-empty completions.
          They agree whenever every completion has a token (always, unless everything is masked, e.g. by
          ``mask_truncated_completions``).
        - TRL divides by ``gradient_accumulation_steps`` inside the loss for "grpo"/"bnpo"/"dr_grpo"; here the
          training step owns that scaling.
    """
    per_token, metrics = grpo_loss(
        logps,
        old_logps,
        ref_logps,
        adv_t,
        mask,
        clip_eps=clip_eps,
        clip_eps_high=clip_eps_high,
        kl_coef=kl_coef,
        delta=delta,
        importance_sampling_level=importance_sampling_level,
        kl_importance_correction=kl_importance_correction,
    )
    total, count = aggregate(per_token, mask, mode=aggregation, max_tokens=max_tokens)
    loss = safe_divide(total, count)
    return loss, {**metrics, "loss": jax.lax.stop_gradient(loss)}
