"""GKD's generalized JSD: parity with TRL's own ``GKDTrainer.generalized_jsd_loss`` in float64, identities,
jit and gradients, the teacher held constant, options refused."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxalign.losses.core import aggregate
from jaxalign.losses.distill import generalized_jsd_loss
from tests.losses.conftest import B, T, V, poison, right_padded_mask

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def _batch(rng):
    student = (rng.normal(size=(B, T, V)) * 2).astype(np.float32)
    teacher = (rng.normal(size=(B, T, V)) * 2 + 0.5).astype(np.float32)
    mask = right_padded_mask([7, 5, 3])
    mask[:, :2] = 0  # a prompt of 2 tokens, then right padding: completion positions only
    return student, teacher, mask


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_matches_trl_generalized_jsd_loss_in_float64(rng, beta, temperature):
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    student, teacher, mask = _batch(rng)
    per_token, metrics = jax.jit(generalized_jsd_loss, static_argnames=("beta", "temperature"))(
        student, teacher, mask, beta=beta, temperature=temperature)
    chex.assert_shape(per_token, (B, T))
    total, count = aggregate(per_token, mask, mode="token_mean")
    labels = torch.tensor(np.where(mask > 0, 1, -100))
    as64 = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    expected = GKDTrainer.generalized_jsd_loss(as64(student), as64(teacher), labels=labels, beta=beta,
                                               temperature=temperature, reduction="batchmean")
    np.testing.assert_allclose(total / count, expected.item(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["jsd"], expected.item(), rtol=1e-5, atol=1e-6)
    # Element for element too (TRL's reduction="none" keeps [B, T, V] before the vocabulary sum).
    unreduced = GKDTrainer.generalized_jsd_loss(as64(student), as64(teacher), beta=beta, temperature=temperature,
                                                reduction="none").sum(-1).numpy()
    np.testing.assert_allclose(per_token, unreduced * mask, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_zero_when_student_equals_teacher(rng, beta):
    student, _, mask = _batch(rng)
    per_token, metrics = generalized_jsd_loss(student, student, mask, beta=beta, temperature=1.5)
    np.testing.assert_allclose(per_token, 0.0, atol=2e-6)
    np.testing.assert_allclose(metrics["top1_agreement"], 1.0)
    np.testing.assert_allclose(metrics["student_entropy"], metrics["teacher_entropy"], rtol=1e-6)


def test_beta_zero_is_forward_kl_and_beta_one_reverse_kl_by_hand(rng):
    student, teacher, mask = _batch(rng)
    s = student.astype(np.float64) / 2.0
    t = teacher.astype(np.float64) / 2.0
    s = s - np.log(np.exp(s).sum(-1, keepdims=True))
    t = t - np.log(np.exp(t).sum(-1, keepdims=True))
    forward = (np.exp(t) * (t - s)).sum(-1) * mask
    reverse = (np.exp(s) * (s - t)).sum(-1) * mask
    np.testing.assert_allclose(generalized_jsd_loss(student, teacher, mask, beta=0.0, temperature=2.0)[0], forward,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(generalized_jsd_loss(student, teacher, mask, beta=1.0, temperature=2.0)[0], reverse,
                               rtol=1e-5, atol=1e-6)
    # beta = 0.5 is the Jensen-Shannon divergence: symmetric, at most ln 2.
    jsd, _ = generalized_jsd_loss(student, teacher, mask, beta=0.5)
    swapped, _ = generalized_jsd_loss(teacher, student, mask, beta=0.5)
    np.testing.assert_allclose(jsd, swapped, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(jsd) <= np.log(2) + 1e-6) and np.all(np.asarray(jsd) >= -1e-7)


def test_hand_value_two_tokens():
    # Student uniform over 2 tokens, teacher (0.8, 0.2): KL(t || s) = 0.8 ln 1.6 + 0.2 ln 0.4.
    student = jnp.zeros((1, 1, 2))
    teacher = jnp.log(jnp.array([[[0.8, 0.2]]]))
    per_token, metrics = generalized_jsd_loss(student, teacher, beta=0.0)
    np.testing.assert_allclose(per_token[0, 0], 0.8 * np.log(1.6) + 0.2 * np.log(0.4), rtol=1e-6)
    np.testing.assert_allclose(metrics["teacher_entropy"], -(0.8 * np.log(0.8) + 0.2 * np.log(0.2)), rtol=1e-6)


def test_jit_equals_eager_and_masked_equals_sliced(rng):
    student, teacher, mask = _batch(rng)
    eager, _ = generalized_jsd_loss(student, teacher, mask, beta=0.3, temperature=2.0)
    jitted, _ = jax.jit(lambda s, t: generalized_jsd_loss(s, t, mask, beta=0.3, temperature=2.0))(student, teacher)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-7)
    for b in range(B):
        keep = mask[b] > 0
        alone, _ = generalized_jsd_loss(student[b][keep][None], teacher[b][keep][None], beta=0.3, temperature=2.0)
        np.testing.assert_allclose(eager[b][keep], alone[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_gradients_finite_with_poisoned_padding_and_none_to_the_teacher(rng, beta):
    student, teacher, mask = _batch(rng)
    student, teacher = poison(student, mask[..., None], np.inf), poison(teacher, mask[..., None], np.nan)

    def objective(s, t):
        total, count = aggregate(generalized_jsd_loss(s, t, mask, beta=beta, temperature=2.0)[0], mask)
        return total / count

    value, (grad_student, grad_teacher) = jax.value_and_grad(objective, argnums=(0, 1))(student, teacher)
    assert np.isfinite(value) and value > 0
    assert np.all(np.isfinite(grad_student)) and np.abs(grad_student).max() > 0
    np.testing.assert_array_equal(grad_student[mask == 0], 0.0)
    np.testing.assert_array_equal(grad_teacher, 0.0)  # stop_gradient: the teacher is a fixed target
    # The student's gradient against central differences (float64 objective on one entry).
    b, t, v = 0, 3, 4
    step = 1e-2
    shift = np.zeros_like(student)
    shift[b, t, v] = step
    numeric = (objective(student + shift, teacher) - objective(student - shift, teacher)) / (2 * step)
    np.testing.assert_allclose(grad_student[b, t, v], numeric, rtol=2e-2, atol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_minus_infinity_logits_add_nothing(beta):
    # A vocabulary entry that neither model can emit: TRL's F.kl_div gives NaN, here it adds 0.
    student = jnp.array([[[0.0, 1.0, -jnp.inf]]])
    teacher = jnp.array([[[1.0, 0.0, -jnp.inf]]])
    value, grad = jax.value_and_grad(lambda s: generalized_jsd_loss(s, teacher, beta=beta)[0].sum())(student)
    finite, finite_grad = jax.value_and_grad(lambda s: generalized_jsd_loss(s, teacher[..., :2], beta=beta)[0].sum())(
        student[..., :2])
    np.testing.assert_allclose(value, finite, rtol=1e-6)
    np.testing.assert_allclose(grad[..., :2], finite_grad, rtol=1e-5)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"beta": -0.1}, r"beta must be a number in \[0, 1\]"),
    ({"beta": 1.5}, r"beta must be a number in \[0, 1\]"),
    ({"temperature": 0.0}, "temperature must be a finite number > 0"),
    ({"temperature": -1.0}, "temperature must be a finite number > 0"),
    ({"temperature": float("inf")}, "temperature must be a finite number > 0"),
])
def test_bad_options_are_refused(kwargs, message):
    logits = jnp.zeros((1, 2, 3))
    with pytest.raises(ValueError, match=message):
        generalized_jsd_loss(logits, logits, **kwargs)


def test_vocabularies_must_match():
    with pytest.raises(ValueError, match="differ in shape"):
        generalized_jsd_loss(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2, 4)))
