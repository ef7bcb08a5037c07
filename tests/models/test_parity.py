"""Logits parity with transformers PyTorch (float32, max abs diff <= 1e-4) on tiny random checkpoints."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.models import LlamaForCausalLM, load_hf
from tests.models.conftest import (
    HF_CONFIGS,
    TOL,
    B,
    T,
    V,
    hf_logits,
    hf_positions,
    left_padded,
    make_hf_model,
    right_padded,
)

PADDINGS = {
    "none": np.ones((B, T), np.int32),
    "right": right_padded([7, 4, 1]),
    "left": left_padded([7, 4, 1]),
}


@functools.cache
def _models(arch, checkpoint_dir):
    model = load_hf(checkpoint_dir)
    forward = jax.jit(lambda tokens, mask: model(tokens, attention_mask=mask)[0])
    return make_hf_model(arch), forward


@pytest.mark.parametrize("padding", list(PADDINGS))
@pytest.mark.parametrize("arch", list(HF_CONFIGS))
def test_logits_match_transformers(arch, padding, hf_checkpoint, rng):
    hf_model, forward = _models(arch, hf_checkpoint(arch))
    tokens = rng.integers(0, V, size=(B, T))
    mask = PADDINGS[padding]
    ours = np.asarray(forward(jnp.asarray(tokens), jnp.asarray(mask)))
    chex.assert_shape(ours, (B, T, V))
    assert ours.dtype == np.float32
    # transformers derives position ids from the mask only inside generate(); pass them explicitly.
    expected = hf_logits(hf_model, tokens, mask, hf_positions(mask))
    real = mask.astype(bool)
    assert np.isfinite(ours).all(), "padded rows must stay finite"
    np.testing.assert_allclose(ours[real], expected[real], atol=TOL, rtol=0)


def test_the_comparison_is_sensitive_to_rope_scaling(hf_checkpoint, rng):
    """Guard on the tolerance: the llama3-scaled checkpoint read as unscaled RoPE must fail parity."""
    hf_model, _ = _models("llama3_rope", hf_checkpoint("llama3_rope"))
    loaded = load_hf(hf_checkpoint("llama3_rope"))
    model = LlamaForCausalLM(dataclasses.replace(loaded.config, rope_scaling=None), rngs=nnx.Rngs(0))
    nnx.update(model, nnx.state(loaded, nnx.Param))
    tokens = rng.integers(0, V, size=(B, T))
    ours = np.asarray(model(jnp.asarray(tokens))[0])
    assert np.abs(ours - hf_logits(hf_model, tokens)).max() > 100 * TOL
