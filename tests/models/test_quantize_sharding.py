"""On an 8-device CPU mesh (a subprocess): a quantised base's storage is split by its kernels' rules, each device
holds its block, and the sharded forward and QLoRA training step equal the single-device ones."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import host_devices_env

ROOT = Path(__file__).resolve().parents[2]

# Runs with 8 host devices, which must be configured before JAX initialises its backend.
_SCRIPT = textwrap.dedent(
    """
    import dataclasses, json
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from jaxalign.models import (LlamaForCausalLM, LoRAConfig, ModelConfig, QuantizeConfig, QuantizedWeight,
                                 apply_lora, named_shardings, quantize_model)
    from jaxalign.train import MeshConfig, TrainStep, make_mesh
    from jaxalign import losses

    config = ModelConfig(architecture="llama", vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=8, intermediate_size=64)

    def build():
        model = quantize_model(LlamaForCausalLM(config, rngs=nnx.Rngs(0)), QuantizeConfig(type="nf4", block_size=16))
        apply_lora(model, LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "o_proj", "down_proj")), rngs=nnx.Rngs(1))
        model.model.layers.self_attn.q_proj.lora_b[...] = jnp.full((2, 4, 32), 0.05)
        return model

    def sft(model, batch, *, key):
        tokens = batch["tokens"]
        mask = jnp.ones_like(tokens[:, 1:])
        logps = losses.token_logps(model(tokens)[0][:, :-1], tokens[:, 1:], mask)
        return losses.aggregate(-logps, mask), {}

    def layout(array):
        shards = array.addressable_shards
        full = np.asarray(array)
        shapes = sorted({s.data.shape for s in shards})
        return {"spec": str(array.sharding.spec), "shard_shapes": [list(shape) for shape in shapes],
                "blocks_match": all(np.array_equal(np.asarray(s.data), full[s.index]) for s in shards)}

    report = {"devices": jax.device_count()}
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    tokens = np.random.default_rng(0).integers(0, 128, size=(4, 7)).astype(np.int32)
    model = build()
    expected = np.asarray(model(jnp.asarray(tokens))[0])
    graphdef, state = nnx.split(model)
    shardings = named_shardings(model, mesh)
    weights = jax.device_put(nnx.state(model, nnx.Any(nnx.Param, QuantizedWeight)), shardings)
    rest = nnx.state(model, nnx.Not(nnx.Any(nnx.Param, QuantizedWeight)))
    forward = jax.jit(lambda weights, tokens: nnx.merge(graphdef, weights, rest)(tokens)[0])
    report["sharded_forward_max_diff"] = float(np.abs(np.asarray(forward(weights, tokens)) - expected).max())
    kernel = weights["model"]["layers"]["self_attn"]
    report["q_codes"] = layout(kernel["q_proj"]["kernel"]["codes"].get_value())
    report["o_codes"] = layout(kernel["o_proj"]["kernel"]["codes"].get_value())
    report["o_scale_codes"] = layout(kernel["o_proj"]["kernel"]["absmax_codes"].get_value())
    report["q_group_scales"] = layout(kernel["q_proj"]["kernel"]["absmax_scales"].get_value())

    data = [{"tokens": np.random.default_rng(seed).integers(0, 128, size=(8, 7)).astype(np.int32)} for seed in range(3)]
    runs = {}
    for name, step_mesh in (("one_device", None), ("fsdp2_tensor4", mesh)):
        step = TrainStep(sft, build(), optax.adam(1e-2), mesh=step_mesh, trainable=nnx.LoRAParam)
        train_state, history = step.init(0), []
        for batch in data:
            train_state, metrics = step(train_state, batch)
            history.append(float(metrics["loss"]))
        frozen = dict(nnx.to_flat_state(step.frozen))
        codes = frozen[("model", "layers", "mlp", "down_proj", "kernel", "codes")].get_value()
        runs[name] = {"loss": history, "down_codes": layout(codes),
                      "adapters": {"/".join(map(str, p)): np.asarray(v.get_value())
                                   for p, v in nnx.to_flat_state(train_state.params)}}
    report["losses"] = {name: run["loss"] for name, run in runs.items()}
    report["step_down_codes"] = runs["fsdp2_tensor4"]["down_codes"]
    report["adapter_max_diff"] = max(float(np.abs(value - runs["one_device"]["adapters"][name]).max())
                                     for name, value in runs["fsdp2_tensor4"]["adapters"].items())
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def report() -> dict:
    result = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=host_devices_env(8), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_each_device_holds_its_block_of_the_storage(report):
    assert report["devices"] == 8
    # q_proj codes [L=2, in/2=16, out=32]: column parallel, in over fsdp=2, out over tensor=4.
    assert report["q_codes"] == {"spec": "P(None, 'fsdp', 'tensor')", "shard_shapes": [[2, 8, 8]],
                                 "blocks_match": True}
    # o_proj is row parallel: its input over tensor; the 2 block-scale rows of 16 inputs cannot split 4 ways and
    # stay whole there (fit_spec), while the codes' 16 rows do.
    assert report["o_codes"]["spec"] == "P(None, 'tensor', 'fsdp')"
    assert report["o_codes"]["shard_shapes"] == [[2, 4, 16]]
    assert report["o_scale_codes"]["spec"] == "P(None, None, 'fsdp')"
    assert report["q_group_scales"]["spec"] == "P(None, None)"  # a few numbers per kernel, everywhere
    assert all(report[name]["blocks_match"] for name in ("o_codes", "o_scale_codes", "q_group_scales"))
    assert report["step_down_codes"] == {"spec": "P(None, 'tensor', 'fsdp')",
                                         "shard_shapes": [[2, 8, 16]], "blocks_match": True}


def test_sharded_forward_and_training_equal_one_device(report):
    assert report["sharded_forward_max_diff"] < 1e-5
    one, sharded = report["losses"]["one_device"], report["losses"]["fsdp2_tensor4"]
    assert sharded == pytest.approx(one, rel=1e-5)
    assert one[-1] < one[0]
    assert report["adapter_max_diff"] < 1e-5
