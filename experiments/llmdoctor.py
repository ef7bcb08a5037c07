"""LLMDoctor side by side: TFPO doctors guide the frozen embedded patient, against DPO, GenARM and ARGS, offline.

    python -m experiments.llmdoctor [--output-dir runs/llmdoctor] [--main-run runs/sentiment] [overrides]
    python -m experiments.llmdoctor --smoke     # every stage on a handful of prompts (CI)

The patient is the embedded SmolLM2-135M-Instruct, frozen. Two preference dimensions, each judged by a fixed
rule nobody here trained: **sentiment** (VADER's compound score, the main job's gold judge) and **conciseness**
(``eval.ConcisenessJudge``: ``1 / (1 + words / 10)``). They pull against each other: VADER's score grows with every
positive word, so the warmest answers run longer (the pairs stage measures how often the more positive response
of a pair is also the longer one, and the rank correlation of the two scores over the patient's samples).

Stages, each cached in the run directory (a rerun reads what a finished stage wrote; delete a stage's directory
to redo it) and each with a progress bar:

1. ``main``: the main job's artefacts (``experiments.sentiment``): held-out prompts, the patient's sampled pairs
   labelled by VADER, its Bradley-Terry reward model (for ARGS) and its DPO policy. ``--main-run`` reuses a finished
   main job (``make demo`` leaves one in runs/sentiment); a missing one is run first.
2. ``pairs``: the same response pairs labelled per dimension: by VADER (the main job's labels) and by the length
   rule (the shorter response is chosen; pairs of equal length are left out).
3. ``distill``: the weak-to-strong doctor's start: the patient's first ``--weak-layers`` layers with its embeddings,
   final norm and LM head (``models.first_layers``; 4 of 30 layers is about a third of the patient's compute per
   token, the LM head included), distilled from the patient token by token on the patient's own sampled responses
   (``jaxalign train distill``, preset ``llmdoctor``: the forward KL to the patient's whole next-token
   distribution at every response token). Held-out token NLL on the patient's samples before and after, and the
   held-out KL to the patient after, are reported.
4. ``doctors``: TFPO (``jaxalign train tfpo``, preset ``llmdoctor``): a same-size doctor per dimension (started from
   the patient) and a weak doctor for sentiment (started from stage 3).
5. ``genarm``: GenARM's autoregressive reward model on the sentiment pairs (``loss_type: genarm``, no reference),
   started from the patient.
6. ``evaluation``: every method on the held-out prompts, the same sampling keys for all: the unguided patient
   (top-p 0.9 and greedy), DPO, GenARM (``log π_patient + 1·log π_r``, GenARM's α = 1), ARGS (greedy over the
   patient's top 10 tokens rescored by ``logit + 1.5·r``, the main job's reward model), the same-size and the weak
   doctor (``α = 1, β = 1``, weight 1 on sentiment: the doctors learn ``π₀·exp(Σ r)`` with their start as prior
   ``π₀``, preset ``loss.prior: start``, and β = 1 applies that tilt once, GenARM's strength; LLMDoctor's
   default β = 0.5 halves it), the patient guided by itself at the same β (sharpening alone, the control that
   tells what a doctor learned from what ``π_patient^(1+β)`` gives), and a Pareto sweep of the two
   same-size doctors with the weights moving from sentiment to conciseness in ``--pareto-steps`` steps. Sampled
   methods use top-p 0.9 at temperature 1. Per method: gold win rate on sentiment against the unguided patient
   (paired by prompt and sample, ties count half, 95 % Wilson interval), mean gold score per dimension (95 %
   intervals), KL to the patient (``Σ_t log π_method(y_t) − log π_patient(y_t)`` over the method's own samples;
   for greedy decoding, ``−log π_patient(y)``), response length and generated tokens per second (after a
   compiling warm-up call; the machine's load average is recorded beside it, since a shared machine's speed is
   not the method's). Then an LLM judge compares each method's first sample per prompt with the patient's
   (both orders asked): by default the embedded model served by ``jaxalign serve``, started and stopped by the
   experiment (``--judge-url`` for another endpoint), with Cohen's kappa between its verdicts and VADER's on
   the same pairs, so a reader sees how far to trust it.
7. ``report``: ``summary.json``, ``summary.png`` (win rates with intervals, and the Pareto plot) and
   ``samples.jsonl`` (every held-out prompt with every method's response and scores) in the run directory, copies
   in experiments/results/, a table and a few responses side by side.

Targets: the same-size doctor's sentiment win rate >= 70 % with its interval above 50 %, at least
GenARM's; the weak doctor's >= 60 %, interval above 50 %; the Pareto sweep moves both gold scores monotonically.
``--smoke`` runs every stage on a few prompts with a few training steps: it proves the code path, not the targets.
Overrides go to a stage's run config: ``tfpo.train.total_steps=16``, ``genarm.loss.beta=0.2``,
``distill.train.optimizer.learning_rate=3e-4``.
"""

# ruff: noqa: E402  (JAX and jaxalign are imported after the huge-pages re-execution)
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

from jaxalign.cpu_devices import provide_collective_threads
from jaxalign.hostmem import use_transparent_huge_pages

if __name__ == "__main__":  # before JAX loads (jaxalign.hostmem re-executes once): the new process imports it once
    use_transparent_huge_pages()
    provide_collective_threads()

import jax
import numpy as np
from tqdm.auto import tqdm

from benchmarks.provenance import describe
from experiments import sentiment as main_job
from experiments.judged import judged_cell, judged_column, llm_judge
from jaxalign import data as jdata
from jaxalign import eval as jeval
from jaxalign import models
from jaxalign.methods import common, pipeline, recipe, tfpo
from jaxalign.rollout import ArgsSampler, GuidedSampler, Sampler, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
DIMENSIONS = ("sentiment", "conciseness")
STAGE_SECTIONS = {"tfpo": "tfpo", "genarm": "dpo", "distill": "distill"}
TOP_P = 0.9
DOCTOR_BETA = 1.0   # the doctors' tilt exp(sum r) over their prior, applied once (LLMDoctor's default is 0.5)
GENARM_WEIGHT = 1.0  # GenARM's alpha: log pi_base + alpha * log pi_r (its HH evaluation script)
ARGS_K, ARGS_WEIGHT = 10, 1.5  # ARGS's defaults (top-k candidates, reward weight)
DECODING = {"top_p": TOP_P, "doctor_beta": DOCTOR_BETA, "genarm_weight": GENARM_WEIGHT, "args_k": ARGS_K,
            "args_weight": ARGS_WEIGHT}
TARGETS = {"same_size": 0.70, "weak": 0.60}
SMOKE_SETTINGS = {"eval_prompts": 4, "max_new_tokens": 8, "batch_size": 4, "pareto_steps": 3}
SMOKE_OVERRIDES = {
    "tfpo": ["train.total_steps=2", "data.batch_size=2", "train.optimizer.warmup_steps=1"],
    "genarm": ["train.total_steps=2", "data.batch_size=2", "train.optimizer.warmup_steps=1"],
    "distill": ["train.total_steps=2", "data.batch_size=2", "train.optimizer.warmup_steps=1"],
}
SHOWN_PROMPTS = 3
# The methods the LLM judge compares with the patient (the Pareto sweep's points are left to the gold judges).
JUDGED = ("patient_greedy", "dpo", "genarm", "args", "patient_sharpened", "doctor_same_size", "doctor_weak")
SMOKE_JUDGED = ("doctor_same_size",)  # the judge's whole path (served, asked, stopped) at a smoke's cost


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, default=float) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------- stage 1


def main_job_run(main_run: Path, *, smoke: bool) -> dict:
    """The main job's artefacts, run first when ``main_run`` holds no finished main job."""
    if not (main_run / "summary.json").is_file():
        print(f"      no finished main job in {main_run}: running it (python -m experiments.sentiment)")
        code = main_job.main(["--output-dir", str(main_run), "--overwrite", *(["--smoke"] if smoke else [])])
        if code != 0:
            raise SystemExit(f"the main job failed with exit code {code}")
    else:
        print(f"      reusing the main job in {main_run}")
    paths = {"train_pairs": main_run / "pairs_train.jsonl", "eval_pairs": main_run / "pairs_eval.jsonl",
             "eval_prompts": main_run / "prompts_eval.jsonl", "reward": main_run / "reward" / common.EXPORT_DIR,
             "dpo": main_run / "dpo" / common.EXPORT_DIR}
    missing = [str(path) for path in paths.values() if not path.exists()]
    if missing:
        raise SystemExit(f"{main_run} is not a finished main job: missing {', '.join(missing)}")
    return paths


# ---------------------------------------------------------------------------------------------------- stage 2


def text_of(messages) -> str:
    return messages[0]["content"] if isinstance(messages, list) else messages


def relabel(records: list[dict], judge) -> tuple[list[dict], int]:
    """The pairs re-ordered by ``judge`` (its higher score chosen, ``margin`` the gap); ties are left out."""
    prompts = [text_of(r["prompt"]) for r in records]
    first = judge.score(prompts, [text_of(r["chosen"]) for r in records])
    second = judge.score(prompts, [text_of(r["rejected"]) for r in records])
    out, ties = [], 0
    for record, a, b in zip(records, first, second, strict=True):
        if a == b:
            ties += 1
            continue
        chosen, rejected = (record["chosen"], record["rejected"]) if a > b else (record["rejected"], record["chosen"])
        out.append({"prompt": record["prompt"], "chosen": chosen, "rejected": rejected, "margin": float(abs(a - b))})
    return out, ties


def conflict_stats(records: list[dict], sentiment, conciseness) -> dict:
    """How the two gold dimensions relate on the patient's samples (both responses of every pair)."""
    prompts = [text_of(r["prompt"]) for r in records for _ in range(2)]
    texts = [text_of(r[side]) for r in records for side in ("chosen", "rejected")]
    positive, concise = sentiment.score(prompts, texts), conciseness.score(prompts, texts)
    ranks = [np.argsort(np.argsort(values)) for values in (positive, concise)]
    longer = np.asarray([len(text_of(r["chosen"]).split()) > len(text_of(r["rejected"]).split()) for r in records])
    shorter = np.asarray([len(text_of(r["chosen"]).split()) < len(text_of(r["rejected"]).split()) for r in records])
    return {"spearman_sentiment_conciseness": float(np.corrcoef(*ranks)[0, 1]),
            "more_positive_is_longer": float(longer.mean()), "more_positive_is_shorter": float(shorter.mean()),
            "responses": len(texts)}


def dimension_pairs(out: Path, paths: dict) -> dict:
    """``out/pairs/<dimension>_<split>.jsonl`` for both dimensions; returns the counts and the conflict stats."""
    meta = out / "pairs.json"
    if meta.is_file():
        return json.loads(meta.read_text())
    out.mkdir(parents=True, exist_ok=True)
    judges = {"sentiment": jeval.VaderJudge(), "conciseness": jeval.ConcisenessJudge()}
    info = {"counts": {}, "ties": {}}
    for split in ("train", "eval"):
        records = read_jsonl(paths[f"{split}_pairs"])
        for dimension, judge in judges.items():
            labelled, ties = relabel(records, judge)
            main_job.write_jsonl(out / f"{dimension}_{split}.jsonl", labelled)
            info["counts"][f"{dimension}_{split}"], info["ties"][f"{dimension}_{split}"] = len(labelled), ties
    info["conflict"] = conflict_stats(read_jsonl(paths["train_pairs"]), judges["sentiment"], judges["conciseness"])
    write_json(meta, info)
    return info


# ---------------------------------------------------------------------------------------------------- stage 3


def sft_records(pairs: list[dict]) -> list[dict]:
    """Every sampled response of the pairs (both sides) as an SFT example: the patient's own outputs."""
    return [{"prompt": r["prompt"], "completion": r[side]} for r in pairs for side in ("chosen", "rejected")]


def held_out(path: Path) -> list[str]:
    """Overrides for held-out data read once in order, bucketed as the training data (few compiled shapes)."""
    return [f"eval_data.source={path}", "eval_data.shuffle=false", "eval_data.drop_last=false",
            "eval_data.max_length=160", "eval_data.buckets=[64, 96, 128, 160]"]


def held_out_nll(model, tokenizer, config: jdata.DataConfig) -> float:
    dataset = jdata.build_dataset(config, tokenizer)
    total, count = jeval.token_nll(model, common.one_pass(config, dataset))
    return total / max(count, 1)


def distilled_start(out: Path, paths: dict, *, layers: int, overrides: list[str]) -> tuple[Path, dict]:
    """The weak doctor's start (stage 3): ``first_layers(patient, layers)`` distilled from the patient token by
    token (``jaxalign train distill``: the forward KL to its next-token distribution) on the patient's samples."""
    export = out / "distill" / common.EXPORT_DIR
    report_file = out / "distill.json"
    if report_file.is_file() and export.is_dir():
        return export, json.loads(report_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    main_job.write_jsonl(out / "train.jsonl", sft_records(read_jsonl(paths["train_pairs"])))
    main_job.write_jsonl(out / "eval.jsonl", sft_records(read_jsonl(paths["eval_pairs"])))
    patient, tokenizer = models.load_pretrained(None)
    start = out / "start"
    student = models.first_layers(patient, layers)
    models.save_hf(student, student.config, start, tokenizer)
    config = recipe.load_run_config("llmdoctor", [
        f"output_dir={out / 'distill'}", f"model.path={start}", f"data.source={out / 'train.jsonl'}",
        *held_out(out / "eval.jsonl"), *overrides], method="distill")  # teacher: null, the embedded patient
    eval_config = config.eval_data
    report = {"layers": layers, "patient_layers": patient.config.n_layers,
              "nll_patient": held_out_nll(patient, tokenizer, eval_config),
              "nll_before": held_out_nll(student, tokenizer, eval_config)}
    del patient, student
    run = pipeline.run(config, overwrite=True)
    report["nll_after"] = held_out_nll(run.model, tokenizer, eval_config)
    report["kl_to_patient_after"] = run.eval_metrics.get("loss")  # held-out forward KL per response token
    write_json(report_file, report)
    return export, report


# ---------------------------------------------------------------------------------------------------- stages 4, 5


def trained(out: Path, config) -> Path:
    """The export of the run ``config`` describes: trained now, or read back when an earlier run finished it."""
    export = out / common.EXPORT_DIR
    if (out / "done.json").is_file() and export.is_dir():
        print(f"      reusing {export}")
        return export
    result = pipeline.run(config, overwrite=True)
    write_json(out / "done.json", {"eval_metrics": result.eval_metrics})
    return Path(result.export_dir)


def share_token_rewards(source: Path, target: Path) -> None:
    """Start ``target``'s token-reward cache from ``source``'s: the rewards depend on the patient, the faces, the
    pairs and the builder's settings, not on the doctor, so doctors of one dimension can share them. The builder
    checks the cache's key and rebuilds it if anything differs, so a copy can never be used wrongly."""
    cache, copy = source / tfpo.TOKEN_REWARDS_DIR, target / tfpo.TOKEN_REWARDS_DIR
    if source != target and cache.is_dir() and not copy.exists():
        target.mkdir(parents=True, exist_ok=True)
        shutil.copytree(cache, copy)


def doctor_config(out: Path, pairs: Path, dimension: str, *, start: Path | None, overrides: list[str]):
    return recipe.load_run_config("llmdoctor", [
        f"output_dir={out}", f"data.source={pairs / f'{dimension}_train.jsonl'}",
        *held_out(pairs / f"{dimension}_eval.jsonl"), f"doctor.dimensions=[{dimension}]",
        *([f"model.path={start}"] if start is not None else []), *overrides], method="tfpo")


# ---------------------------------------------------------------------------------------------------- stage 6


class Method:
    """One decoding method under evaluation: its sampler (made on the first batch from ``make_sampler``, dropped by
    :meth:`release`, so only one method's models are in memory at a time and a cached method loads none), and
    whether its base model is the patient."""

    def __init__(self, name: str, label: str, make_sampler, *, params: SamplingParams, base_is_patient: bool,
                 group: str = "baseline", weights: dict | None = None, models: tuple[Path, ...] = (),
                 options: dict | None = None):
        self.name, self.label, self.make_sampler, self.params = name, label, make_sampler, params
        self.base_is_patient, self.group, self.weights = base_is_patient, group, weights
        self.models = models  # the trained models it decodes with (the patient aside): part of its cache key
        self.options = options or {}
        self.sampler = None

    def generate(self, prompts, key, params):
        if self.sampler is None:
            self.sampler = self.make_sampler()
        return self.sampler.generate(prompts, key=key, params=params, **self.options)

    def release(self) -> None:
        self.sampler = None
        gc.collect()  # modules hold reference cycles: free their weights now, not at some later collection


def fingerprint(directories: tuple[Path, ...]) -> dict:
    """Name, size and modification time of every file of each model directory: a retrained doctor (or DPO policy,
    reward model, GenARM) no longer matches the evaluation cached for the old one."""
    return {str(directory): sorted([str(path.relative_to(directory)), path.stat().st_size, path.stat().st_mtime_ns]
                                   for path in Path(directory).rglob("*") if path.is_file())
            for directory in directories}


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    return main_job.encode_chat(tokenizer, prompts)


def run_method(method: Method, patient, tokenizer, encoded: list[list[int]], prompts: list[str], *, batch_size: int,
               samples: int, key, judges: dict) -> dict:
    """Every held-out prompt through ``method``: texts, gold scores, KL to the patient, lengths and speed."""
    params = method.params
    columns = {name: [] for name in ("sentiment", "conciseness", "kl", "length", "stopped")}
    texts, timed_tokens, timed_seconds = [], 0, 0.0
    batches = list(range(0, len(encoded), batch_size))
    with tqdm(total=len(encoded), unit="prompt", desc=method.label, dynamic_ncols=True) as bar:
        for index, start in enumerate([batches[0], *batches]):  # the first batch twice: a compiling warm-up
            chunk = encoded[start:start + batch_size]
            padded = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one compiled shape
            began = time.perf_counter()
            rollout = method.generate(padded, jax.random.fold_in(key, start), params)
            jax.block_until_ready(rollout.tokens)
            elapsed = time.perf_counter() - began
            if index == 0:
                continue
            rollout = rollout.take_rows(len(chunk) * samples)
            timed_tokens += int(np.asarray(rollout.lengths).sum())
            timed_seconds += elapsed
            patient_logps = (rollout.model_logps if method.base_is_patient
                             else jeval.reference_logps(patient, rollout, batch_size=batch_size * samples))
            mask = np.asarray(rollout.response_mask)
            kl = np.sum((np.asarray(rollout.sampling_logps) - np.asarray(patient_logps)) * mask, axis=1)
            tokens = np.asarray(rollout.tokens)
            decoded = [tokenizer.decode(tokens[r][mask[r]], skip_special_tokens=True).strip()
                       for r in range(tokens.shape[0])]
            row_prompts = [prompts[start + r // samples] for r in range(len(decoded))]
            for name, judge in judges.items():
                columns[name].append(judge.score(row_prompts, decoded))
            columns["kl"].append(kl)
            columns["length"].append(np.asarray(rollout.lengths))
            columns["stopped"].append(np.asarray(rollout.stopped))
            texts += decoded
            bar.update(len(chunk))
    values = {name: np.concatenate(parts).astype(np.float64) for name, parts in columns.items()}
    return {"texts": texts, **{name: value.tolist() for name, value in values.items()},
            "tokens_per_second": timed_tokens / timed_seconds if timed_seconds else None,
            "load_average": os.getloadavg()[0], "cpus": os.cpu_count()}


def summarise(name: str, method: Method, result: dict, baseline: dict, *, samples: int) -> dict:
    """One method's row of the report: every interval counts prompts, not samples, as the independent units (a
    prompt's samples are correlated; ``jeval.mean_ci`` / ``win_rate`` with ``clusters``)."""
    prompt_of_row = np.arange(len(result["sentiment"])) // samples

    def ci(values):
        return jeval.mean_ci(values, clusters=prompt_of_row)

    row = {"method": name, "label": method.label, "group": method.group, "weights": method.weights,
           "sentiment": ci(result["sentiment"]).to_dict(), "conciseness": ci(result["conciseness"]).to_dict(),
           "kl": ci(result["kl"]).to_dict(), "length": ci(result["length"]).to_dict(),
           "stopped": float(np.mean(result["stopped"])), "tokens_per_second": result["tokens_per_second"],
           "speed_quiet": quiet(result)}
    for dimension in DIMENSIONS:
        row[f"win_rate_{dimension}"] = jeval.win_rate(result[dimension], baseline[dimension],
                                                      clusters=prompt_of_row).to_dict()
    return row


def quiet(result: dict) -> bool | None:
    """Whether the method's speed was measured on a quiet machine (its 1-minute load average, read right after
    its decoding, below the CPU count); None for results cached before the load was recorded."""
    if result.get("load_average") is None:
        return None
    return result["load_average"] < (result.get("cpus") or 1)


def judge_methods(out: Path, evaluation: dict, spec, *, names: tuple[str, ...], samples: int, judge_samples: int
                  ) -> dict:
    """The LLM judge's column for ``names``: each method's first ``judge_samples`` samples per prompt against the
    patient's same samples, with kappa against VADER's verdicts (the judgments cached in ``out/judgments``)."""
    results, prompts = evaluation["results"], evaluation["prompts"]
    rows = [r for r in range(len(prompts) * samples) if r % samples < judge_samples]
    baseline = results["patient"]
    columns = {}
    for name in names:
        result = results[name]
        column = judged_column(spec, [prompts[r // samples] for r in rows], [result["texts"][r] for r in rows],
                               [baseline["texts"][r] for r in rows], [result["sentiment"][r] for r in rows],
                               [baseline["sentiment"][r] for r in rows], clusters=[r // samples for r in rows],
                               label=name)
        column.pop("judgments", None)
        columns[name] = column
    write_json(out / "judged.json", columns)
    return columns


def results_with_quiet_speeds(summary: dict, published: Path) -> dict:
    """``summary`` for experiments/results: a speed measured on a loaded machine (or where the load is unknown) is
    not published as the method's speed; the published file's figure for that method is kept
    (``tokens_per_second_this_run`` holds this run's) unless that one was measured under load too."""
    try:
        before = {row["method"]: row for row in json.loads(published.read_text())["methods"]}
    except (OSError, ValueError, KeyError):
        before = {}
    rows = []
    for row in summary["methods"]:
        old = before.get(row["method"])
        if row.get("speed_quiet") is not True and old is not None and old.get("speed_quiet") is not False \
                and old.get("tokens_per_second") is not None:
            row = {**row, "tokens_per_second_this_run": row["tokens_per_second"],
                   "tokens_per_second": old["tokens_per_second"], "speed_quiet": old.get("speed_quiet"),
                   "speed_from": old.get("speed_from", "the previously published run")}
        rows.append(row)
    return {**summary, "methods": rows}


def pareto_weights(steps: int) -> list[dict[str, float]]:
    return [{"sentiment": float(1 - t), "conciseness": float(t)} for t in np.linspace(0.0, 1.0, steps)]


def build_methods(paths: dict, doctors: dict, genarm: Path, *, max_new_tokens: int, samples: int,
                  pareto_steps: int):
    """The patient, its tokenizer and every method of the evaluation (stage 6)."""
    patient, tokenizer = models.load_pretrained(None)
    stop = common.stop_ids(patient, tokenizer)
    pad = tokenizer.pad_token_id
    sampled = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, top_p=TOP_P, n=samples,
                             stop_token_ids=stop)
    greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, n=1, stop_token_ids=stop)

    def plain(load_model):
        return lambda: Sampler(load_model(), pad_token_id=pad)

    def guided(guides: dict[str, Path], *, alpha=1.0, beta=DOCTOR_BETA):
        return lambda: GuidedSampler(
            patient, {dimension: models.load_pretrained(path)[0] for dimension, path in guides.items()},
            alpha=alpha, beta=beta, pad_token_id=pad)

    def args_sampler():
        reward_model, reward_info = models.load_reward_model(paths["reward"])
        return ArgsSampler(patient, reward_model, k=ARGS_K, weight=ARGS_WEIGHT, reward_gain=reward_info["gain"],
                           pad_token_id=pad)
    methods = {
        "patient": Method("patient", "patient (top-p 0.9)", plain(lambda: patient), params=sampled,
                          base_is_patient=True),
        "patient_greedy": Method("patient_greedy", "patient (greedy)", plain(lambda: patient), params=greedy,
                                 base_is_patient=True),
        "dpo": Method("dpo", "DPO policy", plain(lambda: models.load_pretrained(paths["dpo"])[0]), params=sampled,
                      base_is_patient=False, models=(paths["dpo"],)),
        "genarm": Method("genarm", "GenARM", guided({"sentiment": genarm}, beta=GENARM_WEIGHT), params=sampled,
                         base_is_patient=True, models=(genarm,)),
        "args": Method("args", "ARGS (greedy)", args_sampler, params=greedy, base_is_patient=True,
                       models=(paths["reward"],)),
        "patient_sharpened": Method(
            "patient_sharpened", f"patient x patient^{DOCTOR_BETA:g} (control)",
            lambda: GuidedSampler(patient, {"sentiment": patient}, alpha=1.0, beta=DOCTOR_BETA, pad_token_id=pad),
            params=sampled, base_is_patient=True),
        "doctor_same_size": Method("doctor_same_size", "doctor, same size", guided(
            {"sentiment": doctors["same_size/sentiment"]}), params=sampled, base_is_patient=True, group="doctor",
            models=(doctors["same_size/sentiment"],)),
        "doctor_weak": Method("doctor_weak", "doctor, weak-to-strong", guided(
            {"sentiment": doctors["weak/sentiment"]}), params=sampled, base_is_patient=True, group="doctor",
            models=(doctors["weak/sentiment"],)),
    }
    both = {dimension: doctors[f"same_size/{dimension}"] for dimension in DIMENSIONS}
    for i, weights in enumerate(pareto_weights(pareto_steps)):
        label = f"doctors w=({weights['sentiment']:.2f}, {weights['conciseness']:.2f})"
        methods[f"pareto_{i}"] = Method(f"pareto_{i}", label, guided(both), params=sampled, base_is_patient=True,
                                        group="pareto", weights=weights, models=tuple(both.values()),
                                        options={"preference_weights": weights})
    return patient, tokenizer, methods


def evaluate(out: Path, paths: dict, doctors: dict, genarm: Path, *, settings: dict) -> tuple[dict, dict]:
    """Stage 6: every method's results (``out/<method>.json``, reused when the settings match)."""
    out.mkdir(parents=True, exist_ok=True)
    prompts = [r["prompt"] for r in read_jsonl(paths["eval_prompts"])][:settings["eval_prompts"]]
    patient, tokenizer, methods = build_methods(paths, doctors, genarm, max_new_tokens=settings["max_new_tokens"],
                                                samples=settings["eval_samples"],
                                                pareto_steps=settings["pareto_steps"])
    encoded = encode_prompts(tokenizer, prompts)
    judges = {"sentiment": jeval.VaderJudge(), "conciseness": jeval.ConcisenessJudge()}
    key = jax.random.key(settings["seed"] + 7)
    results = {}
    for name, method in methods.items():
        cached = out / f"{name}.json"
        cache_key = {**settings, "decoding": DECODING, "models": fingerprint(method.models)}
        if cached.is_file() and json.loads(cached.read_text())["settings"] == cache_key:
            results[name] = json.loads(cached.read_text())["result"]
            continue
        samples = settings["eval_samples"] if method.params.temperature > 0 else 1
        result = run_method(method, patient, tokenizer, encoded, prompts, batch_size=settings["batch_size"],
                            samples=samples, key=key, judges=judges)
        method.release()  # its models and compiled decoders go before the next method's load
        if samples != settings["eval_samples"]:  # a deterministic method: its one answer stands for every sample
            result = {name: (np.repeat(np.asarray(value), settings["eval_samples"]).tolist()
                             if isinstance(value, list) and name != "texts" else value)
                      for name, value in result.items()}
            result["texts"] = [t for t in result["texts"] for _ in range(settings["eval_samples"])]
        write_json(cached, {"settings": cache_key, "result": result})
        results[name] = result
    return methods, {"prompts": prompts, "results": results}


# ---------------------------------------------------------------------------------------------------- stage 7


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in summary["methods"] if row["group"] != "pareto" and row["method"] != "patient"]
    pareto = [row for row in summary["methods"] if row["group"] == "pareto"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.4))
    rates = [row["win_rate_sentiment"] for row in rows]
    judged = [i for i, row in enumerate(rows) if (row.get("judged_sentiment") or {}).get("win_rate")]
    width = 0.4 if judged else 0.8
    xs = np.arange(len(rows))
    left.bar(xs - (width / 2 if judged else 0), [r["rate"] for r in rates], width,
             yerr=[[r["rate"] - r["low"] for r in rates], [r["high"] - r["rate"] for r in rates]], capsize=4,
             color=["#c44e52" if row["group"] == "doctor" else "#4c72b0" for row in rows], label="gold (VADER)")
    if judged:
        llm = [rows[i]["judged_sentiment"]["win_rate"] for i in judged]
        left.bar(xs[judged] + width / 2, [r["rate"] for r in llm], width, color="white", edgecolor="black",
                 hatch="//", capsize=4, label="LLM judge (first sample)",
                 yerr=[[r["rate"] - r["low"] for r in llm], [r["high"] - r["rate"] for r in llm]])
        for i in judged:
            kappa = rows[i]["judged_sentiment"]["agreement_with_gold"]["kappa"]
            left.text(xs[i] + width / 2, 0.02, "κ " + ("-" if kappa is None else f"{kappa:.2f}"), ha="center",
                      fontsize=6, rotation=90)
    left.set_xticks(xs, [row["label"] for row in rows])
    left.axhline(0.5, color="grey", ls="--", lw=1)
    left.axhline(TARGETS["same_size"], color="#c44e52", ls=":", lw=1, label="target, same-size doctor")
    left.axhline(TARGETS["weak"], color="#dd8452", ls=":", lw=1, label="target, weak doctor")
    left.set_ylim(0, 1)
    left.set_ylabel("win rate vs the patient")
    left.set_title("sentiment win rate against the unguided patient, per judge (95% CI)")
    left.tick_params(axis="x", rotation=30, labelsize=8)
    left.legend(fontsize=7)
    xs = [row["sentiment"]["mean"] for row in pareto]
    ys = [row["conciseness"]["mean"] for row in pareto]
    right.errorbar(xs, ys, xerr=[[row["sentiment"]["mean"] - row["sentiment"]["low"] for row in pareto],
                                 [row["sentiment"]["high"] - row["sentiment"]["mean"] for row in pareto]],
                   yerr=[[row["conciseness"]["mean"] - row["conciseness"]["low"] for row in pareto],
                         [row["conciseness"]["high"] - row["conciseness"]["mean"] for row in pareto]],
                   fmt="-o", color="#c44e52", capsize=3, label="two doctors, weights swept")
    for row in pareto:
        right.annotate(f"w_s={row['weights']['sentiment']:.2f}", (row["sentiment"]["mean"],
                                                                  row["conciseness"]["mean"]), fontsize=7,
                       xytext=(4, 4), textcoords="offset points")
    for row in rows + [r for r in summary["methods"] if r["method"] == "patient"]:
        right.plot(row["sentiment"]["mean"], row["conciseness"]["mean"], "s", ms=6, label=row["label"])
    right.set_xlabel("mean gold sentiment (VADER)")
    right.set_ylabel("mean gold conciseness (1 / (1 + words/10))")
    right.set_title("Pareto sweep: weight moved from sentiment to conciseness")
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def monotone(values: list[dict], *, increasing: bool) -> bool:
    """Moves the stated way across the sweep, monotone within the intervals: the last score is past the first
    one beyond both intervals (a flat or noise-sized sweep fails), and no step goes the wrong way by more than
    both intervals allow."""
    if len(values) < 2 or (values[-1]["low"] <= values[0]["high"] if increasing
                           else values[-1]["high"] >= values[0]["low"]):
        return False
    for a, b in zip(values, values[1:], strict=False):
        if increasing and b["high"] < a["low"]:
            return False
        if not increasing and b["low"] > a["high"]:
            return False
    return True


def targets(summary: dict) -> dict:
    rows = {row["method"]: row for row in summary["methods"]}
    pareto = [row for row in summary["methods"] if row["group"] == "pareto"]
    same, weak, genarm = (rows[name]["win_rate_sentiment"] for name in ("doctor_same_size", "doctor_weak", "genarm"))
    return {
        "same_size_win_rate": {"value": same["rate"], "low": same["low"], "target": TARGETS["same_size"],
                               "met": same["rate"] >= TARGETS["same_size"] and same["low"] > 0.5},
        "same_size_at_least_genarm": {"value": same["rate"], "genarm": genarm["rate"],
                                      "met": same["rate"] >= genarm["rate"]},
        "weak_win_rate": {"value": weak["rate"], "low": weak["low"], "target": TARGETS["weak"],
                          "met": weak["rate"] >= TARGETS["weak"] and weak["low"] > 0.5},
        "pareto_monotone": {"met": monotone([row["sentiment"] for row in pareto], increasing=False)
                            and monotone([row["conciseness"] for row in pareto], increasing=True)},
    }


def table(summary: dict) -> str:
    lines = [f"{'method':<32} {'win sent.':>20} {'LLM-judged, kappa':>28} {'sentiment':>9} {'concise':>8} "
             f"{'KL':>7} {'length':>7} {'tok/s':>8}"]
    for row in summary["methods"]:
        win = row["win_rate_sentiment"]
        speed = "-" if row["tokens_per_second"] is None else f"{row['tokens_per_second']:.1f}"
        if row.get("speed_quiet") is False:
            speed += "*"
        lines.append(f"{row['label']:<32} {win['rate']:>6.1%} [{win['low']:.0%}, {win['high']:.0%}] "
                     f"{judged_cell(row.get('judged_sentiment')):>28} "
                     f"{row['sentiment']['mean']:>+9.3f} {row['conciseness']['mean']:>8.3f} "
                     f"{row['kl']['mean']:>7.2f} {row['length']['mean']:>7.1f} {speed:>8}")
    if any(row.get("speed_quiet") is False for row in summary["methods"]):
        lines.append("* measured while the machine's load average exceeded its CPU count: not the method's speed")
    return "\n".join(lines)


DOC_LABELS = {"patient": "patient, top-p 0.9", "patient_greedy": "patient, greedy", "dpo": "DPO policy (main job)",
              "genarm": f"GenARM (weight {GENARM_WEIGHT:g})", "args": f"ARGS, greedy (k {ARGS_K}, w {ARGS_WEIGHT:g})",
              "patient_sharpened": f"control: patient guided by itself (β {DOCTOR_BETA:g})",
              "doctor_same_size": "TFPO doctor, same size", "doctor_weak": "TFPO doctor, weak-to-strong"}


def markdown_table(summary: dict) -> str:
    """The report as docs/llmdoctor.md shows it (one row per method, the Pareto sweep in one row)."""
    def pct(win):
        return f"{100 * win['rate']:.1f} % [{100 * win['low']:.1f}, {100 * win['high']:.1f}]"

    def judged(row):
        column = row.get("judged_sentiment")
        if not column:
            return "-"
        if column.get("win_rate") is None:
            return f"no verdict ({column['counts']['unparseable']} unparseable)"
        kappa = column["agreement_with_gold"]["kappa"]
        return f"{pct(column['win_rate'])}, κ {'-' if kappa is None else f'{kappa:.2f}'}"

    lines = ["| method | sentiment win rate vs patient (95 % CI) | LLM-judged win rate (95 % CI), κ vs VADER | "
             "mean VADER (95 % CI) | mean conciseness | KL to patient | length | tokens/s |",
             "|---|---|---|---|---|---|---|---|"]
    rows = [row for row in summary["methods"] if row["group"] != "pareto"]
    for row in rows:
        win = row["win_rate_sentiment"]
        rate = (f"50 % (reference; [{100 * win['low']:.1f}, {100 * win['high']:.1f}])"
                if row["method"] == "patient" else pct(win))
        if row["group"] == "doctor":
            rate = f"**{rate}**"
        speed = "-" if row["tokens_per_second"] is None else f"{row['tokens_per_second']:.1f}"
        sentiment = row["sentiment"]
        lines.append(f"| {DOC_LABELS.get(row['method'], row['label'])} | {rate} | {judged(row)} | "
                     f"{sentiment['mean']:+.3f} [{sentiment['low']:.3f}, {sentiment['high']:.3f}] | "
                     f"{row['conciseness']['mean']:.3f} | {row['kl']['mean']:.1f} | {row['length']['mean']:.1f} | "
                     f"{speed} |")
    pareto = [row for row in summary["methods"] if row["group"] == "pareto"]
    if pareto:
        def joined(values, fmt):
            return ", ".join(format(v, fmt) for v in values)

        lines.append(f"| Pareto, w_sentiment 1 → 0 ({len(pareto)} steps) | "
                     f"{joined([100 * r['win_rate_sentiment']['rate'] for r in pareto], '.1f')} % | - | "
                     f"{joined([r['sentiment']['mean'] for r in pareto], '+.3f')} | "
                     f"{joined([r['conciseness']['mean'] for r in pareto], '.3f')} | "
                     f"≈ {np.mean([r['kl']['mean'] for r in pareto]):.0f} | "
                     f"{pareto[0]['length']['mean']:.1f} → {pareto[-1]['length']['mean']:.1f} | "
                     f"≈ {np.mean([r['tokens_per_second'] or 0 for r in pareto]):.0f} |")
    return "\n".join(lines)


def side_by_side(prompts: list[str], evaluation: dict, samples: int) -> list[dict]:
    rows = []
    for r in range(len(prompts) * samples):
        rows.append({"prompt": prompts[r // samples], "sample": r % samples,
                     **{name: {"text": result["texts"][r], "sentiment": result["sentiment"][r],
                               "conciseness": result["conciseness"][r]}
                        for name, result in evaluation["results"].items()}})
    return rows


def show(rows: list[dict], methods: dict, count: int) -> str:
    shown = []
    for row in rows[:count]:
        lines = [f"prompt: {row['prompt']}"]
        for name in ("patient", "dpo", "genarm", "args", "doctor_same_size", "doctor_weak"):
            entry = row[name]
            lines.append(f"  {methods[name].label:<24} ({entry['sentiment']:+.2f}, {entry['conciseness']:.2f}): "
                         f"{entry['text']}")
        shown.append("\n".join(lines))
    return "\n\n".join(shown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/llmdoctor"))
    parser.add_argument("--main-run", type=Path, default=None,
                        help="a finished main job to reuse (default runs/sentiment; run first when missing)")
    parser.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts evaluated (at most all)")
    parser.add_argument("--eval-samples", type=int, default=2, help="samples per held-out prompt and method")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per decoding batch")
    parser.add_argument("--weak-layers", type=int, default=4, help="layers of the weak-to-strong doctor")
    parser.add_argument("--pareto-steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--judge-url", help="the LLM judge's OpenAI-compatible base URL (default: the embedded model "
                                            "served by jaxalign serve, started and stopped by the experiment)")
    parser.add_argument("--judge-model", help="the judge model's name at --judge-url")
    parser.add_argument("--judge-samples", type=int, default=1,
                        help="samples per held-out prompt the LLM judge compares (default 1: the first)")
    parser.add_argument("--no-llm-judge", action="store_true", help="leave out the LLM-judged column")
    parser.add_argument("--smoke", action="store_true", help=f"every stage, tiny ({SMOKE_SETTINGS})")
    parser.add_argument("overrides", nargs="*", help="tfpo.<key>=<value> / genarm.<key>=<value> / distill.<key>=...")
    args = parser.parse_intermixed_args(argv)  # overrides before, between or after the options
    overrides = main_job.split_overrides(args.overrides, tuple(STAGE_SECTIONS))
    if args.smoke:
        for name, value in SMOKE_SETTINGS.items():
            setattr(args, name, value)
        overrides = {stage: SMOKE_OVERRIDES[stage] + given for stage, given in overrides.items()}
    out = args.output_dir
    main_run = args.main_run or (out / "main" if args.smoke else Path("runs/sentiment"))
    out.mkdir(parents=True, exist_ok=True)
    timings, started = {}, time.perf_counter()

    def timed(name, stage_started):
        timings[f"{name}_s"] = time.perf_counter() - stage_started

    print(f"[1/7] main job: prompts, VADER-labelled pairs, reward model and DPO policy ({main_run})")
    stage = time.perf_counter()
    paths = main_job_run(main_run, smoke=args.smoke)
    timed("main", stage)

    print("[2/7] pairs per dimension: sentiment (VADER) and conciseness (shorter is better)")
    pairs_dir = out / "pairs"
    pairs = dimension_pairs(pairs_dir, paths)
    conflict = pairs["conflict"]
    print(f"      {pairs['counts']} (ties left out: {pairs['ties']}); the more positive response is the longer in "
          f"{conflict['more_positive_is_longer']:.0%} of the pairs, the shorter in "
          f"{conflict['more_positive_is_shorter']:.0%}; Spearman(sentiment, conciseness) = "
          f"{conflict['spearman_sentiment_conciseness']:+.2f}")

    print(f"[3/7] weak doctor's start: the patient's first {args.weak_layers} layers, distilled on its samples")
    stage = time.perf_counter()
    weak_start, distill = distilled_start(out / "distill", paths, layers=args.weak_layers,
                                          overrides=overrides["distill"])
    print(f"      held-out token NLL of the patient's samples: patient {distill['nll_patient']:.3f}, "
          f"{args.weak_layers}-layer start {distill['nll_before']:.3f} -> distilled {distill['nll_after']:.3f} "
          f"(held-out KL to the patient {distill['kl_to_patient_after']:.3f} nats per token)")
    timed("distill", stage)

    print("[4/7] doctors (TFPO): same size per dimension, weak-to-strong for sentiment")
    stage = time.perf_counter()
    plan = {**{f"same_size/{d}": (d, None) for d in DIMENSIONS}, "weak/sentiment": ("sentiment", weak_start)}
    doctors = {}
    for name, (dimension, start) in plan.items():
        print(f"      {name}")
        directory = out / "doctors" / name
        share_token_rewards(out / "doctors" / "same_size" / dimension, directory)
        doctors[name] = trained(directory, doctor_config(directory, pairs_dir, dimension, start=start,
                                                          overrides=overrides["tfpo"]))
    timed("doctors", stage)

    print("[5/7] GenARM: an autoregressive reward model on the sentiment pairs")
    stage = time.perf_counter()
    genarm_dir = out / "genarm"
    genarm = trained(genarm_dir, recipe.load_run_config("llmdoctor", [
        f"output_dir={genarm_dir}", f"data.source={pairs_dir / 'sentiment_train.jsonl'}",
        *held_out(pairs_dir / "sentiment_eval.jsonl"), *overrides["genarm"]], method="dpo"))
    timed("genarm", stage)

    print("[6/7] evaluation on the held-out prompts")
    stage = time.perf_counter()
    settings = {"eval_prompts": args.eval_prompts, "eval_samples": args.eval_samples,
                "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                "pareto_steps": args.pareto_steps, "seed": args.seed}
    methods, evaluation = evaluate(out / "evaluation", paths, doctors, genarm, settings=settings)
    timed("evaluation", stage)
    judged = {}
    if not args.no_llm_judge:
        stage = time.perf_counter()
        names = SMOKE_JUDGED if args.smoke else JUDGED
        print(f"      LLM judge: {len(names)} methods against the patient, first {args.judge_samples} sample(s) per "
              "prompt, both orders")
        with llm_judge(out, url=args.judge_url, model=args.judge_model) as spec:
            judged = judge_methods(out, evaluation, spec, names=names, samples=args.eval_samples,
                                   judge_samples=min(args.judge_samples, args.eval_samples))
        timed("llm_judge", stage)
    timings["total_s"] = time.perf_counter() - started

    print("[7/7] report")
    baseline = evaluation["results"]["patient"]
    summary = {"provenance": describe(),
               "methods": [summarise(name, methods[name], result, baseline, samples=args.eval_samples)
                           | ({"judged_sentiment": judged[name]} if name in judged else {})
                           for name, result in evaluation["results"].items()],
               "pairs": pairs, "distill": distill, "settings": settings, "timings": timings,
               "weak_doctor": {"layers": args.weak_layers, "patient_layers": distill["patient_layers"]},
               "decoding": DECODING}
    summary["targets"] = targets(summary)
    rows = side_by_side(evaluation["prompts"], evaluation, args.eval_samples)
    main_job.write_jsonl(out / "samples.jsonl", rows)
    write_json(out / "summary.json", summary)
    plot(summary, out / "summary.png")
    if not args.smoke:
        RESULTS.mkdir(exist_ok=True)
        published = results_with_quiet_speeds(summary, RESULTS / "llmdoctor_summary.json")
        write_json(RESULTS / "llmdoctor_summary.json", published)
        shutil.copy(out / "summary.png", RESULTS / "llmdoctor_summary.png")
    print()
    print(table(summary))
    print(f"\nas docs/llmdoctor.md shows it (tokens/s as {'published' if not args.smoke else 'measured'}):\n")
    print(markdown_table(published if not args.smoke else summary))
    print(f"\nheld-out responses side by side (sentiment, conciseness; all in {out / 'samples.jsonl'}):\n")
    print(show(rows, methods, SHOWN_PROMPTS))
    print()
    for name, target in summary["targets"].items():
        print(f"{name}: {'met' if target['met'] else 'NOT met'} {({k: v for k, v in target.items() if k != 'met'})}")
    print(f"total {timings['total_s'] / 60:.1f} min; wrote {out / 'summary.json'} and {out / 'summary.png'}")
    if args.smoke:
        print("smoke run: every stage ran (targets are checked by the full run only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
