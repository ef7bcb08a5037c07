"""Hugging Face Flax checkpoints (``flax_model.msgpack``) as a :class:`jaxalign.models.hf_io.TensorSource`.

transformers' Flax models (``FlaxGPT2LMHeadModel``, ``FlaxLlamaForCausalLM``, ``FlaxMistralForCausalLM``)
saved their parameters as one msgpack'd nested dict (``flax.serialization``), in the torch module
hierarchy with Flax leaf names:

- ``kernel`` is the torch ``weight`` transposed: ``nn.Dense`` stores ``[in, out]``, and GPT-2's
  ``FlaxConv1D`` stores ``[out, in]``, the transpose of torch's ``Conv1D`` ``[in, out]``;
- ``embedding`` is an ``nn.Embed`` table (torch ``weight``, same layout);
- ``scale`` (``nn.LayerNorm``) or ``weight`` (Flax Llama's RMSNorm) is a norm's torch ``weight``;
- layer ``i`` lives under the key ``"i"`` (``transformer/h/0/...``, ``model/layers/0/...``).

This module turns that dict back into torch names and layout, so :func:`model_from_tensors` loads it as
it loads safetensors. A dict saved from a base model (no ``transformer``/``model`` prefix) gets the prefix
added, as transformers does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import serialization
from flax.traverse_util import flatten_dict

FLAX_FILE = "flax_model.msgpack"
FLAX_INDEX_FILE = "flax_model.msgpack.index.json"

# The prefix of the base model inside the causal-LM module, per model family.
_BASE_PREFIX = {"gpt2": "transformer", "llama": "model", "mistral": "model", "qwen2": "model"}
_TORCH_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "weight": "weight", "bias": "bias"}


class FlaxMsgpackSource:
    """The tensors of ``flax_model.msgpack`` under torch names, in torch layout."""

    def __init__(self, path: Path, architecture: str):
        self.description = str(path)
        try:
            restored = serialization.msgpack_restore(path.read_bytes())
        except Exception as error:  # msgpack raises several unrelated types on corrupt input
            raise ValueError(f"{path}: not a readable Flax msgpack checkpoint ({error!r})") from None
        params = restored.get("params", restored) if isinstance(restored, dict) else None
        if not isinstance(params, dict):
            raise ValueError(f"{path}: expected a nested dict of parameters, got {type(restored).__name__}")
        prefix = _BASE_PREFIX[architecture]
        if prefix not in params:  # saved from the base model: its keys start below the prefix
            params = {prefix: params}
        self._tensors: dict[str, tuple[np.ndarray, bool]] = {}
        for keys, value in flatten_dict(params).items():
            *modules, leaf = (str(key) for key in keys)
            if leaf not in _TORCH_LEAF:
                raise ValueError(f"{path}: parameter {'/'.join(keys)!r} has an unknown Flax leaf name {leaf!r}")
            self._tensors[".".join([*modules, _TORCH_LEAF[leaf]])] = (np.asarray(value), leaf == "kernel")
        self.names = set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        value, transposed = self._tensors[name]
        return value.shape[::-1] if transposed else value.shape

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        value, transposed = self._tensors[name]
        return (value.T if transposed else value)[index]

    def location(self, name: str) -> str:
        return self.description


def flax_checkpoint(directory: Path) -> Path | None:
    """``directory/flax_model.msgpack`` if present; sharded Flax checkpoints raise (not supported)."""
    if (directory / FLAX_INDEX_FILE).is_file():
        raise ValueError(f"{directory / FLAX_INDEX_FILE}: sharded Flax checkpoints are not supported; "
                         "convert to safetensors with transformers' save_pretrained")
    path = directory / FLAX_FILE
    return path if path.is_file() else None

