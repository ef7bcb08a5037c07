"""``jaxalign eval``: policy versus reference (gold and learned reward, win rate, KL, lengths), reward-model
accuracy on held-out pairs, and perplexity on SFT data; a table on stdout, ``eval.json``, ``eval.png`` and
``samples.jsonl`` under ``--output``.

    jaxalign eval --policy ppo_ckpt --prompts prompts.jsonl --n 4 --output eval_out
    jaxalign eval --reward-model rm_ckpt --pairs heldout_pairs.jsonl --min-margin 0.5
    jaxalign eval --policy sft_ckpt --eval-sft heldout_sft.jsonl
    jaxalign eval --policy ppo_ckpt --prompts prompts.jsonl --judge toxicity --judge llm \
        --judge-url http://127.0.0.1:8000/v1 --judge-model judge
    jaxalign eval --benchmark alpaca_eval --data alpaca_eval.json --policy dpo_ckpt --judge-url URL --judge-model M
    jaxalign eval --benchmark truthfulqa_mc --data mc_task.json --policy dpo_ckpt --reference sft_ckpt

Register it with :func:`add_eval_command` on the ``jaxalign`` subcommands.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from jaxalign.eval.judging import add_judge_options

__all__ = ["add_eval_command", "run_eval"]

EMBEDDED = "SmolLM2-135M-Instruct (embedded)"


def add_eval_command(subcommands) -> None:
    """Register ``eval`` (with ``run=run_eval``) on an ``argparse`` subparsers object."""
    parser = subcommands.add_parser(
        "eval", help="evaluate a policy against a reference, a reward model on held-out pairs, perplexity",
        description="Sample the policy and the reference on the same prompts with the same keys and compare "
                    "them: mean gold reward (the judge) and learned reward (--reward-model), the policy's win "
                    "rate with a Wilson confidence interval, KL(policy || reference) on the policy's samples, "
                    "response lengths. Also reward-model accuracy on held-out pairs (--pairs) and the policy's "
                    "perplexity on SFT data (--eval-sft).")
    parser.add_argument("--policy", help="checkpoint directory, .gguf file or Hugging Face Hub id "
                                         "(org/name[@revision], docs/hub.md); default: the embedded "
                                         "SmolLM2-135M-Instruct")
    parser.add_argument("--reference", help="checkpoint directory, .gguf file or Hub id; default: the embedded model "
                                            "(the same path as --policy loads one model, sampled once)")
    parser.add_argument("--prompts", type=Path, help="prompt-only JSONL/JSON records ('prompt': text or chat "
                                                     "messages), or a text file with one prompt a line")
    parser.add_argument("--raw", action="store_true", help="encode prompts as plain text, without the chat template")
    parser.add_argument("--reward-model", type=Path, help="a saved reward model directory: learned reward and "
                                                          "win rate, and the model --pairs measures")
    parser.add_argument("--dimension-weights", metavar="W1,W2,...",
                        help="a multi-objective reward model: weights combining its normalised objectives into "
                             "one reward (default: the weights saved with it, those it was trained with)")
    parser.add_argument("--pairs", type=Path, help="held-out preference pairs (any jaxalign.data preference "
                                                   "format) for reward-model accuracy; needs --reward-model")
    parser.add_argument("--min-margin", type=float, help="also report the accuracy on pairs whose gold margin "
                                                         "exceeds this")
    parser.add_argument("--eval-sft", type=Path, help="SFT data (any jaxalign.data SFT format): the policy's "
                                                      "perplexity on its completions")
    parser.add_argument("--max-length", type=int, help="truncate --pairs / --eval-sft sequences to this many tokens")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="0 = greedy (default 0.7); 1 with --top-p 1 makes the KL estimate unbiased")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off (default)")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    parser.add_argument("--n", type=int, default=1, help="samples per prompt from each model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts (pairs, SFT examples) per compiled batch")
    parser.add_argument("--confidence", type=float, default=0.95, help="level of the intervals (default 0.95)")
    parser.add_argument("--output", type=Path, help="write eval.json, eval.png and samples.jsonl into this directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_judge_options(parser)
    parser.set_defaults(run=run_eval)


def _check_args(args) -> None:
    from jaxalign.eval.judging import check_judge_args

    if (args.prompts is None and args.pairs is None and args.eval_sft is None and args.benchmark is None
            and args.write_judge_templates is None):
        raise ValueError("nothing to evaluate: give --prompts (policy vs reference), --pairs (reward-model "
                         "accuracy, with --reward-model), --eval-sft (perplexity) or --benchmark with --data")
    check_judge_args(args)
    if args.pairs is not None and args.reward_model is None:
        raise ValueError("--pairs measures a reward model's accuracy: give --reward-model")
    if args.dimension_weights is not None:
        if args.reward_model is None:
            raise ValueError("--dimension-weights combine a reward model's objectives: give --reward-model")
        from jaxalign.eval.judges import parse_dimension_weights

        args.dimension_weights = parse_dimension_weights(args.dimension_weights)
    if args.min_margin is not None and args.pairs is None:
        raise ValueError("--min-margin filters --pairs: give --pairs")
    for name in ("batch_size", "n", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_length is not None and args.max_length < 2:
        raise ValueError(f"--max-length must be >= 2, got {args.max_length}")
    if not 0 < args.confidence < 1:
        raise ValueError(f"--confidence must be in (0, 1), got {args.confidence}")
    for flag, path in (("--prompts", args.prompts), ("--reward-model", args.reward_model), ("--pairs", args.pairs),
                       ("--eval-sft", args.eval_sft)):
        if path is not None and not path.exists():
            raise FileNotFoundError(f"{flag} {path}: no such file or directory")


def _batches(path: Path, tokenizer, args, kinds: tuple[str, ...], flag: str):
    """Every example of ``path`` once, in file order, in static-shape batches (the last one padded)."""
    from jaxalign import data

    config = data.DataConfig(str(path), max_length=args.max_length, batch_size=args.batch_size, shuffle=False,
                             drop_last=False, num_epochs=1)
    # None: the data package's own rule (a bar from 1000 records); --no-progress: never.
    batches = data.build_batches(config, tokenizer, progress=False if args.no_progress else None)
    if batches.dataset.kind not in kinds:
        raise ValueError(f"{flag} {path}: expected {' or '.join(kinds)} records, got {batches.dataset.kind} records")
    return batches


def _format_accuracy(result: dict) -> str:
    def one(entry):
        return f"{entry['accuracy']:.3f} ({entry['correct']}/{entry['pairs']}, {entry['ties']} ties)"

    lines = [f"reward-model accuracy: {one(result)}"]
    if "above_margin" in result:
        lines.append(f"  margin > {result['min_margin']:g}: {one(result['above_margin'])}")
    for name, entry in result.get("dimensions", {}).items():
        lines.append(f"  {name}: {one(entry)}")
    return "\n".join(lines)


def _json_safe(value):
    """NaN (an accuracy without pairs) as null: JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _policy_eval(args, prompts, policy, tokenizer, reward_judge, judge):
    """Sample the policy and the reference on ``prompts``: ``(PolicyEval, sampling settings)``."""
    import jax

    from jaxalign import models
    from jaxalign.eval.evaluate import evaluate_policy
    from jaxalign.rollout import SamplingParams

    if args.reference == args.policy:
        reference = policy
        print("note: --reference is the policy's model: it is sampled once, so the win rate is 0.5 and the KL 0",
              file=sys.stderr)
    else:
        reference, _ = models.load_pretrained(args.reference, source="--reference")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, n=args.n)
    evaluation = evaluate_policy(policy, reference, tokenizer, prompts, judge=judge,
                                 reward_judge=reward_judge, params=params, samples_per_prompt=args.n,
                                 key=jax.random.key(args.seed), batch_size=args.batch_size,
                                 progress=not args.no_progress, raw=args.raw, confidence=args.confidence)
    settings = {"prompts": str(args.prompts), "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                "top_p": args.top_p, "top_k": args.top_k, "n": args.n, "seed": args.seed}
    return evaluation, settings


def _perplexity(args, policy, tokenizer) -> dict:
    from jaxalign.eval.metrics import token_nll

    batches = _batches(args.eval_sft, tokenizer, args, ("sft",), "--eval-sft")
    total, count = token_nll(policy, batches)  # perplexity() is exp(total / count); the counts are reported too
    if count == 0:
        raise ValueError(f"--eval-sft {args.eval_sft}: no completion tokens to score")
    return {"sft_file": str(args.eval_sft), "perplexity": math.exp(total / count), "nll": total / count,
            "tokens": count}


def _write_outputs(directory: Path, report: dict, evaluation, extra: dict) -> None:
    from jaxalign.eval.judging import write_extra

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "eval.json").write_text(json.dumps(_json_safe(report), indent=2, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
    written = ["eval.json"]
    if evaluation is not None:
        evaluation.plot(directory / "eval.png")
        with (directory / "samples.jsonl").open("w", encoding="utf-8") as file:
            for record in evaluation.records:
                file.write(json.dumps(record, ensure_ascii=False) + "\n")
        written += ["eval.png", "samples.jsonl"]
    written += write_extra(directory, extra)
    print(f"wrote {', '.join(written)} to {directory}", file=sys.stderr)


def run_eval(args) -> int:
    """The ``jaxalign eval`` command: see the module docstring and docs/eval.md."""
    from jaxalign import data, models
    from jaxalign.eval import judging
    from jaxalign.eval.judges import load_reward_judge
    from jaxalign.eval.metrics import reward_accuracy

    _check_args(args)
    if judging.write_templates_if_asked(args):
        return 0
    # Bad prompts, benchmark files, templates, an unreachable judge: all fail before any model is loaded.
    prompts = None if args.prompts is None else data.read_prompt_file(args.prompts, option="--prompts")
    ready = judging.prepare(args)
    lines: list[str] = []
    extra: dict = {}
    report: dict = {"policy": args.policy or EMBEDDED, "reference": args.reference or EMBEDDED,
                    "reward_model": None if args.reward_model is None else str(args.reward_model)}
    reward_judge = reward_model = reward_tokenizer = None
    if args.reward_model is not None and (prompts is not None or args.pairs is not None):
        reward_judge, reward_model, reward_tokenizer = load_reward_judge(
            args.reward_model, dimension_weights=args.dimension_weights, batch_size=args.batch_size)
    policy = tokenizer = evaluation = None
    if prompts is not None or args.eval_sft is not None or args.benchmark is not None:
        policy, tokenizer = models.load_pretrained(args.policy, source="--policy")

    if prompts is not None:
        evaluation, report["sampling"] = _policy_eval(args, prompts, policy, tokenizer, reward_judge,
                                                      judging.gold_judge(ready))
        report["policy_eval"] = evaluation.to_dict()
        print(evaluation.table())
        judging.judge_samples(args, ready, evaluation, report, lines, extra)
    if args.benchmark is not None:
        if args.reference is None:
            report["reference"] = None
        report["sampling"] = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                              "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed}
        judging.run_benchmark(args, ready, policy, tokenizer, report, lines, extra)
    if lines:
        print("\n".join(lines))
    if args.pairs is not None:
        batches = _batches(args.pairs, reward_tokenizer, args, ("preference", "preference_group"), "--pairs")
        accuracy = reward_accuracy(reward_model, batches, min_margin=args.min_margin,
                                   dimensions=batches.dataset.dimensions or None)
        report["reward_accuracy"] = {"pairs_file": str(args.pairs), **accuracy}
        print(_format_accuracy(accuracy))
    if args.eval_sft is not None:
        report["perplexity"] = result = _perplexity(args, policy, tokenizer)
        print(f"perplexity: {result['perplexity']:.4g} (mean NLL {result['nll']:.4f} over {result['tokens']} tokens)")
    if args.output is not None:
        _write_outputs(args.output, report, evaluation, extra)
    return 0
