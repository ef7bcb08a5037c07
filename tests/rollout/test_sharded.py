"""Rollouts on an 8-device CPU mesh (a subprocess): the same tokens and log-probabilities as on one device, for
plain and guided sampling with the rows split over ``data`` × ``fsdp``, and for a serving engine's rows
(``ContinuousEngine(mesh=...)``, what ``jaxalign serve --mesh`` runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import host_devices_env

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report() -> dict:
    env = host_devices_env(8, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "tests.rollout.sharded_check"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"sharded_check exited with {result.returncode}\n{result.stdout}\n{result.stderr[-6000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["plain", "guided"])
def test_sharded_rollout_equals_the_single_device_one(report, kind):
    assert report["devices"] == 8
    assert report[kind]["tokens_equal"] and report[kind]["lengths_equal"]
    # Tensor-parallel matmuls sum in another order: float32 rounding, ~1e-6 relative on log-probs of ~-5.
    for field in ("sampling_logps", "model_logps", "guide_logps"):
        assert report[kind][f"max_{field}_difference"] <= 5e-5, field
    assert report[kind]["mean_length"] > 1, "rows generate several tokens, so later steps are compared too"


def test_rows_are_split_over_data_and_fsdp(report):
    assert report["layout"] == {"tokens": "P(('data', 'fsdp'),)", "devices": 8}


def test_served_rows_on_a_mesh_equal_the_single_device_ones(report):
    served = report["continuous"]
    assert served["same_rows"] and len(served["rows"]) == 10
    assert served["tokens_equal"], "greedy, seeded, guided, joined and burst rows give the same tokens"
    assert served["max_logprob_difference"] <= 5e-5
    assert served["joined"] == [3, 3], "the three short prompts joined decode steps on both"
    assert served["tokens"] > 60


def test_a_warm_engine_on_a_mesh_compiles_nothing_while_serving(report):
    # Every cache part keeps one sharding whatever program wrote it, so no program meets new argument shardings.
    assert report["continuous"]["compiled_after_warm_up"] == []


def test_the_served_cache_splits_rows_over_data_and_fsdp_and_kv_heads_over_tensor(report):
    assert report["continuous"]["cache_layout"] == {"keys": "P(('data', 'fsdp'), 'tensor')",
                                                    "values": "P(('data', 'fsdp'), 'tensor')",
                                                    "valid": "P(('data', 'fsdp'),)"}
