"""Run configuration: frozen dataclasses that validate themselves and round-trip through JSON.

A run is described by one :class:`TrainConfig` holding an :class:`OptimizerConfig`, a :class:`MeshConfig`,
a :class:`CheckpointConfig` and a :class:`LogConfig`. Every field is checked in ``__post_init__`` so a bad
value fails when the config is built, naming the field, not hours later inside a jitted step.
``to_dict()`` gives the JSON written beside the checkpoints; ``TrainConfig.from_dict`` reads it back and
rejects unknown keys.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from jaxalign.models.sharding import MESH_AXES

SCHEDULES = ("constant", "linear", "cosine", "cosine_with_restarts")
OPTIMIZERS = ("adamw", "sgd")
NONFINITE_POLICIES = ("raise", "skip")


def _require(condition: bool, owner: str, name: str, expected: str, value: Any) -> None:
    if not condition:
        raise ValueError(f"{owner}.{name} must be {expected}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _optional_positive_int(owner: str, name: str, value: Any) -> None:
    _require(value is None or (_is_int(value) and value > 0), owner, name, "a positive int or None", value)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes over the axes ``(data, fsdp, tensor)``; one size may be ``-1`` (inferred).

    - ``data``: pure data parallelism (parameters replicated).
    - ``fsdp``: data parallelism with parameters and optimizer state sharded (ZeRO-3 / MaxText ``fsdp``).
    - ``tensor``: Megatron-style model parallelism inside each layer.

    The default puts every device on ``fsdp``, which on one device is simply that device: a single-device
    run needs no mesh knowledge.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def __post_init__(self):
        for name in MESH_AXES:
            value = getattr(self, name)
            _require(_is_int(value) and (value > 0 or value == -1), "MeshConfig", name, "a positive int or -1",
                     value)
        if self.shape.count(-1) > 1:
            raise ValueError(f"MeshConfig: at most one axis may be -1 (inferred), got {self.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """The mesh's sizes ``(data, fsdp, tensor)``, ``-1`` where :meth:`resolve` has not filled one in yet."""
        return (self.data, self.fsdp, self.tensor)

    def resolve(self, device_count: int) -> MeshConfig:
        """The same mesh with ``-1`` replaced so that the sizes multiply to ``device_count``.

        Raises:
            ValueError: the sizes cannot cover exactly ``device_count`` devices.
        """
        known = math.prod(size for size in self.shape if size != -1)
        if -1 in self.shape:
            if device_count % known:
                raise ValueError(
                    f"MeshConfig{self.shape}: the known sizes multiply to {known}, which does not divide the "
                    f"{device_count} devices, so the -1 axis cannot be inferred"
                )
            sizes = [device_count // known if size == -1 else size for size in self.shape]
            return MeshConfig(*sizes)
        if known != device_count:
            raise ValueError(
                f"MeshConfig{self.shape} needs {known} devices but {device_count} are available; "
                "set one axis to -1 to infer it"
            )
        return self


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer, learning-rate schedule and gradient clipping.

    The schedule (see :func:`jaxalign.train.schedules.make_schedule`) warms up linearly from 0 to
    ``learning_rate`` over ``warmup_steps`` updates, then follows ``schedule`` over ``decay_steps``
    updates (default: the rest of the run) down to ``final_learning_rate``, in ``restarts`` cycles for
    ``cosine_with_restarts``. Decoupled ``weight_decay`` skips biases and norm scales, as transformers' Trainer
    does; ``decay_biases_and_norms=True`` decays them too. ``b1``, ``b2``, ``eps`` are AdamW's, ``momentum``
    SGD's. A setting the chosen schedule or optimizer does not use (``restarts`` without
    ``cosine_with_restarts``, ``final_learning_rate`` or ``decay_steps`` with ``constant``, ``momentum`` with
    AdamW, AdamW's settings with SGD) is refused, naming what uses it.
    """

    name: str = "adamw"
    learning_rate: float = 1e-5
    schedule: str = "constant"
    warmup_steps: int = 0
    decay_steps: int | None = None
    final_learning_rate: float = 0.0
    restarts: int = 1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decay_biases_and_norms: bool = False
    momentum: float = 0.0
    max_grad_norm: float | None = 1.0

    def __post_init__(self):
        owner = "OptimizerConfig"
        for field in ("learning_rate", "final_learning_rate", "b1", "b2", "eps", "weight_decay", "momentum",
                      "max_grad_norm"):
            value = getattr(self, field)
            _require(value is None and field == "max_grad_norm" or _is_finite_number(value), owner, field,
                     "a finite number", value)
        _require(self.name in OPTIMIZERS, owner, "name", f"one of {OPTIMIZERS}", self.name)
        _require(self.schedule in SCHEDULES, owner, "schedule", f"one of {SCHEDULES}", self.schedule)
        _require(self.learning_rate >= 0, owner, "learning_rate", ">= 0", self.learning_rate)
        _require(0 <= self.final_learning_rate <= self.learning_rate, owner, "final_learning_rate",
                 "in [0, learning_rate]", self.final_learning_rate)
        _require(_is_int(self.warmup_steps) and self.warmup_steps >= 0, owner, "warmup_steps", "an int >= 0",
                 self.warmup_steps)
        _optional_positive_int(owner, "decay_steps", self.decay_steps)
        _require(_is_int(self.restarts) and self.restarts >= 1, owner, "restarts", "an int >= 1", self.restarts)
        _require(0 <= self.b1 < 1 and 0 <= self.b2 < 1, owner, "b1/b2", "in [0, 1)", (self.b1, self.b2))
        _require(self.eps > 0, owner, "eps", "> 0", self.eps)
        _require(self.weight_decay >= 0, owner, "weight_decay", ">= 0", self.weight_decay)
        _require(isinstance(self.decay_biases_and_norms, bool), owner, "decay_biases_and_norms", "a bool",
                 self.decay_biases_and_norms)
        _require(0 <= self.momentum < 1, owner, "momentum", "in [0, 1)", self.momentum)
        _require(self.max_grad_norm is None or self.max_grad_norm > 0, owner, "max_grad_norm", "> 0 or None",
                 self.max_grad_norm)
        self._refuse_unused()

    def _refuse_unused(self) -> None:
        """A setting the schedule or optimizer in use would ignore is refused: the run would silently train
        with another rate than the one asked for."""
        def refuse(field: str, used_by: str, instead: str) -> None:
            raise ValueError(f"OptimizerConfig.{field}={getattr(self, field)!r} is used only by {used_by}; {instead}")

        if self.restarts != 1 and self.schedule != "cosine_with_restarts":
            refuse("restarts", "schedule cosine_with_restarts",
                   f"schedule {self.schedule!r} has no cycles (set schedule: cosine_with_restarts)")
        if self.schedule == "constant":
            decaying = "the decaying schedules (linear, cosine, cosine_with_restarts)"
            if self.final_learning_rate != 0:
                refuse("final_learning_rate", decaying, "schedule 'constant' stays at learning_rate")
            if self.decay_steps is not None:
                refuse("decay_steps", decaying, "schedule 'constant' stays at learning_rate")
        if self.name == "adamw" and self.momentum != 0:
            refuse("momentum", "optimizer sgd", "adamw's first moment is b1")
        if self.name == "sgd":
            for field in ("b1", "b2", "eps"):
                if getattr(self, field) != _ADAM_DEFAULTS[field]:
                    refuse(field, "optimizer adamw", "sgd takes momentum")


_ADAM_DEFAULTS = {"b1": 0.9, "b2": 0.999, "eps": 1e-8}


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Where and when Orbax writes checkpoints.

    A checkpoint is written when the step is a multiple of ``save_every_steps``, or when
    ``save_every_seconds`` have passed since the last one (either may be None), at the end of the run, and
    on SIGTERM/SIGINT (``save_on_signal``). ``directory=None`` disables checkpointing.
    """

    directory: str | None = None
    save_every_steps: int | None = 1000
    save_every_seconds: int | None = None
    keep_last: int | None = 3
    async_save: bool = True
    resume: bool = True
    save_on_signal: bool = True

    def __post_init__(self):
        owner = "CheckpointConfig"
        _require(self.directory is None or (isinstance(self.directory, str) and self.directory), owner,
                 "directory", "a non-empty path or None", self.directory)
        _optional_positive_int(owner, "save_every_steps", self.save_every_steps)
        _require(self.save_every_seconds is None or (_is_int(self.save_every_seconds) and self.save_every_seconds >= 0),
                 owner, "save_every_seconds", "an int >= 0 or None", self.save_every_seconds)
        _optional_positive_int(owner, "keep_last", self.keep_last)


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Metrics sinks: a JSONL file and TensorBoard event files in ``directory`` (None: console only),
    Weights & Biases when ``wandb_project`` is set, and a tqdm progress bar."""

    directory: str | None = None
    every_steps: int = 1
    tensorboard: bool = True
    wandb_project: str | None = None
    wandb_run_name: str | None = None
    progress_bar: bool = True

    def __post_init__(self):
        _require(_is_int(self.every_steps) and self.every_steps > 0, "LogConfig", "every_steps", "a positive int",
                 self.every_steps)


_SECTIONS = {"optimizer": OptimizerConfig, "mesh": MeshConfig, "checkpoint": CheckpointConfig, "log": LogConfig}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run besides the model, the objective and the data.

    Attributes:
        total_steps: optimizer steps of the whole run (a resumed run continues up to it).
        seed: seeds the run's RNG key (restored from the checkpoint on resume).
        micro_batches: gradient-accumulation micro-batches per step; the update equals one step on the
            whole batch (token-weighted means stay exact through ``(sum, count)``).
        on_nonfinite: ``"raise"`` stops the run at a non-finite loss or gradient, or at a diverging update
            (``max_update_ratio``), naming the step; ``"skip"`` drops that update and goes on. Either way the
            update is never applied.
        max_update_ratio: the divergence guard: an update larger than this multiple of the parameters
            (``‖Δθ‖ > max_update_ratio·‖θ‖`` over the trained parameters) is treated like a non-finite one.
            Fine-tuning moves the weights by about 1e-4 of their norm per step (Adam at 1e-5 on SmolLM2), an
            aggressive tiny-model run (Adam at 0.1) by about 1; a learning rate of 1e6 moves them by 1e5 to 1e7
            times their norm while the loss can stay flat. None disables it.
    """

    total_steps: int
    seed: int = 0
    micro_batches: int = 1
    on_nonfinite: str = "raise"
    max_update_ratio: float | None = 10.0
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)

    def __post_init__(self):
        owner = "TrainConfig"
        _require(_is_int(self.total_steps) and self.total_steps > 0, owner, "total_steps", "a positive int",
                 self.total_steps)
        _require(_is_int(self.seed), owner, "seed", "an int", self.seed)
        _require(_is_int(self.micro_batches) and self.micro_batches > 0, owner, "micro_batches", "a positive int",
                 self.micro_batches)
        _require(self.on_nonfinite in NONFINITE_POLICIES, owner, "on_nonfinite", f"one of {NONFINITE_POLICIES}",
                 self.on_nonfinite)
        _require(self.max_update_ratio is None or (_is_finite_number(self.max_update_ratio)
                                                   and self.max_update_ratio > 0),
                 owner, "max_update_ratio", "a finite number > 0 or None", self.max_update_ratio)
        for name, section in _SECTIONS.items():
            _require(isinstance(getattr(self, name), section), owner, name, f"a {section.__name__}",
                     getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready nested dict (the form written beside the checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from :meth:`to_dict`'s output; unknown keys raise ``ValueError`` naming them."""
        _reject_unknown(cls, values, "TrainConfig")
        kwargs = dict(values)
        for name, section in _SECTIONS.items():
            if name in kwargs:
                _reject_unknown(section, kwargs[name], f"TrainConfig.{name}")
                kwargs[name] = section(**kwargs[name])
        return cls(**kwargs)


def _reject_unknown(config_class, values: Mapping[str, Any], where: str) -> None:
    known = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(known)}")
