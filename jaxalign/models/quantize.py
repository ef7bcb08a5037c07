"""Quantise a model's frozen projections to NF4 or int8 (QLoRA's base), and undo it for export.

``quantize_model(model, QuantizeConfig(type="nf4"))`` replaces every projection of the decoder layers (Llama's
q/k/v/o/gate/up/down, GPT-2's c_attn/c_proj/c_fc) by its quantised storage, in place: the float kernels are
dropped, the codes and block scales (:mod:`jaxalign.models.quant_numerics`, bitsandbytes' NF4 with double
quantisation, or int8 per output channel) stay on the device, and each product dequantises its kernel inside the
jitted step, in the compute dtype. LoRA goes on top before or after (:func:`jaxalign.models.apply_lora`); only the
adapters train. :func:`merge_for_export` gives back a plain float model (dequantised kernels, adapters merged).

The token embeddings, the norms, the biases and the LM head stay in float, as QLoRA and bitsandbytes keep them
(transformers' bitsandbytes integration converts ``nn.Linear`` layers only and skips the output head): the
embedding is a lookup, not a product, and the head, a sixth of a small model's weights and its last layer, is
where 4-bit error would land on every logit.

References: Dettmers et al. 2023, QLoRA (arXiv 2305.14314); Dettmers et al. 2022, LLM.int8() (arXiv 2208.07339).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxalign.models import quant_numerics
from jaxalign.models.gguf_io import default_model_path, gguf_config, hf_tensor_name
from jaxalign.models.gguf_read import read_gguf
from jaxalign.models.hf_io import layout_for, load_hf_config
from jaxalign.models.hub import cached, is_hub_id
from jaxalign.models.lora import LoRALinear, has_lora, merge_lora
from jaxalign.models.quantized import QuantizedKernel, QuantizedLinear, QuantizedWeight
from jaxalign.models.stack import STACKED_COLLECTIONS

QUANT_TYPES = ("nf4", "int8")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
    """How to quantise a model's frozen projections.

    Attributes:
        type: ``"nf4"`` (4-bit NormalFloat in blocks, QLoRA's) or ``"int8"`` (per output channel).
        block_size: inputs per NF4 block (default 64, as bitsandbytes'); it must divide every quantised
            projection's input dimension. Not for int8.
        double_quant: quantise the NF4 block scales again to 8 bits (default True: bitsandbytes'
            ``compress_statistics``, 4.127 instead of 4.5 bits a weight with blocks of 64). Not for int8.
        compute_dtype: the dtype each quantised product runs in (the kernel dequantised to it, the input cast
            to it; bitsandbytes' ``bnb_4bit_compute_dtype``); None: the model's compute dtype.
        targets: projections to quantise, by module name (``q_proj``, ``down_proj``, GPT-2's ``c_attn``, ...)
            or dotted path suffix (``mlp.c_proj``); None: every projection of the decoder layers.
    """

    type: str
    block_size: int | None = None
    double_quant: bool | None = None
    compute_dtype: str | None = None
    targets: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.type not in QUANT_TYPES:
            raise ValueError(f"QuantizeConfig.type must be one of {list(QUANT_TYPES)}, got {self.type!r}")
        if self.type == "int8":
            for key in ("block_size", "double_quant"):
                if getattr(self, key) is not None:
                    raise ValueError(f"QuantizeConfig.{key} applies to nf4 only; int8 has one scale per output "
                                     f"channel (got {key}={getattr(self, key)!r} with type 'int8')")
        block = self.block_size
        if block is not None and (not isinstance(block, int) or isinstance(block, bool) or block <= 0 or block % 2):
            raise ValueError(f"QuantizeConfig.block_size must be a positive even int (two codes a byte), got {block!r}")
        if self.double_quant is not None and not isinstance(self.double_quant, bool):
            raise ValueError(f"QuantizeConfig.double_quant must be true or false, got {self.double_quant!r}")
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"QuantizeConfig.compute_dtype must be one of {list(COMPUTE_DTYPES)} or None, "
                             f"got {self.compute_dtype!r}")
        targets = self.targets
        if targets is not None and (isinstance(targets, str) or not isinstance(targets, tuple) or not targets
                                    or not all(isinstance(t, str) and t for t in targets)):
            raise ValueError(f"QuantizeConfig.targets must be a non-empty tuple of projection names or None, "
                             f"got {targets!r}")

    @property
    def effective_block_size(self) -> int | None:
        """The NF4 block size in use (None for int8)."""
        return None if self.type == "int8" else (64 if self.block_size is None else self.block_size)

    @property
    def effective_double_quant(self) -> bool:
        """Whether the NF4 absmax scales are themselves quantised (on unless ``double_quant: false``; off for
        int8)."""
        return self.type == "nf4" and (True if self.double_quant is None else self.double_quant)


def _matches(path: tuple[str, ...], target: str) -> bool:
    parts = tuple(target.split("."))
    return path[-len(parts):] == parts


def _projections(model: nnx.Module) -> list[tuple[tuple[str, ...], nnx.Module]]:
    """Every ``nnx.Linear`` / :class:`LoRALinear` / :class:`QuantizedLinear` of ``model`` with its path."""
    return [(tuple(str(p) for p in path), module) for path, module in nnx.iter_modules(model)
            if type(module) in (nnx.Linear, LoRALinear, QuantizedLinear)]


def _in_layers(path: tuple[str, ...]) -> bool:
    return any(name in STACKED_COLLECTIONS for name in path)


def _select(model: nnx.Module, config: QuantizeConfig) -> list[tuple[tuple[str, ...], nnx.Module]]:
    """The projections ``config`` quantises, every choice checked before anything changes."""
    projections = _projections(model)
    in_layers = [(path, module) for path, module in projections if _in_layers(path)]
    if not in_layers:
        raise ValueError(
            f"quantize_model: {type(model).__name__} has no decoder layers to quantise (a Llama-family or GPT-2 "
            f"model's stacked {' / '.join(STACKED_COLLECTIONS)}); pass the language model, or a module holding one")
    if config.targets is None:
        chosen = in_layers
    else:
        available = sorted({".".join(path[-2:]) for path, _ in in_layers})
        for target in config.targets:
            if any(_matches(path, target) for path, _ in in_layers):
                continue
            outside = [path for path, _ in projections if _matches(path, target)]
            if outside:
                raise ValueError(
                    f"QuantizeConfig.targets: {target!r} ({'/'.join(outside[0])}) is outside the decoder layers; "
                    "the embeddings, norms and LM head stay in float (as QLoRA and bitsandbytes keep them). "
                    f"Quantisable: {available}")
            raise ValueError(f"QuantizeConfig.targets: {target!r} names no projection of the decoder layers; "
                             f"quantisable: {available}")
        chosen = [(path, module) for path, module in in_layers if any(_matches(path, t) for t in config.targets)]
    for path, module in chosen:
        if isinstance(module, QuantizedLinear) or isinstance(module.kernel, QuantizedKernel):
            raise ValueError(f"quantize_model: {'/'.join(path)} is already quantised ({module.kernel.quant_type}); "
                             "quantise a float model once")
        shape = tuple(module.kernel.get_value().shape)  # an abstract value too (a plan, a check before loading)
        n_in = shape[-2]
        block = config.effective_block_size
        if block is not None and n_in % block:
            raise ValueError(
                f"QuantizeConfig.block_size={block} does not divide the input dimension {n_in} of {'/'.join(path)} "
                f"(kernel {shape}); choose a block size that divides it, or leave this projection out of targets")
    return chosen


@functools.cache
def _quantizer(quant_type: str, block_size: int | None, double_quant: bool):
    return jax.jit(functools.partial(quant_numerics.quantize, quant_type=quant_type, block_size=block_size,
                                     double_quant=double_quant))


def quantize_model(model: nnx.Module, config: QuantizeConfig) -> nnx.Module:
    """Quantise the frozen projections of ``model``'s decoder layers, in place.

    Each ``nnx.Linear`` becomes a :class:`~jaxalign.models.quantized.QuantizedLinear`; a
    :class:`~jaxalign.models.LoRALinear` keeps its adapters and gets a quantised ``kernel``. Stacked ``[L]``
    kernels are quantised layer by layer into stacked storage, which the layer scan slices like any weight.
    Biases stay float ``nnx.Param``s. Runs under ``nnx.eval_shape`` too (for memory plans from abstract shapes).

    Args:
        model: a Llama-family or GPT-2 model (:class:`~jaxalign.models.LlamaForCausalLM`,
            :class:`~jaxalign.models.GPT2LMHeadModel`), or a module holding one (a reward or value model).
        config: type, block size, double quantisation, compute dtype, targets.

    Returns:
        ``model``. Its quantised storage is :class:`~jaxalign.models.quantized.QuantizedWeight`, not
        ``nnx.Param``: optimizers over ``nnx.Param`` / ``nnx.LoRAParam`` never see it.

    Raises:
        ValueError: a model without decoder layers; a target outside them (embeddings, norms, LM head) or
            naming nothing; a block size that does not divide a projection's input dimension; a projection
            already quantised. Nothing is changed when it raises.
    """
    chosen = _select(model, config)
    quantize = _quantizer(config.type, config.effective_block_size, config.effective_double_quant)
    for path, module in chosen:
        kernel = module.kernel[...]
        compute = config.compute_dtype or module.dtype or kernel.dtype
        quantized = QuantizedKernel(quantize(kernel), quant_type=config.type, block_size=config.effective_block_size,
                                    double_quant=config.effective_double_quant, dtype=compute, param_dtype=kernel.dtype)
        if isinstance(module, LoRALinear):
            module.kernel = quantized
            continue
        parent = model
        for name in path[:-1]:
            parent = getattr(parent, name)
        setattr(parent, path[-1], QuantizedLinear(quantized, module.bias, dtype=module.dtype or kernel.dtype))
    return model


def check_quantizable(model_config, config: QuantizeConfig) -> None:
    """Raise what :func:`quantize_model` would raise for the model of ``model_config``, from its shapes alone
    (``nnx.eval_shape``): a block size or target it cannot take is refused before any weight is read."""
    model_class = layout_for(model_config).model_class
    _select(nnx.eval_shape(lambda: model_class(model_config, rngs=nnx.Rngs(0))), config)


def check_checkpoint(path: str | Path | None, config: QuantizeConfig, *, revision: str | None = None) -> None:
    """:func:`check_quantizable` for the model ``path`` names (as :func:`jaxalign.models.load_pretrained` reads
    it), from its shapes alone: a checkpoint directory's ``config.json``, a ``.gguf`` file's metadata (None: the
    embedded default's), or the ``config.json`` of a Hub id's snapshot (at ``revision``) in the local Hub cache.
    A Hub id not cached yet is checked by :func:`quantize_model` once downloaded and loaded, which also raises
    before it changes anything."""
    try:
        model_config = _config_without_weights(path, revision)
    except (OSError, ValueError):
        return  # a model that cannot be read is named by its loading, not as a quantisation error
    if model_config is not None:
        check_quantizable(model_config, config)


def _config_without_weights(path: str | Path | None, revision: str | None):
    """The model config of ``path`` read without its weights; None for what only a download would tell."""
    if path is None:
        return _gguf_config(default_model_path())
    location = Path(path)
    if location.is_dir():
        return load_hf_config(location)
    if location.is_file() and location.suffix == ".gguf":
        return _gguf_config(location)
    if is_hub_id(path):
        snapshot = cached(str(path), revision=revision)
        return None if snapshot is None else load_hf_config(snapshot.path)
    return None  # no such path: loading names it


def _gguf_config(path: Path):
    """A GGUF file's model config from its header (metadata and tensor names; no tensor is read)."""
    reader = read_gguf(path)
    architecture = reader.metadata.get("general.architecture")
    names = {name for tensor in reader.tensors if (name := hf_tensor_name(tensor.name, architecture)) is not None}
    return gguf_config(reader.metadata, names, path)


def is_quantized(model: nnx.Module) -> bool:
    """Whether ``model`` holds quantised kernels."""
    return any(isinstance(module, QuantizedKernel) for _, module in nnx.iter_modules(model))


def merge_for_export(model: nnx.Module) -> nnx.Module:
    """The plain float model an export writes: quantised kernels dequantised, LoRA adapters merged.

    A model with neither is returned as it is; otherwise a new model (``model`` is left untouched) whose
    kernels are ``dequantised W + (α/r)·A·B`` in the dtype of the kernels that were quantised (float32
    arithmetic). Exports call this where they used to call ``merge_lora`` under ``has_lora``.
    """
    if not (has_lora(model) or is_quantized(model)):
        return model
    return merge_lora(model)


def storage_bytes(model: nnx.Module) -> dict[str, int]:
    """Bytes of ``model``'s weights: ``"quantized"`` storage, ``"float"`` parameters (the LoRA adapters among
    them), and ``"dequantized"``, what the quantised kernels would take in the dtype they replaced."""
    def nbytes(state) -> int:
        return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))

    dequantized = sum(math.prod(module.shape) * module.param_dtype.itemsize
                      for _, module in nnx.iter_modules(model) if isinstance(module, QuantizedKernel))
    return {"quantized": nbytes(nnx.state(model, QuantizedWeight)), "float": nbytes(nnx.state(model, nnx.Param)),
            "dequantized": dequantized}
