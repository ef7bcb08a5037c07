"""What ``jaxalign plan`` reports, and the run's model and weights as shapes (:mod:`jaxalign.methods.plan`,
:mod:`jaxalign.methods.plan_online`)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class Plan:
    """Bytes per device of one training step, or of each phase of an online iteration (``phases``), as
    :func:`jaxalign.methods.plan.plan_run` plans them."""

    method: str
    model: str
    mesh: dict[str, int]
    batch: dict[str, list[int]]
    quantized_base: int  # quantised storage (frozen)
    frozen_weights: int  # float parameters that do not train (the base under LoRA)
    trained_weights: int  # the trained parameters' float32 masters (LoRA: the adapters)
    optimizer_state: int
    reference: int  # a frozen reference model's weights
    batch_bytes: int
    temporaries: int  # the compiled program's activations, gradients and temporaries
    total: int
    compile_seconds: float
    # The online methods' (PPO, GRPO; :mod:`jaxalign.methods.plan_online`); zero and empty for the others.
    critic: int = 0  # the critic's float32 masters (its own trunk or a value head)
    reward_model: int = 0  # a reward model that runs in the process
    initial_weights: int = 0  # the weights the trainer was built from, kept for the run
    sampler_weights: int = 0  # the sampler's per-layer copy of the layer weights (and its cast below float32)
    kv_cache: int = 0  # the decode loop's (inside the sampling phase's temporaries)
    rollout_batch: int = 0  # an iteration's prepared rows, resident through its updates
    phases: dict[str, int] = dataclasses.field(default_factory=dict)  # each phase's total; ``total`` the largest
    phase_temporaries: dict[str, int] = dataclasses.field(default_factory=dict)  # each compiled program's
    rollout: dict[str, int] = dataclasses.field(default_factory=dict)  # plan_online.IterationShapes' fields

    def rows(self) -> list[tuple[str, int]]:
        if self.phases:
            return [("quantised base weights", self.quantized_base), ("float frozen weights", self.frozen_weights),
                    ("trained weights (float32 masters)", self.trained_weights),
                    ("critic (float32 masters)", self.critic), ("optimizer state", self.optimizer_state),
                    ("reference model", self.reference), ("reward model", self.reward_model),
                    ("initial weights (kept by the trainer)", self.initial_weights),
                    ("sampler's per-layer weights", self.sampler_weights),
                    ("rollout rows of an iteration", self.rollout_batch),
                    ("KV cache (sampling)", self.kv_cache), ("minibatch", self.batch_bytes)]
        return [("quantised base weights", self.quantized_base), ("float frozen weights", self.frozen_weights),
                ("trained weights (float32 masters)", self.trained_weights),
                ("optimizer state", self.optimizer_state), ("reference model", self.reference),
                ("batch", self.batch_bytes), ("activations, gradients, temporaries", self.temporaries)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- model shapes ------------------------------------------------------------------------------------------------


def model_config(spec, config_file: str | Path | None = None):
    """The model's architecture from its ``config.json`` (``config_file``, else ``spec.path``'s), or from the
    GGUF metadata of a ``.gguf`` ``spec.path`` or of the embedded default; never its weights."""
    from jaxalign import models
    from jaxalign.models import gguf_io, hf_io

    policy = dict(param_dtype=spec.param_dtype, compute_dtype=spec.compute_dtype, remat=spec.remat,
                  attention=spec.attention)
    if config_file is not None:
        path = Path(config_file)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"--model-config {config_file}: no such file")
        return hf_io.read_hf_config(path, **policy)
    location = None if spec.path is None else Path(spec.path)
    if location is not None and location.is_dir():
        return models.load_hf_config(location, **policy)
    if location is not None and not (location.is_file() and location.suffix == ".gguf"):
        raise ValueError(f"model.path {spec.path}: a plan reads a checkpoint directory's config.json or a .gguf "
                         "file's metadata; give --model-config path/to/config.json for a Hub id")
    gguf_path = models.default_model_path() if location is None else location
    reader = gguf_io._open(gguf_path)
    metadata = gguf_io._metadata(reader)
    names = {name for tensor in reader.tensors if (name := gguf_io.hf_tensor_name(tensor.name)) is not None}
    return gguf_io.gguf_config(metadata, names, gguf_path, **policy)


def abstract_model(model_config, run_config, *, lora: bool, wrap=None):
    """The run's model as shapes (``nnx.eval_shape``): quantised as ``model.quantize`` says, with its adapters
    when ``lora``; ``wrap(lm)`` builds a module around it (PPO's actor-critic)."""
    from flax import nnx

    from jaxalign import models
    from jaxalign.methods.common import quantize_error, with_lora
    from jaxalign.models.hf_io import layout_for

    def build():
        lm = layout_for(model_config).model_class(model_config, rngs=nnx.Rngs(0))
        if run_config.model.quantize is not None:
            try:
                models.quantize_model(lm, run_config.model.quantize)
            except ValueError as error:
                raise ValueError(quantize_error(error)) from None
        lm = with_lora(lm, run_config) if lora else lm
        return lm if wrap is None else wrap(lm)

    return nnx.eval_shape(build)


def _shard_bytes(value, sharding) -> int:
    shape = sharding.shard_shape(value.shape) if sharding is not None else value.shape
    return math.prod(shape) * value.dtype.itemsize


def _tree_bytes(tree) -> int:
    """Bytes per device of a tree of ``jax.ShapeDtypeStruct`` carrying their shardings."""
    import jax

    return sum(_shard_bytes(leaf, getattr(leaf, "sharding", None)) for leaf in jax.tree.leaves(tree))


def _weights_bytes(model, mesh, variable_filter) -> int:
    """Bytes per device of ``model``'s variables of ``variable_filter``, sharded by the training rules."""
    from flax import nnx

    from jaxalign import models

    shardings = dict(nnx.to_flat_state(models.named_shardings(model, mesh)))
    return sum(_shard_bytes(variable.get_value(), shardings[path].get_value())
               for path, variable in nnx.to_flat_state(nnx.state(model, variable_filter)))
