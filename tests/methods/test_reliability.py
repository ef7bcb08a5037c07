"""Failure paths a user hits: a diverging run stops at the step with the way back, a damaged checkpoint costs
one checkpoint, an earlier run's output directory is never rewritten, and the command ends every failure in
one line (the traceback only with --debug)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxalign.cli import main
from jaxalign.methods import pipeline
from jaxalign.train import CheckpointConfig, LogConfig, TrainConfig, Trainer, TrainingDiverged
from tests.train.tiny import BATCH, SGD, TinyBatches, sft_objective, tiny_model

PAIRS = [("Hi", "sky blue .", "Go away ."), ("sky ?", "blue .", "away"), ("Go", "Hi .", "away away ."),
         ("Hi ?", "blue sky", "Go away")]


def train_config(tmp_path, total_steps: int, learning_rate: float = 0.5, **changes) -> TrainConfig:
    return TrainConfig(total_steps=total_steps, optimizer=dataclasses.replace(SGD, learning_rate=learning_rate),
                       checkpoint=CheckpointConfig(directory=str(tmp_path / "checkpoints"), save_every_steps=1,
                                                   resume=True),
                       log=LogConfig(directory=str(tmp_path / "logs"), progress_bar=False, tensorboard=False),
                       **changes)


def test_a_diverging_update_stops_the_run_keeping_the_last_good_checkpoint(tmp_path):
    """At learning rate 1e6 the loss stays finite while the weights would blow up: the guard refuses the
    update at the step, names it, and points at the last checkpoint to resume from."""
    Trainer(train_config(tmp_path, 2), tiny_model(), sft_objective, TinyBatches(BATCH)).run()
    trainer = Trainer(train_config(tmp_path, 4, learning_rate=1e6), tiny_model(), sft_objective,
                      TinyBatches(BATCH))
    with pytest.warns(UserWarning, match="config that differs"), pytest.raises(TrainingDiverged) as diverged:
        trainer.run()
    message = str(diverged.value)
    assert diverged.value.step == 3 and "training diverged at step 3" in message
    assert np.isfinite(diverged.value.metrics["loss"]) and diverged.value.metrics["update_ratio"] > 1e3
    assert "last good checkpoint, step 2" in message and "--resume" in message
    assert trainer.checkpointer.all_steps() == [1, 2]  # nothing from the diverging step

    # Skipping instead: the update is dropped, the weights stay those of step 2.
    model = tiny_model()
    skip = Trainer(train_config(tmp_path / "skip", 1, learning_rate=1e6, on_nonfinite="skip"), model,
                   sft_objective, TinyBatches(BATCH))
    with pytest.warns(UserWarning, match="step 1: diverging update"):
        skip.run()
    before, after = (jax.tree.leaves(jax.device_get(nnx.state(m, nnx.Param))) for m in (model, skip.trained_model()))
    assert len(before) == len(after) and all(np.array_equal(a, b) for a, b in zip(before, after))


def test_the_guard_can_be_turned_off_and_leaves_ordinary_steps_alone(tmp_path):
    state = Trainer(train_config(tmp_path, 2, max_update_ratio=None, learning_rate=1e6), tiny_model(),
                    sft_objective, TinyBatches(BATCH)).run()
    assert int(state.step) == 2
    records = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert all(record["update_ratio"] > 1e3 for record in records) and "diverging" not in records[0]
    with pytest.raises(ValueError, match="max_update_ratio must be a finite number > 0 or None"):
        train_config(tmp_path, 1, max_update_ratio=float("inf"))


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    """The latest checkpoint's files truncated: the resumed run warns, resumes from the one before, keeps the
    damaged files, and ends where an uninterrupted run ends."""
    straight = Trainer(train_config(tmp_path / "straight", 4), tiny_model(), sft_objective, TinyBatches(BATCH)).run()
    Trainer(train_config(tmp_path, 3), tiny_model(), sft_objective, TinyBatches(BATCH)).run()
    damaged = tmp_path / "checkpoints" / "3"
    for path in (damaged / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 64:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    data = TinyBatches(BATCH)
    trainer = Trainer(train_config(tmp_path, 4), tiny_model(), sft_objective, data)
    with pytest.warns(UserWarning, match=r"checkpoint step 3 .* cannot be read .*resuming from step 2; the damaged "
                                         r"files are kept in .*3\.damaged"):
        state = trainer.run()
    assert (tmp_path / "checkpoints" / "3.damaged").is_dir()  # never deleted
    assert trainer.checkpointer.all_steps()[-2:] == [3, 4] and data.position == 4
    for ours, theirs in zip(jax.tree.leaves(jax.device_get(state.params)),
                            jax.tree.leaves(jax.device_get(straight.params))):
        np.testing.assert_array_equal(ours, theirs)


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS))
    return path


def train(capsys, checkpoint, pairs_file, out, *extra, method="sft") -> tuple[int, str]:
    status = main(["train", method, "--config", "sentiment", f"model.path={checkpoint}", f"data.source={pairs_file}",
                   f"output_dir={out}", "data.batch_size=2", "data.max_length=32", "train.total_steps=2",
                   "train.log.progress_bar=false", "train.log.tensorboard=false", "eval_data=null", *extra])
    return status, capsys.readouterr().err


def test_every_failure_is_one_line_and_debug_shows_the_traceback(checkpoint, pairs_file, tmp_path, capsys,
                                                                 monkeypatch):
    status, err = train(capsys, checkpoint, pairs_file, tmp_path / "lr", "train.optimizer.learning_rate=1e6")
    assert status == 1 and "Traceback" not in err
    # (step 1 of the preset's warm-up has learning rate 0)
    assert err.strip().splitlines()[-1].startswith("jaxalign train: error: training diverged at step 2: ")
    for setting, key in (("train.optimizer.learning_rate=.inf", "learning_rate"), ("loss.label_smoothing=.nan",
                                                                                  "loss.label_smoothing")):
        status, err = train(capsys, checkpoint, pairs_file, tmp_path / "bad", setting)
        assert status == 2 and key in err and "finite" in err and not (tmp_path / "bad").exists(), err
    # Anything unexpected: its type, its message on one line, and where the traceback is.
    def broken(config, **_):
        raise RuntimeError("an internal failure\nover two lines")

    monkeypatch.setattr(pipeline, "run", broken)
    status, err = train(capsys, checkpoint, pairs_file, tmp_path / "broken")
    assert status == 1 and err.strip().splitlines()[-1] == (
        "jaxalign train: error: RuntimeError: an internal failure over two lines (rerun with --debug for the "
        "traceback)")
    monkeypatch.setenv("JAXALIGN_DEBUG", "1")
    with pytest.raises(RuntimeError, match="an internal failure"):
        train(capsys, checkpoint, pairs_file, tmp_path / "broken")
    monkeypatch.undo()
    with pytest.raises(TrainingDiverged):
        main(["--debug", "train", "sft", "--config", "sentiment", f"model.path={checkpoint}",
              f"data.source={pairs_file}", f"output_dir={tmp_path / 'debug'}", "data.batch_size=2",
              "train.optimizer.learning_rate=1e6", "train.log.progress_bar=false", "eval_data=null"])


def test_an_earlier_run_is_never_rewritten_without_resume_or_overwrite(checkpoint, pairs_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(capsys, checkpoint, pairs_file, out)[0] == 0
    (out / "notes.txt").write_text("mine")
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    status, err = train(capsys, checkpoint, pairs_file, out, "train.total_steps=3")
    assert status == 2 and "already holds a run" in err and "--overwrite" in err
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before  # nothing touched
    # A linear-probe reward run (no checkpoints) is protected as well.
    probe = tmp_path / "probe"
    assert train(capsys, checkpoint, pairs_file, probe, "normalize_samples=0", method="reward")[0] == 0
    exported = (probe / "export" / "reward_model.json").read_bytes()
    status, err = train(capsys, checkpoint, pairs_file, probe, "normalize_samples=0", "probe_l2=3", method="reward")
    assert status == 2 and (probe / "export" / "reward_model.json").read_bytes() == exported
    # --overwrite replaces the run's own files and leaves the user's.
    assert train(capsys, checkpoint, pairs_file, out, "train.total_steps=3", "--overwrite")[0] == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3] and (out / "notes.txt").read_text() == "mine"


def test_background_thread_tracebacks_do_not_bury_the_error_line(checkpoint, pairs_file, tmp_path, capsys,
                                                                  monkeypatch):
    """A full disk during an asynchronous checkpoint: Orbax's writer threads log a traceback each (hundreds of
    lines, measured on a 600 kB tmpfs) before the save fails in the main thread. Only the error line shows."""
    import logging
    import threading

    def full_disk(config, **_):
        def writer():
            try:
                raise OSError(28, "No space left on device")
            except OSError:
                logging.getLogger("absl").exception("checkpoint writer failed")
                raise

        thread = threading.Thread(target=writer)
        thread.start()
        thread.join()
        raise OSError(28, "No space left on device: /run/checkpoints/2")

    monkeypatch.setattr(pipeline, "run", full_disk)
    status, err = train(capsys, checkpoint, pairs_file, tmp_path / "full")
    assert status == 2 and err.strip().splitlines() == [
        "jaxalign train: error: [Errno 28] No space left on device: /run/checkpoints/2"]
