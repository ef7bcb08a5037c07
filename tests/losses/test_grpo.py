import types
from collections import defaultdict

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxalign.losses.core import aggregate
from jaxalign.losses.grpo import TRL_LOSS_TYPES, group_advantages, grpo_loss, grpo_objective
from jaxalign.losses.ppo import kl_estimate
from tests.losses.conftest import B, T, poison, right_padded_mask

LENGTHS = [7, 4, 2]
G = 5  # completions per prompt in the advantage tests (3 prompts → 15 rewards)


# ---------------------------------------------------------------- oracles


def _trl_group_advantages(rewards, group_size, scale):
    """TRL 1.16 GRPOTrainer._generate_and_score_completions ("sum_then_normalize" branch), transcribed.

    Calling the method itself needs generation and reward models; this keeps its arithmetic (lines computing
    ``mean_grouped_rewards``, ``std_rewards``, ``advantages`` and the final ``nan_to_num``) and uses TRL's own
    ``nanstd``. NaN rewards stand for unscorable completions, as in TRL.
    """
    from trl.trainer.utils import nanstd

    rewards = torch.tensor(rewards, dtype=torch.float32)
    mean_grouped = torch.nanmean(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size, dim=0)
    if scale == "group":
        std = nanstd(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size, dim=0)
    else:
        std = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0).numpy()


def _trl_compute_loss(loss_type, logps, old, ref, adv_t, mask, *, beta, eps, eps_high, max_completion_length,
                      delta=None, level="token", bias_kl=False):
    """Run the real TRL 1.16 ``GRPOTrainer._compute_loss`` on given per-token log-probs.

    The trainer is built with ``object.__new__`` and only the attributes ``_compute_loss`` reads; the model
    forward is replaced by a stub returning ``logps`` (a leaf tensor, so its gradient can be compared).
    """
    from trl.trainer.grpo_trainer import GRPOTrainer

    trainer = object.__new__(GRPOTrainer)
    logps_t = torch.tensor(logps, requires_grad=True)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps_t, torch.zeros_like(logps_t), None)
    trainer.top_entropy_quantile = 1.0
    trainer.off_policy_mask_threshold = None
    trainer.importance_sampling_level = level
    trainer.beta = beta
    trainer.args = types.SimpleNamespace(use_bias_correction_kl=bias_kl, delta=delta, steps_per_generation=1)
    trainer.loss_type = loss_type
    trainer.epsilon_low = eps
    trainer.epsilon_high = eps_high
    trainer.use_vllm = False
    trainer.vllm_importance_sampling_correction = False
    trainer.model = types.SimpleNamespace(training=True)
    trainer.current_gradient_accumulation_steps = 1
    trainer.max_completion_length = max_completion_length
    trainer.accelerator = types.SimpleNamespace(num_processes=1, reduce=lambda x, reduction: x, gather=lambda x: x)
    trainer._entropy_bonus_enabled = False
    trainer.aux_loss_enabled = False
    trainer._metrics = {"train": defaultdict(list)}
    batch, length = logps.shape
    inputs = {
        "prompt_ids": torch.zeros(batch, 2, dtype=torch.long),
        "prompt_mask": torch.ones(batch, 2, dtype=torch.long),
        "completion_ids": torch.zeros(batch, length, dtype=torch.long),
        "completion_mask": torch.tensor(mask),
        "advantages": torch.tensor(adv_t),
        "ref_per_token_logps": torch.tensor(ref),
        "num_items_in_batch": torch.tensor(mask.sum()),
    }
    if old is not None:
        inputs["old_per_token_logps"] = torch.tensor(old)
    loss = trainer._compute_loss(None, inputs)
    loss.backward()
    metrics = {k: v[0] for k, v in trainer._metrics["train"].items()}
    return loss.item(), logps_t.grad.numpy(), metrics


def _batch(rng):
    mask = right_padded_mask(LENGTHS)
    old = np.log(rng.uniform(0.05, 1.0, size=(B, T))).astype(np.float32)
    # Log-ratios up to ±0.5 so that both clip sides and clip-higher's extra range are exercised.
    logps = (old + rng.uniform(-0.5, 0.5, size=(B, T))).astype(np.float32)
    ref = (old + rng.normal(scale=0.3, size=(B, T))).astype(np.float32)
    adv_t = np.array([1.3, -0.7, 0.4], np.float32)
    return mask, logps, old, ref, adv_t


# ---------------------------------------------------------------- group_advantages


def test_group_advantages_hand_values():
    # Group (1, 2, 3, 6): μ = 3, deviations (−2, −1, 0, 3), Σd² = 14;
    # unbiased σ = √(14/3) ≈ 2.1602, population σ = √3.5 ≈ 1.8708.
    rewards = jnp.array([1.0, 2.0, 3.0, 6.0])
    deviations = np.array([-2.0, -1.0, 0.0, 3.0])
    got = group_advantages(rewards, group_size=4)
    np.testing.assert_allclose(got, deviations / (np.sqrt(14 / 3) + 1e-4), rtol=1e-6)
    got = group_advantages(rewards, group_size=4, std_unbiased=False)
    np.testing.assert_allclose(got, deviations / (np.sqrt(3.5) + 1e-4), rtol=1e-6)
    np.testing.assert_allclose(group_advantages(rewards, group_size=4, scale="none"), deviations, rtol=1e-6)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl_formula_with_unscorable_completions(rng, scale):
    rewards = rng.normal(size=(3 * G,)).astype(np.float32) * 2
    rewards[G : 2 * G] += 3.0  # groups on different scales so that "group" and "batch" differ
    scorable = np.ones(3 * G, bool)
    scorable[[1, 7]] = False
    expected = _trl_group_advantages(np.where(scorable, rewards, np.nan), G, scale)
    got = jax.jit(group_advantages, static_argnames=("group_size", "scale"))(
        poison(rewards, scorable), scorable, group_size=G, scale=scale
    )
    chex.assert_shape(got, (3 * G,))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got)[~scorable], 0.0)


def test_group_advantages_group_and_batch_scales_differ_and_grouped_layout_agrees(rng):
    rewards = rng.normal(size=(3 * G,)).astype(np.float32)
    rewards[:G] *= 10.0
    flat = group_advantages(rewards, group_size=G)
    grouped = group_advantages(rewards.reshape(3, G), group_size=G)
    chex.assert_shape(grouped, (3, G))
    np.testing.assert_allclose(grouped.reshape(-1), flat, rtol=1e-6)
    assert not np.allclose(flat, group_advantages(rewards, group_size=G, scale="batch"), atol=1e-2)


def test_group_advantages_degenerate_groups_are_zero():
    # A group of equal rewards (σ = 0) and a group with one scorable completion both give 0, never NaN.
    rewards = jnp.array([2.0, 2.0, 2.0, 1.0, 5.0, 9.0])
    mask = jnp.array([True, True, True, True, False, False])
    got = group_advantages(rewards, mask, group_size=3)
    np.testing.assert_array_equal(got, np.zeros(6))
    single = group_advantages(jnp.array([4.0, 7.0]), group_size=1)
    np.testing.assert_array_equal(single, [0.0, 0.0])


def test_group_advantages_validates_arguments():
    with pytest.raises(ValueError, match="'group', 'batch', 'none'"):
        group_advantages(jnp.zeros(4), group_size=2, scale="std")
    with pytest.raises(ValueError, match="multiple"):
        group_advantages(jnp.zeros(5), group_size=2)
    with pytest.raises(ValueError, match="shape"):
        group_advantages(jnp.zeros((2, 3)), group_size=2)


# ---------------------------------------------------------------- grpo_loss / grpo_objective vs TRL


@pytest.mark.parametrize("eps_high", [0.2, 0.28])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_objective_matches_trl_compute_loss_values_metrics_and_gradients(rng, loss_type, beta, eps_high):
    mask, logps, old, ref, adv_t = _batch(rng)
    max_completion_length = 11
    expected, expected_grad, trl_metrics = _trl_compute_loss(
        loss_type, logps, old, ref, adv_t, mask, beta=beta, eps=0.2, eps_high=eps_high,
        max_completion_length=max_completion_length,
    )

    def objective(logps):
        return grpo_objective(
            logps, poison(old, mask), poison(ref, mask), adv_t, mask, aggregation=TRL_LOSS_TYPES[loss_type],
            max_tokens=max_completion_length, clip_eps=0.2, clip_eps_high=eps_high, kl_coef=beta,
        )

    (loss, metrics), grad = jax.jit(jax.value_and_grad(objective, has_aux=True))(poison(logps, mask))
    chex.assert_shape(loss, ())
    close = dict(rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(loss, expected, **close)
    valid = mask > 0
    np.testing.assert_allclose(np.asarray(grad)[valid], expected_grad[valid], **close)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(np.asarray(grad)[~valid], 0.0)
    for name in ("low_mean", "high_mean", "region_mean", "low_min", "high_max"):
        np.testing.assert_allclose(metrics[f"clip_ratio/{name}"], trl_metrics[f"clip_ratio/{name}"], **close)
    assert metrics["clip_ratio/region_mean"] > 0
    if beta:
        np.testing.assert_allclose(metrics["kl"], trl_metrics["kl"], **close)


@pytest.mark.parametrize(
    "options",
    [
        dict(delta=1.5),
        dict(level="sequence"),
        dict(bias_kl=True),
        dict(old=None),
    ],
    ids=["two_sided_delta", "gspo_sequence_level", "kl_importance_correction", "on_policy_old_is_none"],
)
def test_grpo_options_match_trl_compute_loss(rng, options):
    mask, logps, old, ref, adv_t = _batch(rng)
    old = options.get("old", old)
    expected, expected_grad, _ = _trl_compute_loss(
        "dapo", logps, old, ref, adv_t, mask, beta=0.04, eps=0.2, eps_high=0.28, max_completion_length=T,
        delta=options.get("delta"), level=options.get("level", "token"), bias_kl=options.get("bias_kl", False),
    )

    def objective(logps):
        return grpo_objective(
            logps, None if old is None else poison(old, mask), poison(ref, mask), adv_t, mask,
            clip_eps=0.2, clip_eps_high=0.28, kl_coef=0.04, delta=options.get("delta"),
            importance_sampling_level=options.get("level", "token"),
            kl_importance_correction=options.get("bias_kl", False),
        )[0]

    loss, grad = jax.value_and_grad(objective)(poison(logps, mask))
    np.testing.assert_allclose(loss, expected, rtol=1e-6, atol=1e-6)
    valid = mask > 0
    np.testing.assert_allclose(np.asarray(grad)[valid], expected_grad[valid], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(grad)[~valid], 0.0)


def test_grpo_options_change_the_loss(rng):
    # Guards the option tests above against options that are silently ignored.
    mask, logps, old, ref, adv_t = _batch(rng)
    base = dict(clip_eps=0.2, clip_eps_high=0.28, kl_coef=0.04)
    plain = grpo_objective(logps, old, ref, adv_t, mask, **base)[0]
    for extra in (dict(delta=1.05), dict(importance_sampling_level="sequence"), dict(kl_importance_correction=True)):
        assert not np.isclose(grpo_objective(logps, old, ref, adv_t, mask, **base, **extra)[0], plain), extra


# ---------------------------------------------------------------- identities and hand values


def test_grpo_on_policy_loss_is_minus_mean_advantage_and_gradient_is_policy_gradient(rng):
    mask, logps, _, _, adv_t = _batch(rng)
    per_token, metrics = grpo_loss(poison(logps, mask), None, None, adv_t, mask)
    chex.assert_shape(per_token, (B, T))
    total, count = aggregate(per_token, mask)
    n_tokens = np.array(LENGTHS, np.float32)
    np.testing.assert_allclose(total / count, -(adv_t * n_tokens).sum() / n_tokens.sum(), rtol=1e-6)
    assert metrics["clip_ratio/region_mean"] == 0.0 and metrics["ratio/mean"] == 1.0
    grad = jax.grad(lambda x: grpo_objective(x, None, None, adv_t, mask)[0])(poison(logps, mask))
    expected = np.where(mask > 0, -adv_t[:, None] / n_tokens.sum(), 0.0)
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-7)


def test_grpo_kl_term_is_k3_hand_value_and_equals_ppo_k3(rng):
    # π = 1/2, π_ref = 1/4, β = 0.1, A = 0, on-policy: ℓ = β·(1/2 − ln(1/2) − 1) = 0.1·(ln 2 − 0.5).
    per_token, metrics = grpo_loss(
        jnp.log(jnp.array([[0.5]])), None, jnp.log(jnp.array([[0.25]])), jnp.zeros(1), None, kl_coef=0.1
    )
    np.testing.assert_allclose(per_token, [[0.1 * (np.log(2.0) - 0.5)]], rtol=1e-6)
    np.testing.assert_allclose(metrics["kl"], np.log(2.0) - 0.5, rtol=1e-6)
    mask, logps, _, ref, adv_t = _batch(rng)
    _, metrics = grpo_loss(logps, None, ref, adv_t, mask, kl_coef=0.5)
    k3 = kl_estimate(logps, ref, mask, estimator="k3")
    np.testing.assert_allclose(metrics["kl"], np.asarray(k3)[mask > 0].mean(), rtol=1e-6)


def test_grpo_clip_higher_hand_values():
    # w = 1.25 with A = +1: symmetric ε = 0.2 clips to 1.2 (ℓ = −1.2); ε_h = 0.28 leaves it (ℓ = −1.25).
    logps, old, adv_t = jnp.log(jnp.array([[1.25]])), jnp.zeros((1, 1)), jnp.ones(1)
    symmetric, metrics = grpo_loss(logps, old, None, adv_t, None)
    np.testing.assert_allclose(symmetric, [[-1.2]], rtol=1e-6)
    assert metrics["clip_ratio/high_mean"] == 1.0
    higher, metrics = grpo_loss(logps, old, None, adv_t, None, clip_eps_high=0.28)
    np.testing.assert_allclose(higher, [[-1.25]], rtol=1e-6)
    assert metrics["clip_ratio/high_mean"] == 0.0


def test_grpo_aggregations_hand_values():
    # On-policy, β = 0: ℓ_t = −A_b. Lengths (2, 1) of T = 3, A = (1, 4): token sums (−2, −4).
    mask = right_padded_mask([2, 1], length=3)
    adv_t = jnp.array([1.0, 4.0])
    logps = jnp.zeros((2, 3))
    expected = {"grpo": (-1.0 - 4.0) / 2, "bnpo": -6.0 / 3, "dapo": -6.0 / 3, "dr_grpo": -6.0 / (2 * 5)}
    for loss_type, value in expected.items():
        loss, metrics = grpo_objective(logps, None, None, adv_t, mask, aggregation=TRL_LOSS_TYPES[loss_type],
                                       max_tokens=5)
        np.testing.assert_allclose(loss, value, rtol=1e-6, err_msg=loss_type)
        assert metrics["loss"] == loss


def test_grpo_sequence_mean_skips_empty_completions_where_trl_counts_them(rng):
    # Documented deviation: TRL's "grpo" divides by B including all-masked completions.
    mask, logps, old, ref, adv_t = _batch(rng)
    mask[2] = 0.0
    expected, _, _ = _trl_compute_loss("grpo", logps, old, ref, adv_t, mask, beta=0.0, eps=0.2, eps_high=0.2,
                                       max_completion_length=T)
    loss, _ = grpo_objective(logps, old, ref, adv_t, mask, aggregation="sequence_mean")
    np.testing.assert_allclose(loss * 2 / 3, expected, rtol=1e-6, atol=1e-6)


def test_grpo_jit_equals_eager_and_validates(rng):
    mask, logps, old, ref, adv_t = _batch(rng)
    kwargs = dict(clip_eps_high=0.3, kl_coef=0.02, importance_sampling_level="sequence")
    eager = grpo_loss(logps, old, ref, adv_t, mask, **kwargs)
    jitted = jax.jit(lambda *a: grpo_loss(*a, **kwargs))(logps, old, ref, adv_t, mask)
    chex.assert_trees_all_close(eager, jitted, rtol=1e-6, atol=1e-7)
    # Per-token advantages [B, T] are accepted and equal the broadcast [B] ones.
    per_token_adv = np.broadcast_to(adv_t[:, None], (B, T))
    chex.assert_trees_all_close(eager, grpo_loss(logps, old, ref, per_token_adv, mask, **kwargs), rtol=1e-6)
    with pytest.raises(ValueError, match="'token', 'sequence'"):
        grpo_loss(logps, old, ref, adv_t, mask, importance_sampling_level="tokens")
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, old, None, adv_t, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="token_mean"):
        grpo_objective(logps, old, ref, adv_t, mask, aggregation="dapo")


def test_bf16_inputs_are_computed_in_float32(rng):
    mask, logps, old, ref, adv_t = _batch(rng)
    low = lambda x: jnp.asarray(x, jnp.bfloat16)  # noqa: E731
    per_token, _ = grpo_loss(low(logps), low(old), low(ref), low(adv_t), mask, kl_coef=0.1)
    chex.assert_type(per_token, jnp.float32)
    chex.assert_type(group_advantages(low(np.arange(6.0)), group_size=3), jnp.float32)
