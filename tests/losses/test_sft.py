import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from jaxalign.losses.core import aggregate
from jaxalign.losses.sft import sft_loss
from tests.losses.conftest import B, T, V, poison, right_padded_mask


def _batch(rng):
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 2
    targets = rng.integers(0, V, size=(B, T))
    # Completion-only: a prompt prefix of 2 tokens and right padding are not trained on.
    mask = right_padded_mask([7, 5, 3])
    mask[:, :2] = 0
    return logits, targets, mask


def test_token_mean_matches_transformers_causal_lm_loss(rng):
    logits, targets, mask = _batch(rng)
    per_token, metrics = jax.jit(sft_loss)(logits, targets, mask)
    chex.assert_shape(per_token, (B, T))
    total, count = aggregate(per_token, mask, mode="token_mean")
    # transformers shifts labels itself: feed it labels shifted right by one, -100 where masked.
    labels = np.where(mask > 0, targets, -100)
    labels = np.concatenate([np.full((B, 1), -100), labels], axis=1)
    padded_logits = np.concatenate([logits, np.zeros((B, 1, V), np.float32)], axis=1)
    expected = ForCausalLMLoss(torch.tensor(padded_logits), torch.tensor(labels), vocab_size=V)
    np.testing.assert_allclose(total / count, expected.item(), rtol=1e-6)
    np.testing.assert_allclose(metrics["nll"], expected.item(), rtol=1e-6)


def test_sequence_mean_weighs_each_sequence_equally(rng):
    logits, targets, mask = _batch(rng)
    per_token, _ = sft_loss(logits, targets, mask)
    total, count = aggregate(per_token, mask, mode="sequence_mean")
    nll = -torch.log_softmax(torch.tensor(logits, dtype=torch.float64), -1)
    nll = nll.gather(-1, torch.tensor(targets)[..., None])[..., 0].numpy()
    expected = np.mean([nll[b][mask[b] > 0].mean() for b in range(B)])
    np.testing.assert_allclose(total / count, expected, rtol=1e-6)


def test_label_smoothing_matches_torch_cross_entropy(rng):
    logits, targets, mask = _batch(rng)
    per_token, _ = sft_loss(logits, targets, mask, label_smoothing=0.1)
    total, count = aggregate(per_token, mask)
    labels = torch.tensor(np.where(mask > 0, targets, -100)).reshape(-1)
    expected = torch.nn.functional.cross_entropy(
        torch.tensor(logits).reshape(-1, V), labels, ignore_index=-100, label_smoothing=0.1
    )
    np.testing.assert_allclose(total / count, expected.item(), rtol=1e-6)


def test_hand_value_and_accuracy():
    # Two positions, uniform over 2 tokens (nll ln 2) and a confident right guess.
    logits = jnp.array([[[0.0, 0.0], [10.0, 0.0]]])
    per_token, metrics = sft_loss(logits, jnp.array([[1, 0]]), jnp.array([[1, 1]]))
    np.testing.assert_allclose(per_token[0, 0], np.log(2.0), rtol=1e-6)
    # 4.5e-5 exactly; float32 resolves log p to ~1e-7 absolute (see token_logps Notes).
    np.testing.assert_allclose(per_token[0, 1], np.log1p(np.exp(-10.0)), rtol=0, atol=2e-7)
    # argmax of a tie is index 0 (wrong for target 1); the second is right.
    np.testing.assert_allclose(metrics["token_accuracy"], 0.5)


def test_masked_equals_sliced_and_gradients_finite(rng):
    logits, targets, mask = _batch(rng)
    per_token, _ = sft_loss(logits, targets, mask)
    for b in range(B):
        keep = mask[b] > 0
        alone, _ = sft_loss(logits[b][keep][None], targets[b][keep][None])
        np.testing.assert_allclose(per_token[b][keep], alone[0], rtol=1e-6)
    poisoned = poison(logits, mask[..., None], np.inf)

    def objective(z):
        total, count = aggregate(sft_loss(z, targets, mask)[0], mask)
        return total / count

    grads = jax.grad(objective)(jnp.asarray(poisoned))
    assert np.all(np.isfinite(grads))
    np.testing.assert_array_equal(np.asarray(grads)[mask == 0], 0.0)


def test_rejects_bad_label_smoothing():
    with pytest.raises(ValueError, match="label_smoothing"):
        sft_loss(jnp.zeros((1, 1, 2)), jnp.zeros((1, 1), int), label_smoothing=1.0)


def test_metrics_carry_no_gradient(rng):
    logits, targets, mask = _batch(rng)
    grads = jax.grad(lambda z: sft_loss(z, targets, mask)[1]["nll"])(jnp.asarray(logits))
    np.testing.assert_array_equal(grads, 0.0)
