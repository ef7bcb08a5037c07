import collections.abc
import types
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rlax
import torch

from jaxalign.losses.core import aggregate
from jaxalign.losses.ppo import (
    KL_ESTIMATORS,
    AdaptiveKLState,
    adaptive_kl_init,
    adaptive_kl_update,
    gae,
    kl_estimate,
    ppo_policy_loss,
    ppo_value_loss,
    shape_rewards,
    whiten,
)
from tests.losses.conftest import B, T, V, poison, right_padded_mask
from tests.oracles import legacy_trl, legacy_trl_method

LENGTHS = [7, 4, 1]
GAMMA, LAM = 0.97, 0.9


# ---------------------------------------------------------------- oracles


def _trl011_core():
    return legacy_trl(
        "0.11.4",
        "trl/core.py",
        ["masked_mean", "masked_var", "masked_whiten", "clip_by_value", "entropy_from_logits", "flatten_dict"],
        extra_globals={"Dict": dict, "Mapping": collections.abc.Mapping},
    )


def _trl011_method(name, core):
    helpers = {k: getattr(core, k) for k in vars(core)}
    return legacy_trl_method(
        "0.11.4", "trl/trainer/ppo_trainer.py", "PPOTrainer", name, extra_globals={**helpers, "warnings": warnings}
    )


def _trl011_self(**config):
    defaults = dict(gamma=GAMMA, lam=LAM, whiten_rewards=False, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1,
                    ratio_threshold=10.0, kl_penalty="kl")
    return types.SimpleNamespace(config=types.SimpleNamespace(**{**defaults, **config}),
                                 kl_ctl=types.SimpleNamespace(value=0.05))


def _numpy_gae(r, v, lengths, gamma, lam, bootstrap=None):
    """Slow float64 reference: GAE row by row over each row's valid prefix."""
    r, v = np.asarray(r, np.float64), np.asarray(v, np.float64)
    adv = np.zeros_like(r)
    for b, length in enumerate(lengths):
        next_value = 0.0 if bootstrap is None else float(bootstrap[b])
        running = 0.0
        for t in reversed(range(length)):
            delta = r[b, t] + gamma * next_value - v[b, t]
            running = delta + gamma * lam * running
            adv[b, t] = running
            next_value = v[b, t]
    mask = right_padded_mask(lengths, r.shape[1]) > 0
    return adv, np.where(mask, adv + v, 0.0)


def _numpy_whiten(x, mask, shift_mean=True, unbiased=True, eps=1e-8):
    vals = np.asarray(x, np.float64)[np.asarray(mask) > 0]
    mean = vals.mean()
    var = ((vals - mean) ** 2).sum() / (len(vals) - 1 if unbiased else len(vals))
    out = (np.asarray(x, np.float64) - mean) / np.sqrt(var + eps)
    return np.where(np.asarray(mask) > 0, out + (0 if shift_mean else mean), 0.0)


def _rollout(rng):
    mask = right_padded_mask(LENGTHS)
    r = rng.normal(size=(B, T)).astype(np.float32)
    v = rng.normal(size=(B, T)).astype(np.float32)
    return r, v, mask


# ---------------------------------------------------------------- gae


@pytest.mark.parametrize("bootstrap", [None, np.array([0.5, -1.25, 2.0], np.float32)])
def test_gae_matches_numpy_loop_with_garbage_in_padding(rng, bootstrap):
    r, v, mask = _rollout(rng)
    adv, returns = jax.jit(gae, static_argnames=("gamma", "lam"))(
        poison(r, mask), poison(v, mask, np.inf), mask, gamma=GAMMA, lam=LAM, bootstrap_value=bootstrap
    )
    chex.assert_shape([adv, returns], (B, T))
    expected_adv, expected_returns = _numpy_gae(r, v, LENGTHS, GAMMA, LAM, bootstrap)
    np.testing.assert_allclose(adv, expected_adv, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(returns, expected_returns, rtol=1e-6, atol=1e-6)


def test_gae_hand_values():
    # r = (0, 1), V = (0.5, 0.25), γ = 0.5, λ = 0.5, terminal after step 1:
    # δ1 = 1 − 0.25 = 0.75; δ0 = 0 + 0.5·0.25 − 0.5 = −0.375; A0 = −0.375 + 0.25·0.75 = −0.1875.
    adv, returns = gae(jnp.array([[0.0, 1.0]]), jnp.array([[0.5, 0.25]]), None, gamma=0.5, lam=0.5)
    np.testing.assert_allclose(adv, [[-0.1875, 0.75]], rtol=1e-6)
    np.testing.assert_allclose(returns, [[0.3125, 1.0]], rtol=1e-6)


def test_gae_matches_trl_0_11_compute_advantages(rng):
    r, v, mask = _rollout(rng)
    core = _trl011_core()
    compute_advantages = _trl011_method("compute_advantages", core)
    values_t, adv_t, returns_t = compute_advantages(
        _trl011_self(), torch.tensor(v), torch.tensor(r), torch.tensor(mask)
    )
    adv, returns = gae(r, v, mask, gamma=GAMMA, lam=LAM)
    whitened = whiten(adv, mask)
    valid = mask > 0
    # TRL leaves (0 − μ)/σ in padded slots of the whitened advantages; only valid slots are defined.
    np.testing.assert_allclose(np.asarray(whitened)[valid], adv_t.numpy()[valid], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(returns, returns_t.numpy(), rtol=1e-6, atol=1e-6)


def test_gae_with_whitened_rewards_matches_trl_0_11_on_unpadded_rows(rng):
    # TRL 0.11 leaks the reward mean into padded rows when whiten_rewards=True (see whiten's Notes), so the
    # comparison is on rows without padding.
    r, v, _ = _rollout(rng)
    mask = np.ones((B, T), np.float32)
    core = _trl011_core()
    compute_advantages = _trl011_method("compute_advantages", core)
    _, adv_t, returns_t = compute_advantages(
        _trl011_self(whiten_rewards=True), torch.tensor(v), torch.tensor(r), torch.tensor(mask)
    )
    adv, returns = gae(whiten(r, mask, shift_mean=False), v, mask, gamma=GAMMA, lam=LAM)
    np.testing.assert_allclose(whiten(adv, mask), adv_t.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(returns, returns_t.numpy(), rtol=1e-6, atol=1e-6)


def test_gae_matches_rlax_truncated_gae_per_row(rng):
    r, v, mask = _rollout(rng)
    bootstrap = np.array([0.3, -0.7, 1.1], np.float32)
    adv, _ = gae(r, v, mask, gamma=GAMMA, lam=LAM, bootstrap_value=bootstrap)
    for b, length in enumerate(LENGTHS):
        expected = rlax.truncated_generalized_advantage_estimation(
            jnp.asarray(r[b, :length]),
            jnp.full((length,), GAMMA),
            LAM,
            jnp.concatenate([jnp.asarray(v[b, :length]), jnp.asarray(bootstrap[b : b + 1])]),
        )
        np.testing.assert_allclose(adv[b, :length], expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(adv[b, length:], 0.0)


def test_gae_lambda_one_is_discounted_return_minus_value(rng):
    r, v, mask = _rollout(rng)
    adv, returns = gae(r, v, mask, gamma=GAMMA, lam=1.0)
    for b, length in enumerate(LENGTHS):
        discounted = [sum(GAMMA**k * r[b, t + k] for k in range(length - t)) for t in range(length)]
        np.testing.assert_allclose(adv[b, :length], np.array(discounted) - v[b, :length], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(returns[b, :length], discounted, rtol=1e-5, atol=1e-6)


def test_gae_lambda_zero_is_td_error(rng):
    r, v, mask = _rollout(rng)
    adv, _ = gae(r, v, mask, gamma=GAMMA, lam=0.0)
    next_v = np.concatenate([v[:, 1:], np.zeros((B, 1), np.float32)], axis=1) * np.roll(mask, -1, axis=1)
    next_v[:, -1] = 0.0
    expected = np.where(mask > 0, r + GAMMA * next_v - v, 0.0)
    np.testing.assert_allclose(adv, expected, rtol=1e-6, atol=1e-6)


def test_gae_masked_equals_sliced(rng):
    r, v, mask = _rollout(rng)
    adv, returns = gae(poison(r, mask), poison(v, mask), mask, gamma=GAMMA, lam=LAM)
    for b, length in enumerate(LENGTHS):
        alone_adv, alone_returns = gae(r[b : b + 1, :length], v[b : b + 1, :length], None, gamma=GAMMA, lam=LAM)
        np.testing.assert_allclose(adv[b : b + 1, :length], alone_adv, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(returns[b : b + 1, :length], alone_returns, rtol=1e-6, atol=1e-6)


def test_gae_skips_masked_holes_inside_a_sequence(rng):
    r, v, _ = _rollout(rng)
    mask = np.ones((1, T), np.float32)
    mask[0, [2, 3]] = 0.0  # e.g. tool-output tokens inside a response
    keep = mask[0] > 0
    adv, _ = gae(poison(r[:1], mask), poison(v[:1], mask), mask, gamma=GAMMA, lam=LAM)
    compact, _ = gae(r[:1, keep], v[:1, keep], None, gamma=GAMMA, lam=LAM)
    np.testing.assert_allclose(adv[0, keep], compact[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(adv[0, ~keep], 0.0)


def test_gae_gradient_is_finite_with_nan_padding(rng):
    r, v, mask = _rollout(rng)

    def objective(r, v):
        adv, returns = gae(r, v, mask, gamma=GAMMA, lam=LAM)
        return jnp.sum(adv) + jnp.sum(returns**2)

    grads = jax.grad(objective, argnums=(0, 1))(poison(r, mask), poison(v, mask))
    for g in grads:
        assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(np.asarray(g)[mask == 0], 0.0)
    # GAE is linear in r: ∂ΣA/∂r_t = Σ_{k≤t} (γλ)^{t−k}, e.g. for t = 0 of a full row it is 1.
    assert np.asarray(grads[0])[0, 0] != 0.0


# ---------------------------------------------------------------- whiten


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_numpy(rng, unbiased, shift_mean):
    x = (rng.normal(size=(B, T)) * 3 + 1).astype(np.float32)
    mask = right_padded_mask(LENGTHS)
    got = jax.jit(whiten, static_argnames=("shift_mean", "unbiased"))(
        poison(x, mask), mask, shift_mean=shift_mean, unbiased=unbiased
    )
    chex.assert_shape(got, (B, T))
    np.testing.assert_allclose(got, _numpy_whiten(x, mask, shift_mean, unbiased), rtol=1e-6, atol=1e-6)


def test_whiten_biased_and_unbiased_differ_by_bessel_factor():
    # x = (1, 3): μ = 2, Σ(x − μ)² = 2, unbiased σ² = 2 → y = ±1/√2; biased σ² = 1 → y = ±1.
    x = jnp.array([[1.0, 3.0]])
    np.testing.assert_allclose(whiten(x, unbiased=True, eps=0.0), [[-(0.5**0.5), 0.5**0.5]], rtol=1e-6)
    np.testing.assert_allclose(whiten(x, unbiased=False, eps=0.0), [[-1.0, 1.0]], rtol=1e-6)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_trl_0_29_masked_whiten(rng, shift_mean):
    x = (rng.normal(size=(B, T)) * 2 - 0.5).astype(np.float32)
    mask = right_padded_mask(LENGTHS)
    helpers = legacy_trl(
        "0.29.1", "trl/experimental/ppo/ppo_trainer.py", ["masked_mean", "masked_var", "masked_whiten"]
    )
    expected = helpers.masked_whiten(torch.tensor(x), torch.tensor(mask), shift_mean=shift_mean)
    expected = torch.masked_fill(expected, torch.tensor(mask) == 0, 0)  # as trl.experimental.ppo does
    np.testing.assert_allclose(whiten(x, mask, shift_mean=shift_mean), expected.numpy(), rtol=1e-6, atol=1e-6)


def test_whiten_degenerate_counts_are_finite():
    x = jnp.array([[5.0, jnp.nan, jnp.inf]])
    none = jnp.zeros((1, 3))
    one = jnp.array([[1.0, 0.0, 0.0]])
    np.testing.assert_array_equal(whiten(x, none), [[0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(whiten(x, one), [[0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(whiten(x, one, shift_mean=False), [[5.0, 0.0, 0.0]])


def test_whiten_gradient_is_finite_with_nan_padding(rng):
    x = rng.normal(size=(B, T)).astype(np.float32)
    mask = right_padded_mask(LENGTHS)
    grad = jax.grad(lambda x: jnp.sum(whiten(x, mask) * jnp.arange(T)))(poison(x, mask))
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(np.asarray(grad)[mask == 0], 0.0)
    assert np.any(np.asarray(grad)[mask > 0] != 0.0)


# ---------------------------------------------------------------- kl_estimate


def test_kl_estimate_hand_values():
    # π = 1/2, π_ref = 1/4: log ρ = ln 2; k2 = ½ ln²2; k3 = (1/2 − 1) + ln 2.
    logps, ref = jnp.log(jnp.array([[0.5]])), jnp.log(jnp.array([[0.25]]))
    ln2 = np.log(2.0)
    expected = {"k1": ln2, "k2": 0.5 * ln2**2, "k3": ln2 - 0.5, "abs": ln2}
    for name, value in expected.items():
        np.testing.assert_allclose(kl_estimate(logps, ref, estimator=name), [[value]], rtol=1e-6)
    np.testing.assert_allclose(kl_estimate(ref, logps, estimator="abs"), [[ln2]], rtol=1e-6)


def test_kl_estimators_k1_k3_are_unbiased_for_kl_policy_to_ref():
    # Direction check: averaged over tokens sampled from π, k1 and k3 estimate KL(π ‖ π_ref), not
    # KL(π_ref ‖ π). π ∝ exp(linspace(0, 3)), π_ref uniform: KL(π‖π_ref) ≈ 0.354, KL(π_ref‖π) ≈ 0.415;
    # with 1e5 samples the standard errors are ≈ 0.0024 (k1) and 0.0018 (k3), so 0.015 separates them.
    rng = np.random.default_rng(3)
    pi = np.exp(np.linspace(0.0, 3.0, V))
    pi /= pi.sum()
    ref = np.full(V, 1.0 / V)
    forward = np.sum(pi * np.log(pi / ref))
    reverse = np.sum(ref * np.log(ref / pi))
    assert abs(forward - reverse) > 0.05
    tokens = rng.choice(V, size=(1, 100_000), p=pi)
    logps, ref_logps = np.log(pi)[tokens].astype(np.float32), np.log(ref)[tokens].astype(np.float32)
    for name in ("k1", "k3"):
        estimate = float(jnp.mean(kl_estimate(logps, ref_logps, estimator=name)))
        np.testing.assert_allclose(estimate, forward, atol=0.015)
    assert np.all(np.asarray(kl_estimate(logps, ref_logps, estimator="k3")) >= 0)


@pytest.mark.parametrize(("trl_name", "ours"), [("kl", "k1"), ("mse", "k2"), ("abs", "abs")])
def test_kl_estimate_matches_trl_0_11_kl_penalty(rng, trl_name, ours):
    logps = np.log(rng.uniform(0.05, 1.0, size=(B, T))).astype(np.float32)
    ref = np.log(rng.uniform(0.05, 1.0, size=(B, T))).astype(np.float32)
    kl_penalty = legacy_trl_method("0.11.4", "trl/trainer/ppo_trainer.py", "PPOTrainer", "_kl_penalty")
    expected = kl_penalty(_trl011_self(kl_penalty=trl_name), torch.tensor(logps), torch.tensor(ref))
    got = jax.jit(kl_estimate, static_argnames="estimator")(logps, ref, estimator=ours)
    chex.assert_shape(got, (B, T))
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6, atol=1e-6)


def test_kl_estimate_k3_matches_trl_experimental_formula(rng):
    # trl.experimental.ppo (inline in train()): logr = ref − logp; kl = (exp(logr) − 1) − logr.
    logps = np.log(rng.uniform(0.05, 1.0, size=(B, T))).astype(np.float32)
    ref = np.log(rng.uniform(0.05, 1.0, size=(B, T))).astype(np.float32)
    logr = torch.tensor(ref) - torch.tensor(logps)
    expected = (logr.exp() - 1) - logr
    np.testing.assert_allclose(kl_estimate(logps, ref, estimator="k3"), expected.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_kl_estimate_masks_and_gradient_with_nan_padding(rng, estimator):
    mask = right_padded_mask(LENGTHS)
    logps = rng.normal(size=(B, T)).astype(np.float32)
    ref = rng.normal(size=(B, T)).astype(np.float32)
    value = kl_estimate(poison(logps, mask), poison(ref, mask), mask, estimator=estimator)
    np.testing.assert_array_equal(np.asarray(value)[mask == 0], 0.0)
    grad = jax.grad(lambda x: jnp.sum(kl_estimate(x, poison(ref, mask), mask, estimator=estimator)))(
        poison(logps, mask)
    )
    assert np.all(np.isfinite(grad))
    assert np.any(np.asarray(grad)[mask > 0] != 0.0)


def test_kl_estimate_rejects_unknown_estimator():
    with pytest.raises(ValueError, match="k3"):
        kl_estimate(jnp.zeros((1, 1)), jnp.zeros((1, 1)), estimator="full")


# ---------------------------------------------------------------- shape_rewards


@pytest.mark.parametrize(("trl_name", "ours"), [("kl", "k1"), ("mse", "k2"), ("abs", "abs")])
def test_shape_rewards_matches_trl_0_11_compute_rewards(rng, trl_name, ours):
    mask = right_padded_mask(LENGTHS)
    score = rng.normal(size=(B,)).astype(np.float32)
    logps = np.log(rng.uniform(0.05, 1.0, size=(B, T))).astype(np.float32)
    ref = np.log(rng.uniform(0.05, 1.0, size=(B, T))).astype(np.float32)
    this = _trl011_self(kl_penalty=trl_name)
    kl_penalty = legacy_trl_method("0.11.4", "trl/trainer/ppo_trainer.py", "PPOTrainer", "_kl_penalty")
    this._kl_penalty = lambda a, b: kl_penalty(this, a, b)
    compute_rewards = legacy_trl_method("0.11.4", "trl/trainer/ppo_trainer.py", "PPOTrainer", "compute_rewards")
    rewards_t, non_score_t, kl_t = compute_rewards(
        this, torch.tensor(score), torch.tensor(logps), torch.tensor(ref), torch.tensor(mask)
    )
    shaped = jax.jit(shape_rewards, static_argnames="estimator")(
        score, poison(logps, mask), poison(ref, mask), mask, kl_coef=0.05, estimator=ours
    )
    chex.assert_shape(list(shaped), (B, T))
    # TRL keeps the (meaningless) padded-slot values and masks them later in compute_advantages.
    valid = mask > 0
    for got, expected in zip(shaped, (rewards_t, non_score_t, kl_t)):
        np.testing.assert_allclose(np.asarray(got)[valid], expected.numpy()[valid], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(got)[~valid], 0.0)


def test_shape_rewards_hand_values_with_missing_eos_penalty():
    # β = 0.5, k1 = log ρ = 0.2 everywhere (−0.1 per token); lengths 3 and 2; row 1 lacks EOS (penalty 1).
    mask = right_padded_mask([3, 2], length=3)
    logps = jnp.full((2, 3), -1.0)
    ref = jnp.full((2, 3), -1.2)
    shaped = shape_rewards(
        jnp.array([2.0, 3.0]), logps, ref, mask, kl_coef=0.5, missing_eos_penalty=1.0,
        contains_eos=jnp.array([True, False]),
    )
    np.testing.assert_allclose(shaped.rewards, [[-0.1, -0.1, 1.9], [-0.1, 1.9, 0.0]], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(shaped.non_score_rewards, [[-0.1] * 3, [-0.1, -0.1, 0.0]], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(shaped.kl, [[0.2] * 3, [0.2, 0.2, 0.0]], rtol=1e-6, atol=1e-7)


def test_shape_rewards_empty_row_gets_nothing_and_penalty_needs_eos_flags():
    mask = jnp.array([[1.0, 0.0], [0.0, 0.0]])
    shaped = shape_rewards(jnp.array([1.0, 5.0]), jnp.zeros((2, 2)), jnp.zeros((2, 2)), mask, kl_coef=0.1)
    np.testing.assert_array_equal(shaped.rewards, [[1.0, 0.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="contains_eos"):
        shape_rewards(jnp.zeros(2), jnp.zeros((2, 2)), jnp.zeros((2, 2)), mask, kl_coef=0.1, missing_eos_penalty=1.0)


def test_shape_rewards_accepts_traced_kl_coef_and_is_differentiable_under_nan_padding(rng):
    mask = right_padded_mask(LENGTHS)
    logps = rng.normal(size=(B, T)).astype(np.float32)

    @jax.jit
    def total(logps, beta):
        return jnp.sum(shape_rewards(jnp.ones(B), logps, jnp.zeros((B, T)), mask, kl_coef=beta).rewards)

    grad = jax.grad(total)(poison(logps, mask), jnp.float32(0.1))
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(np.asarray(grad)[mask > 0], -0.1, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(grad)[mask == 0], 0.0)


# ---------------------------------------------------------------- policy / value losses


def _ppo_batch(rng):
    mask = right_padded_mask(LENGTHS)
    old = np.log(rng.uniform(0.05, 1.0, size=(B, T))).astype(np.float32)
    # Log-ratios up to ±0.5 so that some tokens are clipped on either side.
    new = (old + rng.uniform(-0.5, 0.5, size=(B, T))).astype(np.float32)
    adv = rng.normal(size=(B, T)).astype(np.float32)
    old_values = rng.normal(size=(B, T)).astype(np.float32)
    values = (old_values + rng.uniform(-0.5, 0.5, size=(B, T))).astype(np.float32)
    returns = rng.normal(size=(B, T)).astype(np.float32)
    return mask, old, new, adv, old_values, values, returns


def test_policy_and_value_losses_match_trl_0_11_loss_and_its_gradients(rng):
    mask, old, new, adv, old_values, values, returns = _ppo_batch(rng)
    core = _trl011_core()
    trl_loss = _trl011_method("loss", core)
    new_t = torch.tensor(new, requires_grad=True)
    values_t = torch.tensor(values, requires_grad=True)
    logits = torch.zeros(B, T, V)
    pg_t, vf_t, stats = trl_loss(
        _trl011_self(), torch.tensor(old), torch.tensor(old_values), logits, values_t, new_t,
        torch.tensor(mask), torch.tensor(adv), torch.tensor(returns),
    )
    (pg_t + vf_t).backward()
    vf_coef = 0.1

    def objective(new, values):
        pg, pg_metrics = ppo_policy_loss(new, old, adv, mask, clip_eps=0.2)
        vf, vf_metrics = ppo_value_loss(values, old_values, returns, mask, clip_eps=0.2)
        pg_sum, count = aggregate(pg, mask)
        vf_sum, _ = aggregate(vf, mask)
        return pg_sum / count + vf_coef * vf_sum / count, (pg_sum / count, vf_sum / count, pg_metrics, vf_metrics)

    (_, (pg, vf, pg_metrics, vf_metrics)), grads = jax.jit(
        jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)
    )(poison(new, mask), poison(values, mask))
    close = dict(rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pg, pg_t.item(), **close)
    np.testing.assert_allclose(vf_coef * vf, vf_t.item(), **close)
    np.testing.assert_allclose(pg_metrics["clipfrac"], stats["policy/clipfrac"].item(), **close)
    assert 0.0 < pg_metrics["clipfrac"] < 1.0
    np.testing.assert_allclose(pg_metrics["approx_kl/k2"], stats["policy/approxkl"].item(), **close)
    np.testing.assert_allclose(pg_metrics["approx_kl/k1"], stats["policy/policykl"].item(), **close)
    np.testing.assert_allclose(vf_metrics["vf_clipfrac"], stats["val/clipfrac"].item(), **close)
    np.testing.assert_allclose(vf_metrics["value_error"], stats["val/error"].item(), **close)
    valid = mask > 0
    np.testing.assert_allclose(np.asarray(grads[0])[valid], new_t.grad.numpy()[valid], **close)
    np.testing.assert_allclose(np.asarray(grads[1])[valid], values_t.grad.numpy()[valid], **close)
    for g in grads:
        assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(np.asarray(g)[~valid], 0.0)


def test_policy_loss_matches_rlax_clipped_surrogate(rng):
    _, old, new, adv, *_ = _ppo_batch(rng)
    loss, _ = ppo_policy_loss(new, old, adv, None, clip_eps=0.2)
    total, count = aggregate(loss, None)
    ratio = jnp.exp(jnp.asarray(new - old)).reshape(-1)
    expected = rlax.clipped_surrogate_pg_loss(ratio, jnp.asarray(adv).reshape(-1), 0.2)
    np.testing.assert_allclose(total / count, expected, rtol=1e-6, atol=1e-6)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage(rng):
    mask, old, _, adv, *_ = _ppo_batch(rng)
    loss, metrics = ppo_policy_loss(poison(old, mask), poison(old, mask), poison(adv, mask), mask)
    total, count = aggregate(loss, mask)
    np.testing.assert_allclose(total / count, -adv[mask > 0].mean(), rtol=1e-6, atol=1e-7)
    for name in ("clipfrac", "dual_clipfrac", "approx_kl/k1", "approx_kl/k2", "approx_kl/k3"):
        assert metrics[name] == 0.0, name
    assert metrics["ratio/mean"] == 1.0 and metrics["ratio/max"] == 1.0


def test_policy_loss_hand_values_asymmetric_and_dual_clip():
    # ρ = (1.25, 5, 2, 0.5); A = (+1, −1, −1, −1); ε_l = 0.2, ε_h = 0.28, c = 3.
    #   t0: max(−1.25, −1.25) = −1.25 (inside the clip-higher range; symmetric ε gives −1.2)
    #   t1: max(5, 1.2) = 5 → dual clip min(5, 3) = 3 (active)
    #   t2: max(2, 1.2) = 2 < 3 (dual clip inactive)
    #   t3: max(0.5, 0.8) = 0.8 (clipped from below), < 3
    logps = jnp.log(jnp.array([[1.25, 5.0, 2.0, 0.5]]))
    old = jnp.zeros((1, 4))
    adv = jnp.array([[1.0, -1.0, -1.0, -1.0]])
    loss, metrics = ppo_policy_loss(logps, old, adv, None, clip_eps=0.2, clip_eps_high=0.28, dual_clip=3.0)
    np.testing.assert_allclose(loss, [[-1.25, 3.0, 2.0, 0.8]], rtol=1e-6)
    np.testing.assert_allclose(metrics["dual_clipfrac"], 0.25, rtol=1e-6)
    np.testing.assert_allclose(metrics["clipfrac"], 0.25, rtol=1e-6)
    np.testing.assert_allclose(metrics["ratio/max"], 5.0, rtol=1e-6)
    symmetric, _ = ppo_policy_loss(logps, old, adv, None, clip_eps=0.2)
    np.testing.assert_allclose(symmetric, [[-1.2, 5.0, 2.0, 0.8]], rtol=1e-6)
    # The dual-clipped token carries no gradient; clipped tokens neither.
    grad = jax.grad(lambda x: jnp.sum(ppo_policy_loss(x, old, adv, None, dual_clip=3.0)[0]))(logps)
    np.testing.assert_allclose(grad, [[0.0, 0.0, 2.0, 0.0]], atol=1e-6)


def test_policy_loss_k3_approx_kl_hand_value():
    # ρ = 2 on one token: k3 = (2 − 1) − ln 2; k2 = ½ ln² 2; k1 = −ln 2.
    _, metrics = ppo_policy_loss(jnp.log(jnp.array([[2.0]])), jnp.zeros((1, 1)), jnp.ones((1, 1)), None)
    np.testing.assert_allclose(metrics["approx_kl/k3"], 1.0 - np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(metrics["approx_kl/k2"], 0.5 * np.log(2.0) ** 2, rtol=1e-6)
    np.testing.assert_allclose(metrics["approx_kl/k1"], -np.log(2.0), rtol=1e-6)


def test_policy_loss_rejects_dual_clip_at_most_one():
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_policy_loss(jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.ones((1, 1)), None, dual_clip=1.0)


def test_value_loss_hand_values():
    # V = 1.5, V_old = 1.0, R = 2.0, ε = 0.2: V_clip = 1.2; errors 0.25 and 0.64 → ½·0.64 = 0.32.
    values, old, returns = jnp.array([[1.5]]), jnp.array([[1.0]]), jnp.array([[2.0]])
    loss, metrics = ppo_value_loss(values, old, returns, None, clip_eps=0.2)
    np.testing.assert_allclose(loss, [[0.32]], rtol=1e-6)
    assert metrics["vf_clipfrac"] == 1.0
    unclipped, metrics = ppo_value_loss(values, old, returns, None, clip_eps=None)
    np.testing.assert_allclose(unclipped, [[0.125]], rtol=1e-6)
    assert metrics["vf_clipfrac"] == 0.0


def test_value_loss_explained_variance(rng):
    mask = right_padded_mask(LENGTHS)
    returns = rng.normal(size=(B, T)).astype(np.float32)
    _, perfect = ppo_value_loss(poison(returns, mask), returns, returns, mask, clip_eps=None)
    np.testing.assert_allclose(perfect["explained_variance"], 1.0, rtol=1e-6)
    constant = np.full((B, T), returns[mask > 0].mean(), np.float32)
    _, mean_only = ppo_value_loss(constant, constant, returns, mask)
    np.testing.assert_allclose(mean_only["explained_variance"], 0.0, atol=1e-6)
    _, flat = ppo_value_loss(jnp.zeros((B, T)), jnp.zeros((B, T)), jnp.ones((B, T)), mask)
    assert flat["explained_variance"] == 0.0


def test_losses_jit_equals_eager(rng):
    mask, old, new, adv, old_values, values, returns = _ppo_batch(rng)
    kwargs = dict(clip_eps=0.1, clip_eps_high=0.3, dual_clip=2.0)
    eager = ppo_policy_loss(new, old, adv, mask, **kwargs)
    jitted = jax.jit(lambda *a: ppo_policy_loss(*a, **kwargs))(new, old, adv, mask)
    chex.assert_trees_all_close(eager, jitted, rtol=1e-6, atol=1e-7)
    chex.assert_shape(eager[0], (B, T))
    eager = ppo_value_loss(values, old_values, returns, mask)
    jitted = jax.jit(ppo_value_loss)(values, old_values, returns, mask)
    chex.assert_trees_all_close(eager, jitted, rtol=1e-6, atol=1e-7)
    chex.assert_shape(eager[0], (B, T))
    eager = gae(returns, values, mask, gamma=GAMMA, lam=LAM)
    jitted = jax.jit(lambda *a: gae(*a, gamma=GAMMA, lam=LAM))(returns, values, mask)
    chex.assert_trees_all_close(eager, jitted, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- adaptive KL controller


def test_adaptive_kl_hand_values():
    # β = 0.1, KL = 12, target 6: e = clip(1, ±0.2) = 0.2; β ← 0.1·(1 + 0.2·256/10000) = 0.100512.
    state = adaptive_kl_init(0.1)
    up = adaptive_kl_update(state, 12.0, 256, target=6.0, horizon=10000)
    np.testing.assert_allclose(up.kl_coef, 0.100512, rtol=1e-6)
    # KL = 5.4: e = −0.1 (inside the clip); β ← 0.1·(1 − 0.1·256/10000) = 0.099744.
    down = adaptive_kl_update(state, 5.4, 256, target=6.0, horizon=10000)
    np.testing.assert_allclose(down.kl_coef, 0.099744, rtol=1e-6)
    fixed = adaptive_kl_update(state, 12.0, 256, target=None, horizon=10000)
    assert fixed is state


def test_adaptive_kl_matches_trl_0_11_controller_under_jit_scan():
    controllers = legacy_trl("0.11.4", "trl/trainer/utils.py", ["AdaptiveKLController"])
    trl_ctl = controllers.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    kls = np.array([0.5, 7.0, 30.0, 6.1, 2.0, 12.0], np.float32)
    expected = []
    for kl in kls:
        trl_ctl.update(float(kl), 64)
        expected.append(trl_ctl.value)

    @jax.jit
    def run(kls):
        def step(state, kl):
            state = adaptive_kl_update(state, kl, 64, target=6.0, horizon=10000)
            return state, state.kl_coef

        return jax.lax.scan(step, adaptive_kl_init(0.2), kls)

    final, trajectory = run(kls)
    assert isinstance(final, AdaptiveKLState)
    np.testing.assert_allclose(trajectory, expected, rtol=1e-6)


def test_bf16_inputs_are_computed_in_float32(rng):
    mask, old, new, adv, old_values, values, returns = _ppo_batch(rng)
    low = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    outputs = [
        ppo_policy_loss(low(new), low(old), low(adv), mask)[0],
        ppo_value_loss(low(values), low(old_values), low(returns), mask)[0],
        *gae(low(returns), low(values), mask, gamma=GAMMA, lam=LAM),
        whiten(low(adv), mask),
        kl_estimate(low(new), low(old), mask, estimator="k3"),
        *shape_rewards(low(adv[:, 0]), low(new), low(old), mask, kl_coef=0.1),
    ]
    for out in outputs:
        chex.assert_type(out, jnp.float32)
        chex.assert_shape(out, (B, T))
