"""``jaxalign train sft|distill|reward|dpo|kto|ppo|grpo|tfpo``: one training run from a preset or YAML file plus
overrides.

    jaxalign train dpo --config hh_rlhf data.source=hh/train.jsonl.gz train.total_steps=500
    jaxalign train distill --config hh_rlhf data.source=hh/train.jsonl.gz model.path=small/ teacher=big/  # GKD
    jaxalign train kto --config feedback.yaml data.source=thumbs.jsonl  # unpaired prompt/completion/label records
    jaxalign train ppo --config sentiment_ppo reward.model=runs/sentiment/reward/export
    jaxalign train reward --config my_run.yaml --resume
    jaxalign train tfpo --config pku_saferlhf data.source=pku/train.jsonl     # one LLMDoctor doctor per dimension
    jaxalign train sft --config sentiment --print-config         # the resolved config, nothing trained

A run resumes from ``<output_dir>/checkpoints`` only with ``--resume``. Without it an output directory that
holds anything is refused before any work, so nothing a user made is rewritten; ``--overwrite`` replaces it.
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxalign.methods.recipe import METHODS


def add_train_command(subcommands) -> None:
    parser = subcommands.add_parser(
        "train", help="train an SFT, distilled (from a teacher), reward, DPO, KTO, PPO, GRPO model or a TFPO doctor "
                      "from a preset or YAML config",
        description="Train with a named preset (shipped presets: hh_rlhf, pku_saferlhf, sentiment, weak_to_strong, "
                    "sentiment_ppo, sentiment_grpo) or a YAML "
                    "file; key=value overrides use dotted paths (train.total_steps=100, loss.beta=0.05, "
                    "model.lora='{rank: 8, alpha: 16}'). Outputs: checkpoints, metrics.jsonl/.png, TensorBoard "
                    "events, eval.json and a Hugging Face export in output_dir.")
    parser.add_argument("method", choices=METHODS)
    parser.add_argument("--config", required=True, help="a preset name or a YAML file")
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument("--resume", action="store_true", help="continue from the checkpoints in output_dir")
    runs.add_argument("--overwrite", action="store_true",
                      help="replace what output_dir holds (by default a non-empty output_dir is refused)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.set_defaults(run=run_train)


def run_train(args) -> int:
    import dataclasses

    from jaxalign.methods import pipeline, recipe, tfpo

    config = recipe.load_run_config(args.config, args.overrides, method=args.method)
    config = dataclasses.replace(config, train=dataclasses.replace(
        config.train, checkpoint=dataclasses.replace(config.train.checkpoint, resume=args.resume)))
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    result = pipeline.run(config, overwrite=args.overwrite)
    out = Path(config.output_dir)
    print(f"trained {args.method} for {config.train.total_steps} steps: {out}")
    for name, value in sorted(result.eval_metrics.items()):
        print(f"  eval {name}: {value:.4g}")
    doctors = result.extra.get("doctors") if args.method == "tfpo" else None
    if doctors:  # one run per dimension, each in a directory of its own
        print(f"  doctors: {out / tfpo.INDEX_FILE}")
        for dimension, export in doctors.items():
            run_dir = Path(next(c.output_dir for c in tfpo.per_dimension(config)
                                if c.doctor.dimensions == (dimension,)))
            print(f"  {dimension}: export {export or 'none (export: false)'}; metrics {run_dir / 'metrics.jsonl'} "
                  f"(plot: {run_dir / 'metrics.png'})")
        return 0
    if result.export_dir is not None:
        print(f"  export: {result.export_dir}")
    # a run's own metrics, or its stages' (critique: <out>/sft/, <out>/dpo/)
    for metrics in sorted(out.glob("metrics.jsonl")) or sorted(out.glob("*/metrics.jsonl")):
        print(f"  metrics: {metrics} (plot: {metrics.with_suffix('.png')})")
    return 0


def add_show_rewards_command(subcommands) -> None:
    parser = subcommands.add_parser(
        "show-rewards", help="show LLMDoctor token rewards: each response token coloured by its reward",
        description="Print pairs of a token-reward cache (written by `jaxalign train tfpo` into "
                    "<output_dir>/token_rewards/<split>, or <output_dir>/<dimension>/token_rewards/<split>) with every "
                    "response token coloured by its reward (green: positive on the chosen response; red: negative on "
                    "the rejected one), or write them as an HTML page.")
    parser.add_argument("cache", type=Path, help="a token-reward cache directory")
    parser.add_argument("--index", type=int, action="append", help="pair to show (repeatable; default: the first 3)")
    parser.add_argument("--html", type=Path, help="write the pairs as a self-contained HTML page here")
    parser.add_argument("--no-colour", action="store_true", help="mark rewards as [token|+0.42] instead of colours")
    parser.set_defaults(run=run_show_rewards)


def run_show_rewards(args) -> int:
    import sys

    from jaxalign.methods.token_rewards import load_cache, render_html, render_terminal

    pairs, tokenizer, meta = load_cache(args.cache)
    indices = args.index or list(range(min(3, len(pairs))))
    bad = [i for i in indices if not 0 <= i < len(pairs)]
    if bad:
        raise ValueError(f"--index {bad[0]}: the cache {args.cache} holds pairs 0..{len(pairs) - 1}")
    chosen = [pairs[i] for i in indices]
    if args.html is not None:
        args.html.parent.mkdir(parents=True, exist_ok=True)
        args.html.write_text(render_html(tokenizer, chosen, title=f"token rewards: {args.cache}"))
        print(f"wrote {len(chosen)} pair(s) to {args.html}", file=sys.stderr)
        return 0
    face = meta["key"]["face"]
    print(f"{len(pairs)} pairs; faces: + {face['positive']!r} / - {face['negative']!r}")
    for index, pair in zip(indices, chosen, strict=True):
        print(f"\n=== pair {index}")
        print(render_terminal(tokenizer, pair, colour=not args.no_colour and sys.stdout.isatty()))
    return 0
