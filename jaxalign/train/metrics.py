"""Metrics sinks (JSONL, TensorBoard, Weights & Biases), throughput, and the console progress bar.

Only process 0 writes. ``<log dir>/metrics.jsonl`` holds one JSON object per logged step
(``{"step": 12, "loss": 2.31, ...}``; non-finite values are written as ``null``). When a run resumes
from step ``k``, records after ``k`` (logged before the interruption but after the checkpoint, so about
to be recomputed) are dropped, and the file reads as if the run had never stopped; an unreadable last line
(a record cut short when the job was killed) is dropped with a warning.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
import warnings
from collections.abc import Mapping
from typing import Any

import jax
from tqdm.auto import tqdm

from jaxalign.train.config import LogConfig
from jaxalign.train.tensorboard import EventFileWriter

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"


def _plain(value: Any) -> float | int | bool | None:
    """A JSON-ready Python scalar; NaN/inf become None (JSON has no spelling for them)."""
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlSink:
    def __init__(self, path: str, *, keep_through_step: int):
        if os.path.exists(path):
            with open(path) as file:
                lines = [line for line in file if line.strip()]
            kept = []
            for number, line in enumerate(lines, 1):
                try:
                    step = json.loads(line)["step"]
                except (ValueError, KeyError, TypeError) as error:
                    if number == len(lines):
                        # A job killed while writing leaves half a record: it is dropped, not fatal.
                        warnings.warn(f"{path}: dropping the unreadable last line {number} ({error}): a record "
                                      "cut short when the previous run stopped", stacklevel=3)
                        break
                    raise ValueError(f"{path}, line {number}: not a metrics record ({error}); "
                                     "fix or move the file to resume") from None
                if step <= keep_through_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            partial = f"{path}.tmp"
            with open(partial, "w") as file:
                file.writelines(kept)
            os.replace(partial, path)
        self._file = open(path, "a")

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    def __init__(self, directory: str):
        self._writer = EventFileWriter(directory)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        scalars = {name: float(value) for name, value in metrics.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        self._writer.add_scalars(step, scalars)

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """A W&B run; with a log directory its id is kept there, so a resumed job continues the same run."""

    def __init__(self, config: LogConfig, run_config: Mapping[str, Any]):
        try:
            import wandb
        except ImportError:
            raise ImportError("LogConfig.wandb_project is set but wandb is not installed (pip install wandb)") from None
        run_id = None
        if config.directory is not None:
            id_path = os.path.join(config.directory, WANDB_ID_FILE)
            if not os.path.exists(id_path):
                with open(id_path, "w") as file:
                    file.write(uuid.uuid4().hex[:16])
            with open(id_path) as file:
                run_id = file.read().strip()
        self._run = wandb.init(project=config.wandb_project, name=config.wandb_run_name, config=dict(run_config),
                               dir=config.directory, id=run_id, resume="allow")

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        self._run.log(dict(metrics), step=step)

    def close(self) -> None:
        self._run.finish()


class Throughput:
    """Step time and tokens per second, averaged over the steps since the last report."""

    def __init__(self):
        self._last = time.perf_counter()
        self._seconds, self._tokens, self._steps = 0.0, 0.0, 0

    def step_done(self, tokens: float | None) -> None:
        now = time.perf_counter()
        self._seconds += now - self._last
        self._last = now
        self._steps += 1
        self._tokens += tokens or 0.0

    def report(self) -> dict[str, float]:
        """``step_time`` (seconds) and, when tokens were counted, ``tokens_per_second``; then resets."""
        report = {"step_time": self._seconds / max(self._steps, 1)}
        if self._tokens:
            report["tokens_per_second"] = self._tokens / max(self._seconds, 1e-9)
        self._seconds, self._tokens, self._steps = 0.0, 0.0, 0
        return report


class MetricsLogger:
    """Sends each logged step's metrics to every configured sink and drives the progress bar.

    The bar reads ``dpo:  24%|██▍       | 120/500 [01:40<05:17, 1.20step/s, loss=0.6931]``: what is trained, the
    steps done of the run's total, and the last logged loss (and tokens per second when counted).

    Args:
        config: which sinks.
        total_steps: the run's length (the progress bar's total, for rate and ETA).
        start_step: the step the run starts from (0, or the restored step).
        run_config: recorded as the W&B run config.
        description: the bar's label: what is being trained (``"sft"``, ``"tfpo safety"``).
        unit: what one step is (``"step"``; ``"iteration"`` for an online method's rollout and updates).
    """

    def __init__(self, config: LogConfig, *, total_steps: int, start_step: int,
                 run_config: Mapping[str, Any] | None = None, description: str = "train", unit: str = "step"):
        self._sinks: list[Any] = []
        self._progress = None
        if jax.process_index() != 0:
            return
        if config.directory is not None:
            os.makedirs(config.directory, exist_ok=True)
            self._sinks.append(JsonlSink(os.path.join(config.directory, METRICS_FILE), keep_through_step=start_step))
            if config.tensorboard:
                self._sinks.append(TensorBoardSink(os.path.join(config.directory, TENSORBOARD_DIR)))
        if config.wandb_project is not None:
            self._sinks.append(WandbSink(config, run_config or {}))
        self._progress = tqdm(total=total_steps, initial=start_step, desc=description, unit=unit, dynamic_ncols=True,
                              disable=not config.progress_bar)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        plain = {name: _plain(value) for name, value in metrics.items()}
        for sink in self._sinks:
            sink.write(step, plain)
        if self._progress is not None:
            postfix = {"loss": f"{plain['loss']:.4g}" if plain.get("loss") is not None else "nan"}
            if plain.get("tokens_per_second") is not None:
                postfix["tok/s"] = f"{plain['tokens_per_second']:.3g}"
            self._progress.set_postfix(postfix, refresh=False)

    def advance(self) -> None:
        """One more step done (the progress bar's rate and ETA)."""
        if self._progress is not None:
            self._progress.update(1)

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()
        if self._progress is not None:
            self._progress.close()
