"""Write a causal LM and its tokenizer as one GGUF file, for llama.cpp, Ollama and LM Studio.

:func:`save_gguf` writes, through the ``gguf`` package's ``GGUFWriter`` (tensor by tensor, so only one tensor
is ever held converted on the host):

- **metadata** under llama.cpp's keys for the architecture: ``llama`` (Llama family, SmolLM2, and Mistral
  without a sliding window, which llama.cpp runs as Llama), ``qwen2`` and ``gpt2``;
- **tensors** under llama.cpp's names (the ``gguf`` package's own name map). llama.cpp's Llama kernels rotate
  interleaved pairs, so the rows of ``q_proj``/``k_proj`` (weights and biases) are permuted as its converter
  does (:func:`permute_qk`, the inverse of :func:`jaxalign.models.gguf_io.unpermute_qk`); Qwen2 rotates halves
  as transformers does and is written as it is. GPT-2's ``Conv1D`` kernels are transposed to ``[out, in]``;
- **the tokenizer** (:mod:`jaxalign.models.gguf_vocab`): vocabulary, merges, token types, special token ids,
  whether BOS is added, llama.cpp's pre-tokenizer name, and the chat template.

Quantisation types (``quant``), chosen per tensor as llama.cpp's ``llama-quantize`` chooses them; 1-D tensors
(norms, biases) always stay float32:

============  =========================================================================================
``f16``       every matrix float16
``bf16``      every matrix bfloat16
``q8_0``      every matrix Q8_0 (8 bits and a float16 scale per 32 values)
``q4_0``      Q4_0 (4 bits per value, a scale per 32), the output projection (or the tied embedding) Q6_K
``q4_k_m``    Q4_K, with Q6_K for the output projection and for ``attn_v`` and ``ffn_down`` in the layers
              llama.cpp gives more bits (the first and last eighth, and every third between)
============  =========================================================================================

A row whose length the type's block does not divide falls back as llama.cpp's does (Q4_K -> Q5_0,
Q6_K -> Q8_0, anything else -> float16).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jaxalign.models import kquants
from jaxalign.models.config import ModelConfig
from jaxalign.models.gguf_vocab import tokenizer_metadata
from jaxalign.models.gpt2 import GPT2Config
from jaxalign.models.hf_io import _hf_tensors as hf_model_tensors
from jaxalign.models.quantize import merge_for_export

QUANT_TYPES = ("f16", "bf16", "q8_0", "q4_0", "q4_k_m")
# GPT-2's activations that are the tanh approximation of GELU, which is what llama.cpp computes.
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def permute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: each head's two rotary halves interleaved as pairs ``(0, Dh/2), (1, Dh/2+1)...``

    The inverse of :func:`jaxalign.models.gguf_io.unpermute_qk`; ``weight`` is ``[n_heads · Dh, ...]``."""
    rest = weight.shape[1:]
    per_head = weight.shape[0] // n_heads
    return weight.reshape(n_heads, 2, per_head // 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def gguf_architecture(config) -> str:
    """The llama.cpp architecture that runs ``config``'s model exactly, or a ValueError saying why none does."""
    if isinstance(config, GPT2Config):
        if config.activation not in _TANH_GELU:
            raise ValueError(f"GGUF cannot express GPT-2 with activation {config.activation!r}: llama.cpp's GPT-2 "
                             f"computes the tanh approximation of GELU ({', '.join(_TANH_GELU)})")
        return "gpt2"
    if not isinstance(config, ModelConfig):
        raise ValueError(f"GGUF export takes a Llama-family or GPT-2 causal LM, not {type(config).__name__}")
    if config.sliding_window is not None and config.sliding_window < config.max_position_embeddings:
        raise ValueError(f"GGUF cannot express {config.architecture}'s sliding attention window of "
                         f"{config.sliding_window} tokens: llama.cpp runs {config.architecture} with full "
                         "attention, which would change the model")
    if config.rope_scaling is not None and config.rope_scaling.kind != "linear":
        raise ValueError(f"GGUF export does not write {config.rope_scaling.kind} RoPE scaling (llama.cpp stores it "
                         "as a rope_freqs tensor that transformers' GGUF loader and jaxalign's reader ignore); "
                         "export HF or ONNX instead")
    if config.architecture == "qwen2":
        return "qwen2"
    if config.o_bias != config.qkv_bias:
        raise ValueError("GGUF's llama architecture has attention biases on q/k/v and the output together or not at "
                         f"all; this model has qkv_bias={config.qkv_bias}, o_bias={config.o_bias}")
    return "llama"


@dataclass(frozen=True)
class _Tensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # NumPy order ([out, in] for a matrix)
    kind: Any  # gguf.GGMLQuantizationType
    fetch: Callable[[], np.ndarray]  # float32 values in GGUF layout


def _quantise(values: np.ndarray, kind) -> np.ndarray:
    import gguf

    Q = gguf.GGMLQuantizationType
    if kind == Q.F32:
        return np.ascontiguousarray(values, np.float32)
    if kind == Q.Q4_K:
        return kquants.quantize_q4_k(values)
    if kind == Q.Q6_K:
        return kquants.quantize_q6_k(values)
    return gguf.quants.quantize(np.ascontiguousarray(values, np.float32), kind)


def _fallback(kind, row: int):
    """llama.cpp's replacement for a type whose block does not divide the row length (``tensor_type_fallback``)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if kind in (Q.F32, Q.F16, Q.BF16) or row % gguf.GGML_QUANT_SIZES[kind][0] == 0:
        return kind
    kind = {Q.Q4_K: Q.Q5_0, Q.Q6_K: Q.Q8_0}.get(kind, Q.F16)
    return kind if kind == Q.F16 or row % gguf.GGML_QUANT_SIZES[kind][0] == 0 else Q.F16


def _more_bits(layer: int, n_layers: int) -> bool:
    """The layers llama.cpp's Q4_K_M gives 6 bits in ``attn_v`` and ``ffn_down``."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], quant: str, *, n_layers: int, tied: bool):
    """The GGUF type of tensor ``name`` (llama.cpp naming) of ``shape`` under ``quant`` (llama-quantize's choice)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) < 2 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return Q.F32
    if name == "position_embd.weight":  # llama.cpp keeps positional embeddings unquantised
        return Q.F16 if quant == "f16" else Q.BF16 if quant == "bf16" else Q.F32
    base = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_k_m": Q.Q4_K}[quant]
    kind = base
    row = shape[-1]
    if base in (Q.Q4_0, Q.Q4_K):
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            kind = Q.Q8_0 if row % gguf.GGML_QUANT_SIZES[base][0] else Q.Q6_K
        elif base == Q.Q4_K and (".attn_v." in name or ".attn_qkv." in name or ".ffn_down." in name):
            if _more_bits(int(name.split(".")[1]), n_layers):
                kind = Q.Q6_K
    return _fallback(kind, row)


def _gguf_tensors(model, arch: str, quant: str) -> list[_Tensor]:
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.n_layers)
    tied = config.tie_word_embeddings
    out = []
    for hf_name, shape, fetch in hf_model_tensors(model, np.float32):
        stem, _, suffix = hf_name.rpartition(".")
        name = name_map.get_name(stem)
        if name is None:
            raise ValueError(f"GGUF export: tensor {hf_name!r} has no llama.cpp name for architecture {arch}")
        name = f"{name}.{suffix}"
        if arch == "gpt2" and len(shape) == 2 and ".h." in hf_name:  # Conv1D [in, out] -> [out, in]
            shape, fetch = shape[::-1], _transposed(fetch)
        elif arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            heads = config.n_heads if ".q_proj." in hf_name else config.n_kv_heads
            fetch = _permuted(fetch, heads)
        out.append(_Tensor(name, tuple(shape), tensor_type(name, tuple(shape), quant, n_layers=config.n_layers,
                                                              tied=tied), fetch))
    return out


def _transposed(fetch):
    return lambda: np.ascontiguousarray(fetch().T)


def _permuted(fetch, heads: int):
    return lambda: permute_qk(fetch(), heads)


def _add_architecture(writer, config, arch: str, vocab_size: int) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_heads)
    writer.add_vocab_size(vocab_size)
    if arch == "gpt2":
        writer.add_layer_norm_eps(config.layer_norm_eps)
        return
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    if config.head_dim != config.d_model // config.n_heads:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    if config.rope_scaling is not None:  # linear only (gguf_architecture)
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_scaling.factor)


_FILE_TYPES = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0",
               "q4_k_m": "MOSTLY_Q4_K_M"}


def default_permissions(path: Path) -> None:
    """Give a file made by ``mkstemp`` (mode 0600) or a directory made by ``mkdtemp`` (0700) the mode a plain
    ``open``/``mkdir`` gives (0666/0777 less the umask): an export is read by servers and users other than its
    writer (llama-server, Ollama, a shared model folder)."""
    umask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(umask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed to ``path`` when the block ends without an error,
    removed when it raises (so a failed or interrupted export leaves no partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=path.parent)
    os.close(handle)
    temporary = Path(temporary)
    default_permissions(temporary)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def save_gguf(model, tokenizer, path: str | Path, *, quant: str = "f16", name: str | None = None,
              progress: bool = True) -> Path:
    """Write ``model`` (a causal LM) and ``tokenizer`` as a GGUF file at ``path``.

    Args:
        model: a :class:`~jaxalign.models.LlamaForCausalLM` (llama, mistral, qwen2) or
            :class:`~jaxalign.models.GPT2LMHeadModel`; LoRA adapters are merged first.
        tokenizer: its transformers tokenizer (byte-level BPE or sentencepiece BPE), chat template included.
        path: the ``.gguf`` file; written under a temporary name and renamed at the end.
        quant: one of :data:`QUANT_TYPES` (see the module docstring).
        name: ``general.name``; default: the file's stem.
        progress: show a bar over the tensors.

    Raises:
        ValueError: an unknown ``quant``, an architecture or tokenizer GGUF cannot express (before any write).
    """
    import gguf

    if quant not in QUANT_TYPES:
        raise ValueError(f"unknown GGUF quantisation {quant!r}; expected one of {', '.join(QUANT_TYPES)}")
    path = Path(path)
    config = model.config
    arch = gguf_architecture(config)
    vocab = tokenizer_metadata(tokenizer, vocab_size=config.vocab_size, config=config)
    model = merge_for_export(model)  # quantised kernels dequantised, LoRA adapters merged
    tensors = _gguf_tensors(model, arch, quant)
    with atomic_output(path) as temporary:
        writer = gguf.GGUFWriter(temporary, arch)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or path.stem)
        _add_architecture(writer, config, arch, config.vocab_size)
        writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[quant]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.add_to(writer)
        for tensor in tensors:
            bytes_shape = gguf.quant_shape_to_byte_shape(tensor.shape, tensor.kind)
            kind_size = gguf.GGML_QUANT_SIZES[tensor.kind]
            nbytes = int(np.prod(tensor.shape)) // kind_size[0] * kind_size[1]
            if tensor.kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                dtype = np.float32 if tensor.kind == gguf.GGMLQuantizationType.F32 else np.float16
                writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(dtype), nbytes)
            else:
                writer.add_tensor_info(tensor.name, bytes_shape, np.dtype(np.uint8), nbytes, raw_dtype=tensor.kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in tqdm(tensors, desc=f"writing {path.name} ({quant})", unit="tensor", disable=not progress):
            data = _quantise(tensor.fetch(), tensor.kind)
            writer.write_tensor_data(data)
        writer.close()
    return path
