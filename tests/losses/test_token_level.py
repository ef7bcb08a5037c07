import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.losses.token_level import token_importance, token_rewards
from tests.losses.conftest import B, T, poison, right_padded_mask


def _logps(rng):
    pos = -rng.exponential(2.0, size=(B, T)).astype(np.float32)
    neg = -rng.exponential(2.0, size=(B, T)).astype(np.float32)
    return pos, neg, right_padded_mask([7, 4, 1])


def _importance_reference(pos, neg, mask, eps, tau):
    """Slow float64 loop over responses and tokens."""
    out = np.zeros(pos.shape)
    for b in range(pos.shape[0]):
        idx = [t for t in range(pos.shape[1]) if mask[b, t] > 0]
        gaps = [abs(float(pos[b, t]) - float(neg[b, t])) for t in idx]
        mean = sum(gaps) / len(gaps)
        for t, gap in zip(idx, gaps):
            out[b, t] = np.tanh(gap / (mean + eps) / tau)
    return out


def test_importance_hand_values():
    # Gaps |l_pos − l_neg| = [1, 3], mean 2: Δ̂ = [0.5, 1.5]; the padded third slot is ignored.
    pos = jnp.array([[-1.0, -4.0, 7.0]])
    neg = jnp.array([[-2.0, -1.0, 0.0]])
    mask = jnp.array([[1, 1, 0]])
    np.testing.assert_allclose(token_importance(pos, neg, mask, eps=0.0), [np.tanh([0.5, 1.5, 0.0])], rtol=1e-6)
    np.testing.assert_allclose(
        token_importance(pos, neg, mask, eps=0.0, tau=2.0), [np.tanh([0.25, 0.75, 0.0])], rtol=1e-6
    )


@pytest.mark.parametrize("eps,tau", [(1e-8, 1.0), (0.5, 0.7)])
def test_importance_matches_float64_reference(rng, eps, tau):
    pos, neg, mask = _logps(rng)
    importance = jax.jit(lambda p, n, m: token_importance(p, n, m, eps=eps, tau=tau))(pos, neg, mask)
    chex.assert_shape(importance, (B, T))
    np.testing.assert_allclose(importance, _importance_reference(pos, neg, mask, eps, tau), rtol=1e-6, atol=1e-7)
    eager = token_importance(pos, neg, mask, eps=eps, tau=tau)
    np.testing.assert_allclose(importance, eager, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scale", [0.5, 3.0, 250.0])
def test_importance_is_invariant_to_scaling_the_gaps(rng, scale):
    pos, neg, mask = _logps(rng)
    # Built in float64: the float32 rounding of the shifted log-prob is then the only error.
    scaled_pos = (neg.astype(np.float64) + scale * (pos.astype(np.float64) - neg)).astype(np.float32)
    base = token_importance(pos, neg, mask, eps=0.0)
    np.testing.assert_allclose(token_importance(scaled_pos, neg, mask, eps=0.0), base, rtol=2e-5, atol=1e-6)
    # ε breaks the invariance only at the ε scale.
    np.testing.assert_allclose(token_importance(scaled_pos, neg, mask), base, rtol=2e-5, atol=1e-6)


def test_padding_does_not_change_valid_importances(rng):
    pos, neg, mask = _logps(rng)
    padded = token_importance(poison(pos, mask), poison(neg, mask, np.inf), mask)
    assert np.all(np.isfinite(padded))
    np.testing.assert_array_equal(np.asarray(padded)[mask == 0], 0.0)
    for b in range(B):
        keep = mask[b] > 0
        alone = token_importance(pos[b][keep][None], neg[b][keep][None])
        np.testing.assert_allclose(padded[b][keep], alone[0], rtol=1e-6)


def test_importance_of_identical_faces_is_zero_not_nan():
    logps = jnp.full((2, 3), -1.5)
    np.testing.assert_array_equal(token_importance(logps, logps, eps=0.0), 0.0)


def test_importance_gradients_finite_with_garbage_in_padding(rng):
    pos, neg, mask = _logps(rng)
    grads = jax.grad(lambda p, n: jnp.sum(token_importance(p, n, mask)), argnums=(0, 1))(
        poison(pos, mask), poison(neg, mask, -np.inf)
    )
    for grad in grads:
        assert np.all(np.isfinite(grad))
        np.testing.assert_array_equal(np.asarray(grad)[mask == 0], 0.0)


def test_importance_rejects_bad_hyperparameters():
    logps = jnp.zeros((1, 2))
    with pytest.raises(ValueError, match="tau"):
        token_importance(logps, logps, tau=0.0)
    with pytest.raises(ValueError, match="eps"):
        token_importance(logps, logps, eps=-1.0)


def test_token_rewards_hand_values_sign_and_strict_threshold():
    importance = jnp.array([[0.05, 0.5, 0.9, 0.1], [0.05, 0.5, 0.9, 0.1]])
    mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 1]])
    rewards = jax.jit(lambda s, p, m: token_rewards(s, p, m, threshold=0.1))(importance, jnp.array([True, False]), mask)
    chex.assert_shape(rewards, (2, 4))
    # 0.05 is below θ, 0.1 is not strictly above it, 0.9 of row 1 is padding.
    np.testing.assert_allclose(rewards, [[0.0, 0.5, 0.9, 0.0], [0.0, -0.5, 0.0, 0.0]], rtol=1e-7)


def test_token_rewards_end_to_end_and_gradient_with_garbage(rng):
    pos, neg, mask = _logps(rng)
    preferred = np.array([True, False, True])
    importance = token_importance(pos, neg, mask)
    rewards = token_rewards(poison(importance, mask), preferred, mask, threshold=0.3)
    expected = _importance_reference(pos, neg, mask, 1e-8, 1.0)
    expected = np.where(expected > 0.3, expected, 0.0) * np.where(preferred, 1.0, -1.0)[:, None]
    np.testing.assert_allclose(rewards, expected, rtol=1e-6, atol=1e-7)
    assert np.any(np.asarray(rewards) < 0) and np.any(np.asarray(rewards) > 0)
    grad = jax.grad(lambda s: jnp.sum(token_rewards(s, preferred, mask)))(poison(importance, mask))
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(np.asarray(grad)[mask == 0], 0.0)


def test_token_rewards_mask_defaults_to_all_valid(rng):
    importance = rng.uniform(0, 1, size=(B, T)).astype(np.float32)
    preferred = np.array([True, False, False])
    rewards = jax.jit(lambda s, p: token_rewards(s, p, threshold=0.2))(importance, preferred)
    chex.assert_shape(rewards, (B, T))
    np.testing.assert_array_equal(rewards, token_rewards(importance, preferred, np.ones((B, T)), threshold=0.2))
    expected = np.where(importance > 0.2, importance, 0.0) * np.where(preferred, 1.0, -1.0)[:, None]
    np.testing.assert_allclose(rewards, expected, rtol=1e-7)


def test_token_rewards_rejects_a_mask_passed_where_the_labels_go(rng):
    importance = rng.uniform(0, 1, size=(B, T)).astype(np.float32)
    with pytest.raises(ValueError, match="preferred"):
        token_rewards(importance, np.ones((B, T)), np.array([True, False, True]))
