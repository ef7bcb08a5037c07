"""Hugging Face checkpoint directories: load into the stacked NNX layout, export back.

Loading reads ``config.json`` and ``model.safetensors`` (or the shards listed in
``model.safetensors.index.json``) tensor by tensor through ``safetensors.safe_open``. Each parameter is
created with ``jax.make_array_from_callback``: every device reads only its own shard's slice of the file
(transposed from torch's ``[out, in]`` to ``[in, out]``, and gathered over the layers for the stacked
``[L, ...]`` parameters), so no full host copy of the model is ever built.

Name mapping (``i`` = layer; "kernel" parameters are transposed; see docs/models.md for the full table):

- ``model/embed_tokens/embedding`` [V, D] <-> ``model.embed_tokens.weight``
- ``model/layers/<path>/{kernel,bias,scale}`` [L, ...] <-> ``model.layers.{i}.<path>.{weight,bias,weight}``
- ``model/norm/scale`` [D] <-> ``model.norm.weight``
- ``lm_head/kernel`` [D, V] (untied only) <-> ``lm_head.weight``
"""

from __future__ import annotations

import contextlib
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

from jaxalign.models.config import ModelConfig
from jaxalign.models.llama import LlamaForCausalLM
from jaxalign.models.sharding import named_shardings

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_HF_SUFFIX = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}


def is_stacked(path: tuple[str, ...]) -> bool:
    """Whether a LlamaForCausalLM parameter path is one of the ``[L, ...]`` decoder-layer parameters."""
    return len(path) > 2 and path[1] == "layers"


def hf_tensor_names(path: tuple[str, ...], n_layers: int) -> list[str]:
    """The HF tensor name(s) of one parameter: one per layer for stacked parameters, else one."""
    *modules, leaf = path
    suffix = _HF_SUFFIX[leaf]
    if is_stacked(path):
        rest = ".".join(modules[2:])
        return [f"{modules[0]}.layers.{i}.{rest}.{suffix}" for i in range(n_layers)]
    return [f"{'.'.join(modules)}.{suffix}"]


def _is_redundant(name: str, config: ModelConfig) -> bool:
    """Tensors some checkpoints carry that are not parameters of the model."""
    # RoPE tables saved by old conversions are recomputed from the config; a tied checkpoint may still
    # hold lm_head.weight, which transformers itself replaces by the embedding.
    return name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight")


def load_hf_config(checkpoint_dir: str | Path, **policy) -> ModelConfig:
    """``ModelConfig`` from ``checkpoint_dir/config.json``; ``policy``: param_dtype, compute_dtype, remat."""
    config_path = Path(checkpoint_dir) / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: a Hugging Face checkpoint directory needs one")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path}: not valid JSON ({error})") from None
    try:
        return ModelConfig.from_hf(hf, **policy)
    except ValueError as error:
        raise ValueError(f"{config_path}: {error}") from None


class TensorSource(Protocol):
    """Named checkpoint tensors in Hugging Face naming and torch layout, readable block by block.

    :class:`SafetensorsSource` implements it for HF directories; other formats (GGUF) plug into
    :func:`model_from_tensors` by implementing the same members.
    """

    names: set[str]
    description: str  # what the tensors come from (a file or index), for error messages

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """The block ``tensor[index]`` (any float dtype; the caller casts)."""
        ...

    def location(self, name: str) -> str:
        """Where the tensor lives, for error messages (a file name)."""
        ...


class SafetensorsSource:
    """The tensors of ``model.safetensors`` or of the shards of ``model.safetensors.index.json``.

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
        elif single_path.is_file():
            self.description = str(single_path)
            self._file_of = {name: single_path for name in self._open(single_path).keys()}
        else:
            raise FileNotFoundError(
                f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors checkpoints are "
                "supported; convert pytorch_model.bin with transformers' save_pretrained)"
            )
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
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        return self._slice(name)[index]

    def location(self, name: str) -> str:
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


def model_from_tensors(config: ModelConfig, source: TensorSource, *, mesh: Mesh | None = None,
                       origin: str = "the config") -> LlamaForCausalLM:
    """Build a :class:`LlamaForCausalLM` whose parameters are read from ``source`` (HF names).

    Every tensor the config implies must be present with the right shape, and every tensor present must
    be used (apart from :func:`_is_redundant` ones). Each parameter is created directly with its final
    sharding (``mesh``) or on the default device; each device reads only its own block.

    Args:
        config: the architecture and dtype policy.
        source: the tensors.
        mesh: optional mesh for :func:`jaxalign.models.sharding.named_shardings`.
        origin: what the config came from, for error messages.
    """
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
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
            f"{' ...' if len(unexpected) > 5 else ''}: not part of a {config.architecture} model with "
            f"this config (tie_word_embeddings={config.tie_word_embeddings}, biases: "
            f"qkv={config.qkv_bias} o={config.o_bias} mlp={config.mlp_bias})"
        )

    loaded = []
    for names, path, variable in params:
        hf_names = hf_tensor_names(names, config.n_layers)
        stacked, transpose = is_stacked(names), names[-1] == "kernel"
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
) -> LlamaForCausalLM:
    """Load a transformers Llama/Mistral/Qwen2 checkpoint directory into a :class:`LlamaForCausalLM`.

    Args:
        checkpoint_dir: directory with ``config.json`` and ``model.safetensors`` or
            ``model.safetensors.index.json`` + its shards.
        mesh: when given, each parameter is placed directly with its sharding from
            :func:`jaxalign.models.sharding.named_shardings`; otherwise on the default device.
        param_dtype, compute_dtype, remat: the dtype/remat policy (see :class:`ModelConfig`);
            tensors are cast from the file's dtype to ``param_dtype``.

    Returns:
        The model; its ``config`` is the parsed ``config.json``.

    Raises:
        FileNotFoundError: a missing ``config.json``, weights file, or shard listed in the index.
        ValueError: an unsupported/unknown config key, or a missing, unexpected or wrongly shaped tensor
            (the message names the tensor and the file).
    """
    directory = Path(checkpoint_dir)
    config = load_hf_config(directory, param_dtype=param_dtype, compute_dtype=compute_dtype, remat=remat)
    with contextlib.ExitStack() as stack:
        source = SafetensorsSource(directory, stack)
        return model_from_tensors(config, source, mesh=mesh, origin=str(directory / CONFIG_FILE))


def _hf_tensors(model: LlamaForCausalLM, dtype: np.dtype) -> Iterator[tuple[str, tuple[int, ...], Callable]]:
    """``(name, shape, fetch)`` of every HF tensor in transformers' order (embeddings, layer by layer, head)."""
    config = model.config
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
            transpose = names[-1] == "kernel"
            yield name, shape[::-1] if transpose else shape, fetch(value, layer, transpose)

    top_level = {entry[0]: entry for entry in entries(False, None)}
    yield top_level.pop("model.embed_tokens.weight")
    for layer in range(config.n_layers):
        yield from entries(True, layer)
    yield from top_level.values()  # model.norm.weight, lm_head.weight


def save_hf(
    model: LlamaForCausalLM,
    config: ModelConfig,
    out_dir: str | Path,
    tokenizer=None,
    *,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write a transformers checkpoint directory: ``config.json``, safetensors weights, tokenizer files.

    Weights are written in ``config.param_dtype`` (pass ``model.config.with_policy(param_dtype=
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
