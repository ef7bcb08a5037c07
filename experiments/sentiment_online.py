"""The embedded default, online: PPO on the main job's reward model, or GRPO on the gold judge itself.

    python -m experiments.sentiment_online ppo  [--output-dir runs/sentiment_ppo]  [--reward-model DIR] [k=v ...]
    python -m experiments.sentiment_online grpo [--output-dir runs/sentiment_grpo] [k=v ...]

Stages:

1. prompts: the main job's review/opinion requests (``experiments.sentiment.make_prompts``, same seed and
   split: the held-out fifth is never trained on, by the reward model or the policy), written as prompt
   files beside the run.
2. training: preset ``sentiment_ppo`` (reward: the reward model of ``python -m experiments.sentiment``,
   ``runs/sentiment/reward/export``; gold judge VADER logged beside it) or ``sentiment_grpo`` (reward: VADER
   plus a small coherence term). Each iteration logs the gold reward, the proxy reward and the KL.
3. evaluation on the held-out prompts: gold win rate of the trained policy against the base model with a
   95 % interval, KL, mean gold reward.

Writes ``<output-dir>/summary.json`` and ``summary.png`` (gold and proxy reward over training, both against
KL: the over-optimisation curve, and the held-out win rate), prints a table. Overrides go to the preset
(``train.total_steps=10``, ``loss.kl_coef=0.1``).
"""

# ruff: noqa: E402  (jaxalign and JAX are imported after the thread pool is sized)
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from jaxalign.cpu_devices import provide_collective_threads

if __name__ == "__main__":  # before JAX starts: emulated CPU devices get the threads their collectives need
    provide_collective_threads()

import numpy as np

from experiments.sentiment import make_prompts, write_jsonl
from jaxalign.methods import pipeline, recipe
from jaxalign.train.plots import read_metrics

DEFAULT_REWARD_MODEL = Path("runs/sentiment/reward/export")


def write_prompt_files(out: Path, count: int, seed: int) -> tuple[Path, Path]:
    prompts = make_prompts(count, seed)
    held_out = max(1, count // 5)  # the main job's split
    as_records = lambda texts: [{"prompt": [{"role": "user", "content": t}]} for t in texts]  # noqa: E731
    return (write_jsonl(out / "prompts_train.jsonl", as_records(prompts[held_out:])),
            write_jsonl(out / "prompts_eval.jsonl", as_records(prompts[:held_out])))


def _series(records: list[dict], key: str) -> list[float]:
    return [float(r[key]) for r in records if isinstance(r.get(key), (int, float))]


def summarise(method: str, out: Path, evaluation: dict, seconds: float) -> dict:
    records = read_metrics(out / "metrics.jsonl")
    gold, proxy, kl = _series(records, "gold_reward"), _series(records, "reward"), _series(records, "kl")
    window = max(1, len(gold) // 5)  # first and last fifth of the run, averaged (single batches are noisy)
    return {
        "method": method, "iterations": len(records), "seconds": round(seconds, 1),
        "train_gold_reward": {"first": float(np.mean(gold[:window])), "last": float(np.mean(gold[-window:]))},
        "train_proxy_reward": {"first": float(np.mean(proxy[:window])), "last": float(np.mean(proxy[-window:]))},
        "train_kl_last": float(np.mean(kl[-window:])),
        "heldout_win_rate": evaluation["win_rate"],
        "heldout_gold_reward": evaluation["gold_reward"],
        "heldout_kl": evaluation["kl"],
        "heldout_learned_reward": evaluation.get("learned_reward"),
    }


def _running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at each point (fewer at the start)."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    starts = np.maximum(np.arange(1, len(values) + 1) - window, 0)
    return (sums[1:] - sums[starts]) / (np.arange(1, len(values) + 1) - starts)


def plot_summary(method: str, out: Path, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(out / "metrics.jsonl")
    steps = [r["step"] for r in records]
    figure, (over_time, over_kl, win) = plt.subplots(1, 3, figsize=(14, 3.8))
    kl = np.asarray(_series(records, "kl"))
    for key, label, colour in (("gold_reward", "gold (VADER)", "C0"), ("reward", "proxy (training reward)", "C1")):
        values = np.asarray(_series(records, key))
        # One batch per point is noisy: a running mean over 5 iterations, and means over KL quintiles.
        over_time.plot(steps[:len(values)], values, color=colour, lw=0.6, alpha=0.4)
        over_time.plot(steps[:len(values)], _running_mean(values, 5), color=colour, lw=2, label=f"{label}, mean of 5")
        over_kl.scatter(kl[:len(values)], values, color=colour, s=8, alpha=0.35)
        edges = np.quantile(kl, np.linspace(0, 1, 6))
        bins = np.clip(np.searchsorted(edges, kl, side="right") - 1, 0, 4)
        centres = [kl[bins == b].mean() for b in range(5) if (bins == b).any()]
        means = [values[bins == b].mean() for b in range(5) if (bins == b).any()]
        over_kl.plot(centres, means, "o-", color=colour, lw=2, label=f"{label}, KL quintile means")
    over_time.set_xlabel("iteration")
    over_time.set_title(f"{method}: reward over training")
    over_kl.set_xlabel("KL(policy || reference), nats per response")
    over_kl.set_title("reward against KL (over-optimisation)")
    for axis in (over_time, over_kl):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    rate = summary["heldout_win_rate"]
    win.bar(["gold win rate"], [rate["rate"]], yerr=[[rate["rate"] - rate["low"]], [rate["high"] - rate["rate"]]],
            capsize=8, color="#4c72b0")
    win.axhline(0.5, color="grey", ls="--", lw=1)
    win.set_ylim(0, 1)
    win.set_title(f"held out vs base, KL {summary['heldout_kl']['mean']:.2f} (95% CI)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=("ppo", "grpo"))
    parser.add_argument("--output-dir", type=Path, default=None, help="default runs/sentiment_<method>")
    parser.add_argument("--reward-model", type=Path, default=DEFAULT_REWARD_MODEL,
                        help="PPO's reward model (exported by `python -m experiments.sentiment`)")
    parser.add_argument("--prompts", type=int, default=320, help="prompts in all, as in the main job")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace the run an earlier one left in --output-dir")
    parser.add_argument("overrides", nargs="*", help="preset overrides, e.g. train.total_steps=10")
    return parser


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    # intermixed: plain parse_args binds `overrides` (empty) together with `method`, so the documented
    # `grpo --output-dir DIR key=value` was refused ("unrecognized arguments")
    return build_parser().parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    out = args.output_dir or Path(f"runs/sentiment_{args.method}")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    train_file, eval_file = write_prompt_files(out, args.prompts, args.seed)
    print(f"[1/3] prompts: {train_file} (train), {eval_file} (held out)")
    overrides = [f"output_dir={out}", f"data.source={train_file}", f"eval_data.source={eval_file}"]
    if args.method == "ppo":
        if not (args.reward_model / "reward_model.json").is_file():
            print(f"error: {args.reward_model} holds no reward model; train one first with "
                  "`python -m experiments.sentiment` (the main job) or pass --reward-model DIR", file=sys.stderr)
            return 2
        overrides.append(f"reward.model={args.reward_model}")
    config = recipe.load_run_config(f"sentiment_{args.method}", overrides + list(args.overrides))
    print(f"[2/3] {args.method}: {config.train.total_steps} iterations (preset sentiment_{args.method})")
    result = pipeline.run(config, overwrite=args.overwrite)

    print("[3/3] held-out evaluation against the base model")
    summary = summarise(args.method, out, result.extra["evaluation"], time.perf_counter() - started)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_summary(args.method, out, summary, out / "summary.png")
    rate, gold = summary["heldout_win_rate"], summary["train_gold_reward"]
    print(f"gold reward during training: {gold['first']:.3f} -> {gold['last']:.3f} "
          f"(proxy {summary['train_proxy_reward']['first']:.3f} -> {summary['train_proxy_reward']['last']:.3f}, "
          f"KL {summary['train_kl_last']:.2f})")
    print(f"held-out gold win rate vs base: {rate['rate']:.1%} [{rate['low']:.1%}, {rate['high']:.1%}], "
          f"KL {summary['heldout_kl']['mean']:.2f}; {summary['seconds'] / 60:.1f} min")
    print(f"wrote {out / 'summary.json'} and {out / 'summary.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
