"""Run the 8-device sharded check (:mod:`tests.rollout.sharded_check`) again and again, as test_sharded.py runs it,
and dump every thread of a run that stops in a collective: the tool that found the emulated devices' thread
starvation (docs/training-core.md, "Trying a mesh on a CPU"), kept to check that it cannot come back.

    python -m tests.rollout.repeat_sharded_check --runs 30 --output /tmp/sharded-runs

A run counts as stuck once XLA warns that a thread "may be stuck" in a rendezvous (after 20 s); 40 seconds later
(XLA's abort is moved to 300 s here) the script writes ``run<i>.gdb`` (every native thread's stack, when gdb is
installed) and ``run<i>.pyspy`` (when py-spy is), kills the run and stops. Each run's stdout and stderr are kept
beside them; one line per run says how it ended, and ``runs.json`` lists every run so far (exit status, seconds,
the 5-minute load average at its end).
Load the machine as ``make test`` does (two pytest workers) while it runs: the hang needed busy cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import host_devices_env

ROOT = Path(__file__).resolve().parents[2]
STUCK = "may be stuck"
GRACE_SECONDS = 40  # the dumps are taken while every thread still waits, before XLA's abort:
# XLA warns after 20 s and aborts after its collective timeout (40 s by default, as the suite keeps it), so the
# runs here get a longer one.
XLA_ABORT_SECONDS = 300


def dump_threads(pid: int, output: Path, name: str) -> None:
    if shutil.which("gdb"):
        with open(output / f"{name}.gdb", "w") as file:
            subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "info threads", "-ex", "thread apply all bt"],
                           stdout=file, stderr=subprocess.STDOUT, timeout=600, check=False)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if Path(py_spy).exists():
        with open(output / f"{name}.pyspy", "w") as file:
            subprocess.run([py_spy, "dump", "--native", "--pid", str(pid)], stdout=file, stderr=subprocess.STDOUT,
                           timeout=300, check=False)


def check_environment() -> dict[str, str]:
    """The suite's environment for the 8-device check (:func:`tests.conftest.host_devices_env`), with XLA's
    abort after a stuck collective moved past the dump's grace period."""
    env = host_devices_env(8, PYTHONPATH=str(ROOT))
    env["XLA_FLAGS"] += f" --xla_cpu_collective_call_terminate_timeout_seconds={XLA_ABORT_SECONDS}"
    return env


def run_once(index: int, output: Path) -> tuple[int, float, bool]:
    """``(exit status, seconds, stuck)`` of one run of the check."""
    started = time.monotonic()
    name = f"run{index}"
    with open(output / f"{name}.out", "w") as out, open(output / f"{name}.err", "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "tests.rollout.sharded_check"], cwd=ROOT,
                                   env=check_environment(), stdout=out, stderr=err)
        stuck_since = None
        while process.poll() is None:
            time.sleep(2)
            if stuck_since is None and STUCK in (output / f"{name}.err").read_text(errors="replace"):
                stuck_since = time.monotonic()
            if stuck_since is not None and time.monotonic() - stuck_since > GRACE_SECONDS:
                dump_threads(process.pid, output, name)
                process.kill()
                break
        return process.wait(), time.monotonic() - started, stuck_since is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--output", type=Path, required=True, help="directory for each run's output and dumps")
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    runs = []
    for index in range(args.runs):
        status, seconds, stuck = run_once(index, args.output)
        # The machine's load over the run's last minutes: the hang needed busy cores.
        runs.append({"run": index, "exit": status, "seconds": round(seconds), "stuck": stuck,
                     "load_average_5min": round(os.getloadavg()[1], 2)})
        (args.output / "runs.json").write_text(json.dumps({"cores": os.cpu_count(), "runs": runs}, indent=1))
        print(f"run {index}: exit {status}, {seconds:.0f} s, load {runs[-1]['load_average_5min']}"
              f"{', STUCK (threads dumped)' if stuck else ''}", flush=True)
        if stuck or status != 0:
            return 1
    print(f"{args.runs} runs in a row passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
