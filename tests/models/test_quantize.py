"""A quantised frozen base (NF4, int8) under LoRA: what it stores, what it computes, what trains, what exports,
what the train core does with it, and one clear error for each bad input."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxalign import losses
from jaxalign.models import (
    WEIGHTS,
    GPT2Config,
    GPT2LMHeadModel,
    KVCache,
    LlamaForCausalLM,
    LoRAConfig,
    QuantizeConfig,
    QuantizedKernel,
    QuantizedLinear,
    QuantizedWeight,
    RewardModel,
    ValueHead,
    apply_lora,
    is_quantized,
    merge_for_export,
    merge_lora,
    partition_specs,
    quantize_model,
    storage_bytes,
)
from jaxalign.models.stack import unstack_layers
from jaxalign.train import TrainStep
from tests.models.conftest import TINY, B, T, V

# Tiny models: every input dimension (32, 64) divides 16; the stacked layers are [L=2].
NF4 = QuantizeConfig(type="nf4", block_size=16)
NF4_PLAIN_SCALES = QuantizeConfig(type="nf4", block_size=16, double_quant=False)
INT8 = QuantizeConfig(type="int8")
CONFIGS = {"nf4": NF4, "nf4_plain_scales": NF4_PLAIN_SCALES, "int8": INT8}
BIASED = dataclasses.replace(TINY, qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=False)
GPT2 = GPT2Config(vocab_size=V, d_model=32, n_layers=2, n_heads=4, intermediate_size=64, max_position_embeddings=16)
LORA = LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))


def llama(config=TINY, seed=0):
    return LlamaForCausalLM(config, rngs=nnx.Rngs(seed))


def gpt2(seed=0):
    return GPT2LMHeadModel(GPT2, rngs=nnx.Rngs(seed))


def tokens(seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, size=(B, T)))


def next_token_nll(model, batch):
    logits, _ = model(batch[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch[:, 1:, None], axis=-1))


def storage_leaves(model) -> dict:
    return {path: np.asarray(variable.get_value())
            for path, variable in nnx.to_flat_state(nnx.state(model, QuantizedWeight))}


# --------------------------------------------------------------------------------------- what it stores


def test_nf4_storage_replaces_the_projection_kernels_and_is_not_a_param():
    model = quantize_model(llama(), NF4)
    q_proj = model.model.layers.self_attn.q_proj
    assert isinstance(q_proj, QuantizedLinear) and isinstance(q_proj.kernel, QuantizedKernel)
    stored = {name: getattr(q_proj.kernel, name).get_value() for name in
              ("codes", "absmax_codes", "absmax_scales", "absmax_offset")}
    # [L, in/2, out] two codes a byte; [L, in/16, out] block-scale codes; ceil(2·32/256) = 1 group per layer.
    chex.assert_shape(stored["codes"], (2, 16, 32))
    chex.assert_shape(stored["absmax_codes"], (2, 2, 32))
    chex.assert_shape(stored["absmax_scales"], (2, 1))
    chex.assert_shape(stored["absmax_offset"], (2,))
    assert stored["codes"].dtype == jnp.uint8 and stored["absmax_codes"].dtype == jnp.uint8
    assert q_proj.kernel.shape == (2, 32, 32)
    params = {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert not any(path.endswith("proj/kernel") for path in params)
    assert {"model/embed_tokens/embedding", "model/norm/scale", "model/layers/input_layernorm/scale"} <= params
    assert is_quantized(model)
    sizes = storage_bytes(model)
    assert sizes["dequantized"] == 4 * 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64)  # float32, L=2
    assert sizes["quantized"] < sizes["dequantized"] / 7


def test_int8_and_undoubled_nf4_storage():
    int8 = quantize_model(llama(), INT8).model.layers.mlp.down_proj.kernel
    assert int8.codes.get_value().dtype == jnp.int8
    chex.assert_shape([int8.codes.get_value(), int8.scales.get_value()], [(2, 64, 32), (2, 32)])
    plain = quantize_model(llama(), NF4_PLAIN_SCALES).model.layers.mlp.down_proj.kernel
    chex.assert_shape([plain.codes.get_value(), plain.absmax.get_value()], [(2, 32, 32), (2, 4, 32)])
    assert plain.absmax.get_value().dtype == jnp.float32


def test_targets_choose_the_projections():
    model = quantize_model(gpt2(), QuantizeConfig(type="int8", targets=("attn.c_proj", "c_fc")))
    block = model.transformer.h
    assert isinstance(block.attn.c_proj, QuantizedLinear) and isinstance(block.mlp.c_fc, QuantizedLinear)
    assert type(block.attn.c_attn) is nnx.Linear and type(block.mlp.c_proj) is nnx.Linear


# --------------------------------------------------------------------------------------- what it computes


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("family", ["llama_biases_untied", "gpt2"])
def test_forward_is_the_float_model_with_the_dequantised_kernels(family, name):
    model = llama(BIASED) if family == "llama_biases_untied" else gpt2()
    float_logits = np.asarray(model(tokens())[0])
    quantize_model(model, CONFIGS[name])
    logits = np.asarray(model(tokens())[0])
    dequantised = merge_for_export(model)
    assert not is_quantized(dequantised) and type(_first_projection(dequantised)) is nnx.Linear
    np.testing.assert_allclose(logits, np.asarray(dequantised(tokens())[0]), atol=2e-6)
    # The quantisation error itself: small against logits of size ~1, and int8 well under nf4.
    error = np.abs(logits - float_logits).max()
    assert 0 < error < (0.01 if name == "int8" else 0.1), error


def _first_projection(model):
    if isinstance(model, LlamaForCausalLM):
        return model.model.layers.self_attn.q_proj
    return model.transformer.h.attn.c_attn


def test_jit_scan_unstacked_layers_and_cached_decode_agree():
    model = quantize_model(llama(), NF4)
    batch = tokens()
    eager = np.asarray(model(batch)[0])
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda state, batch: nnx.merge(graphdef, state)(batch)[0])(state, batch)
    np.testing.assert_allclose(np.asarray(jitted), eager, atol=1e-6)
    np.testing.assert_allclose(np.asarray(unstack_layers(model)(batch)[0]), eager, atol=1e-6)
    cache = KVCache.init(TINY, batch_size=B, max_length=T)
    prefill, cache = model(batch[:, :-1], cache=cache)
    step, _ = model(batch[:, -1:], cache=cache)
    np.testing.assert_allclose(np.asarray(jnp.concatenate([prefill, step], axis=1)), eager, atol=1e-5)


def test_the_scan_does_not_copy_the_storage_out():
    model = apply_lora(quantize_model(llama(), NF4), dataclasses.replace(LORA, dropout=0.1), rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(model)
    program = jax.make_jaxpr(lambda state, batch: nnx.merge(graphdef, state)(batch)[0])(state, tokens())
    scans = [eqn for eqn in program.eqns if eqn.primitive.name == "scan"]
    assert len(scans) == 1
    # The storage goes in sliced per layer; what comes out is the carry and the state a layer changes (the
    # adapters' dropout counters), never a copy of the storage written back into the model.
    assert sum(var.aval.dtype == jnp.uint8 for var in scans[0].invars) == 7 * 2  # codes, absmax_codes
    assert not any(var.aval.dtype in (jnp.uint8, jnp.int8) for var in scans[0].outvars)


def test_compute_dtype_sets_the_product_dtype():
    model = quantize_model(llama(), QuantizeConfig(type="nf4", block_size=16, compute_dtype="bfloat16"))
    kernel = model.model.layers.self_attn.q_proj.kernel
    assert kernel.dtype == jnp.bfloat16 and kernel.param_dtype == jnp.float32
    reference = np.asarray(quantize_model(llama(), NF4)(tokens())[0])
    np.testing.assert_allclose(np.asarray(model(tokens())[0]), reference, atol=0.05)
    assert merge_for_export(model).model.layers.self_attn.q_proj.kernel.get_value().dtype == jnp.float32


def test_quantize_model_runs_under_eval_shape():
    abstract = nnx.eval_shape(lambda: quantize_model(llama(), NF4))
    codes = abstract.model.layers.mlp.up_proj.kernel.codes.get_value()
    assert isinstance(codes, jax.ShapeDtypeStruct) and codes.shape == (2, 16, 64) and codes.dtype == jnp.uint8
    assert storage_bytes(abstract) == storage_bytes(quantize_model(llama(), NF4))


# --------------------------------------------------------------------------------------- LoRA on top


@pytest.mark.parametrize("name", ["nf4", "int8"])
def test_lora_on_the_quantised_base_trains_only_the_adapters(name):
    model = apply_lora(quantize_model(llama(), CONFIGS[name]), LORA, rngs=nnx.Rngs(1))
    base_params = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(
        nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))}
    storage = storage_leaves(model)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def train_step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(next_token_nll, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, batch)
        optimizer.update(model, grads)
        return loss

    batch = tokens()
    history = [float(train_step(model, optimizer, batch)) for _ in range(15)]
    assert history[-1] < history[0] - 0.1, history
    for path, value in storage_leaves(model).items():
        np.testing.assert_array_equal(value, storage[path], err_msg=str(path))
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))):
        np.testing.assert_array_equal(np.asarray(variable.get_value()), base_params[path], err_msg=str(path))
    adapters = {p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    moments = {p[2:] for p, _ in nnx.to_flat_state(nnx.state(optimizer.opt_state)) if p[1] == "mu"}
    assert moments == adapters and len(adapters) == 6


def test_gradients_through_the_quantised_product_equal_the_dequantised_float_models():
    """The product's own backward (it dequantises again) gives the adapters and the inputs the gradients plain
    autodiff gives through the dequantised float model."""
    model = apply_lora(quantize_model(llama(), NF4), LORA, rngs=nnx.Rngs(1))
    model.model.layers.self_attn.q_proj.lora_b[...] = jnp.full((2, 4, 32), 0.05)
    plain = apply_lora(merge_for_export(quantize_model(llama(), NF4)), LORA, rngs=nnx.Rngs(1))
    plain.model.layers.self_attn.q_proj.lora_b[...] = jnp.full((2, 4, 32), 0.05)
    batch = tokens()
    grads = nnx.grad(next_token_nll, argnums=nnx.DiffState(0, nnx.Param))(model, batch)
    plain_grads = dict(nnx.to_flat_state(nnx.grad(next_token_nll, argnums=nnx.DiffState(0, nnx.Param))(plain, batch)))
    flat = dict(nnx.to_flat_state(grads))
    assert not any(isinstance(variable, QuantizedWeight) for variable in flat.values())
    assert not any(path[-1] == "kernel" and "layers" in path for path in flat)  # no gradient slot for the base
    for path, variable in flat.items():  # adapters, embedding, norms: the same gradients
        np.testing.assert_allclose(np.asarray(variable.get_value()), np.asarray(plain_grads[path].get_value()),
                                   rtol=1e-4, atol=1e-6, err_msg=str(path))


def test_lora_then_quantise_is_quantise_then_lora():
    first = quantize_model(apply_lora(llama(), LORA, rngs=nnx.Rngs(1)), NF4)
    second = apply_lora(quantize_model(llama(), NF4), LORA, rngs=nnx.Rngs(1))
    assert isinstance(first.model.layers.self_attn.q_proj.kernel, QuantizedKernel)
    for model in (first, second):
        model.model.layers.self_attn.v_proj.lora_b[...] = jnp.full((2, 4, 16), 0.1)
    np.testing.assert_allclose(np.asarray(first(tokens())[0]), np.asarray(second(tokens())[0]), atol=1e-6)


def test_merge_for_export_gives_the_float_model_a_qlora_model_computes():
    model = apply_lora(quantize_model(gpt2(), NF4), LoRAConfig(rank=4, alpha=8.0, targets=("c_attn", "c_fc")),
                       rngs=nnx.Rngs(1))
    model.transformer.h.attn.c_attn.lora_b[...] = jnp.full((2, 4, 96), 0.05)
    merged = merge_for_export(model)
    assert merge_lora(model) is not model and not is_quantized(merged)
    kernels = [v for p, v in nnx.to_flat_state(nnx.state(merged, nnx.Param)) if p[-1] == "kernel"]
    assert len(kernels) == 4 and all(k.get_value().dtype == jnp.float32 for k in kernels)
    np.testing.assert_allclose(np.asarray(merged(tokens())[0]), np.asarray(model(tokens())[0]), atol=1e-5)
    plain = gpt2()
    assert merge_for_export(plain) is plain


# --------------------------------------------------------------------------------------- the train core


def test_train_step_keeps_the_storage_frozen_and_out_of_the_state():
    def sft(model, batch, *, key, ref):
        mask = jnp.ones_like(batch["tokens"][:, 1:])
        logps = losses.token_logps(model(batch["tokens"])[0][:, :-1], batch["tokens"][:, 1:], mask)
        ref_logps = losses.token_logps(ref(batch["tokens"])[0][:, :-1], batch["tokens"][:, 1:], mask)
        return losses.aggregate(-logps + jnp.square(logps - ref_logps), mask), {}

    model = apply_lora(quantize_model(llama(), NF4), LORA, rngs=nnx.Rngs(1))
    storage = storage_leaves(model)
    step = TrainStep(sft, model, optax.adam(1e-2), trainable=nnx.LoRAParam,
                     references={"ref": quantize_model(llama(), INT8)})
    state = step.init(0)
    history = []
    for _ in range(4):
        state, metrics = step(state, {"tokens": np.asarray(tokens())})
        history.append(float(metrics["loss"]))
    assert history[-1] < history[0]
    assert {p[-1] for p, _ in nnx.to_flat_state(state.params)} == {"lora_a", "lora_b"}
    assert jax.tree.leaves(state.model_state) == []  # neither checkpointed nor donated every step
    frozen = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(step.frozen) if isinstance(v, QuantizedWeight)}
    assert frozen.keys() == storage.keys()
    trained = step.trained_model(state)
    for path, value in storage_leaves(trained).items():
        np.testing.assert_array_equal(value, storage[path])


# --------------------------------------------------------------------------------------- sharding rules


def test_storage_partition_specs_follow_the_kernels():
    model = apply_lora(quantize_model(llama(BIASED), NF4), LORA, rngs=nnx.Rngs(1))
    specs = dict(nnx.to_flat_state(partition_specs(model)))
    weights = dict(nnx.to_flat_state(nnx.state(model, WEIGHTS)))
    assert specs.keys() == weights.keys()
    layers = ("model", "layers")
    expected = {
        (*layers, "self_attn", "q_proj", "kernel", "codes"): P(None, "fsdp", "tensor"),  # column parallel
        (*layers, "self_attn", "q_proj", "kernel", "absmax_codes"): P(None, "fsdp", "tensor"),
        (*layers, "self_attn", "o_proj", "kernel", "codes"): P(None, "tensor", "fsdp"),  # row parallel
        (*layers, "mlp", "down_proj", "kernel", "absmax_codes"): P(None, "tensor", "fsdp"),
        (*layers, "mlp", "down_proj", "kernel", "absmax_scales"): P(None, None),
        (*layers, "mlp", "down_proj", "kernel", "absmax_offset"): P(None),
        (*layers, "self_attn", "q_proj", "lora_a"): P(None, "fsdp", None),
        (*layers, "self_attn", "q_proj", "bias"): P(None, "tensor"),
    }
    for path, spec in expected.items():
        assert specs[path].get_value() == spec, path
    int8 = dict(nnx.to_flat_state(partition_specs(quantize_model(llama(), INT8))))
    assert int8[(*layers, "mlp", "up_proj", "kernel", "scales")].get_value() == P(None, "tensor")


# --------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(type="fp4"), r"QuantizeConfig.type must be one of \['nf4', 'int8'\], got 'fp4'"),
    (dict(type="int8", block_size=64), "QuantizeConfig.block_size applies to nf4 only"),
    (dict(type="int8", double_quant=True), "QuantizeConfig.double_quant applies to nf4 only"),
    (dict(type="nf4", block_size=63), "QuantizeConfig.block_size must be a positive even int"),
    (dict(type="nf4", block_size=0), "QuantizeConfig.block_size must be a positive even int"),
    (dict(type="nf4", double_quant="yes"), "QuantizeConfig.double_quant must be true or false"),
    (dict(type="nf4", compute_dtype="int8"), "QuantizeConfig.compute_dtype must be one of"),
    (dict(type="nf4", targets="q_proj"), "QuantizeConfig.targets must be a non-empty tuple"),
])
def test_bad_configs_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizeConfig(**kwargs)


@pytest.mark.parametrize(("build", "config", "message"), [
    (lambda: ValueHead(32, rngs=nnx.Rngs(0)), NF4, "quantize_model: ValueHead has no decoder layers to quantise"),
    (lambda: nnx.Linear(32, 32, rngs=nnx.Rngs(0)), NF4, "quantize_model: Linear has no decoder layers"),
    (lambda: llama(BIASED), dataclasses.replace(NF4, targets=("lm_head",)),
     r"QuantizeConfig.targets: 'lm_head' \(lm_head\) is outside the decoder layers; the embeddings, norms and LM "
     r"head stay in float"),
    (llama, dataclasses.replace(NF4, targets=("q_proj", "qproj")),
     r"QuantizeConfig.targets: 'qproj' names no projection of the decoder layers; quantisable: \['mlp.down_proj'"),
    (llama, QuantizeConfig(type="nf4"),
     r"QuantizeConfig.block_size=64 does not divide the input dimension 32 of model/layers/mlp/gate_proj"),
    (lambda: quantize_model(llama(), INT8), NF4, "model/layers/mlp/down_proj is already quantised"),
])
def test_bad_input_is_one_clear_error_and_changes_nothing(build, config, message):
    model = build()
    before = jax.tree.map(np.asarray, nnx.state(model))
    with pytest.raises(ValueError, match=message):
        quantize_model(model, config)
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, nnx.state(model)), before)


def test_a_model_holding_a_language_model_is_quantised():
    reward = quantize_model(RewardModel(llama().model, rngs=nnx.Rngs(1)), INT8)
    assert isinstance(reward.backbone.layers.mlp.up_proj, QuantizedLinear)
    assert reward(tokens()).shape == (B,)
