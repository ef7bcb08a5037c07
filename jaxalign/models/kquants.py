"""llama.cpp's Q4_K and Q6_K quantisation in NumPy (the ``gguf`` package ships only their dequantisation).

Both work on super-blocks of ``QK_K = 256`` values of a row. The searches follow llama.cpp's reference quantisers
(``quantize_row_q4_K_ref`` and ``quantize_row_q6_K_ref`` in ggml-quants.c), vectorised over every block at once:

- **Q4_K** (144 bytes a block): eight sub-blocks of 32 values, each ``x ≈ d·sc·q − dmin·m`` with ``q`` in
  ``0..15`` and 6-bit ``sc``, ``m``; each sub-block's scale and offset come from a weighted least-squares search
  over 21 candidate scales (``make_qkx2_quants``: weights ``rms(sub-block) + |x|``).
- **Q6_K** (210 bytes a block): sixteen sub-blocks of 16 values, ``x ≈ d·sc·q`` with ``q`` in ``−32..31`` and an
  8-bit signed ``sc``; each sub-block's scale from a search over 19 candidates weighted by ``x²``
  (``make_qx_quants``).

The byte layouts are the ones ``gguf.quants.dequantize`` reads (tests check every round trip).
"""

from __future__ import annotations

import numpy as np

QK_K = 256
_EPS = 1e-15  # llama.cpp's GROUP_MAX_EPS: a group whose largest |x| is below this is stored as zeros


def _rint(x: np.ndarray) -> np.ndarray:
    """Round half to even, as llama.cpp's ``nearest_int`` (float32 magic-number rounding) does."""
    return np.rint(x).astype(np.int32)


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _offset_quants(x: np.ndarray, weights: np.ndarray, nmax: int, *, rmin: float = -1.0, rdelta: float = 0.1,
                   nstep: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, offset)`` per row of ``x [N, n]`` with ``x ≈ scale·q − offset``, ``q`` in ``0..nmax``, ``offset >= 0``.

    The first guess maps ``[min(x, 0), max(x)]`` onto ``0..nmax``; then ``nstep + 1`` candidate inverse scales
    ``(nmax + rmin + rdelta·i) / (max − min)`` each quantise the row and fit scale and offset by weighted least
    squares; the candidate with the smallest weighted squared error wins.
    """
    x = x.astype(np.float32)
    low = np.minimum(x.min(axis=1), 0.0)
    high = x.max(axis=1)
    span = high - low
    flat = span <= 0
    safe_span = np.where(flat, 1.0, span)
    sum_w = weights.sum(axis=1)
    sum_x = (weights * x).sum(axis=1)

    iscale = nmax / safe_span
    scale = 1.0 / iscale
    levels = np.clip(_rint(iscale[:, None] * (x - low[:, None])), 0, nmax)
    best = (weights * (scale[:, None] * levels + low[:, None] - x) ** 2).sum(axis=1)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) / safe_span
        candidate = np.clip(_rint(iscale[:, None] * (x - low[:, None])), 0, nmax).astype(np.float32)
        sum_l = (weights * candidate).sum(axis=1)
        sum_l2 = (weights * candidate**2).sum(axis=1)
        sum_xl = (weights * candidate * x).sum(axis=1)
        det = sum_w * sum_l2 - sum_l**2
        valid = det > 0
        safe_det = np.where(valid, det, 1.0)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        positive = this_min > 0  # the offset may only lower values: refit the scale through the origin
        this_min = np.where(positive, 0.0, this_min)
        this_scale = np.where(positive, sum_xl / np.where(sum_l2 > 0, sum_l2, 1.0), this_scale)
        error = (weights * (this_scale[:, None] * candidate + this_min[:, None] - x) ** 2).sum(axis=1)
        better = valid & (error < best)
        best = np.where(better, error, best)
        scale = np.where(better, this_scale, scale)
        low = np.where(better, this_min, low)
    scale = np.where(flat, 0.0, scale)
    return scale.astype(np.float32), (-low).astype(np.float32)


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    """``rows [..., n]`` (``n`` a multiple of 256) as Q4_K bytes ``[..., n / 256 · 144]``."""
    shape = rows.shape
    if shape[-1] % QK_K:
        raise ValueError(f"Q4_K needs rows of a multiple of {QK_K} values, got {shape[-1]}")
    x = rows.reshape(-1, QK_K).astype(np.float32)
    blocks = x.shape[0]
    sub = x.reshape(blocks * 8, 32)
    weights = np.sqrt((sub**2).mean(axis=1, keepdims=True)) + np.abs(sub)
    scales, mins = _offset_quants(sub, weights, 15)
    scales, mins = scales.reshape(blocks, 8), mins.reshape(blocks, 8)

    max_scale, max_min = scales.max(axis=1), mins.max(axis=1)
    inv_scale = np.where(max_scale > 0, 63.0 / np.where(max_scale > 0, max_scale, 1.0), 0.0)
    inv_min = np.where(max_min > 0, 63.0 / np.where(max_min > 0, max_min, 1.0), 0.0)
    ls = np.minimum(63, _rint(inv_scale[:, None] * scales)).astype(np.uint8)
    lm = np.minimum(63, _rint(inv_min[:, None] * mins)).astype(np.uint8)
    d = _fp16(max_scale / 63.0)
    dmin = _fp16(max_min / 63.0)

    packed = np.zeros((blocks, 12), np.uint8)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)

    step = d.astype(np.float32)[:, None] * ls.astype(np.float32)  # [blocks, 8]
    shift = dmin.astype(np.float32)[:, None] * lm.astype(np.float32)
    safe_step = np.where(step == 0, 1.0, step)
    levels = np.clip(_rint((x.reshape(blocks, 8, 32) + shift[..., None]) / safe_step[..., None]), 0, 15)
    levels = np.where(step[..., None] == 0, 0, levels).astype(np.uint8).reshape(blocks, 4, 2, 32)
    qs = (levels[:, :, 0] | (levels[:, :, 1] << 4)).reshape(blocks, 128)

    out = np.concatenate([d.reshape(blocks, 1).view(np.uint8), dmin.reshape(blocks, 1).view(np.uint8), packed, qs],
                         axis=1)
    return out.reshape(*shape[:-1], shape[-1] // QK_K * 144)


def _symmetric_quants(x: np.ndarray, nmax: int) -> np.ndarray:
    """Scale per row of ``x [N, n]`` with ``x ≈ scale·q``, ``q`` in ``−nmax..nmax−1``: the best of 19 candidate
    scales around ``−max/nmax`` (``max`` the value of largest magnitude) by ``x²``-weighted least squares."""
    index = np.abs(x).argmax(axis=1)
    extreme = np.take_along_axis(x, index[:, None], axis=1)[:, 0]
    tiny = np.abs(extreme) < _EPS
    safe = np.where(tiny, 1.0, extreme)
    weights = x**2

    def fit(iscale):
        levels = np.clip(_rint(iscale[:, None] * x), -nmax, nmax - 1).astype(np.float32)
        return (weights * x * levels).sum(axis=1), (weights * levels**2).sum(axis=1)

    sum_lx, sum_l2 = fit(-nmax / safe)
    scale = np.where(sum_l2 > 0, sum_lx / np.where(sum_l2 > 0, sum_l2, 1.0), 0.0)
    best = scale * sum_lx
    for step in range(-9, 10):
        if step == 0:
            continue
        sum_lx, sum_l2 = fit(-(nmax + 0.1 * step) / safe)
        better = (sum_l2 > 0) & (sum_lx**2 > best * sum_l2)
        this_scale = sum_lx / np.where(sum_l2 > 0, sum_l2, 1.0)
        scale = np.where(better, this_scale, scale)
        best = np.where(better, this_scale * sum_lx, best)
    return np.where(tiny, 0.0, scale).astype(np.float32)


def quantize_q6_k(rows: np.ndarray) -> np.ndarray:
    """``rows [..., n]`` (``n`` a multiple of 256) as Q6_K bytes ``[..., n / 256 · 210]``."""
    shape = rows.shape
    if shape[-1] % QK_K:
        raise ValueError(f"Q6_K needs rows of a multiple of {QK_K} values, got {shape[-1]}")
    x = rows.reshape(-1, QK_K).astype(np.float32)
    blocks = x.shape[0]
    scales = _symmetric_quants(x.reshape(blocks * 16, 16), 32).reshape(blocks, 16)
    index = np.abs(scales).argmax(axis=1)
    max_scale = np.take_along_axis(scales, index[:, None], axis=1)[:, 0]
    zero = np.abs(max_scale) < _EPS
    iscale = np.where(zero, 0.0, -128.0 / np.where(zero, 1.0, max_scale))
    d = _fp16(np.where(zero, 0.0, 1.0 / np.where(zero, 1.0, iscale)))
    sc = np.minimum(127, _rint(iscale[:, None] * scales)).astype(np.int8)

    step = d.astype(np.float32)[:, None] * sc.astype(np.float32)  # [blocks, 16]
    safe_step = np.where(step == 0, 1.0, step)
    levels = np.clip(_rint(x.reshape(blocks, 16, 16) / safe_step[..., None]), -32, 31) + 32
    levels = np.where(step[..., None] == 0, 32, levels).astype(np.uint8).reshape(blocks, 2, 4, 32)
    low, high = levels & 0xF, levels >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)

    out = np.concatenate([ql.reshape(blocks, 128), qh.reshape(blocks, 64), sc.view(np.uint8),
                          d.reshape(blocks, 1).view(np.uint8)], axis=1)
    return out.reshape(*shape[:-1], shape[-1] // QK_K * 210)
