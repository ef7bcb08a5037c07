"""The retrainer's recovery at start-up, with a stand-in for the swap (no model): tests/serve/test_hitl.py runs
the real app, its training subprocesses and a SIGKILL during retraining."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest

from jaxalign.serve.children import DirectoryLock
from jaxalign.serve.retrain import Retrainer, RetryRefused, Version, Versions


class Records:
    """The part of a FeedbackStore the retrainer reads."""

    def __init__(self, count: int):
        self.items = list(range(count))

    def __len__(self):
        return len(self.items)

    def records(self):
        return list(self.items)


def retrainer(tmp_path, swaps: list) -> tuple[Retrainer, Versions]:
    versions = Versions(tmp_path, base_model=None)
    return Retrainer(tmp_path, Records(3), versions, swap=lambda path, name: swaps.append((path, name)),
                     threshold=3), versions


def trained(versions: Versions, name: str, parent: str, **fields) -> Version:
    version = Version(name, parent, "ready", records=(0, 3), stages={"sft": {"status": "done", "examples": 3}},
                      model=str(versions.path(name) / "sft" / "export"), **fields)
    versions.save(version)
    return version


def test_a_version_trained_but_never_served_is_served_at_the_next_start(tmp_path):
    swaps = []
    app, versions = retrainer(tmp_path, swaps)
    trained(versions, "v1", "v0")  # a stop came between version.json's "ready" and the swap
    app.resume()
    app._thread.join(10)
    assert swaps == [(str(versions.path("v1") / "sft" / "export"), "v1")]
    assert versions.current.name == "v1" and versions.get("v1").served is not None
    assert app.status.state == "idle" and app.waiting == 0


def test_a_version_rolled_back_from_is_not_served_again(tmp_path):
    swaps = []
    app, versions = retrainer(tmp_path, swaps)
    trained(versions, "v1", "v0", served=1.0)
    versions.set_current("v0")  # the page's "Serve this" on v0
    app.resume()
    assert app._thread is None and swaps == [] and versions.current.name == "v0"


def test_a_version_still_training_resumes_before_anything_else(tmp_path):
    swaps = []
    app, versions = retrainer(tmp_path, swaps)
    version = trained(versions, "v1", "v0")
    versions.save(dataclasses.replace(version, status="training"))  # all stages done, swap not reached
    app.resume()
    app._thread.join(10)
    assert [name for _, name in swaps] == ["v1"] and versions.get("v1").status == "ready"


def fake_export(records, directory):
    """The stand-in store's records as one SFT example each (the real export needs FeedbackRecords)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {"sft": directory / "sft.jsonl", "dpo": directory / "pairs.jsonl", "kto": directory / "unpaired.jsonl"}
    for stage, file in files.items():
        file.write_text("".join(f'{{"n": {r}}}\n' for r in records) if stage == "sft" else "")
    return {stage: (file, len(records) if stage == "sft" else 0) for stage, file in files.items()}


def test_a_version_that_failed_is_retried_at_the_next_start_keeping_its_finished_stages(tmp_path):
    swaps = []
    app, versions = retrainer(tmp_path, swaps)
    app.export = fake_export
    version = trained(versions, "v1", "v0")
    versions.save(dataclasses.replace(version, status="failed", error="RuntimeError: out of memory while loading"))
    app.resume()
    app._thread.join(10)
    again = versions.get("v1")
    assert swaps == [(str(versions.path("v1") / "sft" / "export"), "v1")]
    assert again.status == "ready" and again.error is None and again.attempts == 2 and again.served is not None
    assert versions.current.name == "v1" and app.status.state == "idle"


def failed_v1_of_six_records(tmp_path, monkeypatch) -> tuple[Retrainer, Versions, list]:
    """Six records, v1 trained on the first three and failed; ``_launch`` records the versions instead of training."""
    app, versions = retrainer(tmp_path, [])
    app.store = Records(6)
    app.export = fake_export
    launched = []
    monkeypatch.setattr(app, "_launch", launched.append)
    failed = trained(versions, "v1", "v0")
    versions.save(dataclasses.replace(failed, status="failed", error="RuntimeError: exited with 1"))
    return app, versions, launched


def test_a_retry_starts_from_the_served_version_and_keeps_the_failed_runs_aside(tmp_path, monkeypatch):
    app, versions, launched = failed_v1_of_six_records(tmp_path, monkeypatch)
    (versions.path("v1") / "sft").mkdir()
    (versions.path("v1") / "sft" / "train.log").write_text("the failed attempt's log\n")
    newer = Version("v2", "v0", "ready", records=(3, 6), model="elsewhere", served=1.0)
    versions.save(newer)
    versions.set_current("v2")
    assert app.retry("v1") == "v1"
    again = versions.get("v1")
    assert again.parent == "v2" and again.status == "training" and again.attempts == 2
    assert again.stages["sft"]["status"] == "pending" and again.stages["sft"]["examples"] == 3
    assert (versions.path("v1") / "attempt-1" / "sft" / "train.log").read_text() == "the failed attempt's log\n"
    assert not (versions.path("v1") / "sft").exists()
    assert [v.name for v in launched] == ["v1"]
    with pytest.raises(RetryRefused, match="only a failed version"):
        app.retry("v2")
    with pytest.raises(RetryRefused, match="no version 'v7'"):
        app.retry("v7")


def test_stage_commands_get_absolute_paths_from_a_relative_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    versions = Versions(Path("runs/hitl"), base_model=None)
    app = Retrainer(Path("runs/hitl"), Records(3), versions, swap=lambda path, name: None,
                    overrides=("train.total_steps=2",))
    # as an older app recorded it: relative to the directory it was started from
    info = {"data": "runs/hitl/versions/v1/data/sft.jsonl", "examples": 3, "status": "pending"}
    version = Version("v1", "v0", "failed", records=(0, 3), stages={"sft": info})
    command = app.stage_command(version, "sft", info, None)
    settings = dict(item.split("=", 1) for item in command if "=" in item)
    root = tmp_path / "runs" / "hitl"
    assert settings["output_dir"] == str(root / "versions" / "v1" / "sft")
    assert settings["data.source"] == str(root / "versions" / "v1" / "data" / "sft.jsonl")
    assert command[-1] == "train.total_steps=2"  # the user's setting comes last: it wins
    assert app.planned_steps(info) == 2


def test_a_relative_model_recorded_by_an_older_app_is_the_same_model(tmp_path, monkeypatch):
    """An older app recorded ``--model`` as given (relative); the app now passes it absolute. A restart from the
    same directory resumes the output directory (its feedback and versions), another model is still refused."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models/base").mkdir(parents=True)
    root = Path("runs/hitl")
    Versions(root, base_model="models/base")  # as the older app wrote v0
    versions = Versions(root, base_model=str(tmp_path / "models/base"))
    assert versions.get("v0").model == str(tmp_path / "models/base")
    (tmp_path / "models/other").mkdir()
    with pytest.raises(ValueError, match="was started with --model .*models/base, not .*models/other: use another"):
        Versions(root, base_model=str(tmp_path / "models/other"))


def test_planned_steps_follow_the_users_batch_size_and_the_resolved_config(tmp_path):
    app, versions = retrainer(tmp_path, [])
    info = {"examples": 10}
    assert app.planned_steps(info) == 3 * 3  # three epochs of ceil(10 / 4) batches
    app.overrides = ("data.batch_size=5",)
    assert app.planned_steps(info) == 3 * 2
    version = trained(versions, "v1", "v0")
    run = versions.path("v1") / "sft"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"config": {"train": {"total_steps": 7}}}))
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    app._progress(version, "sft", version.stages["sft"], run)
    assert versions.get("v1").stages["sft"]["steps"] == 7
    assert (app.status.step, app.status.steps, app.status.phase) == (1, 7, "training")


def test_a_stage_another_trainer_holds_is_waited_for_not_shared(tmp_path):
    app, versions = retrainer(tmp_path, [])
    version = trained(versions, "v1", "v0")
    version.stages["sft"]["status"] = "pending"
    versions.save(dataclasses.replace(version, status="training"))
    holder = DirectoryLock(versions.path("v1") / "sft.lock")
    assert holder.acquire()
    os.write(holder.fd, b"4242\n")  # the trainer an earlier app left behind
    try:
        app.resume()
        deadline = time.monotonic() + 10
        while app.status.phase != "waiting" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert app.status.phase == "waiting" and "4242" in app.status.message, app.status
        time.sleep(1.0)
        assert app._process is None and app.busy  # no second trainer, still waiting
        with pytest.raises(RetryRefused, match="still training"):
            app.retry("v1")
    finally:
        app.stop()
        holder.release()
    assert not app.busy and "resumes at the next start" in app.status.message
    assert versions.get("v1").status == "training"


def test_a_failed_version_whose_trainer_still_runs_is_not_retried(tmp_path):
    app, versions = retrainer(tmp_path, [])
    version = trained(versions, "v1", "v0")
    versions.save(dataclasses.replace(version, status="failed", error="x"))
    holder = DirectoryLock(versions.path("v1") / "kto.lock")
    assert holder.acquire()
    try:
        with pytest.raises(RetryRefused, match="still running v1/kto") as caught:
            app.retry("v1")
        assert caught.value.busy
    finally:
        holder.release()
    assert versions.get("v1").status == "failed"


def test_a_new_version_takes_the_records_of_a_failed_one_and_supersedes_it(tmp_path, monkeypatch):
    """v1 failed on records 0-3; three more arrive and v2 starts: it trains on all six (none left untrained), v1
    becomes superseded and cannot be retried (none trained twice), and the next version starts after v2's."""
    app, versions, launched = failed_v1_of_six_records(tmp_path, monkeypatch)
    assert app.waiting == 6
    assert app.start() == "v2"
    newer = versions.get("v2")
    assert newer.records == (0, 6) and newer.stages["sft"]["examples"] == 6
    assert versions.get("v1").status == "superseded" and versions.get("v1").superseded_by == "v2"
    with pytest.raises(RetryRefused, match="v1 failed and v2 trained on its records since"):
        app.retry("v1")
    assert [v.name for v in launched] == ["v2"] and app.waiting == 0
    app.store = Records(8)
    assert versions.next_records(8) == (6, 8)


def test_hitl_model_keeps_a_hub_id_and_makes_a_local_path_absolute(tmp_path, monkeypatch):
    """``jaxalign hitl --model``: a Hub id reaches the stages as written (made a path, it was 'no such file'); a
    local directory is made absolute once, so stages started elsewhere find it."""
    from jaxalign.serve.hitl import model_location

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    assert model_location("HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert model_location("ckpt") == str(tmp_path / "ckpt")
