"""``jaxalign plan`` against the memory a real step takes, on SmolLM2-135M on this machine's CPU.

For each method (SFT; DPO with a frozen reference; DPO with LoRA on an nf4 base), in a fresh process: the plan of
the step (compiled from shapes, nothing loaded), then the same step built from the real weights and run. The
measured peak of one device's memory is

    live device buffers before the step (``jax.live_arrays()``: train state, frozen weights, reference)
    + the rise of the process's peak resident memory during one step (``VmHWM`` of /proc/self/status, reset
      through /proc/self/clear_refs just before the step; the step compiled and run once before),

i.e. what stays on the device plus what the step's execution allocates on top (activations, gradients,
temporaries). XLA:CPU has no allocator statistics (``device.memory_stats()`` is None), so the resident memory
stands in for them; the same comparison on a GPU would read ``peak_bytes_in_use``.

    python benchmarks/plan_accuracy.py         # writes benchmarks/results/plan_accuracy.json
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COMMON = ["data.buckets=null", "data.max_length=128", "data.batch_size=4"]
LORA = "model.lora={rank: 16, alpha: 32, targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}"
CASES = {
    "sft": ("sft", []),
    "dpo": ("dpo", ["reference=model"]),
    "dpo qlora nf4": ("dpo", [LORA, "model.quantize.type=nf4", "reference=lora_base"]),
}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(case: str) -> dict:
    """Plan, then measure, one case (run in its own process)."""
    import jax
    from flax import nnx

    from jaxalign.methods import common, dpo, plan, recipe, sft
    from jaxalign.methods.plan import _synthetic
    from jaxalign.train.optimizer import make_optimizer
    from jaxalign.train.step import TrainStep

    method, overrides = CASES[case]
    config = recipe.load_run_config("sentiment", [*COMMON, *overrides], method=method)
    planned = plan.plan_run(config, plan.model_config(config.model))

    lm, tokenizer = common.load_pretrained(config.model)
    kind = "sft" if method == "sft" else "preference"
    build = {"sft": sft.build, "dpo": dpo.build}[method]
    model, objective, references, dataset, _ = build(config, lm, tokenizer,
                                                     _synthetic(kind, config.data.batch_size, config.data.max_length))
    trainable = nnx.LoRAParam if config.model.lora is not None else nnx.Param
    step = TrainStep(objective, model, make_optimizer(config.train.optimizer, config.train.total_steps),
                     trainable=trainable, micro_batches=config.train.micro_batches, references=references)
    batch = dict(next(iter(common.training_batches(config.data, dataset, shuffle=False))))
    state = step.init(0)
    del lm, model, references
    gc.collect()
    state, metrics = step(state, batch)  # compiled and run once
    jax.block_until_ready((state, metrics))
    gc.collect()
    live = sum(array.nbytes for array in jax.live_arrays())
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status("VmRSS")
    state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    rise = _status("VmHWM") - before
    measured = live + rise
    return {"case": case, "overrides": [*COMMON, *overrides], "plan": planned.to_dict(), "live_bytes": live,
            "step_rise_bytes": rise, "measured_bytes": measured,
            "plan_over_measured": planned.total / measured}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), help="measure one case here (the runner's child)")
    parser.add_argument("--output", type=Path, default=RESULTS / "plan_accuracy.json")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(args.case)))
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import provenance

    rows = []
    for case in CASES:
        result = subprocess.run([sys.executable, __file__, "--case", case], capture_output=True, text=True, cwd=ROOT)
        if result.returncode != 0:
            raise SystemExit(f"{case} failed:\n{result.stderr[-3000:]}")
        row = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{case:14} plan {row['plan']['total'] / 2**20:8.0f} MiB  measured {row['measured_bytes'] / 2**20:8.0f} "
              f"MiB  ratio {row['plan_over_measured']:.3f}", flush=True)
    provenance.write_result(args.output, "plan_accuracy", setup={"model": "SmolLM2-135M-Instruct float32",
                                                                 "batch": "4 x 128 tokens", "device": "CPU"},
                            rows=rows)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
