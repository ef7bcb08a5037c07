"""Versions of the served model and the human-in-the-loop app's retraining.

An output directory holds everything the app needs to resume after a crash or a restart::

    D/feedback.jsonl                 every action a person took (jaxalign.serve.feedback)
    D/current.json                   {"version": "v2"}: what the app serves (written atomically)
    D/versions/v0/version.json       the base model (its path; null = the embedded default)
    D/versions/v1/version.json       {"parent": "v0", "records": [0, 20], "status": "ready", "stages": {...}}
    D/versions/v1/data/*.jsonl       the snapshot of feedback it trained on, as training datasets
    D/versions/v1/<stage>/           one `jaxalign train <stage>` run each (config, checkpoints, metrics, export/)
    D/versions/v1/<stage>.lock       held by that stage's trainer while it runs

A version trains on the records that arrived since the previous version was started, from the version being
served, in stages (the ``hitl`` preset): SFT on accepted and edited answers, DPO on A/B picks and on edits (the
edit preferred over the original), KTO on thumbs; a stage without data is skipped, and each starts from the
previous stage's export. Every stage is a ``python -m jaxalign.cli train`` subprocess: training shares no
memory or thread with serving, a crashed run cannot take the server down, and a killed one resumes from its
checkpoints (``--resume``) when the app starts again. When the last stage ends, the app loads its export and
hot-swaps it in (:meth:`~jaxalign.serve.scheduler.Scheduler.swap_model`).

Every path the app writes or hands to a stage is absolute (the output directory is resolved once), so a stage
finds its data whatever directory the app was started from. A stage's trainer dies with the app
(:mod:`~jaxalign.serve.children`: SIGTERM, so it saves a checkpoint first) and holds ``<stage>.lock`` beside its
run for as long as it lives: a restart that finds the lock held waits for that trainer to stop and says so,
instead of starting a second trainer on the same run. A version that failed (its trainer exited with an error)
can be trained again (:meth:`Retrainer.retry`; a restart retries the newest version if it failed): from the
version served now, on the same records, with the failed attempt's runs kept in ``vN/attempt-<k>/``. A new
version started instead takes the records of the failed versions before it and marks them ``superseded``: no
record is left untrained, and none is trained twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxalign.serve.children import DirectoryLock, signal_group, spawn

log = logging.getLogger("jaxalign.serve.retrain")

CURRENT_FILE = "current.json"
VERSION_FILE = "version.json"
PRESET = "hitl"
EPOCHS = 3  # passes over a version's new feedback per stage
STAGES = ("sft", "dpo", "kto")  # in training order; each starts from the previous stage's export
EXPORT_DIR = "export"
BATCH_SIZE = 4
LOCK_POLL_S = 0.5


def export_feedback(records, directory: Path) -> dict[str, tuple[Path, int]]:
    """Write a version's snapshot of feedback as one training file per stage: ``{stage: (file, examples)}``."""
    from jaxalign.serve.feedback import export_preferences, export_sft, export_unpaired

    directory.mkdir(parents=True, exist_ok=True)
    files = {"sft": (directory / "sft.jsonl", export_sft), "dpo": (directory / "pairs.jsonl", export_preferences),
             "kto": (directory / "unpaired.jsonl", export_unpaired)}
    return {stage: (file, export(records, file)) for stage, (file, export) in files.items()}


def write_json_atomically(path: Path, value: Any) -> None:
    """Write ``value`` as JSON so that a crash leaves either the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as file:
            json.dump(value, file, indent=1)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)  # the rename itself survives a power cut
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


@dataclasses.dataclass
class Version:
    """One version of the served model (``version.json``)."""

    name: str
    parent: str | None
    status: str  # "training", "ready", "failed" or "superseded" (a failed version whose records a newer one took)
    records: tuple[int, int] = (0, 0)  # the feedback records [start, end) it trained on
    model: str | None = None  # the weights: the base model's path (v0), or the last stage's export
    # stage -> {"data", "examples", "steps", "status", "seconds", "peak_rss_mib"} (the last two once it ran)
    stages: dict[str, dict] = dataclasses.field(default_factory=dict)
    created: float = dataclasses.field(default_factory=time.time)
    finished: float | None = None
    served: float | None = None  # when it was first served; None for one trained but not yet swapped in
    error: str | None = None
    attempts: int = 1  # a failed version trained again (Retrainer.retry) counts one more
    superseded_by: str | None = None  # the version that trained this failed version's records instead

    @property
    def number(self) -> int:
        return int(self.name[1:])

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _same_local_path(recorded: str | None, given: str | None) -> bool:
    return (recorded is not None and given is not None and not Path(recorded).is_absolute()
            and Path(recorded).exists() and Path(recorded).resolve() == Path(given).resolve())


class Versions:
    """The version directories of an output directory, and which one is served."""

    def __init__(self, root: Path, *, base_model: str | None):
        self.root = Path(root).resolve()  # stages run elsewhere: every path handed to them is absolute
        self.directory = self.root / "versions"
        if not (self.directory / "v0" / VERSION_FILE).exists():
            self.save(Version("v0", None, "ready", model=base_model, finished=time.time()))
        base = self.get("v0")
        if base.model != base_model and _same_local_path(base.model, base_model):
            # an older app recorded --model as given, relative to the directory it was started from
            self.save(dataclasses.replace(base, model=base_model))
        elif base.model != base_model:
            raise ValueError(f"{self.root} was started with --model {base.model or 'default'}, not "
                             f"{base_model or 'default'}: use another --output-dir")

    def path(self, name: str) -> Path:
        return self.directory / name

    def get(self, name: str) -> Version:
        file = self.path(name) / VERSION_FILE
        try:
            values = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"{file}: cannot read the version ({error})") from error
        values["records"] = tuple(values["records"])
        known = {f.name for f in dataclasses.fields(Version)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{file}: unknown field(s) {unknown} (written by a newer jaxalign?)")
        return Version(**values)

    def save(self, version: Version) -> None:
        write_json_atomically(self.path(version.name) / VERSION_FILE, version.to_json())

    def all(self) -> list[Version]:
        names = [p.name for p in self.directory.iterdir() if (p / VERSION_FILE).exists()]
        return sorted((self.get(n) for n in names), key=lambda v: v.number)

    @property
    def current(self) -> Version:
        file = self.root / CURRENT_FILE
        name = json.loads(file.read_text())["version"] if file.exists() else "v0"
        return self.get(name)

    def set_current(self, name: str) -> None:
        version = self.get(name)
        if version.status != "ready":
            raise ValueError(f"version {name} is {version.status}, not ready to serve")
        write_json_atomically(self.root / CURRENT_FILE, {"version": name})

    def names(self) -> list[str]:
        return [v.name for v in self.all()]

    def next_records(self, total: int) -> tuple[int, int]:
        """The records a new version trains on: those after the newest version that did not fail. A failed
        version's records are not trained on, so the next version takes them (and supersedes it)."""
        return (max(v.records[1] for v in self.all() if v.status != "failed"), total)


@dataclasses.dataclass
class RetrainStatus:
    """What the page shows about retraining."""

    state: str = "idle"  # "idle", "training", "swapping", "failed"
    version: str | None = None
    stage: str | None = None
    # while training: "waiting" (for an earlier trainer to stop), "compiling" (before the first step: loading and
    # compiling), "training", "finishing" (after the last step: the checkpoint, evaluation and export)
    phase: str | None = None
    step: int = 0
    steps: int = 0
    message: str = ""


class RetryRefused(Exception):
    """:meth:`Retrainer.retry` cannot train that version again now; ``busy`` when only waiting would help."""

    def __init__(self, message: str, *, busy: bool = False):
        super().__init__(message)
        self.busy = busy


class _Stopped(Exception):
    """The app is stopping: the version resumes at the next start."""


class Retrainer:
    """Trains a new version in a background thread when enough feedback has arrived, then hot-swaps it in.

    Args:
        root: the app's output directory.
        store: the feedback store (``len(store)`` records, ``store.records()``).
        versions: the version directories.
        export: ``export(records, directory) -> {stage: (file, examples)}`` writes a version's training data
            (:func:`export_feedback`).
        swap: ``swap(model_path, version_name)`` loads a version and serves it (blocking until it does).
        threshold: new records that trigger a retraining (``auto``), at least 1.
        auto: retrain by itself once ``threshold`` new records wait; otherwise only on :meth:`start`.
        overrides: extra ``key=value`` settings for every stage (e.g. ``train.optimizer.learning_rate=1e-4``),
            given after the app's own, so they win.
    """

    def __init__(self, root: Path, store, versions: Versions, *, swap: Callable[[str | None, str], None],
                 export: Callable = export_feedback, threshold: int = 20, auto: bool = True,
                 overrides: tuple[str, ...] = ()):
        if threshold < 1:
            raise ValueError(f"--retrain-threshold must be >= 1, got {threshold}")
        self.root = Path(root).resolve()
        self.store = store
        self.versions = versions
        self.export = export
        self.swap = swap
        self.threshold = threshold
        self.auto = auto
        self.overrides = tuple(overrides)
        self.status = RetrainStatus()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._process: subprocess.Popen | None = None
        self._stopping = False

    @property
    def waiting(self) -> int:
        """Records not yet trained on by any version."""
        start, end = self.versions.next_records(len(self.store))
        return end - start

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def resume(self) -> None:
        """At start-up, finish what a crash interrupted: a version still training resumes (its stages from their
        checkpoints); the newest version, if it failed, is trained again (a restart is how a person retries after
        fixing the cause); one trained but never served (a stop between the two) is served. A version that was
        served and then rolled back from stays as it is."""
        versions = self.versions.all()
        unfinished = [v for v in versions if v.status == "training"]
        if unfinished:
            log.info("resuming the retraining of %s", unfinished[-1].name)
            self._launch(unfinished[-1])
            return
        newest = versions[-1]
        if newest.status == "failed":
            log.info("training %s again: it failed before the app stopped (%s)", newest.name, newest.error)
            try:
                self.retry(newest.name)
            except RetryRefused as refusal:
                log.warning("not retrying %s: %s", newest.name, refusal)
        elif newest.status == "ready" and newest.served is None and newest.parent == self.versions.current.name:
            log.info("serving %s: it was trained, but the app stopped before serving it", newest.name)
            self._launch(newest)  # its stages are done: straight to the swap

    def feedback_added(self) -> None:
        """Called after every confirmed record: start a version when ``threshold`` new records wait."""
        if self.auto and self.waiting >= self.threshold:
            self.start()

    def start(self) -> str | None:
        """Train a new version on the waiting records now (returns its name; None when busy or nothing waits)."""
        with self._lock:
            if self.busy or self._stopping:
                return None
            records = self.versions.next_records(len(self.store))
            if records[1] <= records[0]:
                return None
            parent = self.versions.current
            name = f"v{max(v.number for v in self.versions.all()) + 1}"
            version = Version(name, parent.name, "training", records=records,
                              stages=self._snapshot(name, records))
            self.versions.save(version)  # the data snapshot is complete before the version exists
            for failed in self.versions.all():  # their records are this version's now: never trained twice
                if failed.status == "failed" and failed.records[0] >= records[0]:
                    self.versions.save(dataclasses.replace(failed, status="superseded", superseded_by=name))
                    log.info("%s takes the records of %s, which failed (%s)", name, failed.name, failed.error)
            self._launch(version)
            return name

    def retry(self, name: str) -> str:
        """Train the failed version ``name`` again, on the same records, from the version served now.

        Stages that finished are kept when the parent is unchanged; the failed attempt's other runs move to
        ``vN/attempt-<k>/`` (kept for their logs), and those stages start afresh with a new data snapshot.

        Raises:
            RetryRefused: no such version, it did not fail, or a retraining (or a trainer) is still running.
        """
        with self._lock:
            if self._stopping:
                raise RetryRefused("the app is stopping", busy=True)
            if self.busy:
                raise RetryRefused(f"{self.status.version} is still training; retry when it is done", busy=True)
            if name not in self.versions.names():
                raise RetryRefused(f"no version {name!r}; the versions are {self.versions.names()}")
            version = self.versions.get(name)
            if version.status == "superseded":
                raise RetryRefused(f"version {name} failed and {version.superseded_by} trained on its records "
                                   "since: nothing is left to retry")
            if version.status != "failed":
                raise RetryRefused(f"version {name} is {version.status}: only a failed version can be retried")
            directory = self.versions.path(name)
            for stage in STAGES:  # a trainer of an earlier app may still be stopping in one of them
                lock = DirectoryLock(directory / f"{stage}.lock")
                if not lock.acquire():
                    raise RetryRefused(f"a trainer (pid {lock.holder}) is still running {name}/{stage}", busy=True)
                lock.release()
            parent = self.versions.current
            kept = {stage: info for stage, info in version.stages.items()
                    if info.get("status") == "done" and parent.name == version.parent}
            attempt = directory / f"attempt-{version.attempts}"
            for stage in STAGES:
                if stage not in kept and (directory / stage).exists():
                    attempt.mkdir(exist_ok=True)
                    os.replace(directory / stage, attempt / stage)
            stages = self._snapshot(name, version.records) | kept
            version = dataclasses.replace(version, parent=parent.name, status="training", stages=stages, model=None,
                                          error=None, finished=None, served=None, attempts=version.attempts + 1)
            self.versions.save(version)
            log.info("retrying %s (attempt %d) from %s", name, version.attempts, parent.name)
            self._launch(version)
            return name

    def stop(self, timeout: float = 10.0) -> None:
        """Stop a running stage (SIGTERM to its process group: it saves a checkpoint and resumes from it at the
        next start); waits up to ``timeout`` seconds for the retraining thread."""
        self._stopping = True
        process = self._process
        if process is not None and process.returncode is None:
            signal_group(process.pid, signal.SIGTERM)
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the background thread ----------------------------------------------------------------------------

    def _snapshot(self, name: str, records: tuple[int, int]) -> dict[str, dict]:
        """Write the version's training data from its records; its stages, pending or skipped."""
        written = self.export(self.store.records()[records[0]:records[1]], self.versions.path(name) / "data")
        return {stage: {"data": str(Path(file).resolve()), "examples": count,
                        "status": "pending" if count else "skipped"}
                for stage, (file, count) in written.items()}

    def _launch(self, version: Version) -> None:
        self.status = RetrainStatus("training", version.name, message=f"training {version.name}")
        self._thread = threading.Thread(target=self._train, args=(version,), name="jaxalign-retrain", daemon=True)
        self._thread.start()

    def _train(self, version: Version) -> None:
        try:
            model = self.versions.get(version.parent).model
            for stage in STAGES:
                info = version.stages.get(stage)
                if info is None or info["status"] == "skipped":
                    continue
                if info["status"] != "done":
                    self._run_stage(version, stage, info, model)
                    info["status"] = "done"
                    self.versions.save(version)
                model = str(self.versions.path(version.name) / stage / EXPORT_DIR)
            if model == self.versions.get(version.parent).model:
                raise RuntimeError("no stage had data to train on")
            version.model = model
            self.status = dataclasses.replace(self.status, state="swapping", stage=None, phase=None,
                                              message=f"loading {version.name}")
            version.status, version.finished = "ready", time.time()
            self.versions.save(version)
            self.swap(model, version.name)
            self.versions.set_current(version.name)
            version.served = time.time()
            self.versions.save(version)
            self.status = RetrainStatus(message=f"{version.name} is served")
            log.info("%s trained and served", version.name)
        except Exception as error:
            if self._stopping:
                self.status = RetrainStatus(message=f"{version.name} stopped; it resumes at the next start")
                return
            log.exception("retraining %s failed", version.name)
            version.status, version.error = "failed", f"{type(error).__name__}: {error}"
            self.versions.save(version)
            self.status = RetrainStatus("failed", version.name, message=f"{version.name} failed: {error}")

    def stage_command(self, version: Version, stage: str, info: dict, model: str | None) -> list[str]:
        """The ``jaxalign train`` command line of one stage (every path absolute; the user's settings last)."""
        directory = self.versions.path(version.name) / stage
        data = self.versions.path(version.name) / "data" / Path(info["data"]).name  # wherever it was recorded
        steps = EPOCHS * math.ceil(info["examples"] / BATCH_SIZE)
        command = [sys.executable, "-m", "jaxalign.cli", "train", stage, "--config", PRESET,
                   f"output_dir={directory}", f"data.source={data}", f"data.batch_size={BATCH_SIZE}",
                   f"train.total_steps={steps}", f"model.path={'null' if model is None else model}",
                   *self.overrides]
        if directory.exists():
            command.append("--resume")  # an interrupted stage continues from its checkpoints
        return command

    def planned_steps(self, info: dict) -> int:
        """The stage's training steps: the user's ``train.total_steps`` if set, else epochs x batches."""
        settings = {key.strip(): value for key, value in (item.split("=", 1) for item in self.overrides if "=" in item)}
        steps, batch = settings.get("train.total_steps", "").strip(), settings.get("data.batch_size", "").strip()
        if steps.isdigit():
            return int(steps)
        return EPOCHS * math.ceil(info["examples"] / (int(batch) if batch.isdigit() and int(batch) else BATCH_SIZE))

    def _take_lock(self, version: Version, stage: str) -> DirectoryLock:
        """The stage's lock, once no other trainer holds it (the page says whom it waits for meanwhile)."""
        lock = DirectoryLock(self.versions.path(version.name) / f"{stage}.lock")
        while not lock.acquire():
            if self._stopping:
                raise _Stopped()
            holder = lock.holder
            self.status = dataclasses.replace(
                self.status, stage=stage, phase="waiting",
                message=f"{version.name}: waiting for the {stage} trainer that the last run left behind"
                        f"{f' (process {holder})' if holder else ''} to save and stop")
            time.sleep(LOCK_POLL_S)
        return lock

    def _run_stage(self, version: Version, stage: str, info: dict, model: str | None) -> None:
        directory = self.versions.path(version.name) / stage
        lock = self._take_lock(version, stage)
        try:
            if self._stopping:
                raise _Stopped()
            command = self.stage_command(version, stage, info, model)
            info["steps"] = steps = self.planned_steps(info)
            self.versions.save(version)
            self.status = dataclasses.replace(self.status, stage=stage, phase="compiling", step=0, steps=steps,
                                              message=f"training {version.name}: {stage}")
            directory.mkdir(parents=True, exist_ok=True)
            log.info("%s: %s", version.name, " ".join(command))
            started = time.perf_counter()
            with open(directory / "train.log", "ab") as output:
                self._process = spawn(command, stdout=output, stderr=subprocess.STDOUT, pass_fds=(lock.fd,))
            lock.hand_over(self._process.pid)
        finally:
            lock.release()
        # wait4, not poll: it also gives the stage's peak memory, which version.json records.
        while not (ended := os.wait4(self._process.pid, os.WNOHANG))[0]:
            self._progress(version, stage, info, directory)
            time.sleep(0.5)
        _, wait_status, usage = ended
        self._process.returncode = os.waitstatus_to_exitcode(wait_status)  # reaped here: Popen must not wait
        self._progress(version, stage, info, directory)
        info["seconds"] = round(time.perf_counter() - started, 1)
        info["peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)  # Linux reports KiB
        if self._process.returncode != 0:
            tail = (directory / "train.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise RuntimeError(f"jaxalign train {stage} exited with {self._process.returncode}: "
                               f"{tail[0] if tail else ''} (see {directory.relative_to(self.root)}/train.log)")

    def _progress(self, version: Version, stage: str, info: dict, directory: Path) -> None:
        """The stage's step from its metrics, and its step count from its resolved config once written."""
        steps = _resolved_steps(directory / "run.json")
        if steps is not None and steps != info.get("steps"):
            info["steps"] = steps
            self.versions.save(version)
        step, steps = _steps_done(directory / "metrics.jsonl"), info.get("steps", 0)
        phase = "compiling" if not step else "finishing" if steps and step >= steps else "training"
        self.status = dataclasses.replace(self.status, step=step, steps=steps, phase=phase)


def _steps_done(metrics: Path) -> int:
    """The last step logged in a run's metrics.jsonl (0 before the first)."""
    try:
        lines = metrics.read_text().strip().splitlines()
        return int(json.loads(lines[-1]).get("step", 0)) if lines else 0
    except (OSError, ValueError):
        return 0


def _resolved_steps(run_json: Path) -> int | None:
    """``train.total_steps`` of a run's resolved config (run.json), None before it is written."""
    try:
        return int(json.loads(run_json.read_text())["config"]["train"]["total_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
