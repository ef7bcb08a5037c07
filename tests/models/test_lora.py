"""LoRA: zero-init identity, merge equivalence, frozen base under the LoRAParam filter, dropout, export."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
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
from tests.models.conftest import TOL, B, T, V, hf_logits, hf_positions, left_padded, make_hf_model, right_padded

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
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
    assert float(jnp.abs(grads.lm_head.lora_b[...]).sum()) > 0  # the head's adapter runs in the forward

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
    assert (specs.lm_head.lora_a.get_value(), specs.lm_head.lora_b.get_value()) == (P("fsdp", None), P(None, "tensor"))


@pytest.mark.parametrize("arch", ["llama", "gpt2_untied_exact_gelu"])
def test_lora_on_an_untied_lm_head_runs_in_the_forward(arch, hf_checkpoint, rng):
    tokens, mask = _tokens(rng)
    base = load_hf(hf_checkpoint(arch))
    base_logits = base(tokens, attention_mask=mask)[0]
    model = apply_lora(load_hf(hf_checkpoint(arch)), LoRAConfig(rank=4, alpha=8.0, targets=("lm_head",)),
                       rngs=nnx.Rngs(1))
    assert isinstance(model.lm_head, LoRALinear)
    np.testing.assert_array_equal(model(tokens, attention_mask=mask)[0], base_logits)  # B = 0
    _randomize_b(model, rng)
    logits = model(tokens, attention_mask=mask)[0]
    assert logits.dtype == jnp.float32
    assert np.abs(np.asarray(logits - base_logits)).max() > 0.1
    np.testing.assert_allclose(merge_lora(model)(tokens, attention_mask=mask)[0], logits, atol=1e-5, rtol=0)
    hidden, _ = model.hidden_states(tokens, attention_mask=mask)  # the chunked path sees the adapter too
    # To rounding, not bit for bit: on some CPUs (an AMD EPYC without AVX-512) XLA picks other kernels for the
    # chunks' shapes, 5e-7 apart.
    np.testing.assert_allclose(jnp.concatenate([model.logits(hidden[:, :3]), model.logits(hidden[:, 3:])], 1),
                               logits, atol=1e-5, rtol=0)

    def loss(model):
        return jnp.sum(jax.nn.log_softmax(model(tokens, attention_mask=mask)[0])[..., 3])

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    assert float(jnp.abs(grads.lm_head.lora_b[...]).sum()) > 0
    assert float(jnp.abs(grads.lm_head.lora_a[...]).sum()) > 0


def test_lora_on_a_tied_lm_head_is_refused(hf_checkpoint):
    model = load_hf(hf_checkpoint("gpt2"))
    assert model.config.tie_word_embeddings
    with pytest.raises(ValueError, match=r"'lm_head'.*tied to its token embedding.*tie_word_embeddings=True"):
        apply_lora(model, LoRAConfig(rank=2, alpha=2.0, targets=("c_attn", "lm_head")), rngs=nnx.Rngs(0))
    assert not has_lora(model)  # refused before anything was replaced


class _OneProjection(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Linear(5, 3, bias_init=nnx.initializers.normal(1.0), rngs=rngs)


def test_scaling_is_alpha_over_rank_against_a_numpy_oracle(hf_checkpoint, rng):
    """``y = x·W + b + (α/r)·x·A·B`` and ``merge = W + (α/r)·A·B``, computed independently in float64 NumPy."""
    module = apply_lora(_OneProjection(nnx.Rngs(0)), LoRAConfig(rank=2, alpha=7.0, targets=("proj",)),
                        rngs=nnx.Rngs(1))
    _randomize_b(module, rng)
    x = rng.normal(size=(4, 5)).astype(np.float32)
    kernel, bias, a, b = (np.asarray(v[...], np.float64) for v in (module.proj.kernel, module.proj.bias,
                                                                   module.proj.lora_a, module.proj.lora_b))
    expected = x @ kernel + bias + (7.0 / 2) * (x @ a @ b)
    np.testing.assert_allclose(module.proj(jnp.asarray(x)), expected, atol=1e-5, rtol=0)

    alpha, rank = 3.0, 4  # α/r = 0.75: neither α, nor 1/r, nor 1
    model = apply_lora(load_hf(hf_checkpoint("llama")), LoRAConfig(rank=rank, alpha=alpha, targets=(
        "q_proj", "down_proj", "lm_head")), rngs=nnx.Rngs(2))
    _randomize_b(model, rng)
    merged = merge_lora(model)
    merged_kernels = {path: np.asarray(v) for path, v in nnx.to_flat_state(nnx.state(merged, nnx.Param))}
    checked = 0
    for path, module in nnx.iter_modules(model):
        if isinstance(module, LoRALinear):
            kernel, a, b = (np.asarray(v[...], np.float64) for v in (module.kernel, module.lora_a, module.lora_b))
            expected = kernel + (alpha / rank) * np.matmul(a, b)  # per layer for stacked [L, in, out] kernels
            np.testing.assert_allclose(merged_kernels[(*path, "kernel")], expected, atol=1e-5, rtol=0)
            checked += 1
    assert checked == 3


# PEFT's LoRA on the transformers model is an independent implementation of the same forward pass.
PEFT_CASES = {
    "llama": ("llama_biases_untied", LLAMA_TARGETS, {}),
    "gpt2": ("gpt2_untied_exact_gelu", (*GPT2_TARGETS, "lm_head"), {"fan_in_fan_out": True}),
}


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to True:UserWarning")  # the Linear lm_head
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_unmerged_logits_match_peft(case, hf_checkpoint, rng):
    import peft  # the test extra installs it: a missing oracle must fail, not skip
    arch, targets, peft_options = PEFT_CASES[case]
    alpha, rank = 3.0, 4
    model = apply_lora(load_hf(hf_checkpoint(arch)), LoRAConfig(rank=rank, alpha=alpha, targets=targets),
                       rngs=nnx.Rngs(5))
    _randomize_b(model, rng)
    peft_model = peft.get_peft_model(make_hf_model(arch), peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=list(targets), **peft_options)).eval()
    copied = 0
    with torch.no_grad():
        for name, layer in peft_model.named_modules():
            if not isinstance(layer, peft.tuners.lora.LoraLayer):
                continue
            parts = name.removeprefix("base_model.model.").split(".")
            layer_index = None
            if len(parts) > 2 and parts[1] in ("layers", "h"):
                layer_index, parts = int(parts[2]), parts[:2] + parts[3:]
            ours = model
            for part in parts:
                ours = getattr(ours, part)
            a, b = np.asarray(ours.lora_a[...]), np.asarray(ours.lora_b[...])
            if layer_index is not None:
                a, b = a[layer_index], b[layer_index]
            layer.lora_A["default"].weight.copy_(torch.from_numpy(a.T.copy()))  # torch Linear: [r, in]
            layer.lora_B["default"].weight.copy_(torch.from_numpy(b.T.copy()))  # [out, r]
            copied += 1
    n_layers = model.config.n_layers
    assert copied == sum(1 if t == "lm_head" else n_layers for t in targets)

    tokens = rng.integers(0, V, size=(B, T))
    mask = right_padded([7, 4, 2])
    ours = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))[0])
    expected = hf_logits(peft_model, tokens, mask, hf_positions(mask))
    base = hf_logits(make_hf_model(arch), tokens, mask, hf_positions(mask))
    real = mask.astype(bool)
    assert np.abs(expected[real] - base[real]).max() > 0.1  # the adapters matter
    np.testing.assert_allclose(ours[real], expected[real], atol=TOL, rtol=0)
