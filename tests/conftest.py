"""Settings for every test."""

from __future__ import annotations

import atexit
import gc
import os
import shutil
import tempfile

import jax
import pytest

from jaxalign.cpu_devices import THREADS_VARIABLE, collective_environment


# Most tests compile the same few tiny programs again (each test builds its own model, step or sampler), and
# compiling is most of the suite's time on two cores. XLA's persistent compilation cache, private to this pytest
# process (each pytest-xdist worker has its own: JAX writes entries without a lock, and its locking mode rescans
# the whole directory on every write), lets every compile after the first load the executable instead, in the
# tests and in their subprocesses (they inherit the variables).
def pytest_configure(config):
    if config.getoption("numprocesses", None) and not hasattr(config, "workerinput"):
        return  # the pytest-xdist controller runs no test, and its workers would inherit its directory
    os.environ["XLA_FLAGS"] = with_suite_compile_flags(os.environ.get("XLA_FLAGS", ""))
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        directory = tempfile.mkdtemp(prefix="jaxalign-tests-xla-cache-")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        os.environ.update({"JAX_COMPILATION_CACHE_DIR": directory, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
    # jax read its settings when this file imported it, before the variables were set
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")))


# LLVM's optimisation level 0 instead of XLA's default 2 for every program the suite compiles (here and in its
# subprocesses): compiling is most of the suite's time, and the main run (`make test` without tests/serve, 2 cores)
# took 56.4 min at level 0 against 72.1 min at level 1 (level 1 was 13 % off tests/methods/test_kto.py against 2).
# The programs that run longest get slower (tests/test_docs_pipelines.py, the embedded 135M model: 915 s against
# 794 s), and the arithmetic is lowered differently: two programs computing the same float32 sums round apart by a
# few ulps more often (KTO's first-step KL, a chunked gradient's cancelling sum), which those tests' tolerances say.
SUITE_COMPILE_FLAGS = "--xla_backend_optimization_level=0"


def with_suite_compile_flags(flags: str) -> str:
    """``flags`` (an ``XLA_FLAGS`` value) with the suite's compile settings added once."""
    return flags if SUITE_COMPILE_FLAGS in flags else f"{flags} {SUITE_COMPILE_FLAGS}".strip()


def host_devices_env(devices: int, **extra: str) -> dict[str, str]:
    """The environment of a test subprocess that emulates ``devices`` CPU devices (this process's, plus ``extra``).

    It carries the client threads that keep the emulated devices' collectives from starving
    (:mod:`jaxalign.cpu_devices`, the cause of the sharded checks' hangs), as ``jaxalign``'s commands set them.
    XLA's collective timeout stays at its default (abort after 40 s), so a hang fails fast instead of idling.
    """
    inherited = {k: v for k, v in os.environ.items() if k != THREADS_VARIABLE}  # sized for this subprocess's devices
    env = {**inherited, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": with_suite_compile_flags(f"--xla_force_host_platform_device_count={devices}"), **extra}
    return {**env, **collective_environment(env)}


# The files measured slowest (CI's --durations on two cores), longest first, then every other file in its usual
# order. `make test` hands files to its workers in collection order (--dist loadfile --no-loadscope-reorder), so
# a long file never starts last and runs alone on one core while the other waits: the order sorted by test count
# (pytest-xdist's default) started tests/test_docs_pipelines.py (three tests, 13 minutes) near the end.
SLOWEST_FILES = (
    "tests/test_docs_pipelines.py", "tests/rollout/test_continuous.py", "tests/test_docs_examples.py",
    "tests/methods/test_pipeline.py", "tests/models/test_llama.py", "tests/rollout/test_sharded.py",
    "tests/methods/test_shared_prompt.py", "tests/methods/test_grpo_groups.py", "tests/methods/test_tfpo.py",
    "tests/methods/test_ppo.py", "tests/train/test_step.py", "tests/methods/test_online_methods.py",
    "tests/losses/test_tfpo.py", "tests/methods/test_quantized_runs.py", "tests/models/test_quantize.py",
    "tests/methods/test_score_rewards.py", "tests/methods/test_kto.py", "tests/rollout/test_args.py",
    "tests/methods/test_distill.py", "tests/methods/test_plan.py", "tests/rollout/test_engine.py",
    "tests/train/test_multiprocess_dpo.py", "tests/test_quantized_dpo_experiment.py", "tests/test_packaging.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {path: index for index, path in enumerate(SLOWEST_FILES)}
    root = config.rootpath
    # A stable sort on the file alone: each file's tests stay together and in their order.
    items.sort(key=lambda item: rank.get(item.path.relative_to(root).as_posix(), len(rank)))


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
