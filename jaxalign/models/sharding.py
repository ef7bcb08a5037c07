"""Sharding annotations: a table from parameter names to PartitionSpecs over logical mesh axes.

Axes (docs/architecture.md): ``data`` (batch only, never on parameters), ``fsdp`` (parameters and optimizer state
split across data-parallel replicas, gathered per layer) and ``tensor`` (Megatron-style model parallelism:
column-parallel q/k/v/gate/up, row-parallel o/down, the vocabulary split for the embedding and LM head).

A rule is keyed by the last two names of a parameter's path, ``(module, parameter)``; parameters under
``layers`` (GPT-2: ``h``) are stacked ``[L, ...]`` and get a leading ``None`` (the layer axis is scanned,
never split).
New modules (LoRA adapters, other heads) extend the table with ``rules=DEFAULT_RULES | {...}``.

A quantised kernel's storage (``q_proj/kernel/codes``, ``.../absmax_codes``, ...) follows its kernel's rule: each
stored axis that runs along the kernel's input or output axis is split like it, the rest is replicated
(:data:`jaxalign.models.quant_numerics.KERNEL_AXES`). The per-group scales of double quantisation and the offset,
a few numbers per kernel, are replicated.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxalign.models.quant_numerics import KERNEL_AXES
from jaxalign.models.quantized import WEIGHTS, QuantizedWeight
from jaxalign.models.stack import STACKED_COLLECTIONS

#: The mesh axes the rules name: data parallel, fully sharded data parallel (parameters split), tensor parallel.
MESH_AXES = ("data", "fsdp", "tensor")

_COLUMN_PARALLEL = ("fsdp", "tensor")  # [in, out]: split the output features across tensor
_ROW_PARALLEL = ("tensor", "fsdp")  # [in, out]: split the input features across tensor
_REPLICATED_VECTOR = (None,)

DEFAULT_RULES: Mapping[tuple[str, str], tuple[str | None, ...]] = {
    ("embed_tokens", "embedding"): ("tensor", "fsdp"),  # [V, D]
    ("lm_head", "kernel"): _COLUMN_PARALLEL,  # [D, V]
    **{(name, "kernel"): _COLUMN_PARALLEL for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")},
    **{(name, "bias"): ("tensor",) for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")},
    **{(name, "kernel"): _ROW_PARALLEL for name in ("o_proj", "down_proj")},
    **{(name, "bias"): _REPLICATED_VECTOR for name in ("o_proj", "down_proj")},
    **{(name, "scale"): _REPLICATED_VECTOR
       for name in ("input_layernorm", "post_attention_layernorm", "norm")},
    # GPT-2: the fused c_attn [D, 3D] and c_fc are column parallel, both c_proj row parallel.
    ("wte", "embedding"): ("tensor", "fsdp"),  # [V, D]
    ("wpe", "embedding"): (None, "fsdp"),  # [P, D]
    **{(name, "kernel"): _COLUMN_PARALLEL for name in ("c_attn", "c_fc")},
    **{(name, "bias"): ("tensor",) for name in ("c_attn", "c_fc")},
    ("c_proj", "kernel"): _ROW_PARALLEL,
    ("c_proj", "bias"): _REPLICATED_VECTOR,
    **{(name, param): _REPLICATED_VECTOR for name in ("ln_1", "ln_2", "ln_f") for param in ("scale", "bias")},
    ("value_head", "kernel"): ("fsdp", None),  # [D, 1]
    ("value_head", "bias"): _REPLICATED_VECTOR,
    ("reward_head", "kernel"): ("fsdp", None),  # [D, N]
    ("reward_head", "bias"): _REPLICATED_VECTOR,
}


# LoRA adapters (jaxalign.models.lora): A [in, r] splits like its kernel's input axis, B [r, out] like its
# output axis, so x·A·B needs no more communication than x·W.
#: (module name, parameter name) -> the mesh axis of each of the parameter's dimensions (``None``: replicated):
#: Megatron-style tensor parallelism for Llama and GPT-2 projections, embeddings split over the vocabulary, LoRA
#: adapters split as their kernels, norms and heads' biases replicated; ``fsdp`` splits what ``tensor`` leaves.
DEFAULT_RULES = {
    **DEFAULT_RULES,
    **{(module, "lora_a"): (rule[0], None) for (module, leaf), rule in DEFAULT_RULES.items() if leaf == "kernel"},
    **{(module, "lora_b"): (None, rule[1]) for (module, leaf), rule in DEFAULT_RULES.items() if leaf == "kernel"},
}


def _param_state(model_or_state) -> nnx.State:
    if isinstance(model_or_state, nnx.State):
        return model_or_state
    return nnx.state(model_or_state, WEIGHTS)


def _rule(names: tuple[str, ...], variable, rules: Mapping) -> tuple | None:
    """The rule of one weight: the table's, or for quantised storage one derived from its kernel's."""
    if not isinstance(variable, QuantizedWeight):
        return rules.get(names[-2:])
    kernel_rule = rules.get(names[-3:-1])
    if kernel_rule is None or names[-1] not in KERNEL_AXES:
        return None
    along = {"in": kernel_rule[0], "out": kernel_rule[1]}
    return tuple(along.get(axis) for axis in KERNEL_AXES[names[-1]])


def partition_specs(model_or_state, *, rules: Mapping = DEFAULT_RULES) -> nnx.State:
    """The logical PartitionSpec of every weight, as a State shaped like ``nnx.state(model, WEIGHTS)``.

    Each Variable holds its spec as value (the convention of ``nnx.get_partition_spec``), so the result
    can be mapped to shardings leaf by leaf. Works on a model, its weight State (parameters, and the
    quantised storage of a quantised model: :data:`~jaxalign.models.quantized.WEIGHTS`), or an abstract one
    from ``nnx.eval_shape``.

    Raises:
        ValueError: a parameter no rule covers, or a rule whose rank does not match the parameter.
    """
    flat = []
    for path, variable in nnx.to_flat_state(_param_state(model_or_state)):
        names = tuple(str(part) for part in path)
        rule = _rule(names, variable, rules)
        if rule is None:
            key = names[-3:-1] if isinstance(variable, QuantizedWeight) else names[-2:]
            raise ValueError(
                f"no partition rule for {'quantised kernel' if isinstance(variable, QuantizedWeight) else 'parameter'} "
                f"{'/'.join(names)}: add {key!r} to the rules"
            )
        spec = (None, *rule) if any(name in STACKED_COLLECTIONS for name in names) else tuple(rule)
        if len(spec) != len(variable.get_value().shape):
            raise ValueError(
                f"partition rule {spec} has rank {len(spec)} but parameter {'/'.join(names)} has shape "
                f"{tuple(variable.get_value().shape)}"
            )
        flat.append((path, variable.replace(PartitionSpec(*spec))))
    return nnx.from_flat_state(flat)


def fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """``spec`` with every mesh axis the mesh lacks, or whose size does not divide the dimension, dropped.

    Dropping means replicating that dimension: a vocabulary of 49 155 on ``tensor=4`` stays whole
    instead of failing at ``device_put``. Mesh axes of size 1 are kept (they divide everything).
    """
    fitted = []
    for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept, product = [], 1
        for name in names:
            if name in mesh.shape and size % (product * mesh.shape[name]) == 0:
                kept.append(name)
                product *= mesh.shape[name]
        fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*fitted)


def named_shardings(model_or_state, mesh: Mesh, *, rules: Mapping = DEFAULT_RULES) -> nnx.State:
    """``NamedSharding`` of every weight on ``mesh`` (specs fitted with :func:`fit_spec`).

    The result has the structure of ``nnx.state(model, WEIGHTS)`` (``nnx.state(model, nnx.Param)`` for a model
    without quantised kernels) and can be passed to ``jax.device_put`` or as ``in_shardings``/``out_shardings``
    of ``jax.jit``.
    """
    specs = partition_specs(model_or_state, rules=rules)
    shapes = _param_state(model_or_state)
    return jax.tree.map(
        lambda spec, param: NamedSharding(mesh, fit_spec(spec, param.shape, mesh)),
        specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
