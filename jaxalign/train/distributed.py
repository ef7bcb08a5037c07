"""Multi-host wiring: ``jax.distributed.initialize`` from flags or the environment, and host agreement.

Every process of a multi-host job runs the same script. Before it touches any device it calls
:func:`initialize_distributed` (or :func:`initialize_from_args` after parsing
:func:`add_distributed_arguments`' flags), which joins the processes through the coordinator. From then
on ``jax.devices()`` lists the devices of every process, meshes span them, and each process feeds its own
rows of every batch (:func:`jaxalign.train.mesh.shard_batch`).

Decisions taken on the host (stop on a signal, what each process's data iterator has read) must be the
same on every process, or the processes stop at different steps and the collectives hang;
:func:`any_process` and :func:`gather_from_processes` make them so.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

# Flag value > environment variable. JAX_COORDINATOR_ADDRESS is also the name JAX itself reads.
ENVIRONMENT = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}


def distributed_settings(*, coordinator_address: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None,
                         environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Coordinator address, process count and index: each from its argument, else its environment variable.

    Returns:
        a dict with the three keys; a value neither given nor in the environment is None.

    Raises:
        ValueError: an environment variable that should be an int is not.
    """
    settings = {"coordinator_address": coordinator_address, "num_processes": num_processes,
                "process_id": process_id}
    for name, variable in ENVIRONMENT.items():
        if settings[name] is None and environ.get(variable):
            value = environ[variable]
            if name != "coordinator_address":
                try:
                    value = int(value)
                except ValueError:
                    raise ValueError(f"environment variable {variable}={value!r} is not an int") from None
            settings[name] = value
    return settings


def initialize_distributed(*, coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, auto_detect: bool = False,
                           environ: Mapping[str, str] = os.environ) -> bool:
    """Join this process to a multi-process JAX job, or do nothing for a single-process run.

    Call it first, before any JAX computation. With none of the three settings given (as arguments or
    through ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``) and
    ``auto_detect=False`` the run stays single-process. ``auto_detect=True`` lets JAX read the cluster
    (SLURM, Open MPI, Kubernetes, Cloud TPU) for whatever is missing.

    Returns:
        True when the process is part of a distributed job (also when it already was).
    """
    if jax.distributed.is_initialized():
        return True
    settings = distributed_settings(coordinator_address=coordinator_address, num_processes=num_processes,
                                    process_id=process_id, environ=environ)
    if all(value is None for value in settings.values()) and not auto_detect:
        return False
    jax.distributed.initialize(**settings)
    return True


def add_distributed_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--coordinator-address``, ``--num-processes`` and ``--process-id`` (defaults: the environment)."""
    group = parser.add_argument_group("multi-host")
    group.add_argument("--coordinator-address", help="host:port of process 0's coordinator "
                       f"(default: ${ENVIRONMENT['coordinator_address']})")
    group.add_argument("--num-processes", type=int, help=f"default: ${ENVIRONMENT['num_processes']}")
    group.add_argument("--process-id", type=int, help=f"default: ${ENVIRONMENT['process_id']}")
    return parser


def initialize_from_args(args: argparse.Namespace, *, auto_detect: bool = False) -> bool:
    """:func:`initialize_distributed` with the flags of :func:`add_distributed_arguments`."""
    return initialize_distributed(coordinator_address=args.coordinator_address,
                                  num_processes=args.num_processes, process_id=args.process_id,
                                  auto_detect=auto_detect)


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is True on at least one. A collective: all processes call it."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def gather_from_processes(value: Any) -> list[Any]:
    """Every process's JSON-serialisable ``value``, indexed by process. A collective: all processes call it."""
    if jax.process_count() == 1:
        return [value]
    encoded = np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray(encoded.size, dtype=np.int64))
    padded = np.zeros(int(lengths.max()), dtype=np.uint8)
    padded[: encoded.size] = encoded
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(row[:length].tobytes()) for row, length in zip(gathered, lengths, strict=True)]
