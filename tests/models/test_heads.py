"""Value and reward heads: shapes, where the reward is read, gradients, and the LM wrapper."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.models import (
    CausalLMWithValueHead,
    KVCache,
    RewardHead,
    RewardModel,
    ValueHead,
    last_token_index,
    load_hf,
)
from tests.models.conftest import B, T, V, left_padded, right_padded

LENGTHS = [7, 4, 1]


def test_last_token_index_for_left_and_right_padding():
    np.testing.assert_array_equal(last_token_index(right_padded(LENGTHS)), [6, 3, 0])
    np.testing.assert_array_equal(last_token_index(left_padded(LENGTHS)), [6, 6, 6])


def test_value_head_wrapper_shapes_and_lm_logits_unchanged(hf_checkpoint, rng):
    lm = load_hf(hf_checkpoint("llama"))
    tokens = jnp.asarray(rng.integers(0, V, size=(B, T)))
    mask = jnp.asarray(right_padded(LENGTHS))
    policy = CausalLMWithValueHead(lm, rngs=nnx.Rngs(1))
    logits, values, cache = jax.jit(lambda t, m: policy(t, attention_mask=m))(tokens, mask)
    chex.assert_shape(logits, (B, T, V))
    chex.assert_shape(values, (B, T))
    assert values.dtype == jnp.float32 and cache is None
    np.testing.assert_allclose(logits, lm(tokens, attention_mask=mask)[0], atol=1e-5, rtol=0)
    assert np.std(np.asarray(values)) > 0  # a per-token function of the hidden state, not a constant

    _, prefix_values, cache = policy(tokens[:, :3], attention_mask=mask[:, :3],
                                     cache=KVCache.init(lm.config, B, T))
    chex.assert_shape(prefix_values, (B, 3))
    real = np.asarray(mask[:, :3]).astype(bool)
    np.testing.assert_allclose(np.asarray(prefix_values)[real], np.asarray(values[:, :3])[real], atol=1e-5)


def test_reward_is_read_at_the_last_real_token_whatever_the_padding(hf_checkpoint, rng):
    backbone = load_hf(hf_checkpoint("qwen2")).model
    reward_model = RewardModel(backbone, rngs=nnx.Rngs(2))
    content = rng.integers(0, V, size=(B, T))
    right = right_padded(LENGTHS)
    left = left_padded(LENGTHS)
    # The same sequences, once right-padded and once left-padded (pads hold a different token).
    right_tokens = np.where(right, content, 0)
    left_tokens = np.stack([np.roll(row, T - n) for row, n in zip(right_tokens, LENGTHS, strict=True)])
    left_tokens = np.where(left, left_tokens, 5)
    r_right = reward_model(jnp.asarray(right_tokens), attention_mask=jnp.asarray(right))
    r_left = reward_model(jnp.asarray(left_tokens), attention_mask=jnp.asarray(left))
    chex.assert_shape(r_right, (B,))
    np.testing.assert_allclose(r_right, r_left, atol=1e-5, rtol=0)
    # Changing a token after the last real one (padding) leaves the reward alone; a real one does not.
    padded_changed = right_tokens.copy()
    padded_changed[1, 5] = 9
    np.testing.assert_array_equal(reward_model(jnp.asarray(padded_changed), attention_mask=jnp.asarray(right)),
                                  r_right)
    real_changed = right_tokens.copy()
    real_changed[1, 0] = (right_tokens[1, 0] + 1) % V
    assert not np.allclose(reward_model(jnp.asarray(real_changed), attention_mask=jnp.asarray(right))[1],
                           r_right[1])


def test_multi_objective_reward_shape_and_gradients(hf_checkpoint, rng):
    reward_model = RewardModel(load_hf(hf_checkpoint("llama")).model, num_objectives=3, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(rng.integers(0, V, size=(B, T)))
    mask = jnp.asarray(right_padded(LENGTHS))
    chex.assert_shape(reward_model(tokens, attention_mask=mask), (B, 3))

    grads = nnx.grad(lambda m: jnp.sum(m(tokens, attention_mask=mask)[:, 1]))(reward_model)
    assert float(jnp.abs(grads.reward_head.kernel[...]).sum()) > 0
    assert float(jnp.abs(grads.backbone.layers.mlp.up_proj.kernel[...]).sum()) > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reward_model_accepts_the_lm_and_misuse_is_a_clear_type_error(arch, hf_checkpoint, rng):
    lm = load_hf(hf_checkpoint(arch))
    tokens = jnp.asarray(rng.integers(0, V, size=(B, T)))
    mask = jnp.asarray(right_padded(LENGTHS))
    from_lm = RewardModel(lm, num_objectives=2, rngs=nnx.Rngs(3))
    assert from_lm.backbone is lm.model  # unwrapped to the trunk it shares with the LM
    from_trunk = RewardModel(lm.model, num_objectives=2, rngs=nnx.Rngs(3))
    np.testing.assert_array_equal(from_lm(tokens, attention_mask=mask), from_trunk(tokens, attention_mask=mask))
    with pytest.raises(TypeError, match="got the trunk .*pass the LM itself, not lm.model"):
        CausalLMWithValueHead(lm.model, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="RewardModel needs a decoder trunk .*got CausalLMWithValueHead"):
        RewardModel(CausalLMWithValueHead(lm, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"ValueHead\(d_model, ...\): d_model must be a positive int"):
        ValueHead(lm, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"RewardHead\(d_model, ...\): d_model must be a positive int"):
        RewardHead(lm.model, rngs=nnx.Rngs(0))


def test_mean_pooled_reward_averages_the_real_tokens_whatever_the_padding(hf_checkpoint, rng):
    lm = load_hf(hf_checkpoint("llama"))
    reward_model = RewardModel(lm, pooling="mean", rngs=nnx.Rngs(2))
    right = right_padded(LENGTHS)
    left = left_padded(LENGTHS)
    right_tokens = np.where(right, rng.integers(0, V, size=(B, T)), 0)
    left_tokens = np.stack([np.roll(row, T - n) for row, n in zip(right_tokens, LENGTHS, strict=True)])
    left_tokens = np.where(left, left_tokens, 5)
    rewards = reward_model(jnp.asarray(right_tokens), attention_mask=jnp.asarray(right))
    # By hand: the head applied to the mean of the real tokens' final hidden states.
    hidden = np.asarray(lm.hidden_states(jnp.asarray(right_tokens), attention_mask=jnp.asarray(right))[0])
    head = reward_model.reward_head
    expected = [hidden[b, :n].mean(axis=0) @ np.asarray(head.kernel[...])[:, 0] + float(head.bias[0])
                for b, n in enumerate(LENGTHS)]
    np.testing.assert_allclose(rewards, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(reward_model(jnp.asarray(left_tokens), attention_mask=jnp.asarray(left)), rewards,
                               atol=1e-5, rtol=0)
    # The same head on the last token reads something else.
    last = RewardModel(lm, pooling="last", rngs=nnx.Rngs(2))
    assert not np.allclose(last(jnp.asarray(right_tokens), attention_mask=jnp.asarray(right)), rewards)
    with pytest.raises(ValueError, match=r"pooling must be one of \('last', 'mean'\), got 'max'"):
        RewardModel(lm, pooling="max", rngs=nnx.Rngs(0))
