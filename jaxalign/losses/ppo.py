"""PPO for language models: KL-shaped rewards, masked GAE, whitening, clipped policy/value losses, KL control.

The pieces follow the RLHF PPO of Ziegler et al. 2019 (arXiv 1909.08593) as implemented by TRL 0.11's classic
``PPOTrainer`` (and its successor in ``trl.experimental.ppo``); every place where we differ is listed in the
Notes of the function concerned. Sequences are responses of an LM: ``[B, T]`` arrays, right-padded, with a
``mask`` that is 1 on response tokens. Padded slots may hold anything (even NaN/inf): they are selected away
with ``jnp.where`` before any arithmetic, so they reach neither values nor gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from jaxalign.losses.core import F32, as_mask, masked_mean, masked_sum, safe_divide

__all__ = [
    "KL_ESTIMATORS",
    "AdaptiveKLState",
    "ShapedRewards",
    "adaptive_kl_init",
    "adaptive_kl_update",
    "gae",
    "kl_estimate",
    "ppo_policy_loss",
    "ppo_value_loss",
    "shape_rewards",
    "whiten",
]

#: Per-token KL estimators of ``log π − log π_ref`` (Schulman's k1, k2, k3, and its absolute value).
KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


def gae(
    r_t: Float[Array, "B T"],
    v_t: Float[Array, "B T"],
    mask: Array | None = None,
    *,
    gamma: float,
    lam: float,
    bootstrap_value: Float[Array, " B"] | None = None,
) -> tuple[Float[Array, "B T"], Float[Array, "B T"]]:
    """Generalised advantage estimation over masked, variable-length sequences (reverse ``lax.scan``).

    Formula (over the valid steps t of a row, in order; ``V_next`` of the last valid step is the
    bootstrap value, 0 by default)::

        δ_t = r_t + γ·V_next(t) − V_t
        A_t = δ_t + γ·λ·A_next(t)          (A after the last valid step is 0)
        R_t = A_t + V_t                    (the value target, "returns")

    Masked steps are *transparent*: the recursion skips them, carrying ``V_next`` and ``A_next`` through
    unchanged (no discount is applied across them), and their ``A_t`` and ``R_t`` are 0. For right-padded
    rows this is exactly TRL's behaviour (TRL multiplies rewards/values by the mask and runs the recursion
    through the padding, where every δ is then 0); for masked holes *inside* a sequence (e.g. tool-output
    tokens in a multi-turn response) it makes the result equal to GAE on the row with the holes removed.

    Args:
        r_t: ``[B, T]`` per-step rewards (e.g. :func:`shape_rewards`' ``rewards``).
        v_t: ``[B, T]`` value estimates V(s_t).
        mask: ``[B, T]`` valid steps (None: all valid).
        gamma: discount γ.
        lam: GAE λ. ``lam=1`` gives discounted return − V; ``lam=0`` gives the one-step TD error.
        bootstrap_value: ``[B]`` V of the state after each row's last valid step, for responses truncated
            before their end; None means 0 (the episode ended, as in TRL).

    Returns:
        ``(adv_t, returns)``, both ``[B, T]`` float32 and 0 at masked steps. Neither is whitened: apply
        :func:`whiten` to ``adv_t`` for TRL's advantages. Wrap them in ``jax.lax.stop_gradient`` when they are
        computed inside a differentiated function (they are targets, not predictions).

    References:
        Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
        arXiv 1506.02438, Eq. 16 (and Eq. 17–18 for the λ = 0 / 1 limits).

    Notes:
        - TRL (0.11 ``compute_advantages`` and ``trl.experimental.ppo``) whitens the advantages inside the same
          function; we return raw advantages and leave whitening to :func:`whiten`, so the two compose to
          TRL's result (tested). TRL's returns are computed *before* whitening, as here.
        - TRL 0.11 runs the recursion through masked slots with r = V = 0; in a hole inside a sequence that
          makes the hole contribute ``γ·V_{t+1}`` and discounts across it, and gives left padding non-zero
          advantages. We skip masked slots instead (identical results on right-padded rows, the layout TRL
          produces).
        - ``bootstrap_value`` is an addition (TRL always bootstraps with 0); it matches rlax's
          ``truncated_generalized_advantage_estimation`` with ``values[T] = bootstrap_value``.
    """
    r_t = jnp.asarray(r_t, F32)
    valid = as_mask(mask, r_t)
    r_t = jnp.where(valid, r_t, 0.0)
    v_t = jnp.where(valid, jnp.asarray(v_t, F32), 0.0)
    batch = r_t.shape[0]
    next_value = jnp.zeros((batch,), F32) if bootstrap_value is None else jnp.asarray(bootstrap_value, F32)

    def step(carry, xs):
        next_v, next_adv = carry
        r, v, m = xs
        adv = r + gamma * next_v - v + gamma * lam * next_adv
        carry = (jnp.where(m, v, next_v), jnp.where(m, adv, next_adv))
        return carry, jnp.where(m, adv, 0.0)

    init = (next_value, jnp.zeros((batch,), F32))
    _, adv_tb = jax.lax.scan(step, init, (r_t.T, v_t.T, valid.T), reverse=True)
    adv_t = adv_tb.T
    returns = jnp.where(valid, adv_t + v_t, 0.0)
    return adv_t, returns


def whiten(
    values: Float[Array, "..."],
    mask: Array | None = None,
    *,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
) -> Float[Array, "..."]:
    """Normalise ``values`` to zero mean and unit variance over the valid entries of the whole array.

    Formula (n = number of valid entries, μ and σ² over them)::

        μ  = Σ m·x / n
        σ² = Σ m·(x − μ)² / (n − 1)        (unbiased=True, Bessel's correction; n otherwise)
        y  = (x − μ) / sqrt(σ² + ε)        (+ μ again when shift_mean=False)

    Args:
        values: any shape (typically ``[B, T]`` advantages or rewards).
        mask: broadcastable to ``values``; None means all valid.
        shift_mean: False adds the mean back (only rescales), as TRL does when whitening rewards.
        unbiased: Bessel-corrected variance (TRL's ``masked_var`` default) or the biased (population) one.
        eps: added to the variance inside the square root.

    Returns:
        Same shape as ``values``, float32; 0 at masked entries.

    References:
        "The 37 implementation details of PPO" (Huang et al., ICLR blog track 2022), detail "Normalization of
        Advantages"; TRL ``masked_whiten`` (0.11 ``trl/core.py``, 0.29 ``trl/experimental/ppo``).

    Notes:
        - Degenerate counts, where TRL raises (n = 0) or divides by zero (n = 1, giving inf/NaN): we use
          ``n − 1 → max(n − 1, 1)``. With n = 1 the centred value is 0, so σ² = 0 and the output is 0
          (``shift_mean=True``) or the value itself (``shift_mean=False``); with n = 0 every entry is masked
          and the output is all zeros. Never NaN.
        - Masked entries are returned as 0. TRL 0.11 returns ``(0 − μ)/σ + μ`` there when whitening rewards
          with ``shift_mean=False`` and then runs GAE through them, which leaks the mean reward into the
          advantages of valid tokens of padded rows; TRL ≥ 0.12 fixed this with a ``masked_fill(·, 0)``, which
          we match.
    """
    values = jnp.asarray(values, F32)
    valid = as_mask(mask, values)
    total, count = masked_sum(values, valid)
    mean = safe_divide(total, count)
    centred = jnp.where(valid, values - mean, 0.0)
    dof = count - 1.0 if unbiased else count
    variance = jnp.sum(jnp.square(centred)) / jnp.maximum(dof, 1.0)
    whitened = centred * jax.lax.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(valid, whitened, 0.0)


def kl_estimate(
    logps: Float[Array, "B T"],
    ref_logps: Float[Array, "B T"],
    mask: Array | None = None,
    *,
    estimator: str = "k1",
) -> Float[Array, "B T"]:
    """Per-token single-sample estimate of KL(π ‖ π_ref) from log-probabilities of tokens sampled from π.

    With ``log ρ = logps − ref_logps`` (ρ = π/π_ref)::

        k1  = log ρ
        k2  = ½·(log ρ)²
        k3  = (ρ⁻¹ − 1) + log ρ            (= (π_ref/π − 1) − log(π_ref/π), ≥ 0)
        abs = |log ρ|

    k1 and k3 are unbiased for KL(π ‖ π_ref) when the tokens are sampled from π; k3 has lower variance and is
    never negative; k2 is biased but low-variance; ``abs`` is TRL 0.11's ``kl_penalty="abs"``.

    Args:
        logps: ``[B, T]`` log π of the sampled tokens.
        ref_logps: ``[B, T]`` log π_ref of the same tokens.
        mask: ``[B, T]`` valid tokens (None: all); masked entries are 0 and never touch the inputs.
        estimator: one of :data:`KL_ESTIMATORS`.

    Returns:
        ``[B, T]`` float32, unreduced.

    References:
        J. Schulman, "Approximating KL Divergence" (2020, joschu.net/blog/kl-approx.html); KL-penalised reward:
        Ziegler et al. 2019, arXiv 1909.08593, Sec. 2; k3 as GRPO's KL term: Shao et al. 2024, arXiv 2402.03300,
        Eq. 4.

    Notes:
        - Convention: Schulman writes r = p/q for x ~ q with q the sampling policy π and p = π_ref, i.e. his
          r = π_ref/π = ρ⁻¹; his k1 = −log r, k2 = ½(log r)², k3 = (r − 1) − log r are the formulas above.
        - TRL names: 0.11 ``kl_penalty`` "kl" = k1, "mse" = k2, "abs" = abs ("full", the exact KL over the
          vocabulary, needs logits and is not offered here); ``trl.experimental.ppo`` ``kl_estimator`` "k1"/"k3".
        - k3 is computed as ``expm1(−log ρ) + log ρ`` rather than TRL's ``exp(·) − 1 − ·``: the same value,
          without cancellation when ρ ≈ 1 (agrees with TRL to ~1e-7 absolute).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimate: unknown estimator {estimator!r}; expected one of {KL_ESTIMATORS}")
    logps = jnp.asarray(logps, F32)
    valid = as_mask(mask, logps)
    log_ratio = jnp.where(valid, logps - jnp.asarray(ref_logps, F32), 0.0)
    if estimator == "k1":
        kl = log_ratio
    elif estimator == "k2":
        kl = 0.5 * jnp.square(log_ratio)
    elif estimator == "k3":
        kl = jnp.expm1(-log_ratio) + log_ratio
    else:
        kl = jnp.abs(log_ratio)
    return jnp.where(valid, kl, 0.0)


class ShapedRewards(NamedTuple):
    """Output of :func:`shape_rewards` (same order as TRL 0.11's ``compute_rewards``)."""

    rewards: Float[Array, "B T"]
    """−β·KL_t, plus the (penalised) sequence score at each row's last valid token."""
    non_score_rewards: Float[Array, "B T"]
    """−β·KL_t alone."""
    kl: Float[Array, "B T"]
    """The per-token KL estimate KL_t."""


def _last_valid_onehot(valid: Bool[Array, "B T"]) -> Bool[Array, "B T"]:
    """One-hot of each row's last true position (all false for an empty row)."""
    length = valid.shape[-1]
    last = length - 1 - jnp.argmax(valid[:, ::-1], axis=-1)
    onehot = jnp.arange(length)[None, :] == last[:, None]
    return onehot & jnp.any(valid, axis=-1, keepdims=True)


def shape_rewards(
    score: Float[Array, " B"],
    logps: Float[Array, "B T"],
    ref_logps: Float[Array, "B T"],
    mask: Array | None = None,
    *,
    kl_coef: float | Float[Array, ""],
    estimator: str = "k1",
    missing_eos_penalty: float | None = None,
    contains_eos: Bool[Array, " B"] | None = None,
) -> ShapedRewards:
    """Per-token RLHF rewards: a KL penalty on every token plus the reward-model score on the last one.

    Formula (L_b = last valid index of row b, 1[·] the indicator)::

        s'_b = s_b − p·1[row b has no EOS]            (only when missing_eos_penalty p is given)
        r_bt = −β·KL_bt + 1[t = L_b]·s'_b

    Args:
        score: ``[B]`` sequence-level reward-model scores.
        logps: ``[B, T]`` log π of the response tokens (the policy that sampled them).
        ref_logps: ``[B, T]`` log π_ref of the same tokens.
        mask: ``[B, T]`` response tokens (None: all).
        kl_coef: β, a float or a scalar array (e.g. :class:`AdaptiveKLState`'s ``kl_coef``).
        estimator: KL estimator, see :func:`kl_estimate` (TRL 0.11's default "kl" is "k1").
        missing_eos_penalty: p, subtracted from the score of rows whose ``contains_eos`` is False.
        contains_eos: ``[B]`` bool, whether each response was terminated by the EOS token; required when
            ``missing_eos_penalty`` is given.

    Returns:
        :class:`ShapedRewards` ``(rewards, non_score_rewards, kl)``, each ``[B, T]`` float32, 0 at masked
        tokens. A row with no valid token gets no score (there is no token to put it on).

    References:
        Ziegler et al. 2019, arXiv 1909.08593, Sec. 2 (R(x, y) = r(x, y) − β·log(π/ρ)), applied per token as in
        Stiennon et al. 2020, arXiv 2009.01325, Sec. 3.4; missing-EOS penalty: TRL ``PPOConfig.missing_eos_penalty``
        (Huang et al. 2024, "The N+ implementation details of RLHF with PPO", arXiv 2403.17031).

    Notes:
        - The score sits on the last valid token, as in TRL 0.11. TRL ≥ 0.12 (``trl.experimental.ppo``) adds it
          at index ``sequence_length + 1`` (the slot after the last response token, inside the value mask that
          extends one step further); with our mask convention that slot is padding, so we keep 0.11's choice.
        - The missing-EOS penalty is applied to the score before it is placed, as TRL does; TRL detects EOS
          from token ids, which this function never sees, hence ``contains_eos``.
        - Rewards are data: wrap in ``jax.lax.stop_gradient`` if computed inside a differentiated function.
    """
    if missing_eos_penalty is not None and contains_eos is None:
        raise ValueError("shape_rewards: missing_eos_penalty needs contains_eos ([B] bool)")
    logps = jnp.asarray(logps, F32)
    valid = as_mask(mask, logps)
    kl = kl_estimate(logps, ref_logps, valid, estimator=estimator)
    non_score = jnp.where(valid, -jnp.asarray(kl_coef, F32) * kl, 0.0)
    score = jnp.asarray(score, F32)
    if missing_eos_penalty is not None:
        score = jnp.where(jnp.asarray(contains_eos, bool), score, score - missing_eos_penalty)
    rewards = non_score + jnp.where(_last_valid_onehot(valid), score[:, None], 0.0)
    return ShapedRewards(rewards=rewards, non_score_rewards=non_score, kl=kl)


def ppo_policy_loss(
    logps: Float[Array, "B T"],
    old_logps: Float[Array, "B T"],
    adv_t: Float[Array, "B T"],
    mask: Array | None = None,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
) -> tuple[Float[Array, "B T"], dict[str, Float[Array, ""]]]:
    """Per-token clipped-surrogate PPO policy loss (optionally asymmetric and dual-clipped).

    Formula (ρ_t = exp(logps_t − old_logps_t), ε_l = clip_eps, ε_h = clip_eps_high or ε_l)::

        ℓ_t = max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε_l, 1 + ε_h))
        dual clip (c > 1), for A_t < 0 only:  ℓ_t = min(ℓ_t, −c·A_t)

    Args:
        logps: ``[B, T]`` log π_θ of the sampled tokens (differentiated).
        old_logps: ``[B, T]`` log π_old recorded at sampling time.
        adv_t: ``[B, T]`` advantages (typically whitened GAE); treated as constants (stop-gradient).
        mask: ``[B, T]`` response tokens (None: all).
        clip_eps: ε (lower clip, and upper clip unless ``clip_eps_high`` is given).
        clip_eps_high: upper ε ("clip-higher", DAPO arXiv 2503.14476, Sec. 3.1); None: symmetric.
        dual_clip: c > 1 of dual-clip PPO; None disables it.

    Returns:
        ``(loss, metrics)``: ``loss`` is ``[B, T]`` float32, 0 at masked tokens (reduce with
        ``core.aggregate``; TRL uses ``mode="token_mean"``). Metrics, over valid tokens:

        - ``clipfrac``: fraction where the clipped term is the active (larger) one (TRL ``policy/clipfrac``);
        - ``dual_clipfrac``: fraction where the dual-clip bound −c·A is active (0 without dual clip);
        - ``approx_kl/k1`` = mean(old − new) (TRL 0.11 ``policy/policykl``);
          ``approx_kl/k2`` = ½·mean((new − old)²) (TRL 0.11 ``policy/approxkl``);
          ``approx_kl/k3`` = mean((ρ − 1) − log ρ) (CleanRL's ``approx_kl``); all estimate KL(π_old ‖ π_θ);
        - ``ratio/mean``, ``ratio/max``: of ρ over valid tokens (0 when there are none).

    Examples:
        Two tokens with advantage 1: the first's ratio 1.25 is clipped to 1 + ε = 1.2, the second's 1.05 is not:

        >>> import jax.numpy as jnp
        >>> from jaxalign import losses
        >>> logps, old_logps = jnp.log(jnp.array([[0.5, 0.42]])), jnp.log(jnp.array([[0.4, 0.4]]))
        >>> loss, metrics = losses.ppo_policy_loss(logps, old_logps, jnp.ones((1, 2)), clip_eps=0.2)
        >>> [round(float(x), 4) for x in loss[0]]
        [-1.2, -1.05]
        >>> float(metrics["clipfrac"])
        0.5

    References:
        Schulman et al. 2017, arXiv 1707.06347, Eq. 7 (L^CLIP); dual clip: Ye et al. 2020, arXiv 1912.09729
        (the dual-clip PPO objective); asymmetric clip: Yu et al. 2025 (DAPO), arXiv 2503.14476, Sec. 3.1.

    Notes:
        - Matches TRL 0.11 ``PPOTrainer.loss`` (``pg_losses``/``pg_losses2``, masked mean) when
          ``clip_eps_high`` and ``dual_clip`` are None. TRL's ``ratio_threshold`` batch skipping (zeroing the
          loss when mean ρ is too large) is control flow for the trainer; ``ratio/mean`` is provided for it.
        - ``trl.experimental.ppo`` logs ½·mean(Δ²) over all B·T slots (padding filled so that Δ = 0),
          which shrinks with padding; we average over valid tokens as TRL 0.11 does.
        - The advantages are stop-gradiented here, as in rlax (``use_stop_gradient=True``); TRL detaches
          them when computing them.
    """
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"ppo_policy_loss: dual_clip must be > 1 (Ye et al. 2020), got {dual_clip}")
    eps_low = clip_eps
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    logps = jnp.asarray(logps, F32)
    valid = as_mask(mask, logps)
    log_ratio = jnp.where(valid, logps - jnp.asarray(old_logps, F32), 0.0)
    adv = jax.lax.stop_gradient(jnp.where(valid, jnp.asarray(adv_t, F32), 0.0))
    ratio = jnp.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = jnp.maximum(unclipped, clipped)
    if dual_clip is not None:
        bound = -dual_clip * adv
        dual_active = (adv < 0) & (bound < loss)
        loss = jnp.where(adv < 0, jnp.minimum(loss, bound), loss)
    else:
        dual_active = jnp.zeros_like(valid)
    loss = jnp.where(valid, loss, 0.0)
    log_ratio = jax.lax.stop_gradient(log_ratio)
    ratio = jax.lax.stop_gradient(ratio)
    metrics = {
        "clipfrac": masked_mean(clipped > unclipped, valid),
        "dual_clipfrac": masked_mean(dual_active, valid),
        "approx_kl/k1": masked_mean(-log_ratio, valid),
        "approx_kl/k2": 0.5 * masked_mean(jnp.square(log_ratio), valid),
        "approx_kl/k3": masked_mean(jnp.expm1(log_ratio) - log_ratio, valid),
        "ratio/mean": masked_mean(ratio, valid),
        "ratio/max": jnp.max(jnp.where(valid, ratio, 0.0)),
    }
    return loss, metrics


def ppo_value_loss(
    values: Float[Array, "B T"],
    old_values: Float[Array, "B T"],
    returns: Float[Array, "B T"],
    mask: Array | None = None,
    *,
    clip_eps: float | None = 0.2,
) -> tuple[Float[Array, "B T"], dict[str, Float[Array, ""]]]:
    """Per-token clipped value loss.

    Formula (V = values, V_old = old_values, R = returns, ε = clip_eps)::

        V_clip = clip(V, V_old − ε, V_old + ε)
        ℓ_t    = ½·max((V − R)², (V_clip − R)²)          (ℓ_t = ½·(V − R)² when clip_eps is None)

    Args:
        values: ``[B, T]`` current value predictions (differentiated).
        old_values: ``[B, T]`` value predictions recorded at sampling time.
        returns: ``[B, T]`` value targets (from :func:`gae`); treated as constants (stop-gradient).
        mask: ``[B, T]`` valid steps (None: all).
        clip_eps: ε (TRL ``cliprange_value``); None disables value clipping.

    Returns:
        ``(loss, metrics)``: ``loss`` ``[B, T]`` float32, 0 at masked steps (TRL reduces it with
        ``mode="token_mean"`` and multiplies by ``vf_coef``). Metrics over valid steps: ``vf_clipfrac``
        (fraction where the clipped error is the larger, TRL ``val/clipfrac``), ``value_error`` (mean
        (V − R)², TRL ``val/error``) and ``explained_variance`` = 1 − Var[R − V]/Var[R] (population
        variances; 0 when Var[R] = 0).

    References:
        Value clipping: OpenAI baselines ``ppo2`` and "The 37 implementation details of PPO", detail "Value
        Function Loss Clipping"; RLHF use: Ziegler et al. 2019, arXiv 1909.08593 (lm-human-preferences).

    Notes:
        - Matches TRL 0.11 ``PPOTrainer.loss`` (``vf_losses1``/``vf_losses2``), which has no option to turn
          clipping off; ``clip_eps=None`` is an addition (Engstrom et al. 2020, arXiv 2005.12729, found value
          clipping does not help).
        - TRL 0.11 derives explained variance as 1 − mean((V − R)²)/Var_unbiased[R], which also penalises a
          constant offset of V; we use the standard definition (SB3, CleanRL). It is a diagnostic only.
    """
    values = jnp.asarray(values, F32)
    valid = as_mask(mask, values)
    values = jnp.where(valid, values, 0.0)
    old_values = jnp.where(valid, jnp.asarray(old_values, F32), 0.0)
    returns = jax.lax.stop_gradient(jnp.where(valid, jnp.asarray(returns, F32), 0.0))
    error = jnp.square(values - returns)
    if clip_eps is None:
        loss = 0.5 * error
        clip_active = jnp.zeros_like(valid)
    else:
        clipped = jnp.clip(values, old_values - clip_eps, old_values + clip_eps)
        clipped_error = jnp.square(clipped - returns)
        loss = 0.5 * jnp.maximum(error, clipped_error)
        clip_active = clipped_error > error
    loss = jnp.where(valid, loss, 0.0)
    values = jax.lax.stop_gradient(values)
    residual_var = _population_variance(returns - values, valid)
    returns_var = _population_variance(returns, valid)
    # The inner where keeps the division finite when Var[R] = 0, where the metric is defined as 0.
    explained = jnp.where(returns_var > 0, 1.0 - residual_var / jnp.where(returns_var > 0, returns_var, 1.0), 0.0)
    metrics = {
        "vf_clipfrac": masked_mean(clip_active, valid),
        "value_error": masked_mean(jax.lax.stop_gradient(error), valid),
        "explained_variance": explained,
    }
    return loss, metrics


def _population_variance(values: Float[Array, "..."], mask: Array) -> Float[Array, ""]:
    """Population variance of the valid entries (0 when there are none)."""
    mean = masked_mean(values, mask)
    return masked_mean(jnp.square(values - mean), mask)


class AdaptiveKLState(NamedTuple):
    """State of the KL controller: the current penalty coefficient β (a float32 scalar array)."""

    kl_coef: Float[Array, ""]


def adaptive_kl_init(kl_coef: float) -> AdaptiveKLState:
    """Initial controller state with β = ``kl_coef`` (TRL ``init_kl_coef``).

    Args:
        kl_coef: the initial KL coefficient β₀ ≥ 0.

    Returns:
        :class:`AdaptiveKLState` holding β₀ as a float32 scalar array (so the state can live in a jitted
        train state and be checkpointed).
    """
    return AdaptiveKLState(kl_coef=jnp.asarray(kl_coef, F32))


def adaptive_kl_update(
    state: AdaptiveKLState,
    current_kl: Float[Array, ""],
    n_steps: int | Float[Array, ""],
    *,
    target: float | None,
    horizon: float,
) -> AdaptiveKLState:
    """One step of the adaptive KL-coefficient controller (pure; jittable; ``target=None`` = fixed β).

    Formula (KL_target = ``target``, K_β = ``horizon``)::

        e_t     = clip(KL_t / KL_target − 1, −0.2, 0.2)
        β_{t+1} = β_t·(1 + K_β⁻¹·e_t·n_steps)

    Args:
        state: current :class:`AdaptiveKLState`.
        current_kl: the observed KL of the batch. TRL 0.11 passes the mean over sequences of the summed
            per-token KL: ``sequence_logps(shaped.kl, mask).mean()`` in jaxalign terms.
        n_steps: how many samples the observation covers (TRL passes the batch size).
        target: KL_target; None gives the fixed controller (state returned unchanged).
        horizon: K_β.

    Returns:
        The updated :class:`AdaptiveKLState`.

    References:
        Ziegler et al. 2019, arXiv 1909.08593, Sec. 2.2 (the log-space proportional controller);
        TRL 0.11 ``AdaptiveKLController`` / ``FixedKLController``.

    Notes:
        Same update as TRL 0.11; float32 instead of TRL's Python float (relative difference ~1e-7 per step).
    """
    if target is None:
        return state
    if not target > 0 or not horizon > 0:
        raise ValueError(f"adaptive_kl_update: target and horizon must be > 0, got {target}, {horizon}")
    error = jnp.clip(jnp.asarray(current_kl, F32) / target - 1.0, -0.2, 0.2)
    factor = 1.0 + error * jnp.asarray(n_steps, F32) / horizon
    return AdaptiveKLState(kl_coef=state.kl_coef * factor)
