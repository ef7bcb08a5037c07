"""Transparent huge pages for the host's ``malloc``: jaxalign's commands re-execute themselves once to get them.

Why: XLA's CPU runtime allocates a step's buffers afresh on every call, and glibc hands allocations above
32 MB straight back to the kernel when they are freed, so each training step touches its temporaries
(1.7 GB for a SmolLM2-135M DPO step) as fresh 4 KiB pages: hundreds of thousands of page faults a step.
glibc's ``glibc.malloc.hugetlb=1`` tunable (glibc >= 2.35) makes ``malloc`` ask for transparent huge pages
(``madvise``), one fault per 2 MiB. Measured on 2 AMD EPYC cores (docs/offline-trainers.md#measured): an SFT
step 3.24 -> 2.61 s, a DPO step 6.23 -> 5.98 s, a decode step 65 -> 60 ms. A tunable is read only when a
process starts, so :func:`use_transparent_huge_pages` sets it and executes the same command line again;
``torch.backends.xeon.run_cpu`` launches PyTorch on CPUs with tcmalloc or jemalloc preloaded for the same reason.

It does nothing off Linux with glibc >= 2.35, unless the kernel's transparent huge pages are in ``madvise``
mode (the tunable's case: with ``always`` the kernel already gives large mappings huge pages; with ``never``
nothing can), when ``GLIBC_TUNABLES`` already names the tunable (the user's choice, either way), after one
re-execution (:data:`REEXECUTED`: a process glibc runs without tunables, e.g. with file capabilities, would
otherwise start again and again), for a program read from standard input (consumed by the first run), and with
``JAXALIGN_HUGEPAGES=0``. Costs measured: the first, compiling training step 1-1.5 s slower; peak memory the
same (3.96 against 3.98 GB for an SFT run, 4.40 against 4.38 for DPO). Library code never calls it; a script
that imports jaxalign can set the variable itself: ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python train.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "JAXALIGN_HUGEPAGES"  # "0": leave the allocator as it is
REEXECUTED = "JAXALIGN_HUGEPAGES_REEXECUTED"  # set in the re-executed process: never a second time
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
MIN_GLIBC = (2, 35)  # the first glibc with the tunable (older ones ignore it)


def _glibc_version() -> tuple[int, int] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):  # not glibc (musl, macOS, Windows)
        return None


def _huge_pages_on_request() -> bool:
    """Whether the kernel gives transparent huge pages to memory that asks for them (``madvise`` mode)."""
    try:
        return "[madvise]" in THP_MODE.read_text()
    except OSError:
        return False


def tuned_environment(environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment to re-execute with (``environ`` plus the tunable), or None when nothing would change."""
    environ = dict(os.environ if environ is None else environ)
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (environ.get(OPT_OUT) == "0" or REEXECUTED in environ or TUNABLE in tunables
            or not sys.platform.startswith("linux")):
        return None
    version = _glibc_version()
    if version is None or version < MIN_GLIBC or not _huge_pages_on_request():
        return None
    environ["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"
    environ[REEXECUTED] = "1"
    return environ


def use_transparent_huge_pages() -> None:
    """Re-execute this process's command line with :data:`TUNABLE` set, unless that would change nothing.

    Call it before the command imports JAX (as the experiments do, under ``if __name__ == "__main__":`` at the top
    of the module): whatever ran before is run again. On success it does not return; if the executable cannot be
    run again, the process goes on as it is.
    """
    environ = tuned_environment()
    from_stdin = sys.argv[0] in ("", "-")  # `python - < script.py`, or no script: nothing to run again
    if environ is None or from_stdin or not sys.executable or not getattr(sys, "orig_argv", None):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, environ)
    except OSError:
        return
