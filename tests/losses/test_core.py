import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxalign.losses.core import (
    AGGREGATIONS,
    aggregate,
    entropy,
    masked_mean,
    masked_sum,
    sequence_logps,
    token_logps,
)
from tests.losses.conftest import B, T, V, poison, right_padded_mask


def test_token_logps_matches_torch_log_softmax_gather(rng):
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
    targets = rng.integers(0, V, size=(B, T))
    got = jax.jit(token_logps)(logits, targets)
    chex.assert_shape(got, (B, T))
    chex.assert_type(got, jnp.float32)
    expected = torch.log_softmax(torch.tensor(logits), -1).gather(-1, torch.tensor(targets)[..., None])[..., 0]
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6, atol=1e-6)


def test_token_logps_hand_value():
    # logits (0, ln 3): p = (1/4, 3/4)
    got = token_logps(jnp.array([[0.0, np.log(3.0)]]), jnp.array([1]))
    np.testing.assert_allclose(got, [np.log(0.75)], rtol=1e-6)


def test_token_logps_bf16_is_computed_in_float32(rng):
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 4
    targets = rng.integers(0, V, size=(B, T))
    low = jnp.asarray(logits, jnp.bfloat16)
    got = token_logps(low, targets)
    chex.assert_type(got, jnp.float32)
    # Same bf16 values evaluated in float64: only the input rounding remains.
    reference = torch.log_softmax(torch.tensor(np.asarray(low.astype(jnp.float32)), dtype=torch.float64), -1)
    reference = reference.gather(-1, torch.tensor(targets)[..., None])[..., 0].numpy()
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)


def test_token_logps_out_of_range_targets_are_finite(rng):
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    targets = np.full((B, T), -100)
    assert np.all(np.isfinite(token_logps(logits, targets)))


def test_sequence_logps_sum_and_average():
    logps = jnp.array([[-1.0, -2.0, -3.0], [-4.0, np.nan, np.inf]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(sequence_logps(logps, mask), [-3.0, -4.0])
    np.testing.assert_allclose(sequence_logps(logps, mask, average=True), [-1.5, -4.0])
    empty = sequence_logps(logps, jnp.zeros((2, 3)), average=True)
    np.testing.assert_array_equal(empty, [0.0, 0.0])


def test_entropy_matches_torch_and_handles_masked_vocabulary(rng):
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 2
    expected = torch.distributions.Categorical(logits=torch.tensor(logits)).entropy().numpy()
    np.testing.assert_allclose(jax.jit(entropy)(logits), expected, rtol=1e-5, atol=1e-6)
    # Uniform over the 2 unmasked entries: H = ln 2, and -inf entries must not give NaN.
    masked_vocab = jnp.array([0.0, 0.0, -jnp.inf, -jnp.inf])
    np.testing.assert_allclose(entropy(masked_vocab), np.log(2.0), rtol=1e-6)


def test_masked_sum_ignores_garbage_and_keeps_gradients_finite(rng):
    values = rng.normal(size=(B, T)).astype(np.float32)
    mask = right_padded_mask([7, 4, 1])
    poisoned = poison(values, mask, np.nan)
    total, count = masked_sum(poisoned, mask)
    np.testing.assert_allclose(total, (values * mask).sum(), rtol=1e-6)
    assert count == 12
    # The reduction itself must pass a zero (not NaN) cotangent to garbage slots.
    grads = jax.grad(lambda x: masked_mean(2.0 * x, mask))(jnp.asarray(poisoned))
    assert np.all(np.isfinite(grads))
    np.testing.assert_array_equal(np.asarray(grads)[mask == 0], 0.0)


def test_masked_mean_of_empty_selection_is_zero():
    assert masked_mean(jnp.ones(5), jnp.zeros(5)) == 0.0


def _reference_aggregate(x, m, mode, max_tokens):
    # Direct float64 definitions, row by row.
    rows = [(x[b][m[b] > 0]).astype(np.float64) for b in range(x.shape[0])]
    nonempty = [r for r in rows if r.size]
    if mode == "token_mean":
        return np.concatenate(rows).sum() / max(sum(r.size for r in rows), 1)
    if mode == "sequence_mean":
        return np.mean([r.mean() for r in nonempty])
    if mode == "sequence_sum":
        return np.mean([r.sum() for r in nonempty])
    return np.concatenate(rows).sum() / (x.shape[0] * max_tokens)


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_aggregate_modes_and_microbatch_exactness(rng, mode):
    x = rng.normal(size=(6, T)).astype(np.float32)
    mask = right_padded_mask([7, 3, 0, 5, 1, 2])
    total, count = jax.jit(lambda a, b: aggregate(a, b, mode=mode, max_tokens=T))(poison(x, mask), mask)
    expected = _reference_aggregate(x, mask, mode, T)
    np.testing.assert_allclose(total / count, expected, rtol=1e-6)
    # Three micro-batches of two rows: summed (sum, count) pairs give the full-batch value.
    parts = [aggregate(x[i : i + 2], mask[i : i + 2], mode=mode, max_tokens=T) for i in range(0, 6, 2)]
    accumulated = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    np.testing.assert_allclose(accumulated, expected, rtol=1e-6)


def test_aggregate_rejects_unknown_mode():
    with pytest.raises(ValueError, match="unknown mode 'mean'"):
        aggregate(jnp.ones((2, 3)), mode="mean")


def test_token_logps_mask_keeps_nan_logits_out_of_value_and_gradient(rng):
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    targets = rng.integers(0, V, size=(B, T))
    mask = right_padded_mask([7, 4, 2])
    poisoned = poison(logits, mask[..., None], np.nan)

    def total(z):
        return sequence_logps(token_logps(z, targets, mask), mask).sum()

    np.testing.assert_allclose(total(poisoned), total(logits), rtol=1e-6)
    grads = jax.grad(total)(jnp.asarray(poisoned))
    assert np.all(np.isfinite(grads))
    np.testing.assert_array_equal(np.asarray(grads)[mask == 0], 0.0)
    np.testing.assert_array_equal(np.asarray(token_logps(poisoned, targets, mask))[mask == 0], 0.0)


def test_entropy_gradient_is_finite_with_masked_vocabulary():
    logits = jnp.array([[0.0, 1.0, -jnp.inf]])
    grads = jax.grad(lambda z: entropy(z).sum())(logits)
    assert np.all(np.isfinite(grads))
    # Over the two live entries the entropy gradient is ∂H/∂z_i = −p_i (z_i − Σ p z).
    p = np.exp([0.0, 1.0]) / np.exp([0.0, 1.0]).sum()
    expected = -p * (np.array([0.0, 1.0]) - (p * [0.0, 1.0]).sum())
    np.testing.assert_allclose(np.asarray(grads)[0, :2], expected, rtol=1e-5)
    assert grads[0, 2] == 0.0
