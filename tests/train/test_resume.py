"""Resume exactness: 20 steps straight versus 10 steps, SIGTERM (the run saves and exits) and a resumed 10
steps: identical loss curves and parameters (bit for bit: same program, same inputs)."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import numpy as np
import pytest

from tests.train.conftest import ROOT, python_env, run_script, script_command
from tests.train.resume_run import PAUSED_FILE, SIGNALLED_FILE, TOTAL_STEPS

CURVES = ("loss", "grad_norm", "nll", "learning_rate")


def logged(workdir) -> list[dict]:
    with open(workdir / "logs" / "metrics.jsonl") as file:
        return [json.loads(line) for line in file]


def saved_steps(workdir) -> list[int]:
    return sorted(int(path.name) for path in (workdir / "checkpoints").iterdir() if path.name.isdigit())


def terminate_during_step(workdir, step: int, timeout: float = 300) -> subprocess.CompletedProcess:
    """Start the run, send SIGTERM while it fetches the batch of ``step`` (see resume_run's --pause-at), and
    wait for it to exit."""
    workdir.mkdir()
    with open(workdir / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(script_command("tests.train.resume_run", workdir, "--pause-at", step),
                                   cwd=ROOT, env=python_env(), stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + timeout
        while not (workdir / PAUSED_FILE).exists():
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                output = (workdir / "stderr.txt").read_text()[-4000:]
                pytest.fail(f"the run ended or stalled before step {step}: {output}")
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        (workdir / SIGNALLED_FILE).touch()
        process.wait(timeout=120)
    return process


def test_killed_then_resumed_run_equals_the_straight_run(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    run_script("tests.train.resume_run", straight)

    process = terminate_during_step(interrupted, 10)
    assert process.returncode == 128 + signal.SIGTERM
    # A checkpoint every 4 steps, the last 2 kept: step 8, and step 10 which the signal asked for.
    assert saved_steps(interrupted) == [8, 10]
    assert [record["step"] for record in logged(interrupted)] == list(range(1, 11))
    assert not (interrupted / "final_params.npz").exists()

    run_script("tests.train.resume_run", interrupted)
    expected, resumed = logged(straight), logged(interrupted)
    assert [record["step"] for record in resumed] == list(range(1, TOTAL_STEPS + 1))
    for name in CURVES:
        assert [record[name] for record in resumed] == [record[name] for record in expected], name
    with np.load(straight / "final_params.npz") as want, np.load(interrupted / "final_params.npz") as got:
        assert sorted(got) == sorted(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
