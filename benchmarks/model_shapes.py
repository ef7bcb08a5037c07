"""The model shapes the benchmarks build with random weights (no checkpoint needed, so GPU machines run them).

``smollm2-135m`` is SmolLM2-135M(-Instruct) as jaxalign's GGUF loader reads it from the embedded file (see
docs/models.md); ``llama-1b`` is Llama 3.2 1B's; ``tiny`` is 2 layers with SmolLM2's vocabulary, so the chat
data's token ids fit (a smoke test of the scripts).
"""

from __future__ import annotations

from jaxalign.models import ModelConfig, RopeScaling

SMOLLM2_135M = ModelConfig(
    architecture="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
    intermediate_size=1536, rms_norm_eps=1e-5, rope_theta=100_000.0, tie_word_embeddings=True,
    max_position_embeddings=8192, bos_token_id=1, eos_token_ids=(2,), pad_token_id=2,
)
LLAMA_1B = ModelConfig(
    architecture="llama", vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
    intermediate_size=8192, rms_norm_eps=1e-5, rope_theta=500_000.0, tie_word_embeddings=True,
    max_position_embeddings=131072,
    rope_scaling=RopeScaling(kind="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=8192),
    bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
)
TINY = ModelConfig(
    architecture="llama", vocab_size=SMOLLM2_135M.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
    head_dim=16, intermediate_size=128, rms_norm_eps=1e-5, rope_theta=100_000.0, tie_word_embeddings=True,
    eos_token_ids=(2,),
)
SHAPES = {"tiny": TINY, "smollm2-135m": SMOLLM2_135M, "llama-1b": LLAMA_1B}
