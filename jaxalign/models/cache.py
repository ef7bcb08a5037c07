"""A preallocated key/value cache for incremental decoding inside ``jit`` / ``while_loop``.

Every row writes the same number of slots per call (a left-padded prompt, then one token per step), so a
single scalar ``index`` says where the next write goes and the update is one ``dynamic_update_slice``,
done in place by XLA when the cache is carried through a loop or donated. Rows differ only in which slots
hold real tokens (``valid``) and in their RoPE position (``next_position``).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from jaxalign.models.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys/values of every layer for ``max_length`` slots.

    Attributes:
        keys, values: ``[L, B, S_max, K, Dh]`` post-RoPE keys and the values.
        valid: ``[B, S_max]`` true where a slot holds a real (non-pad) token.
        next_position: ``[B]`` RoPE position the row's next real token gets (= real tokens so far).
        index: ``[]`` first free slot, shared by all rows.

    The caller sizes ``max_length`` for prompt + generated tokens. A write past the end raises a
    ``ValueError`` when ``index`` is concrete (eager calls); inside ``jit`` it cannot raise, and XLA clamps
    the write offset, so the last slots would be overwritten.
    """

    keys: Float[Array, "L B S K Dh"]
    values: Float[Array, "L B S K Dh"]
    valid: Bool[Array, "B S"]
    next_position: Int[Array, " B"]
    index: Int[Array, ""]

    @classmethod
    def init(cls, config: ModelConfig, batch_size: int, max_length: int,
             dtype: jnp.dtype | str | None = None) -> KVCache:
        """An empty cache; ``dtype`` defaults to the model's compute dtype."""
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
    def max_length(self) -> int:
        return self.keys.shape[2]

    def for_layers(self) -> LayerKV:
        """The view the layer scan starts from (layer 0, writing at ``index``)."""
        return LayerKV(self.keys, self.values, jnp.zeros((), jnp.int32), self.index)


class LayerKV(NamedTuple):
    """The stacked cache buffers as the layer scan carries them, positioned at one layer."""

    keys: Float[Array, "L B S K Dh"]
    values: Float[Array, "L B S K Dh"]
    layer: Int[Array, ""]
    index: Int[Array, ""]

    def at_layer(self, layer: Int[Array, ""]) -> LayerKV:
        return self._replace(layer=layer)

    def append(
        self, new_keys: Float[Array, "B T K Dh"], new_values: Float[Array, "B T K Dh"]
    ) -> tuple[LayerKV, Float[Array, "B S K Dh"], Float[Array, "B S K Dh"]]:
        """Write this layer's new keys/values at ``index``; return the updated view and all S slots."""
        start = (self.layer, 0, self.index, 0, 0)
        keys = jax.lax.dynamic_update_slice(self.keys, new_keys[None].astype(self.keys.dtype), start)
        values = jax.lax.dynamic_update_slice(self.values, new_values[None].astype(self.values.dtype), start)
        return self._replace(keys=keys, values=values), keys[self.layer], values[self.layer]
