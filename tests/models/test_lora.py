"""LoRA: zero-init identity, merge equivalence, frozen base under the LoRAParam filter, dropout, export."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxalign.models import (
    BASE_PARAMS,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    has_lora,
    load_hf,
    merge_lora,
    partition_specs,
    save_hf,
)
from tests.models.conftest import TOL, B, T, V, hf_logits, hf_positions, left_padded, right_padded

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_TARGETS = ("c_attn", "attn.c_proj", "c_fc")
CASES = {"llama": ("llama_biases_untied", LLAMA_TARGETS), "gpt2": ("gpt2", GPT2_TARGETS)}


def _lora_model(case, hf_checkpoint, *, dropout=0.0, seed=1):
    arch, targets = CASES[case]
    model = load_hf(hf_checkpoint(arch))
    return apply_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=dropout, targets=targets),
                      rngs=nnx.Rngs(params=seed, dropout=seed + 1))


def _randomize_b(model, rng):
    """Move every B away from its zero init, as training would."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, LoRALinear):
            module.lora_b[...] = jnp.asarray(rng.normal(0, 0.3, size=module.lora_b[...].shape), jnp.float32)


def _tokens(rng):
    return jnp.asarray(rng.integers(0, V, size=(B, T))), jnp.asarray(right_padded([7, 4, 2]))


@pytest.mark.parametrize("case", list(CASES))
def test_zero_b_gives_the_base_logits_exactly(case, hf_checkpoint, rng):
    tokens, mask = _tokens(rng)
    base = load_hf(hf_checkpoint(CASES[case][0]))(tokens, attention_mask=mask)[0]
    model = _lora_model(case, hf_checkpoint)
    adapted = [path for path, module in nnx.iter_modules(model) if isinstance(module, LoRALinear)]
    assert len(adapted) == len(CASES[case][1])
    np.testing.assert_array_equal(model(tokens, attention_mask=mask)[0], base)


@pytest.mark.parametrize("case", list(CASES))
def test_merged_equals_unmerged(case, hf_checkpoint, rng):
    tokens, mask = _tokens(rng)
    model = _lora_model(case, hf_checkpoint)
    base_logits = model(tokens, attention_mask=mask)[0]
    _randomize_b(model, rng)
    logits = model(tokens, attention_mask=mask)[0]
    assert np.abs(np.asarray(logits - base_logits)).max() > 0.1  # the adapters now matter
    merged = merge_lora(model)
    assert not has_lora(merged) and has_lora(model) and type(merged) is type(model)
    np.testing.assert_allclose(merged(tokens, attention_mask=mask)[0], logits, atol=1e-5, rtol=0)


def test_only_lora_params_get_gradients_and_updates(hf_checkpoint, rng):
    tokens, mask = _tokens(rng)
    model = _lora_model("llama", hf_checkpoint)

    def loss(model):
        logps = jax.nn.log_softmax(model(tokens, attention_mask=mask)[0])
        return -jnp.sum(jnp.where(mask > 0, logps[..., 3], 0.0))

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    grad_paths = {path for path, _ in nnx.to_flat_state(grads)}
    lora_paths = {path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    assert grad_paths == lora_paths and all(path[-1] in ("lora_a", "lora_b") for path in grad_paths)
    assert float(jnp.abs(grads.model.layers.mlp.up_proj.lora_b[...]).sum()) > 0

    base_before = nnx.state(model, BASE_PARAMS)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.LoRAParam)
    optimizer.update(model, grads)
    chex.assert_trees_all_equal(nnx.state(model, BASE_PARAMS), base_before)
    assert float(jnp.abs(model.model.layers.mlp.up_proj.lora_b[...]).sum()) > 0


def test_dropout_uses_the_given_rngs_and_is_off_in_eval_mode(hf_checkpoint, rng):
    tokens, mask = _tokens(rng)
    forward = nnx.jit(lambda model: model(tokens, attention_mask=mask)[0])
    models = [_lora_model("gpt2", hf_checkpoint, dropout=0.5) for _ in range(2)]
    for model in models:
        _randomize_b(model, np.random.default_rng(7))
    first, again = forward(models[0]), forward(models[0])
    assert np.abs(np.asarray(first - again)).max() > 1e-3  # a fresh mask on every call
    np.testing.assert_array_equal(forward(models[1]), first)  # same rngs, same masks
    models[0].eval()
    np.testing.assert_array_equal(forward(models[0]), forward(models[0]))
    np.testing.assert_allclose(forward(models[0]), merge_lora(models[0])(tokens, attention_mask=mask)[0],
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_export_of_a_lora_model_loads_in_transformers(case, hf_checkpoint, tmp_path, rng):
    model = _lora_model(case, hf_checkpoint)
    _randomize_b(model, rng)
    out = save_hf(model, model.config, tmp_path / "merged")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    tokens = rng.integers(0, V, size=(B, T))
    mask = left_padded([7, 5, 2])
    ours = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))[0])
    expected = hf_logits(hf_model, tokens, mask, hf_positions(mask))
    np.testing.assert_allclose(ours[mask.astype(bool)], expected[mask.astype(bool)], atol=TOL, rtol=0)


def test_dotted_target_picks_one_of_two_same_named_projections(hf_checkpoint):
    model = _lora_model("gpt2", hf_checkpoint)
    assert isinstance(model.transformer.h.attn.c_proj, LoRALinear)
    assert not isinstance(model.transformer.h.mlp.c_proj, LoRALinear)
    chex.assert_shape(model.transformer.h.attn.c_attn.lora_a[...], (2, 32, 4))  # one adapter per layer
    assert not np.allclose(model.transformer.h.attn.c_attn.lora_a[0], model.transformer.h.attn.c_attn.lora_a[1])


def test_unknown_target_is_named(hf_checkpoint):
    model = load_hf(hf_checkpoint("llama"))
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] match no nnx.Linear.*self_attn.q_proj"):
        apply_lora(model, LoRAConfig(rank=2, alpha=2.0, targets=("q_proj", "qkv_proj")), rngs=nnx.Rngs(0))


def test_adapters_shard_like_their_kernels(hf_checkpoint):
    specs = partition_specs(_lora_model("llama", hf_checkpoint))
    q_proj, o_proj = specs.model.layers.self_attn.q_proj, specs.model.layers.self_attn.o_proj
    assert (q_proj.lora_a.get_value(), q_proj.lora_b.get_value()) == (P(None, "fsdp", None), P(None, None, "tensor"))
    assert (o_proj.lora_a.get_value(), o_proj.lora_b.get_value()) == (P(None, "tensor", None), P(None, None, "fsdp"))
