"""PNG plots of a run's metrics (``metrics.jsonl``): the curves people look at, beside the numbers."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

# What each method's plot shows first (when logged); other scalar metrics fill the remaining panels.
PREFERRED = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "grad_norm",
             "learning_rate", "tokens_per_s")
MAX_PANELS = 8


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file (unreadable lines are skipped, as the logger writes whole lines)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on training machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, png: str | Path, title: str) -> Path:
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(png, dpi=110)
    _pyplot().close(figure)
    return Path(png)


def plot_metrics(path: str | Path, png: str | Path, *, keys: Sequence[str] | None = None,
                 title: str = "") -> Path | None:
    """Plot each metric against the step in a grid of panels; returns the PNG path (None without records)."""
    path = Path(path)
    if not path.is_file():
        return None
    records = [r for r in read_metrics(path) if "step" in r]
    if not records:
        return None
    plt = _pyplot()

    numeric = [k for k in records[-1] if k != "step" and isinstance(records[-1][k], (int, float))
               and not isinstance(records[-1][k], bool)]
    if keys is None:
        keys = [k for k in PREFERRED if k in numeric] + [k for k in numeric if k not in PREFERRED]
    else:  # the requested panels this run logged (a GRPO run has no value loss)
        keys = [k for k in keys if k in numeric]
    keys = list(keys)[:MAX_PANELS]
    columns = min(4, len(keys))
    rows = math.ceil(len(keys) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.8 * rows), squeeze=False)
    for axis, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            steps, values = zip(*points)
            axis.plot(steps, values, lw=1.2)
        axis.set_title(key, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(keys):]:
        axis.axis("off")
    return _save(figure, png, title)


def plot_reward_vs_kl(path: str | Path, png: str | Path, *, title: str = "", kl_key: str = "kl",
                      rewards: Sequence[tuple[str, str]] = (("gold_reward", "gold reward"), ("reward", "proxy reward")),
                      ) -> Path | None:
    """An online run's rewards against the iteration and against the KL to the reference.

    The right panel is the over-optimisation picture (Gao et al. 2022, arXiv 2210.10760): the proxy reward
    the policy optimises keeps rising with KL while the gold reward flattens or falls. The two rewards have
    their own scales, so each has its own y axis (left: the first, right: the second).
    Returns the PNG path, or None when the run logged no KL.
    """
    path = Path(path)
    if not path.is_file():
        return None
    records = [r for r in read_metrics(path) if isinstance(r.get(kl_key), (int, float))]
    present = [(key, label) for key, label in rewards if any(isinstance(r.get(key), (int, float)) for r in records)]
    if not records or not present:
        return None
    plt = _pyplot()

    figure, (by_step, by_kl) = plt.subplots(1, 2, figsize=(10, 3.6))
    for index, (key, label) in enumerate(present):
        points = [(r["step"], r[kl_key], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        steps, kls, values = zip(*points)
        colour = f"C{index}"
        step_axis = by_step if index == 0 else by_step.twinx()
        kl_axis = by_kl if index == 0 else by_kl.twinx()
        step_axis.plot(steps, values, color=colour, lw=1.2, label=label)
        step_axis.set_ylabel(label, color=colour, fontsize=9)
        kl_axis.plot(kls, values, color=colour, lw=0.8, alpha=0.5)
        kl_axis.scatter(kls, values, color=colour, s=10, label=label)
        kl_axis.set_ylabel(label, color=colour, fontsize=9)
    by_step.set_xlabel("iteration", fontsize=9)
    by_kl.set_xlabel("KL(policy || reference), nats per response", fontsize=9)
    by_step.set_title("reward over training", fontsize=10)
    by_kl.set_title("reward against KL", fontsize=10)
    for axis in (by_step, by_kl):
        axis.grid(alpha=0.3)
    return _save(figure, png, title)
