"""Training core: sharded jitted steps over device meshes, Orbax checkpoints with exact resume, multi-host.

- :mod:`~jaxalign.train.config`: ``TrainConfig`` and its sections (frozen, validated, JSON round-trip).
- :mod:`~jaxalign.train.mesh`: ``make_mesh`` over ``(data, fsdp, tensor)``, ``shard_batch``.
- :mod:`~jaxalign.train.step`: ``TrainStep``, the jitted step factory (accumulation, filters, references).
- :mod:`~jaxalign.train.schedules`, :mod:`~jaxalign.train.optimizer`: learning-rate schedules, optax chain.
- :mod:`~jaxalign.train.checkpoint`: ``Checkpointer`` (Orbax CheckpointManager) and run metadata.
- :mod:`~jaxalign.train.trainer`: ``Trainer``, the one loop (resume, NaN guard, logging, signals) over a
  ``StepSource`` (offline batches, or an online method's iterations).
- :mod:`~jaxalign.train.distributed`: ``jax.distributed.initialize`` from flags or the environment.
- :mod:`~jaxalign.train.metrics`, :mod:`~jaxalign.train.tensorboard`: JSONL / TensorBoard / W&B sinks.

See docs/training-core.md.
"""

from jaxalign.train.checkpoint import Checkpointer, Restored, run_metadata
from jaxalign.train.config import CheckpointConfig, LogConfig, MeshConfig, OptimizerConfig, TrainConfig
from jaxalign.train.distributed import (
    add_distributed_arguments,
    any_process,
    gather_from_processes,
    initialize_distributed,
    initialize_from_args,
)
from jaxalign.train.mesh import batch_sharding, make_mesh, shard_batch, single_device_mesh
from jaxalign.train.optimizer import make_optimizer, scale_updates_by_path
from jaxalign.train.schedules import make_schedule
from jaxalign.train.signals import TrainingInterrupted
from jaxalign.train.state import TrainState
from jaxalign.train.step import TrainStep, default_token_count
from jaxalign.train.trainer import BatchPerStep, NonFiniteError, StepSource, Trainer, TrainingDiverged, check_step

__all__ = [
    "BatchPerStep",
    "StepSource",
    "check_step",
    "scale_updates_by_path",
    "CheckpointConfig",
    "Checkpointer",
    "LogConfig",
    "MeshConfig",
    "NonFiniteError",
    "TrainingDiverged",
    "OptimizerConfig",
    "Restored",
    "TrainConfig",
    "TrainState",
    "TrainStep",
    "Trainer",
    "TrainingInterrupted",
    "add_distributed_arguments",
    "any_process",
    "batch_sharding",
    "default_token_count",
    "gather_from_processes",
    "initialize_distributed",
    "initialize_from_args",
    "make_mesh",
    "make_optimizer",
    "make_schedule",
    "run_metadata",
    "shard_batch",
    "single_device_mesh",
]
