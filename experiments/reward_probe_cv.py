"""Cross-validated accuracy of the reward-model probe: last-token vs mean pooling, over ``probe_l2``.

    python -m experiments.reward_probe_cv [--pairs runs/sentiment/pairs_train.jsonl] [--folds 5]

Takes the main job's training pairs (``python -m experiments.sentiment`` writes them), computes the base
model's pooled trunk features once per pooling (:func:`jaxalign.methods.probe.pooled_features`, the
``sentiment`` preset's data settings), then for each ``probe_l2`` fits the probe
(:func:`jaxalign.methods.probe.fit_reward_probe`, the preset's Bradley–Terry loss) on all folds but one and
counts the pairs of the held-out fold it orders as the gold judge did. Prints a table and writes
``<output>.json`` and ``<output>.png`` (accuracy against ``probe_l2``, one line per pooling).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from flax import nnx

from jaxalign import data as jdata
from jaxalign import models
from jaxalign.methods import common, probe, recipe, reward

PENALTIES = (0.01, 0.03, 0.1, 0.3, 1.0)


def fold_accuracy(model, objective, features: dict, folds: list[np.ndarray], l2: float) -> float:
    """Mean held-out-fold accuracy of the probe fitted on the other folds."""
    correct = 0
    for held_out in folds:
        train = np.setdiff1d(np.arange(len(features["features"])), held_out)
        probe.fit_reward_probe(model, objective, {k: v[train] for k, v in features.items()}, l2=l2,
                               max_iterations=500)  # warns if it does not converge
        rewards = np.asarray(model.reward_head.project(features["features"][held_out]))  # [n, 2]
        correct += int(np.sum(rewards[:, 0] > rewards[:, 1]))
    return correct / sum(len(f) for f in folds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=Path, default=Path("runs/sentiment/pairs_train.jsonl"))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path("experiments/results/reward_probe_cv"))
    args = parser.parse_args(argv)
    if not args.pairs.is_file():
        parser.error(f"{args.pairs}: not found; run `python -m experiments.sentiment` first (it writes the pairs)")
    config = recipe.load_run_config("sentiment", [f"data.source={args.pairs}"], method="reward")
    lm, tokenizer = models.load_gguf(models.default_model_path())
    dataset = jdata.build_dataset(config.data, tokenizer)
    options = config.loss.objective_options()
    objective = reward.reward_objective(**options)
    order = np.random.default_rng(0).permutation(len(dataset))
    folds = np.array_split(order, args.folds)
    results = {}
    for pooling in ("last", "mean"):
        model = models.RewardModel(lm, pooling=pooling, rngs=nnx.Rngs(0))
        features = probe.pooled_features(model, common.one_pass(config.data, dataset), total=len(dataset))
        results[pooling] = {str(l2): fold_accuracy(model, objective, features, folds, l2) for l2 in PENALTIES}
    print(f"\n{args.folds}-fold accuracy of the probe on {len(dataset)} pairs ({args.pairs})")
    print(f"{'probe_l2':>10}" + "".join(f"{p:>10}" for p in results))
    for l2 in PENALTIES:
        print(f"{l2:>10g}" + "".join(f"{results[p][str(l2)]:>10.1%}" for p in results))
    summary = {"pairs": str(args.pairs), "examples": len(dataset), "folds": args.folds,
               "loss": options, "accuracy": results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(results, args.output.with_suffix(".png"), f"{args.folds}-fold accuracy, {len(dataset)} pairs")
    print(f"wrote {args.output.with_suffix('.json')} and {args.output.with_suffix('.png')}")
    return 0


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.4))
    for pooling, by_l2 in results.items():
        axis.plot(PENALTIES, [by_l2[str(l2)] for l2 in PENALTIES], marker="o", label=f"{pooling} pooling")
    axis.axhline(0.7, color="#c44e52", ls=":", lw=1, label="target 0.7 (held out)")
    axis.set_xscale("log")
    axis.set_xlabel("probe_l2")
    axis.set_ylabel("held-out fold accuracy")
    axis.set_ylim(0.5, 1.0)
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    raise SystemExit(main())
