"""Orbax checkpoints of a run: the train state, every process's data position, and the run's metadata.

Layout of ``CheckpointConfig.directory``::

    config.json            the resolved run metadata (written at start by process 0, replaced atomically)
    <step>/state/          the TrainState (Orbax OCDBT/Zarr; each process writes its own shards)
    <step>/data/metadata   {"process_count": P, "positions": [state_dict of process 0, ..., P-1]}
    <step>/meta/metadata   the run metadata plus the step and the time of the save

Orbax writes a step into a temporary directory and renames it only once every process has finished,
so a step directory either is complete or does not exist: a run killed mid-save resumes from the
previous checkpoint. Saves are asynchronous: ``save`` returns once the arrays are copied off the
devices (so the next step may donate them) and the files are written in the background.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import uuid
import warnings
from collections.abc import Mapping
from importlib import metadata as package_metadata
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

import jaxalign
from jaxalign.train.config import CheckpointConfig, TrainConfig
from jaxalign.train.distributed import gather_from_processes
from jaxalign.train.state import TrainState

CONFIG_FILE = "config.json"
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")


def run_metadata(config: TrainConfig, mesh: Mesh, *, model_config: Any = None,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint records about its run: resolved config, seed, versions and devices (JSON-ready).

    Args:
        config: the run's config, with the mesh sizes resolved (no ``-1``).
        mesh: the mesh the run uses.
        model_config: the model's config dataclass (``model.config``), recorded when given.
        extra: anything else the script wants recorded (e.g. its own experiment config).
    """
    device = jax.devices()[0]
    return {
        "config": config.to_dict(),
        "seed": config.seed,
        "model_config": dataclasses.asdict(model_config) if dataclasses.is_dataclass(model_config) else None,
        "extra": dict(extra or {}),
        "versions": {"jaxalign": jaxalign.__version__,
                     **{name: package_metadata.version(name) for name in _PACKAGES}},
        "devices": {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count(),
                    "process_count": jax.process_count(), "mesh": dict(mesh.shape)},
    }


def _data_position(data: Any) -> Any:
    return data.state_dict() if hasattr(data, "state_dict") else None


class ProcessCountMismatch(ValueError):
    """A checkpoint written by another number of processes than this run has, with a data position per process."""


class Restored(NamedTuple):
    step: int
    state: TrainState
    data_position: Any  # this process's data iterator state_dict (None if the run had none)
    metadata: dict[str, Any]


class Checkpointer:
    """A CheckpointManager saving ``(state, data positions, metadata)`` by the config's policy.

    Every method is called by every process at the same step (the saves and the time-based decision
    are collective).
    """

    def __init__(self, config: CheckpointConfig, metadata: Mapping[str, Any]):
        if config.directory is None:
            raise ValueError("CheckpointConfig.directory is None: checkpointing is disabled")
        self.directory = epath.Path(config.directory).resolve()
        self.metadata = dict(metadata)
        policies = []
        if config.save_every_steps is not None:
            policies.append(ocp.checkpoint_managers.FixedIntervalPolicy(config.save_every_steps))
        if config.save_every_seconds is not None:
            # Decided on process 0 and broadcast, so every process saves at the same step.
            policies.append(ocp.checkpoint_managers.ContinuousCheckpointingPolicy(
                minimum_interval_secs=config.save_every_seconds))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_last,
            enable_async_checkpointing=config.async_save,
            save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(policies),
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))
        # Refused before config.json is touched: the directory keeps describing the run it holds.
        if not config.resume and self.latest_step() is not None:
            raise ValueError(
                f"{config.directory} already holds checkpoints (latest step {self.latest_step()}) and "
                "CheckpointConfig.resume is False; use a new directory"
            )
        if jax.process_index() == 0:
            _write_json_atomically(self.directory / CONFIG_FILE, self.metadata)

    def latest_step(self) -> int | None:
        """The step of the newest checkpoint on disk, or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps of every checkpoint kept on disk, oldest first."""
        return list(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """Whether the step or time policy asks for a checkpoint at ``step`` (the same answer on every process)."""
        return self._manager.should_save(step)

    def save(self, step: int, state: TrainState, data: Any = None) -> bool:
        """Write ``state`` and the position of ``data`` (anything with ``state_dict()``) as ``step``.

        Returns:
            False when ``step`` is already saved (nothing is written), else True.
        """
        if step in self._manager.all_steps():
            return False
        positions = gather_from_processes(_data_position(data))
        meta = {**self.metadata, "step": step,
                "saved_at": datetime.datetime.now(datetime.UTC).isoformat()}
        return self._manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"process_count": jax.process_count(), "positions": positions}),
            meta=ocp.args.JsonSave(meta),
        ))

    def restore(self, abstract_state: TrainState, *, step: int | None = None) -> Restored:
        """Read checkpoint ``step`` (default: the newest intact one) into the shardings of ``abstract_state``.

        The mesh may differ from the one that saved: Orbax reshards. Each process gets back the data position
        it saved; under another process count, the position all processes saved alike (a global position, as
        :class:`jaxalign.data.BatchIterator` keeps) is every process's. Without ``step``, a checkpoint that
        cannot be read (truncated or corrupted files) is skipped with a warning that says why, and the next older one is
        tried; the damaged one is kept on disk, renamed ``<step>.damaged`` so that the run can save that step
        again (it is never deleted).

        Raises:
            FileNotFoundError: no checkpoint in the directory.
            ValueError: the checkpoint was written by a different number of processes whose data positions
                differ (per-process positions cannot be shared out anew), or no checkpoint could be read (each
                one's error is named).
        """
        if step is not None:
            return self._restore_step(abstract_state, step)
        failures = []
        for candidate in sorted(self._manager.all_steps(), reverse=True):
            try:
                restored = self._restore_step(abstract_state, candidate)
            except ProcessCountMismatch:
                raise  # the checkpoint is fine; this run is not the one that can resume it
            except Exception as error:  # noqa: BLE001 (Orbax, TensorStore and JSON raise many types)
                failures.append((candidate, error))
            else:
                self._set_aside(failures, restored.step)
                return restored
        if not failures:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        raise ValueError(f"no checkpoint in {self.directory} could be read: " + "; ".join(
            f"step {bad}: {_summary(error)}" for bad, error in failures))

    def _set_aside(self, failures: list[tuple[int, BaseException]], resumed: int) -> None:
        """Rename the damaged checkpoints newer than the one resumed from, and say so."""
        for bad, error in failures:
            damaged = self.directory / f"{bad}.damaged"
            if jax.process_index() == 0:
                (self.directory / str(bad)).rename(damaged)
            warnings.warn(f"checkpoint step {bad} in {self.directory} cannot be read ({_summary(error)}): "
                          f"resuming from step {resumed}; the damaged files are kept in {damaged}", stacklevel=4)
        if failures:
            self._manager.reload()

    def _restore_step(self, abstract_state: TrainState, step: int) -> Restored:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        ))
        saved_processes, positions = restored.data["process_count"], restored.data["positions"]
        if saved_processes == jax.process_count():
            position = positions[jax.process_index()]
        elif all(other == positions[0] for other in positions[1:]):
            position = positions[0]  # a global position: each process takes its own rows from it
        else:
            raise ProcessCountMismatch(
                f"checkpoint {self.directory / str(step)} holds the data positions of {saved_processes} "
                f"process(es), which differ, but this run has {jax.process_count()}: an iterator that keeps a "
                f"position per process resumes with the same process count only"
            )
        return Restored(step=step, state=restored.state, data_position=position, metadata=restored.meta)

    def wait(self) -> None:
        """Block until asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending asynchronous saves and release the checkpoint manager."""
        self._manager.close()


def _summary(error: BaseException) -> str:
    """An error's type and the first line of its message (Orbax's can span pages)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def _write_json_atomically(path: epath.Path, value: Any) -> None:
    partial = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    partial.write_text(json.dumps(value, indent=2, sort_keys=True))
    partial.replace(path)
