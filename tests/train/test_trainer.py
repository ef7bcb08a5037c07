"""The training loop: stop-and-save on a signal then resume, the non-finite guard (raise or skip), metrics
files, and the errors that protect an exact resume."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import warnings

import jax
import numpy as np
import pytest

from jaxalign.train import (
    CheckpointConfig,
    LogConfig,
    NonFiniteError,
    TrainConfig,
    Trainer,
    TrainingInterrupted,
    TrainStep,
    make_optimizer,
)
from jaxalign.train.checkpoint import CONFIG_FILE
from jaxalign.train.metrics import METRICS_FILE
from jaxalign.train.signals import StopSignals
from tests.train.test_step import model_params, poisonable_objective
from tests.train.tiny import BATCH, SGD, TINY, TinyBatches, sft_objective, tiny_model


class SignalAt(TinyBatches):
    """Sends ``signum`` to this process while handing out the batch at position ``at``."""

    def __init__(self, *args, at: int, signum: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.at, self.signum = at, signum

    def __next__(self):
        if self.position == self.at:
            os.kill(os.getpid(), self.signum)
        return super().__next__()


class PoisonAt(TinyBatches):
    """Batches for ``poisonable_objective``; the one at position ``at`` gets a NaN loss."""

    def __init__(self, *args, at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.at = at

    def __next__(self):
        poison = float(self.position == self.at)
        batch = super().__next__()
        rows = batch["tokens"].shape[0]
        return {**batch, "poison_loss": np.full(rows, poison, np.float32), "poison_grad": np.zeros(rows, np.float32)}


def config(tmp_path, total_steps: int, **changes) -> TrainConfig:
    defaults = {"optimizer": SGD,
                "checkpoint": CheckpointConfig(directory=str(tmp_path / "checkpoints"), save_every_steps=100),
                "log": LogConfig(directory=str(tmp_path / "logs"), progress_bar=False)}
    return TrainConfig(total_steps=total_steps, **(defaults | changes))


def logged(tmp_path) -> list[dict]:
    with open(tmp_path / "logs" / METRICS_FILE) as file:
        return [json.loads(line) for line in file]


def test_sigint_saves_the_last_step_then_a_new_run_resumes_from_it(tmp_path):
    trainer = Trainer(config(tmp_path, 5), tiny_model(), sft_objective, SignalAt(BATCH, at=2, signum=signal.SIGINT))
    # What the process started with: the default handler, or SIG_IGN under `nohup ... &` in a script.
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as interrupted:
        trainer.run()
    assert interrupted.value.code == 130 and interrupted.value.step == 3
    assert trainer.checkpointer.all_steps() == [3]
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    assert [record["step"] for record in logged(tmp_path)] == [1, 2, 3]

    run_record = (tmp_path / "checkpoints" / CONFIG_FILE).read_text()
    with pytest.raises(ValueError, match="already holds checkpoints"):
        Trainer(config(tmp_path, 5, seed=999, checkpoint=CheckpointConfig(directory=str(tmp_path / "checkpoints"),
                                                                          resume=False)),
                tiny_model(), sft_objective, TinyBatches(BATCH))
    # The refused run left the directory's record of the run it holds alone.
    assert (tmp_path / "checkpoints" / CONFIG_FILE).read_text() == run_record

    data = TinyBatches(BATCH)
    resumed = Trainer(config(tmp_path, 5), tiny_model(), sft_objective, data)
    state = resumed.run()
    assert int(state.step) == 5 and data.position == 5
    assert resumed.checkpointer.all_steps() == [3, 5]
    assert [record["step"] for record in logged(tmp_path)] == [1, 2, 3, 4, 5]
    logits, _ = resumed.trained_model()(np.zeros((1, 3), np.int32))
    assert np.isfinite(np.asarray(logits)).all()


def test_a_resume_warns_of_every_changed_setting_and_only_those(tmp_path):
    # The model's config and the script's metadata hold tuples, which the checkpoint reads back as lists.
    experiment = {"beta": 0.1, "layers": (0, 1), "data": {"path": "a.jsonl"}}
    Trainer(config(tmp_path, 2), tiny_model(), sft_objective, TinyBatches(BATCH),
            extra_metadata={"experiment": experiment}).run()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(config(tmp_path, 2), tiny_model(), sft_objective, TinyBatches(BATCH),
                extra_metadata={"experiment": experiment}).run()
    assert not [warning for warning in caught if "differs" in str(warning.message)]

    changed = {**experiment, "beta": 0.2, "data": {"path": "b.jsonl"}}
    with pytest.warns(UserWarning) as caught:
        state = Trainer(config(tmp_path, 3), tiny_model(config=TINY.with_policy(remat="full")), sft_objective,
                        TinyBatches(BATCH), extra_metadata={"experiment": changed}).run()
    messages = [str(warning.message) for warning in caught if "differs" in str(warning.message)]
    assert messages == ["resuming step 2 with a config that differs in ['total_steps'], model ['remat'], "
                        "extra ['experiment.beta', 'experiment.data.path']"]
    assert int(state.step) == 3


def test_a_resume_ignores_how_the_run_starts_and_the_old_copy_of_the_train_config():
    from jaxalign.train.trainer import _resume_changes

    train = {"total_steps": 2, "checkpoint": {"resume": False}}
    old = {"config": train, "extra": {"run": {"loss": {"beta": 0.1}, "train": train}}}  # before commit 9ce7cb7
    resumed = {"config": {"total_steps": 2, "checkpoint": {"resume": True}}, "extra": {"run": {"loss": {"beta": 0.1}}}}
    assert _resume_changes(old, resumed) == ""
    changed = {"config": {"total_steps": 3, "checkpoint": {"resume": True}}, "extra": {"run": {"loss": {"beta": 0.2}}}}
    assert _resume_changes(old, changed) == "['total_steps'], extra ['run.loss.beta']"
    # A run that still records a train section of its own has it compared.
    assert _resume_changes(old, {**resumed, "extra": {"run": {"loss": {"beta": 0.1}, "train": {}}}}) == (
        "extra ['run.train.checkpoint', 'run.train.total_steps']")


def test_a_non_finite_loss_stops_the_run_naming_the_step(tmp_path):
    trainer = Trainer(config(tmp_path, 5), tiny_model(), poisonable_objective, PoisonAt(BATCH, at=2))
    with pytest.raises(NonFiniteError, match="non-finite loss at step 3") as error:
        trainer.run()
    assert error.value.step == 3 and error.value.data_position["position"] == 3
    assert trainer.checkpointer.all_steps() == []  # nothing after the bad step is saved


def test_skip_drops_the_non_finite_update_and_goes_on(tmp_path, capfd):
    run = config(tmp_path, 4, on_nonfinite="skip",
                 log=LogConfig(directory=str(tmp_path / "logs"), progress_bar=True))
    trainer = Trainer(run, tiny_model(), poisonable_objective, PoisonAt(BATCH, at=2))
    with pytest.warns(UserWarning, match="step 3: non-finite loss"):
        state = trainer.run()
    assert int(state.step) == 4
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(jax.device_get(state.params)))
    records = logged(tmp_path)
    assert [record["finite"] for record in records] == [True, True, False, True]
    assert records[2]["loss"] is None and records[3]["loss"] > 0
    assert {"learning_rate", "step_time", "tokens_per_second", "grad_norm", "nll"} <= set(records[0])
    assert "4/4" in capfd.readouterr().err  # the progress bar


def test_only_the_logged_steps_measure_the_update_ratio(tmp_path, monkeypatch):
    # No divergence guard: it would measure the ratio on every step.
    run = config(tmp_path, 5, max_update_ratio=None,
                 log=LogConfig(directory=str(tmp_path / "logs"), progress_bar=False, every_steps=2))
    trainer = Trainer(run, tiny_model(), sft_objective, TinyBatches(BATCH))
    asked, measured, call = [], [], TrainStep.__call__

    def recorded(step, state, batch, **kwargs):
        asked.append(kwargs)
        state, metrics = call(step, state, batch, **kwargs)
        measured.append("update_ratio" in metrics)
        return state, metrics

    monkeypatch.setattr(TrainStep, "__call__", recorded)
    trainer.run()
    logged_steps = [False, True, False, True, True]
    assert asked == [{"with_update_ratio": logged_step} for logged_step in logged_steps]
    assert measured == logged_steps
    records = logged(tmp_path)
    assert [record["step"] for record in records] == [2, 4, 5]
    assert all(record["update_ratio"] > 0 for record in records)


def test_a_custom_optimizer_replaces_the_configured_one(tmp_path):
    # The configured schedule would give the first update a rate of 0 (warm-up); the custom one does not.
    run = config(tmp_path, 1, optimizer=dataclasses.replace(SGD, schedule="linear", warmup_steps=10))
    model = tiny_model()
    trainer = Trainer(run, model, sft_objective, TinyBatches(BATCH), optimizer=make_optimizer(SGD, total_steps=1))
    trainer.run()
    before, after = model_params(model), model_params(trainer.trained_model())
    assert not np.array_equal(after["lm_head/kernel"], before["lm_head/kernel"])
    assert "learning_rate" not in logged(tmp_path)[0]  # the config's schedule is not the one in use


def test_checkpointing_needs_a_resumable_data_iterator(tmp_path):
    with pytest.raises(ValueError, match="no state_dict"):
        Trainer(config(tmp_path, 2), tiny_model(), sft_objective, iter([]))
    with pytest.raises(RuntimeError, match="call run"):
        Trainer(config(tmp_path, 2), tiny_model(), sft_objective, TinyBatches(BATCH)).trained_model()


def test_repeated_signals_do_not_interrupt_the_saves(tmp_path, capfd):
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        # The loop: a second SIGTERM right after the first is ignored (it would reach the previous handler,
        # by default the one that kills the process, while the interrupted run's checkpoint is written).
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.received == signal.SIGTERM
        assert received == [] and "SIGTERM ignored" in capfd.readouterr().err
        # The final save of a run that ends normally: a signal while it is being written is ignored too.
        trainer = Trainer(config(tmp_path, 2), tiny_model(), sft_objective, TinyBatches(BATCH))
        save = trainer.checkpointer.save

        def save_while_signalled(step, *args, **kwargs):
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return save(step, *args, **kwargs)

        trainer.checkpointer.save = save_while_signalled
        trainer.run()
        assert received == [] and trainer.checkpointer.all_steps()[-1] == 2
        # The previous handler is back once the run is over.
        os.kill(os.getpid(), signal.SIGTERM)
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
