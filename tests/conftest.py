"""Settings for every test."""

from __future__ import annotations

import gc

import jax
import pytest


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
