"""Llama-family causal LM (Llama 2/3, SmolLM2, Mistral, Qwen2) in Flax NNX.

Numerically the same model as transformers' ``LlamaForCausalLM`` / ``MistralForCausalLM`` /
``Qwen2ForCausalLM`` (pre-norm decoder, RMSNorm, RoPE, grouped-query attention, SwiGLU MLP).

Layout: the decoder layers are built once with ``nnx.vmap`` so every layer parameter carries a leading
``[L]`` axis, and the forward pass runs them with one ``jax.lax.scan`` (MaxText's ``scan_layers``): the
traced program, and so the compile time, does not grow with depth. Parameter paths follow transformers'
names (``model/layers/self_attn/q_proj/kernel`` is ``model.layers.{i}.self_attn.q_proj.weight``
transposed to ``[in, out]``), which keeps the checkpoint mapping in ``hf_io`` mechanical.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from jaxalign.models.cache import KVCache, LayerKV
from jaxalign.models.causal_lm import CausalLM
from jaxalign.models.config import ModelConfig
from jaxalign.models.rope import apply_rope, inverse_frequencies, rope_tables
from jaxalign.models.stack import advance_cache, attention_inputs, clip_index, per_token, scan_layers

# transformers initialises every Linear/Embedding with N(0, initializer_range=0.02).
_INIT = nnx.initializers.normal(stddev=0.02)


class RMSNorm(nnx.Module):
    """``y = x / sqrt(mean(x²) + eps) · scale``, with the statistics in float32 (as LlamaRMSNorm)."""

    def __init__(self, dim: int, config: ModelConfig):
        self.eps = config.rms_norm_eps
        self.compute_dtype = config.compute_jnp_dtype
        self.scale = nnx.Param(jnp.ones((dim,), config.param_jnp_dtype))

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return normed.astype(self.compute_dtype) * self.scale[...].astype(self.compute_dtype)


def _linear(config: ModelConfig, n_in: int, n_out: int, *, bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(
        n_in, n_out, use_bias=bias, dtype=config.compute_jnp_dtype, param_dtype=config.param_jnp_dtype,
        kernel_init=_INIT, rngs=rngs,
    )


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE; ``H`` query heads share ``K`` key/value heads."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, h, k, dh = config.d_model, config.n_heads, config.n_kv_heads, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = h, k, dh
        self.q_proj = _linear(config, d, h * dh, bias=config.qkv_bias, rngs=rngs)
        self.k_proj = _linear(config, d, k * dh, bias=config.qkv_bias, rngs=rngs)
        self.v_proj = _linear(config, d, k * dh, bias=config.qkv_bias, rngs=rngs)
        self.o_proj = _linear(config, h * dh, d, bias=config.o_bias, rngs=rngs)

    def __call__(
        self,
        x: Float[Array, "B T D"],
        *,
        cos: Float[Array, "B T 1 Dh"],
        sin: Float[Array, "B T 1 Dh"],
        mask: Bool[Array, "B T S"],
        kv: LayerKV | None,
    ) -> tuple[Float[Array, "B T D"], LayerKV | None]:
        """Attend from the ``T`` new tokens to ``S`` keys (``S = T`` without a cache)."""
        q = rearrange(per_token(self.q_proj, x), "b t (h dh) -> b t h dh", dh=self.head_dim)
        k = rearrange(per_token(self.k_proj, x), "b t (k dh) -> b t k dh", dh=self.head_dim)
        v = rearrange(per_token(self.v_proj, x), "b t (k dh) -> b t k dh", dh=self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            kv, k, v = kv.append(k, v)
        # Query head n uses kv head n // (H/K), as transformers' repeat_kv; the softmax runs in float32
        # and masked scores are a large finite negative, so a query that sees nothing gives no NaN.
        out = jax.nn.dot_product_attention(
            q, k.astype(q.dtype), v.astype(q.dtype), mask=mask[:, None], scale=self.head_dim**-0.5
        )
        return per_token(self.o_proj, rearrange(out, "b t h dh -> b t (h dh)")), kv


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) · up(x))``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f = config.d_model, config.intermediate_size
        self.gate_proj = _linear(config, d, f, bias=config.mlp_bias, rngs=rngs)
        self.up_proj = _linear(config, d, f, bias=config.mlp_bias, rngs=rngs)
        self.down_proj = _linear(config, f, d, bias=config.mlp_bias, rngs=rngs)

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        return per_token(lambda t: self.down_proj(jax.nn.silu(self.gate_proj(t)) * self.up_proj(t)), x)


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``h += attn(norm(h)); h += mlp(norm(h))``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.d_model, config)
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.d_model, config)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, h, *, cos, sin, mask, kv: LayerKV | None):
        attended, kv = self.self_attn(self.input_layernorm(h), cos=cos, sin=sin, mask=mask, kv=kv)
        h = h + attended
        return h + self.mlp(self.post_attention_layernorm(h)), kv


class LlamaModel(nnx.Module):
    """Embeddings, the scanned decoder stack and the final norm: tokens -> final hidden states."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.d_model, dtype=config.compute_jnp_dtype,
            param_dtype=config.param_jnp_dtype, embedding_init=_INIT, rngs=rngs,
        )

        @nnx.split_rngs(splits=config.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(config, rngs=rngs)

        self.layers = stacked_layers(rngs)
        self.norm = RMSNorm(config.d_model, config)

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        *,
        positions: Int[Array, "B T"] | None = None,
        attention_mask: Array | None = None,
        segment_ids: Int[Array, "B T"] | None = None,
        cache: KVCache | None = None,
        branch_ids: Int[Array, "B T"] | None = None,
    ) -> tuple[Float[Array, "B T D"], KVCache | None]:
        """Final (normed) hidden states of ``tokens``; see :meth:`LlamaForCausalLM.__call__`."""
        config = self.config
        inputs = attention_inputs(tokens, positions=positions, attention_mask=attention_mask,
                                  segment_ids=segment_ids, cache=cache, sliding_window=config.sliding_window,
                                  vocab_size=config.vocab_size, branch_ids=branch_ids)
        cos, sin = rope_tables(inputs.positions, inverse_frequencies(config), config.compute_jnp_dtype)
        hidden = self.embed_tokens(clip_index(tokens, config.vocab_size))
        hidden, kv = scan_layers(self.layers, hidden, inputs.kv, n_layers=config.n_layers, remat=config.remat,
                                 remat_policy=config.remat_policy, cos=cos, sin=sin, mask=inputs.mask)
        hidden = self.norm(hidden)
        return hidden, None if cache is None else advance_cache(cache, inputs, kv)


class LlamaForCausalLM(CausalLM):
    """:class:`LlamaModel` plus the vocabulary projection (tied to the embeddings or a separate head).

    ``model(tokens)`` returns float32 logits (:meth:`CausalLM.__call__`); trainers that chunk the LM head over
    the sequence call ``model.hidden_states(...)`` once and ``model.logits(hidden[:, chunk])`` per chunk.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.model = LlamaModel(config, rngs=rngs)
        self.lm_head = (
            None if config.tie_word_embeddings
            else _linear(config, config.d_model, config.vocab_size, bias=False, rngs=rngs)
        )

    @property
    def trunk(self) -> LlamaModel:
        return self.model

    def tied_embedding(self) -> Float[Array, "V D"]:
        return self.model.embed_tokens.embedding[...]
