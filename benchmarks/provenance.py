"""Where and on what a benchmark ran: every results JSON carries this under ``"provenance"``.

Ratios are only comparable between runs on the same machine, and numbers only mean something for the code
that produced them, so each file records the commit (and whether the tree had uncommitted changes) and the
machine: CPU model, cores, memory, accelerator, and the versions of the frameworks measured.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("jax", "jaxlib", "flax", "torch", "transformers", "trl")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _accelerator() -> str:
    try:
        import jax

        device = jax.devices()[0]
        return f"{device.platform}: {device.device_kind}"
    except Exception as error:  # a benchmark must still record where it ran when jax cannot start
        return f"unknown ({type(error).__name__})"


def describe() -> dict:
    """The commit and machine this process runs on, as plain JSON values."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    versions = {}
    for name in FRAMEWORKS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": None if status is None else bool(status),
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "memory_gib": _memory_gib(),
                    "accelerator": _accelerator(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    # glibc.malloc.hugetlb=1 when the process re-executed itself (jaxalign.hostmem)
                    "glibc_tunables": os.environ.get("GLIBC_TUNABLES")},
        "versions": versions,
    }


def write_result(path: Path, benchmark: str, **sections) -> dict:
    """Write ``{"benchmark": benchmark, "provenance": describe(), **sections}`` to ``path`` as indented JSON
    (its folder created) and return the provenance (its machine names the chart's hardware)."""
    described = describe()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": benchmark, "provenance": described, **sections}, indent=2) + "\n")
    return described
