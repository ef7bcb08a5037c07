"""The stored NF4 codes, block scales and double-quantised scales are bitsandbytes' own, and dequantise to its
weights to float32 rounding; int8 is the documented per-channel formula, checked against float64."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.models import quant_numerics
from jaxalign.models.quant_tables import DYNAMIC_8BIT, NF4

# Without it bitsandbytes' CPU backend waits on a kernel download from the Hub, which cannot happen here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
functional = pytest.importorskip("bitsandbytes.functional")

# (in, out, block size): blocks of 64 (the default), 32 and 128; 7 and 13 outputs make the double quantisation's
# groups of 256 straddle outputs; the last has more than 256 scales.
SHAPES = [(128, 7, 64), (64, 13, 32), (256, 11, 128), (192, 97, 64)]


def random_kernel(shape, seed, dtype=np.float32) -> np.ndarray:
    """Columns of different scales, one all-zero block, one outlier: every branch of the quantiser."""
    rng = np.random.default_rng(seed)
    kernel = rng.standard_normal(shape) * rng.uniform(0.01, 2.0, size=(1, shape[1]))
    kernel[: shape[0] // 2, 0] = 0.0
    kernel[3, -1] = 40.0
    return kernel.astype(dtype)


def bitsandbytes_nf4(kernel: np.ndarray, block_size: int, double_quant: bool):
    weight = torch.from_numpy(np.ascontiguousarray(kernel.T))  # torch's [out, in]
    return functional.quantize_4bit(weight, blocksize=block_size, quant_type="nf4",
                                    compress_statistics=double_quant)


def in_our_layout(flat, n_out: int):
    """bitsandbytes' output-major flat array as our ``[in-blocks, out]``."""
    return np.asarray(flat).reshape(n_out, -1).T


def ours(kernel, block_size, double_quant):
    return jax.device_get(jax.jit(lambda w: quant_numerics.quantize_nf4(w, block_size=block_size,
                                                                         double_quant=double_quant))(kernel))


def test_code_tables_are_bitsandbytes():
    np.testing.assert_array_equal(NF4, functional.get_4bit_type("nf4", device="cpu").numpy())
    np.testing.assert_array_equal(DYNAMIC_8BIT, functional.create_dynamic_map().numpy())


@pytest.mark.parametrize(("n_in", "n_out", "block_size"), SHAPES)
def test_nf4_codes_and_block_scales_equal_bitsandbytes(n_in, n_out, block_size):
    kernel = random_kernel((n_in, n_out), seed=n_in + n_out)
    packed, state = bitsandbytes_nf4(kernel, block_size, double_quant=False)
    stored = ours(kernel, block_size, double_quant=False)
    np.testing.assert_array_equal(stored["codes"], in_our_layout(packed.numpy(), n_out))
    np.testing.assert_array_equal(stored["absmax"], in_our_layout(state.absmax.numpy(), n_out))
    assert stored["codes"][: n_in // 4, 0].tolist() == [0x77] * (n_in // 4)  # the zero block: NF4's exact 0


@pytest.mark.parametrize(("n_in", "n_out", "block_size"), SHAPES)
def test_double_quantised_scales_equal_bitsandbytes(n_in, n_out, block_size):
    kernel = random_kernel((n_in, n_out), seed=n_in * n_out)
    packed, state = bitsandbytes_nf4(kernel, block_size, double_quant=True)
    stored = ours(kernel, block_size, double_quant=True)
    np.testing.assert_array_equal(stored["codes"], in_our_layout(packed.numpy(), n_out))
    # The mean subtracted first: torch's float32 sum and ours agree to a few ulps, not always in the last bit.
    np.testing.assert_allclose(stored["absmax_offset"], state.offset.numpy(), rtol=5e-7)
    codes = in_our_layout(state.absmax.numpy(), n_out)
    # Given the same offset every scale code and group scale is bitsandbytes'...
    absmax = ours(kernel, block_size, double_quant=False)["absmax"]
    same_offset = jax.device_get(quant_numerics.quantize_scales(jnp.asarray(absmax), state.offset.numpy()))
    np.testing.assert_array_equal(same_offset["absmax_codes"], codes)
    np.testing.assert_array_equal(same_offset["absmax_scales"], state.state2.absmax.numpy())
    # ...and with our own offset, a code can only move one step, for a scale on a rounding boundary.
    moved = stored["absmax_codes"].astype(int) - codes
    assert np.abs(moved).max() <= 1 and np.mean(moved == 0) >= 0.99
    np.testing.assert_allclose(stored["absmax_scales"], state.state2.absmax.numpy(), rtol=5e-7)


def float32_rounding(storage: dict, block_size: int) -> np.ndarray:
    """How far a dequantised weight may be from bitsandbytes' by float32 rounding alone: bitsandbytes rounds a
    block scale's ``DYNAMIC_8BIT[code] · scale_g`` before adding the offset, XLA may fuse the two (one rounding):
    the scale then moves by up to an ulp of the terms, the weight by ``|NF4[code]|`` times that, plus its own ulp."""
    eps = np.finfo(np.float32).eps
    groups = np.asarray(quant_numerics._scale_groups(*storage["absmax_codes"].shape))
    product = np.abs(DYNAMIC_8BIT[storage["absmax_codes"]] * np.asarray(storage["absmax_scales"])[groups])
    scale_tolerance = eps * (np.abs(storage["absmax_offset"]) + product)
    packed = np.asarray(storage["codes"])
    codes = np.stack([packed >> 4, packed & 0xF], axis=1).reshape(2 * packed.shape[0], packed.shape[1])
    absmax = np.asarray(quant_numerics.dequantize_scales(*(storage[k] for k in
                                                           ("absmax_codes", "absmax_scales", "absmax_offset"))))
    weights = np.abs(NF4[codes]) * np.repeat(absmax, block_size, axis=0)
    return np.abs(NF4[codes]) * np.repeat(scale_tolerance, block_size, axis=0) + eps * weights


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("n_in", "n_out", "block_size"), SHAPES[:3])
def test_dequantised_weights_equal_bitsandbytes(n_in, n_out, block_size, dtype):
    torch_dtype = getattr(torch, dtype)
    weight = torch.from_numpy(np.ascontiguousarray(random_kernel((n_in, n_out), seed=7).T)).to(torch_dtype)
    packed, state = functional.quantize_4bit(weight, blocksize=block_size, quant_type="nf4", compress_statistics=True)
    theirs = functional.dequantize_4bit(packed, state)
    assert theirs.dtype == torch_dtype
    theirs = theirs.float().numpy().T
    their_storage = {"codes": in_our_layout(packed.numpy(), n_out),
                     "absmax_codes": in_our_layout(state.absmax.numpy(), n_out),
                     "absmax_scales": state.state2.absmax.numpy(), "absmax_offset": state.offset.numpy()}
    tolerance = float32_rounding(their_storage, block_size)
    if dtype == "bfloat16":  # and then one bf16 rounding of the result
        tolerance = tolerance + np.abs(theirs) * float(jnp.finfo(jnp.bfloat16).eps)
    read = quant_numerics.dequantize(their_storage, quant_type="nf4", block_size=block_size, dtype=jnp.dtype(dtype))
    assert np.all(np.abs(np.asarray(read, np.float32) - theirs) <= tolerance)
    # End to end: our storage of the same weights (a bf16 kernel quantised from its float32 values, as theirs).
    stored = ours(weight.float().numpy().T, block_size, double_quant=True)
    same_scales = np.repeat(stored["absmax_codes"] == their_storage["absmax_codes"], block_size, axis=0)
    assert same_scales.mean() >= 0.99
    deq = quant_numerics.dequantize(stored, quant_type="nf4", block_size=block_size, dtype=jnp.dtype(dtype))
    difference = np.abs(np.asarray(deq, np.float32) - theirs)
    # Our offset may differ from theirs by an ulp, which moves every scale of the kernel by as much.
    offset_ulp = np.abs(NF4[0]) * np.spacing(np.float32(state.offset.numpy())) * np.ones_like(theirs)
    assert np.all((difference <= 2 * tolerance + offset_ulp)[same_scales])


@pytest.mark.parametrize("shape", [(97, 13), (256, 64), (31, 200)])
def test_int8_is_the_per_channel_formula(shape):
    kernel = random_kernel(shape, seed=shape[0])
    stored = jax.device_get(jax.jit(quant_numerics.quantize_int8)(kernel))
    wide = kernel.astype(np.float64)
    absmax = np.abs(wide).max(axis=0)
    exact = wide * 127 / np.where(absmax > 0, absmax, 1)
    expected = np.round(exact)
    near_tie = np.abs(np.abs(exact - np.floor(exact)) - 0.5) < 1e-4
    assert stored["codes"].dtype == np.int8
    np.testing.assert_array_equal(stored["codes"][~near_tie], expected[~near_tie])
    assert np.abs(stored["codes"].astype(int) - expected).max() <= 1
    np.testing.assert_allclose(stored["scales"], absmax / 127, rtol=np.finfo(np.float32).eps)
    deq = np.asarray(quant_numerics.dequantize_int8(stored, dtype=jnp.float32))
    np.testing.assert_allclose(deq, stored["codes"] * absmax / 127, rtol=2 * np.finfo(np.float32).eps, atol=1e-30)
    assert np.all(stored["codes"][: shape[0] // 2, 0] == 0)
    # The error bound the format promises: half a step of absmax / 127 per channel.
    assert np.all(np.abs(deq - wide) <= absmax / 254 * (1 + 1e-5))


def test_stacked_kernels_quantise_layer_by_layer():
    stack = np.stack([random_kernel((64, 13), seed=s) for s in range(3)])
    stacked = jax.device_get(quant_numerics.quantize(stack, quant_type="nf4", block_size=32, double_quant=True))
    for layer in range(3):
        one = ours(stack[layer], 32, double_quant=True)
        for name, value in one.items():
            np.testing.assert_array_equal(stacked[name][layer], value, err_msg=name)
