"""The end of ``jaxalign pipeline``: the final policy evaluated on held-out prompts against the SFT stage's model
and the base (gold judge, the last reward model, KL: :func:`jaxalign.eval.evaluate_policy`), written as
``summary.json``, ``summary.png`` and a table (printed, and kept in ``summary.txt``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxalign import models
from jaxalign.methods import common

SUMMARY_FILES = ("summary.json", "summary.png", "summary.txt")


def summarise(pipeline, results: dict[str, Any], label_counts: dict | None, timings: dict[str, float], *,
              log=print) -> dict[str, Any]:
    """Evaluate and write the summary (module docstring); returns what ``summary.json`` holds."""
    out = pipeline.output_dir
    summary: dict[str, Any] = {
        "pipeline": pipeline.source,
        "stages": {name: {key: record.get(key) for key in ("method", "output_dir", "export", "seconds", "eval")}
                   for name, record in results.items()},
        "labels": label_counts, "evaluation": {}, "timings_s": timings}
    evaluations = _evaluate(pipeline, log)
    table = [_stage_table(summary["stages"])]
    for against, evaluation in evaluations.items():
        summary["evaluation"][against] = evaluation.to_dict()
        table.append(f"final policy ({pipeline.final_policy().name}) against {against}:\n{evaluation.table()}")
    text = "\n\n".join(table)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    (out / "summary.txt").write_text(text + "\n")
    _plot(summary, evaluations, out / "summary.png")
    log("")
    log(text)
    log(f"\nwrote {out / 'summary.json'}, {out / 'summary.png'} and {out / 'summary.txt'}")
    return summary


def _evaluate(pipeline, log) -> dict[str, Any]:
    """``{"sft": PolicyEval, "base": PolicyEval}`` of the final policy (only ``base`` without an SFT stage, or when
    the SFT stage is the final policy; none without a policy stage)."""
    from jaxalign import data as jdata
    from jaxalign import eval as jeval
    from jaxalign.rollout import SamplingParams

    final = pipeline.final_policy()
    if final is None:
        return {}
    settings = pipeline.evaluation
    prompt_file = settings["prompts"] or pipeline.label_files.prompts_eval
    prompts = jdata.read_prompt_file(prompt_file, option="pipeline.evaluation.prompts")
    policy, tokenizer = models.load_pretrained(final.export, source=f"stage {final.name}'s export")
    references = {}
    sft = pipeline.sft_stage()
    if sft is not None and sft.name != final.name:
        references["sft"] = lambda: models.load_pretrained(sft.export, source=f"stage {sft.name}'s export")[0]
    references["base"] = lambda: common.load_pretrained(pipeline.base)[0]
    reward_judge = None
    scorer = pipeline.reward_stage()
    if scorer is not None and (scorer.export / "reward_model.json").is_file():
        reward_model, info = models.load_reward_model(scorer.export)
        reward_judge = jeval.RewardModelJudge(reward_model, tokenizer=tokenizer, gain=info["gain"], bias=info["bias"])
    params = SamplingParams(max_new_tokens=settings["max_new_tokens"], temperature=settings["temperature"])
    evaluations = {}
    for against, load in references.items():
        log(f"[evaluation] {final.name} against {against} on {len(prompts)} held-out prompts "
            f"({settings['samples_per_prompt']} sample(s) each)")
        evaluations[against] = jeval.evaluate_policy(
            policy, load(), tokenizer, prompts, judge=jeval.VaderJudge(), reward_judge=reward_judge, params=params,
            samples_per_prompt=settings["samples_per_prompt"], key=jax.random.key(settings["seed"]),
            batch_size=settings["batch_size"])
    return evaluations


def _stage_table(stages: dict[str, dict]) -> str:
    rows = [("stage", "method", "minutes", "held-out", "export")]
    for name, record in stages.items():
        held_out = ", ".join(f"{key} {value:.4g}" for key, value in sorted((record.get("eval") or {}).items())
                             if key in ("loss", "accuracy", "perplexity", "gold_reward/policy/mean", "win_rate/rate"))
        rows.append((name, record["method"], f"{(record.get('seconds') or 0.0) / 60:.1f}", held_out or "-",
                     record.get("export") or "-"))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _plot(summary: dict, evaluations: dict, path: Path) -> None:
    """Gold win rate of the final policy against each reference (with its interval) and the mean gold reward of
    every model; the stages' minutes when nothing was evaluated."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    rates, rewards, minutes = figure.subplots(1, 3)
    names = list(evaluations)
    if names:
        wins = [evaluations[n].win_rate for n in names]
        rates.bar([f"vs {n}" for n in names], [w.rate for w in wins], capsize=8, width=0.5,
                  yerr=np.asarray([[w.rate - w.low for w in wins], [w.high - w.rate for w in wins]]))
        rates.axhline(0.5, color="grey", ls="--", lw=1)
        rates.set(ylim=(0, 1), title=f"final policy's gold win rate ({evaluations[names[0]].judge})")
        means = {"final policy": float(np.mean(evaluations[names[0]].gold_policy))}
        means.update({n: float(np.mean(evaluations[n].gold_reference)) for n in names})
        rewards.bar(list(means), list(means.values()), width=0.5, color="tab:green")
        rewards.set(title="mean gold reward, held-out prompts")
    stages = summary["stages"]
    minutes.bar(list(stages), [(r.get("seconds") or 0.0) / 60 for r in stages.values()], width=0.5, color="tab:gray")
    minutes.set(title="stage time (minutes)")
    figure.savefig(path, dpi=110)
