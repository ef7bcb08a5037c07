"""The one training loop every method runs: resume, step, guard, log, checkpoint, stop on a signal.

::

    trainer = Trainer(config, model, objective, data)       # data: process-local batches, with state_dict()
    state = trainer.run()                                    # resumes from config.checkpoint.directory if it can
    model = trainer.trained_model()

One step: ask the :class:`StepSource` for the step's minibatches, run the jitted
:class:`~jaxalign.train.step.TrainStep` on each, fetch its scalar metrics (the one host synchronisation per
update), stop or warn on a non-finite or diverging update, log the step, save when the policy asks, and,
when SIGTERM/SIGINT arrived on any process, save and exit. An offline method's data is a plain iterator of
batches, one update per step (:class:`BatchPerStep`); an online method's source samples, scores and prepares
an iteration of rows and yields its minibatches (one step = one iteration, many updates). A resumed run
restores the parameters, the optimizer state, the step, the RNG key and the source's ``state_dict()`` (the
data position and any algorithm state), so it continues exactly as if it had not stopped, whatever the method.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from jaxalign.models.sharding import DEFAULT_RULES
from jaxalign.train.checkpoint import Checkpointer, run_metadata
from jaxalign.train.config import MeshConfig, TrainConfig
from jaxalign.train.distributed import any_process
from jaxalign.train.mesh import make_mesh
from jaxalign.train.metrics import MetricsLogger, Throughput
from jaxalign.train.optimizer import make_optimizer, scale_updates_by_path
from jaxalign.train.schedules import make_schedule
from jaxalign.train.signals import StopSignals, TrainingInterrupted
from jaxalign.train.state import TrainState
from jaxalign.train.step import Objective, TrainStep, default_token_count


class NonFiniteError(FloatingPointError):
    """A step produced a non-finite loss or gradient (its update was not applied)."""

    def __init__(self, step: int, metrics: Mapping[str, Any], data_position: Any, resume_hint: str = ""):
        self.step, self.metrics, self.data_position = step, dict(metrics), data_position
        culprit = "loss" if not np.isfinite(metrics["loss"]) else "gradient"
        super().__init__(
            f"non-finite {culprit} at step {step} (loss={metrics['loss']}, grad_norm={metrics['grad_norm']}), "
            f"computed on batch {step} of the run (1-based); the data iterator's position after that batch is "
            f"{data_position!r}. The update was not applied. Set TrainConfig.on_nonfinite='skip' to drop such "
            f"updates and go on.{resume_hint}"
        )


class TrainingDiverged(NonFiniteError):
    """A step's update was far larger than the parameters (``TrainConfig.max_update_ratio``): the run is
    diverging even if its loss looks finite or flat. The update was not applied."""

    def __init__(self, step: int, metrics: Mapping[str, Any], data_position: Any, max_update_ratio: float,
                 resume_hint: str = ""):
        self.step, self.metrics, self.data_position = step, dict(metrics), data_position
        FloatingPointError.__init__(
            self,
            f"training diverged at step {step}: the update was {float(metrics['update_ratio']):.3g} times the "
            f"parameters' norm (train.max_update_ratio={max_update_ratio:g}; loss={float(metrics['loss']):.4g}, "
            f"grad_norm={float(metrics['grad_norm']):.4g}), so it was not applied. Lower "
            f"train.optimizer.learning_rate (or raise train.max_update_ratio if such steps are intended).{resume_hint}"
        )


def resume_hint(checkpointer: Checkpointer | None) -> str:
    """Where the last good checkpoint is and how to continue from it (a sentence for an error message)."""
    if checkpointer is None:
        return " Checkpointing is off: nothing to resume from."
    checkpointer.wait()
    step = checkpointer.latest_step()
    if step is None:
        return " No checkpoint was written before it: rerun from the start."
    return (f" The last good checkpoint, step {step}, is in {checkpointer.directory}: after the fix, rerun with "
            "--resume (CheckpointConfig.resume=True) to continue from it.")


def check_step(config: TrainConfig, step: int, metrics: Mapping[str, Any], data_position: Callable[[], Any],
               checkpointer: Checkpointer | None, unit: str = "step") -> None:
    """Stop (``on_nonfinite="raise"``) or warn and go on (``"skip"``) after a step whose update was refused:
    a non-finite loss or gradient, or a diverging update. Nothing was applied either way."""
    if metrics["finite"] and not metrics.get("diverging", False):
        return
    if config.on_nonfinite == "raise":
        hint = resume_hint(checkpointer)
        if not metrics["finite"]:
            raise NonFiniteError(step, metrics, data_position(), hint)
        raise TrainingDiverged(step, metrics, data_position(), config.max_update_ratio, hint)
    reason = (f"non-finite loss ({metrics['loss']}) or gradient norm ({metrics['grad_norm']})" if not metrics["finite"]
              else f"diverging update ({float(metrics['update_ratio']):.3g} times the parameters' norm)")
    warnings.warn(f"{unit} {step}: {reason}; the update was skipped", stacklevel=3)


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        return [change for key in sorted(set(old) | set(new), key=str)
                for change in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


# What a resume compares between the checkpoint's run metadata and this run's, and how the warning labels each
# section's keys. Versions and devices are left out: a resume on a newer jax or another mesh is expected.
_COMPARED_SECTIONS = {"config": "", "model_config": "model ", "extra": "extra "}
# Train-config keys that say how this run starts, not what it trains: a resumed run sets them by definition.
_HOW_A_RUN_STARTS = frozenset({"checkpoint.resume"})


def _without_the_old_train_copy(saved_extra: Any, current_extra: Any) -> Any:
    """``saved_extra`` without ``run.train`` when this run records none: checkpoints of older versions recorded the
    pipelines' whole run config, a copy of the train config included, which is no setting the resumed run
    changes."""
    def run_of(extra):
        run = extra.get("run") if isinstance(extra, Mapping) else None
        return run if isinstance(run, Mapping) else {}

    if "train" not in run_of(saved_extra) or "train" in run_of(current_extra):
        return saved_extra
    return {**saved_extra, "run": {key: value for key, value in run_of(saved_extra).items() if key != "train"}}


def _resume_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """The settings this run changes from the checkpoint's, as the warning lists them: ``"['total_steps'],
    model ['remat'], extra ['run.loss.beta']"`` (the train config's keys unlabelled), or ``""`` when none.

    ``current`` goes through JSON first, as the checkpoint stored it, so that a tuple compares equal to the list
    it was read back as. ``checkpoint.resume`` is not a change: a resume sets it.
    """
    current = json.loads(json.dumps({section: current.get(section) for section in _COMPARED_SECTIONS}))
    saved = {section: saved.get(section) for section in _COMPARED_SECTIONS}
    saved["extra"] = _without_the_old_train_copy(saved["extra"], current["extra"])
    parts = []
    for section, label in _COMPARED_SECTIONS.items():
        changed = _changed_keys(saved[section], current[section])
        if section == "config":
            changed = [key for key in changed if key not in _HOW_A_RUN_STARTS]
        if changed:
            parts.append(f"{label}{changed}")
    return ", ".join(parts)


class StepSource:
    """What the loop trains on, one step at a time: the step's minibatches, and what to log about it.

    Subclass it for a method whose data depends on the model being trained (online RL samples from the
    current policy). ``state_dict()``/``load_state_dict()`` are saved and restored with every checkpoint: the
    data position and the algorithm's own state (an adaptive KL coefficient, running reward statistics), so
    an exact resume is the same code for every method.
    """

    #: the name of a step in warnings and errors ("iteration" for online RL).
    unit = "step"
    #: optimizer updates per step when no step stops early: the learning-rate schedule's length is
    #: ``total_steps × updates_per_step``.
    updates_per_step = 1

    def start(self, train_step: TrainStep) -> None:
        """Called once by :meth:`Trainer.run` after the state is initialised or restored."""

    def minibatches(self, state: TrainState, step: int) -> Iterator[Any]:
        """The batches of step ``step + 1`` (0-based ``step`` steps done), trained on in order. Raises
        ``StopIteration`` when the data has ended."""
        raise NotImplementedError

    def stop_early(self, metrics: Mapping[str, Any]) -> bool:
        """After each update: True ends the step's remaining minibatches (e.g. PPO's approx-KL target)."""
        del metrics
        return False

    def step_metrics(self, state: TrainState, step: int, updates: list[Mapping[str, Any]]) -> dict[str, Any]:
        """What to log for the step, from the metrics of its updates (host scalars, in order)."""
        del state, step
        return dict(updates[-1])

    def ended_message(self, step: int, total_steps: int) -> str:
        """The error message when the data ends at ``step`` before ``total_steps``."""
        return f"the data ended after {self.unit} {step}, before total_steps={total_steps}"

    def state_dict(self) -> Any:
        """The data position, JSON-serialisable, saved with every checkpoint (None: nothing to save)."""
        return None

    def load_state_dict(self, values: Any) -> None:
        """Restore the position :meth:`state_dict` returned, before the first step of a resumed run."""
        del values

    @property
    def resumable(self) -> bool:
        """Whether :meth:`StepSource.state_dict` captures the position, so a checkpoint can resume exactly."""
        return True


class BatchPerStep(StepSource):
    """An iterable of batches as a :class:`StepSource`: one batch, one update, one logged step."""

    def __init__(self, data: Iterable):
        self.data = data
        self._batches: Iterator | None = None

    def start(self, train_step: TrainStep) -> None:
        self._batches = iter(self.data)

    def minibatches(self, state: TrainState, step: int) -> Iterator[Any]:
        return iter([next(self._batches)])

    def state_dict(self) -> Any:
        """The iterable's own ``state_dict()``, or None when it has none (then the run cannot resume exactly)."""
        return self.data.state_dict() if hasattr(self.data, "state_dict") else None

    def load_state_dict(self, values: Any) -> None:
        """Hand a saved position back to the iterable's ``load_state_dict``."""
        if values is not None:
            self.data.load_state_dict(values)

    @property
    def resumable(self) -> bool:
        return hasattr(self.data, "state_dict") and hasattr(self.data, "load_state_dict")


class Trainer:
    """Runs ``config.total_steps`` steps of ``objective`` on ``model`` over ``data``.

    Args:
        config: the run (optimizer, mesh, micro-batches, checkpoints, logging, non-finite policy).
        model: the NNX model to train (the initial parameters when not resuming).
        objective: see :class:`~jaxalign.train.step.TrainStep`.
        data: an iterator of batches (dicts of NumPy arrays holding this process's rows), or a
            :class:`StepSource`. When checkpointing, it must have ``state_dict()`` (JSON-serialisable) and
            ``load_state_dict()``, like jaxalign.data's iterators: its position is saved with every checkpoint.
        references: frozen models passed to the objective by name (e.g. ``{"ref": ref_model}``).
        trainable: NNX filter of the parameters to train (see :class:`TrainStep`).
        optimizer: an optax optimizer; default :func:`make_optimizer` of ``config.optimizer`` over
            ``total_steps × data.updates_per_step`` updates.
        update_scales: ``{module name: factor}``: the updates of parameters under a module of that name are
            multiplied by the factor (e.g. a critic's learning rate apart from the policy's).
        rules: partition table for the models.
        count_tokens: ``batch -> tokens`` for throughput.
        extra_metadata: recorded in every checkpoint's metadata (e.g. the experiment's own config).
        label: what the progress bar says is being trained (a method's name, ``"dpo"``); default ``"train"``.

    Attributes:
        config: ``config`` with the mesh sizes resolved.
        mesh, train_step, checkpointer (None without a checkpoint directory), metadata.
        state: the final state after :meth:`run`.
    """

    def __init__(self, config: TrainConfig, model: nnx.Module, objective: Objective, data: Iterable, *,
                 references: Mapping[str, nnx.Module] | None = None, trainable: Any = nnx.Param,
                 optimizer: optax.GradientTransformation | None = None, rules: Mapping = DEFAULT_RULES,
                 count_tokens: Callable[[Any], Any] = default_token_count,
                 extra_metadata: Mapping[str, Any] | None = None, update_scales: Mapping[str, float] | None = None,
                 label: str = "train"):
        self.label = label
        self.mesh = make_mesh(config.mesh)
        self.config = dataclasses.replace(config, mesh=MeshConfig(*self.mesh.devices.shape))
        self.data = data
        self.source = data if isinstance(data, StepSource) else BatchPerStep(data)
        total_updates = config.total_steps * self.source.updates_per_step
        # The logged learning rate is the config's schedule, so there is none to log for a custom optimizer.
        self.schedule = None if optimizer else make_schedule(config.optimizer, total_updates)
        optimizer = optimizer or make_optimizer(config.optimizer, total_updates)
        if update_scales:
            optimizer = optax.chain(optimizer, scale_updates_by_path(update_scales))
        self.train_step = TrainStep(
            objective, model, optimizer, mesh=self.mesh,
            trainable=trainable, micro_batches=config.micro_batches, references=references, rules=rules,
            count_tokens=count_tokens, max_update_ratio=config.max_update_ratio,
        )
        self.metadata = run_metadata(self.config, self.mesh, model_config=getattr(model, "config", None),
                                     extra=extra_metadata)
        self.checkpointer = None
        self.state: TrainState | None = None
        checkpoint = config.checkpoint
        if checkpoint.directory is not None:
            if not self.source.resumable:
                raise ValueError(
                    f"checkpointing to {checkpoint.directory} needs the data position for an exact resume, but "
                    f"{type(data).__name__} has no state_dict()/load_state_dict(); use a resumable iterator "
                    "(jaxalign.data's are) or set CheckpointConfig.directory=None"
                )
            # Raises, before writing anything, when resume=False and the directory holds checkpoints.
            self.checkpointer = Checkpointer(checkpoint, self.metadata)

    def run(self) -> TrainState:
        """Train to ``config.total_steps`` (resuming if a checkpoint exists) and return the final state.

        Raises:
            NonFiniteError: a non-finite loss or gradient with ``on_nonfinite="raise"``.
            TrainingInterrupted: SIGTERM/SIGINT arrived; the checkpoint of the last completed step is on
                disk. It is a ``SystemExit`` (status 143 / 130), so an uncaught one ends the script quietly.
        """
        state, step = self._start()
        config = self.config
        source = self.source
        source.start(self.train_step)
        logger = MetricsLogger(config.log, total_steps=config.total_steps, start_step=step, run_config=self.metadata,
                               description=self.label, unit=source.unit)
        throughput = Throughput()
        save_on_signal = self.checkpointer is not None and config.checkpoint.save_on_signal
        # The signal handlers stay installed until every save, the final one included, is on disk: a
        # repeated SIGTERM/SIGINT is then ignored instead of killing the process mid-save.
        with StopSignals() if save_on_signal else contextlib.nullcontext() as stop:
            try:
                while step < config.total_steps:
                    try:
                        minibatches = source.minibatches(state, step)
                    except StopIteration:
                        warnings.warn(source.ended_message(step, config.total_steps), stacklevel=2)
                        break
                    logged = (step + 1) % config.log.every_steps == 0 or step + 1 == config.total_steps
                    state, updates = self._updates(state, step + 1, minibatches, logged)
                    step += 1
                    throughput.step_done(sum(float(update.get("tokens", 0.0)) for update in updates))
                    metrics = source.step_metrics(state, step, updates)
                    if logged:
                        logger.log(step, self._with_rates(state, metrics, throughput))
                    logger.advance()
                    if self.checkpointer is not None and self.checkpointer.should_save(step):
                        self.checkpointer.save(step, state, source)
                    if save_on_signal and any_process(stop.received is not None):
                        self.checkpointer.save(step, state, source)
                        self.checkpointer.wait()
                        raise TrainingInterrupted(stop.received or signal.SIGTERM, step)
                if self.checkpointer is not None:
                    self.checkpointer.save(step, state, source)
            finally:
                if self.checkpointer is not None:
                    self.checkpointer.wait()
                logger.close()
        self.state = state
        return state

    def _updates(self, state: TrainState, step: int, minibatches: Iterator[Any], logged: bool,
                 ) -> tuple[TrainState, list[dict[str, Any]]]:
        """One step's updates, each checked before the next (a refused update stops or is skipped); only a
        logged step measures ``update_ratio``, which costs passes over every parameter (TrainStep)."""
        updates = []
        for batch in minibatches:
            state, device_metrics = self.train_step(state, batch, with_update_ratio=logged)
            metrics = jax.device_get(device_metrics)
            check_step(self.config, step, metrics, self.source.state_dict, self.checkpointer, unit=self.source.unit)
            updates.append(metrics)
            if self.source.stop_early(metrics):
                break
        return state, updates

    def trained_model(self) -> nnx.Module:
        """The model with the final parameters (after :meth:`run`)."""
        if self.state is None:
            raise RuntimeError("Trainer.trained_model() needs a finished run(): call run() first")
        return self.train_step.trained_model(self.state)

    def _start(self) -> tuple[TrainState, int]:
        checkpointer = self.checkpointer
        if checkpointer is None or not self.config.checkpoint.resume or checkpointer.latest_step() is None:
            return self.train_step.init(self.config.seed), 0
        # The initial parameters are not needed: free them before the restored copy arrives.
        self.train_step.discard_initial_values()
        restored = checkpointer.restore(self.train_step.abstract_state())
        if restored.data_position is not None:
            self.source.load_state_dict(restored.data_position)
        changed = _resume_changes(restored.metadata, self.metadata)
        if changed:
            warnings.warn(f"resuming {self.source.unit} {restored.step} with a config that differs in {changed}",
                          stacklevel=3)
        return restored.state, restored.step

    def _with_rates(self, state: TrainState, metrics: Mapping[str, Any], throughput: Throughput) -> dict[str, Any]:
        """The step's metrics plus throughput and the learning rate of its last update (optax counts from 0)."""
        logged = {name: value for name, value in metrics.items() if name != "diverging"}  # finite says it
        logged |= throughput.report()
        if self.schedule is not None:
            logged["learning_rate"] = float(self.schedule(max(int(state.step) - 1, 0)))
        return logged
