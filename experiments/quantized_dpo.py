"""The main job's DPO stage with LoRA adapters on a float32 base and on an NF4 base (QLoRA), same pairs, same
held-out prompts: does the 4-bit base keep the gold win rate, and what does it save in memory?

    python -m experiments.quantized_dpo [--pairs-from runs/sentiment] [--output-dir runs/quantized_dpo]
                                        [dpo.<key>=<value> ...]
    python -m experiments.quantized_dpo --smoke     # every stage tiny, a few minutes

Stages:

1. pairs: the main job's gold-labelled train pairs and held-out prompts (``python -m experiments.sentiment``),
   read from ``--pairs-from`` when that directory holds them (the sampling settings come from its
   ``pairs.json``); otherwise sampled into ``--output-dir`` by the main job's own pair stage
   (:func:`experiments.sentiment.labelled_pairs`).
2. two DPO runs, each ``jaxalign train dpo --config sentiment`` (the main job's DPO stage) in a child process of
   its own, one after the other, LoRA r = 16, alpha = 32 on the seven projections at the LoRA learning rate
   ``3e-4`` (ten times the main job's full fine-tuning rate ``3e-5``):
   ``float32`` (the base as the main job holds it) and ``nf4`` (the same with ``model.quantize={type: nf4,
   block_size: 64, double_quant: true}``: the frozen projections in 4-bit NormalFloat, dequantised inside each
   product, the adapters and the compute in float32). Each run's peak resident memory is the child's own
   (``wait4``'s ``ru_maxrss``: loading, the precomputed reference, training and the export); its train time is
   the sum of its steps' times (``metrics.jsonl``), beside the child's wall time. Beside them, the base's weights
   as each run holds them (the NF4 run keeps the embeddings, norms and head in float32, as QLoRA does).
3. evaluation of each policy (its Hugging Face export: the nf4 run's is the dequantised base with the adapters
   merged, the function it trained) against the base on the held-out prompts, as the main job evaluates: gold
   (VADER) win rate with its 95 % interval clustered by prompt, mean gold score, KL to the base, response length;
   the same sampling key for both, so both meet the same base samples. The NF4 base alone (no adapters, no
   training) is evaluated the same way: the KL is to the float32 base, and its row is the quantisation's own share
   of the nf4 run's (whose DPO reference was the NF4 base).

Writes ``<output-dir>/summary.json`` and ``summary.png`` (win rates with intervals, peak memory and train time);
a full run also writes them to ``--results-dir`` as ``quantized_dpo.json`` and ``quantized_dpo.png``. Each
finished run and evaluation is kept (``<run>/result.json``, ``evaluation/<run>.json``), so a rerun picks up where
an interrupted one stopped; ``--overwrite`` starts again.
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

if __name__ == "__main__":  # before JAX loads (jaxalign.hostmem re-executes once)
    use_transparent_huge_pages()
    provide_collective_threads()


from benchmarks.provenance import describe
from experiments.compare_methods import LORA_TARGETS, evaluate, run_measured
from experiments.sentiment import SMOKE_OVERRIDES, SMOKE_SETTINGS, labelled_pairs, make_prompts, split_overrides

RUNS = ("float32", "nf4")
PRESET = "sentiment"  # the main job's DPO stage
LORA = f"model.lora={{rank: 16, alpha: 32, targets: [{', '.join(LORA_TARGETS)}]}}"
# Ten times the main job's full fine-tuning rate (3e-5), the usual LoRA ratio: at the compare_methods preset's
# 1e-4, 21 of the 32 steps left the DPO reward margin at 0.005 (full fine-tuning reaches 0.27 in 32).
LORA_LEARNING_RATE = "train.optimizer.learning_rate=3.0e-4"
# The quantised base alone (no adapters, no training), evaluated like the policies.
QUANTIZED_BASE, QUANTIZED_BASE_ROW = "nf4_base", "nf4 base, no DPO"
RESULT_FILE = "result.json"
EVAL_BATCH = 32  # the main job's sampling batch


def nf4(block_size: int) -> str:
    return f"model.quantize={{type: nf4, block_size: {block_size}, double_quant: true}}"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main_job_data(directory: Path | None) -> dict | None:
    """The train pairs, held-out prompts and sampling settings a main-job run left in ``directory``; None when
    it holds none of them."""
    if directory is None:
        return None
    names = ("pairs.json", "pairs_train.jsonl", "prompts_eval.jsonl")
    if not all((directory / name).is_file() for name in names):
        return None
    prompts = []
    for number, record in enumerate(read_jsonl(directory / "prompts_eval.jsonl"), 1):
        if not isinstance(record.get("prompt"), str):
            raise ValueError(f"{directory / 'prompts_eval.jsonl'}: record {number}: field 'prompt' must be a string")
        prompts.append(record["prompt"])
    return {"pairs": directory / "pairs_train.jsonl", "train_pairs": len(read_jsonl(directory / "pairs_train.jsonl")),
            "eval_prompts": prompts, "settings": json.loads((directory / "pairs.json").read_text())["settings"],
            "source": str(directory)}


def sampled_data(out: Path, args, judge) -> dict:
    """The main job's prompts and pair stage, run here (same split, same settings as ``experiments.sentiment``)."""
    from jaxalign import models

    prompts = make_prompts(args.prompts, args.seed)
    held_out = max(1, args.prompts // 5)
    train_prompts, eval_prompts = prompts[held_out:], prompts[:held_out]
    base, tokenizer = models.load_pretrained(args.model, source="--model")
    settings = {"prompts": args.prompts, "samples": args.samples, "max_new_tokens": args.max_new_tokens,
                "seed": args.seed}
    train_pairs, _, left_out, _ = labelled_pairs(
        out, base, tokenizer, train_prompts, eval_prompts, settings=settings, seed=args.seed, samples=args.samples,
        max_new_tokens=args.max_new_tokens, batch_size=EVAL_BATCH, judge=judge)
    print(f"      {len(train_pairs)} train pairs (left out: {left_out})")
    return {"pairs": out / "pairs_train.jsonl", "train_pairs": len(train_pairs), "eval_prompts": eval_prompts,
            "settings": settings, "source": str(out)}


def train_time(directory: Path) -> float:
    """Seconds the run's steps took (``step_time`` summed over ``metrics.jsonl``; the first step compiles)."""
    return float(sum(record.get("step_time", 0.0) for record in read_jsonl(directory / "metrics.jsonl")))


def train_run(name: str, out: Path, overrides: list[str]) -> dict:
    """``jaxalign train dpo --config sentiment`` into ``out/<name>`` in a child process, measured; a finished
    run's measurements are read back from its ``result.json``."""
    directory = out / name
    result_file = directory / RESULT_FILE
    if result_file.is_file():
        print(f"      done earlier: {result_file}")
        return json.loads(result_file.read_text())
    if directory.exists():  # an interrupted run: its peak memory and time would be a part's, so it starts again
        shutil.rmtree(directory)
    command = [sys.executable, "-m", "jaxalign.cli", "train", "dpo", "--config", PRESET,
               f"output_dir={directory}", *overrides]
    directory.mkdir(parents=True)
    measured = run_measured(command, log=directory / "train.log")
    result = {"wall_seconds": measured["seconds"], "peak_rss_mib": measured["peak_rss_mib"],
              "train_seconds": round(train_time(directory), 1), "export": str(directory / "export"),
              "command": command[1:]}
    result_file.write_text(json.dumps(result, indent=1) + "\n")
    return result


def weights_mib(model_path: Path | None, block_size: int) -> dict[str, float]:
    """The base's weights in memory (MiB), as each run holds them: float32, and with the projections in NF4."""
    import jax
    from flax import nnx

    from jaxalign import models

    model, _ = models.load_pretrained(None if model_path is None else str(model_path), source="--model")
    size = lambda: sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree.leaves(nnx.state(model))) / 2**20  # noqa: E731
    float32 = size()
    models.quantize_model(model, models.QuantizeConfig(type="nf4", block_size=block_size, double_quant=True))
    return {"float32": round(float32, 3), "nf4": round(size(), 3)}


def quantized_base(out: Path, model_path: Path | None, block_size: int) -> str:
    """The NF4 base without adapters, dequantised, as a Hugging Face directory (``out/nf4_base/export``): its
    evaluation against the float32 base is what the quantisation alone does (the nf4 run's reference)."""
    from jaxalign import models

    directory = out / QUANTIZED_BASE / "export"
    if not (directory / "config.json").is_file():
        model, tokenizer = models.load_pretrained(None if model_path is None else str(model_path), source="--model")
        models.quantize_model(model, models.QuantizeConfig(type="nf4", block_size=block_size, double_quant=True))
        partial = directory.with_name("export.partial")
        shutil.rmtree(partial, ignore_errors=True)
        models.save_hf(models.merge_for_export(model), model.config, partial, tokenizer)
        partial.rename(directory)
    return str(directory)


def inside(value: float, interval: dict) -> bool:
    return interval["low"] <= value <= interval["high"]


def table(rows: dict[str, dict]) -> str:
    header = ("run", "gold win rate vs base [95% CI]", "gold score", "KL (nats)", "length", "peak RSS",
              "base weights", "train time", "wall time")
    lines = [header]
    for name, row in rows.items():
        win = row["win_rate"]
        lines.append((name, f"{win['rate']:.1%} [{win['low']:.1%}, {win['high']:.1%}]",
                      f"{row['gold_reward']['policy']['mean']:+.3f}", f"{row['kl']['mean']:.2f}",
                      f"{row['response_length']['policy']['mean']:.1f}",
                      f"{row['peak_rss_mib'] / 1024:.2f} GiB" if "peak_rss_mib" in row else "-",
                      f"{row['base_weights_mib']:.0f} MiB" if "base_weights_mib" in row else "-",
                      f"{row['train_seconds'] / 60:.1f} min" if "train_seconds" in row else "-",
                      f"{row['wall_seconds'] / 60:.1f} min" if "wall_seconds" in row else "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def plot(rows: dict[str, dict], base_gold: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, trained = list(rows), [name for name in rows if "peak_rss_mib" in rows[name]]
    colors = ["#4c72b0", "#dd8452", "#8c8c8c"][:len(names)]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    rates = [rows[n]["win_rate"]["rate"] for n in names]
    errors = [[rows[n]["win_rate"]["rate"] - rows[n]["win_rate"]["low"] for n in names],
              [rows[n]["win_rate"]["high"] - rows[n]["win_rate"]["rate"] for n in names]]
    left.bar(names, rates, yerr=errors, capsize=8, color=colors)
    reference = rows[names[0]]["win_rate"]
    left.axhspan(reference["low"], reference["high"], color=colors[0], alpha=0.12,
                 label=f"{names[0]} 95% interval")
    left.axhline(0.5, color="grey", ls="--", lw=1, label="no change")
    left.set_ylim(0, 1)
    left.set_ylabel("gold win rate vs base")
    left.set_title(f"LoRA DPO, gold (VADER) win rate (base gold {base_gold:+.2f})")
    left.legend(fontsize=8, loc="lower right")
    left.tick_params(axis="x", labelsize=8)
    peaks = [rows[n]["peak_rss_mib"] / 1024 for n in trained]
    right.bar(trained, peaks, color=colors[:len(trained)])
    for i, name in enumerate(trained):
        right.text(i, peaks[i], f"{peaks[i]:.2f} GiB (base weights {rows[name]['base_weights_mib']:.0f} MiB)\n"
                                f"train {rows[name]['train_seconds'] / 60:.1f} min",
                   ha="center", va="bottom", fontsize=8)
    right.set_ylim(0, max(peaks) * 1.25)
    right.set_ylabel("peak resident memory (GiB)")
    right.set_title("one training run's process (CPU)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="default runs/quantized_dpo (runs/quantized_dpo_smoke with --smoke)")
    parser.add_argument("--pairs-from", type=Path, default=None,
                        help="a main-job output directory whose pairs and held-out prompts to use (default "
                             "runs/sentiment; not with --smoke); sampled here when it holds none")
    parser.add_argument("--model", default=None,
                        help="the base model (a Hugging Face directory or .gguf file; default: the embedded SmolLM2)")
    parser.add_argument("--prompts", type=int, default=320, help="prompts when sampling pairs here (the main job's)")
    parser.add_argument("--samples", type=int, default=4, help="base samples per prompt when sampling pairs here")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="when sampling here; pairs read from --pairs-from bring their own")
    parser.add_argument("--eval-samples", type=int, default=2, help="samples per held-out prompt and policy")
    parser.add_argument("--block-size", type=int, default=64, help="NF4 block size (inputs per block)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", type=Path, default=Path("experiments/results"),
                        help="where a full run also writes quantized_dpo.json and .png")
    parser.add_argument("--smoke", action="store_true",
                        help=f"every stage tiny ({SMOKE_SETTINGS}, {SMOKE_OVERRIDES['dpo']})")
    parser.add_argument("--overwrite", action="store_true", help="start again: delete the output directory first")
    parser.add_argument("overrides", nargs="*", help="dpo.<key>=<value>, to both runs")
    args = parser.parse_intermixed_args(argv)
    try:
        overrides = split_overrides(args.overrides, stages=("dpo",))["dpo"]
    except ValueError as error:
        parser.error(str(error))
    if args.smoke:
        for name, value in SMOKE_SETTINGS.items():
            if hasattr(args, name):
                setattr(args, name, value)
        overrides = SMOKE_OVERRIDES["dpo"] + overrides
    elif args.pairs_from is None:
        args.pairs_from = Path("runs/sentiment")
    out = args.output_dir or Path("runs/quantized_dpo_smoke" if args.smoke else "runs/quantized_dpo")
    model_path = None if args.model is None else Path(args.model).resolve()
    if model_path is not None and not model_path.exists():
        parser.error(f"--model {args.model}: no such file or directory")
    if args.overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    from jaxalign import eval as jeval
    from jaxalign import models

    judge = jeval.VaderJudge()
    print("[1/3] pairs: the main job's gold-labelled train pairs and held-out prompts")
    try:
        data = main_job_data(args.pairs_from)
    except (ValueError, KeyError) as error:
        parser.error(f"--pairs-from {args.pairs_from}: {error}")
    if data is None:
        if args.pairs_from is not None:
            print(f"      {args.pairs_from} holds no main-job pairs: sampling them here (the main job's pair stage)")
        data = sampled_data(out, args, judge)
    else:
        print(f"      from {data['source']}: {data['train_pairs']} train pairs, {len(data['eval_prompts'])} "
              f"held-out prompts (sampled with {data['settings']})")
    max_new_tokens, seed = data["settings"]["max_new_tokens"], data["settings"]["seed"]

    common = [f"data.source={Path(data['pairs']).resolve()}", LORA, LORA_LEARNING_RATE, *overrides]
    if model_path is not None:
        common.append(f"model.path={model_path}")
    settings = {"float32": common, "nf4": [*common, nf4(args.block_size)]}
    runs = {}
    for number, name in enumerate(RUNS, 1):
        print(f"[2/3] DPO run {number}/{len(RUNS)}: LoRA r16/alpha32 on the {name} base (a child process)")
        runs[name] = train_run(name, out, settings[name])
        print(f"      peak RSS {runs[name]['peak_rss_mib'] / 1024:.2f} GiB, train {runs[name]['train_seconds']:.0f} s "
              f"(wall {runs[name]['wall_seconds']:.0f} s)")

    print(f"[3/3] evaluation on {len(data['eval_prompts'])} held-out prompts, {args.eval_samples} samples each, "
          "against the base (both policies, and the nf4 base alone: the quantisation's own share of the KL)")
    base, tokenizer = models.load_pretrained(None if model_path is None else str(model_path), source="--model")
    rows = {}
    for name in RUNS:
        evaluation = evaluate(out, name, runs[name]["export"], base, tokenizer, data["eval_prompts"], judge=judge,
                              samples=args.eval_samples, max_new_tokens=max_new_tokens, seed=seed)
        rows[name] = {k: v for k, v in evaluation.items() if k != "records"} | runs[name]
    evaluation = evaluate(out, QUANTIZED_BASE, quantized_base(out, model_path, args.block_size), base, tokenizer,
                          data["eval_prompts"], judge=judge, samples=args.eval_samples, max_new_tokens=max_new_tokens,
                          seed=seed)
    rows[QUANTIZED_BASE_ROW] = {k: v for k, v in evaluation.items() if k != "records"}
    del base
    for name, mib in weights_mib(model_path, args.block_size).items():
        rows[name]["base_weights_mib"] = mib
    reference = rows["float32"]["win_rate"]
    verdict = {"nf4_rate": rows["nf4"]["win_rate"]["rate"], "float32_interval": [reference["low"], reference["high"]],
               "inside": inside(rows["nf4"]["win_rate"]["rate"], reference),
               "peak_rss_ratio": rows["nf4"]["peak_rss_mib"] / rows["float32"]["peak_rss_mib"],
               "quantization_kl": rows[QUANTIZED_BASE_ROW]["kl"]["mean"]}
    base_gold = rows["float32"]["gold_reward"]["reference"]["mean"]
    summary = {"provenance": describe(), "total_minutes": round((time.perf_counter() - started) / 60, 1),
               "settings": {"pairs_from": data["source"], "pair_settings": data["settings"],
                            "train_pairs": data["train_pairs"], "eval_prompts": len(data["eval_prompts"]),
                            "eval_samples": args.eval_samples, "max_new_tokens": max_new_tokens, "seed": seed,
                            "preset": PRESET, "overrides": settings, "smoke": args.smoke},
               "base_gold_reward": base_gold, "verdict": verdict, "runs": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    plot(rows, base_gold, out / "summary.png")
    written = [out / "summary.json", out / "summary.png"]
    if not args.smoke:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "summary.json", args.results_dir / "quantized_dpo.json")
        shutil.copyfile(out / "summary.png", args.results_dir / "quantized_dpo.png")
        written += [args.results_dir / "quantized_dpo.json", args.results_dir / "quantized_dpo.png"]
    print()
    print(table(rows))
    print(f"\nnf4 win rate {verdict['nf4_rate']:.1%} is {'inside' if verdict['inside'] else 'OUTSIDE'} the float32 "
          f"run's 95% interval [{reference['low']:.1%}, {reference['high']:.1%}]; nf4 peak memory "
          f"{verdict['peak_rss_ratio']:.2f}x the float32 run's")
    print(f"KL is to the float32 base: the nf4 base alone is {verdict['quantization_kl']:.2f} nats from it "
          "(the nf4 run's DPO reference was the nf4 base)")
    print(f"wrote {', '.join(map(str, written))}")
    if args.smoke:
        print("smoke run: every stage ran (the comparison needs the full run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
