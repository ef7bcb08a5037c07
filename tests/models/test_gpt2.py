"""GPT-2: logits parity with transformers' GPT2LMHeadModel, cached decoding, export round trip, config, sharding."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file, save_file

from jaxalign.models import (
    CausalLMWithValueHead,
    GPT2Config,
    GPT2LMHeadModel,
    KVCache,
    RewardModel,
    load_hf,
    partition_specs,
    save_hf,
)
from tests.models.conftest import (
    GPT2_CONFIGS,
    TOL,
    B,
    T,
    V,
    hf_logits,
    hf_positions,
    left_padded,
    make_hf_model,
    right_padded,
)

PADDINGS = {"none": np.ones((B, T), np.int32), "right": right_padded([7, 4, 1]), "left": left_padded([7, 4, 1])}

# openai-community/gpt2's config.json as published.
GPT2_SMALL = {
    "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
    "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
    "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1, "summary_activation": None,
    "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
    "summary_use_proj": True, "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
    "vocab_size": 50257,
}


@functools.cache
def _models(arch, checkpoint_dir):
    model = load_hf(checkpoint_dir)
    forward = nnx.jit(lambda model, tokens, mask: model(tokens, attention_mask=mask)[0])
    return make_hf_model(arch), model, forward


@pytest.mark.parametrize("padding", list(PADDINGS))
@pytest.mark.parametrize("arch", list(GPT2_CONFIGS))
def test_logits_match_transformers(arch, padding, hf_checkpoint, rng):
    hf_model, model, forward = _models(arch, hf_checkpoint(arch))
    assert isinstance(model, GPT2LMHeadModel)
    tokens = rng.integers(0, V, size=(B, T))
    mask = PADDINGS[padding]
    ours = np.asarray(forward(model, jnp.asarray(tokens), jnp.asarray(mask)))
    chex.assert_shape(ours, (B, T, V))
    expected = hf_logits(hf_model, tokens, mask, hf_positions(mask))
    real = mask.astype(bool)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours[real], expected[real], atol=TOL, rtol=0)


def test_parameters_are_stacked_conv1d_layout_and_tied(hf_checkpoint):
    hf_model, model, _ = _models("gpt2", hf_checkpoint("gpt2"))
    blocks = model.transformer.h
    chex.assert_shape(blocks.attn.c_attn.kernel[...], (2, 32, 96))
    chex.assert_shape(blocks.mlp.c_proj.kernel[...], (2, 128, 32))
    # Conv1D weights are [in, out] in transformers too: copied, not transposed.
    np.testing.assert_array_equal(blocks.attn.c_attn.kernel[1], hf_model.transformer.h[1].attn.c_attn.weight.detach())
    assert model.lm_head is None and model.config.tie_word_embeddings


def test_cached_decode_equals_full_forward(hf_checkpoint, rng):
    model = load_hf(hf_checkpoint("gpt2"))
    prompt_length, new = 5, 4
    prompt = jnp.asarray(rng.integers(0, V, size=(B, prompt_length)))
    prompt_mask = jnp.asarray(left_padded([5, 3, 1], prompt_length))
    continuation = jnp.asarray(rng.integers(0, V, size=(B, new)))

    @nnx.jit
    def decode(model, prompt, prompt_mask, continuation):
        cache = KVCache.init(model.config, B, prompt_length + new)
        logits, cache = model(prompt, attention_mask=prompt_mask, cache=cache)

        def step(cache, token):
            logits, cache = model(token[:, None], cache=cache)
            return cache, logits[:, 0]

        _, step_logits = jax.lax.scan(step, cache, continuation.T)
        return logits, jnp.swapaxes(step_logits, 0, 1)

    prefill_logits, step_logits = decode(model, prompt, prompt_mask, continuation)
    full_mask = jnp.concatenate([prompt_mask, jnp.ones((B, new), jnp.int32)], axis=1)
    full_logits = model(jnp.concatenate([prompt, continuation], axis=1), attention_mask=full_mask)[0]
    real = np.asarray(prompt_mask).astype(bool)
    np.testing.assert_allclose(np.asarray(prefill_logits)[real], np.asarray(full_logits[:, :prompt_length])[real],
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(step_logits, full_logits[:, prompt_length:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", list(GPT2_CONFIGS))
def test_export_loads_in_transformers_with_the_same_logits(arch, hf_checkpoint, tmp_path, rng):
    model = load_hf(hf_checkpoint(arch))
    out = save_hf(model, model.config, tmp_path / "export")
    written = load_file(out / "model.safetensors")
    assert ("lm_head.weight" in written) == (not model.config.tie_word_embeddings)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(hf_model).__name__ == "GPT2LMHeadModel"
    tokens = rng.integers(0, V, size=(B, T))
    mask = left_padded([7, 5, 2])
    ours = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))[0])
    expected = hf_logits(hf_model, tokens, mask, hf_positions(mask))
    np.testing.assert_allclose(ours[mask.astype(bool)], expected[mask.astype(bool)], atol=TOL, rtol=0)
    assert load_hf(out).config == model.config


def test_old_checkpoint_buffers_are_skipped(hf_checkpoint, tmp_path, rng):
    model = load_hf(hf_checkpoint("gpt2"))
    out = save_hf(model, model.config, tmp_path / "old")
    tensors = load_file(out / "model.safetensors")
    causal = np.tril(np.ones((64, 64), bool))[None, None]
    tensors |= {"transformer.h.0.attn.bias": causal, "transformer.h.0.attn.masked_bias": np.array(-1e4, np.float32)}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    tokens = jnp.asarray(rng.integers(0, V, size=(B, T)))
    np.testing.assert_array_equal(load_hf(out)(tokens)[0], model(tokens)[0])


def test_published_gpt2_config_parses_and_round_trips():
    config = GPT2Config.from_hf(GPT2_SMALL)
    assert (config.vocab_size, config.d_model, config.n_layers, config.n_heads) == (50257, 768, 12, 12)
    assert (config.intermediate_size, config.head_dim, config.max_position_embeddings) == (3072, 64, 1024)
    assert config.eos_token_ids == (50256,) and config.activation == "gelu_new" and config.tie_word_embeddings
    assert GPT2Config.from_hf(config.to_hf()) == config
    assert transformers.AutoConfig.for_model(**config.to_hf()).n_inner == 3072


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"rotary_dim": 16}, "rotary_dim"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"scale_attn_weights": False}, "scale_attn_weights"),
        ({"add_cross_attention": True}, "add_cross_attention"),
        ({"activation_function": "relu"}, "relu"),
        ({"architectures": ["GPT2DoubleHeadsModel"]}, "GPT2DoubleHeadsModel"),
    ],
)
def test_unsupported_gpt2_configs_raise_naming_the_key(changes, named):
    with pytest.raises(ValueError, match=named):
        GPT2Config.from_hf({**GPT2_SMALL, **changes})


def test_every_parameter_has_a_spec_with_an_unsplit_layer_axis():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, d_model=32, n_layers=2, n_heads=4, intermediate_size=64),
                            rngs=nnx.Rngs(0))
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    specs = dict(nnx.to_flat_state(partition_specs(model)))
    assert set(specs) == {path for path, _ in params}
    for path, param in params:
        spec = specs[path].get_value()
        assert len(spec) == param.get_value().ndim, path
        if "h" in path:
            assert spec[0] is None, path
    assert specs[("transformer", "h", "attn", "c_attn", "kernel")].get_value() == P(None, "fsdp", "tensor")
    assert specs[("transformer", "h", "mlp", "c_proj", "kernel")].get_value() == P(None, "tensor", "fsdp")


def test_heads_wrap_gpt2_like_llama(hf_checkpoint, rng):
    model = load_hf(hf_checkpoint("gpt2"))
    tokens = jnp.asarray(rng.integers(0, V, size=(B, T)))
    mask = jnp.asarray(right_padded([7, 4, 1]))
    logits, values, _ = CausalLMWithValueHead(model, rngs=nnx.Rngs(1))(tokens, attention_mask=mask)
    chex.assert_shape(values, (B, T))
    np.testing.assert_allclose(logits, model(tokens, attention_mask=mask)[0], atol=1e-5, rtol=0)
    chex.assert_shape(RewardModel(model.model, num_objectives=2, rngs=nnx.Rngs(1))(tokens, attention_mask=mask), (B, 2))


def test_config_json_of_gpt2_is_read_by_load_hf(hf_checkpoint):
    config = json.loads((hf_checkpoint("gpt2") / "config.json").read_text())
    assert config["model_type"] == "gpt2"
    assert load_hf(hf_checkpoint("gpt2")).config == GPT2Config.from_hf(config)


def test_positions_past_the_learned_table_raise_eagerly_and_never_give_nan_under_jit(rng):
    config = GPT2Config(vocab_size=V, d_model=32, n_layers=2, n_heads=4, intermediate_size=64,
                        max_position_embeddings=8)
    model = GPT2LMHeadModel(config, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(rng.integers(0, V, size=(B, 10)))
    with pytest.raises(ValueError, match=r"position 9 is out of range.*\[0, 8\), n_positions=8"):
        model(tokens)
    with pytest.raises(ValueError, match=rf"token id {V} is out of range.*vocab_size={V}"):
        model(tokens.at[2, 0].set(V)[:, :8])
    # Under jit the positions are clipped to the table: finite, and the first 8 tokens are exact.
    logits = np.asarray(nnx.jit(lambda m, t: m(t)[0])(model, tokens))
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(logits[:, :8], model(tokens[:, :8])[0], atol=1e-5, rtol=0)
    # Only real tokens are checked: 8 real tokens and 2 of right padding fit the table.
    mask = jnp.asarray(right_padded([8, 5, 2], 10))
    assert np.isfinite(np.asarray(model(tokens, attention_mask=mask)[0])).all()
    with pytest.raises(ValueError, match="position 9"):  # explicit positions are checked the same way
        model(tokens, positions=jnp.broadcast_to(jnp.arange(10), (B, 10)))
