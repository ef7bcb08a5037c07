"""``jaxalign plan`` against the memory a real step takes, on SmolLM2-135M on this machine's CPU.

For each method (SFT; DPO with a frozen reference; DPO with LoRA on an nf4 base; PPO with a frozen reference and
a value head on the policy's trunk), in a fresh process: the plan of the step (compiled from shapes, nothing
loaded), then the same step built from the real weights and run. The measured peak of one device's memory is

    live device buffers before the step (``jax.live_arrays()``: train state, frozen weights, reference)
    + the rise of the process's peak resident memory during one step (``VmHWM`` of /proc/self/status, reset
      through /proc/self/clear_refs just before the step; the step compiled and run once before),

i.e. what stays on the device plus what the step's execution allocates on top (activations, gradients,
temporaries). XLA:CPU has no allocator statistics (``device.memory_stats()`` is None), so the resident memory
stands in for them; the same comparison on a GPU would read ``peak_bytes_in_use``. For PPO the "step" is a whole
iteration of :class:`~jaxalign.methods.ppo.PPOTrainer` (sampling, scoring, the reward, the updates) as ``jaxalign
train ppo`` builds it, measured in its second iteration (the first compiles every program).

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
    "ppo": ("ppo", ["reference=model", "reward={function: vader}", "sampling={max_new_tokens: 32, temperature: 1.0}",
                    "loss.critic=shared", "loss.epochs=1", "loss.num_minibatches=1"]),
}
# The PPO case's preset (its reward model is replaced by VADER: the plan sizes a reward model that runs in the
# process, and this one would need `jaxalign train reward` first).
PRESETS = {"ppo": "sentiment_ppo"}


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
    config = recipe.load_run_config(PRESETS.get(method, "sentiment"), [*COMMON, *overrides], method=method)
    planned = plan.plan_run(config, plan.model_config(config.model))
    if method == "ppo":
        return {"case": case, "overrides": [*COMMON, *overrides], "plan": planned.to_dict(),
                **measure_iteration(config, planned)}

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


def _prompts(config):
    """Endless batches of prompts of ``data.max_length`` tokens (the plan's longest), as ``jaxalign train``
    iterates them."""
    import numpy as np

    from jaxalign.data.tokenize import TokenizedDataset, TokenizedExample
    from jaxalign.data.truncation import TokenSequence
    from jaxalign.methods import common

    length = config.data.max_length
    rng = np.random.default_rng(0)
    examples = [TokenizedExample(sequences=(TokenSequence(rng.integers(100, 1000, length).astype(np.int32), length),))
                for _ in range(4 * config.data.batch_size)]
    dataset = TokenizedDataset(kind="prompt", layout=(), examples=examples, pad_token_id=0)
    return common.training_batches(config.data, dataset, shuffle=False, drop_last=True)


def measure_iteration(config, planned) -> dict:
    """A PPO run of two iterations as ``jaxalign train ppo`` builds it (:func:`jaxalign.methods.rl.run_online`'s
    policy, reference, reward and sampling): the live buffers before the second iteration plus its rise of the
    peak resident memory (sampling, scoring, reward and updates)."""
    import dataclasses
    import tempfile

    import jax

    from jaxalign.methods import common, rl
    from jaxalign.methods.ppo import PPOTrainer
    from jaxalign.methods.rewards import build_reward

    lm, tokenizer = common.load_pretrained(config.model)
    reference, _ = common.load_pretrained(dataclasses.replace(config.model, lora=None))
    policy = common.with_lora(lm, config)
    reward = build_reward(config.reward, tokenizer=tokenizer)
    sampling = rl.sampling_params(config, lm, tokenizer)
    output = tempfile.mkdtemp(prefix="plan_accuracy_ppo_")
    train = dataclasses.replace(config.train, total_steps=2,
                                checkpoint=dataclasses.replace(config.train.checkpoint, directory=None),
                                log=dataclasses.replace(config.train.log, directory=output, tensorboard=False,
                                                        progress_bar=False))
    seen = {}

    class Measured(PPOTrainer):
        def minibatches(self, state, step):
            if step == 1:  # before the second iteration: everything compiled, what stays resident is live
                gc.collect()
                seen["live"] = sum(array.nbytes for array in jax.live_arrays())
                Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
                seen["before"] = _status("VmRSS")
            return super().minibatches(state, step)

    trainer = Measured(train, config.loss, policy, _prompts(config), reward=reward, tokenizer=tokenizer,
                       sampling=sampling, reference=reference)
    trainer.run()
    rise = _status("VmHWM") - seen["before"]
    measured = seen["live"] + rise
    return {"live_bytes": seen["live"], "step_rise_bytes": rise, "measured_bytes": measured,
            "plan_over_measured": planned.total / measured}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), help="measure one case here (the runner's child)")
    parser.add_argument("--output", type=Path, default=RESULTS / "plan_accuracy.json")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES),
                        help="the cases to run (default: all)")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(args.case)))
        return
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import provenance

    rows = []
    for case in args.cases:
        result = subprocess.run([sys.executable, __file__, "--case", case], capture_output=True, text=True, cwd=ROOT)
        if result.returncode != 0:
            raise SystemExit(f"{case} failed:\n{result.stderr[-3000:]}")
        row = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{case:14} plan {row['plan']['total'] / 2**20:8.0f} MiB  measured {row['measured_bytes'] / 2**20:8.0f} "
              f"MiB  ratio {row['plan_over_measured']:.3f}", flush=True)
    provenance.write_result(args.output, "plan_accuracy", setup={"model": "SmolLM2-135M-Instruct float32",
                                                                 "batch": "4 x 128 tokens (PPO: 4 prompts of 128 "
                                                                          "tokens, 32 new)", "device": "CPU"},
                            rows=rows)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
