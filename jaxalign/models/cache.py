"""A preallocated key/value cache for incremental decoding inside ``jit`` / ``while_loop``.

Every row writes the same number of slots per call (a left-padded prompt, then one token per step), so a
single scalar ``index`` says where the next write goes and the update is one ``dynamic_update_slice``,
done in place by XLA when the cache is carried through a loop or donated. Rows differ only in which slots
hold real tokens (``valid``) and in their RoPE position (``next_position``).

The buffers come in two forms. **Stacked** (what :meth:`KVCache.init` makes): one ``[L, B, S, K, Dh]``
array each for keys and values, which the layer scan carries and writes at a traced layer index.
**Per layer** (:meth:`KVCache.per_layer`): a tuple of ``L`` buffers each, keys ``[B, K, Dh, S]`` and values
``[B, K, S, Dh]`` (:data:`KEY_LAYOUT`, :data:`VALUE_LAYOUT`), for decoding with the layers unrolled
(:func:`jaxalign.models.stack.unstack_layers`). On XLA's CPU backend the stacked form costs a copy and a
transpose of every layer's keys and values at every step (a slice of a loop-carried buffer cannot feed a matmul
in place); the per-layer buffers are read in place, each in the layout its attention product wants as a plain
matrix: the query·key product contracts the head dim, the rows of a key buffer ``[Dh, S]``; the
probability·value product contracts the slots, the rows of a value buffer ``[S, Dh]``, where a step also writes
a token's values as ``K`` contiguous rows instead of ``K·Dh`` floats one slot apart. SmolLM2-135M's 30 layers at
batch 32 on 2 CPU cores, one step's attention and cache writes (``benchmarks/attention_layouts.py``):
11.3 ms at 128 slots and 21.1 ms at 256 with these layouts; with the values' slots innermost too 16.0 and 26.6 ms
through ``jax.nn.dot_product_attention``, 17.3 and 31.3 ms through
the same einsums as here; with both slots-major 13.9 and 29.0 ms; PyTorch's static cache and SDPA 35.7 and 51.4 ms.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxalign.models.config import ModelConfig


class BufferLayout(NamedTuple):
    """How a per-layer buffer orders its axes: ``order`` takes ``[B, S, K, Dh]`` (the attention's operand) to the
    buffer's axes (rows and kv heads stay first, so the sharding rules are the same for keys and values)."""

    order: tuple[int, int, int, int]

    @property
    def slots(self) -> int:
        """The buffer's axis of slots (cache columns)."""
        return self.order.index(1)

    def from_slots_major(self, x: Float[Array, "B S K Dh"]) -> Array:
        """``x`` (new keys or values, ``[B, T, K, Dh]``) in this buffer's order."""
        return jnp.transpose(x, self.order)

    def slots_major(self, buffer: Array) -> Float[Array, "B S K Dh"]:
        """The buffer as the attention reads it (XLA folds the transpose into the products)."""
        return jnp.transpose(buffer, tuple(self.order.index(axis) for axis in range(4)))


# Per-layer keys keep the slots innermost ([B, K, Dh, S]), values before the head dim ([B, K, S, Dh]): see above.
KEY_LAYOUT = BufferLayout((0, 2, 3, 1))
VALUE_LAYOUT = BufferLayout((0, 2, 1, 3))

# Every layer's keys (``[B, K, Dh, S]`` each) or values (``[B, K, S, Dh]`` each) in the per-layer form.
LayerBuffers = tuple[Float[Array, "B K _ _"], ...]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys/values of every layer for ``max_length`` slots.

    Attributes:
        keys, values: ``[L, B, S_max, K, Dh]`` post-RoPE keys and the values (stacked form), or tuples of ``L``
            buffers, keys ``[B, K, Dh, S_max]`` and values ``[B, K, S_max, Dh]`` (per-layer form, :meth:`per_layer`).
        valid: ``[B, S_max]`` true where a slot holds a real (non-pad) token.
        next_position: ``[B]`` RoPE position the row's next real token gets (= real tokens so far).
        index: ``[]`` first free slot, shared by all rows.

    The caller sizes ``max_length`` for prompt + generated tokens. A write past the end raises a
    ``ValueError`` when ``index`` is concrete (eager calls); inside ``jit`` it cannot raise, and XLA clamps
    the write offset, so the last slots would be overwritten.
    """

    keys: Float[Array, "L B S K Dh"] | LayerBuffers
    values: Float[Array, "L B S K Dh"] | LayerBuffers
    valid: Bool[Array, "B S"]
    next_position: Int[Array, " B"]
    index: Int[Array, ""]

    @classmethod
    def init(cls, config: ModelConfig, batch_size: int, max_length: int,
             dtype: jnp.dtype | str | None = None) -> KVCache:
        """An empty cache (stacked form); ``dtype`` defaults to the model's compute dtype."""
        dtype = config.compute_jnp_dtype if dtype is None else jnp.dtype(dtype)
        shape = (config.n_layers, batch_size, max_length, config.n_kv_heads, config.head_dim)
        return cls(
            keys=jnp.zeros(shape, dtype),
            values=jnp.zeros(shape, dtype),
            valid=jnp.zeros((batch_size, max_length), bool),
            next_position=jnp.zeros((batch_size,), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def is_per_layer(self) -> bool:
        """Whether keys and values are per-layer buffers (a tuple) rather than one stacked ``[L, ...]`` array."""
        return isinstance(self.keys, tuple)

    @property
    def max_length(self) -> int:
        """The cache's slots per row ``S``: the longest prompt plus response it can hold."""
        return self.valid.shape[1]

    def repeat_rows(self, n: int) -> KVCache:
        """Every row ``n`` times over (row ``b`` becomes rows ``b·n … b·n + n − 1``, as ``jnp.repeat``): a prompt
        prefilled once, its cache copied for its ``n`` samples."""
        if n == 1:
            return self

        def rows(x, axis=0):
            return jnp.repeat(x, n, axis=axis)

        if self.is_per_layer:
            keys, values = tuple(map(rows, self.keys)), tuple(map(rows, self.values))
        else:  # [L, B, S, K, Dh]
            keys, values = rows(self.keys, 1), rows(self.values, 1)
        return dataclasses.replace(self, keys=keys, values=values, valid=rows(self.valid),
                                   next_position=rows(self.next_position))

    def per_layer(self, max_length: int | None = None) -> KVCache:
        """The same cache with one buffer per layer (keys ``[B, K, Dh, S]``, values ``[B, K, S, Dh]``), optionally
        with more slots.

        Args:
            max_length: slots of the result (default: as now); the added slots are empty. A prompt can
                be prefilled into a cache of its own length, so that its attention does not sweep the
                slots the response will fill, and extended here.

        Returns:
            A per-layer copy (``self`` when it is per-layer already and keeps its length).

        Raises:
            ValueError: ``max_length`` below the current length.
        """
        length = self.max_length
        max_length = length if max_length is None else max_length
        if max_length < length:
            raise ValueError(f"KVCache.per_layer(max_length={max_length}) cannot drop slots: the cache has "
                             f"{length}")
        if self.is_per_layer and max_length == length:
            return self
        extra = max_length - length

        def per_layer(buffers, layout):
            layers = buffers if self.is_per_layer else [layout.from_slots_major(b) for b in buffers]
            widths = [(0, 0)] * 4
            widths[layout.slots] = (0, extra)
            return tuple(jnp.pad(layer, widths) for layer in layers)

        return dataclasses.replace(self, keys=per_layer(self.keys, KEY_LAYOUT),
                                   values=per_layer(self.values, VALUE_LAYOUT),
                                   valid=jnp.pad(self.valid, ((0, 0), (0, extra))))

    def stacked(self) -> KVCache:
        """The same cache in the stacked ``[L, B, S, K, Dh]`` form (a copy; already so: unchanged)."""
        if not self.is_per_layer:
            return self

        def stack(layers, layout):
            return jnp.stack([layout.slots_major(layer) for layer in layers])

        return dataclasses.replace(self, keys=stack(self.keys, KEY_LAYOUT), values=stack(self.values, VALUE_LAYOUT))

    def for_layers(self) -> LayerKV:
        """The view the layers start from (layer 0, writing at ``index``)."""
        return LayerKV(self.keys, self.values, 0 if self.is_per_layer else jnp.zeros((), jnp.int32), self.index)


class LayerKV(NamedTuple):
    """The cache buffers as the layers carry them, positioned at one layer.

    ``layer`` is a traced index into stacked buffers (under the layer scan), or a Python int into
    per-layer buffers (unrolled layers).
    """

    keys: Float[Array, "L B S K Dh"] | LayerBuffers
    values: Float[Array, "L B S K Dh"] | LayerBuffers
    layer: Int[Array, ""] | int
    index: Int[Array, ""]

    def at_layer(self, layer: Int[Array, ""] | int) -> LayerKV:
        return self._replace(layer=layer)

    def append(
        self, new_keys: Float[Array, "B T K Dh"], new_values: Float[Array, "B T K Dh"]
    ) -> tuple[LayerKV, Float[Array, "B S K Dh"], Float[Array, "B S K Dh"]]:
        """Write this layer's new keys/values at ``index``; return the updated view and all S slots."""
        if isinstance(self.keys, tuple):
            return self._append_per_layer(new_keys, new_values)
        start = (self.layer, 0, self.index, 0, 0)
        keys = jax.lax.dynamic_update_slice(self.keys, new_keys[None].astype(self.keys.dtype), start)
        values = jax.lax.dynamic_update_slice(self.values, new_values[None].astype(self.values.dtype), start)
        return self._replace(keys=keys, values=values), keys[self.layer], values[self.layer]

    def _append_per_layer(self, new_keys, new_values):
        layer = self.layer
        if not isinstance(layer, int):
            raise ValueError("a per-layer KVCache is written by unrolled layers (a Python int layer index); "
                             "the layer scan needs the stacked form (KVCache.stacked(), or unstack_layers on "
                             "the model)")

        def write(buffers, new, layout):
            new = layout.from_slots_major(new).astype(buffers[layer].dtype)
            start = [0] * 4
            start[layout.slots] = self.index
            buffer = jax.lax.dynamic_update_slice(buffers[layer], new, start)
            return buffers[:layer] + (buffer,) + buffers[layer + 1:], layout.slots_major(buffer)

        keys, layer_keys = write(self.keys, new_keys, KEY_LAYOUT)
        values, layer_values = write(self.values, new_values, VALUE_LAYOUT)
        return self._replace(keys=keys, values=values), layer_keys, layer_values


class Joining(NamedTuple):
    """A prompt that joins a decode step (:meth:`jaxalign.models.LlamaForCausalLM.decode_joining`): its tokens
    are computed in the same matrix products as the step's one token per row, and written into row ``slot``.

    The prompt's ``P`` columns end at the step's write column ``I`` (so its tokens are written at
    ``[I − P + 1, I]``, and the row decodes from ``I + 1`` on as every other row), and the ``head``'s columns
    come right before them (a cached prompt head the tokens continue: a one-row cache, tokens right-aligned).
    """

    tokens: Int[Array, "1 P"]  # left-padded
    mask: Bool[Array, "1 P"]
    slot: Int[Array, ""]
    head: KVCache | None


def write_joining(buffer: Array, layout: BufferLayout, slot, new: Float[Array, "1 P K Dh"], first,
                  head: Array | None) -> Array:
    """``buffer`` (a per-layer buffer in ``layout``) with row ``slot`` holding ``head`` (a one-row buffer of ``W``
    slots, same layout) at the ``W`` slots before ``first`` and ``new`` from ``first`` on (what the decode step
    wrote in that row before is overwritten)."""
    def start(column):
        at = [slot, 0, 0, 0]
        at[layout.slots] = column
        return at

    if head is not None:
        head_start = start(first - head.shape[layout.slots])
        buffer = jax.lax.dynamic_update_slice(buffer, head.astype(buffer.dtype), head_start)
    return jax.lax.dynamic_update_slice(buffer, layout.from_slots_major(new).astype(buffer.dtype), start(first))


def row_slots_major(buffer: Array, layout: BufferLayout, slot) -> Float[Array, "1 S K Dh"]:
    """Row ``slot`` of a per-layer buffer as the attention reads keys/values."""
    shape = (1, *buffer.shape[1:])
    return layout.slots_major(jax.lax.dynamic_slice(buffer, (slot, 0, 0, 0), shape))
