"""DPO on one 8-device mesh in two layouts, 1 process × 8 CPU devices and 4 processes × 2 (joined over loopback
with jax.distributed): the 4-process steps equal the 1-process ones to float32 rounding, and a checkpoint written
in either layout resumes in the other (docs/distributed.md)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.train.conftest import run_processes, run_script

MODULE = "tests.train.multiprocess_dpo_run"


def logged_losses(workdir) -> dict[int, float]:
    with open(workdir / "logs" / "metrics.jsonl") as file:
        return {record["step"]: record["loss"] for record in map(json.loads, file) if "loss" in record}


def params(workdir) -> dict[str, np.ndarray]:
    with np.load(workdir / "params.npz") as saved:
        return dict(saved)


def resume_from(source, step: int, workdir):
    """A copy of ``source``'s checkpoints up to ``step`` in ``workdir``: a run there resumes from ``step``."""
    for saved in (source / "checkpoints").iterdir():
        if not saved.name.isdigit() or int(saved.name) <= step:
            (shutil.copytree if saved.is_dir() else shutil.copy)(saved, workdir / "checkpoints" / saved.name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``one``: 1 process trains steps 1-4. ``four``: 4 processes resume ``one``'s step 2 and train 3-4.
    ``back``: 1 process resumes ``four``'s step 3 (written by 4 processes) and trains step 4."""
    one, four, back = (tmp_path_factory.mktemp(name) for name in ("one", "four", "back"))
    reports = {"one": [json.loads(run_script(MODULE, one, "--steps", "4", devices=8).stdout.splitlines()[-1])]}
    resume_from(one, 2, four)
    outputs = run_processes(MODULE, four, "--steps", "4", processes=4, devices=2)
    reports["four"] = [json.loads(stdout.splitlines()[-1]) for stdout in outputs]
    resume_from(four, 3, back)
    reports["back"] = [json.loads(run_script(MODULE, back, "--steps", "4", devices=8).stdout.splitlines()[-1])]
    return {"one": one, "four": four, "back": back}, reports


def test_both_layouts_build_the_same_mesh(runs):
    _, reports = runs
    for name, count, local in (("one", 1, 8), ("four", 4, 2), ("back", 1, 8)):
        assert [(r["process"], r["process_count"], r["local_devices"]) for r in reports[name]] == \
            [(index, count, local) for index in range(count)], name
        assert all(r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} for r in reports[name]), name
        # Every process ends at the same global data position: step 4's batch was the fourth.
        assert all(r["data_position"] == {"position": 4} for r in reports[name]), name


def test_four_processes_resume_one_and_step_as_it_does(runs):
    dirs, reports = runs
    one = logged_losses(dirs["one"])
    assert sorted(one) == [1, 2, 3, 4]
    assert one[1] == pytest.approx(np.log(2), abs=1e-6)  # the policy starts as its reference
    assert one[4] < one[1]
    four = logged_losses(dirs["four"])
    assert sorted(four) == [3, 4]  # resumed from the 1-process run's step 2
    np.testing.assert_allclose([four[3], four[4]], [one[3], one[4]], rtol=1e-5)
    assert all(r["saved_steps"] == [1, 2, 3, 4] for r in reports["four"])
    expected, got = params(dirs["one"]), params(dirs["four"])
    assert sorted(got) == sorted(expected)
    for name, value in got.items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_the_evaluation_on_the_mesh_is_the_same_in_every_layout(runs):
    """After training, the held-out pairs are evaluated on the training mesh with each process passing its own
    rows: every process of every layout reports the one global result (32 pairs), equal to float32 rounding."""
    _, reports = runs
    one = reports["one"][0]["eval"]
    assert one["examples"] == 32 and set(one) >= {"loss", "rewards/accuracies"}
    for name in ("four", "back"):
        for report in reports[name]:
            assert sorted(report["eval"]) == sorted(one), name
            for key, value in report["eval"].items():
                assert value == pytest.approx(one[key], rel=1e-5, abs=1e-6), (name, key)


def test_one_process_resumes_what_four_wrote(runs):
    dirs, _ = runs
    assert sorted(logged_losses(dirs["back"])) == [4]
    np.testing.assert_allclose(logged_losses(dirs["back"])[4], logged_losses(dirs["one"])[4], rtol=1e-5)
    expected, got = params(dirs["one"]), params(dirs["back"])
    for name, value in got.items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
