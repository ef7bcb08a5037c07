"""KV-cache decoding: prefill a left-padded prompt, then one token per step, equals the full forward."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxalign.models import KVCache, LlamaForCausalLM, load_hf
from tests.models.conftest import TINY, B, V, left_padded, make_hf_model

PROMPT, NEW = 5, 6
PROMPT_LENGTHS = [5, 3, 1]


def _decode_teacher_forced(model, prompt, prompt_mask, continuation):
    """Logits of the prompt's last token and of each continuation token, via prefill + a scanned decode."""
    cache = KVCache.init(model.config, B, PROMPT + NEW)

    @jax.jit
    def run(prompt, prompt_mask, continuation):
        prefill_logits, cache_after_prompt = model(prompt, attention_mask=prompt_mask, cache=cache)

        def step(cache, token):
            logits, cache = model(token[:, None], cache=cache)
            return cache, logits[:, 0]

        final_cache, step_logits = jax.lax.scan(step, cache_after_prompt, continuation.T)
        return prefill_logits, jnp.swapaxes(step_logits, 0, 1), final_cache

    return run(prompt, prompt_mask, continuation)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral_window", "llama3_rope"])
def test_cached_decode_equals_full_forward(arch, hf_checkpoint, rng):
    model = load_hf(hf_checkpoint(arch))
    prompt = jnp.asarray(rng.integers(0, V, size=(B, PROMPT)))
    prompt_mask = jnp.asarray(left_padded(PROMPT_LENGTHS, PROMPT))
    continuation = jnp.asarray(rng.integers(0, V, size=(B, NEW)))

    prefill_logits, step_logits, cache = _decode_teacher_forced(model, prompt, prompt_mask, continuation)
    full_mask = jnp.concatenate([prompt_mask, jnp.ones((B, NEW), jnp.int32)], axis=1)
    full_logits, _ = model(jnp.concatenate([prompt, continuation], axis=1), attention_mask=full_mask)

    real = np.asarray(prompt_mask).astype(bool)
    np.testing.assert_allclose(np.asarray(prefill_logits)[real], np.asarray(full_logits[:, :PROMPT])[real],
                               atol=1e-5, rtol=0)
    chex.assert_shape(step_logits, (B, NEW, V))
    np.testing.assert_allclose(step_logits, full_logits[:, PROMPT:], atol=1e-5, rtol=0)
    assert int(cache.index) == PROMPT + NEW
    np.testing.assert_array_equal(cache.next_position, np.asarray(PROMPT_LENGTHS) + NEW)
    np.testing.assert_array_equal(cache.valid, np.asarray(full_mask).astype(bool))


def test_greedy_decoding_matches_transformers_generate(hf_checkpoint, rng):
    """A left-padded batch decoded greedily in a jitted while_loop gives transformers' generate tokens."""
    model = load_hf(hf_checkpoint("llama"))
    prompt = rng.integers(3, V, size=(B, PROMPT))
    prompt_mask = left_padded(PROMPT_LENGTHS, PROMPT)

    @jax.jit
    def greedy(prompt, prompt_mask):
        logits, cache = model(prompt, attention_mask=prompt_mask, cache=KVCache.init(model.config, B, PROMPT + NEW))
        first = jnp.argmax(logits[:, -1], axis=-1)
        tokens = jnp.zeros((B, NEW), jnp.int32).at[:, 0].set(first)

        def body(state):
            step, tokens, cache = state
            logits, cache = model(tokens[:, step - 1][:, None], cache=cache)
            return step + 1, tokens.at[:, step].set(jnp.argmax(logits[:, 0], axis=-1)), cache

        _, tokens, _ = jax.lax.while_loop(lambda s: s[0] < NEW, body, (1, tokens, cache))
        return tokens

    ours = np.asarray(greedy(jnp.asarray(prompt), jnp.asarray(prompt_mask)))
    hf_model = make_hf_model("llama")
    hf_model.generation_config.eos_token_id = None  # decode exactly NEW tokens, as the loop above does
    with torch.no_grad():
        generated = hf_model.generate(
            torch.tensor(prompt), attention_mask=torch.tensor(prompt_mask), max_new_tokens=NEW,
            do_sample=False, pad_token_id=0,
        )
    np.testing.assert_array_equal(ours, generated[:, PROMPT:].numpy())


def test_cache_rejects_segment_ids(hf_checkpoint):
    model = load_hf(hf_checkpoint("llama"))
    tokens = jnp.zeros((B, 2), jnp.int32)
    with pytest.raises(ValueError, match="segment_ids"):
        model(tokens, segment_ids=jnp.ones((B, 2), jnp.int32), cache=KVCache.init(model.config, B, 4))


def test_cache_overflow_raises_outside_jit():
    model = LlamaForCausalLM(TINY, rngs=nnx.Rngs(0))
    tokens = jnp.ones((B, 3), jnp.int32)
    with pytest.raises(ValueError, match=r"KV cache overflow: writing 3 token\(s\) at slot 0 .*max_length=2"):
        model(tokens, cache=KVCache.init(model.config, B, 2))
    _, cache = model(tokens, cache=KVCache.init(model.config, B, 4))
    _, cache = model(tokens[:, :1], cache=cache)  # fills the last slot exactly
    assert int(cache.index) == 4
    with pytest.raises(ValueError, match=r"writing 1 token\(s\) at slot 4 needs 5 slots.*max_length=4"):
        model(tokens[:, :1], cache=cache)
