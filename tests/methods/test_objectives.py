"""The trainers' objectives: each equals the loss library applied to a plain forward pass; bad options are
refused up front. (The chunked log-probs they share are tested in tests/models/test_scoring.py.)"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from jaxalign import losses
from jaxalign.methods import dpo, reward, sft
from jaxalign.models import LlamaForCausalLM, RewardModel
from tests.models.conftest import TINY

B, T = 3, 11


def batch_of(rng, layout=()):
    shape = (B, *layout, T)
    lengths = rng.integers(5, T + 1, size=shape[:-1])
    attention = (np.arange(T) < lengths[..., None]).astype(np.int32)
    loss_mask = attention * (np.arange(T) >= 3)
    return {"input_ids": rng.integers(0, TINY.vocab_size, shape).astype(np.int32) * attention,
            "attention_mask": attention, "positions": np.cumsum(attention, -1).astype(np.int32) * attention - attention,
            "loss_mask": loss_mask.astype(np.int32), "example_mask": np.array([1, 1, 0], np.int32)}


@pytest.fixture(scope="module")
def model():
    return LlamaForCausalLM(TINY, rngs=nnx.Rngs(0))


def test_sft_objective_is_the_token_mean_nll_of_valid_rows(model):
    batch = batch_of(np.random.default_rng(2))
    (total, count), _ = sft.sft_objective(chunk_size=4)(model, batch, key=None)
    logits, _ = model(batch["input_ids"], attention_mask=batch["attention_mask"], positions=batch["positions"])
    nll, _ = losses.sft_loss(logits[:, :-1], batch["input_ids"][:, 1:])
    mask = batch["loss_mask"][:, 1:] * batch["example_mask"][:, None]
    np.testing.assert_allclose(total / count, np.sum(np.asarray(nll) * mask) / mask.sum(), rtol=1e-5)


def test_dpo_objective_matches_dpo_loss_and_is_ln2_at_the_reference(model):
    batch = batch_of(np.random.default_rng(3), layout=(2,))
    objective = dpo.dpo_objective(beta=0.3, chunk_size=5)
    (total, count), metrics = objective(model, batch, key=None, ref=model)
    np.testing.assert_allclose(total / count, np.log(2), rtol=1e-6)
    assert count == 2 and "loss" not in metrics
    flat = {k: v.reshape(-1, T) for k, v in batch.items() if k != "example_mask"}
    logits, _ = model(flat["input_ids"], attention_mask=flat["attention_mask"], positions=flat["positions"])
    seq = losses.sequence_logps(losses.token_logps(logits[:, :-1], flat["input_ids"][:, 1:]),
                                flat["loss_mask"][:, 1:]).reshape(B, 2)
    shifted = dict(batch, ref_logps=np.asarray(seq) + np.array([[-0.5, 0.25]]))
    (total, count), _ = dpo.dpo_objective(beta=0.3, reference="precomputed")(model, shifted, key=None)
    expected, _ = losses.dpo_loss(seq[:, 0], seq[:, 1], shifted["ref_logps"][:, 0], shifted["ref_logps"][:, 1],
                                  mask=batch["example_mask"].astype(bool), beta=0.3)
    np.testing.assert_allclose(total / count, np.sum(expected) / 2, rtol=1e-5)


def test_reward_objective_groups_read_each_dimensions_head(model):
    rng = np.random.default_rng(4)
    batch = batch_of(rng, layout=(2, 2))
    batch["pair_mask"] = np.array([[1, 1], [1, 0], [1, 1]], np.int32)
    reward_model = RewardModel(model, num_objectives=2, rngs=nnx.Rngs(1))
    (total, count), metrics = reward.reward_objective()(reward_model, batch, key=None)
    flat = reward_model(batch["input_ids"].reshape(-1, T), attention_mask=batch["attention_mask"].reshape(-1, T),
                        positions=batch["positions"].reshape(-1, T))
    rewards = np.asarray(flat).reshape(B, 2, 2, 2)  # [B, dimension, side, head]
    own = np.stack([rewards[:, d, :, d] for d in range(2)], axis=1)  # dimension d's pair scored by head d
    valid = batch["pair_mask"].astype(bool) & batch["example_mask"][:, None].astype(bool)
    per = -np.log(1 / (1 + np.exp(-(own[..., 0] - own[..., 1])))) * valid
    np.testing.assert_allclose(total, per.sum(), rtol=1e-5)
    assert count == 2 and "rewards/accuracies" in metrics


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"loss_type": "sigmod"}, "unknown loss_type"),
    ({"bta": 0.1}, r"unknown option\(s\) \['bta'\]"),
    ({"loss_type": "simpo"}, "needs reference=none"),
    ({"loss_type": "simpo", "reference": "none", "label_smoothing": 0.1, "rpo_alpha": 1.0}, "rpo_alpha"),
])
def test_dpo_objective_refuses_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dpo.dpo_objective(**kwargs)


def test_genarm_objective_is_dpo_against_a_zero_reference(model):
    """``loss_type=genarm`` (GenARM's autoregressive reward model) is DPO's sigmoid loss with reference log-probs 0,
    on the same batch, gradients included."""
    batch = batch_of(np.random.default_rng(7), layout=(2,))
    genarm = dpo.dpo_objective(loss_type="genarm", reference="none", beta=0.3)
    zero_reference = dpo.dpo_objective(loss_type="sigmoid", reference="precomputed", beta=0.3)
    zero_batch = {**batch, "ref_logps": np.zeros((B, 2), np.float32)}
    (total, count), metrics = genarm(model, batch, key=None)
    (expected, expected_count), _ = zero_reference(model, zero_batch, key=None)
    np.testing.assert_allclose(total, expected, rtol=1e-6)
    assert count == expected_count and "rewards/accuracies" in metrics
    grad = nnx.grad(lambda m: genarm(m, batch, key=None)[0][0])(model)
    expected_grad = nnx.grad(lambda m: zero_reference(m, zero_batch, key=None)[0][0])(model)
    for got, want in zip(jax.tree.leaves(grad), jax.tree.leaves(expected_grad), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_dpo_objective_takes_trls_sft_term_as_a_batch_token_mean(model):
    """``loss_type=[sigmoid, sft]``, ``loss_weights=[1, α]`` (TRL's RPO spelling, the recipe docstring's example):
    the sigmoid loss plus α times the token-mean NLL over every chosen completion token of the batch."""
    batch = batch_of(np.random.default_rng(5), layout=(2,))
    shift = np.array([[-0.5, 0.25], [0.1, 0.0], [9.0, 9.0]])
    flat = {k: v.reshape(-1, T) for k, v in batch.items() if k != "example_mask"}
    logits, _ = model(flat["input_ids"], attention_mask=flat["attention_mask"], positions=flat["positions"])
    token_logps = losses.token_logps(logits[:, :-1], flat["input_ids"][:, 1:])
    seq = np.asarray(losses.sequence_logps(token_logps, flat["loss_mask"][:, 1:])).reshape(B, 2)
    batch["ref_logps"] = seq + shift
    objective = dpo.dpo_objective(loss_type=["sigmoid", "sft"], loss_weights=[0.5, 0.7], beta=0.3,
                                         reference="precomputed")
    (total, count), metrics = objective(model, batch, key=None)
    valid = batch["example_mask"].astype(bool)
    sigmoid, _ = losses.dpo_loss(seq[:, 0], seq[:, 1], batch["ref_logps"][:, 0], batch["ref_logps"][:, 1],
                                 mask=valid, beta=0.3)
    chosen_mask = flat["loss_mask"][:, 1:].reshape(B, 2, -1)[:, 0] * valid[:, None]
    chosen_token_logps = np.asarray(token_logps).reshape(B, 2, -1)[:, 0]
    batch_nll = -np.sum(chosen_token_logps * chosen_mask) / chosen_mask.sum()  # TRL: one mean over the batch
    np.testing.assert_allclose(total / count, 0.5 * np.sum(sigmoid) / 2 + 0.7 * batch_nll, rtol=1e-5)
    assert "nll_loss" in metrics
    with pytest.raises(ValueError, match="give one"):
        dpo.dpo_objective(loss_type=["sigmoid", "sft"], rpo_alpha=1.0)
    with pytest.raises(ValueError, match="method sft"):
        dpo.dpo_objective(loss_type=["sft"])
    with pytest.raises(ValueError, match="one weight per loss type"):
        dpo.dpo_objective(loss_type=["sigmoid", "sft"], loss_weights=[1.0])
