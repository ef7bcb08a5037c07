"""Enough XLA:CPU client threads for collectives across emulated CPU devices.

Meshes can be tried on a CPU by emulating devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8`` or
``JAX_NUM_CPU_DEVICES=8``). XLA:CPU then runs each device's part of a sharded program on a thread of its client
pool, whose size is ``max(cores, devices)``: on a 2-core machine with 8 devices, exactly 8 threads. Two kinds of
work share that pool:

- each device's execution of a program; in a collective, the device's thread blocks until all 8 have arrived;
- each device's *launch* of the next sharded program, which first takes a slot of the device's in-flight limit
  (32 programs) and blocks there while the device has 32 launched programs not yet run.

When Python dispatches sharded programs faster than the devices run them (a serving engine's small cache
programs, a busy machine), a launch blocks on a full in-flight limit while holding a pool thread; the programs
it waits for include a collective that now lacks a thread for one of its devices, and the collective's other
devices wait for it forever. XLA aborts the process after its collective timeout ("Expected 8 threads to join
the rendezvous, but only 7 of them arrived"). Seen with 1-3 launch threads blocked (gdb: ``Semaphore::Acquire``
under ``CpuPjRtRawLoadedExecutable::Execute``) and the rest in ``InProcessCommunicator::CollectivePermute``; a
dozen lines of plain JAX that chain 200 sharded ``jnp.roll`` calls hang the same way (tests/test_cpu_devices.py).

One Python thread blocks in a sharded launch until all of its devices' launch tasks have returned, so at most
``devices`` launch tasks block at once, and the running collective needs ``devices`` more threads: a pool of
``2 × devices`` threads cannot starve. XLA sizes the pool from ``PJRT_NPROC`` (read when the CPU backend starts),
so :func:`provide_collective_threads` sets it before JAX starts, unless the user set it (or ``NPROC``) already.
It does nothing without emulated devices, and real accelerators' clients are not concerned: their collectives
do not share a pool with launches.
"""

from __future__ import annotations

import os
import re

DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\d+)")
THREADS_VARIABLE = "PJRT_NPROC"  # XLA's DefaultThreadPoolSize(); NPROC is its older spelling
LAUNCHING_THREADS = 1  # Python threads that launch sharded programs at the same time (one engine, one loop)


def emulated_cpu_devices(environ: dict[str, str] | None = None) -> int:
    """How many CPU devices JAX will emulate in a process started with ``environ`` (1: none)."""
    environ = os.environ if environ is None else environ
    counts = DEVICE_COUNT_FLAG.findall(environ.get("XLA_FLAGS", ""))
    devices = int(counts[-1]) if counts else 1  # absl flags: the last occurrence wins
    configured = environ.get("JAX_NUM_CPU_DEVICES", "").strip()
    if configured.lstrip("-").isdigit() and int(configured) >= 0:  # jax_num_cpu_devices overrides XLA's flag
        devices = int(configured)
    return max(devices, 1)


def collective_threads(devices: int) -> int:
    """Client pool threads that no mix of blocked launches and a running collective can use up."""
    return (1 + LAUNCHING_THREADS) * devices


def collective_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables to add to ``environ`` so its emulated devices' collectives cannot starve (empty: none)."""
    environ = os.environ if environ is None else environ
    devices = emulated_cpu_devices(environ)
    if devices < 2 or THREADS_VARIABLE in environ or "NPROC" in environ:
        return {}
    return {THREADS_VARIABLE: str(max(collective_threads(devices), os.cpu_count() or 1))}


def provide_collective_threads() -> None:
    """Set :data:`THREADS_VARIABLE` for this process's emulated devices; call before JAX's first operation."""
    os.environ.update(collective_environment())
