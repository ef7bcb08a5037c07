import collections
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl.trainer.reward_trainer import RewardTrainer

from jaxalign.losses.core import masked_mean
from jaxalign.losses.reward import best_of_n_loss, bradley_terry_loss, preference_accuracy
from tests.losses.conftest import B, poison

D, N = 2, 5  # D ≠ B = 3: a [B] array broadcast along D would fail loudly or be caught by a value check


class _FixedRewardModel(torch.nn.Module):
    """Stands in for the reward model: returns the given ``[2B, 1]`` scores (chosen rows first, as TRL's collator)."""

    def __init__(self, scores):
        super().__init__()
        self.scores = scores

    def forward(self, **inputs):
        return types.SimpleNamespace(logits=self.scores)


def _trl_reward_loss(chosen, rejected, margin, center_coef):
    """TRL 1.16's real ``RewardTrainer.compute_loss`` on given rewards; returns (loss, logged metrics)."""
    trainer = object.__new__(RewardTrainer)
    model = _FixedRewardModel(torch.tensor(np.concatenate([chosen, rejected])[:, None]))
    model.eval()  # "eval" mode: compute_loss then skips the token count that needs an attention mask.
    trainer.model = model
    trainer.args = types.SimpleNamespace(center_rewards_coefficient=center_coef)
    trainer.accelerator = types.SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer._metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
    trainer._total_train_tokens, trainer._tp_size = 0, 1
    inputs = {} if margin is None else {"margin": torch.tensor(margin)}
    loss = trainer.compute_loss(model, inputs)
    return loss.item(), {key: values[-1] for key, values in trainer._metrics["eval"].items()}


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center_coef", [None, 0.01])
def test_bradley_terry_matches_trl_reward_trainer(rng, with_margin, center_coef):
    pairs = 7
    chosen = rng.normal(size=pairs).astype(np.float32) * 2
    rejected = rng.normal(size=pairs).astype(np.float32) * 2
    margin = rng.uniform(0, 2, size=pairs).astype(np.float32) if with_margin else None
    expected_loss, trl_metrics = _trl_reward_loss(chosen, rejected, margin, center_coef)
    loss, metrics = jax.jit(
        lambda c, r, m: bradley_terry_loss(c, r, margin=m, center_coef=center_coef or 0.0)
    )(chosen, rejected, margin)
    chex.assert_shape(loss, (pairs,))
    np.testing.assert_allclose(jnp.mean(loss), expected_loss, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(metrics["rewards/accuracies"], trl_metrics["accuracy"], rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/margins"], trl_metrics["margin"], rtol=1e-6, atol=1e-6)


def test_bradley_terry_hand_values():
    # r⁺ − r⁻ = 1: −log σ(1) = log(1 + e⁻¹); with margin 1 the logit is 0: log 2;
    # centering adds λ·(r⁺ + r⁻)² = 0.5·(1 + 0)² to the first pair and 0.5·(−1 − 2)² = 4.5 to the second.
    chosen, rejected = jnp.array([1.0, -1.0]), jnp.array([0.0, -2.0])
    loss, metrics = bradley_terry_loss(chosen, rejected)
    np.testing.assert_allclose(loss, [np.log1p(np.exp(-1.0))] * 2, rtol=1e-6)
    loss, _ = bradley_terry_loss(chosen, rejected, margin=1.0)
    np.testing.assert_allclose(loss, [np.log(2.0)] * 2, rtol=1e-6)
    loss, _ = bradley_terry_loss(chosen, rejected, center_coef=0.5)
    np.testing.assert_allclose(loss, np.log1p(np.exp(-1.0)) + np.array([0.5, 4.5]), rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/chosen"], 0.0)
    np.testing.assert_allclose(metrics["rewards/rejected"], -1.0)
    np.testing.assert_allclose(metrics["rewards/accuracies"], 1.0)


def _multi_dim_batch(rng):
    chosen = rng.normal(size=(B, D)).astype(np.float32)
    rejected = rng.normal(size=(B, D)).astype(np.float32)
    mask = np.ones((B, D), np.float32)
    mask[0, 1] = mask[2, 0] = 0  # two pairs lack a label on one dimension
    return chosen, rejected, mask


def test_multi_dimensional_matches_numpy_reference_and_ignores_unlabelled_slots(rng):
    chosen, rejected, mask = _multi_dim_batch(rng)
    weights = np.array([0.5, 2.0], np.float32)
    margin = rng.uniform(0, 1, size=(B, D)).astype(np.float32)
    loss_fn = jax.jit(lambda c, r, m: bradley_terry_loss(c, r, m, margin=margin, center_coef=0.1, weights=weights))
    loss, metrics = loss_fn(poison(chosen, mask), poison(rejected, mask, np.inf), mask)
    chex.assert_shape(loss, (B,))
    c, r = chosen.astype(np.float64), rejected.astype(np.float64)
    per_entry = np.log1p(np.exp(-(c - r - margin))) + 0.1 * (c + r) ** 2
    expected = np.sum(weights * mask * per_entry, axis=-1)
    np.testing.assert_allclose(loss, expected, rtol=1e-6, atol=1e-6)
    for d in range(D):
        keep = mask[:, d] > 0
        np.testing.assert_allclose(metrics[f"rewards/accuracies/{d}"], np.mean(c[keep, d] > r[keep, d]))
    np.testing.assert_allclose(metrics["rewards/accuracies"], np.sum((c > r) * mask) / mask.sum(), rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/margins"], np.sum((c - r) * mask) / mask.sum(), rtol=1e-6)


def test_multi_dimensional_gradients_are_finite_with_garbage(rng):
    chosen, rejected, mask = _multi_dim_batch(rng)

    def objective(c, r):
        return jnp.sum(bradley_terry_loss(c, r, mask, center_coef=0.01)[0])

    grads = jax.grad(objective, argnums=(0, 1))(poison(chosen, mask), poison(rejected, mask, -np.inf))
    for grad in grads:
        assert np.all(np.isfinite(grad))
        np.testing.assert_array_equal(np.asarray(grad)[mask == 0], 0.0)
    clean = jax.grad(objective, argnums=(0, 1))(chosen, rejected)
    np.testing.assert_allclose(grads[0], clean[0], rtol=1e-6)


@pytest.mark.parametrize("dims", [D, B])  # D ≠ B, and D = B where NumPy broadcasting would silently misalign
def test_per_pair_margin_and_mask_apply_to_every_dimension_of_a_pair(rng, dims):
    chosen = rng.normal(size=(B, dims)).astype(np.float32)
    rejected = rng.normal(size=(B, dims)).astype(np.float32)
    margin = np.array([0.0, 1.0, 2.5], np.float32)
    pair_mask = np.array([1, 0, 1], np.float32)
    loss_fn = jax.jit(lambda c, r, m, g: bradley_terry_loss(c, r, m, margin=g, center_coef=0.1))
    loss, metrics = loss_fn(poison(chosen, pair_mask[:, None]), rejected, pair_mask, margin)
    chex.assert_shape(loss, (B,))
    c, r = chosen.astype(np.float64), rejected.astype(np.float64)
    per_entry = np.log1p(np.exp(-(c - r - margin[:, None]))) + 0.1 * (c + r) ** 2
    np.testing.assert_allclose(loss, pair_mask * per_entry.sum(-1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(metrics["rewards/chosen"], c[pair_mask > 0].mean(), rtol=1e-6)
    # The same per-pair values written as [B, 1] columns or tiled to [B, D].
    for as_columns in (lambda x: x[:, None], lambda x: np.tile(x[:, None], dims)):
        columns = as_columns(pair_mask), as_columns(margin)
        same, _ = bradley_terry_loss(chosen, rejected, columns[0], margin=columns[1], center_coef=0.1)
        np.testing.assert_allclose(same, loss, rtol=1e-6, atol=1e-6)
    # A [1, D] margin applies per dimension.
    per_dim = np.arange(dims, dtype=np.float32)[None]
    loss, _ = bradley_terry_loss(chosen, rejected, margin=per_dim)
    np.testing.assert_allclose(loss, np.log1p(np.exp(-(c - r - per_dim))).sum(-1), rtol=1e-6)


def test_bradley_terry_rejects_margins_and_masks_that_do_not_fit():
    chosen = jnp.zeros((B, D))
    with pytest.raises(ValueError, match=r"margin of shape \(2,\) does not fit rewards of shape \(3, 2\)"):
        bradley_terry_loss(chosen, chosen, margin=jnp.ones(D))
    with pytest.raises(ValueError, match="mask of shape"):
        bradley_terry_loss(chosen, chosen, jnp.ones((B, D, 1)))
    with pytest.raises(ValueError, match="margin of shape"):
        bradley_terry_loss(jnp.zeros(B), jnp.zeros(B), margin=jnp.ones((B, 1)))
    with pytest.raises(ValueError, match="weights of shape"):
        bradley_terry_loss(chosen, chosen, weights=jnp.ones(B))


def test_empty_batch_gives_zero_metrics_not_nan():
    for rewards in (np.zeros((0,), np.float32), np.zeros((0, D), np.float32)):
        loss, metrics = jax.jit(bradley_terry_loss)(rewards, rewards)
        chex.assert_shape(loss, (0,))
        for name, value in metrics.items():
            assert value == 0.0, name
    loss, metrics = jax.jit(best_of_n_loss)(np.zeros((0, N), np.float32), np.zeros((0,), np.int32))
    chex.assert_shape(loss, (0,))
    for name, value in metrics.items():
        assert value == 0.0, name


def test_single_dimension_column_equals_scalar_rewards(rng):
    chosen, rejected = rng.normal(size=(2, B)).astype(np.float32)
    scalar, _ = bradley_terry_loss(chosen, rejected, center_coef=0.01)
    column, _ = bradley_terry_loss(chosen[:, None], rejected[:, None], center_coef=0.01)
    np.testing.assert_allclose(scalar, column, rtol=1e-7)


def test_bradley_terry_rejects_bad_arguments():
    with pytest.raises(ValueError, match="both be"):
        bradley_terry_loss(jnp.zeros(3), jnp.zeros(4))
    with pytest.raises(ValueError, match="center_coef"):
        bradley_terry_loss(jnp.zeros(3), jnp.zeros(3), center_coef=-1.0)
    with pytest.raises(ValueError, match="weights"):
        bradley_terry_loss(jnp.zeros(3), jnp.zeros(3), weights=jnp.ones(1))


def test_preference_accuracy_counts_ties_as_wrong_and_combines_exactly():
    chosen = jnp.array([[1.0, 0.0], [2.0, 5.0], [0.0, 0.0]])
    rejected = jnp.array([[0.0, 0.0], [3.0, 1.0], [-1.0, 9.0]])
    mask = jnp.array([[1, 1], [1, 1], [1, 0]])
    hits, count = preference_accuracy(chosen, rejected, mask)
    np.testing.assert_allclose((hits, count), (3.0, 5.0))  # (0, 0) is a tie: wrong; (0, 9) is masked
    hits, count = preference_accuracy(chosen, rejected, mask, axis=0)
    np.testing.assert_allclose(hits, [2.0, 1.0])
    np.testing.assert_allclose(count, [3.0, 2.0])
    first, second = preference_accuracy(chosen[:2], rejected[:2], mask[:2]), preference_accuracy(
        chosen[2:], rejected[2:], mask[2:]
    )
    np.testing.assert_allclose(first[0] + second[0], 3.0)
    np.testing.assert_allclose(first[1] + second[1], 5.0)


def _log_softmax_reference(rewards, best, mask):
    out = np.zeros(len(rewards))
    for b in range(len(rewards)):
        keep = mask[b] > 0
        logits = rewards[b][keep].astype(np.float64)
        log_z = logits.max() + np.log(np.sum(np.exp(logits - logits.max())))
        out[b] = log_z - rewards[b, best[b]]
    return out


def test_best_of_n_matches_numpy_log_softmax_and_skips_masked_candidates(rng):
    rewards = rng.normal(size=(B, N)).astype(np.float32) * 3
    best = np.array([0, 3, 1])
    mask = np.ones((B, N), np.float32)
    mask[1, 4] = mask[2, 0] = mask[2, 2] = 0
    loss, metrics = jax.jit(best_of_n_loss)(poison(rewards, mask), best, mask)
    chex.assert_shape(loss, (B,))
    expected = _log_softmax_reference(rewards, best, mask)
    np.testing.assert_allclose(loss, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], expected.mean(), rtol=1e-6)
    masked_rewards = np.where(mask > 0, rewards, -np.inf)
    np.testing.assert_allclose(metrics["rewards/accuracies"], np.mean(masked_rewards.argmax(-1) == best))
    np.testing.assert_allclose(metrics["rewards/best"], rewards[np.arange(B), best].mean(), rtol=1e-6)


def test_best_of_n_hand_values_and_two_way_equals_bradley_terry():
    # Four equal rewards: log 4, and the arg-max tie resolves to index 0 (wrong for best = 2).
    loss, metrics = best_of_n_loss(jnp.zeros((1, 4)), jnp.array([2]))
    np.testing.assert_allclose(loss, [np.log(4.0)], rtol=1e-6)
    np.testing.assert_allclose(metrics["rewards/accuracies"], 0.0)
    pair = jnp.array([[0.3, 1.7], [2.0, -1.0]])
    loss, _ = best_of_n_loss(pair, jnp.array([1, 0]))
    bt, _ = bradley_terry_loss(jnp.array([1.7, 2.0]), jnp.array([0.3, -1.0]))
    np.testing.assert_allclose(loss, bt, rtol=1e-6)


def test_best_of_n_row_with_masked_best_is_excluded_and_gradients_are_finite(rng):
    rewards = rng.normal(size=(B, N)).astype(np.float32)
    best = np.array([2, 0, 4])
    mask = np.ones((B, N), np.float32)
    mask[1, 0] = 0  # row 1's "best" candidate is missing: the row is invalid
    mask[2, :2] = 0
    loss, metrics = best_of_n_loss(poison(rewards, mask), best, mask)
    assert loss[1] == 0.0
    valid_rows = np.array([1, 0, 1])
    np.testing.assert_allclose(metrics["loss"], masked_mean(loss, valid_rows), rtol=1e-6)
    grad = jax.grad(lambda r: jnp.sum(best_of_n_loss(r, best, mask)[0]))(poison(rewards, mask, np.nan))
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(np.asarray(grad)[mask == 0], 0.0)
    np.testing.assert_array_equal(np.asarray(grad)[1], 0.0)
    # The gradient of a softmax cross-entropy sums to zero over each valid row's candidates.
    np.testing.assert_allclose(np.asarray(grad).sum(-1), 0.0, atol=1e-6)
