"""Hugging Face checkpoint directories: load into the stacked NNX layout, export back.

Loading reads ``config.json`` and ``model.safetensors`` (or the shards listed in
``model.safetensors.index.json``) tensor by tensor through ``safetensors.safe_open``. Each parameter is
created with ``jax.make_array_from_callback``: every device reads only its own shard's slice of the file
(transposed from torch's ``[out, in]`` to ``[in, out]``, and gathered over the layers for the stacked
``[L, ...]`` parameters), so no full host copy of the model is ever built. A directory with only a
Flax ``flax_model.msgpack`` is read through :mod:`jaxalign.models.hf_flax_io` (that format is one msgpack
blob, so it is restored whole on the host first).

Name mapping (``i`` = layer; see docs/models.md for the full tables). A parameter path is the HF name with
the stacked collection's layer index dropped and the leaf renamed:

- Llama family: ``model/layers/<path>/{kernel,bias,scale}`` [L, ...] <-> ``model.layers.{i}.<path>.{weight,
  bias,weight}``; ``model/embed_tokens/embedding``, ``model/norm/scale``, ``lm_head/kernel`` (untied only).
  Kernels are transposed (torch ``nn.Linear`` stores ``[out, in]``).
- GPT-2: ``transformer/h/<path>/...`` <-> ``transformer.h.{i}.<path>...``; ``transformer/{wte,wpe}/embedding``,
  ``transformer/ln_f/{scale,bias}``. The block kernels are HF ``Conv1D`` weights, already ``[in, out]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxalign.models.config import ModelConfig, check_hf_mapping
from jaxalign.models.gpt2 import GPT2Config, GPT2LMHeadModel
from jaxalign.models.hf_flax_io import FLAX_FILE, FlaxMsgpackSource, flax_checkpoint
from jaxalign.models.llama import LlamaForCausalLM
from jaxalign.models.lora import has_lora, merge_lora
from jaxalign.models.sharding import named_shardings
from jaxalign.models.stack import STACKED_COLLECTIONS

AnyConfig = ModelConfig | GPT2Config
AnyModel = LlamaForCausalLM | GPT2LMHeadModel

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_HF_SUFFIX = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}


@dataclasses.dataclass(frozen=True)
class CheckpointLayout:
    """How one model family's parameters map to its Hugging Face tensors."""

    model_class: type
    conv1d_blocks: bool  # the layers' kernels are HF Conv1D weights, stored [in, out]: not transposed
    buffers: tuple[str, ...]  # suffixes of non-parameter tensors some checkpoints carry (skipped on load)


LLAMA_LAYOUT = CheckpointLayout(LlamaForCausalLM, conv1d_blocks=False, buffers=("rotary_emb.inv_freq",))
GPT2_LAYOUT = CheckpointLayout(GPT2LMHeadModel, conv1d_blocks=True, buffers=(".attn.bias", ".attn.masked_bias"))
_LAYOUTS = {"llama": LLAMA_LAYOUT, "mistral": LLAMA_LAYOUT, "qwen2": LLAMA_LAYOUT, "gpt2": GPT2_LAYOUT}


def layout_for(config: AnyConfig) -> CheckpointLayout:
    return _LAYOUTS[config.architecture]


def is_stacked(path: tuple[str, ...]) -> bool:
    """Whether a parameter path is one of the ``[L, ...]`` decoder-layer parameters."""
    return len(path) > 2 and path[1] in STACKED_COLLECTIONS


def is_transposed(path: tuple[str, ...], layout: CheckpointLayout) -> bool:
    """Whether the HF tensor of this parameter is its transpose (torch ``nn.Linear``'s ``[out, in]``)."""
    return path[-1] == "kernel" and not (layout.conv1d_blocks and is_stacked(path))


def hf_tensor_names(path: tuple[str, ...], n_layers: int) -> list[str]:
    """The HF tensor name(s) of one parameter: one per layer for stacked parameters, else one."""
    *modules, leaf = path
    suffix = _HF_SUFFIX[leaf]
    if is_stacked(path):
        rest = ".".join(modules[2:])
        return [f"{modules[0]}.{modules[1]}.{i}.{rest}.{suffix}" for i in range(n_layers)]
    return [f"{'.'.join(modules)}.{suffix}"]


def _is_redundant(name: str, config: AnyConfig) -> bool:
    """Tensors some checkpoints carry that are not parameters of the model."""
    # RoPE tables and GPT-2's causal-mask buffers saved by old conversions are recomputed; a tied
    # checkpoint may still hold lm_head.weight, which transformers itself replaces by the embedding.
    return (name.endswith(layout_for(config).buffers)
            or (config.tie_word_embeddings and name == "lm_head.weight"))


def config_from_hf(hf: dict[str, Any], **policy) -> AnyConfig:
    """The config class for ``hf["model_type"]`` (:class:`GPT2Config` or :class:`ModelConfig`), parsed.

    GPT-2 has one attention (``jax.nn.dot_product_attention``): it takes ``attention="auto"`` only."""
    check_hf_mapping(hf)
    if hf.get("model_type") == "gpt2":
        attention = policy.pop("attention", "auto")
        if attention != "auto":
            raise ValueError(f"attention={attention!r} is a Llama-family setting; GPT-2 models take 'auto' only")
        return GPT2Config.from_hf(hf, **policy)
    return ModelConfig.from_hf(hf, **policy)


def load_hf_config(checkpoint_dir: str | Path, **policy) -> AnyConfig:
    """The config of ``checkpoint_dir/config.json``; ``policy``: param_dtype, compute_dtype, remat, attention."""
    config_path = Path(checkpoint_dir) / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: a Hugging Face checkpoint directory needs one")
    return read_hf_config(config_path, **policy)


def read_hf_config(config_path: Path, **policy) -> AnyConfig:
    """The config in the Hugging Face ``config.json``-format file ``config_path`` (any name); errors name it."""
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path}: not valid JSON ({error})") from None
    try:
        return config_from_hf(hf, **policy)
    except ValueError as error:
        raise ValueError(f"{config_path}: {error}") from None
    except (KeyError, TypeError) as error:  # a value of an unexpected shape that no check above names
        raise ValueError(f"{config_path}: malformed config ({type(error).__name__}: {error})") from error


class TensorSource(Protocol):
    """Named checkpoint tensors in Hugging Face naming and torch layout, readable block by block.

    :class:`SafetensorsSource` implements it for HF directories; other formats (GGUF) plug into
    :func:`model_from_tensors` by implementing the same members.
    """

    names: set[str]
    description: str  # what the tensors come from (a file or index), for error messages

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, in torch's layout."""
        ...

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """The block ``tensor[index]`` (any float dtype; the caller casts)."""
        ...

    def location(self, name: str) -> str:
        """Where the tensor lives, for error messages (a file name)."""
        ...


class SafetensorsSource:
    """The tensors of ``model.safetensors`` or of the shards of ``model.safetensors.index.json`` (the index
    wins when both exist; the caller checks that one does).

    Files are opened lazily, once, and closed with ``stack``; reads go through ``safe_open(...).get_slice``
    so only the requested block is read from disk.
    """

    def __init__(self, directory: Path, stack: contextlib.ExitStack):
        self._stack = stack
        self._handles: dict[Path, Any] = {}
        index_path, single_path = directory / INDEX_FILE, directory / SINGLE_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{index_path}: not a safetensors index with a weight_map ({error!r})") from None
            self.description = str(index_path)
            self._file_of = {name: directory / file for name, file in weight_map.items()}
            for file in sorted(set(self._file_of.values())):
                if not file.is_file():
                    raise FileNotFoundError(f"{file} is listed in {index_path} but does not exist")
        else:
            self.description = str(single_path)
            self._file_of = {name: single_path for name in self._open(single_path).keys()}
        self.names = set(self._file_of)

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = self._stack.enter_context(safe_open(str(file), framework="numpy"))
            except SafetensorError as error:
                raise ValueError(f"{file}: not a readable safetensors file ({error})") from None
        return self._handles[file]

    def _slice(self, name: str):
        file = self._file_of[name]
        try:
            return self._open(file).get_slice(name)
        except SafetensorError as error:
            raise ValueError(f"{file}: cannot read tensor {name!r} ({error})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, in torch's layout."""
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """The block ``tensor[index]``, read from its file without loading the rest."""
        return self._slice(name)[index]

    def location(self, name: str) -> str:
        """The safetensors file that holds the tensor."""
        return str(self._file_of[name])


def _reader(source: TensorSource, names: list[str], stacked: bool, transpose: bool,
            dtype: np.dtype) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """Callback for ``make_array_from_callback``: the requested block of the (stacked, transposed) param."""

    def read_one(name: str, index: tuple[slice, ...]) -> np.ndarray:
        if transpose:  # our [in, out] block (i, o) is torch's [out, in] block (o, i)
            return source.read(name, (index[1], index[0])).T
        return source.read(name, index)

    def read(index: tuple[slice, ...]) -> np.ndarray:
        if stacked:
            layers = range(len(names))[index[0]]
            block = np.stack([read_one(names[i], index[1:]) for i in layers])
        else:
            block = read_one(names[0], index)
        return np.ascontiguousarray(block).astype(dtype, copy=False)

    return read


def model_from_tensors(config: AnyConfig, source: TensorSource, *, mesh: Mesh | None = None,
                       origin: str = "the config") -> AnyModel:
    """Build the model of ``config`` (:class:`LlamaForCausalLM` or :class:`GPT2LMHeadModel`) from ``source``.

    Every tensor the config implies must be present with the right shape, and every tensor present must
    be used (apart from :func:`_is_redundant` ones). Each parameter is created directly with its final
    sharding (``mesh``) or on the default device; each device reads only its own block.

    Args:
        config: the architecture and dtype policy.
        source: the tensors.
        mesh: optional mesh for :func:`jaxalign.models.sharding.named_shardings`.
        origin: what the config came from, for error messages.
    """
    layout = layout_for(config)
    abstract = nnx.eval_shape(lambda: layout.model_class(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = dict(nnx.to_flat_state(named_shardings(abstract_state, mesh))) if mesh is not None else None
    default_sharding = SingleDeviceSharding(jax.devices()[0])
    params = [(tuple(str(p) for p in path), path, var) for path, var in nnx.to_flat_state(abstract_state)]

    expected = {name for names, _, _ in params for name in hf_tensor_names(names, config.n_layers)}
    missing = sorted(expected - source.names)
    if missing:
        raise ValueError(
            f"{source.description}: missing tensor(s) {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all) required by {origin}"
        )
    unexpected = sorted(n for n in source.names - expected if not _is_redundant(n, config))
    if unexpected:
        raise ValueError(
            f"unexpected tensor(s) {[(n, source.location(n)) for n in unexpected[:5]]}"
            f"{' ...' if len(unexpected) > 5 else ''}: not part of the {config.architecture} model of {origin} "
            f"({config})"
        )

    loaded = []
    for names, path, variable in params:
        hf_names = hf_tensor_names(names, config.n_layers)
        stacked, transpose = is_stacked(names), is_transposed(names, layout)
        shape = tuple(variable.get_value().shape)
        per_tensor = shape[1:] if stacked else shape
        file_shape = per_tensor[::-1] if transpose else per_tensor
        for name in hf_names:
            found = source.shape(name)
            if found != file_shape:
                raise ValueError(
                    f"{source.location(name)}: tensor {name!r} has shape {found}, expected {file_shape} "
                    f"from {origin}"
                )
        sharding = shardings[path].get_value() if shardings is not None else default_sharding
        array = jax.make_array_from_callback(
            shape, sharding, _reader(source, hf_names, stacked, transpose, np.dtype(config.param_jnp_dtype))
        )
        loaded.append((path, variable.replace(array)))
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def load_hf(
    checkpoint_dir: str | Path,
    *,
    mesh: Mesh | None = None,
    param_dtype: str = "float32",
    compute_dtype: str = "float32",
    remat: str = "none",
    attention: str = "auto",
) -> AnyModel:
    """Load a transformers Llama/Mistral/Qwen2 or GPT-2 checkpoint directory.

    Args:
        checkpoint_dir: directory with ``config.json`` and ``model.safetensors``, or
            ``model.safetensors.index.json`` + its shards, or (Flax checkpoints) ``flax_model.msgpack``;
            safetensors win when both are present.
        mesh: when given, each parameter is placed directly with its sharding from
            :func:`jaxalign.models.sharding.named_shardings`; otherwise on the default device.
        param_dtype, compute_dtype, remat, attention: the execution policy (see :class:`ModelConfig`);
            tensors are cast from the file's dtype to ``param_dtype``.

    Returns:
        A :class:`LlamaForCausalLM` (``GPT2LMHeadModel`` for ``model_type: gpt2``); its ``config`` is the
        parsed ``config.json``.

    Raises:
        FileNotFoundError: a missing ``config.json``, weights file, or shard listed in the index.
        ValueError: an unsupported/unknown config key, or a missing, unexpected or wrongly shaped tensor
            (the message names the tensor and the file).
    """
    directory = Path(checkpoint_dir)
    config = load_hf_config(directory, param_dtype=param_dtype, compute_dtype=compute_dtype, remat=remat,
                            attention=attention)
    with contextlib.ExitStack() as stack:
        if (directory / INDEX_FILE).is_file() or (directory / SINGLE_FILE).is_file():
            source = SafetensorsSource(directory, stack)
        elif (flax_file := flax_checkpoint(directory)) is not None:
            source = FlaxMsgpackSource(flax_file, config.architecture)
        else:
            raise FileNotFoundError(
                f"{directory} has none of {SINGLE_FILE}, {INDEX_FILE} or {FLAX_FILE} (convert "
                "pytorch_model.bin with transformers' save_pretrained)"
            )
        return model_from_tensors(config, source, mesh=mesh, origin=str(directory / CONFIG_FILE))


def _hf_tensors(model: AnyModel, dtype: np.dtype) -> Iterator[tuple[str, tuple[int, ...], Callable]]:
    """``(name, shape, fetch)`` of every HF tensor in transformers' order (embeddings, layer by layer, head)."""
    config = model.config
    layout = layout_for(config)
    flat = [(tuple(str(p) for p in path), var.get_value())
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))]

    def fetch(value, layer, transpose):
        def get() -> np.ndarray:
            array = np.asarray(jax.device_get(value if layer is None else value[layer]))
            return np.ascontiguousarray(array.T if transpose else array).astype(dtype)
        return get

    def entries(layered: bool, layer: int | None):
        for names, value in flat:
            if is_stacked(names) != layered:
                continue
            name = hf_tensor_names(names, config.n_layers)[0 if layer is None else layer]
            shape = tuple(value.shape[1:] if layered else value.shape)
            transpose = is_transposed(names, layout)
            yield name, shape[::-1] if transpose else shape, fetch(value, layer, transpose)

    top_level = list(entries(False, None))
    yield from (entry for entry in top_level if entry[0].endswith(("embed_tokens.weight", "wte.weight", "wpe.weight")))
    for layer in range(config.n_layers):
        yield from entries(True, layer)
    yield from (entry for entry in top_level if not entry[0].endswith(("embed_tokens.weight", "wte.weight",
                                                                         "wpe.weight")))


def save_hf(
    model: AnyModel,
    config: AnyConfig,
    out_dir: str | Path,
    tokenizer=None,
    *,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write a transformers checkpoint directory: ``config.json``, safetensors weights, tokenizer files.

    A model with LoRA adapters is exported merged (``W + (α/r)·A·B``, see
    :func:`jaxalign.models.lora.merge_lora`): the directory holds a plain checkpoint. Weights are written
    in ``config.param_dtype`` (pass ``model.config.with_policy(param_dtype=
    "bfloat16")`` to export bf16). Above ``max_shard_bytes`` the weights are split into
    ``model-0000k-of-0000n.safetensors`` files with a ``model.safetensors.index.json``; only one shard
    is ever held on the host. ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads it.

    Args:
        model: the model to export.
        config: its config (must describe the same architecture as ``model.config``).
        out_dir: created if needed; weight files of an earlier export there are replaced.
        tokenizer: optional; anything with ``save_pretrained(out_dir)`` (a transformers tokenizer).
        max_shard_bytes: largest safetensors file to write.

    Returns:
        ``out_dir`` as a Path.
    """
    if not config.same_architecture(model.config):
        raise ValueError(f"save_hf: config describes a different architecture than the model:\n"
                         f"  config: {config}\n  model:  {model.config}")
    if has_lora(model):
        model = merge_lora(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A stale index or shard from an earlier export would shadow or mix with the new weights.
    for stale in [out / SINGLE_FILE, out / INDEX_FILE, *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    dtype = np.dtype(config.param_jnp_dtype)

    shards: list[list[tuple[str, Callable]]] = [[]]
    shard_bytes, total_bytes = 0, 0
    for name, shape, fetch in _hf_tensors(model, dtype):
        size = math.prod(shape) * dtype.itemsize
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((name, fetch))
        shard_bytes += size
        total_bytes += size

    if len(shards) == 1:
        file_names = [SINGLE_FILE]
    else:
        file_names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(file_names, shards, strict=True):
        save_file({name: fetch() for name, fetch in shard}, str(out / file_name), metadata={"format": "pt"})
        weight_map |= {name: file_name for name, _ in shard}
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (out / CONFIG_FILE).write_text(json.dumps(config.to_hf(), indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
