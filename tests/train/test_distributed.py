"""Multi-host settings from flags or the environment, and the single-process paths of the host collectives
(the two-process job itself is tests/train/test_multiprocess.py)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import jax
import pytest

from jaxalign.train import add_distributed_arguments, any_process, gather_from_processes, initialize_distributed
from jaxalign.train.distributed import distributed_settings
from tests.train.conftest import ROOT, python_env

ENVIRONMENT = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}


def test_settings_come_from_the_environment_unless_given():
    assert distributed_settings(environ=ENVIRONMENT) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                                         "process_id": 2}
    assert distributed_settings(num_processes=8, process_id=0, environ=ENVIRONMENT) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 8, "process_id": 0}
    assert distributed_settings(environ={}) == dict.fromkeys(("coordinator_address", "num_processes", "process_id"))
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='first' is not an int"):
        distributed_settings(environ={"JAX_PROCESS_ID": "first"})


def test_flags():
    parser = add_distributed_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--coordinator-address", "127.0.0.1:99", "--num-processes", "2", "--process-id", "1"])
    assert (args.coordinator_address, args.num_processes, args.process_id) == ("127.0.0.1:99", 2, 1)


def test_nothing_set_stays_single_process():
    assert not initialize_distributed(environ={})
    assert not jax.distributed.is_initialized() and jax.process_count() == 1


def test_host_collectives_on_one_process():
    assert any_process(True) and not any_process(False)
    assert gather_from_processes({"position": 3}) == [{"position": 3}]


def test_importing_jaxalign_leaves_the_backend_unstarted():
    """``jax.distributed.initialize`` must come before the backend starts: a script that imports any jaxalign
    module first (as every launch recipe's does) can still join a multi-process job."""
    script = """
import importlib, pkgutil, sys
import jax._src.xla_bridge as xla_bridge
import jaxalign

def started(*args, **kwargs):
    raise SystemExit(f"the JAX backend started while importing {current}")

xla_bridge.backends = started
for current in [module.name for module in pkgutil.walk_packages(jaxalign.__path__, "jaxalign.")]:
    importlib.import_module(current)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=python_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
