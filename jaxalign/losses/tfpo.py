"""TFPO: token-level flow-guided preference optimisation of the LLMDoctor "doctor" (arXiv 2601.10416).

A response is a trajectory of prefix states ``s_0 → s_1 → … → s_L`` (``s_0`` is the prompt, ``s_t`` the
prompt plus the first t response tokens) built by the doctor policy ``π̂(y_{t+1} | s_t)``. Each state carries a
flow ``F(s) = Q(s)·V(s)``: ``Q`` is fixed by the token rewards of :mod:`jaxalign.losses.token_level`, ``V`` is
the doctor's learned value head. Subtrajectory balance (GFlowNets, with the backward policy fixed to 1 since a
prefix has a single parent) asks ``F(s_m)·Π_{k=m}^{n−1} π̂(y_{k+1}|s_k) = F(s_n)`` for every pair ``m < n``;
at its optimum the doctor samples complete responses with probability proportional to their reward.

Array layout (the layout of a causal LM run over ``[prompt; response]``): ``token_logps``, ``mask`` and token
rewards are ``[B, T]`` over the *target* tokens (``mask`` 1 on the response tokens); state arrays (``log_q``,
``log_v``, ``log_flows``) are ``[B, T + 1]`` where index ``t`` is the state *before* target ``t`` (after target
``t − 1``). With ``tokens`` of length ``T + 1`` and targets ``tokens[:, 1:]``, index t is the prefix ending at
input position t, i.e. the value head read at input position t.

A row's trajectory spans its first to its last valid token: its steps are the tokens ``first ≤ t ≤ last`` and
its states the indices ``first ≤ t ≤ last + 1``; the terminal state is ``last + 1``. A masked token *inside*
the span (a hole, e.g. a tool output or a forced token the doctor did not choose) is a forced transition: it
stays a step of the trajectory with ``log π̂ := 0`` (the doctor had no choice, ``π̂ = 1``) and reward 0, and the
states around it are ordinary states whose values are read. Masked tokens outside the span, and states outside
it, are never read (they may hold NaN/inf). A contiguous mask (prompt zeros, response ones, padding zeros) has
no holes and is the usual case.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxalign.losses.core import F32, as_mask, masked_mean, safe_divide

__all__ = [
    "balance_log_values",
    "first_divergence_mask",
    "log_flows",
    "log_prefix_scores",
    "non_terminal_states",
    "subtrajectory_balance_loss",
    "tfpo_loss",
    "value_discrimination_loss",
]


def _span(mask: Bool[Array, "B T"]) -> Bool[Array, "B T"]:
    """Steps of each row's trajectory: the tokens from its first valid token to its last, holes included."""
    seen = jnp.cumsum(mask, axis=-1, dtype=jnp.int32) > 0
    ahead = jnp.flip(jnp.cumsum(jnp.flip(mask, axis=-1), axis=-1, dtype=jnp.int32), axis=-1) > 0
    return seen & ahead


def _state_mask(mask: Bool[Array, "B T"]) -> Bool[Array, "B T+1"]:
    """States of the trajectory: before or after some step of the span."""
    span = _span(mask)
    pad = jnp.zeros(mask.shape[:-1] + (1,), bool)
    return jnp.concatenate([span, pad], axis=-1) | jnp.concatenate([pad, span], axis=-1)


def _terminal_mask(mask: Bool[Array, "B T"]) -> Bool[Array, "B T+1"]:
    """The state after the last valid token of each row (one per non-empty row, whatever the holes)."""
    span = _span(mask)
    pad = jnp.zeros(mask.shape[:-1] + (1,), bool)
    return jnp.concatenate([pad, span], axis=-1) & ~jnp.concatenate([span, pad], axis=-1)


def _exclusive_cumsum(values: Float[Array, "B T"]) -> Float[Array, "B T+1"]:
    """``out[t] = Σ_{k<t} values[k]``: a per-token quantity accumulated onto the states."""
    zero = jnp.zeros(values.shape[:-1] + (1,), F32)
    return jnp.concatenate([zero, jnp.cumsum(values, axis=-1)], axis=-1)


def log_prefix_scores(
    token_rewards: Float[Array, "B T"], mask: Array | None = None
) -> Float[Array, "B T+1"]:
    """Log prefix score ``log Q(s_t)``: the reward accumulated by the response tokens of the prefix.

    Formula: ``log Q(s_t) = Σ_{k<t} m_k·r_k`` (so ``Q(s_0) = 1`` and ``Q(s_L) = exp(Σ_k r_k)``).

    Args:
        token_rewards: ``[B, T]`` token rewards ``r_t`` (from :func:`jaxalign.losses.token_level.token_rewards`).
        mask: ``[B, T]`` response mask; masked rewards may hold anything.

    Returns:
        ``[B, T + 1]`` float32, state layout (index t: before target t).

    References:
        Shen et al. 2026, LLMDoctor (arXiv 2601.10416), TFPO: the flow ``F(s_t) = Q(s_t)·V_φ(s_t)`` with ``Q``
        a positive prefix score aggregated from the token rewards.

    Notes:
        The paper says only that ``Q`` aggregates the prefix's token rewards and is positive; we take the
        exponential of their sum, the forward-looking parametrisation of Pan et al. 2023 (arXiv 2302.01687,
        ``F(s) = F̃(s)·exp(−E(s))`` with an additive energy ``E = −Σ r``). Then ``Q(s_L)`` is the reward of the
        whole response, ``R(y) = exp(Σ_t r_t)``, and a fully trained doctor samples responses with probability
        ``∝ exp(Σ_t r_t)``. Scale the rewards before calling to change that temperature.
    """
    rewards = jnp.asarray(token_rewards, F32)
    valid = as_mask(mask, rewards)
    return _exclusive_cumsum(jnp.where(valid, rewards, 0.0))


def _anchored_log_v(log_v: Float[Array, "B T+1"], valid: Bool[Array, "B T"], anchor: bool) -> Float[Array, "B T+1"]:
    log_v = jnp.where(_state_mask(valid), jnp.asarray(log_v, F32), 0.0)
    return jnp.where(_terminal_mask(valid), 0.0, log_v) if anchor else log_v


def log_flows(
    log_q: Float[Array, "B T+1"],
    log_v: Float[Array, "B T+1"],
    mask: Array | None = None,
    *,
    anchor_terminal: bool = True,
) -> Float[Array, "B T+1"]:
    """Log state flows ``log F(s_t) = log Q(s_t) + log V(s_t)``, with the terminal value pinned to 1.

    Formula: ``log F(s_t) = log Q(s_t) + log V(s_t)`` for ``t < L`` and, with ``anchor_terminal``,
    ``log F(s_L) = log Q(s_L)`` (``V(s_L) = 1``: the flow into a complete response is its reward).

    Args:
        log_q: ``[B, T + 1]`` log prefix scores (:func:`log_prefix_scores`).
        log_v: ``[B, T + 1]`` log values from the doctor's value head (any real number; ``V = exp(log_v)``).
        mask: ``[B, T]`` response mask; the trajectory runs from the first to the last valid token of each
            row (a masked token inside it is a forced step, see the module docstring).
        anchor_terminal: pin ``log V = 0`` at the state after the last valid token (only there: a hole does
            not end the trajectory). Turn it off for truncated responses whose last state is not terminal.

    Returns:
        ``[B, T + 1]`` float32 log flows, 0 at states outside the trajectory.

    References:
        Shen et al. 2026, LLMDoctor (arXiv 2601.10416), TFPO flow ``F(s_t) = Q(s_t)·V_φ(s_t)``; terminal
        condition ``F(x) = R(x)`` of GFlowNets (Bengio et al. 2021, arXiv 2106.04399) in the forward-looking
        form of Pan et al. 2023 (arXiv 2302.01687).

    Notes:
        The anchor is our addition, not written in the paper's loss. Without it ``V`` is free at every state,
        including the last one, and any doctor policy reaches zero subtrajectory-balance loss on a single
        trajectory by absorbing the rewards into ``V``; the rewards would then reach the doctor only through
        the value-discrimination term.
    """
    log_q = jnp.asarray(log_q, F32)
    valid = as_mask(mask, log_q[..., 1:])
    states = _state_mask(valid)
    return jnp.where(states, log_q, 0.0) + _anchored_log_v(log_v, valid, anchor_terminal)


def non_terminal_states(mask: Array) -> Bool[Array, "B T+1"]:
    """The states of each row's trajectory from which a step is taken: all but the terminal one.

    These are the states whose value-head reads are free (the terminal one is anchored by :func:`log_flows`).

    Args:
        mask: ``[B, T]`` response mask; a row's trajectory runs from its first to its last valid token.

    Returns:
        ``[B, T + 1]`` bool, state layout (index t: before target t).
    """
    valid = as_mask(mask, jnp.asarray(mask, F32))
    return _state_mask(valid) & ~_terminal_mask(valid)


def balance_log_values(
    token_logps: Float[Array, "B T"], token_rewards: Float[Array, "B T"], mask: Array | None = None
) -> Float[Array, "B T+1"]:
    """The log values ``log V(s_t)`` that balance a trajectory exactly under the given policy.

    Every subtrajectory-balance residual of the row is 0 at these values (with the terminal anchor
    ``log V(s_L) = 0``).

    Formula: ``log V(s_t) = Σ_{k ≥ t} m_k·(r_k − log π̂(y_{k+1} | s_k))`` over the row's span (a hole, a forced
    step, contributes 0: ``π̂ = 1``, reward 0), 0 outside the span's states.

    Balance ``log F(s_n) = log F(s_m) + Σ_{m≤k<n} log π̂_k`` with ``log F = log Q + log V`` gives
    ``log V(s_m) − log V(s_n) = Σ_{m≤k<n} (r_k − log π̂_k)``; the anchor fixes the constant. These are the
    regression targets of a value head started for a given doctor (:func:`jaxalign.methods.tfpo.fit_value_head`):
    ``−Σ log π̂`` makes them tens of nats for a sampled response, which a head started at ``log V = 0`` would
    otherwise leave to the policy to absorb.

    Args:
        token_logps: ``[B, T]`` the policy's log-probs of the response tokens.
        token_rewards: ``[B, T]`` token rewards ``r`` (:func:`jaxalign.losses.token_level.token_rewards`).
        mask: ``[B, T]`` response mask (None: all valid); a masked token inside the span is a forced step.

    Returns:
        ``[B, T + 1]`` float32, state layout (index t: before target t).
    """
    logps = jnp.asarray(token_logps, F32)
    valid = as_mask(mask, logps)
    step = jnp.where(valid, jnp.asarray(token_rewards, F32) - logps, 0.0)
    to_go = jnp.flip(jnp.cumsum(jnp.flip(step, axis=-1), axis=-1), axis=-1)  # Σ_{k≥t}
    zero = jnp.zeros(step.shape[:-1] + (1,), F32)
    return jnp.where(_state_mask(valid), jnp.concatenate([to_go, zero], axis=-1), 0.0)


def _compose(earlier: Float[Array, "... 4 4"], later: Float[Array, "... 4 4"]) -> Float[Array, "... 4 4"]:
    return jnp.einsum("...ij,...jk->...ik", later, earlier)


def _geometric_pair_sums(
    step_residuals: Float[Array, "B T"], steps: Bool[Array, "B T"], lam: float
) -> tuple[Float[Array, " B"], Float[Array, " B"]]:
    """``(Σ_{m<n} w_mn·(c_n − c_m)², Σ_{m<n} w_mn)`` over the states of each row, in O(T).

    ``w_mn = λ^{n−m} / max_{m'<n'} λ^{n'−m'}``: the SubTB(λ) weights divided by the largest one, which the
    ratio of the two sums does not see. Every weight is then ≤ 1 and the largest is exactly 1, so neither sum
    overflows or underflows whatever ``λ`` and ``L`` (raw weights ``λ^{n−m}`` overflow float32 from
    ``L ≈ 88/ln λ``, e.g. ``L = 219`` at ``λ = 1.5``). The maximum is ``λ`` (pairs ``n − m = 1``) for
    ``λ ≤ 1`` and ``λ^L`` (the pair ``(0, L)``) for ``λ > 1``, so

        w_mn = a^{n−m−1}·u_{m+1}·v_n   with   a = λ, u = v = 1                              (λ ≤ 1)
                                               a = 1, u_k = λ^{−(k−1)}, v_n = λ^{−(L−n)}      (λ > 1)

    With ``d_n = c_n − c_{n−1}`` (the one-step residual) and, at state n, ``A_n = Σ_{m<n} a^{n−m−1}u_{m+1}``,
    ``H_n = Σ_{m<n} a^{n−m−1}u_{m+1}(c_n − c_m)``, ``G_n = Σ_{m<n} a^{n−m−1}u_{m+1}(c_n − c_m)²``, splitting
    ``c_n − c_m = d_n + (c_{n−1} − c_m)`` gives the affine recurrence

        A_n = a·A_{n−1} + u_n
        H_n = a·H_{n−1} + d_n·(a·A_{n−1} + u_n)
        G_n = a·G_{n−1} + 2·a·d_n·H_{n−1} + d_n²·(a·A_{n−1} + u_n)

    i.e. ``x_n = M_n·x_{n−1}`` for ``x = (1, A, H, G)`` and a lower-triangular 4×4 ``M_n`` whose entries are
    bounded by ``max(1, d_n²)``. The products ``M_n⋯M_1`` come from an associative scan (depth O(log T)); a
    step outside the trajectory is the reset ``x ↦ (1, 0, 0, 0)``, which starts every row's sums at its first
    state and zeroes them after its last. The result is ``(Σ_n v_n·G_n, Σ_n v_n·A_n)``. Only one-step residuals
    enter, never the cumulative ``c`` itself, so the float32 sums do not suffer the cancellation of expanding
    ``(c_n − c_m)²`` into moments of ``c``.
    """
    growth, decay = max(lam, 1.0), min(lam, 1.0)
    on = steps.astype(F32)
    earlier = jnp.cumsum(on, axis=-1) - on  # steps of the row before this one: n − 1 at step n
    later = jnp.sum(on, axis=-1, keepdims=True) - earlier - on  # steps after it: L − n
    # exp(−k·ln λ) ≤ 1 underflows to 0, never to NaN; ln 1 = 0 makes u = v = 1 exactly for λ ≤ 1.
    inflow = on * jnp.exp(-math.log(growth) * earlier)
    readout = on * jnp.exp(-math.log(growth) * later)
    d = jnp.where(steps, step_residuals, 0.0)
    carry = decay * on
    zero, one = jnp.zeros_like(d), jnp.ones_like(d)
    rows = [
        jnp.stack([one, zero, zero, zero], axis=-1),
        jnp.stack([inflow, carry, zero, zero], axis=-1),
        jnp.stack([d * inflow, d * carry, carry, zero], axis=-1),
        jnp.stack([d * d * inflow, d * d * carry, 2.0 * d * carry, carry], axis=-1),
    ]
    prefix = jax.lax.associative_scan(_compose, jnp.stack(rows, axis=-2), axis=1)
    return jnp.sum(readout * prefix[..., 3, 0], axis=-1), jnp.sum(readout * prefix[..., 1, 0], axis=-1)


def subtrajectory_balance_loss(
    log_flows: Float[Array, "B T+1"],
    token_logps: Float[Array, "B T"],
    mask: Array | None = None,
    *,
    lam: float | None = None,
) -> tuple[Float[Array, " B"], dict[str, Float[Array, ""]]]:
    """Subtrajectory balance over all pairs of states of each response, in O(T) time and memory.

    Formula (states ``s_0..s_L`` of a row, ``w_mn = λ^{n−m}``, or 1 when ``lam`` is None)::

        δ_mn = log F(s_n) − log F(s_m) − Σ_{k=m}^{n−1} log π̂(y_{k+1} | s_k)
        loss = Σ_{0≤m<n≤L} w_mn·δ_mn² / Σ_{0≤m<n≤L} w_mn

    With ``c_n = log F(s_n) − Σ_{k<n} log π̂(y_{k+1}|s_k)``, ``δ_mn = c_n − c_m``. Unweighted, the pair sum
    is ``Σ_{m<n} (c_n − c_m)² = N·Σ_n (c_n − c̄)²`` over the ``N = L + 1`` states (computed from the centred
    ``c``, the stable two-pass form). With λ weights it is an O(T) affine recurrence on one-step residuals,
    evaluated with an associative scan, with the weights divided by the largest one so that nothing overflows
    for any ``λ`` and ``L`` (see ``_geometric_pair_sums``). No ``[T, T]`` array is formed.

    Args:
        log_flows: ``[B, T + 1]`` log state flows (:func:`log_flows`), state layout (index t: before target t).
        token_logps: ``[B, T]`` doctor log-probs ``log π̂(y_{t+1} | s_t)`` of the response tokens.
        mask: ``[B, T]`` response mask. The trajectory of a row runs from its first to its last valid token;
            a masked token inside it is a forced step with ``log π̂ = 0`` (see the module docstring). Masked
            log-probs, and log-flows at states outside the trajectory, may hold anything, NaN included.
        lam: None for the plain mean over all ``L(L+1)/2`` pairs; a finite ``λ > 0`` for SubTB(λ) weights
            ``λ^{n−m}`` (``λ < 1`` favours short subtrajectories, ``λ → 0`` tends to detailed balance, ``λ = 1``
            is the plain mean, ``λ > 1`` favours long ones). Madan et al. use λ around 0.9–0.99 for long
            trajectories.

    Returns:
        ``(loss, metrics)``: ``loss`` is ``[B]`` float32 (0 for a row with fewer than two states; a non-finite
        input inside a trajectory gives a non-finite loss, never a silent 0). Metrics: ``subtb`` (mean over
        rows with at least one pair) and ``subtb/db_residual_abs`` (mean ``|δ_{t,t+1}|`` over the steps of the
        trajectories, the one-step detailed-balance residual).

    References:
        Shen et al. 2026, LLMDoctor (arXiv 2601.10416), TFPO subtrajectory-balance loss (sum over
        ``0 ≤ m < n ≤ L_τ``); Madan et al. 2023 (arXiv 2209.12782), SubTB(λ) and its normalised λ weights.

    Notes:
        - The paper *sums* the squared residuals over pairs and trajectories; we normalise per trajectory
          (mean over pairs, or Madan et al.'s ``Σ w = 1`` per trajectory), so the loss scale does not grow
          as ``L²`` and long responses do not dominate the batch. The paper's per-trajectory sum is
          ``loss·L(L+1)/2`` when ``lam`` is None.
        - Backward policy ``P_B = 1`` (each prefix has exactly one parent), as in the paper.
        - Holes in the mask (masked tokens between valid ones) are forced steps with ``π̂ = 1``; the paper's
          responses have none.
    """
    if lam is not None and not (math.isfinite(lam) and lam > 0):
        raise ValueError(f"subtrajectory_balance_loss: lam must be a finite number > 0 or None, got {lam}")
    log_flows = jnp.asarray(log_flows, F32)
    logps = jnp.asarray(token_logps, F32)
    valid = as_mask(mask, logps)
    steps = _span(valid)
    states = _state_mask(valid)
    flows = jnp.where(states, log_flows, 0.0)
    # A hole is a forced step (π̂ = 1): its log-prob, possibly garbage, is replaced by 0.
    logps = jnp.where(valid, logps, 0.0)
    step_residuals = flows[..., 1:] - flows[..., :-1] - logps
    num_states = jnp.sum(states, axis=-1, dtype=F32)
    # Decided by the mask, not by the weights: a NaN sum must surface as a NaN loss, not pass for "no pairs".
    has_pairs = num_states > 1
    if lam is None:
        cumulative = flows - _exclusive_cumsum(logps)
        centred = jnp.where(states, cumulative - masked_mean(cumulative, states, axis=-1)[..., None], 0.0)
        # Σ_{m<n}(c_n − c_m)² / (N(N−1)/2) = 2·Σ(c − c̄)² / (N − 1).
        loss = safe_divide(2.0 * jnp.sum(jnp.square(centred), axis=-1), num_states - 1.0)
    else:
        weighted, total_weight = _geometric_pair_sums(step_residuals, steps, lam)
        # total_weight ≥ 1 whenever there is a pair (the largest normalised weight is exactly 1).
        loss = jnp.where(has_pairs, weighted / jnp.where(has_pairs, total_weight, 1.0), 0.0)
    metrics = {
        "subtb": masked_mean(loss, has_pairs),
        "subtb/db_residual_abs": masked_mean(jnp.abs(step_residuals), steps),
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def first_divergence_mask(
    chosen_tokens: Int[Array, "B T"],
    rejected_tokens: Int[Array, "B T"],
    chosen_mask: Array | None = None,
    rejected_mask: Array | None = None,
) -> tuple[Bool[Array, "B T"], Bool[Array, "B T"]]:
    """Mark, in each response of a pair, the first response token where the two responses differ.

    If ``y_w`` and ``y_l`` share their first k response tokens, the states right after token k + 1,
    ``(s_k, y_w,k+1)`` and ``(s_k, y_l,k+1)``, are the two children of the common prefix ``s_k``: the states
    whose values the paper's value-discrimination loss compares (:func:`value_discrimination_loss`).

    Args:
        chosen_tokens: ``[B, T]`` target token ids of the preferred responses.
        rejected_tokens: ``[B, T]`` target token ids of the rejected responses.
        chosen_mask: ``[B, T]`` response mask of the chosen side (positions may differ from the rejected
            side's: the k-th response tokens are compared, wherever they sit).
        rejected_mask: ``[B, T]`` response mask of the rejected side.

    Returns:
        ``(chosen_at, rejected_at)``: ``[B, T]`` bool, each one-hot at the divergence token of its row, or all
        False when the responses agree on every token of the shorter one (include EOS in the masks so that
        a response that is a prefix of the other still diverges at its EOS).
    """
    chosen_tokens, rejected_tokens = jnp.asarray(chosen_tokens), jnp.asarray(rejected_tokens)
    if chosen_tokens.shape != rejected_tokens.shape:
        raise ValueError(
            f"first_divergence_mask: token shapes differ: {chosen_tokens.shape} vs {rejected_tokens.shape}"
        )
    length = chosen_tokens.shape[-1]
    positions = jnp.arange(length)

    def packed(tokens, mask):
        valid = as_mask(mask, tokens)
        # Stable order that lists the valid positions first: order[k] is where the k-th response token sits.
        order = jnp.argsort(jnp.where(valid, positions, length + positions), axis=-1)
        return jnp.take_along_axis(tokens, order, axis=-1), order, jnp.sum(valid, axis=-1)

    tokens_w, order_w, length_w = packed(chosen_tokens, chosen_mask)
    tokens_l, order_l, length_l = packed(rejected_tokens, rejected_mask)
    differs = (tokens_w != tokens_l) & (positions < jnp.minimum(length_w, length_l)[:, None])
    found = jnp.any(differs, axis=-1, keepdims=True)
    first = jnp.argmax(differs, axis=-1)[:, None]

    def one_hot(order):
        return (positions == jnp.take_along_axis(order, first, axis=-1)) & found

    return one_hot(order_w), one_hot(order_l)


def value_discrimination_loss(
    v_chosen: Float[Array, "B T"],
    v_rejected: Float[Array, "B T"],
    chosen_mask: Array | None = None,
    rejected_mask: Array | None = None,
    *,
    gamma: float = 0.1,
) -> tuple[Float[Array, " B"], dict[str, Float[Array, ""]]]:
    """Hinge loss asking the value of the preferred continuation to exceed the rejected one's by ``γ``.

    Formula (``V̄`` the mean of the values over the selected states of a response)::

        loss = max(0, γ − (V̄(y_w) − V̄(y_l)))

    Select one state per side with :func:`first_divergence_mask` to get the paper's
    ``max(0, γ − (V_φ(s_t, y_w) − V_φ(s_t, y_l)))`` at the common prefix ``s_t``; select every response state
    to compare the responses' mean values instead.

    Args:
        v_chosen: ``[B, T]`` values ``V_φ`` of the states after each token of the preferred response.
        v_rejected: ``[B, T]`` the same for the rejected response.
        chosen_mask: ``[B, T]`` states of the chosen side to compare (None: all), e.g. the ``chosen_at`` of
            :func:`first_divergence_mask`. Unselected values may hold anything, NaN included.
        rejected_mask: ``[B, T]`` states of the rejected side to compare (None: all).
        gamma: margin ``γ ≥ 0``.

    Returns:
        ``(loss, metrics)``: ``loss`` is ``[B]`` float32, 0 for pairs with no selected state on either side.
        Metrics over valid pairs: ``value_loss``, ``value/chosen``, ``value/rejected``, ``value/margin``
        (mean ``V̄(y_w) − V̄(y_l)``), ``value/accuracy`` (fraction with ``V̄(y_w) > V̄(y_l)``).

    References:
        Shen et al. 2026, LLMDoctor (arXiv 2601.10416), TFPO value-discrimination loss.
    """
    if gamma < 0:
        raise ValueError(f"value_discrimination_loss: gamma must be >= 0, got {gamma}")
    v_chosen = jnp.asarray(v_chosen, F32)
    v_rejected = jnp.asarray(v_rejected, F32)
    chosen_at = as_mask(chosen_mask, v_chosen)
    rejected_at = as_mask(rejected_mask, v_rejected)
    value_w = masked_mean(v_chosen, chosen_at, axis=-1)
    value_l = masked_mean(v_rejected, rejected_at, axis=-1)
    pair_valid = jnp.any(chosen_at, axis=-1) & jnp.any(rejected_at, axis=-1)
    gap = value_w - value_l
    loss = jnp.where(pair_valid, jax.nn.relu(gamma - gap), 0.0)
    metrics = {
        "value_loss": masked_mean(loss, pair_valid),
        "value/chosen": masked_mean(value_w, pair_valid),
        "value/rejected": masked_mean(value_l, pair_valid),
        "value/margin": masked_mean(gap, pair_valid),
        "value/accuracy": masked_mean(gap > 0, pair_valid),
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def tfpo_loss(
    token_logps: Float[Array, "B 2 T"],
    log_v: Float[Array, "B 2 T+1"],
    token_rewards: Float[Array, "B 2 T"],
    mask: Array,
    value_mask: Array | None = None,
    prior_logps: Float[Array, "B 2 T"] | None = None,
    *,
    lam: float | None = None,
    lam_value: float = 1.0,
    gamma: float = 0.1,
    anchor_terminal: bool = True,
    value_hinge: str = "value",
) -> tuple[Float[Array, " B"], dict[str, Float[Array, ""]]]:
    """TFPO objective of a preference pair: subtrajectory balance on both responses + value discrimination.

    Formula (per pair; ``w`` chosen, ``l`` rejected)::

        log F(s_t) = Σ_{k<t} r_k + log V(s_t)           (log V(s_L) = 0 with anchor_terminal)
        loss = ½·(SubTB(y_w) + SubTB(y_l)) + λ_value·max(0, γ − (V(s_t, y_w) − V(s_t, y_l)))

    Args:
        token_logps: ``[B, 2, T]`` doctor log-probs of the response tokens; index 0 of the pair axis is the
            chosen response, 1 the rejected one.
        log_v: ``[B, 2, T + 1]`` log values of the doctor's value head at every state (state layout: index t
            is before target t); ``V = exp(log_v)``.
        token_rewards: ``[B, 2, T]`` LLMDoctor token rewards (positive on the chosen response, negative on the
            rejected one: :func:`jaxalign.losses.token_level.token_rewards`).
        mask: ``[B, 2, T]`` response masks; each response's trajectory runs from its first to its last valid
            token, and a masked token inside it is a forced step (``π̂ = 1``, reward 0; module docstring).
        value_mask: ``[B, 2, T]`` tokens after which the values are compared (see
            :func:`first_divergence_mask`). None: the first response token of each side, i.e. the two
            children of the prompt state, which is the paper's common prefix whenever the two responses
            differ at their first token.
        prior_logps: ``[B, 2, T]`` log-probs ``log π₀`` of the response tokens under a fixed prior policy (for
            example the doctor's start), or None (the paper). Given, the prefix score becomes
            ``log Q(s_t) = Σ_{k<t} (r_k + log π₀_k)`` and the doctor learns ``π̂(y) ∝ π₀(y)·exp(Σ r)`` instead of
            ``∝ exp(Σ r)`` (Notes).
        lam: SubTB(λ) weight (None: plain mean over pairs of states); see :func:`subtrajectory_balance_loss`.
        lam_value: weight ``λ_value`` of the value-discrimination term.
        gamma: margin ``γ`` of the value-discrimination term, on ``V`` (or in nats, on ``log V``, with
            ``value_hinge="log_value"``).
        anchor_terminal: pin ``V = 1`` at the last state of each response (see :func:`log_flows`).
        value_hinge: ``"value"``: the hinge compares ``V = exp(log_v)``, as the paper writes it; ``"log_value"``:
            it compares ``log V``, for values beyond float32's ``exp`` (``log V`` of a balanced state is the
            rest of the response's ``Σ (r − log π̂)``, often over 88 nats; see :func:`balance_log_values`).
            The ``value/*`` metrics then report ``log V`` too.

    Returns:
        ``(loss, metrics)``: ``loss`` is ``[B]`` float32 per pair; its batch mean is the mean SubTB over all
        responses plus ``λ_value`` times the mean hinge over pairs. Metrics (all 0, not NaN, for an empty
        batch): ``loss`` (the batch mean of ``loss``), ``subtb``, ``subtb/chosen``, ``subtb/rejected``,
        ``subtb/db_residual_abs`` and those of :func:`value_discrimination_loss`.

    References:
        Shen et al. 2026, LLMDoctor (arXiv 2601.10416), TFPO: ``L_TFPO = L_SubTB + λ·L_value``.

    Notes:
        - ``Q(s_t) = exp(Σ_{k<t} r_k)`` and the terminal anchor are our reading of what the paper leaves open
          (:func:`log_prefix_scores`, :func:`log_flows`); SubTB is normalised per trajectory rather than summed
          (:func:`subtrajectory_balance_loss`).
        - The hinge is on ``V`` itself (``exp(log_v)``), as written in the paper, unless ``value_hinge`` is
          ``"log_value"`` (our option: at balanced values ``exp`` overflows float32, and the paper's public code
          clamps ``log F`` to [−10, 10] instead, which stops the gradient of every flow beyond it).
        - Masks with holes (forced tokens inside a response) are our extension; the paper's responses are
          contiguous.
        - ``prior_logps`` is our option, not in the paper. Without it the flows balance only against
          ``exp(Σ r)``: every sampled response is tens of nats less likely under the doctor than balance asks,
          so subtrajectory balance raises ``log π̂`` of every training token, chosen and rejected alike, and a
          short run teaches a sharper copy of the patient. With a prior the target is the KL-regularised optimum
          ``π₀(y)·exp(Σ r)`` (Korbak et al. 2022, arXiv 2205.11275; an LM prior in a GFlowNet's reward as in
          Hu et al. 2024, arXiv 2310.04363): a doctor equal to ``π₀`` starts with residuals made of the token
          rewards alone.
    """
    logps = jnp.asarray(token_logps, F32)
    if logps.ndim != 3 or logps.shape[1] != 2:
        raise ValueError(f"tfpo_loss: expected [B, 2, T] arrays (chosen, rejected), got {logps.shape}")
    if lam_value < 0:
        raise ValueError(f"tfpo_loss: lam_value must be >= 0, got {lam_value}")
    if value_hinge not in ("value", "log_value"):
        raise ValueError(f"tfpo_loss: value_hinge must be 'value' or 'log_value', got {value_hinge!r}")
    batch, _, length = logps.shape
    valid = as_mask(mask, logps)
    flat = (2 * batch, length)
    flat_valid = valid.reshape(flat)
    step_scores = jnp.asarray(token_rewards, F32)
    if prior_logps is not None:
        step_scores = step_scores + jnp.asarray(prior_logps, F32)
    log_q = log_prefix_scores(step_scores.reshape(flat), flat_valid)
    anchored = _anchored_log_v(jnp.reshape(log_v, (2 * batch, length + 1)), flat_valid, anchor_terminal)
    flows = jnp.where(_state_mask(flat_valid), log_q, 0.0) + anchored
    subtb, subtb_metrics = subtrajectory_balance_loss(flows, logps.reshape(flat), flat_valid, lam=lam)
    subtb = subtb.reshape(batch, 2)
    if value_mask is None:
        first = jnp.argmax(valid, axis=-1)[..., None]
        value_at = (jnp.arange(length) == first) & jnp.any(valid, axis=-1, keepdims=True)
    else:
        value_at = as_mask(value_mask, logps) & valid
    # exp only where selected: a garbage log value elsewhere could overflow and poison the gradient.
    values_after = jnp.where(value_at, anchored.reshape(batch, 2, length + 1)[..., 1:], 0.0)
    if value_hinge == "value":
        values_after = jnp.exp(values_after)
    hinge, value_metrics = value_discrimination_loss(
        values_after[:, 0], values_after[:, 1], value_at[:, 0], value_at[:, 1], gamma=gamma
    )
    loss = 0.5 * (subtb[:, 0] + subtb[:, 1]) + lam_value * hinge
    has_states = jnp.any(valid, axis=-1)
    metrics = {
        "loss": masked_mean(loss),
        "subtb": subtb_metrics["subtb"],
        "subtb/chosen": masked_mean(subtb[:, 0], has_states[:, 0]),
        "subtb/rejected": masked_mean(subtb[:, 1], has_states[:, 1]),
        "subtb/db_residual_abs": subtb_metrics["subtb/db_residual_abs"],
        **value_metrics,
    }
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
