"""Time per PPO iteration, split into generation, scoring and training: jaxalign against TRL's PPO trainer.

Same work on both sides, in one run on the same machine (first jaxalign, then TRL in a subprocess):

- model: SmolLM2-135M-Instruct (the embedded GGUF, dequantised to float32; exported with
  ``jaxalign.models.save_hf`` for TRL, so both sides hold the same weights), float32 on CPU;
- one iteration = 16 prompts (the main job's review requests, chat template + generation prompt), 48 new
  tokens at temperature 1 without filters, stopping at EOS; a reward model (the same trunk with a random
  scalar head) scores each response; the reference model gives per-token KL penalties; GAE; one PPO epoch of
  one minibatch (16 rows) updating the policy and a critic on its own backbone (TRL's value model), AdamW;
- jaxalign: :class:`jaxalign.methods.ppo.PPOTrainer` (``epochs=1``, ``num_minibatches=1``) twice: with
  ``critic="separate"`` (like for like: the critic has its own backbone, as TRL's value model) and with
  ``critic="shared"`` (a value head on the policy's trunk, jaxalign's choice for the CPU presets: one trunk
  forward and backward fewer per step); its own per-phase timers (``time/generate``, ``time/score``,
  ``time/train``, ``time/iteration``, which also counts copying the new weights into the sampler). Without
  sampling filters the policy's log-probs come from the sampler, as TRL takes them from ``generate``;
- TRL: ``trl.experimental.ppo.PPOTrainer`` of TRL 0.29.1 (TRL 1.x dropped PPO), via benchmarks/trl_ppo.py,
  which documents how its phases are timed.

The first ``--warmup`` iterations (jaxalign's include compilation) are dropped; the median of the next
``--iterations`` is reported, and the speed-up is TRL's median iteration time over jaxalign's.

Differences that remain: TRL applies no gradient clipping, jaxalign clips at 1.0; TRL runs its reference
model's LM head over the prompt positions too, jaxalign only over the response's.

Commands::

    python benchmarks/ppo_throughput.py                       # ~10-15 min on 2 cores
    python benchmarks/ppo_throughput.py --iterations 1 --warmup 1 --skip-trl   # quick check of the jaxalign side

Writes ``benchmarks/results/ppo_throughput.json`` and ``.png`` (stacked phase times per framework).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import provenance, trl_ppo  # noqa: E402
from experiments.sentiment import make_prompts  # noqa: E402
from jaxalign import data as jdata  # noqa: E402
from jaxalign import models  # noqa: E402
from jaxalign.eval.judges import RewardModelJudge  # noqa: E402
from jaxalign.methods.ppo import PPOConfig, PPOTrainer  # noqa: E402
from jaxalign.methods.rewards import JudgeReward  # noqa: E402
from jaxalign.rollout import SamplingParams  # noqa: E402
from jaxalign.train import CheckpointConfig, LogConfig, OptimizerConfig, TrainConfig  # noqa: E402

PHASES = ("generate_s", "score_s", "train_s")
SIDES = ("jaxalign", "jaxalign_shared", "trl")  # jaxalign: separate critic (like for like); _shared: shared trunk
RESULTS = ROOT / "benchmarks" / "results"


def jaxalign_iterations(prompts: list[str], args, log_dir: Path, critic: str) -> list[dict]:
    """Run warmup + iterations PPO iterations; per-iteration phase times from the trainer's metrics."""
    policy, tokenizer = models.load_gguf(models.default_model_path())
    reference, _ = models.load_gguf(models.default_model_path())
    scorer, _ = models.load_gguf(models.default_model_path())
    reward_model = models.RewardModel(scorer, rngs=nnx.Rngs(0))
    records = [jdata.PromptRecord([{"role": "user", "content": p}]) for p in prompts]
    dataset = jdata.tokenize(records, tokenizer)
    batches = jdata.BatchIterator(dataset, batch_size=args.batch_size, seed=0, shuffle=False, drop_last=True)
    total = args.warmup + args.iterations
    config = TrainConfig(total_steps=total, seed=0,
                         optimizer=OptimizerConfig(learning_rate=args.learning_rate, warmup_steps=0,
                                                   schedule="constant", max_grad_norm=1.0),
                         checkpoint=CheckpointConfig(directory=None),
                         log=LogConfig(directory=str(log_dir), tensorboard=False))
    stop = tuple(policy.config.eos_token_ids) or (tokenizer.eos_token_id,)
    trainer = PPOTrainer(config, PPOConfig(epochs=1, num_minibatches=1, critic=critic), policy, batches,
                         reward=JudgeReward(RewardModelJudge(reward_model, tokenizer=tokenizer)), tokenizer=tokenizer,
                         sampling=SamplingParams(max_new_tokens=args.new_tokens, temperature=args.temperature,
                                                 stop_token_ids=stop),
                         reference=reference)
    trainer.run()
    logged = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return [{"generate_s": r["time/generate"], "score_s": r["time/score"], "train_s": r["time/train"],
             "total_s": r["time/iteration"], "response_tokens": r["response_length"]} for r in logged]


def trl_iterations(prompts: list[str], args, work: Path) -> dict:
    """TRL's iterations in a subprocess (TRL 0.29.1 on its own PYTHONPATH), on an HF export of the same weights."""
    checkpoint = work / "smollm2_hf"
    model, tokenizer = models.load_gguf(models.default_model_path())
    models.save_hf(model, model.config, checkpoint, tokenizer)
    del model
    prompt_file = work / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = work / "trl.json"
    argv, env = trl_ppo.subprocess_command([
        "--checkpoint", str(checkpoint), "--prompts", str(prompt_file), "--out", str(out),
        "--batch-size", str(args.batch_size), "--new-tokens", str(args.new_tokens),
        "--iterations", str(args.iterations), "--warmup", str(args.warmup),
        "--temperature", str(args.temperature), "--learning-rate", str(args.learning_rate)])
    subprocess.run(argv, env=env, check=True)
    return json.loads(out.read_text())


def median(rows: list[dict], key: str) -> float:
    return statistics.median(row[key] for row in rows)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = [name for name in SIDES if result.get(name)]
    figure, axis = plt.subplots(figsize=(6, 3.6))
    bottoms = np.zeros(len(sides))
    for phase, colour in zip(PHASES, ("#4c72b0", "#dd8452", "#55a868")):
        heights = np.array([result[side]["median"][phase] for side in sides])
        axis.bar(sides, heights, bottom=bottoms, color=colour, label=phase.removesuffix("_s"))
        bottoms += heights
    for index, side in enumerate(sides):
        axis.text(index, bottoms[index], f"{result[side]['median']['total_s']:.1f} s", ha="center", va="bottom")
    axis.set_ylabel("seconds per PPO iteration (median)")
    title = "PPO iteration: 16 prompts x 48 new tokens, SmolLM2-135M fp32"
    if result.get("speedup") is not None:
        title += f"\njaxalign {result['speedup']:.2f}x TRL (separate critic)"
        if result.get("speedup_shared") is not None:
            title += f", {result['speedup_shared']:.2f}x (shared critic)"
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=1e-6)
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "ppo_throughput.json")
    args = parser.parse_args(argv)
    count = args.batch_size * (args.warmup + args.iterations)
    prompts = make_prompts(count, seed=1)
    result: dict = {"config": vars(args) | {"out": str(args.out)}, "provenance": provenance.describe(), "machine": {
        "platform": platform.platform(), "cpus": os.cpu_count(), "jax_backend": jax.default_backend()}}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for side, critic in (("jaxalign", "separate"), ("jaxalign_shared", "shared")):
            started = time.perf_counter()
            rows = jaxalign_iterations(prompts, args, work / side, critic)
            timed = rows[args.warmup:]
            result[side] = {"critic": critic, "warmup_iterations": rows[:args.warmup], "iterations": timed,
                            "median": {k: median(timed, k) for k in (*PHASES, "total_s")},
                            "wall_s": time.perf_counter() - started}
        if not args.skip_trl:
            result["trl"] = trl_iterations(prompts, args, work)
    for side, key in (("jaxalign", "speedup"), ("jaxalign_shared", "speedup_shared")):
        result[key] = (result["trl"]["median"]["total_s"] / result[side]["median"]["total_s"]
                       if result.get("trl") else None)
    shown = [side for side in SIDES if result.get(side)]
    print(f"{'phase (median s)':<18}" + "".join(f"{side:>16}" for side in shown))
    for key in (*PHASES, "total_s"):
        print(f"{key:<18}" + "".join(f"{result[side]['median'][key]:>16.2f}" for side in shown))
    if result["speedup"] is not None:
        print(f"jaxalign is {result['speedup']:.2f}x TRL per PPO iteration with a separate critic, "
              f"{result['speedup_shared']:.2f}x with a shared one (target 2x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
