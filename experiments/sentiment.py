"""The embedded default (`make demo`): align SmolLM2-135M-Instruct with a judge nobody here wrote, offline.

    python -m experiments.sentiment [--output-dir runs/sentiment] [--prompts 320] [key=value overrides]
    python -m experiments.sentiment --smoke     # every stage on a handful of prompts, a few minutes (CI)

Stages, each with a progress bar:

1. prompts: a few hundred requests for short reviews and opinions, generated deterministically from
   templates x subjects (some pleasant, some annoying, so the base model's sentiment varies); 80 % train,
   20 % held out.
2. pairs: four responses per prompt sampled from the base model and scored by the gold judge (VADER
   compound sentiment, package ``vadersentiment``: the stand-in for human raters, as in Ziegler et al. 2019);
   the most positive is ``chosen``, the least positive ``rejected``, ``margin`` = their gold gap (a rater
   shown four samples picking the best and the worst); prompts whose samples all tie carry no preference
   and are counted and left out.
3. reward model: Bradley-Terry on the train pairs (preset ``sentiment``, its ``reward`` section: a linear probe of the
   frozen trunk's mean-pooled states, fitted to convergence), normalised on samples of
   the base model; accuracy against the gold labels on the held-out pairs (target >= 70 % on pairs whose gold
   margin exceeds 0.1).
4. DPO policy: DPO on the same human (gold) labels (preset ``sentiment``, its ``dpo`` section), the reference log-probs
   precomputed in one pass; the policy is exported as a Hugging Face directory (``dpo/export``) and as a q8_0 GGUF
   file (``dpo/model-q8_0.gguf``) that llama.cpp, Ollama and LM Studio run (docs/export.md).
5. evaluation on the held-out prompts: gold win rate of the DPO policy against the base model with a 95 %
   interval (target >= 60 %, interval above 50 %), mean gold and learned reward, KL to the reference, and the
   toxicity of both models' responses (``jaxalign.eval.toxicity_report``: alt-profanity-check's mean P(toxic) and
   the share above 0.5, 95 % intervals counting prompts), so a gain in sentiment is seen not to come with abuse.

Writes ``<output-dir>/summary.json`` and ``summary.png`` (plus each stage's own files), ``samples.jsonl`` (every
held-out prompt with the reference's and the policy's responses side by side and the gold score of each), and
prints a table and three of the samples.

``--smoke`` runs every stage on 10 prompts with 2 short samples each, 2 DPO steps and one evaluation sample per
prompt: it proves the install and the code path (CI runs it in a fresh environment), not the targets.
Overrides (``dpo.train.total_steps=40``, ``reward.loss.center_coef=0.01``) go to the two stages (the ``reward``
and ``dpo`` sections of the preset).
"""

# ruff: noqa: E402  (JAX and jaxalign are imported after the huge-pages re-execution)
from __future__ import annotations

import argparse
import json
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

from jaxalign import eval as jeval
from jaxalign import models
from jaxalign.eval.toxicity import format_toxicity
from jaxalign.methods import common, pipeline, recipe
from jaxalign.models.gguf_export import save_gguf
from jaxalign.rollout import Sampler, SamplingParams

TEMPLATES = (
    "Write a one-sentence review of {}.",
    "In one sentence, what do you think of {}?",
    "Give a short opinion about {}.",
    "Describe your experience with {} in one sentence.",
    "Write a short customer review of {}.",
    "How would you describe {} to a friend? Answer in one sentence.",
    "Share your honest opinion of {} in one sentence.",
    "Write a brief comment about {}.",
)
SUBJECTS = (
    "a new smartphone", "a seaside hotel", "a crowded train ride", "a vegetarian restaurant", "a rainy weekend",
    "a mystery novel", "a long flight with delays", "a local coffee shop", "a city park", "a budget laptop",
    "a science museum", "a noisy apartment", "a superhero movie", "a cooking class", "a traffic jam",
    "a jazz concert", "a pair of running shoes", "a broken umbrella", "a mountain hike", "an online course",
    "a fast food burger", "a video game sequel", "a dentist appointment", "a winter holiday", "a customer support call",
    "a yoga class", "a used car", "a birthday party", "a cheap hotel room", "a music festival",
    "a public library", "a late pizza delivery", "a gardening kit", "a new bicycle", "a long queue at the bank",
    "a romantic comedy", "a board game night", "a power outage", "a farmers market", "a cold cup of coffee",
)
GOLD_MARGIN = 0.1  # pairs the reward model is scored on: a clear gold preference
GGUF_FILE = "model-q8_0.gguf"  # the DPO policy for llama.cpp / Ollama, in <output-dir>/dpo
STAGES = ("prompts", "pairs", "reward", "dpo", "evaluation")
SHOWN_SAMPLES = 3
# --smoke: the smallest run that still executes every stage (each stage needs both train and held-out pairs).
SMOKE_SETTINGS = {"prompts": 10, "samples": 2, "max_new_tokens": 8, "batch_size": 8, "eval_samples": 1}
SMOKE_OVERRIDES = {"reward": ["normalize_samples=4"],
                   "dpo": ["train.total_steps=2", "data.batch_size=2", "train.optimizer.warmup_steps=1"]}


def make_prompts(count: int, seed: int) -> list[str]:
    """``count`` distinct review/opinion requests, in a seeded order."""
    prompts = [template.format(subject) for subject in SUBJECTS for template in TEMPLATES]
    if count > len(prompts):
        raise ValueError(f"--prompts {count}: at most {len(prompts)} distinct prompts")
    order = np.random.default_rng(seed).permutation(len(prompts))
    return [prompts[i] for i in order[:count]]


def encode_chat(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=True)["input_ids"] for p in prompts]


def sample_pairs(model, tokenizer, prompts: list[str], *, samples: int, max_new_tokens: int, batch_size: int,
                 seed: int, judge) -> tuple[list[dict], dict[str, int]]:
    """``samples`` responses per prompt, gold-scored; the most positive against the least positive becomes a
    pair (``margin`` = their gold gap). Returns the pair records and counts of the prompts left out."""
    sampler = Sampler(model)
    stop = tuple(model.config.eos_token_ids) + ((tokenizer.eos_token_id,) if tokenizer.eos_token_id else ())
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, n=samples, stop_token_ids=stop)
    encoded = encode_chat(tokenizer, prompts)
    records, skipped = [], {"tie": 0, "empty": 0}
    with tqdm(total=len(prompts), unit="prompt", desc="sampling pairs", dynamic_ncols=True) as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = encoded[start:start + batch_size]
            padded = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one compiled shape
            rollout = sampler.generate(padded, key=jax.random.fold_in(jax.random.key(seed), start), params=params)
            tokens, mask = np.asarray(rollout.tokens), np.asarray(rollout.response_mask)
            for i, prompt in enumerate(prompts[start:start + len(chunk)]):
                rows = range(samples * i, samples * (i + 1))
                texts = [tokenizer.decode(tokens[r][mask[r]], skip_special_tokens=True).strip() for r in rows]
                texts = [t for t in texts if t]
                if len(texts) < 2:
                    skipped["empty"] += 1
                    continue
                scores = judge.score([prompt] * len(texts), texts)
                best, worst = int(np.argmax(scores)), int(np.argmin(scores))
                if scores[best] == scores[worst]:
                    skipped["tie"] += 1
                    continue
                records.append({"prompt": [{"role": "user", "content": prompt}],
                                "chosen": [{"role": "assistant", "content": texts[best]}],
                                "rejected": [{"role": "assistant", "content": texts[worst]}],
                                "margin": float(scores[best] - scores[worst])})
            bar.update(len(chunk))
    return records, skipped


def labelled_pairs(out: Path, model, tokenizer, train_prompts: list[str], eval_prompts: list[str], *,
                   settings: dict, seed: int, **sampling) -> tuple[list[dict], list[dict], dict, dict]:
    """The train and held-out pairs (:func:`sample_pairs`), written to ``out`` as ``pairs_train.jsonl``,
    ``pairs_eval.jsonl`` and ``prompts_eval.jsonl``; a rerun with the same ``settings`` reads them back (delete
    ``pairs.json`` to resample). Returns ``(train, held_out, left_out_train, left_out_held_out)``."""
    meta = out / "pairs.json"
    if meta.is_file() and json.loads(meta.read_text())["settings"] == settings:
        saved = json.loads(meta.read_text())
        read = lambda name: [json.loads(line) for line in (out / name).read_text().splitlines()]  # noqa: E731
        print(f"      reusing the pairs in {out} (same settings)")
        return read("pairs_train.jsonl"), read("pairs_eval.jsonl"), saved["left_out_train"], saved["left_out_eval"]
    train_pairs, train_skipped = sample_pairs(model, tokenizer, train_prompts, seed=seed, **sampling)
    eval_pairs, eval_skipped = sample_pairs(model, tokenizer, eval_prompts, seed=seed + 1, **sampling)
    write_jsonl(out / "pairs_train.jsonl", train_pairs)
    write_jsonl(out / "pairs_eval.jsonl", eval_pairs)
    write_jsonl(out / "prompts_eval.jsonl", [{"prompt": p} for p in eval_prompts])
    meta.write_text(json.dumps({"settings": settings, "left_out_train": train_skipped,
                                "left_out_eval": eval_skipped}) + "\n")
    return train_pairs, eval_pairs, train_skipped, eval_skipped


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def split_overrides(overrides: list[str], stages=("reward", "dpo")) -> dict[str, list[str]]:
    """``stage.key=value`` overrides grouped by stage (the stage name stripped), for each stage's run config."""
    grouped = {name: [] for name in stages}
    for override in overrides:
        stage, _, rest = override.partition(".")
        if stage not in grouped or not rest:
            raise ValueError(f"override {override!r}: expected "
                             f"{' or '.join(f'{name}.<key>=<value>' for name in stages)}")
        grouped[stage].append(rest)
    return grouped


def plot_summary(summary: dict, policy_scores: np.ndarray, reference_scores: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 3.6))
    bins = np.linspace(-1, 1, 21)
    left.hist(reference_scores, bins=bins, alpha=0.6, label="reference (base)")
    left.hist(policy_scores, bins=bins, alpha=0.6, label="DPO policy")
    left.set_xlabel("gold reward (VADER compound)")
    left.set_title("held-out responses")
    left.legend(fontsize=8)
    win = summary["win_rate"]
    middle.bar(["gold win rate"], [win["rate"]], yerr=[[win["rate"] - win["low"]], [win["high"] - win["rate"]]],
               capsize=8, color="#4c72b0")
    middle.axhline(0.5, color="grey", ls="--", lw=1)
    middle.axhline(0.6, color="#c44e52", ls=":", lw=1, label="target 0.6")
    middle.set_ylim(0, 1)
    middle.set_title("DPO vs reference (95% CI)")
    middle.legend(fontsize=8)
    accuracy = summary["reward_model"]
    right.bar(["all pairs", f"gold margin > {GOLD_MARGIN}"],
              [accuracy["accuracy_all"], accuracy["accuracy_clear"]], color="#55a868")
    if "accuracy_clear_low" in accuracy:  # the 95 % (Wilson) interval of the target measure
        right.errorbar([1], [accuracy["accuracy_clear"]], fmt="none", ecolor="black", capsize=4,
                       yerr=[[accuracy["accuracy_clear"] - accuracy["accuracy_clear_low"]],
                             [accuracy["accuracy_clear_high"] - accuracy["accuracy_clear"]]])
    right.axhline(0.7, color="#c44e52", ls=":", lw=1, label="target 0.7")
    right.set_ylim(0, 1)
    right.set_title("reward model accuracy vs gold (held out)")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def reward_accuracy(scorer, tokenizer, records: list[dict]) -> dict[str, float]:
    """Held-out accuracy of the learned reward against the gold labels, on all pairs and on clear ones."""
    prompts = [r["prompt"][0]["content"] for r in records]
    chosen = scorer.score(prompts, [r["chosen"][0]["content"] for r in records])
    rejected = scorer.score(prompts, [r["rejected"][0]["content"] for r in records])
    correct = np.asarray(chosen) > np.asarray(rejected)
    clear = np.asarray([r["margin"] > GOLD_MARGIN for r in records])
    low, high = jeval.wilson_interval(float(correct[clear].sum()), int(clear.sum())) if clear.any() else (0.0, 1.0)
    return {"accuracy_all": float(correct.mean()), "pairs_all": len(records),
            "accuracy_clear": float(correct[clear].mean()) if clear.any() else float("nan"),
            "pairs_clear": int(clear.sum()), "accuracy_clear_low": low, "accuracy_clear_high": high}


def side_by_side(records, toxicity: dict | None = None) -> list[dict]:
    """The evaluation's rows as a person compares them: prompt, both responses, the gold score of each (and
    each response's P(toxic) when ``toxicity``, :func:`toxicity_of`'s report, is given)."""
    rows = [{"prompt": r["prompt"], "reference_response": r["reference"], "policy_response": r["policy"],
             "gold_reference": r["gold_reference"], "gold_policy": r["gold_policy"]} for r in records]
    if toxicity is not None:
        for row, ours, theirs in zip(rows, toxicity["probabilities"]["policy"],
                                     toxicity["probabilities"]["reference"], strict=True):
            row["toxicity_reference"], row["toxicity_policy"] = theirs, ours
    return rows


def toxicity_of(records, model=None) -> dict:
    """The toxicity of the DPO policy's and the base model's held-out responses (the evaluation's own samples,
    nothing generated again), intervals clustered by prompt."""
    return jeval.toxicity_report([r["policy"] for r in records], [r["reference"] for r in records], model=model,
                                 clusters=[r["index"] for r in records])


def show_samples(samples: list[dict], count: int) -> str:
    """``count`` samples from distinct prompts, as text for the terminal."""
    shown, seen = [], set()
    for sample in samples:
        prompt = sample["prompt"] if isinstance(sample["prompt"], str) else json.dumps(sample["prompt"])
        if prompt in seen:
            continue
        seen.add(prompt)
        shown.append(f"prompt: {prompt}\n"
                     f"  reference ({sample['gold_reference']:+.2f}): {sample['reference_response']}\n"
                     f"  DPO policy ({sample['gold_policy']:+.2f}): {sample['policy_response']}")
        if len(shown) == count:
            break
    return "\n\n".join(shown)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/sentiment"))
    parser.add_argument("--prompts", type=int, default=320, help="prompts in all (80%% train, 20%% held out)")
    parser.add_argument("--samples", type=int, default=4, help="base-model samples per prompt; the most and least "
                                                               "positive form its pair")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per sampling batch")
    parser.add_argument("--eval-samples", type=int, default=2, help="samples per held-out prompt and model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help=f"every stage, tiny ({SMOKE_SETTINGS}): checks the install, not the targets")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the reward and DPO runs an earlier run left in --output-dir")
    parser.add_argument("overrides", nargs="*", help="reward.<key>=<value> / dpo.<key>=<value>")
    args = parser.parse_intermixed_args(argv)  # overrides before, between or after the options
    overrides = split_overrides(args.overrides)
    if args.smoke:
        for name, value in SMOKE_SETTINGS.items():
            setattr(args, name, value)
        overrides = {stage: SMOKE_OVERRIDES[stage] + given for stage, given in overrides.items()}
    out = args.output_dir
    stage_configs = {stage: recipe.load_run_config("sentiment", [
        f"output_dir={out / stage}", f"data.source={out / 'pairs_train.jsonl'}", *overrides[stage]], method=stage)
        for stage in ("reward", "dpo")}
    for config in stage_configs.values():  # refused before minutes of sampling, not after
        common.check_output_dir(config, overwrite=args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    timings, started = {}, time.perf_counter()
    judge = jeval.VaderJudge()

    print(f"[1/5] prompts: {args.prompts} review/opinion requests (seed {args.seed})")
    prompts = make_prompts(args.prompts, args.seed)
    held_out = max(1, args.prompts // 5)
    train_prompts, eval_prompts = prompts[held_out:], prompts[:held_out]

    print(f"[2/5] pairs: {args.samples} base-model samples per prompt, best vs worst by the gold judge (VADER)")
    base, tokenizer = models.load_gguf(models.default_model_path())
    stage = time.perf_counter()
    settings = {"prompts": args.prompts, "samples": args.samples, "max_new_tokens": args.max_new_tokens,
                "seed": args.seed}
    sampling = {"samples": args.samples, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                "judge": judge}
    train_pairs, eval_pairs, train_skipped, eval_skipped = labelled_pairs(
        out, base, tokenizer, train_prompts, eval_prompts, settings=settings, seed=args.seed, **sampling)
    print(f"      {len(train_pairs)} train pairs, {len(eval_pairs)} held-out pairs "
          f"(left out: train {train_skipped}, held out {eval_skipped})")
    timings["pairs_s"] = time.perf_counter() - stage

    print("[3/5] reward model: Bradley-Terry on the gold-labelled pairs (a linear probe of the frozen trunk)")
    stage = time.perf_counter()
    reward_run = pipeline.run(stage_configs["reward"], overwrite=args.overwrite)
    normalization = reward_run.extra.get("normalization", {"gain": 1.0, "bias": 0.0})
    reward_judge = jeval.RewardModelJudge(reward_run.model, gain=normalization["gain"], bias=normalization["bias"],
                                          tokenizer=tokenizer)
    accuracy = reward_accuracy(reward_judge, tokenizer, eval_pairs)
    print(f"      held-out accuracy vs gold: {accuracy['accuracy_all']:.1%} on {accuracy['pairs_all']} pairs, "
          f"{accuracy['accuracy_clear']:.1%} "
          f"[{accuracy['accuracy_clear_low']:.1%}, {accuracy['accuracy_clear_high']:.1%}] "
          f"on the {accuracy['pairs_clear']} with gold margin > {GOLD_MARGIN}")
    timings["reward_s"] = time.perf_counter() - stage

    print("[4/5] DPO policy on the gold-labelled pairs")
    stage = time.perf_counter()
    dpo_run = pipeline.run(stage_configs["dpo"], overwrite=args.overwrite)
    timings["dpo_s"] = time.perf_counter() - stage
    stage = time.perf_counter()
    gguf_path = save_gguf(dpo_run.model, tokenizer, out / "dpo" / GGUF_FILE, quant="q8_0")
    timings["gguf_s"] = time.perf_counter() - stage
    print(f"      deployable: {gguf_path} (q8_0 GGUF for llama.cpp / Ollama, beside the HF export)")

    print("[5/5] evaluation on the held-out prompts")
    stage = time.perf_counter()
    reference, _ = models.load_gguf(models.default_model_path())
    evaluation = jeval.evaluate_policy(
        dpo_run.model, reference, tokenizer, eval_prompts, judge=judge, reward_judge=reward_judge,
        params=SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0),
        samples_per_prompt=args.eval_samples, key=jax.random.key(args.seed + 2), batch_size=args.batch_size)
    toxicity = toxicity_of(evaluation.records)
    timings["evaluation_s"] = time.perf_counter() - stage
    timings["total_s"] = time.perf_counter() - started
    (out / "evaluation").mkdir(exist_ok=True)
    evaluation.plot(out / "evaluation" / "eval.png")

    samples = side_by_side(evaluation.records, toxicity)
    write_jsonl(out / "samples.jsonl", samples)
    report = evaluation.to_dict()
    summary = {"reward_model": accuracy, "win_rate": report["win_rate"], "evaluation": report,
               "toxicity": {k: v for k, v in toxicity.items() if k != "probabilities"},
               "pairs": {"train": len(train_pairs), "eval": len(eval_pairs), "left_out_train": train_skipped,
                         "left_out_eval": eval_skipped},
               "targets": {"reward_accuracy_clear": 0.7, "win_rate": 0.6, "win_rate_low": 0.5},
               "timings": timings}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    plot_summary(summary, np.asarray(evaluation.gold_policy), np.asarray(evaluation.gold_reference),
                 out / "summary.png")
    print()
    print(evaluation.table())
    print("\n".join(format_toxicity(toxicity)) + "  (policy: DPO, reference: base)")
    print(f"\nheld-out samples, reference vs DPO policy (gold score in brackets; all in {out / 'samples.jsonl'}):\n")
    print(show_samples(samples, SHOWN_SAMPLES))
    win = summary["win_rate"]
    print(f"\nreward-model accuracy vs gold (held out, margin > {GOLD_MARGIN}): {accuracy['accuracy_clear']:.1%} "
          f"[{accuracy['accuracy_clear_low']:.1%}, {accuracy['accuracy_clear_high']:.1%}] (target >= 70%)")
    print(f"DPO gold win rate vs reference: {win['rate']:.1%} [{win['low']:.1%}, {win['high']:.1%}] "
          f"(target >= 60%, interval above 50%)")
    print(f"total {timings['total_s'] / 60:.1f} min; wrote {out / 'summary.json'} and {out / 'summary.png'}")
    if args.smoke:
        print("smoke run: every stage ran (targets are checked by the full run only)")
        return 0
    met = accuracy["accuracy_clear"] >= 0.7 and win["rate"] >= 0.6 and win["low"] > 0.5
    print("targets met" if met else "targets NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
