"""Settings for every test."""

from __future__ import annotations

import gc

import jax
import pytest


def host_devices_flags(devices: int) -> str:
    """``XLA_FLAGS`` of a test subprocess that emulates ``devices`` CPU devices.

    Each emulated device joins a collective on a thread of its own, and XLA:CPU aborts the process when the
    last one is 40 s late (``xla_cpu_collective_call_terminate_timeout_seconds``). On 2 cores with the other
    pytest worker busy, 8 devices once missed it by two (tests/rollout/test_sharded.py, 2026-11-28; the same
    check passed alone and beside a busy process in 68-122 s): 300 s leaves that to the test's own time limit.
    """
    return (f"--xla_force_host_platform_device_count={devices} "
            "--xla_cpu_collective_call_terminate_timeout_seconds=300")


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs(request):
    """Free the XLA programs each test module compiled, once it is done.

    Every compiled CPU program holds about six memory mappings until it is freed, and Linux allows a process
    65,530 (``vm.max_map_count``). One pytest process running the suite went past that (tests/rollout alone
    left 25,686 mappings; 1,165 with this fixture) and XLA then segfaulted or aborted while compiling or
    writing its cache. The serving tests keep servers (and their compiled steps) across modules, and run in a
    process of their own (Makefile), so their modules are left alone.
    """
    yield
    if "serve" not in request.node.path.parts:
        jax.clear_caches()
        gc.collect()
