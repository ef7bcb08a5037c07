"""What every decoder family shares around its layers: masks/positions/cache bookkeeping and the layer scan.

A model's ``__call__`` is ``inputs = attention_inputs(...)``, embed, ``scan_layers(...)``, final norm, then
``advance_cache(...)`` when decoding. Keeping this in one place means Llama and GPT-2 treat padding,
packed segments and the KV cache identically.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from jaxalign.models.activation_sharding import constrain_rows
from jaxalign.models.cache import KVCache, LayerKV
from jaxalign.models.lora import LoRALinear
from jaxalign.models.masks import attention_mask as build_attention_mask
from jaxalign.models.masks import derive_positions
from jaxalign.models.quantized import WEIGHTS

# Attribute names of the [L]-stacked layer collections (Llama's ``layers``, GPT-2's ``h``): the leading
# axis of every parameter under them is the layer axis, scanned and never sharded.
STACKED_COLLECTIONS = ("layers", "h")


class AttentionInputs(NamedTuple):
    """Per-call attention bookkeeping for ``T`` new tokens attending to ``S`` key slots."""

    positions: Int[Array, "B T"]  # position of each new token (RoPE angle / learned-position index)
    mask: Bool[Array, "B T S"]  # which key slots each new token may attend to
    real: Bool[Array, "B T"]  # which new tokens are real (not padding)
    key_valid: Bool[Array, "B S"]  # which key slots hold real tokens (S = T without a cache)
    kv: LayerKV | None  # the cache view the layer scan starts from


def is_concrete(*arrays) -> bool:
    """Whether every array holds values now (eager call, or a constant closed over by a trace)."""
    return not any(isinstance(array, jax.core.Tracer) for array in arrays)


def check_in_range(values: Array, real: Array, limit: int, what: str, limit_name: str) -> None:
    """Raise when a real (mask = 1) entry of concrete ``values`` is outside ``[0, limit)``; no-op when traced.

    Under ``jit`` nothing can raise: callers clip the lookups instead (:func:`clip_index`).
    """
    if not is_concrete(values, real):
        return
    found = np.asarray(values)[np.broadcast_to(np.asarray(real), np.shape(values))]
    if found.size == 0:
        return
    low, high = int(found.min()), int(found.max())
    if low < 0 or high >= limit:
        bad = high if high >= limit else low
        raise ValueError(f"{what} {bad} is out of range: every real (attention_mask = 1) {what} must be in "
                         f"[0, {limit}), {limit_name}={limit} (found min {low}, max {high})")


def clip_index(index: Array, limit: int) -> Array:
    """``index`` clipped into ``[0, limit)`` for a table lookup.

    ``jnp.take`` (``nnx.Embed``) fills out-of-range rows with NaN, and a NaN key/value in one padding slot
    turns every row that shares the attention computation into NaN (``0 · NaN``). Clipped, an
    out-of-range entry reads a wrong but finite row, and padding never matters.
    """
    return jnp.clip(index, 0, limit - 1)


def attention_inputs(
    tokens: Int[Array, "B T"],
    *,
    positions: Int[Array, "B T"] | None,
    attention_mask: Array | None,
    segment_ids: Int[Array, "B T"] | None,
    cache: KVCache | None,
    sliding_window: int | None = None,
    vocab_size: int | None = None,
    branch_ids: Int[Array, "B T"] | None = None,
) -> AttentionInputs:
    """Positions (derived from the mask, segments, branches and cache when not given) and the attention mask.

    When the inputs are concrete (an eager call), also checks that every real token id is below
    ``vocab_size`` and that the cache has room for the ``T`` new tokens.

    Raises:
        ValueError: ``segment_ids`` or ``branch_ids`` together with a cache (packing and shared prefixes are
            for training and scoring, not decoding); ``branch_ids`` with a sliding window (it counts slots, which
            would include other branches); eagerly, a real token id outside ``[0, vocab_size)`` or a write past
            the cache's ``max_length``.
    """
    batch, length = tokens.shape
    real = (jnp.ones((batch, length), bool) if attention_mask is None
            else jnp.asarray(attention_mask).astype(bool))
    if vocab_size is not None:
        check_in_range(tokens, real, vocab_size, "token id", "vocab_size")
    if cache is not None and is_concrete(cache.index) and int(cache.index) + length > cache.max_length:
        raise ValueError(
            f"KV cache overflow: writing {length} token(s) at slot {int(cache.index)} needs "
            f"{int(cache.index) + length} slots, but the cache has max_length={cache.max_length}; size "
            "KVCache.init(..., max_length=) for the prompt plus every new token"
        )
    if branch_ids is not None and (cache is not None or sliding_window is not None):
        raise ValueError("branch_ids (a shared prefix) cannot be combined with a KV cache or a sliding window")
    if cache is None:
        if positions is None:
            positions = derive_positions(real, segment_ids, branch_ids=branch_ids)
        query_slots = jnp.arange(length)
        key_valid = real
        kv = None
    else:
        if segment_ids is not None:
            raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
        if positions is None:
            positions = derive_positions(real, offset=cache.next_position)
        query_slots = cache.index + jnp.arange(length)
        key_valid = jax.lax.dynamic_update_slice(cache.valid, real, (0, cache.index))
        kv = cache.for_layers()
    mask = build_attention_mask(
        key_valid, query_slots, query_segments=segment_ids, key_segments=segment_ids,
        sliding_window=sliding_window, query_branches=branch_ids, key_branches=branch_ids,
    )
    return AttentionInputs(positions=positions, mask=mask, real=real, key_valid=key_valid, kv=kv)


def advance_cache(cache: KVCache, inputs: AttentionInputs, kv: LayerKV) -> KVCache:
    """The cache after the layers wrote this call's keys/values (``kv``)."""
    # A row's next position follows its last real token; rows with no real token here keep theirs.
    next_position = jnp.max(jnp.where(inputs.real, inputs.positions + 1, cache.next_position[:, None]), axis=1)
    return dataclasses.replace(
        cache, keys=kv.keys, values=kv.values, valid=inputs.key_valid,
        next_position=next_position.astype(jnp.int32), index=cache.index + inputs.real.shape[1],
    )


def scan_layers(layers: nnx.Module, hidden, kv: LayerKV | None, *, n_layers: int, remat: str,
                remat_policy, **layer_kwargs):
    """Run ``[L]``-stacked layers with one ``jax.lax.scan`` (MaxText's ``scan_layers``).

    Each step rebuilds one layer from its slice of the stacked state and calls
    ``layer(hidden, kv=kv_at_layer, **layer_kwargs) -> (hidden, kv)``. The traced program is the same
    for any depth, so compile time does not grow with ``L``. State a layer changes while running (a
    dropout RNG counter, e.g. in LoRA adapters) is written back to ``layers``; the weights (parameters and
    quantised storage, :data:`~jaxalign.models.quantized.WEIGHTS`) are read only, never copied out.

    Layers split by :func:`unstack_layers` run one after the other instead (unrolled), each with its own
    weights and, with a per-layer :class:`KVCache`, its own cache buffers.

    Returns:
        ``(hidden, kv)`` after the last layer.
    """
    if isinstance(layers, UnstackedLayers):
        for index, layer in enumerate(layers.layers):
            hidden, kv = layer(hidden, kv=None if kv is None else kv.at_layer(index), **layer_kwargs)
        return hidden, kv
    graphdef, params, other = nnx.split(layers, WEIGHTS, ...)

    def one_layer(carry, xs):
        hidden, kv = carry
        layer_params, layer_other, layer_index = xs
        layer = nnx.merge(graphdef, layer_params, layer_other)
        hidden = constrain_rows(hidden)
        if kv is not None:
            kv = kv.at_layer(layer_index)
        hidden, kv = layer(hidden, kv=kv, **layer_kwargs)
        return (hidden, kv), nnx.state(layer, nnx.Not(WEIGHTS))

    if remat != "none":
        # prevent_cse=False is safe under scan (the loop already keeps XLA from merging the recomputation
        # into the forward pass) and avoids the optimisation barriers prevent_cse would insert.
        one_layer = jax.checkpoint(one_layer, policy=remat_policy, prevent_cse=False)
    layer_indices = jnp.arange(n_layers, dtype=jnp.int32)
    (hidden, kv), other = jax.lax.scan(one_layer, (hidden, kv), (params, other, layer_indices))
    nnx.update(layers, other)
    return hidden, kv


class UnstackedLayers(nnx.Module):
    """An ``[L]``-stacked layer collection split into ``L`` modules (see :func:`unstack_layers`)."""

    def __init__(self, stacked: nnx.Module):
        graphdef, state = nnx.split(stacked)
        n_layers = jax.tree.leaves(state)[0].shape[0]
        self.layers = nnx.List([nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state))
                                for i in range(n_layers)])


Model = TypeVar("Model", bound=nnx.Module)


def unstack_layers(model: Model) -> Model:
    """A view of ``model`` whose ``[L]``-stacked layers are ``L`` separate modules, for fast decoding.

    Under the layer scan every step slices each layer's weights out of the stacked arrays, and XLA's CPU
    backend copies the slices (a matmul needs its own buffer): a decode step then moves every weight
    twice. Called inside ``jit`` *outside* a decode loop, the slices are taken once and the loop body
    runs the layers unrolled on them (:func:`scan_layers`); pair it with :meth:`KVCache.per_layer`. The
    layers compute exactly what the scan computes; the compiled loop body grows with the depth.

    Args:
        model: a model whose layers sit in a collection named in :data:`STACKED_COLLECTIONS`.

    Returns:
        A new module graph sharing ``model``'s arrays (``model`` itself is left as it is).
    """
    model = nnx.merge(*nnx.split(model))
    for _, module in list(nnx.iter_modules(model)):
        for name in STACKED_COLLECTIONS:
            stacked = getattr(module, name, None)
            if _is_stacked(stacked):
                setattr(module, name, UnstackedLayers(stacked))
    return model


def _is_stacked(collection) -> bool:
    """Whether ``collection`` is an ``nnx.vmap``-built layer stack: every array shares one leading size."""
    if not isinstance(collection, nnx.Module) or isinstance(collection, UnstackedLayers | nnx.List):
        return False
    leaves = jax.tree.leaves(nnx.state(collection))
    return bool(leaves) and all(jnp.ndim(x) >= 1 and x.shape[0] == leaves[0].shape[0] for x in leaves)


def per_token(fn, x: Float[Array, "... D"]) -> Array:
    """``fn`` applied to ``x``'s tokens as one ``[N, D]`` matrix (leading dims flattened), reshaped back.

    Why: the numbers are the same as ``fn(x)``, but XLA's CPU backend lays out the backward of a
    ``[B, T, D] @ [D, F]`` matmul with transposed copies of the ``[B, T, F]`` activation gradients (an
    elementwise fusion writing a transposed layout, slow on CPU); on ``[B·T, D]`` it runs the weight
    gradient as a plain transposed-operand matmul (measured: benchmarks/README.md, "The model's kernels"). On row-major
    layouts (CPU, GPU) the reshapes are bitcasts; on TPU's tiled layouts this has not been measured.
    """
    out = fn(x.reshape(-1, x.shape[-1]))
    return out.reshape(*x.shape[:-1], out.shape[-1])


def vocab_logits(hidden: Float[Array, "... D"], *, embedding: Array | None = None,
                 lm_head: nnx.Linear | LoRALinear | None = None, dtype) -> Float[Array, "... V"]:
    """Float32 logits from the tied ``embedding`` ``[V, D]`` or an ``lm_head`` (``nnx.Linear`` or adapted).

    The matmuls take ``dtype`` inputs and accumulate in float32. An adapted head adds its low-rank term
    ``(α/r)·dropout(h)·A·B`` (:meth:`LoRALinear.low_rank`), so LoRA on ``lm_head`` trains and
    ``merge_lora`` exports what the forward computes.
    """
    def rows_logits(rows: Float[Array, "N D"]) -> Float[Array, "N V"]:
        if lm_head is None:
            return jnp.einsum("nd,vd->nv", rows, embedding.astype(dtype), preferred_element_type=jnp.float32)
        logits = jnp.einsum("nd,dv->nv", rows, lm_head.kernel[...].astype(dtype), preferred_element_type=jnp.float32)
        if isinstance(lm_head, LoRALinear):
            logits = logits + lm_head.low_rank(rows, preferred_element_type=jnp.float32)
        return logits

    return per_token(rows_logits, hidden.astype(dtype))
