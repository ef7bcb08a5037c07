"""``jaxalign train sft|reward|dpo|ppo|grpo``: one training run from a preset or YAML file plus overrides.

    jaxalign train dpo --config hh_rlhf data.source=hh/train.jsonl.gz train.total_steps=500
    jaxalign train ppo --config sentiment_ppo reward.model=runs/sentiment/reward/export
    jaxalign train reward --config my_run.yaml --resume
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
        "train", help="train an SFT, reward, DPO, PPO or GRPO model from a preset or YAML config",
        description="Train with a named preset (shipped presets: hh_rlhf, pku_saferlhf, sentiment, "
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

    from jaxalign.methods import pipeline, recipe

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
    if result.export_dir is not None:
        print(f"  export: {result.export_dir}")
    print(f"  metrics: {out / 'metrics.jsonl'} (plot: {out / 'metrics.png'})")
    return 0
