"""``jaxalign hitl`` as a user runs it: the console script started from another directory with a relative
``--output-dir`` (and ``--model``), retraining, a failed version retried, a ``kill -9`` of the app while a stage
trains (the trainer must stop with it), a restart that finds the stage still locked, and a SIGTERM that stops
the app and its trainer together."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from jaxalign.serve.children import DirectoryLock

ROOT = Path(__file__).resolve().parents[2]
JAXALIGN = Path(sys.executable).with_name("jaxalign")  # the console script a user runs
# The tiny model's 48-token window and short rows; and what each test adds.
SETTINGS = ("--no-warmup", "--max-model-len", "48", "--max-tokens", "8", "--train", "data.max_length=64",
            "--train", "data.buckets=[64]")
START_TIMEOUT_S = 180
RETRAIN_TIMEOUT_S = 600
STOP_TIMEOUT_S = 120  # a trainer told to stop finishes its step and saves a checkpoint first


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class App:
    """``jaxalign hitl`` started in ``cwd`` with a relative --output-dir and --model, on a free loopback port."""

    def __init__(self, cwd: Path, checkpoint: Path, output_dir: str, log: Path):
        self.cwd, self.output_dir, self.log = cwd, cwd / output_dir, log
        self.model = os.path.relpath(checkpoint, cwd)
        self.relative = output_dir
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self, *options: str) -> App:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        command = [str(JAXALIGN), "hitl", "--model", self.model, "--output-dir", self.relative, "--port", str(port),
                   *SETTINGS, *options]
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self.state, START_TIMEOUT_S, "the app to answer")
        return self

    def state(self) -> dict | None:
        if self.process.poll() is not None:
            raise AssertionError(f"the app exited with {self.process.returncode}: {self.log.read_text()[-3000:]}")
        try:
            return httpx.get(self.url + "/hitl/state", timeout=10).json()
        except httpx.HTTPError:
            return None

    def post(self, path: str, body: dict) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=60)

    def version(self, name: str) -> dict:
        return json.loads((self.output_dir / "versions" / name / "version.json").read_text())

    def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.process.wait(STOP_TIMEOUT_S)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie does not, unless threads of it still run (its exit is under way, and its
    files, locks included, are released only once the last one ends)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z" or len(os.listdir(f"/proc/{pid}/task")) > 1
    except (OSError, IndexError):
        return False


def unlocked(lock_file: Path) -> bool:
    """Whether no process holds the stage's lock (its trainer has released it by ending)."""
    lock = DirectoryLock(lock_file)
    free = lock.acquire()
    lock.release()
    return free


def trainers(run: Path) -> list[int]:
    """Processes training into the stage directory ``run``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if b"train" in argv and f"output_dir={run}".encode() in argv and alive(int(entry.name)):
                    found.append(int(entry.name))
    return found


@contextlib.contextmanager
def cleanup(*apps: App, runs: tuple[Path, ...] = ()):
    """Whatever a failing test leaves behind: the apps and any trainer on ``runs``."""
    try:
        yield
    finally:
        for app in apps:
            if app.process is not None and app.process.poll() is None:
                app.process.kill()
                app.process.wait(30)
        for run in runs:
            for pid in trainers(run):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_the_readme_command_from_another_directory_retrains_and_a_failed_version_is_retried(tiny_checkpoint,
                                                                                            tmp_path):
    """README: ``jaxalign hitl --output-dir runs/hitl --retrain-threshold 1`` and its curl, from a directory that
    is not the output's parent's; a version that failed (a bad --train setting) retried from the API and, once
    the setting is fixed, by the restart; ``train.total_steps=2`` is what version.json reports."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    app = App(cwd, tiny_checkpoint, "runs/hitl", tmp_path / "hitl.log")
    readme = {"action": "accept", "model_version": "v0", "prompt": "q", "response": "r"}
    with cleanup(app, runs=(app.output_dir / "versions" / "v1" / "sft", app.output_dir / "versions" / "v1" / "kto")):
        app.start("--retrain-threshold", "1", "--train", "train.total_steps=0")  # every stage refuses this
        assert app.post("/hitl/feedback", readme).status_code == 200
        wait_for(lambda: '"POST /hitl/feedback HTTP/1.1" 200' in app.log.read_text(), 30, "the request's access line")

        def failed(attempts: int):
            state = app.state()
            rows = [v for v in (state or {}).get("versions", []) if v["name"] == "v1"]
            return rows and rows[0]["status"] == "failed" and rows[0]["attempts"] == attempts and rows[0]

        v1 = wait_for(lambda: failed(1), RETRAIN_TIMEOUT_S, "v1 to fail")
        assert "total_steps must be a positive int" in v1["error"], v1["error"]
        assert str(tmp_path) not in v1["error"].split(": ", 1)[0]
        assert app.post("/hitl/retry", {"version": "v1"}).json() == {"version": "v1"}
        wait_for(lambda: failed(2), RETRAIN_TIMEOUT_S, "the retried v1 to fail again")
        assert app.stop() == 128 + signal.SIGTERM

        app.start("--retrain-threshold", "1", "--train", "train.total_steps=2")  # fixed: the restart retries v1
        final = wait_for(lambda: (s := app.state()) and s["serving"] == "v1" and s, RETRAIN_TIMEOUT_S,
                         "the restart to retry v1 and serve it")
        assert app.stop() == 128 + signal.SIGTERM

    version = app.version("v1")
    root = (cwd / "runs" / "hitl").resolve()
    assert version["status"] == "ready" and version["attempts"] == 3 and version["error"] is None
    assert version["model"] == str(root / "versions" / "v1" / "kto" / "export")
    for stage in ("sft", "kto"):
        info = version["stages"][stage]
        assert info["status"] == "done" and info["steps"] == 2 and info["data"].startswith(str(root))
        assert final["versions"][0]["stages"][stage]["steps"] == 2  # what the page's side bar shows
        config = json.loads((root / "versions" / "v1" / stage / "run.json").read_text())["config"]
        assert config["train"]["total_steps"] == 2 and config["data"]["source"] == info["data"]
    assert (root / "versions" / "v1" / "attempt-1" / "sft" / "train.log").exists()  # the failed runs, kept
    assert (root / "versions" / "v1" / "attempt-2" / "sft" / "train.log").exists()
    assert not (root / "runs").exists() and not (cwd / "runs" / "hitl" / "versions" / "v1" / "runs").exists()
    assert json.loads((root / "current.json").read_text()) == {"version": "v1"}


def test_a_kill_9_stops_the_trainer_and_a_restart_never_runs_a_second(tiny_checkpoint, tmp_path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    app = App(cwd, tiny_checkpoint, "runs/h", tmp_path / "hitl.log")
    # Steps enough that the trainer cannot finish by itself while the test watches it.
    options = ("--retrain-threshold", "2", "--train", "train.total_steps=400")
    run = app.output_dir / "versions" / "v1" / "kto"
    lock_file = app.output_dir / "versions" / "v1" / "kto.lock"
    with cleanup(app, runs=(run,)):
        app.start(*options)
        for i in range(2):
            body = {"action": "thumbs_up", "model_version": "v0", "prompt": f"q{i}", "response": f"r{i}"}
            assert app.post("/hitl/feedback", body).status_code == 200
        wait_for(lambda: (s := app.state()) and s["retrain"]["phase"] == "training" and s["retrain"]["step"] >= 1,
                 RETRAIN_TIMEOUT_S, "the kto stage to take a step")
        trainer = int(lock_file.read_text())
        assert trainers(run) == [trainer]

        app.process.kill()  # kill -9 of the app alone
        app.process.wait(30)
        wait_for(lambda: not alive(trainer) and unlocked(lock_file), STOP_TIMEOUT_S, "the trainer to stop with its app")
        last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]
        assert last < 400 and not (run / "export").exists()  # it stopped, it did not finish

        # A trainer still saving as the app restarts: the test holds the stage's lock as that trainer would.
        holder = DirectoryLock(lock_file)
        assert holder.acquire()
        os.write(holder.fd, f"{os.getpid()}\n".encode())
        try:
            app.start(*options)
            waiting = wait_for(lambda: (s := app.state()) and s["retrain"]["phase"] == "waiting" and s["retrain"],
                               60, "the restart to wait for the stage's lock")
            assert f"process {os.getpid()}" in waiting["message"], waiting
            time.sleep(3)
            assert trainers(run) == [] and app.state()["retrain"]["phase"] == "waiting"
        finally:
            holder.release()
        second = wait_for(lambda: (pid := int(lock_file.read_text() or 0)) != os.getpid() and alive(pid) and pid,
                          60, "the restart to start its trainer once the lock is free")
        wait_for(lambda: (s := app.state()) and s["retrain"]["step"] >= 1, RETRAIN_TIMEOUT_S,
                 "the resumed stage to take a step")
        assert trainers(run) == [second]

        assert app.stop(signal.SIGTERM) == 128 + signal.SIGTERM  # it stops its trainer first
        wait_for(lambda: not alive(second) and unlocked(lock_file), STOP_TIMEOUT_S, "the trainer to stop with its app")
        assert trainers(run) == []
    assert app.version("v1")["status"] == "training"  # it resumes at the next start
    assert (run / "checkpoints").is_dir()
