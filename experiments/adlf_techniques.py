"""ADLF's last two techniques on the main job: (a) DPO + a contrastive term against DPO alone, (b) self-critique
training against SFT on the best sample; the same prompts, pairs and gold judge as ``experiments.sentiment``.

    python -m experiments.adlf_techniques [--output-dir runs/adlf_techniques] [--steps 8] [--overwrite]
    python -m experiments.adlf_techniques --smoke      # every stage on a handful of prompts (checks the code path)

Stages (each cached in the output directory; a rerun skips what is done):

1. pairs: the main job's prompts, split and gold-labelled pairs (``experiments.sentiment.labelled_pairs``, read back
   from ``--pairs-dir``, the main job's directory, when it holds them).
2. four runs from the same base, LoRA adapters (preset ``compare_methods``: r = 16 on the seven projections,
   learning rate 1e-4), ``--steps`` steps of ``--batch-size`` examples each:
   ``dpo`` (DPO on the pairs), ``dpo_contrastive`` (the same plus ``loss.contrastive {weight, temperature 0.07,
   pooling mean}``), ``sft_best`` (SFT on each pair's chosen side: the best of four base samples by the gold
   judge), ``critique`` (``jaxalign train critique`` on ``--critique-prompts`` train prompts with the principles
   below, VADER as the judge: SFT on the revisions it prefers and on the critiques, weight 0.5).
3. evaluation: each run's model against the base on the held-out prompts (the same sampling keys): gold win rate
   with its 95 % interval, mean gold score, KL to the base, response length.

Writes ``<output-dir>/summary.json`` (also copied to ``experiments/results/adlf_techniques.json``) and
``summary.png`` (``experiments/results/adlf_techniques.png``), prints the table and three critique rows.
"""

# ruff: noqa: E402  (JAX and jaxalign are imported after the huge-pages re-execution)
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from jaxalign.cpu_devices import provide_collective_threads
from jaxalign.hostmem import use_transparent_huge_pages

if __name__ == "__main__":
    use_transparent_huge_pages()
    provide_collective_threads()

import jax

from experiments.sentiment import labelled_pairs, make_prompts, write_jsonl
from jaxalign import eval as jeval
from jaxalign import models
from jaxalign.methods import critique, pipeline, recipe
from jaxalign.rollout import SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = ("dpo", "dpo_contrastive", "sft_best", "critique")
PRINCIPLES = ("Sound warm, positive and enthusiastic about the subject.",
              "Answer in one short sentence.")
CONTRASTIVE = "{weight: 0.5, temperature: 0.07, pooling: mean}"
SMOKE = {"prompts": 20, "steps": 2, "batch_size": 2, "critique_prompts": 4, "eval_samples": 1,
         "max_new_tokens": 8}


def run_configs(out: Path, args) -> dict[str, recipe.RunConfig]:
    pairs = out / "pairs" / "pairs_train.jsonl"
    common = [f"train.total_steps={args.steps}", f"data.batch_size={args.batch_size}",
              "train.optimizer.warmup_steps=1", "train.log.tensorboard=false", "export=true"]
    configs = {
        "dpo": ("dpo", [f"data.source={pairs}"]),
        "dpo_contrastive": ("dpo", [f"data.source={pairs}", f"loss.contrastive={CONTRASTIVE}"]),
        "sft_best": ("sft", [f"data.source={pairs}"]),
        "critique": ("critique", [f"data.source={out / 'critique_prompts.jsonl'}", "gold=vader",
                                  f"loss.principles={json.dumps(list(PRINCIPLES))}", "loss.critique_weight=0.5",
                                  f"loss.max_answer_tokens={args.max_new_tokens}",
                                  f"loss.max_critique_tokens={args.max_new_tokens + 16}",
                                  "loss.preference_pairs=false", "loss.generation_batch_size=16",
                                  "data.max_length=320", "data.buckets=[128, 192, 256, 320]"]),
    }
    return {name: recipe.load_run_config("compare_methods", [f"output_dir={out / name}", *common, *extra],
                                         method=method) for name, (method, extra) in configs.items()}


def export_of(config: recipe.RunConfig) -> Path:
    directory = Path(config.output_dir)
    return directory / "sft" / "export" if config.method == "critique" else directory / "export"


def evaluate(out: Path, name: str, export: Path, reference, tokenizer, prompts, *, judge, args) -> dict:
    cache = out / "evaluation" / f"{name}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    policy, _ = models.load_pretrained(str(export), source=f"{name} export")
    evaluation = jeval.evaluate_policy(
        policy, reference, tokenizer, prompts, judge=judge,
        params=SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0),
        samples_per_prompt=args.eval_samples, key=jax.random.key(args.seed + 2), batch_size=32)
    result = evaluation.to_dict()
    cache.parent.mkdir(exist_ok=True)
    cache.write_text(json.dumps(result, default=float) + "\n")
    return result


def table(rows: dict[str, dict]) -> str:
    header = ("run", "gold win rate vs base [95% CI]", "gold score", "KL (nats)", "length", "train time")
    lines = [header]
    for name, row in rows.items():
        win, gold = row["win_rate"], row["gold_reward"]["policy"]
        lines.append((name, f"{win['rate']:.1%} [{win['low']:.1%}, {win['high']:.1%}]", f"{gold['mean']:+.3f}",
                      f"{row['kl']['mean']:.2f}", f"{row['response_length']['policy']['mean']:.1f}",
                      f"{row['seconds'] / 60:.1f} min"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
                     for line in lines)


def plot(rows: dict[str, dict], base_gold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    colours = [f"C{i}" for i in range(len(names))]
    figure, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    rates = [rows[n]["win_rate"] for n in names]
    axes[0].bar(names, [r["rate"] for r in rates], color=colours,
                yerr=[[r["rate"] - r["low"] for r in rates], [r["high"] - r["rate"] for r in rates]], capsize=6)
    axes[0].axhline(0.5, color="grey", ls="--", lw=1)
    axes[0].set_ylim(0, 1)
    axes[0].set_title("gold (VADER) win rate vs base, 95% CI")
    axes[1].bar(names, [rows[n]["gold_reward"]["policy"]["mean"] for n in names], color=colours)
    axes[1].axhline(base_gold, color="grey", ls="--", lw=1, label="base")
    axes[1].set_title("mean gold score")
    axes[1].legend(fontsize=8)
    axes[2].bar(names, [rows[n]["kl"]["mean"] for n in names], color=colours)
    axes[2].set_title("KL to the base (nats)")
    lengths = [rows[n]["response_length"]["policy"] for n in names]
    axes[3].bar(names, [m["mean"] for m in lengths], color=colours, capsize=6,
                yerr=[[m["mean"] - m["low"] for m in lengths], [m["high"] - m["mean"] for m in lengths]])
    axes[3].axhline(rows[names[0]]["response_length"]["reference"]["mean"], color="grey", ls="--", lw=1, label="base")
    axes[3].set_title("response length (tokens), 95% CI")
    axes[3].legend(fontsize=8)
    for axis in axes:
        axis.tick_params(axis="x", labelrotation=20, labelsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/adlf_techniques"))
    parser.add_argument("--pairs-dir", type=Path, default=Path("runs/sentiment"),
                        help="the main job's directory: its pairs are read back when their settings match")
    parser.add_argument("--prompts", type=int, default=320, help="the main job's prompts (80%% train, 20%% held out)")
    parser.add_argument("--steps", type=int, default=8, help="training steps of each run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--critique-prompts", type=int, default=32, help="train prompts the critique run revises")
    parser.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts evaluated")
    parser.add_argument("--eval-samples", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help=f"tiny ({SMOKE}): checks the code path")
    parser.add_argument("--overwrite", action="store_true", help="replace the runs an earlier run left")
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
        args.eval_prompts = 4
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    judge = jeval.VaderJudge()

    prompts = make_prompts(args.prompts, args.seed)
    held_out = max(1, args.prompts // 5)
    train_prompts, eval_prompts = prompts[held_out:], prompts[:held_out][:args.eval_prompts]
    base, tokenizer = models.load_gguf(models.default_model_path())
    settings = {"prompts": args.prompts, "samples": 4 if not args.smoke else 2,
                "max_new_tokens": 32 if not args.smoke else 8, "seed": args.seed}
    pairs_dir = args.pairs_dir if not args.smoke else out / "pairs"
    print(f"[1/3] pairs: {args.prompts} prompts of the main job, gold-labelled (cache: {pairs_dir})")
    pairs_dir.mkdir(parents=True, exist_ok=True)
    train_pairs, _, _, _ = labelled_pairs(pairs_dir, base, tokenizer, train_prompts, prompts[:held_out],
                                          settings=settings, seed=args.seed, samples=settings["samples"],
                                          max_new_tokens=settings["max_new_tokens"], batch_size=32, judge=judge)
    (out / "pairs").mkdir(exist_ok=True)
    write_jsonl(out / "pairs" / "pairs_train.jsonl", train_pairs[:args.steps * args.batch_size])
    write_jsonl(out / "critique_prompts.jsonl", [{"prompt": [{"role": "user", "content": p}]}
                                                   for p in train_prompts[:args.critique_prompts]])

    configs = run_configs(out, args)
    rows: dict[str, dict] = {}
    print(f"[2/3] training {', '.join(RUNS)}: {args.steps} steps of {args.batch_size} each, LoRA r=16")
    for name, config in configs.items():
        done = out / name / "seconds.json"
        if not done.is_file() or args.overwrite:
            stage = time.perf_counter()
            pipeline.run(config, overwrite=True)
            done.write_text(json.dumps({"seconds": time.perf_counter() - stage}) + "\n")
        rows[name] = {"seconds": json.loads(done.read_text())["seconds"]}

    print(f"[3/3] evaluation on {len(eval_prompts)} held-out prompts x {args.eval_samples} sample(s)")
    for name, config in configs.items():
        rows[name].update(evaluate(out, name, export_of(config), base, tokenizer, eval_prompts, judge=judge,
                                   args=args))
    base_gold = rows["dpo"]["gold_reward"]["reference"]["mean"]
    critique_rows = [json.loads(line) for line in
                     (Path(configs["critique"].output_dir) / critique.ROWS_FILE).read_text().splitlines()]
    summary = {"settings": {key: value for key, value in vars(args).items() if not isinstance(value, Path)},
               "principles": list(PRINCIPLES), "contrastive": CONTRASTIVE, "base_gold": base_gold,
               "runs": {name: {key: value for key, value in row.items()} for name, row in rows.items()},
               "critique": json.loads((Path(configs["critique"].output_dir) / critique.SUMMARY_FILE).read_text()),
               "critique_rows_shown": critique_rows[:3], "total_s": time.perf_counter() - started}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    plot(rows, base_gold, out / "summary.png")
    if not args.smoke:
        RESULTS.mkdir(exist_ok=True)
        shutil.copy(out / "summary.json", RESULTS / "adlf_techniques.json")
        shutil.copy(out / "summary.png", RESULTS / "adlf_techniques.png")
    print()
    print(table(rows))
    print(f"\nbase mean gold score {base_gold:+.3f}; critique run: {json.dumps(summary['critique'], default=str)}")
    print("\nthree critique rows (all in "
          f"{Path(configs['critique'].output_dir) / critique.ROWS_FILE}):\n")
    print(critique.show_rows(critique_rows, 3))
    print(f"\ntotal {summary['total_s'] / 60:.1f} min; wrote {out / 'summary.json'} and {out / 'summary.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
