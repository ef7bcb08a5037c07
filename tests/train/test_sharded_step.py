"""With 8 CPU devices (a subprocess): one step function on one device and on a (fsdp=2, tensor=4) mesh gives
the same losses and parameters, every device holds only its block of the parameters, of the optimizer
state and of the frozen reference model, and on an fsdp=8 mesh each device holds the activations of its own rows
only."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.train.conftest import run_script


@pytest.fixture(scope="module")
def report() -> dict:
    result = run_script("tests.train.sharded_step_check", devices=8)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_sharded_step_equals_the_single_device_step(report):
    sharded, one_device = report["fsdp2_tensor4"], report["one_device"]
    np.testing.assert_allclose(sharded["loss"], one_device["loss"], rtol=1e-6)
    np.testing.assert_allclose(sharded["grad_norm"], one_device["grad_norm"], rtol=1e-5)
    assert sharded["max_param_difference"] < 1e-6


@pytest.mark.parametrize(("mesh", "block"), [("one_device", [2, 32, 32]), ("fsdp2_tensor4", [2, 16, 8])])
def test_each_device_holds_its_block(report, mesh, block):
    # q_proj kernel [L=2, D=32, H·Dh=32], stacked layers unsplit, D over fsdp, heads over tensor.
    devices = 1 if mesh == "one_device" else 8
    for name in ("q_proj", "q_proj_momentum"):
        assert report[mesh][name] == {"spec": "P(None, 'fsdp', 'tensor')", "shard_shapes": [block],
                                      "devices": devices, "blocks_match": True}, name
    assert report[mesh]["ref_q_proj_spec"] == "P(None, 'fsdp', 'tensor')"


def test_fsdp_devices_hold_the_activations_of_their_own_rows(report):
    # Without the models' row constraint (jaxalign.models.activation_sharding) XLA regathered the activations
    # and every device held all eight rows': 4.9x the one-row step's temporaries.
    temporaries = report["temporaries"]
    assert temporaries["fsdp8_eight_rows"] < 1.25 * temporaries["one_device_one_row"], temporaries
