"""Run by test_sharded.py with 8 CPU devices: the same rollouts (plain and guided) on one device and on a
``(data=2, fsdp=2, tensor=2)`` mesh; prints a JSON report of their differences and of the layouts."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxalign.models import LlamaForCausalLM, ModelConfig
from jaxalign.rollout import Sampler, SamplingParams

BASE = ModelConfig(architecture="llama", vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                   head_dim=8, intermediate_size=64, eos_token_ids=(3,))
# The guide has another size, so the training rules shard it differently (d_model 48 splits 2 ways, not 4).
GUIDE = dataclasses.replace(BASE, d_model=48, n_layers=3, n_heads=6, n_kv_heads=3, intermediate_size=96)
PARAMS = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=0.9, n=2)


def peaked_model(config: ModelConfig, seed: int) -> LlamaForCausalLM:
    """Random weights scaled up from the N(0, 0.02) init, so next-token distributions are not flat."""
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(seed))
    nnx.update(model, jax.tree.map(lambda p: p * 4.0, nnx.state(model, nnx.Param)))
    return model


def rollouts(mesh: Mesh | None, prompts) -> dict[str, dict[str, np.ndarray]]:
    base, guide = peaked_model(BASE, 0), peaked_model(GUIDE, 1)
    plain = Sampler(base, mesh=mesh).generate(prompts, key=jax.random.key(0), params=PARAMS)
    guided = Sampler(base, guides=[guide], mesh=mesh).generate(prompts, key=jax.random.key(1), params=PARAMS,
                                                               alpha=1.0, betas=[0.5])
    outputs = {"plain": plain, "guided": guided}
    report = {name: {field: np.asarray(getattr(out, field)) for field in
                     ("tokens", "lengths", "sampling_logps", "model_logps", "guide_logps")}
              for name, out in outputs.items()}
    if mesh is not None:
        report["layout"] = {"tokens": str(plain.tokens.sharding.spec),
                            "devices": len(plain.tokens.sharding.device_set)}
    return report


def main() -> None:
    # Eight prompts fill the batch bucket, so no padding rows are cut off and the output stays sharded.
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(4, 128, size=length)) for length in (3, 9, 5, 1, 7, 2, 4, 6)]
    single = rollouts(None, prompts)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    sharded = rollouts(mesh, prompts)
    report = {"devices": jax.device_count(), "layout": sharded["layout"]}
    for name in ("plain", "guided"):
        ours, theirs = sharded[name], single[name]
        report[name] = {
            "tokens_equal": bool(np.array_equal(ours["tokens"], theirs["tokens"])),
            "lengths_equal": bool(np.array_equal(ours["lengths"], theirs["lengths"])),
            **{f"max_{f}_difference": float(np.abs(ours[f] - theirs[f]).max()) if ours[f].size else 0.0
               for f in ("sampling_logps", "model_logps", "guide_logps")},
            "mean_length": float(theirs["lengths"].mean()),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
