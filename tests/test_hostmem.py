"""jaxalign.hostmem: when a command re-executes itself with glibc's huge-page tunable, and that the tunable
then really gives ``malloc``'s large blocks transparent huge pages."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jaxalign import hostmem

ROOT = Path(__file__).resolve().parents[1]
SUPPORTED = hostmem.tuned_environment({}) is not None  # Linux, glibc >= 2.35, huge pages in "madvise" mode
needs_support = pytest.mark.skipif(not SUPPORTED, reason="no glibc >= 2.35 with madvise-mode huge pages here")

# A child that calls use_transparent_huge_pages(), counts its executions in a file, then reports its tunables and
# how much of a fresh 64 MiB malloc block the kernel backs with huge pages (KiB; numpy is not used: it madvises
# its own arrays).
CHILD = textwrap.dedent("""
    import ctypes, os, re, sys
    from jaxalign.hostmem import use_transparent_huge_pages
    with open(sys.argv[1], "a") as runs:
        runs.write("run\\n")
    use_transparent_huge_pages()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    size = 64 * 2**20
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    huge = re.search(r"AnonHugePages:\\s+(\\d+)", open("/proc/self/smaps_rollup").read()).group(1)
    print(os.environ.get("GLIBC_TUNABLES", ""), huge, sys.argv[2], sep="|")
""")


def child_environment(**environ: str) -> dict[str, str]:
    """This process's environment without what would decide the child's re-execution for it, plus ``environ``."""
    inherited = ("GLIBC_TUNABLES", hostmem.OPT_OUT, hostmem.REEXECUTED)
    env = {key: value for key, value in os.environ.items() if key not in inherited}
    return env | {"PYTHONPATH": str(ROOT)} | environ


def run_child(tmp_path: Path, **environ: str) -> tuple[int, list[str]]:
    runs = tmp_path / "runs.txt"
    env = child_environment(**environ)
    out = subprocess.run([sys.executable, "-c", CHILD, str(runs), "an argument"], env=env, capture_output=True,
                         text=True, timeout=60, check=True)
    return len(runs.read_text().splitlines()), out.stdout.rstrip("\n").split("|")


def test_tuned_environment_adds_the_tunable_once_and_keeps_the_others():
    if not SUPPORTED:
        assert hostmem.tuned_environment({"PATH": "/bin"}) is None
        return
    assert hostmem.tuned_environment({"PATH": "/bin"}) == {
        "PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", hostmem.REEXECUTED: "1"}
    assert hostmem.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
    assert hostmem.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # the user's choice
    assert hostmem.tuned_environment({hostmem.OPT_OUT: "0"}) is None
    # Once re-executed, never again, even where glibc dropped the tunable (secure-execution processes).
    assert hostmem.tuned_environment({hostmem.REEXECUTED: "1"}) is None


def test_only_glibc_with_huge_pages_on_request_is_tuned(monkeypatch, tmp_path):
    mode = tmp_path / "enabled"
    monkeypatch.setattr(hostmem, "THP_MODE", mode)
    monkeypatch.setattr(hostmem.sys, "platform", "linux")
    monkeypatch.setattr(hostmem, "_glibc_version", lambda: (2, 36))
    mode.write_text("always [madvise] never\n")
    assert hostmem.tuned_environment({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    for kernel_mode in ("[always] madvise never\n", "always madvise [never]\n"):
        mode.write_text(kernel_mode)
        assert hostmem.tuned_environment({}) is None, kernel_mode
    mode.unlink()
    assert hostmem.tuned_environment({}) is None
    mode.write_text("always [madvise] never\n")
    for version in (None, (2, 31)):
        monkeypatch.setattr(hostmem, "_glibc_version", lambda version=version: version)
        assert hostmem.tuned_environment({}) is None, version


def test_the_console_script_is_the_re_executing_command():
    assert 'jaxalign = "jaxalign.cli:command"' in (ROOT / "pyproject.toml").read_text()


@needs_support
def test_the_process_runs_again_once_with_huge_pages_and_its_arguments(tmp_path):
    runs, (tunables, huge_kib, argument) = run_child(tmp_path)
    assert runs == 2 and tunables == "glibc.malloc.hugetlb=1" and argument == "an argument"
    assert int(huge_kib) >= 32 * 1024  # most of the 64 MiB block sits on 2 MiB pages


@needs_support
def test_opting_out_runs_once_on_small_pages(tmp_path):
    runs, (tunables, huge_kib, argument) = run_child(tmp_path, **{hostmem.OPT_OUT: "0"})
    assert runs == 1 and tunables == "" and argument == "an argument"
    assert int(huge_kib) < 32 * 1024


@needs_support
@pytest.mark.parametrize("module", ["experiments.sentiment", "experiments.llmdoctor"])
def test_the_main_jobs_re_execute_before_jax_loads(module):
    """The re-executed process is the one that imports JAX: each of the two processes' import lists (Python's
    ``-X importtime``, which the re-execution keeps) holds jax once in all, not once per process."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", module, "--help"], env=child_environment(),
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    imported = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")]
    assert imported.count("jaxalign.hostmem") == 2  # both processes ran: the re-execution happened
    assert imported.count("jax") == 1
