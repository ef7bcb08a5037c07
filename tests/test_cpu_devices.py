"""jaxalign.cpu_devices: emulated CPU devices get the client threads their collectives need.

The starvation it prevents is shown on plain JAX, without jaxalign: a chain of small sharded programs with a
collective each, dispatched faster than 8 emulated devices run them, hangs in a collective with XLA's default
pool of ``max(cores, devices)`` threads and completes with ``2 × devices``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from jaxalign import cpu_devices
from tests.conftest import host_devices_env

CHAIN = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    rows = NamedSharding(Mesh(np.array(jax.devices()), ("d",)), P("d"))
    x = jax.device_put(np.ones((8, 256), np.float32), rows)
    w = jax.device_put(np.eye(256, dtype=np.float32), NamedSharding(rows.mesh, P()))
    step = jax.jit(lambda x, w: jnp.roll(jnp.tanh(x @ w), 1, axis=0), out_shardings=rows)  # a collective-permute
    for _ in range(400):
        x = step(x, w)
    print("chain done", float(jax.block_until_ready(x).sum()))
""")


def run_chain(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHAIN], env=env, capture_output=True, text=True, timeout=300)


def test_a_chain_of_collectives_completes_with_the_provided_threads():
    env = host_devices_env(8)
    assert env[cpu_devices.THREADS_VARIABLE] == str(max(16, os.cpu_count()))
    result = run_chain(env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "chain done" in result.stdout


@pytest.mark.skipif(os.cpu_count() >= 16, reason="XLA's own pool has 2 x 8 threads on this machine")
def test_the_same_chain_starves_with_one_thread_per_device():
    """The cause, kept visible: with XLA's default pool (8 threads for 8 devices on a small machine) the chain
    stops in a collective; a short collective timeout turns the hang into XLA's abort."""
    env = host_devices_env(8, **{cpu_devices.THREADS_VARIABLE: "8"})
    env["XLA_FLAGS"] += " --xla_cpu_collective_call_terminate_timeout_seconds=5"
    result = run_chain(env)
    assert result.returncode != 0 and "chain done" not in result.stdout
    assert "Expected 8 threads to join the rendezvous" in result.stderr


def test_the_device_count_is_read_as_jax_reads_it():
    assert cpu_devices.emulated_cpu_devices({}) == 1
    flags = "--xla_force_host_platform_device_count=4 --xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8"
    assert cpu_devices.emulated_cpu_devices({"XLA_FLAGS": flags}) == 8
    assert cpu_devices.emulated_cpu_devices({"XLA_FLAGS": flags, "JAX_NUM_CPU_DEVICES": "2"}) == 2
    assert cpu_devices.emulated_cpu_devices({"XLA_FLAGS": flags, "JAX_NUM_CPU_DEVICES": "-1"}) == 8


def test_the_threads_are_set_only_for_emulated_devices_and_never_over_the_users_choice():
    flags = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert cpu_devices.collective_environment({}) == {}
    assert cpu_devices.collective_environment({"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}) == {}
    assert int(cpu_devices.collective_environment(flags)[cpu_devices.THREADS_VARIABLE]) >= 16
    assert cpu_devices.collective_environment({**flags, "PJRT_NPROC": "4"}) == {}
    assert cpu_devices.collective_environment({**flags, "NPROC": "4"}) == {}


def test_the_jaxalign_command_sets_them_before_jax_starts():
    env = host_devices_env(8)
    env.pop(cpu_devices.THREADS_VARIABLE)
    probe = ("import os, sys; from jaxalign import cli; cli.main = lambda: print(os.environ.get('PJRT_NPROC')) or 0;"
             " sys.exit(cli.command())")
    result = subprocess.run([sys.executable, "-c", probe], env={**env, "JAXALIGN_HUGEPAGES": "0"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) >= 16
