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
from jaxalign.losses.reward import best_of_n_loss, bradley_terry_loss, preference_accuracy, regression_loss
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


# --- regression on scalar scores -------------------------------------------------------------------------------


def _numpy_regression(predictions, targets, mask, kind, log_variance=None):
    """A slow float64 loop: the per-example loss, 0 where masked."""
    out = np.zeros(len(predictions))
    for b in range(len(predictions)):
        if not mask[b]:
            continue
        error = float(predictions[b]) - float(targets[b])
        if kind == "mse":
            out[b] = error ** 2
        else:
            s = max(float(log_variance[b]), np.log(1e-6))
            out[b] = 0.5 * (s + error ** 2 * np.exp(-s))
    return out


def test_regression_loss_by_hand():
    loss, metrics = regression_loss(jnp.array([1.0, 2.0, 0.5]), jnp.array([0.0, 2.5, 0.5]))
    np.testing.assert_allclose(loss, [1.0, 0.25, 0.0], rtol=1e-6)
    assert float(metrics["mse"]) == pytest.approx(1.25 / 3) and float(metrics["mae"]) == pytest.approx(0.5)
    assert float(metrics["predictions"]) == pytest.approx(3.5 / 3) and float(metrics["targets"]) == pytest.approx(1.0)
    # log σ² = 0 (σ = 1): half the squared error; log σ² = log 4: ½(log 4 + e²/4).
    loss, _ = regression_loss(jnp.array([1.0, 1.0]), jnp.array([0.0, 0.0]), kind="gaussian_nll",
                              log_variance=jnp.array([0.0, np.log(4.0)]))
    np.testing.assert_allclose(loss, [0.5, 0.5 * (np.log(4.0) + 0.25)], rtol=1e-6)


@pytest.mark.parametrize("kind", ["mse", "gaussian_nll"])
def test_regression_loss_matches_float64_reference_masked_and_jitted(rng, kind):
    predictions = rng.normal(size=11).astype(np.float32) * 2
    targets = rng.normal(size=11).astype(np.float32)
    log_variance = (rng.normal(size=11) * 3).astype(np.float32) if kind == "gaussian_nll" else None
    if log_variance is not None:
        log_variance[0] = -20.0  # below the variance floor: clamped to log 1e-6
    mask = rng.random(11) > 0.3
    mask[:2] = True
    expected = _numpy_regression(predictions, targets, mask, kind, log_variance)
    poisoned = [poison(v, mask) if v is not None else None for v in (predictions, targets, log_variance)]
    loss, metrics = jax.jit(lambda p, t, m, s: regression_loss(p, t, m, kind=kind, log_variance=s))(
        poisoned[0], poisoned[1], mask, poisoned[2])
    chex.assert_shape(loss, (11,))
    np.testing.assert_allclose(np.asarray(loss, np.float64), expected, rtol=2e-6, atol=1e-6)
    assert float(metrics["loss"]) == pytest.approx(expected[mask].mean(), rel=2e-6)
    # Masked equals sliced.
    sliced, _ = regression_loss(predictions[mask], targets[mask], kind=kind,
                                log_variance=None if log_variance is None else log_variance[mask])
    np.testing.assert_allclose(np.asarray(loss)[mask], sliced, rtol=1e-6)


def test_gaussian_nll_matches_torch():
    rng = np.random.default_rng(5)
    predictions, targets = rng.normal(size=(2, 9))
    log_variance = rng.normal(size=9)
    expected = torch.nn.GaussianNLLLoss(reduction="none")(torch.tensor(predictions), torch.tensor(targets),
                                                           torch.tensor(np.exp(log_variance))).numpy()
    loss, _ = regression_loss(predictions, targets, kind="gaussian_nll", log_variance=log_variance)
    np.testing.assert_allclose(np.asarray(loss, np.float64), expected, rtol=1e-5, atol=1e-6)
    mse = torch.nn.MSELoss(reduction="none")(torch.tensor(predictions), torch.tensor(targets)).numpy()
    np.testing.assert_allclose(np.asarray(regression_loss(predictions, targets)[0], np.float64), mse, rtol=1e-5)


def test_regression_gradients_are_analytic_and_finite_with_poisoned_padding(rng):
    predictions = rng.normal(size=5).astype(np.float32)
    targets = rng.normal(size=5).astype(np.float32)
    log_variance = rng.normal(size=5).astype(np.float32)
    mask = np.array([1, 1, 0, 1, 0], bool)
    p, t, s = (poison(v, mask) for v in (predictions, targets, log_variance))

    def total(kind, p, s):
        loss, _ = regression_loss(p, t, mask, kind=kind, log_variance=s if kind == "gaussian_nll" else None)
        return jnp.sum(loss)

    error = np.where(mask, predictions - targets, 0.0)
    np.testing.assert_allclose(jax.grad(total, argnums=1)("mse", p, None), 2 * error, rtol=1e-5, atol=1e-6)
    d_p, d_s = jax.grad(total, argnums=(1, 2))("gaussian_nll", p, s)
    variance = np.exp(log_variance)
    np.testing.assert_allclose(d_p, np.where(mask, error / variance, 0.0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d_s, np.where(mask, 0.5 * (1 - error ** 2 / variance), 0.0), rtol=1e-5, atol=1e-6)
    # Central differences in float64 agree with the gradient (check_grads, both orders of the loss).
    with jax.enable_x64(True):
        x64 = [np.asarray(v, np.float64) for v in (predictions, targets, log_variance)]

        def nll(p, s):
            return jnp.sum(regression_loss(p, x64[1], kind="gaussian_nll", log_variance=s)[0])

        jax.test_util.check_grads(nll, (x64[0], x64[2]), order=2, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_regression_loss_refuses_misuse():
    with pytest.raises(ValueError, match=r"kind must be one of \('mse', 'gaussian_nll'\), got 'huber'"):
        regression_loss(jnp.zeros(2), jnp.zeros(2), kind="huber")
    with pytest.raises(ValueError, match="log_variance is needed for kind='gaussian_nll'"):
        regression_loss(jnp.zeros(2), jnp.zeros(2), kind="gaussian_nll")
    with pytest.raises(ValueError, match="log_variance is unused for kind='mse'"):
        regression_loss(jnp.zeros(2), jnp.zeros(2), log_variance=jnp.zeros(2))
    with pytest.raises(ValueError, match="must all be"):
        regression_loss(jnp.zeros(2), jnp.zeros(3))
