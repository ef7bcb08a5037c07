"""Helpers for the train tests. Tests that need several devices or processes run scripts of this folder in
subprocesses (``XLA_FLAGS=--xla_force_host_platform_device_count=N``), so this process keeps one device."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import host_devices_env

ROOT = Path(__file__).resolve().parents[2]


def python_env(devices: int = 1) -> dict[str, str]:
    """The environment of a test subprocess: CPU only, ``devices`` host devices, this checkout importable."""
    return host_devices_env(devices, PYTHONPATH=str(ROOT))  # the suite's compilation cache too (tests/conftest.py)


def script_command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def run_script(module: str, *args: str, devices: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` and fail the test with its output if it fails."""
    result = subprocess.run(script_command(module, *args), cwd=ROOT, env=python_env(devices), capture_output=True,
                            text=True, timeout=timeout)
    if result.returncode != 0:
        pytest.fail(f"{module} exited with {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n"
                    f"{result.stderr[-6000:]}")
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_processes(module: str, *args: str, processes: int, devices: int, timeout: float = 400) -> list[str]:
    """Run ``python -m module args`` as ``processes`` processes of ``devices`` CPU devices each, joined into one
    JAX job over loopback (``--coordinator-address/--num-processes/--process-id``); each process's stdout, in
    process order. When one process fails or the job outlives ``timeout``, every process is killed at once
    (the others would wait for it in a collective) and the test fails with their output."""
    address = f"127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory(prefix="jaxalign-processes-") as logs:
        streams = [(open(f"{logs}/{index}.out", "w+"), open(f"{logs}/{index}.err", "w+"))
                   for index in range(processes)]
        running = [subprocess.Popen(script_command(module, *args, "--coordinator-address", address,
                                                   "--num-processes", str(processes), "--process-id", str(index)),
                                    cwd=ROOT, env=python_env(devices), stdout=out, stderr=err, text=True)
                   for index, (out, err) in enumerate(streams)]
        deadline = time.monotonic() + timeout
        try:
            while any(process.poll() is None for process in running) and time.monotonic() < deadline:
                if any(process.poll() not in (None, 0) for process in running):
                    break
                time.sleep(0.5)
        finally:
            for process in running:
                process.kill()
                process.wait()
        texts = []
        for out, err in streams:
            out.seek(0), err.seek(0)
            texts.append((out.read(), err.read()))
            out.close(), err.close()
    if all(process.returncode == 0 for process in running):
        return [stdout for stdout, _ in texts]
    report = "\n".join(f"--- process {index}: exit {process.returncode}\n{stdout}\n{stderr[-4000:]}"
                       for index, (process, (stdout, stderr)) in enumerate(zip(running, texts, strict=True)))
    what = "failed" if time.monotonic() < deadline else f"did not finish in {timeout:.0f} s"
    pytest.fail(f"the {processes} processes of {module} {what}\n{report}")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random Llama saved with the word-level ChatML tokenizer (one per test module). Imported here
    so that the train tests which need no checkpoint do not load transformers."""
    from tests.models.conftest import make_hf_model
    from tests.test_cli import tiny_tokenizer

    directory = tmp_path_factory.mktemp("checkpoint") / "tiny_llama"
    make_hf_model("llama").save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory
