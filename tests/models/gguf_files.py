"""Writing small GGUF files the way llama.cpp's converter does, from a transformers Llama model.

The q/k projections are permuted with llama.cpp's forward permutation (``permute`` in its
``convert_hf_to_gguf.py``), written out here independently of jaxalign's inverse, and the tokenizer is a
tiny byte-level BPE vocabulary with merges, special tokens and a ChatML template.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GGUF_TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def tiny_vocabulary(size: int) -> tuple[list[str], list[int], list[str]]:
    """``(tokens, token_types, merges)`` of a byte-level BPE vocabulary of exactly ``size`` tokens.

    Three ChatML control tokens, single characters (``Ġ`` is the byte-level space), then one token per
    merge: space + letter, neighbouring letters, and three-character words built on those.
    """
    letters = "abcdefghijklmnopqrstuvwxyz"
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    singles = list(letters) + list("0123456789") + ["Ġ", "Ċ", "!", "?"]
    pairs = [("Ġ", c) for c in letters] + list(zip(letters, letters[1:])) + [("Ġa", "b"), ("Ġh", "i"), ("Ġt", "h")]
    n_merges = size - len(specials) - len(singles)
    if not 0 <= n_merges <= len(pairs):
        raise ValueError(f"tiny_vocabulary builds {len(specials) + len(singles)} to "
                         f"{len(specials) + len(singles) + len(pairs)} tokens, not {size}")
    pairs = pairs[:n_merges]
    tokens = specials + singles + ["".join(pair) for pair in pairs]
    token_types = [3] * len(specials) + [1] * (len(tokens) - len(specials))  # 3 = CONTROL, 1 = NORMAL
    return tokens, token_types, [" ".join(pair) for pair in pairs]


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k permutation: each head's two rotary halves become interleaved pairs."""
    rest = weight.shape[1:]
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensor_name(hf_name: str) -> str:
    stem, _, suffix = hf_name.rpartition(".")
    if stem in _GGUF_TOP_NAMES:
        return f"{_GGUF_TOP_NAMES[stem]}.{suffix}"
    _, _, layer, rest = stem.split(".", 3)
    return f"blk.{layer}.{_GGUF_LAYER_NAMES[rest]}.{suffix}"


def write_llama_gguf(
    hf_model,
    path: Path,
    *,
    quantize: gguf.GGMLQuantizationType | None = None,
    extra_metadata: dict[str, int] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write ``hf_model`` (a transformers LlamaForCausalLM) as a llama.cpp-style GGUF file.

    Args:
        quantize: quantise every 2-D weight (embedding and projections) to this type; norms stay F32.
        extra_metadata: additional uint32 ``key: value`` metadata (for error tests).
        extra_tensors: additional F32 tensors under GGUF names (for error tests).
    """
    config = hf_model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.head_dim)
    tokens, token_types, merges = tiny_vocabulary(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for key, value in (extra_metadata or {}).items():
        writer.add_uint32(key, value)

    tensors = {name: value.detach().float().numpy() for name, value in hf_model.state_dict().items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    for name, weight in tensors.items():
        if ".q_proj." in name:
            weight = llama_cpp_permute(weight, config.num_attention_heads)
        elif ".k_proj." in name:
            weight = llama_cpp_permute(weight, config.num_key_value_heads)
        if quantize is not None and weight.ndim == 2:
            writer.add_tensor(gguf_tensor_name(name), gguf.quants.quantize(weight, quantize), raw_dtype=quantize)
        else:
            writer.add_tensor(gguf_tensor_name(name), np.ascontiguousarray(weight))
    for name, weight in (extra_tensors or {}).items():
        writer.add_tensor(name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
