"""Progress bars say what they count: ``jaxalign train <method>`` as a user runs it (the console script, relative
paths, another working directory, the default progress bar) shows the method's name, the steps done of the total
and the last loss."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.conftest import python_env

LOSS = r"loss=([0-9.e+-]+)(, tok/s=[0-9.e+-]+)?\]$"
PAIRS = [("Hi", "sky blue .", "Go away ."), ("sky ?", "blue .", "away"), ("Go", "Hi .", "away away ."),
         ("Hi ?", "blue sky", "Go away")]


def bar_lines(stderr: str) -> list[str]:
    """The states a terminal showed in turn: tqdm redraws its line after a carriage return."""
    return [part.strip() for part in re.split(r"[\r\n]", stderr) if part.strip()]


def test_train_bar_names_the_method_and_shows_the_loss(checkpoint, tmp_path):
    method = "sft"
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    os.symlink(checkpoint, work / "tiny")
    (work / "data" / "pairs.jsonl").write_text(
        "".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS))
    command = [str(Path(sys.executable).parent / "jaxalign"), "train", method, "--config", "sentiment",
               "model.path=tiny", "data.source=data/pairs.jsonl", f"output_dir=runs/{method}", "data.batch_size=2",
               "data.max_length=32", "train.total_steps=3", "train.log.tensorboard=false", "eval_data=null"]
    done = subprocess.run(command, cwd=work, env=python_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = bar_lines(done.stderr)
    # e.g. "sft: 100%|██████████| 3/3 [00:37<00:00, 12.52s/step, loss=5.224, tok/s=548]"
    final = [line for line in lines if re.match(rf"{method}: 100%\|.*\| 3/3 \[.*step.*, {LOSS}", line)]
    assert final, f"no final '{method}: ... 3/3 ... loss=' bar in:\n" + "\n".join(lines[-20:])
    logged = [json.loads(line)["loss"] for line in (work / "runs" / method / "metrics.jsonl").read_text().splitlines()]
    shown = float(re.search(LOSS, final[-1]).group(1))
    assert shown == pytest.approx(logged[-1], rel=1e-3)  # the bar's loss is the last logged one


def test_the_bar_counts_the_unit_it_is_given(capfd):
    """An online method's step is an iteration (rollout, scoring, minibatch epochs): the bar says so."""
    from jaxalign.train import LogConfig
    from jaxalign.train.metrics import MetricsLogger

    logger = MetricsLogger(LogConfig(directory=None), total_steps=2, start_step=0, description="ppo",
                           unit="iteration")
    for step in (1, 2):
        logger.log(step, {"loss": 0.5 / step})
        logger.advance()
    logger.close()
    lines = bar_lines(capfd.readouterr().err)
    assert any(re.match(r"ppo: 100%\|.*\| 2/2 \[.*iteration.*, loss=0.25\]$", line) for line in lines), lines
