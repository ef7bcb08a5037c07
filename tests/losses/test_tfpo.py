import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses.tfpo import (
    balance_log_values,
    first_divergence_mask,
    log_flows,
    log_prefix_scores,
    non_terminal_states,
    subtrajectory_balance_loss,
    tfpo_loss,
    value_discrimination_loss,
)
from tests.losses.conftest import B, T, poison

LAMS = [None, 0.5, 0.9, 1.0, 1.5, 3.0]


def _span_mask(spans, length=T):
    """``[len(spans), length]`` mask, 1 on ``start <= t < stop`` (a completion mask: prompt, response, padding)."""
    return np.array([[start <= t < stop for t in range(length)] for start, stop in spans], np.float32)


def _state_mask(mask):
    """States of each row's trajectory: indices first..last + 1 of its valid tokens (holes included)."""
    out = np.zeros((mask.shape[0], mask.shape[1] + 1), bool)
    for b, row in enumerate(mask):
        tokens = np.nonzero(row)[0]
        if len(tokens):
            out[b, tokens[0] : tokens[-1] + 2] = True
    return out


def _subtb_reference(flows, logps, mask, lam):
    """Float64 sum over every pair of states m < n of each row, enumerated explicitly.

    A row's states are the indices first..last + 1 of its valid tokens; a masked token in between is a forced
    step (log π = 0). The weights λ^{n−m} are formed in log space and divided by their maximum before
    exponentiating: the raw weights overflow even float64 (3^1000 ≈ 1e477); the ratio is unchanged.
    """
    out = np.zeros(flows.shape[0])
    for b in range(flows.shape[0]):
        tokens = np.nonzero(mask[b])[0]
        if len(tokens) == 0:
            continue
        states = np.arange(tokens[0], tokens[-1] + 2)
        m, n = (states[i] for i in np.triu_indices(len(states), k=1))
        # Σ_{k=m}^{n−1} log π as a difference of float64 prefix sums (exact to ~1e-13 here).
        running = np.concatenate([[0.0], np.cumsum(np.where(mask[b] > 0, logps[b], 0.0).astype(np.float64))])
        residual = flows[b, n].astype(np.float64) - flows[b, m] - (running[n] - running[m])
        log_w = np.zeros(len(m)) if lam is None else (n - m) * np.log(lam)
        w = np.exp(log_w - log_w.max())
        out[b] = np.sum(w * residual**2) / np.sum(w)
    return out


def _random_trajectories(rng, spans, length=T):
    mask = _span_mask(spans, length)
    flows = rng.normal(size=(len(spans), length + 1)).astype(np.float32) * 2
    logps = -rng.exponential(1.5, size=(len(spans), length)).astype(np.float32)
    return flows, logps, mask


SPANS = [(0, 7), (2, 6), (0, 1), (3, 3)]  # full, prompt-offset, one token, empty


@pytest.mark.parametrize("lam", LAMS)
def test_subtb_equals_float64_pair_loop(rng, lam):
    flows, logps, mask = _random_trajectories(rng, SPANS)
    loss, metrics = jax.jit(lambda f, p, m: subtrajectory_balance_loss(f, p, m, lam=lam))(
        poison(flows, _state_mask(mask), np.nan), poison(logps, mask, np.inf), mask
    )
    chex.assert_shape(loss, (len(SPANS),))
    expected = _subtb_reference(flows, logps, mask, lam)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["subtb"], expected[:3].mean(), rtol=1e-5)  # the empty row has no pairs
    eager, _ = subtrajectory_balance_loss(flows, logps, mask, lam=lam)
    np.testing.assert_allclose(loss, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("length", [1, 2, 5, 13])
@pytest.mark.parametrize("lam", [None, 0.9])
def test_subtb_equals_pair_loop_for_several_lengths(rng, length, lam):
    spans = [(0, length), (1, length), (0, max(length - 1, 1))]
    flows, logps, mask = _random_trajectories(rng, spans, length)
    loss, _ = subtrajectory_balance_loss(flows, logps, mask, lam=lam)
    np.testing.assert_allclose(loss, _subtb_reference(flows, logps, mask, lam), rtol=1e-5, atol=1e-6)


def test_subtb_hand_value():
    # Two tokens, log π = 0, log F = (0, 1, 3): δ_01 = 1, δ_12 = 2, δ_02 = 3 → mean (1 + 4 + 9)/3;
    # with λ = 0.5 the weights are (0.5, 0.5, 0.25): (0.5 + 2 + 2.25)/1.25 = 3.8.
    flows, logps = jnp.array([[0.0, 1.0, 3.0]]), jnp.zeros((1, 2))
    np.testing.assert_allclose(subtrajectory_balance_loss(flows, logps)[0], [14.0 / 3.0], rtol=1e-6)
    np.testing.assert_allclose(subtrajectory_balance_loss(flows, logps, lam=0.5)[0], [3.8], rtol=1e-6)


@pytest.mark.parametrize("lam", LAMS)
def test_subtb_is_zero_on_a_flow_consistent_trajectory(rng, lam):
    _, logps, mask = _random_trajectories(rng, SPANS[:3])
    # F(s_{t+1}) = F(s_t)·π(y_{t+1}|s_t): log F is a start value plus the running sum of log π.
    start = rng.normal(size=(3, 1)) * 5
    flows = (start + np.concatenate([np.zeros((3, 1)), np.cumsum(logps * mask, -1)], -1)).astype(np.float32)
    loss, metrics = subtrajectory_balance_loss(poison(flows, _state_mask(mask)), logps, mask, lam=lam)
    np.testing.assert_allclose(loss, 0.0, atol=1e-9)
    np.testing.assert_allclose(metrics["subtb/db_residual_abs"], 0.0, atol=1e-5)
    flows[0, 3] += 0.5
    assert subtrajectory_balance_loss(flows, logps, mask, lam=lam)[0][0] > 1e-3


def test_subtb_lambda_one_equals_unweighted_mean(rng):
    flows, logps, mask = _random_trajectories(rng, SPANS)
    unweighted, _ = subtrajectory_balance_loss(flows, logps, mask)
    np.testing.assert_allclose(subtrajectory_balance_loss(flows, logps, mask, lam=1.0)[0], unweighted, rtol=1e-5)


@pytest.mark.parametrize("lam", LAMS)
def test_subtb_is_accurate_on_a_long_drifting_trajectory(rng, lam):
    # 1000 steps after one prompt token. c_t drifts by ~1 per step: a float32 sum of raw moments Σλ·c² would
    # cancel badly. Raw weights λ^{n−m} overflow float32 from L ≈ 88/ln λ (219 steps at λ = 1.5, 80 at λ = 3).
    length = 1001
    logps = -rng.exponential(1.0, size=(1, length)).astype(np.float32)
    flows = np.concatenate([[0.0], np.cumsum(logps[0] + 1.0 + 0.1 * rng.normal(size=length))])[None]
    flows = flows.astype(np.float32)
    mask = np.ones((1, length), np.float32)
    mask[0, 0] = 0.0
    loss, _ = subtrajectory_balance_loss(flows, logps, mask, lam=lam)
    np.testing.assert_allclose(loss, _subtb_reference(flows, logps, mask, lam), rtol=1e-5)
    grad = jax.grad(lambda f: subtrajectory_balance_loss(f, logps, mask, lam=lam)[0][0])(flows)
    assert np.all(np.isfinite(grad)) and np.any(np.asarray(grad) != 0)


@pytest.mark.parametrize("lam", LAMS)
def test_subtb_reports_non_finite_inputs_inside_a_trajectory_instead_of_zero(rng, lam):
    flows, logps, mask = _random_trajectories(rng, SPANS[:2])
    flows[0, 3] = np.nan
    loss, _ = subtrajectory_balance_loss(flows, logps, mask, lam=lam)
    assert np.isnan(loss[0])
    assert np.isfinite(loss[1])


@pytest.mark.parametrize("lam", [None, 0.9])
def test_subtb_gradients_are_finite_with_garbage_and_match_clean_inputs(rng, lam):
    flows, logps, mask = _random_trajectories(rng, SPANS)

    def objective(f, p):
        return jnp.sum(subtrajectory_balance_loss(f, p, mask, lam=lam)[0])

    grads = jax.grad(objective, argnums=(0, 1))(poison(flows, _state_mask(mask)), poison(logps, mask, -np.inf))
    clean = jax.grad(objective, argnums=(0, 1))(flows, logps)
    for grad, reference, valid in zip(grads, clean, (_state_mask(mask), mask > 0)):
        assert np.all(np.isfinite(grad))
        np.testing.assert_array_equal(np.asarray(grad)[~valid], 0.0)
        np.testing.assert_allclose(grad, reference, rtol=1e-5, atol=1e-6)
    # Moving every log-flow of a row by the same constant leaves every residual unchanged.
    np.testing.assert_allclose(np.asarray(grads[0]).sum(-1), 0.0, atol=1e-4)


@pytest.mark.parametrize("lam", [0.0, -0.5, np.inf, np.nan])
def test_subtb_rejects_bad_lambda(lam):
    with pytest.raises(ValueError, match="lam"):
        subtrajectory_balance_loss(jnp.zeros((1, 3)), jnp.zeros((1, 2)), lam=lam)


# Masks with holes: prompt, response tokens around forced (masked) tokens, padding.
HOLED = np.array(
    [
        [0, 1, 1, 0, 0, 1, 0],  # a two-token hole: state 4 lies strictly inside it
        [1, 0, 1, 0, 1, 1, 1],  # two one-token holes
        [1, 1, 1, 1, 1, 1, 1],  # no hole
        [0, 0, 1, 0, 0, 0, 0],  # a single token
    ],
    np.float32,
)


@pytest.mark.parametrize("lam", LAMS)
def test_subtb_treats_a_hole_as_a_forced_step(rng, lam):
    flows = (2 * rng.normal(size=(4, T + 1))).astype(np.float32)
    logps = -rng.exponential(1.5, size=(4, T)).astype(np.float32)
    span = np.zeros_like(HOLED)
    states = _state_mask(HOLED)
    span[states[:, :-1] & states[:, 1:]] = 1.0
    # Garbage in the masked log-probs (holes included) and in the log-flows outside the trajectory.
    loss, metrics = jax.jit(lambda f, p: subtrajectory_balance_loss(f, p, HOLED, lam=lam))(
        poison(flows, states, np.nan), poison(logps, HOLED, np.inf)
    )
    np.testing.assert_allclose(loss, _subtb_reference(flows, logps, HOLED, lam), rtol=1e-5, atol=1e-6)
    # The same as the hole's tokens being valid with π = 1, i.e. log π = 0.
    filled, _ = subtrajectory_balance_loss(flows, np.where(HOLED > 0, logps, 0.0), span, lam=lam)
    np.testing.assert_allclose(loss, filled, rtol=1e-6, atol=1e-6)
    residuals = flows[:, 1:] - flows[:, :-1] - np.where(HOLED > 0, logps, 0.0)
    np.testing.assert_allclose(metrics["subtb/db_residual_abs"], np.abs(residuals)[span > 0].mean(), rtol=1e-5)
    grads = jax.grad(lambda f, p: jnp.sum(subtrajectory_balance_loss(f, p, HOLED, lam=lam)[0]), argnums=(0, 1))(
        poison(flows, states, np.nan), poison(logps, HOLED, -np.inf)
    )
    for grad, valid in zip(grads, (states, HOLED > 0)):
        assert np.all(np.isfinite(grad))
        np.testing.assert_array_equal(np.asarray(grad)[~valid], 0.0)
    assert np.all(np.asarray(grads[0])[states] != 0)  # every state of the span, hole states included, is trained


def test_log_prefix_scores_and_anchored_log_flows_hand_values():
    rewards = jnp.array([[9.0, 0.5, -0.2, 0.7, 9.0]])
    mask = jnp.array([[0, 1, 1, 1, 0]])  # one prompt token, three response tokens, one pad
    log_q = log_prefix_scores(rewards, mask)
    chex.assert_shape(log_q, (1, 6))
    np.testing.assert_allclose(log_q, [[0.0, 0.0, 0.5, 0.3, 1.0, 1.0]], rtol=1e-6)
    log_v = jnp.array([[np.nan, 0.1, 0.2, 0.3, 0.4, np.inf]])
    # Trajectory states are indices 1..4; index 4 (after the last token) is terminal: V = 1.
    flows = log_flows(log_q, log_v, mask)
    np.testing.assert_allclose(flows, [[0.0, 0.1, 0.7, 0.6, 1.0, 0.0]], rtol=1e-6)
    unanchored = log_flows(log_q, log_v, mask, anchor_terminal=False)
    np.testing.assert_allclose(unanchored, [[0.0, 0.1, 0.7, 0.6, 1.4, 0.0]], rtol=1e-6)


def test_log_flows_with_a_hole_reads_every_state_of_the_span_and_anchors_only_the_last():
    rewards = jnp.array([[9.0, 0.5, 9.0, 9.0, 0.7, 9.0]])
    mask = jnp.array([[0, 1, 0, 0, 1, 0]])  # tokens 2, 3 are forced: reward 0, states 2..4 are ordinary
    log_q = log_prefix_scores(rewards, mask)
    np.testing.assert_allclose(log_q, [[0.0, 0.0, 0.5, 0.5, 0.5, 1.2, 1.2]], rtol=1e-6)
    log_v = jnp.array([[np.nan, 0.1, 0.2, 0.3, 0.4, 0.5, np.inf]])
    np.testing.assert_allclose(log_flows(log_q, log_v, mask), [[0.0, 0.1, 0.7, 0.8, 0.9, 1.2, 0.0]], rtol=1e-6)


@pytest.mark.parametrize("anchor_terminal", [True, False])
def test_log_flows_under_jit_equals_eager(rng, anchor_terminal):
    states = _state_mask(HOLED)
    log_q = rng.normal(size=(4, T + 1)).astype(np.float32)
    log_v = poison(rng.normal(size=(4, T + 1)), states, np.nan)
    flows = jax.jit(lambda q, v, m: log_flows(q, v, m, anchor_terminal=anchor_terminal))(log_q, log_v, HOLED)
    chex.assert_shape(flows, (4, T + 1))
    np.testing.assert_array_equal(flows, log_flows(log_q, log_v, HOLED, anchor_terminal=anchor_terminal))
    expected = np.where(states, log_q + log_v, 0.0)
    if anchor_terminal:
        terminal = (np.arange(T + 1) == states.shape[1] - 1 - np.argmax(states[:, ::-1], -1)[:, None]) & states
        expected = np.where(terminal, log_q, expected)
    np.testing.assert_allclose(flows, expected, rtol=1e-6)


def test_first_divergence_mask_finds_the_children_of_the_common_prefix():
    chosen = jnp.array([[5, 6, 7, 8, 0], [1, 2, 3, 0, 0], [4, 4, 4, 0, 0], [1, 2, 0, 0, 0]])
    rejected = jnp.array([[9, 6, 7, 0, 0], [0, 1, 2, 9, 0], [4, 4, 4, 0, 0], [1, 2, 3, 0, 0]])
    chosen_mask = jnp.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    rejected_mask = jnp.array([[1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    at_w, at_l = jax.jit(first_divergence_mask)(chosen, rejected, chosen_mask, rejected_mask)
    chex.assert_shape((at_w, at_l), (4, 5))
    # Row 0 differs at its first token; row 1 shares "1 2" but sits one slot later on the rejected side;
    # row 2 is identical and row 3 is a strict prefix: no divergence within the shorter response.
    np.testing.assert_array_equal(np.argmax(at_w, -1)[:2], [0, 2])
    np.testing.assert_array_equal(np.argmax(at_l, -1)[:2], [0, 3])
    np.testing.assert_array_equal(np.sum(at_w, -1), [1, 1, 0, 0])
    np.testing.assert_array_equal(np.sum(at_l, -1), [1, 1, 0, 0])


def test_value_discrimination_hand_values():
    # γ = 0.1. Pair 0: 0.5 − 0.2 ≥ γ → 0. Pair 1: mean(0.2, 0.4) − 0.25 = 0.05 → 0.05. Pair 2: no state.
    v_w = jnp.array([[0.5, 9.0], [0.2, 0.4], [1.0, 1.0]])
    v_l = jnp.array([[0.2, np.nan], [0.25, -7.0], [0.0, 0.0]])
    mask_w = jnp.array([[1, 0], [1, 1], [0, 0]])
    mask_l = jnp.array([[1, 0], [1, 0], [1, 0]])
    loss_fn = jax.jit(lambda a, b, c, d: value_discrimination_loss(a, b, chosen_mask=c, rejected_mask=d, gamma=0.1))
    loss, metrics = loss_fn(v_w, v_l, mask_w, mask_l)
    chex.assert_shape(loss, (3,))
    np.testing.assert_allclose(loss, [0.0, 0.05, 0.0], atol=1e-7)
    np.testing.assert_allclose(metrics["value_loss"], 0.025, rtol=1e-5)
    np.testing.assert_allclose(metrics["value/accuracy"], 1.0)
    np.testing.assert_allclose(metrics["value/margin"], (0.3 + 0.05) / 2, rtol=1e-5)
    with pytest.raises(ValueError, match="gamma"):
        value_discrimination_loss(v_w, v_l, gamma=-1.0)


def test_value_discrimination_gradient_hand_values_with_garbage_in_unselected_slots():
    # γ = 0.1. Pair 0: V̄_w = mean(0.3, 0.5) = 0.4, V̄_l = 0.35, gap 0.05 < γ: loss 0.05, so
    # ∂/∂v_w = −½ at each selected chosen state and ∂/∂v_l = +1 at the selected rejected one.
    # Pair 1: gap 0.9 ≥ γ: no gradient. Pair 2: nothing selected on the rejected side: no gradient.
    v_w = jnp.array([[0.3, 0.5, np.nan], [1.0, -np.inf, np.inf], [0.2, 0.0, np.nan]])
    v_l = jnp.array([[np.inf, 0.35, np.nan], [0.1, np.nan, -np.inf], [np.nan, np.inf, -np.inf]])
    chosen_mask = jnp.array([[1, 1, 0], [1, 0, 0], [1, 0, 0]])
    rejected_mask = jnp.array([[0, 1, 0], [1, 0, 0], [0, 0, 0]])

    def objective(a, b):
        return jnp.sum(value_discrimination_loss(a, b, chosen_mask, rejected_mask, gamma=0.1)[0])

    np.testing.assert_allclose(objective(v_w, v_l), 0.05, rtol=1e-5)
    grad_w, grad_l = jax.jit(jax.grad(objective, argnums=(0, 1)))(v_w, v_l)
    np.testing.assert_allclose(grad_w, [[-0.5, -0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], atol=1e-7)
    np.testing.assert_allclose(grad_l, [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], atol=1e-7)


def _pair_batch(rng):
    mask = np.stack([_span_mask([(1, 7), (2, 5), (0, 3)]), _span_mask([(1, 4), (2, 7), (0, 1)])], axis=1)
    logps = -rng.exponential(1.5, size=(B, 2, T)).astype(np.float32)
    log_v = (0.3 * rng.normal(size=(B, 2, T + 1))).astype(np.float32)
    rewards = rng.uniform(-1, 1, size=(B, 2, T)).astype(np.float32)
    return logps, log_v, rewards, mask


def _tfpo_reference(logps, log_v, rewards, mask, value_at, lam, lam_value, gamma, log_hinge=False):
    """Float64 composition from the definitions: Q = exp(cumulative reward), V(terminal) = 1, pair loop, hinge."""
    out = np.zeros(logps.shape[0])
    for b in range(logps.shape[0]):
        values, subtb = [], []
        for side in range(2):
            m = mask[b, side]
            tokens = np.nonzero(m)[0]
            log_q = np.concatenate([[0.0], np.cumsum(np.where(m > 0, rewards[b, side], 0.0))])
            lv = log_v[b, side].astype(np.float64).copy()
            lv[tokens[-1] + 1] = 0.0
            subtb.append(_subtb_reference((log_q + lv)[None], logps[b, side][None], m[None], lam)[0])
            selected = lv[1:][value_at[b, side] > 0]
            selected = selected if log_hinge else np.exp(selected)
            values.append(selected.mean() if selected.size else None)
        hinge = 0.0 if None in values else max(0.0, gamma - (values[0] - values[1]))
        out[b] = 0.5 * sum(subtb) + lam_value * hinge
    return out


@pytest.mark.parametrize("lam", [None, 0.8, 1.5])
def test_balance_log_values_zero_every_subtrajectory_residual(rng, lam):
    """Identity: flows from the balancing log values satisfy SubTB exactly, holes (forced steps) included; the
    value at a row's first state is Σ (r − log π) over its span; states outside the trajectory are 0."""
    logps, _, rewards, mask = _pair_batch(rng)
    logps, rewards, mask = (x.reshape(2 * B, T) for x in (logps, rewards, mask))
    mask[0, 3] = 0.0  # a hole inside row 0's span (1..6)
    log_v = np.array(balance_log_values(logps, rewards, mask))
    flows = log_flows(log_prefix_scores(rewards, mask), log_v, mask)
    loss, metrics = subtrajectory_balance_loss(flows, logps, mask, lam=lam)
    np.testing.assert_allclose(loss, 0.0, atol=1e-9)
    assert float(metrics["subtb/db_residual_abs"]) < 1e-5
    for row in range(2 * B):
        tokens = np.nonzero(mask[row])[0]
        np.testing.assert_allclose(log_v[row, tokens[0]], np.sum((rewards[row] - logps[row]) * mask[row]), rtol=1e-5)
        assert log_v[row, tokens[-1] + 1] == 0.0
        states = _state_mask(mask[row][None])[0]
        assert np.all(log_v[row][~states] == 0.0)
        expected = states.copy()
        expected[tokens[-1] + 1] = False
        np.testing.assert_array_equal(np.asarray(non_terminal_states(mask))[row], expected)
    # A perturbed value breaks balance: the identity is not vacuous.
    log_v[0, 2] += 1.0
    assert float(subtrajectory_balance_loss(log_flows(log_prefix_scores(rewards, mask), log_v, mask), logps, mask,
                                            lam=lam)[0][0]) > 1e-3


def test_the_log_value_hinge_compares_log_values_and_survives_large_values(rng):
    logps, log_v, rewards, mask = _pair_batch(rng)
    first_token = np.arange(T) == np.argmax(mask, -1)[..., None]
    loss, _ = tfpo_loss(logps, log_v, rewards, mask, gamma=0.5, value_hinge="log_value")
    expected = _tfpo_reference(logps, log_v, rewards, mask, first_token, None, 1.0, 0.5, log_hinge=True)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
    big = log_v + 200.0  # V = exp(200) overflows float32: the paper's hinge is inf − inf there
    assert not np.all(np.isfinite(tfpo_loss(logps, big, rewards, mask, value_hinge="value")[0]))
    loss, metrics = tfpo_loss(logps, big, rewards, mask, value_hinge="log_value")
    assert np.all(np.isfinite(loss)) and np.isfinite(metrics["value/margin"])
    grads = jax.grad(lambda v: jnp.sum(tfpo_loss(logps, v, rewards, mask, value_hinge="log_value")[0]))(big)
    assert np.all(np.isfinite(grads))
    with pytest.raises(ValueError, match="value_hinge must be 'value' or 'log_value', got 'V'"):
        tfpo_loss(logps, log_v, rewards, mask, value_hinge="V")


@pytest.mark.parametrize("lam", [None, 0.8])
def test_tfpo_loss_matches_float64_composition(rng, lam):
    logps, log_v, rewards, mask = _pair_batch(rng)
    loss, metrics = jax.jit(lambda *a: tfpo_loss(*a, lam=lam, lam_value=2.0, gamma=0.5))(logps, log_v, rewards, mask)
    eager, _ = tfpo_loss(logps, log_v, rewards, mask, lam=lam, lam_value=2.0, gamma=0.5)
    np.testing.assert_allclose(loss, eager, rtol=1e-6, atol=1e-6)
    chex.assert_shape(loss, (B,))
    first_token = np.arange(T) == np.argmax(mask, -1)[..., None]
    expected = _tfpo_reference(logps, log_v, rewards, mask, first_token, lam, 2.0, 0.5)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], expected.mean(), rtol=1e-5)
    assert metrics["value_loss"] > 0  # the hinge is active on random values with γ = 0.5


def test_tfpo_loss_with_divergence_value_mask_and_garbage_padding(rng):
    logps, log_v, rewards, mask = _pair_batch(rng)
    tokens = rng.integers(0, 11, size=(B, 2, T))
    tokens[:, 1] = tokens[:, 0]
    # Row 0 diverges at position 3 (its third response token), row 1 at its first response token; row 2's
    # rejected response is a prefix of its chosen one, so it has no value term.
    tokens[0, 1, 3] = (tokens[0, 0, 3] + 1) % 11
    tokens[1, 1, 2] = (tokens[1, 0, 2] + 1) % 11
    value_at = np.stack(first_divergence_mask(tokens[:, 0], tokens[:, 1], mask[:, 0], mask[:, 1]), axis=1)
    np.testing.assert_array_equal(np.argmax(value_at[:, 0], -1)[:2], [3, 2])
    np.testing.assert_array_equal(value_at[2], False)
    states = np.concatenate([mask, np.zeros((B, 2, 1))], -1) + np.concatenate([np.zeros((B, 2, 1)), mask], -1)
    args = (poison(logps, mask), poison(log_v, states, np.inf), poison(rewards, mask), mask, value_at)
    loss, _ = tfpo_loss(*args, lam=0.9)
    expected = _tfpo_reference(logps, log_v, rewards, mask, value_at, 0.9, 1.0, 0.1)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)

    def objective(p, v):
        return jnp.sum(tfpo_loss(p, v, *args[2:], lam=0.9)[0])

    grads = jax.grad(objective, argnums=(0, 1))(*args[:2])
    for grad, valid in zip(grads, (mask > 0, states > 0)):
        assert np.all(np.isfinite(grad))
        np.testing.assert_array_equal(np.asarray(grad)[~valid], 0.0)
    assert np.any(np.asarray(grads[1]) != 0)


def test_tfpo_loss_is_the_hinge_alone_on_flow_consistent_pairs(rng):
    # A doctor whose policy matches the flows exactly: log V = log F − log Q with log F(s_L) = log Q(s_L).
    logps, _, rewards, mask = _pair_batch(rng)
    running = np.concatenate([np.zeros((B, 2, 1)), np.cumsum(logps * mask, -1)], -1)
    log_q = np.asarray(log_prefix_scores(rewards.reshape(2 * B, T), mask.reshape(2 * B, T))).reshape(B, 2, T + 1)
    terminal = 1 + (mask * np.arange(T)).max(-1, keepdims=True).astype(int)
    offset = np.take_along_axis(log_q - running, terminal, -1)
    log_v = (running + offset - log_q).astype(np.float32)
    loss, metrics = tfpo_loss(logps, log_v, rewards, mask, lam_value=0.0)
    np.testing.assert_allclose(loss, 0.0, atol=1e-4)
    np.testing.assert_allclose(metrics["subtb"], 0.0, atol=1e-4)


@pytest.mark.parametrize("lam", [None, 1.5])
def test_tfpo_loss_with_holes_matches_float64_composition(rng, lam):
    logps, log_v, rewards, _ = _pair_batch(rng)
    mask = np.stack([HOLED[:3], HOLED[1:]], axis=1)
    states = np.stack([_state_mask(mask[:, 0]), _state_mask(mask[:, 1])], axis=1)
    args = (poison(logps, mask, np.inf), poison(log_v, states), poison(rewards, mask), mask)
    loss, _ = tfpo_loss(*args, lam=lam, gamma=0.5)
    first_token = np.arange(T) == np.argmax(mask, -1)[..., None]
    expected = _tfpo_reference(logps, log_v, rewards, mask, first_token, lam, 1.0, 0.5)
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)


def test_tfpo_loss_empty_batch_gives_zero_metrics_not_nan():
    empty = np.zeros((0, 2, T), np.float32)
    loss, metrics = jax.jit(tfpo_loss)(empty, np.zeros((0, 2, T + 1), np.float32), empty, empty)
    chex.assert_shape(loss, (0,))
    for name, value in metrics.items():
        assert value == 0.0, name


def test_tfpo_loss_rejects_unpaired_arrays():
    with pytest.raises(ValueError, match="B, 2, T"):
        tfpo_loss(jnp.zeros((3, 7)), jnp.zeros((3, 8)), jnp.zeros((3, 7)), jnp.ones((3, 7)))


def test_a_prior_adds_its_log_probs_to_the_prefix_scores_and_garbage_outside_the_mask_never_enters(rng):
    """tfpo_loss(..., prior_logps=p) is tfpo_loss with rewards r + p: the prior only moves log Q, and a NaN prior
    on padding changes nothing (loss and gradients)."""
    logps, log_v, rewards, mask = _pair_batch(rng)
    prior = rng.normal(-3.0, 1.0, logps.shape).astype(np.float32)
    with_prior, with_prior_metrics = tfpo_loss(logps, log_v, rewards, mask, None, prior, lam=0.8)
    summed, summed_metrics = tfpo_loss(logps, log_v, rewards + prior, mask, lam=0.8)
    np.testing.assert_allclose(with_prior, summed, rtol=1e-6)
    np.testing.assert_allclose(with_prior_metrics["subtb"], summed_metrics["subtb"], rtol=1e-6)
    garbage = np.where(mask > 0, prior, np.nan).astype(np.float32)

    def total(log_v, prior):
        return jnp.sum(tfpo_loss(logps, log_v, rewards, mask, None, prior, lam=0.8)[0])

    np.testing.assert_allclose(total(log_v, garbage), total(log_v, prior), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(total)(log_v, garbage), jax.grad(total)(log_v, prior), rtol=1e-5, atol=1e-6)


def test_a_doctor_equal_to_its_prior_is_balanced_by_the_rewards_to_go_alone(rng):
    """Hand-derived: with π̂ = π₀ the balancing log values are Σ_{k≥t} r_k (no surprisal), and at those values
    the SubTB term is exactly 0; the same values without the prior leave a large residual (the surprisal)."""
    logps, _, rewards, mask = _pair_batch(rng)
    rewards_to_go = np.flip(np.cumsum(np.flip(rewards * mask, -1), -1), -1)
    log_v = np.concatenate([rewards_to_go, np.zeros(rewards.shape[:-1] + (1,), np.float32)], -1)
    log_v = np.where(_state_mask(mask.reshape(2 * B, T)).reshape(B, 2, T + 1), log_v, 0.0)
    flat = (2 * B, T)
    balanced = balance_log_values(logps.reshape(flat), (rewards + logps).reshape(flat), mask.reshape(flat))
    np.testing.assert_allclose(np.asarray(balanced).reshape(B, 2, T + 1), log_v, rtol=1e-5, atol=1e-5)
    _, metrics = tfpo_loss(logps, log_v, rewards, mask, None, logps, lam_value=0.0)
    np.testing.assert_allclose(metrics["subtb"], 0.0, atol=1e-6)
    _, without = tfpo_loss(logps, log_v, rewards, mask, lam_value=0.0)
    assert float(without["subtb"]) > 1.0
