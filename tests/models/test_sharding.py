"""The partition table: every parameter covered; on an 8-device CPU mesh the specs divide and shard exactly."""

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxalign.models import (
    CausalLMWithValueHead,
    LlamaForCausalLM,
    RewardModel,
    partition_specs,
)
from tests.conftest import host_devices_env
from tests.models.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("wrap", ["lm", "lm_tied", "value_head", "reward_model"])
def test_every_parameter_has_a_spec_of_its_rank(wrap):
    config = dataclasses.replace(TINY, tie_word_embeddings=wrap == "lm_tied")
    lm = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    model = {"lm": lm, "lm_tied": lm, "value_head": CausalLMWithValueHead(lm, rngs=nnx.Rngs(1)),
             "reward_model": RewardModel(lm.model, num_objectives=2, rngs=nnx.Rngs(1))}[wrap]
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    specs = dict(nnx.to_flat_state(partition_specs(model)))
    assert set(specs) == {path for path, _ in params}
    for path, param in params:
        spec = specs[path].get_value()
        assert isinstance(spec, P) and len(spec) == param.get_value().ndim, path
        if "layers" in path:
            assert spec[0] is None, f"{path}: the stacked layer axis is never split"


def test_known_specs():
    specs = partition_specs(LlamaForCausalLM(TINY, rngs=nnx.Rngs(0)))
    assert specs.model.embed_tokens.embedding.get_value() == P("tensor", "fsdp")
    assert specs.model.layers.self_attn.q_proj.kernel.get_value() == P(None, "fsdp", "tensor")
    assert specs.model.layers.self_attn.o_proj.kernel.get_value() == P(None, "tensor", "fsdp")
    assert specs.model.layers.mlp.down_proj.kernel.get_value() == P(None, "tensor", "fsdp")
    assert specs.model.layers.input_layernorm.scale.get_value() == P(None, None)
    assert specs.lm_head.kernel.get_value() == P("fsdp", "tensor")


def test_uncovered_parameter_is_named():
    class WithAdapter(nnx.Module):
        def __init__(self):
            self.lm = LlamaForCausalLM(TINY, rngs=nnx.Rngs(0))
            self.adapter = nnx.Linear(4, 4, use_bias=False, rngs=nnx.Rngs(0))

    with pytest.raises(ValueError, match="no partition rule for parameter adapter/kernel"):
        partition_specs(WithAdapter())


# Runs with 8 host devices, which must be configured before JAX initialises its backend.
_MESH_SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, sys, tempfile
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import Mesh
    from jaxalign.models import (GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, LoRAConfig, ModelConfig,
                                 apply_lora, fit_spec, load_hf, named_shardings, partition_specs, save_hf)

    report = {"devices": jax.device_count()}
    mesh = Mesh(np.array(jax.devices()).reshape(1, 2, 4), ("data", "fsdp", "tensor"))
    odd = ModelConfig(architecture="llama", vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=8, intermediate_size=64)
    config = dataclasses.replace(odd, vocab_size=128)  # every dimension divides fsdp=2 x tensor=4
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    specs = dict(nnx.to_flat_state(partition_specs(model)))
    report["not_dividing"] = [
        "/".join(map(str, path)) for path, spec in specs.items()
        if fit_spec(spec.get_value(), params[path].get_value().shape, mesh) != spec.get_value()
    ]

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, size=(4, 7)))
    expected = np.asarray(model(tokens)[0])
    shardings = named_shardings(model, mesh)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, shardings)
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens)[0])
    report["sharded_forward_max_diff"] = float(np.abs(np.asarray(forward(state, tokens)) - expected).max())
    q = state["model"]["layers"]["self_attn"]["q_proj"]["kernel"].get_value()
    report["q_proj_shard_shape"] = list(q.addressable_shards[0].data.shape)

    with tempfile.TemporaryDirectory() as directory:
        save_hf(model, config, directory)
        loaded = load_hf(directory, mesh=mesh)
        loaded_state = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
        wanted = dict(nnx.to_flat_state(shardings))
        report["load_shardings_match"] = all(
            loaded_state[p].get_value().sharding.is_equivalent_to(sharding.get_value(), len(sharding.get_value().spec))
            for p, sharding in wanted.items()
        )
        report["loaded_forward_max_diff"] = float(np.abs(np.asarray(loaded(tokens)[0]) - expected).max())

    # GPT-2 with LoRA adapters (B moved off zero): every spec fits, and sharding does not change the logits.
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=128, d_model=32, n_layers=2, n_heads=4, intermediate_size=64,
                                      max_position_embeddings=16), rngs=nnx.Rngs(0))
    apply_lora(gpt2, LoRAConfig(rank=4, alpha=4.0, targets=("c_attn", "c_fc")), rngs=nnx.Rngs(1))
    gpt2.transformer.h.attn.c_attn.lora_b[...] = jnp.full((2, 4, 96), 0.1)
    gpt2_expected = np.asarray(gpt2(tokens)[0])
    gpt2_graphdef, gpt2_state = nnx.split(gpt2)
    gpt2_params = dict(nnx.to_flat_state(nnx.state(gpt2, nnx.Param)))
    report["gpt2_not_dividing"] = [
        "/".join(map(str, path)) for path, spec in nnx.to_flat_state(partition_specs(gpt2))
        if fit_spec(spec.get_value(), gpt2_params[path].get_value().shape, mesh) != spec.get_value()
    ]
    gpt2_state = jax.device_put(gpt2_state, named_shardings(gpt2, mesh))
    gpt2_forward = jax.jit(lambda state, tokens: nnx.merge(gpt2_graphdef, state)(tokens)[0])
    report["gpt2_lora_sharded_max_diff"] = float(
        np.abs(np.asarray(gpt2_forward(gpt2_state, tokens)) - gpt2_expected).max())

    # A vocabulary of 97 cannot be split 4 ways: that dimension is replicated instead of failing.
    odd_model = LlamaForCausalLM(odd, rngs=nnx.Rngs(0))
    report["odd_vocab_embedding_spec"] = str(
        named_shardings(odd_model, mesh).model.embed_tokens.embedding.get_value().spec
    )
    print(json.dumps(report))
    """
)


def test_partition_table_on_an_8_device_cpu_mesh():
    env = host_devices_env(8)
    result = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    assert report["not_dividing"] == []
    assert report["sharded_forward_max_diff"] < 1e-5
    assert report["q_proj_shard_shape"] == [2, 16, 8]  # [L, D/fsdp, H*Dh/tensor]
    assert report["load_shardings_match"]
    assert report["loaded_forward_max_diff"] < 1e-5
    assert report["odd_vocab_embedding_spec"] == str(P(None, "fsdp"))
    assert report["gpt2_not_dividing"] == []
    assert report["gpt2_lora_sharded_max_diff"] < 1e-5
