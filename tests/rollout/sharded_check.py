"""Run by test_sharded.py with 8 CPU devices: the same rollouts (plain and guided) on one device and on a
``(data=2, fsdp=2, tensor=2)`` mesh, and the same served rows from a :class:`ContinuousEngine` on each (arrivals,
prompts joining steps, batch growth and shrinking, seeded and guided rows); prints a JSON report of their
differences, of the layouts and of what the mesh engine compiled after its warm-up."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxalign.models import LlamaForCausalLM, ModelConfig
from jaxalign.rollout import Sampler, SamplingParams
from jaxalign.rollout.continuous import JOIN_COLUMNS, ContinuousEngine, RowSettings
from tests.rollout.conftest import count_engine_compilations
from tests.rollout.driving import Join, drive

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


def served_rows(mesh: Mesh | None) -> dict:
    """Rows served by a warm engine with a cached head: four from the start (greedy, seeded top-p, guided, seeded
    guided), three prompts joining decode steps, a burst of three prefilled together; they leave at different
    lengths, so the batch grows from 2 to 8 rows and shrinks back. One cache length (64 columns) keeps the warm-up
    short."""
    rng = np.random.default_rng(1)
    head = [int(t) for t in rng.integers(4, 128, size=10)]
    prompt = [[int(t) for t in rng.integers(4, 128, size=n)] for n in (5, 17, 9, 2, 20, 12, 7)]
    joiners = [head + [int(t) for t in rng.integers(4, 128, size=n)] for n in (12, 18, JOIN_COLUMNS - 4)]
    greedy, seeded = RowSettings(temperature=0.0), RowSettings(temperature=1.0, top_p=0.9, seed=7)
    joins = [Join(0, prompt[0], {"greedy": greedy}, 20), Join(0, prompt[1], {"seeded": seeded}, 16),
             Join(0, prompt[2], {"guided": RowSettings(temperature=0.0, weights=(1.0, 0.5))}, 18),
             Join(0, prompt[3], {"guided-seeded": RowSettings(temperature=0.9, seed=8, weights=(0.7, 1.5))}, 12),
             *[Join(2 + 3 * i, joiner, {f"joined{i}": greedy}, 8) for i, joiner in enumerate(joiners)],
             *[Join(12, p, {f"burst{i}": RowSettings(temperature=1.0, seed=20 + i)}, 6)
               for i, p in enumerate(prompt[4:])]]
    engine = ContinuousEngine(peaked_model(BASE, 0), guides=[peaked_model(GUIDE, 1)], max_batch=8,
                              max_model_len=40, slack=24, pad_token_id=0, mesh=mesh)
    engine.add_head(head)
    if mesh is not None:  # what it compiles is counted on the mesh only (one device: the same code path)
        engine.warm_up(prompt_lengths=(24,), head_lengths=(24,))  # every prompt here fits 24 columns
    with count_engine_compilations("jit(_") as compiled:
        outs = drive(engine, joins, joining=True)
    rows = {row: {"tokens": [o.token for o in out], "logprobs": [o.logprob for o in out]} for row, out in outs.items()}
    report = {"rows": rows, "joined": engine.joined, "compiled_after_warm_up": compiled}
    if mesh is not None:
        engine.admit(engine.prefill(prompt[0]), {row: greedy for row in range(4)})  # the 4-row bucket
        report["cache_layout"] = {"keys": str(engine._caches[0].keys[0].sharding.spec),
                                  "values": str(engine._caches[0].values[0].sharding.spec),
                                  "valid": str(engine._caches[0].valid.sharding.spec)}
    return report


def compare_served(ours: dict, theirs: dict) -> dict:
    rows = theirs["rows"]
    return {
        "rows": sorted(rows),
        "same_rows": sorted(ours["rows"]) == sorted(rows),
        "tokens_equal": all(ours["rows"][r]["tokens"] == rows[r]["tokens"] for r in rows),
        "max_logprob_difference": max(float(np.abs(np.subtract(ours["rows"][r]["logprobs"],
                                                               rows[r]["logprobs"])).max()) for r in rows),
        "tokens": sum(len(rows[r]["tokens"]) for r in rows),
        "joined": [ours["joined"], theirs["joined"]],
        "compiled_after_warm_up": ours["compiled_after_warm_up"],
        "cache_layout": ours["cache_layout"],
    }


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
    report["continuous"] = compare_served(served_rows(mesh), served_rows(None))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
