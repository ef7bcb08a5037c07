"""Two processes on this machine, 4 CPU devices each, joined with jax.distributed.initialize over loopback:
a sharded step over both processes' devices with per-process data, checkpoints written by both and restored
by both (each its own data position), compared with the same steps on one device in this process."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxalign.train import TrainStep, make_optimizer
from tests.train.conftest import run_processes
from tests.train.multiprocess_run import CONFIG
from tests.train.tiny import BATCH, TinyBatches, host_params, sft_objective, tiny_model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("multiprocess")
    outputs = run_processes("tests.train.multiprocess_run", workdir, processes=2, devices=4)
    reports = [json.loads(stdout.strip().splitlines()[-1]) for stdout in outputs]
    with open(workdir / "logs" / "metrics.jsonl") as file:
        logged = [json.loads(line) for line in file]
    with np.load(workdir / "final_params.npz") as final:
        params = dict(final)
    return reports, logged, params


def test_both_processes_train_one_model_on_all_eight_devices(run):
    reports, logged, params = run
    for index, report in enumerate(reports):
        assert report["process"] == index and report["process_count"] == 2
        assert (report["devices"], report["local_devices"]) == (8, 4)
        assert report["mesh"] == {"data": 2, "fsdp": 1, "tensor": 4}
    assert [record["step"] for record in logged] == [1, 2, 3]
    sharded_losses = [record["loss"] for record in logged] + [reports[0]["step_4_loss"]]
    assert reports[1]["step_4_loss"] == reports[0]["step_4_loss"]
    # Each process fed half of every batch: the steps equal whole-batch steps on this process's one device.
    step = TrainStep(sft_objective, tiny_model(), make_optimizer(CONFIG["optimizer"], total_steps=4),
                     micro_batches=CONFIG["micro_batches"])
    state, losses, whole_batches = step.init(0), [], TinyBatches(BATCH)
    for _ in range(4):
        state, metrics = step(state, next(whole_batches))
        losses.append(float(jax.device_get(metrics["loss"])))
    np.testing.assert_allclose(sharded_losses, losses, rtol=1e-6)
    expected = host_params(state)
    assert sorted(params) == sorted(expected)
    for name, value in params.items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_checkpoints_are_written_and_restored_across_processes(run):
    reports, _, _ = run
    for index, report in enumerate(reports):
        assert report["saved_steps"] == [2, 3]
        assert report["restored_step"] == 3 and report["restored_equals_saved"]
        assert report["restored_position"] == {"position": 3, "shard_index": index}
