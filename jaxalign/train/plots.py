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


def plot_metrics(path: str | Path, png: str | Path, *, keys: Sequence[str] | None = None, title: str = "") -> Path | None:
    """Plot each metric against the step in a grid of panels; returns the PNG path (None without records)."""
    path = Path(path)
    if not path.is_file():
        return None
    records = [r for r in read_metrics(path) if "step" in r]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = [k for k in records[-1] if k != "step" and isinstance(records[-1][k], (int, float))
               and not isinstance(records[-1][k], bool)]
    if keys is None:
        keys = [k for k in PREFERRED if k in numeric] + [k for k in numeric if k not in PREFERRED]
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
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(png, dpi=110)
    plt.close(figure)
    return Path(png)
