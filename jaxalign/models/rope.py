"""Rotary position embeddings (RoPE) in transformers' "rotate half" layout.

The inverse frequencies are a static NumPy float32 table computed from the config exactly as
transformers computes them (``base ** (arange(0, Dh, 2) / Dh)`` in float32, then the scaling rule), so the
angles ``position · inv_freq`` agree bit for bit in float32. Positions are per token, which is what makes
left padding, packed segments and cached decoding work: nothing assumes ``position == index``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from jaxalign.models.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """``[Dh/2]`` float32 inverse frequencies ``θ^(-2i/Dh)``, scaled per ``config.rope_scaling``.

    ``linear`` divides all by ``factor``. ``llama3`` (Llama 3.1) keeps wavelengths shorter than
    ``original_max / high_freq_factor``, divides those longer than ``original_max / low_freq_factor`` by
    ``factor``, and blends linearly in ``original_max / wavelength`` between the two.
    """
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_tables(
    positions: Int[Array, "B T"], inv_freq: np.ndarray, dtype: jnp.dtype
) -> tuple[Float[Array, "B T 1 Dh"], Float[Array, "B T 1 Dh"]]:
    """``(cos, sin)`` of the angles ``position · inv_freq``, duplicated over both halves of the head.

    The angles are computed in float32 and only the tables are cast to ``dtype`` (as transformers does),
    so bf16 compute does not round large positions before the multiplication.
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(
    x: Float[Array, "B T N Dh"], cos: Float[Array, "B T 1 Dh"], sin: Float[Array, "B T 1 Dh"]
) -> Float[Array, "B T N Dh"]:
    """Rotate each head's pairs ``(x_i, x_{i+Dh/2})``: ``x·cos + rotate_half(x)·sin``."""
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return x * cos + rotated * sin
