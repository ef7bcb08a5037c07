"""The judge and benchmark parts of ``jaxalign eval``: their options, the checks that run before any model is
loaded, and the runs (toxicity and an LLM judge on the policy-versus-reference samples; AlpacaEval, MT-Bench
and TruthfulQA-MC on their files)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["add_judge_options", "judge_specs", "prepare", "run_benchmark", "judge_samples"]

JUDGES = ("vader", "toxicity", "llm")
BENCHMARKS = ("alpaca_eval", "mt_bench", "truthfulqa_mc")
NEEDS_LLM = ("alpaca_eval", "mt_bench")


def add_judge_options(parser) -> None:
    group = parser.add_argument_group("judges")
    group.add_argument("--judge", action="append", choices=JUDGES,
                       help="vader: VADER sentiment, the default gold judge; toxicity: P(toxic) of every response "
                            "(alt-profanity-check, or --toxicity-model) and a win rate of the less toxic; llm: an "
                            "LLM judge's pairwise win rate (--judge-url, --judge-model). Repeat to use several; the "
                            "first of vader/toxicity is the table's gold judge (vader when only llm is named)")
    group.add_argument("--toxicity-model", type=Path, metavar="FILE.ckpt",
                       help="a Detoxify checkpoint, with its base model's config.json and tokenizer files in the "
                            "same directory (default: alt-profanity-check, shipped in its package)")
    group.add_argument("--judge-url", help="the LLM judge's OpenAI-compatible base URL, e.g. "
                                           "http://127.0.0.1:8000/v1 (jaxalign serve, vLLM, a hosted API)")
    group.add_argument("--judge-model", help="the judge model's name at --judge-url")
    group.add_argument("--judge-key-env", default="OPENAI_API_KEY", metavar="VAR",
                       help="environment variable holding the judge's API key (default OPENAI_API_KEY; unset: "
                            "no key sent)")
    group.add_argument("--agreement-judge-url", help="a second judge asked the same judgments: Cohen's kappa")
    group.add_argument("--agreement-judge-model", help="the second judge's model name")
    group.add_argument("--judge-templates", type=Path, metavar="DIR",
                       help="judge prompts to use instead of the defaults: DIR/<kind>.yaml for any of pairwise, "
                            "single, single_reference, single_multi, single_multi_reference")
    group.add_argument("--write-judge-templates", type=Path, metavar="DIR",
                       help="write the default judge prompts into DIR to edit, and exit unless there is more to do")
    group.add_argument("--judge-concurrency", type=int, default=8, help="judge requests in flight (default 8)")
    group.add_argument("--judge-retries", type=int, default=6,
                       help="retries after a 429, 5xx, timeout or dropped connection (default 6)")
    group.add_argument("--judge-timeout", type=float, default=120.0, help="seconds to wait for the judge (120)")
    group.add_argument("--judge-max-tokens", type=int, default=1024, help="the judge's answer length (1024)")
    group.add_argument("--judge-cache", type=Path, metavar="DIR",
                       help="where judgments are cached (default $XDG_CACHE_HOME/jaxalign/judgments)")
    group.add_argument("--no-judge-cache", action="store_true", help="ask the judge again for everything")
    bench = parser.add_argument_group("benchmarks")
    bench.add_argument("--benchmark", choices=BENCHMARKS,
                       help="alpaca_eval (LLM-judged win rate against the file's outputs or --reference), mt_bench "
                            "(LLM-graded 1-10, two turns, per category), truthfulqa_mc (MC1/MC2 from "
                            "log-likelihoods, no judge); the file is --data")
    bench.add_argument("--data", type=Path, help="the benchmark file in its published format")


def judges(args) -> list[str]:
    return list(dict.fromkeys(args.judge or ["vader"]))


def check_judge_args(args) -> None:
    """Judge and benchmark options that do not fit together: one line, before anything is read."""
    named = judges(args)
    if (args.benchmark is None) != (args.data is None):
        raise ValueError("--benchmark and --data go together: the benchmark's name and its file")
    if args.benchmark is not None and args.data is not None and not args.data.exists():
        raise FileNotFoundError(f"--data {args.data}: no such file or directory")
    wants_llm = "llm" in named or args.benchmark in NEEDS_LLM
    if wants_llm and (not args.judge_url or not args.judge_model):
        reason = "--judge llm" if "llm" in named else f"--benchmark {args.benchmark}"
        raise ValueError(f"{reason} needs --judge-url and --judge-model (an OpenAI-compatible endpoint)")
    if not wants_llm and (args.judge_url or args.judge_model):
        raise ValueError("--judge-url/--judge-model are for the LLM judge: add --judge llm")
    if bool(args.agreement_judge_url) != bool(args.agreement_judge_model):
        raise ValueError("--agreement-judge-url and --agreement-judge-model go together")
    if args.agreement_judge_url and not wants_llm:
        raise ValueError("--agreement-judge-url compares LLM judges: add --judge llm")
    if args.toxicity_model is not None:
        if "toxicity" not in named:
            raise ValueError("--toxicity-model is the toxicity judge's classifier: add --judge toxicity")
        if not args.toxicity_model.is_file():
            raise FileNotFoundError(f"--toxicity-model {args.toxicity_model}: no such file")
    if args.benchmark is not None and args.prompts is not None:
        raise ValueError("--benchmark takes its prompts from --data: drop --prompts (or run them separately)")
    for name in ("judge_concurrency", "judge_max_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.judge_retries < 0:
        raise ValueError(f"--judge-retries must be >= 0, got {args.judge_retries}")
    if not args.judge_timeout > 0:
        raise ValueError(f"--judge-timeout must be > 0, got {args.judge_timeout}")


def judge_specs(args):
    """``(judge, agreement judge)`` specs from the options (None where not asked for); templates read and
    checked here."""
    from jaxalign.eval.llm_judge import JudgeSpec, default_cache_dir
    from jaxalign.eval.templates import load_templates

    if not args.judge_url:
        return None, None
    templates = load_templates(args.judge_templates)
    cache = None if args.no_judge_cache else (args.judge_cache or default_cache_dir())
    common = dict(api_key_env=args.judge_key_env, templates=templates, concurrency=args.judge_concurrency,
                  retries=args.judge_retries, timeout_s=args.judge_timeout, max_tokens=args.judge_max_tokens,
                  cache_dir=cache)
    first = JudgeSpec(url=args.judge_url, model=args.judge_model, **common)
    second = None if not args.agreement_judge_url else JudgeSpec(url=args.agreement_judge_url,
                                                                model=args.agreement_judge_model, **common)
    return first, second


def prepare(args) -> dict:
    """Everything that can fail on bad input before a model is loaded: the benchmark file, the templates, the
    judges' endpoints, the toxicity classifier. Returns what the runs need."""
    from jaxalign.eval.benchmarks import read_benchmark
    from jaxalign.eval.llm_judge import check_endpoint

    ready: dict = {"judges": judges(args)}
    if args.benchmark is not None:
        items = read_benchmark(args.benchmark, args.data)
        if args.benchmark == "alpaca_eval" and args.reference is None:
            missing = next((i for i, item in enumerate(items, start=1) if item.output is None), None)
            if missing is not None:
                raise ValueError(f"{args.data}, record {missing}: field 'output' is missing; without --reference "
                                 "the file's outputs are the baseline (give --reference to generate one)")
        ready["items"] = items
    spec, agreement = judge_specs(args)
    for one in (spec, agreement):
        if one is not None:
            check_endpoint(one)
    ready["spec"], ready["agreement"] = spec, agreement
    if "toxicity" in ready["judges"]:
        from jaxalign.eval.toxicity import load_toxicity_model

        ready["toxicity"] = load_toxicity_model(args.toxicity_model)
    return ready


def gold_judge(ready: dict):
    """The table's gold judge: the first of vader/toxicity named (vader when only llm is)."""
    from jaxalign.eval.judges import VaderJudge
    from jaxalign.eval.toxicity import ToxicityJudge

    for name in ready["judges"]:
        if name == "vader":
            return VaderJudge()
        if name == "toxicity":
            return ToxicityJudge(ready["toxicity"])
    return VaderJudge()


def judge_samples(args, ready: dict, evaluation, report: dict, lines: list[str], extra: dict) -> None:
    """Toxicity and the LLM judge on ``evaluation``'s paired samples (clustered by prompt)."""
    records = evaluation.records
    clusters = [record["index"] for record in records]
    ours, theirs = [r["policy"] for r in records], [r["reference"] for r in records]
    if "toxicity" in ready:
        from jaxalign.eval.toxicity import format_toxicity, toxicity_report

        report["toxicity"] = toxicity_report(ours, theirs, model=ready["toxicity"], clusters=clusters,
                                             confidence=args.confidence)
        lines += format_toxicity(report["toxicity"])
    if ready.get("spec") is not None:
        from jaxalign.eval.llm_judge import judged_win_rate

        result = judged_win_rate([r["prompt"] for r in records], ours, theirs, ready["spec"],
                                 agreement_judge=ready["agreement"], clusters=clusters, confidence=args.confidence,
                                 progress=not args.no_progress, check=False)
        report["llm_judge"] = result.to_dict()
        lines += result.lines()
        extra["judgments"] = _all_judgments(result)


def _all_judgments(result) -> list[dict]:
    rows = [{"judge": result.judge, **j} for j in result.judgments]
    if result.other is not None:
        rows += [{"judge": result.other.judge, **j} for j in result.other.judgments]
    return rows


def _sampling(args):
    from jaxalign.rollout import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k)


def _generator(args, model, tokenizer, label: str):
    """``generate(prompts) -> texts`` with the command's sampling, a fresh key per call."""
    import jax

    from jaxalign.eval.evaluate import generate

    calls = iter(range(1 << 30))

    def run(prompts):
        key = jax.random.fold_in(jax.random.key(args.seed), next(calls))
        return generate(model, tokenizer, prompts, params=_sampling(args), key=key, batch_size=args.batch_size,
                        progress=not args.no_progress, desc=f"{label} answering")
    return run


def run_benchmark(args, ready: dict, policy, tokenizer, report: dict, lines: list[str], extra: dict) -> None:
    """The ``--benchmark`` run on the loaded policy (the reference is loaded here when given)."""
    from jaxalign import models
    from jaxalign.eval import benchmarks as bench

    items, name = ready["items"], args.benchmark
    reference = reference_tokenizer = None
    if args.reference is not None:
        if args.reference == args.policy:
            reference, reference_tokenizer = policy, tokenizer
        else:
            reference, reference_tokenizer = models.load_pretrained(args.reference, source="--reference")
    if name == "truthfulqa_mc" and reference is not None:
        bench.check_same_tokenizer(tokenizer, reference_tokenizer)
    section: dict = {"name": name, "data": str(args.data), "items": len(items)}
    report["benchmark"] = section

    if name == "truthfulqa_mc":
        for label, model, tok in (("policy", policy, tokenizer), ("reference", reference, reference_tokenizer)):
            if model is None:
                continue
            scores = bench.truthfulqa_scores(model, tok, items, batch_size=args.batch_size)
            section[label] = bench.truthfulqa_summary(scores, args.confidence)
            section[f"{label}_per_question"] = scores
            lines += bench.format_means(f"TruthfulQA MC ({label}, {len(items)} questions)",
                                        {"MC1": section[label]["mc1"], "MC2": section[label]["mc2"]})
        return

    if name == "alpaca_eval":
        from jaxalign.eval.llm_judge import judged_win_rate

        instructions = [item.instruction for item in items]
        ours = _generator(args, policy, tokenizer, "policy")(instructions)
        if reference is not None:
            theirs = _generator(args, reference, reference_tokenizer, "reference")(instructions)
            baseline = str(args.reference)
        else:
            theirs = [item.output for item in items]
            baseline = items[0].generator or "the file's outputs"
        result = judged_win_rate(instructions, ours, theirs, ready["spec"], agreement_judge=ready["agreement"],
                                 confidence=args.confidence, progress=not args.no_progress, check=False)
        section |= {"baseline": baseline, **result.to_dict()}
        lines.append(f"AlpacaEval ({len(items)} instructions) against {baseline}")
        lines += result.lines()
        generator = str(args.policy or "policy")
        extra["model_outputs.json"] = [{"instruction": item.instruction, "output": text, "generator": generator,
                                        "dataset": item.dataset} for item, text in zip(items, ours)]
        extra["judgments"] = _all_judgments(result)
        return

    from jaxalign.eval.llm_judge import grade

    answers_out = []
    for label, model, tok in (("policy", policy, tokenizer), ("reference", reference, reference_tokenizer)):
        if model is None:
            continue
        answers = bench.mt_bench_answers(_generator(args, model, tok, label), items)
        grades = grade(bench.mt_bench_items(items, answers), ready["spec"], progress=not args.no_progress,
                       confidence=args.confidence, check=False)
        section[label] = grades.to_dict()
        table = grades.table()
        counts = grades.counts
        lines += bench.format_means(
            f"MT-Bench ({label}, {len(items)} questions; {counts['ok']} graded, {counts['unparseable']} "
            f"unparseable, {counts['judgments'] - counts['ok'] - counts['unparseable']} failed)",
            {"overall": table["overall"], **{f"turn {t}": v for t, v in table["turns"].items()},
             **table["categories"]})
        extra.setdefault("judgments", []).extend({"judge": grades.judge, "model": label, **j}
                                                 for j in grades.judgments)
        model_id = str((args.policy if label == "policy" else args.reference) or label)
        answers_out += [{"question_id": q.question_id, "model_id": model_id, "choices": [{"index": 0, "turns": a}]}
                        for q, a in zip(items, answers)]
    extra["mt_bench_answers.jsonl"] = answers_out


def write_extra(directory: Path, extra: dict) -> list[str]:
    """The judgments (``judgments.jsonl``, raw texts included) and the benchmark's answers files."""
    written = []
    for name, rows in extra.items():
        path = directory / ("judgments.jsonl" if name == "judgments" else name)
        with path.open("w", encoding="utf-8") as file:
            if name.endswith(".json"):
                json.dump(rows, file, indent=2, ensure_ascii=False)
                file.write("\n")
            else:
                for row in rows:
                    file.write(json.dumps(row, ensure_ascii=False) + "\n")
        written.append(path.name)
    return written


def write_templates_if_asked(args) -> bool:
    """``--write-judge-templates DIR``: write them; True when that was all there was to do."""
    if args.write_judge_templates is None:
        return False
    from jaxalign.eval.templates import write_templates

    paths = write_templates(args.write_judge_templates)
    print(f"wrote {len(paths)} judge templates to {args.write_judge_templates}: "
          + ", ".join(p.name for p in paths), file=sys.stderr)
    return args.prompts is None and args.pairs is None and args.eval_sft is None and args.benchmark is None

