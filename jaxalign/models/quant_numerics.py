"""NF4 and int8 storage of one linear kernel: quantise once, dequantise inside the product.

Kernels are ``[in, out]`` (``y = x·W``); bitsandbytes holds the same weight as torch's ``[out, in]``, so its
blocks of ``block_size`` consecutive values are runs along our *input* axis, one output column at a time.
Every function here takes one kernel; leading axes (the ``[L]`` layer stack) go through :func:`over_leading`.

NF4 (QLoRA, Dettmers et al. 2023, arXiv 2305.14314, Sec. 3), bitsandbytes' ``quantize_4bit(quant_type="nf4")``:

- per block ``b`` of ``block_size`` inputs of one output: ``absmax_b = max |w|``;
- ``code = #{t in NF4_BOUNDS : t < clip(w · (1 / absmax_b), -1, 1)}`` (float32, the reciprocal first, as
  bitsandbytes computes it), two codes a byte, the first in the high nibble;
- ``w ≈ NF4[code] · absmax_b``.

Double quantisation (``compress_statistics=True``, QLoRA Sec. 3 "Double Quantization"): the block scales,
flattened in bitsandbytes' order (output by output), minus their mean ``offset``, are quantised again to 8 bits
with the dynamic map in groups of 256: ``scale_g = max |absmax - offset|``, ``code ≈ nearest(DYNAMIC_8BIT,
(absmax - offset) / scale_g)``, and ``absmax ≈ DYNAMIC_8BIT[code] · scale_g + offset``. That takes the scales
from 32 to about 8.1 bits per block: 4.127 bits a weight with blocks of 64. The nearest code is found as
bitsandbytes' CPU quantiser finds it: the normalised value is read on a grid of 65,536 points over [-1, 1]
(``uint16((v + 1) / 2 · 65535 + 0.5)``) and a table maps each grid point to the code nearest to it, so a value
within half a grid step (7.6e-6) of a midpoint between two codes can get the farther one, exactly as there.

int8: per output channel (LLM.int8()'s vector-wise quantisation, arXiv 2208.07339, without the outlier split):
``absmax_o = max_i |w[i, o]|``, ``code = round(w · (127 / absmax_o))`` (half to even), ``w ≈ code · absmax_o / 127``.

Storage, per format (``nb = in / block_size``):

====================  ===========================  ==================================================
name                  shape, dtype                 holds
====================  ===========================  ==================================================
``codes`` (nf4)       ``[in/2, out]`` uint8        two NF4 codes a byte along the input axis
``absmax`` (nf4)      ``[nb, out]`` float32        the block scales (without double quantisation)
``absmax_codes``      ``[nb, out]`` uint8          the block scales' 8-bit codes (double quantisation)
``absmax_scales``     ``[ceil(nb·out/256)]`` f32   one scale per group of 256 block scales
``absmax_offset``     ``[]`` float32               the mean subtracted before the second quantisation
``codes`` (int8)      ``[in, out]`` int8           the int8 codes
``scales`` (int8)     ``[out]`` float32            ``absmax_o / 127``
====================  ===========================  ==================================================

Notes:
    The offset is the mean of the block scales, summed in float32 in a fixed pairwise order, so the storage is
    the same on every backend and for a kernel alone or in a stack. bitsandbytes takes torch's float32 mean,
    whose summation order (and so its last bit) depends on the CPU's vector width; the two agree to a few ulps,
    and a scale's 8-bit code can then differ by one step when it lies within those ulps of a rounding boundary
    (given the same offset, every code is bitsandbytes'; tests/models/test_quantize_fidelity.py checks both).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jaxalign.models.quant_tables import DYNAMIC_8BIT, NF4, NF4_BOUNDS

DOUBLE_QUANT_GROUP = 256
"""Block scales per group of the second quantisation (bitsandbytes' fixed ``blocksize=256`` there)."""

# bitsandbytes divides by absmax.clamp(min=1e-38); the smallest normal float32 keeps the reciprocal finite where
# XLA flushes subnormals to zero. An all-zero block gets code 7 (NF4's exact zero) either way.
_TINY = np.float32(np.finfo(np.float32).tiny)

STORAGE = {
    ("nf4", True): ("codes", "absmax_codes", "absmax_scales", "absmax_offset"),
    ("nf4", False): ("codes", "absmax"),
    ("int8", False): ("codes", "scales"),
}
"""The arrays each ``(type, double_quant)`` stores, in a fixed order."""

KERNEL_AXES = {
    "codes": ("in", "out"),
    "absmax": ("in", "out"),
    "absmax_codes": ("in", "out"),
    "absmax_scales": (None,),
    "absmax_offset": (),
    "scales": ("out",),
}
"""Which axis of the kernel each stored axis follows (``None``: its own, unsplit), for the sharding rules."""


def over_leading(fn, leading: int):
    """``fn`` vmapped over ``leading`` leading axes of every argument and result (the ``[L]`` layer stack)."""
    for _ in range(leading):
        fn = jax.vmap(fn)
    return fn


_GRID = 65536


def _grid_codes(table: np.ndarray) -> np.ndarray:
    """``[65536]`` uint8: for each grid point ``-1 + 2i / 65535`` (float32), the number of midpoints of ``table``
    below it, i.e. its nearest code (bitsandbytes' ``build_quantize_lut``, float32 arithmetic reproduced)."""
    midpoints = (np.float32(0.5) * (table[:-1] + table[1:])).astype(np.float32)
    points = np.float32(-1) + (np.float32(2) * np.arange(_GRID, dtype=np.float32)) / np.float32(_GRID - 1)
    return np.searchsorted(midpoints, points.astype(np.float32), side="left").astype(np.uint8)


_DYNAMIC_GRID_CODES = _grid_codes(DYNAMIC_8BIT)


def _dynamic_codes(normed: Float[Array, " n"]) -> Array:
    """The 8-bit dynamic-map codes of values in [-1, 1], through the grid as bitsandbytes' CPU quantiser."""
    point = ((jnp.clip(normed, -1, 1) + 1) * np.float32(0.5) * np.float32(_GRID - 1) + np.float32(0.5))
    return jnp.asarray(_DYNAMIC_GRID_CODES)[point.astype(jnp.uint16)]


def _scale_groups(n_blocks: int, n_out: int) -> Array:
    """``[nb, out]``: the group of 256 each block scale falls in, counted in bitsandbytes' (output-major) order."""
    flat_index = jnp.arange(n_out, dtype=jnp.int32)[None, :] * n_blocks + jnp.arange(n_blocks, dtype=jnp.int32)[:, None]
    return flat_index // DOUBLE_QUANT_GROUP


def _pairwise_mean(values: Float[Array, " n"]) -> Array:
    """The float32 mean, summed pairwise in a fixed order (XLA's reductions choose their own order)."""
    count = values.shape[0]
    total = jnp.pad(values, (0, (1 << max(0, (count - 1).bit_length())) - count))
    while total.shape[0] > 1:
        total = total[0::2] + total[1::2]
    # XLA turns a division by a constant into a product with its rounded reciprocal, which it may then fuse into
    # the subtraction of the mean: a divisor it cannot fold keeps the mean one correctly rounded number.
    return total[0] / (np.float32(count) + np.float32(0) * total[0])


def quantize_scales(absmax: Float[Array, "nb out"], offset: Array | None = None) -> dict[str, Array]:
    """The second quantisation of the NF4 block scales (``absmax_codes``, ``absmax_scales``, ``absmax_offset``).

    Args:
        absmax: one kernel's block scales.
        offset: the mean to subtract; None computes it. Given bitsandbytes' own offset, every code and scale is
            bitsandbytes' (tests pass it to check the algorithm apart from the mean's last bit).
    """
    n_blocks, n_out = absmax.shape
    flat = absmax.T.reshape(-1)
    offset = _pairwise_mean(flat) if offset is None else jnp.asarray(offset, jnp.float32)
    centred = flat - offset
    n_groups = -(-flat.shape[0] // DOUBLE_QUANT_GROUP)
    padded = jnp.pad(centred, (0, n_groups * DOUBLE_QUANT_GROUP - flat.shape[0]))
    scales = jnp.max(jnp.abs(padded.reshape(n_groups, DOUBLE_QUANT_GROUP)), axis=1)
    # bitsandbytes multiplies by the reciprocal, and codes an all-zero group 0.
    inverse = jnp.where(scales > 0, np.float32(1) / jnp.where(scales > 0, scales, 1), 0)
    codes = jnp.where(scales[:, None] > 0, _dynamic_codes(padded.reshape(n_groups, -1) * inverse[:, None]), 0)
    codes = codes.reshape(-1)[: flat.shape[0]].astype(jnp.uint8)
    return {"absmax_codes": codes.reshape(n_out, n_blocks).T, "absmax_scales": scales, "absmax_offset": offset}


def dequantize_scales(absmax_codes: Array, absmax_scales: Array, absmax_offset: Array) -> Float[Array, "nb out"]:
    """The NF4 block scales back from their 8-bit codes: ``DYNAMIC_8BIT[code] · scale_group + offset``."""
    groups = _scale_groups(*absmax_codes.shape)
    # bitsandbytes rounds the product before adding the offset; XLA may fuse the two into one multiply-add (one
    # rounding), so a scale can differ from bitsandbytes' in its last bit.
    return jnp.asarray(DYNAMIC_8BIT)[absmax_codes] * absmax_scales[groups] + absmax_offset


def quantize_nf4(kernel: Float[Array, "in out"], *, block_size: int, double_quant: bool) -> dict[str, Array]:
    """One kernel's NF4 storage (see the module docstring); ``in`` must be a multiple of ``block_size`` (even)."""
    n_in, n_out = kernel.shape
    blocks = kernel.astype(jnp.float32).reshape(n_in // block_size, block_size, n_out)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    scaled = jnp.clip(blocks * (np.float32(1) / jnp.maximum(absmax, _TINY))[:, None, :], -1, 1)
    # The number of bounds below each value (torch.bucketize's index), as 15 comparisons XLA fuses into one loop.
    codes = sum((scaled > bound).astype(jnp.uint8) for bound in NF4_BOUNDS)
    pairs = codes.reshape(n_in // 2, 2, n_out)
    stored = {"codes": (pairs[:, 0] << 4) | pairs[:, 1]}
    return stored | (quantize_scales(absmax) if double_quant else {"absmax": absmax})


def dequantize_nf4(stored: dict[str, Array], *, block_size: int, dtype) -> Float[Array, "in out"]:
    """The kernel an NF4 storage holds, computed in float32 and returned in ``dtype``."""
    packed = stored["codes"]
    n_in, n_out = 2 * packed.shape[0], packed.shape[1]
    codes = jnp.stack([packed >> 4, packed & 0xF], axis=1).reshape(n_in, n_out)
    if "absmax" in stored:
        absmax = stored["absmax"]
    else:
        absmax = dequantize_scales(stored["absmax_codes"], stored["absmax_scales"], stored["absmax_offset"])
    values = jnp.asarray(NF4)[codes].reshape(n_in // block_size, block_size, n_out)
    return (values * absmax[:, None, :]).reshape(n_in, n_out).astype(dtype)


def quantize_int8(kernel: Float[Array, "in out"]) -> dict[str, Array]:
    """One kernel's int8 storage: per output channel, ``round(w · 127 / absmax)`` and ``absmax / 127``."""
    weights = kernel.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(weights), axis=0)
    codes = jnp.round(weights * (np.float32(127) / jnp.maximum(absmax, _TINY))).astype(jnp.int8)
    return {"codes": codes, "scales": absmax / np.float32(127)}


def dequantize_int8(stored: dict[str, Array], *, dtype) -> Float[Array, "in out"]:
    """``code · absmax / 127`` in float32, returned in ``dtype``."""
    return (stored["codes"].astype(jnp.float32) * stored["scales"]).astype(dtype)


def quantize(kernel: Array, *, quant_type: str, block_size: int | None, double_quant: bool) -> dict[str, Array]:
    """The storage of ``kernel`` ``[..., in, out]`` (leading axes quantised one kernel at a time)."""
    if quant_type == "nf4":
        def one(w):
            return quantize_nf4(w, block_size=block_size, double_quant=double_quant)
    else:
        one = quantize_int8
    return over_leading(one, kernel.ndim - 2)(kernel)


def dequantize(stored: dict[str, Array], *, quant_type: str, block_size: int | None, dtype) -> Array:
    """The kernel ``[..., in, out]`` of a storage from :func:`quantize`, in ``dtype``."""
    if quant_type == "nf4":
        def one(s):
            return dequantize_nf4(s, block_size=block_size, dtype=dtype)
    else:
        def one(s):
            return dequantize_int8(s, dtype=dtype)
    return over_leading(one, stored["codes"].ndim - 2)(stored)
