"""Reference-free preference losses: SimPO (with AlphaPO rewards and an optional CPO-style NLL term) and ORPO's
odds-ratio term on length-normalised log-probabilities, and GenARM's autoregressive reward model on summed ones.

Inputs are summed sequence log-probabilities plus completion lengths; the average log-probability
``log π(y|x)/|y|`` is formed here, so the same ``sequence_logps`` output feeds every loss of the library.
Both losses take an optional ``[B]`` pair mask: masked pairs get loss 0, are left out of every metric, and
NaN/inf in their inputs reaches neither the values nor the gradients.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Real

from jaxalign.losses.core import F32, as_mask, masked_mean

__all__ = ["genarm_loss", "orpo_loss", "simpo_loss"]

Metrics = dict[str, Float[Array, ""]]

# ORPO evaluates log(1 − e^p̄) at min(p̄, −ε): the complement 1 − P(y) is floored at 1 − e^(−ε) ≈ ε, so a
# certain completion (p̄ = 0: float32 log-probs round to exactly 0 once the target logit leads every other by
# ≳ 17 + log V) has large but finite odds instead of infinite ones (inf loss, NaN gradient). Only averages
# above −ε, i.e. a mean per-token probability above 1 − 1e-6, are affected.
_ORPO_CERTAINTY_EPS = 1e-6


def _pair_inputs(valid: Array, *arrays: Array | None, fill: tuple[float, ...]) -> tuple[Array | None, ...]:
    """Float32 copies with masked slots replaced by ``fill`` before any arithmetic (NaN padding cannot leak)."""
    return tuple(
        None if x is None else jnp.where(valid, jnp.asarray(x).astype(F32), value)
        for x, value in zip(arrays, fill, strict=True)
    )


def _average(logps: Array, lengths: Array) -> Array:
    return logps / jnp.maximum(lengths, 1.0)


def _pair_metrics(
    chosen_rewards: Array, rejected_rewards: Array, chosen_avg: Array, rejected_avg: Array, valid: Array
) -> Metrics:
    """TRL's CPO/ORPO reward metrics over the valid pairs (stop-gradient; 0 when there is none)."""
    chosen_rewards, rejected_rewards, chosen_avg, rejected_avg = jax.lax.stop_gradient(
        (chosen_rewards, rejected_rewards, chosen_avg, rejected_avg)
    )
    return {
        "rewards/chosen": masked_mean(chosen_rewards, valid),
        "rewards/rejected": masked_mean(rejected_rewards, valid),
        "rewards/margins": masked_mean(chosen_rewards - rejected_rewards, valid),
        "rewards/accuracies": masked_mean(chosen_rewards > rejected_rewards, valid),
        "logps/chosen": masked_mean(chosen_avg, valid),
        "logps/rejected": masked_mean(rejected_avg, valid),
    }


def simpo_loss(
    chosen_logps: Float[Array, " B"],
    rejected_logps: Float[Array, " B"],
    chosen_lengths: Real[Array, " B"],
    rejected_lengths: Real[Array, " B"],
    chosen_nll: Float[Array, " B"] | None = None,
    mask: Bool[Array, " B"] | None = None,
    *,
    beta: float = 2.0,
    gamma: float | None = None,
    gamma_beta_ratio: float | None = None,
    label_smoothing: float = 0.0,
    alpha: float = 0.0,
    sft_weight: float = 0.0,
) -> tuple[Float[Array, " B"], Metrics]:
    """SimPO: a Bradley–Terry loss on average log-probabilities with a target reward margin γ.

    Formula, with ``p̄ = log π(y|x)/|y|``, the reward ``u(y) = p̄`` (or AlphaPO's ``(1 − e^(−α·p̄))/α``),
    ``z = β·(u(y_w) − u(y_l)) − γ`` and ε = ``label_smoothing``::

        ℓ = −(1−ε)·log σ(z) − ε·log σ(−z)  [+ sft_weight·nll_w]

    Args:
        chosen_logps: ``[B]`` policy log π(y_w|x), summed over completion tokens.
        rejected_logps: ``[B]`` policy log π(y_l|x).
        chosen_lengths: ``[B]`` completion token counts ``|y_w|`` (clamped to ≥ 1).
        rejected_lengths: ``[B]`` completion token counts ``|y_l|``.
        chosen_nll: ``[B]`` per-sequence NLL of the chosen completion (CPO's behaviour-cloning term); needed
            when ``sft_weight`` ≠ 0.
        mask: ``[B]`` validity of the pairs (None = all valid), so a jitted step can pad the batch to a static
            size. Masked pairs get loss 0 and are left out of every metric; their inputs may hold NaN/inf.
        beta: β > 0.
        gamma: the margin γ (TRL's ``simpo_gamma``). Give ``gamma`` or ``gamma_beta_ratio``, not both.
        gamma_beta_ratio: γ/β (the SimPO code's parameter); default 0.25 when neither is given.
        label_smoothing: ε in [0, 0.5].
        alpha: AlphaPO's α (0 = SimPO's log-probability reward).
        sft_weight: weight of ``chosen_nll`` (TRL's ``cpo_alpha``, SimPO's ``sft_weight``).

    Returns:
        ``(loss, metrics)``: ``loss`` is ``[B]`` float32, 0 for masked pairs (reduce with
        ``masked_mean(loss, mask)``). Metrics (means over the valid pairs, 0 when there is none):
        ``rewards/chosen`` (β·u_w), ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
        ``logps/chosen`` and ``logps/rejected`` (the *average* log-probs p̄, as TRL's CPO trainer logs them)
        and, with an NLL term, ``nll_loss``.

    References:
        Meng et al. 2024, "SimPO", arXiv 2405.14734, Eq. 6; CPO: Xu et al. 2024, arXiv 2401.08417, Eq. 3;
        AlphaPO: Gupta et al. 2025, arXiv 2501.03884.

    Notes:
        - Parity target: TRL 1.16 ``trl.experimental.cpo.CPOTrainer.cpo_loss`` with ``loss_type="simpo"``.
        - Defaults follow the SimPO authors' trainer (β = 2, γ/β = 0.25, no NLL); TRL's CPOConfig defaults are
          β = 0.1, γ = 0.5 and ``cpo_alpha`` = 1, so pass those explicitly to reproduce a TRL run.
        - The length is clamped to ≥ 1 (TRL divides by the raw count: NaN for an empty completion), so an
          empty completion scores p̄ = 0.
        - ``mask`` has no TRL counterpart; an empty batch gives metrics of 0 where TRL's means are NaN.
        - The NLL is per sequence; TRL's ``cpo_alpha`` term is a token mean over the batch's chosen tokens.
          ``nll_b = B·Σ_t nll_bt / Σ_bt m_bt`` reproduces it; the per-sequence token mean weighs every pair
          equally.
        - AlphaPO's reward is ``−expm1(−α·p̄)/α`` (TRL: ``(1 − exp(p̄)^(−α))/α``; same value, no cancellation).
    """
    if beta <= 0:
        raise ValueError(f"simpo_loss: beta must be > 0, got {beta}")
    if gamma is not None and gamma_beta_ratio is not None:
        raise ValueError("simpo_loss: give gamma or gamma_beta_ratio, not both")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"simpo_loss: label_smoothing must be in [0, 0.5], got {label_smoothing}")
    if (sft_weight != 0.0) != (chosen_nll is not None):
        raise ValueError("simpo_loss: the NLL term needs both sft_weight != 0 and chosen_nll (or neither)")
    if gamma is None:
        gamma = beta * (0.25 if gamma_beta_ratio is None else gamma_beta_ratio)
    valid = as_mask(mask, jnp.asarray(chosen_logps))
    chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, chosen_nll = _pair_inputs(
        valid, chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, chosen_nll, fill=(0, 0, 1, 1, 0)
    )
    chosen_avg = _average(chosen_logps, chosen_lengths)
    rejected_avg = _average(rejected_logps, rejected_lengths)
    if alpha:
        chosen_reward = -jnp.expm1(-alpha * chosen_avg) / alpha
        rejected_reward = -jnp.expm1(-alpha * rejected_avg) / alpha
    else:
        chosen_reward, rejected_reward = chosen_avg, rejected_avg
    z = beta * (chosen_reward - rejected_reward) - gamma
    loss = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
    metrics = _pair_metrics(beta * chosen_reward, beta * rejected_reward, chosen_avg, rejected_avg, valid)
    if chosen_nll is not None:
        loss = loss + sft_weight * chosen_nll
        metrics["nll_loss"] = masked_mean(jax.lax.stop_gradient(chosen_nll), valid)
    return jnp.where(valid, loss, 0.0), metrics


def _log1mexp(x: Array) -> Array:
    """log(1 − eˣ) for x ≤ 0, accurate on both sides of −ln 2 (Mächler 2012)."""
    near_zero = x > -math.log(2.0)
    # Each branch sees only inputs where it is finite, so the unused one cannot put NaN into the gradient.
    x_near = jnp.where(near_zero, x, -1.0)
    x_far = jnp.where(near_zero, -1.0, x)
    return jnp.where(near_zero, jnp.log(-jnp.expm1(x_near)), jnp.log1p(-jnp.exp(x_far)))


def orpo_loss(
    chosen_logps: Float[Array, " B"],
    rejected_logps: Float[Array, " B"],
    chosen_lengths: Real[Array, " B"],
    rejected_lengths: Real[Array, " B"],
    chosen_nll: Float[Array, " B"] | None = None,
    mask: Bool[Array, " B"] | None = None,
    *,
    beta: float = 0.1,
) -> tuple[Float[Array, " B"], Metrics]:
    """ORPO's odds-ratio loss on average log-probabilities, plus the chosen NLL when given.

    Formula, with ``p̄ = log π(y|x)/|y|`` and ``log odds(y) = p̄ − log(1 − e^min(p̄, −ε))``, ε = 1e-6::

        ℓ = −λ·log σ(log odds(y_w) − log odds(y_l))  [+ nll_w]

    A pair with an empty completion on either side (length 0) has no average log-probability: it is treated
    as masked (loss 0, NLL term included, and left out of every metric).

    ORPO's full objective is ``L_SFT + λ·L_OR``: pass the per-sequence NLL of the chosen completion as
    ``chosen_nll`` (e.g. the per-sequence token mean of :func:`jaxalign.losses.sft.sft_loss`), or add the SFT
    loss to the reduced odds-ratio term yourself.

    Args:
        chosen_logps: ``[B]`` policy log π(y_w|x), summed over completion tokens.
        rejected_logps: ``[B]`` policy log π(y_l|x).
        chosen_lengths: ``[B]`` completion token counts ``|y_w|``; 0 (an empty completion) drops the pair.
        rejected_lengths: ``[B]`` completion token counts ``|y_l|``; 0 drops the pair.
        chosen_nll: ``[B]`` per-sequence NLL of the chosen completion, added with weight 1.
        mask: ``[B]`` validity of the pairs (None = all valid), so a jitted step can pad the batch to a static
            size. Masked pairs get loss 0 and are left out of every metric; their inputs may hold NaN/inf.
        beta: λ > 0, the weight of the odds-ratio term (TRL's ``beta``).

    Returns:
        ``(loss, metrics)``: ``loss`` is ``[B]`` float32, 0 for masked pairs and pairs with an empty side
        (reduce with ``masked_mean(loss, mask & (chosen_lengths > 0) & (rejected_lengths > 0))``). Metrics
        (means over those valid pairs, 0 when there is none): ``rewards/chosen`` (λ·p̄_w),
        ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``,
        ``logps/rejected`` (average log-probs), ``log_odds_ratio`` (mean log σ(·)), ``log_odds_chosen`` (mean
        log-odds difference) and, with ``chosen_nll``, ``nll_loss``.

    References:
        Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", arXiv 2403.07691,
        Eqs. 4, 6 and 7.

    Notes:
        - Parity target: TRL 1.16 ``trl.experimental.orpo.ORPOTrainer.odds_ratio_loss``; TRL returns
          ``+λ·log σ(·)`` and subtracts its mean, here the sign is folded into the per-sequence loss.
        - TRL's NLL is a token mean over all chosen tokens of the batch; ``nll_b = B·Σ_t nll_bt / Σ_bt m_bt``
          reproduces it exactly, the per-sequence token mean matches it when lengths are equal.
        - Empty completions: TRL divides by the raw count (0/0 = NaN for the whole batch). Here a pair with an
          empty side is dropped like a masked pair; clamping the length instead would give p̄ = 0, i.e.
          certainty, whose odds are infinite (loss inf for an empty rejected side, NaN for two empty sides).
        - Certainty floor: ``log(1 − e^p̄)`` is evaluated at ``min(p̄, −ε)``, ε = 1e-6, so 1 − P(y) is floored
          at ≈ ε and each log-odds is capped at ≈ −log ε ≈ 13.8. TRL (and the paper's formula) give infinite odds at
          p̄ = 0, hence an inf loss (rejected side) or a NaN gradient (chosen side). For p̄ ≤ −ε the two agree
          exactly, and the linear ``p̄`` term keeps a gradient of 1 above the floor.
        - ``mask`` has no TRL counterpart; an empty batch gives metrics of 0 where TRL's means are NaN.
    """
    if beta <= 0:
        raise ValueError(f"orpo_loss: beta must be > 0, got {beta}")
    # An empty side has no average log-probability (a clamped length would give p̄ = 0, certainty): drop the pair.
    non_empty = (jnp.asarray(chosen_lengths) > 0) & (jnp.asarray(rejected_lengths) > 0)
    valid = as_mask(mask, jnp.asarray(chosen_logps)) & non_empty
    # A masked slot is filled with p̄ = −1, away from the certainty floor.
    chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, chosen_nll = _pair_inputs(
        valid, chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, chosen_nll, fill=(-1, -1, 1, 1, 0)
    )
    chosen_avg = _average(chosen_logps, chosen_lengths)
    rejected_avg = _average(rejected_logps, rejected_lengths)
    complement = _log1mexp(jnp.minimum(chosen_avg, -_ORPO_CERTAINTY_EPS)) - _log1mexp(
        jnp.minimum(rejected_avg, -_ORPO_CERTAINTY_EPS)
    )
    log_odds = (chosen_avg - rejected_avg) - complement
    log_sigmoid_odds = jax.nn.log_sigmoid(log_odds)
    loss = -beta * log_sigmoid_odds
    metrics = _pair_metrics(beta * chosen_avg, beta * rejected_avg, chosen_avg, rejected_avg, valid)
    metrics["log_odds_ratio"] = masked_mean(jax.lax.stop_gradient(log_sigmoid_odds), valid)
    metrics["log_odds_chosen"] = masked_mean(jax.lax.stop_gradient(log_odds), valid)
    if chosen_nll is not None:
        loss = loss + chosen_nll
        metrics["nll_loss"] = masked_mean(jax.lax.stop_gradient(chosen_nll), valid)
    return jnp.where(valid, loss, 0.0), metrics


def genarm_loss(
    chosen_logps: Float[Array, " B"],
    rejected_logps: Float[Array, " B"],
    chosen_lengths: Real[Array, " B"],
    rejected_lengths: Real[Array, " B"],
    chosen_nll: Float[Array, " B"] | None = None,
    mask: Bool[Array, " B"] | None = None,
    *,
    beta: float = 0.1,
) -> tuple[Float[Array, " B"], Metrics]:
    """GenARM's autoregressive reward model: a Bradley–Terry loss on the *summed* log-probabilities of a causal LM.

    The reward of a response is ``r(x, y) = β_r·Σ_t log π_r(y_t | x, y_<t)``, a sum of token rewards that a
    decoder can read off at every step; fitting it to the pairs is DPO with no reference model::

        ℓ = −log σ(β_r·(log π_r(y_w|x) − log π_r(y_l|x)))

    At decode time the trained ``π_r`` guides a frozen base model as ``log π_base + (1/β_r)·log π_r`` (the
    guided sampler with the reward model as the guide and weight ``1/β_r``; see docs/llmdoctor.md).

    Args:
        chosen_logps: ``[B]`` log π_r(y_w|x), summed over completion tokens.
        rejected_logps: ``[B]`` log π_r(y_l|x).
        chosen_lengths, rejected_lengths: ``[B]`` completion token counts; only for the ``logps/*`` metrics (the
            average log-probs, as the other reference-free losses log them). The loss does not normalise.
        chosen_nll: must be None (GenARM has no NLL term; the argument keeps the reference-free signature).
        mask: ``[B]`` validity of the pairs (None = all valid); masked pairs get loss 0 and leave every metric.
        beta: β_r > 0 (GenARM's ``dpo_beta``, 0.1 in its training script).

    Returns:
        ``(loss, metrics)``: ``[B]`` float32 loss, 0 for masked pairs. Metrics: ``rewards/chosen``
        (β_r·log π_r(y_w|x)), ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``
        and ``logps/rejected`` (average log-probs).

    References:
        Xu et al. 2025, "GenARM: Reward Guided Generation with Autoregressive Reward Model for Test-time
        Alignment", arXiv 2410.08193, Eq. 5 (training) and Eq. 7 (decoding).

    Notes:
        - Equal to :func:`~jaxalign.losses.dpo_loss` (sigmoid) with reference log-probs of 0, i.e. TRL's
          ``reference_free=True``; the GenARM code's ``arm_loss`` (training_openInstruct/open_instruct/arm_utils.py)
          computes the same ``−logsigmoid(β·(logp_w − logp_l))``.
    """
    if beta <= 0:
        raise ValueError(f"genarm_loss: beta must be > 0, got {beta}")
    if chosen_nll is not None:
        raise ValueError("genarm_loss: GenARM has no NLL term (chosen_nll must be None)")
    valid = as_mask(mask, jnp.asarray(chosen_logps))
    chosen_logps, rejected_logps, chosen_lengths, rejected_lengths = _pair_inputs(
        valid, chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, fill=(0, 0, 1, 1)
    )
    loss = -jax.nn.log_sigmoid(beta * (chosen_logps - rejected_logps))
    metrics = _pair_metrics(beta * chosen_logps, beta * rejected_logps, _average(chosen_logps, chosen_lengths),
                            _average(rejected_logps, rejected_lengths), valid)
    return jnp.where(valid, loss, 0.0), metrics
