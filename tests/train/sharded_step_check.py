"""Run by test_sharded_step.py with 8 CPU devices: the same three steps on one device and on a (fsdp=2,
tensor=4) mesh; prints a JSON report of losses, parameter differences and how the parameters are laid out, and
the compiled step's temporaries per device for one row on one device and for eight rows on an fsdp=8 mesh.
(The data axis is covered by test_multiprocess.py, whose mesh is (data=2, tensor=4) across two processes.)"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import losses
from jaxalign.models import ModelConfig
from jaxalign.train import MeshConfig, OptimizerConfig, TrainStep, make_mesh, make_optimizer
from tests.train.tiny import BATCH, SGD, host_params, make_batch, sft_objective, tiny_model

MESHES = {"one_device": None, "fsdp2_tensor4": MeshConfig(data=1, fsdp=2, tensor=4)}
# Clipping makes the update depend on the global gradient norm, a reduction over every shard; weight decay
# skips the norm scales, a per-parameter choice that must survive sharding.
OPTIMIZER = OptimizerConfig(name="sgd", learning_rate=0.5, momentum=0.9, max_grad_norm=1.0, schedule="linear",
                            warmup_steps=1, weight_decay=0.1)
Q_PROJ = "model/layers/self_attn/q_proj/kernel"


def regularised_sft(model, batch, *, key, ref):
    """NLL plus a squared log-ratio to a frozen reference, so the reference model matters numerically."""
    tokens, mask = batch["tokens"], batch["attention_mask"]
    logits, _ = model(tokens, attention_mask=mask)
    ref_logits, _ = ref(tokens, attention_mask=mask)
    logps = losses.token_logps(logits[:, :-1], tokens[:, 1:], mask[:, 1:])
    ref_logps = losses.token_logps(ref_logits[:, :-1], tokens[:, 1:], mask[:, 1:])
    per_token = -logps + 0.5 * jnp.square(logps - ref_logps)
    return losses.aggregate(per_token, mask[:, 1:]), {}


def q_proj_leaf(tree) -> jax.Array:
    """The one leaf of ``tree`` (parameters, or an optimizer state mirroring them) at the q_proj kernel."""
    leaves = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
              if "/".join(str(key.key) for key in path if hasattr(key, "key")).endswith(Q_PROJ)]
    assert len(leaves) == 1, len(leaves)
    return leaves[0]


def layout(array: jax.Array, full: np.ndarray) -> dict:
    """Each device's shard of ``array``: its shape, and whether it is the matching block of ``full``."""
    shards = array.addressable_shards
    return {"spec": str(array.sharding.spec), "shard_shapes": sorted({tuple(s.data.shape) for s in shards}),
            "devices": len({s.device for s in shards}),
            "blocks_match": all(np.array_equal(np.asarray(s.data), full[s.index]) for s in shards)}


# Long rows and a wide MLP, so that activations, not weights, fill the step's temporaries.
WIDE = ModelConfig(architecture="llama", vocab_size=97, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2,
                   head_dim=16, intermediate_size=512, remat="dots_no_batch")


def step_temporaries(mesh_config: MeshConfig | None, rows: int, length: int = 256) -> int:
    """Bytes of temporaries per device of a compiled SFT step on ``rows`` rows of ``length`` tokens."""
    mesh = None if mesh_config is None else make_mesh(mesh_config)
    step = TrainStep(sft_objective, tiny_model(0, WIDE), make_optimizer(SGD, total_steps=1), mesh=mesh)
    batch = {key: jax.ShapeDtypeStruct((rows, length), np.int32) for key in ("tokens", "attention_mask")}
    return int(step.lower(batch).compile().memory_analysis().temp_size_in_bytes)


def main() -> None:
    rng = np.random.default_rng(0)
    data = [make_batch(rng, BATCH) for _ in range(3)]
    report, params = {}, {}
    for name, mesh_config in MESHES.items():
        mesh = None if mesh_config is None else make_mesh(mesh_config)
        step = TrainStep(regularised_sft, tiny_model(0), make_optimizer(OPTIMIZER, total_steps=3), mesh=mesh,
                         micro_batches=2, references={"ref": tiny_model(1)})
        state, history = step.init(0), []
        for batch in data:
            state, metrics = step(state, batch)
            history.append(jax.device_get(metrics))
        params[name] = host_params(state)
        q_proj, momentum = q_proj_leaf(state.params), q_proj_leaf(state.opt_state)
        ref_q_proj = q_proj_leaf(step.references["ref"])
        report[name] = {
            "loss": [float(m["loss"]) for m in history],
            "grad_norm": [float(m["grad_norm"]) for m in history],
            "q_proj": layout(q_proj, params[name][Q_PROJ]),
            "q_proj_momentum": layout(momentum, np.asarray(jax.device_get(momentum))),
            "ref_q_proj_spec": str(ref_q_proj.sharding.spec),
            "max_param_difference": max(float(np.max(np.abs(value - params["one_device"][key])))
                                        for key, value in params[name].items()),
        }
    # FSDP: each device's activations are its own row's, as on one device with one row.
    report["temporaries"] = {"one_device_one_row": step_temporaries(None, 1),
                             "fsdp8_eight_rows": step_temporaries(MeshConfig(data=1, fsdp=8, tensor=1), 8)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
