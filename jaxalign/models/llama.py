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

import dataclasses
import functools

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from jaxalign.models.cache import KEY_LAYOUT, VALUE_LAYOUT, Joining, KVCache, LayerKV, row_slots_major, write_joining
from jaxalign.models.causal_lm import CausalLM
from jaxalign.models.config import ModelConfig
from jaxalign.models.masks import attention_mask as build_attention_mask
from jaxalign.models.masks import derive_positions
from jaxalign.models.rope import apply_rope, inverse_frequencies, rope_tables
from jaxalign.models.stack import (
    UnstackedLayers,
    advance_cache,
    attention_inputs,
    clip_index,
    per_token,
    scan_layers,
)

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
        self.implementation = config.attention
        self.q_proj = _linear(config, d, h * dh, bias=config.qkv_bias, rngs=rngs)
        self.k_proj = _linear(config, d, k * dh, bias=config.qkv_bias, rngs=rngs)
        self.v_proj = _linear(config, d, k * dh, bias=config.qkv_bias, rngs=rngs)
        self.o_proj = _linear(config, h * dh, d, bias=config.o_bias, rngs=rngs)

    def project(self, x: Float[Array, "B T D"], cos: Float[Array, "B T 1 Dh"], sin: Float[Array, "B T 1 Dh"]):
        """Queries ``[B, T, H, Dh]``, keys and values ``[B, T, K, Dh]`` of ``x``, RoPE applied."""
        q = rearrange(per_token(self.q_proj, x), "b t (h dh) -> b t h dh", dh=self.head_dim)
        k = rearrange(per_token(self.k_proj, x), "b t (k dh) -> b t k dh", dh=self.head_dim)
        v = rearrange(per_token(self.v_proj, x), "b t (k dh) -> b t k dh", dh=self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q: Float[Array, "B T H Dh"], k: Float[Array, "B S K Dh"], v: Float[Array, "B S K Dh"],
               mask: Bool[Array, "B T S"], *, cached: bool = False, causal: bool = False) -> Float[Array, "B T HDh"]:
        """Attention of ``q`` over ``S`` keys, heads concatenated (before ``o_proj``); ``cached``: the keys are
        a KV cache's (decoding, prefill); ``causal``: the keys are the queries' own ``T`` tokens and ``mask``
        never shows a query a later slot (as every mask of :func:`~jaxalign.models.stack.attention_inputs`
        without a cache), which lets grouped attention on CPUs skip the blocks above the diagonal
        (:func:`causal_block_attention`).

        Query head n uses kv head n // (H/K), as transformers' repeat_kv; masked scores are a large finite
        negative, so a query that sees nothing gives no NaN. Which kernel runs is the config's ``attention``:

        - ``"grouped"``: :func:`grouped_attention` (float32 scores and softmax, the numbers of
          ``jax.nn.dot_product_attention`` in a layout that is faster on CPUs, measured in its docstring), for
          ``causal`` rows on CPUs in blocks of queries (:func:`causal_block_attention`);
        - ``"cudnn"``: :func:`cudnn_attention` for more than one new token, a decode step's one query grouped;
        - ``"auto"``: cuDNN for training and scoring rows (more than one new token, no cache) where JAX's cuDNN
          attention runs (:func:`cudnn_flash_attention_available`, bf16/f16, a head dim that is a multiple of 8
          up to 128); grouped elsewhere (CPUs, TPUs, AMD GPUs, float32, decoding, and prefill, which has not
          been measured through cuDNN). Measured with ``"cudnn"`` on an H200 in bf16 (head dim 64): one
          layer's forward and backward 1.7–3.1× faster than grouped, a 1B model's DPO step 1.3–1.9× (docs/gpu.md).
        """
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        scale = self.head_dim**-0.5
        kernel = attention_kernel(self.implementation, dtype=q.dtype, head_dim=self.head_dim,
                                  new_tokens=q.shape[1], cached=cached)
        if kernel == "cudnn":
            return cudnn_attention(q, k, v, mask, scale=scale)
        if causal and jax.default_backend() == "cpu":  # the split is measured on CPUs only
            return causal_block_attention(q, k, v, mask, scale=scale)
        return grouped_attention(q, k, v, mask, scale=scale)

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
        q, k, v = self.project(x, cos, sin)
        if kv is not None:
            kv, k, v = kv.append(k, v)
        return per_token(self.o_proj, self.attend(q, k, v, mask, cached=kv is not None, causal=kv is None)), kv


def grouped_attention(q: Float[Array, "B T H Dh"], k: Float[Array, "B S K Dh"], v: Float[Array, "B S K Dh"],
                      mask: Bool[Array, "B T S"], *, scale: float) -> Float[Array, "B T HDh"]:
    """``softmax(q·kᵀ·scale, masked)·v`` with the ``G = H/K`` query heads of each kv head as one matrix.

    The queries of kv head ``k`` are laid out ``[(T·G), Dh]`` (token-major), so each (row, kv head) pair is one
    ``[T·G, Dh] × [Dh, S]`` product, with no copy of the keys per query head and no transposed score matrix;
    the mask is repeated over the ``G`` heads of a token. The numbers are ``jax.nn.dot_product_attention``'s
    (float32 scores, masked entries ``−0.7·max float32``, float32 softmax, probabilities cast to ``v``'s dtype).
    On 2 CPU cores its forward and backward over SmolLM2-135M's 4 × 194-token DPO rows take 8.7 ms a layer
    against 12.5 ms, and a DPO step 6 % less. In a decode step over the per-layer cache (keys ``[B, K, Dh, S]``,
    values ``[B, K, S, Dh]``: both products read their buffer as a plain matrix) the serving engine's step at
    batch 32 and 128 slots takes 124 ms, against 134 ms with the library call and the values' slots innermost
    (batch 2: 39.6 against 40.0 ms).
    """
    groups = q.shape[2] // k.shape[2]
    queries = rearrange(q, "b t (k g) d -> b k (t g) d", g=groups)
    scores = jnp.einsum("bkqd,bksd->bkqs", queries, rearrange(k, "b s k d -> b k s d"),
                        preferred_element_type=jnp.float32) * jnp.float32(scale)
    visible = jnp.repeat(mask, groups, axis=1)[:, None]  # [B, 1, T·G, S]
    scores = jnp.where(visible, scores, jnp.float32(-0.7 * jnp.finfo(jnp.float32).max))
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, rearrange(v, "b s k d -> b k s d"))
    return rearrange(out, "b k (t g) d -> b t (k g d)", g=groups)


CAUSAL_BLOCK = 48
"""Query tokens per block of :func:`causal_block_attention`, up to :data:`MAX_CAUSAL_BLOCKS` blocks (measured in
its docstring)."""
MAX_CAUSAL_BLOCKS = 4
"""Every block is its own attention in the compiled program, so compile time grows with the count."""


def causal_block_attention(q: Float[Array, "B T H Dh"], k: Float[Array, "B T K Dh"], v: Float[Array, "B T K Dh"],
                           mask: Bool[Array, "B T T"], *, scale: float,
                           block: int | None = None) -> Float[Array, "B T HDh"]:
    """:func:`grouped_attention` over causal rows, the queries in ``n`` blocks of about ``block`` tokens
    (:data:`CAUSAL_BLOCK`; ``n = round(T / block)``, at least 1 and at most :data:`MAX_CAUSAL_BLOCKS`: rows under
    72 tokens stay whole), each block over the keys up to its last query only.

    In a causal row (the keys are the queries' own tokens and no query sees a later slot) the score blocks above
    the diagonal are all masked: skipping them leaves every real query's output as it was (up to the order of the
    softmax's sum) and cuts the scores to ``(n + 1) / 2n`` of the full ``T × T`` (5/8 with 4 blocks). A query
    that sees no key at all (padding) averages the keys up to its block's end instead of all ``T`` (finite and
    unread either way). Measured on 2 AMD EPYC cores, float32: the DPO step of SmolLM2-135M on 4 shared-prompt
    rows of 194 tokens (one process, steps alternated, medians of 5–6) 5.73 → 5.52–5.54 s with blocks of 32 or 48
    queries (5.57 s with 64); its SFT step on 4 × 125 tokens within the spread (2.49 against 2.47–2.50 s); 30
    layers' attention forward and backward alone on those DPO rows 430 ms whole, 245–250 ms in 2 or 4 blocks,
    about the work skipped. The cap: uncapped, a 2048-token row ran 43 blocks and a training step of that shape
    compiled in 34.5 s instead of 2.9 s.
    """
    length = q.shape[1]
    if k.shape[1] != length or v.shape[1] != length or mask.shape[1:] != (length, length):
        raise ValueError(f"causal_block_attention takes a row's own keys: {length} queries, keys {k.shape[1]}, "
                         f"values {v.shape[1]}, mask {mask.shape[1:]}")
    blocks = min(MAX_CAUSAL_BLOCKS, max(1, round(length / (block or CAUSAL_BLOCK))))
    edges = [round(length * i / blocks) for i in range(blocks + 1)]
    outputs = [grouped_attention(q[:, start:end], k[:, :end], v[:, :end], mask[:, start:end, :end], scale=scale)
               for start, end in zip(edges[:-1], edges[1:])]
    return jnp.concatenate(outputs, axis=1)


def attention_kernel(implementation: str, *, dtype, head_dim: int, new_tokens: int, cached: bool) -> str:
    """``"cudnn"`` or ``"grouped"``: what :meth:`Attention.attend` runs under the config's ``attention``
    (``implementation``) for ``new_tokens`` queries of ``dtype``, over a cache's keys or not."""
    if new_tokens == 1 or implementation == "grouped":
        return "grouped"
    if implementation == "cudnn":
        return "cudnn"
    fits = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if fits and not cached and cudnn_flash_attention_available() else "grouped"


@functools.cache
def cudnn_flash_attention_available() -> bool:
    """True where the default device is a CUDA GPU of compute capability 8.0 or later (Ampere on), which JAX's
    cuDNN attention requires; False on CPUs, TPUs, AMD GPUs and older NVIDIA ones. A model placed on another
    device than the default one (``jax.default_device``) is not looked at."""
    device = jax.devices()[0]
    if device.platform != "gpu" or "cuda" not in device.client.platform_version:  # as JAX's own check reads it
        return False
    return tuple(int(part) for part in device.compute_capability.split(".")) >= (8, 0)


def cudnn_attention(q: Float[Array, "B T H Dh"], k: Float[Array, "B S K Dh"], v: Float[Array, "B S K Dh"],
                    mask: Bool[Array, "B T S"], *, scale: float) -> Float[Array, "B T HDh"]:
    """:func:`grouped_attention`'s function through cuDNN's fused attention (NVIDIA GPUs, bf16/f16 inputs).

    cuDNN's backward with a bias (our mask becomes one) takes only even lengths, so queries and keys are padded
    to a multiple of 8: padded keys are masked out, padded queries' rows are dropped from the output.
    """
    t, s = q.shape[1], k.shape[1]
    pad_t, pad_s = -t % 8, -s % 8
    if pad_t or pad_s:
        q = jnp.pad(q, ((0, 0), (0, pad_t), (0, 0), (0, 0)))
        k, v = (jnp.pad(x, ((0, 0), (0, pad_s), (0, 0), (0, 0))) for x in (k, v))
        mask = jnp.pad(mask, ((0, 0), (0, pad_t), (0, pad_s)))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale, implementation="cudnn")
    return rearrange(out[:, :t], "b t h d -> b t (h d)")


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
        return self.feed_forward(h + attended), kv

    def feed_forward(self, h):
        """The block's second half: ``h + mlp(norm(h))``."""
        return h + self.mlp(self.post_attention_layernorm(h))


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

    def decode_joining(
        self, tokens: Int[Array, " B"], real: Bool[Array, " B"], cache: KVCache, joining: Joining
    ) -> tuple[Float[Array, "B 1 D"], Float[Array, "1 D"], KVCache]:
        """One decode step (token ``tokens[b]`` for every row ``b`` where ``real``) that also runs a joining
        prompt: vLLM's chunked prefill, for one prompt.

        The step's tokens and the prompt's ``P`` share every per-token matrix product (``B + P`` rows): on a
        CPU a product of 32 rows costs nearly what one of 64 does, so the prompt rides along for a fraction of
        what its own prefill call costs, and the running rows are not stalled for it. The attention is two
        calls: the rows over their cache as in a plain step, the prompt over its row (its head and itself,
        causally). Row ``joining.slot`` must be free (``real`` false there): it ends up holding the prompt.

        The numbers are a plain step's and a prefill's up to float rounding (the products have more rows).

        Needs the layers unrolled and a per-layer cache (``unstack_layers``, :meth:`KVCache.per_layer`).

        Returns:
            ``(hidden [B, 1, D]`` of the step's tokens, ``hidden [1, D]`` of the prompt's last token, the cache
            after both``)``: its write index advanced by one, the joining row's mask and next position its
            prompt's.
        """
        config = self.config
        if not isinstance(self.layers, UnstackedLayers) or not cache.is_per_layer:
            raise ValueError("decode_joining needs unrolled layers (unstack_layers) and a per-layer KVCache")
        batch, width = tokens.shape[0], joining.tokens.shape[1]
        inputs = attention_inputs(tokens[:, None], positions=None, attention_mask=real[:, None], segment_ids=None,
                                  cache=cache, sliding_window=config.sliding_window, vocab_size=config.vocab_size)
        head = None if joining.head is None else joining.head.per_layer()
        first = cache.index + 1 - width  # the prompt's first column; the step writes at cache.index
        # The joining row sees its head's columns and its own real tokens, causally by column.
        row_valid = jnp.zeros((1, cache.max_length), bool)
        if head is not None:
            row_valid = jax.lax.dynamic_update_slice(row_valid, head.valid, (0, first - head.max_length))
        row_valid = jax.lax.dynamic_update_slice(row_valid, joining.mask.astype(bool), (0, first))
        prompt_mask = build_attention_mask(row_valid, first + jnp.arange(width), sliding_window=config.sliding_window)
        offset = jnp.zeros((1,), jnp.int32) if head is None else head.next_position
        prompt_positions = derive_positions(joining.mask.astype(bool), offset=offset)
        positions = jnp.concatenate([inputs.positions.reshape(1, batch), prompt_positions], axis=1)
        cos, sin = rope_tables(positions, inverse_frequencies(config), config.compute_jnp_dtype)
        all_tokens = jnp.concatenate([tokens[None], joining.tokens], axis=1)  # [1, B + P]
        hidden = self.embed_tokens(clip_index(all_tokens, config.vocab_size))
        kv = inputs.kv
        for index, layer in enumerate(self.layers.layers):
            attn = layer.self_attn
            q, k, v = attn.project(layer.input_layernorm(hidden), cos, sin)
            kv, _, _ = kv.at_layer(index).append(k[0, :batch, None], v[0, :batch, None])
            keys = write_joining(kv.keys[index], KEY_LAYOUT, joining.slot, k[:, batch:], first,
                                 None if head is None else head.keys[index])
            values = write_joining(kv.values[index], VALUE_LAYOUT, joining.slot, v[:, batch:], first,
                                   None if head is None else head.values[index])
            kv = kv._replace(keys=kv.keys[:index] + (keys,) + kv.keys[index + 1:],
                             values=kv.values[:index] + (values,) + kv.values[index + 1:])
            # The step's rows read the cache with the prompt written (only the free row differs from what they
            # would read before; reading it before would keep a copy of every buffer alive).
            step_out = attn.attend(q[0, :batch, None], KEY_LAYOUT.slots_major(keys), VALUE_LAYOUT.slots_major(values),
                                   inputs.mask, cached=True)
            prompt_out = attn.attend(q[:, batch:], row_slots_major(keys, KEY_LAYOUT, joining.slot),
                                     row_slots_major(values, VALUE_LAYOUT, joining.slot), prompt_mask, cached=True)
            attended = jnp.concatenate([step_out.reshape(1, batch, -1), prompt_out], axis=1)
            hidden = layer.feed_forward(hidden + per_token(attn.o_proj, attended))
        hidden = self.norm(hidden)
        stepped = advance_cache(cache, inputs, kv)
        prompt_next = offset + jnp.sum(joining.mask, axis=1, dtype=jnp.int32)
        new_cache = dataclasses.replace(
            stepped, valid=jax.lax.dynamic_update_slice(stepped.valid, row_valid, (joining.slot, 0)),
            next_position=jax.lax.dynamic_update_slice(stepped.next_position, prompt_next, (joining.slot,)))
        return hidden[0, :batch, None], hidden[:, -1], new_cache


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
