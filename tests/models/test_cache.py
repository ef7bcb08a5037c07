"""KV-cache decoding: prefill a left-padded prompt, then one token per step, equals the full forward."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxalign.models import KVCache, LlamaForCausalLM, load_hf
from jaxalign.models.cache import Joining
from jaxalign.models.stack import unstack_layers
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


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_prompt_joining_a_decode_step_equals_its_full_forward(arch, hf_checkpoint, rng):
    """Rows 0 and 1 decode a token while a prompt (a cached head of 4 tokens, then 5 more left-padded to 8 columns)
    joins free row 2 in the same step: the rows get a plain step's hidden states, the prompt's last token its full
    forward's, and the next step continues all three rows as full forwards do."""
    model = load_hf(hf_checkpoint(arch))
    view = unstack_layers(model)
    columns, width = 12, 8  # the rows' prompts end at column 12; the joining prompt's 8 columns end there too
    prompts = rng.integers(0, V, size=(2, columns))
    masks = left_padded([5, 3], columns)
    tokens = jnp.asarray(np.concatenate([prompts, np.zeros((1, columns), int)]))
    mask = jnp.asarray(np.concatenate([masks, np.zeros((1, columns), np.int32)]))
    _, cache = model.hidden_states(tokens, attention_mask=mask, cache=KVCache.init(model.config, 3, 24))
    cache = cache.per_layer()
    head_tokens, rest = rng.integers(0, V, size=(1, 4)), rng.integers(0, V, size=5)
    _, head = model.hidden_states(jnp.asarray(head_tokens), cache=KVCache.init(model.config, 1, 4))
    joining = Joining(jnp.asarray(np.pad(rest, (width - 5, 0)))[None], jnp.asarray(left_padded([5], width)),
                      jnp.int32(2), head)
    fed, real = jnp.asarray(rng.integers(0, V, size=3)), jnp.asarray([True, True, False])

    step_hidden, last, joined = jax.jit(view.decode_joining)(fed, real, cache, joining)
    plain_hidden, plain = view.hidden_states(fed[:, None], attention_mask=real[:, None], cache=cache)
    np.testing.assert_allclose(step_hidden[:2], plain_hidden[:2], atol=1e-5, rtol=0)
    whole = np.concatenate([head_tokens[0], rest])
    full, _ = model.hidden_states(jnp.asarray(whole)[None])
    np.testing.assert_allclose(last[0], full[0, -1], atol=1e-5, rtol=0)
    assert int(joined.index) == columns + 1
    np.testing.assert_array_equal(joined.next_position, [6, 4, 9])
    np.testing.assert_array_equal(joined.valid[2], np.isin(np.arange(24), [1, 2, 3, 4, 8, 9, 10, 11, 12]))

    after = jnp.asarray(rng.integers(0, V, size=3))
    next_hidden, _ = view.hidden_states(after[:, None], cache=joined)
    plain_next, _ = view.hidden_states(after[:, None], cache=plain)
    np.testing.assert_allclose(next_hidden[:2], plain_next[:2], atol=1e-5, rtol=0)
    full_next, _ = model.hidden_states(jnp.asarray(np.append(whole, after[2]))[None])
    np.testing.assert_allclose(next_hidden[2, -1], full_next[0, -1], atol=1e-5, rtol=0)


def test_joining_needs_unrolled_layers_and_a_per_layer_cache(hf_checkpoint):
    model = load_hf(hf_checkpoint("llama"))
    assert model.supports_joining and not load_hf(hf_checkpoint("gpt2")).supports_joining
    cache = KVCache.init(model.config, 2, 16)
    joining = Joining(jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool), jnp.int32(1), None)
    args = (jnp.zeros((2,), jnp.int32), jnp.ones((2,), bool))
    with pytest.raises(ValueError, match="unrolled layers"):
        model.decode_joining(*args, cache.per_layer(), joining)
    with pytest.raises(ValueError, match="per-layer KVCache"):
        unstack_layers(model).decode_joining(*args, cache, joining)


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


def test_per_layer_buffers_keep_keys_slots_innermost_and_values_slots_before_the_head_dim(rng):
    """The per-layer layouts the decode products read as plain matrices: keys [B, K, Dh, S], values [B, K, S, Dh];
    converting a filled stacked cache and back keeps every number, and a decode write lands in its slot."""
    config = dataclasses.replace(TINY, n_kv_heads=2, head_dim=8, n_layers=3)
    rows, slots = 3, 5
    stacked = KVCache.init(config, rows, slots)
    stacked = dataclasses.replace(
        stacked, keys=jnp.asarray(rng.standard_normal(stacked.keys.shape), jnp.float32),
        values=jnp.asarray(rng.standard_normal(stacked.values.shape), jnp.float32))
    wider = stacked.per_layer(slots + 2)
    for keys, values in zip(wider.keys, wider.values, strict=True):
        chex.assert_shape(keys, (rows, 2, 8, slots + 2))
        chex.assert_shape(values, (rows, 2, slots + 2, 8))
    # per_layer(n) pads empty slots at the end; stacked() undoes the layouts
    back = wider.stacked()
    np.testing.assert_array_equal(back.keys[:, :, :slots], stacked.keys)
    np.testing.assert_array_equal(back.values[:, :, :slots], stacked.values)
    np.testing.assert_array_equal(back.keys[:, :, slots:], 0)
    for layer in range(config.n_layers):  # buffer[b, k, d, s] / [b, k, s, d] is stacked[layer, b, s, k, d]
        np.testing.assert_array_equal(np.transpose(wider.keys[layer][..., :slots], (0, 3, 1, 2)), stacked.keys[layer])
        np.testing.assert_array_equal(np.transpose(wider.values[layer][:, :, :slots], (0, 2, 1, 3)),
                                      stacked.values[layer])

    new_keys = jnp.asarray(rng.standard_normal((rows, 1, 2, 8)), jnp.float32)
    new_values = jnp.asarray(rng.standard_normal((rows, 1, 2, 8)), jnp.float32)
    kv = dataclasses.replace(wider, index=jnp.asarray(slots, jnp.int32)).for_layers().at_layer(1)
    kv, keys_read, values_read = kv.append(new_keys, new_values)
    np.testing.assert_array_equal(kv.keys[1][..., slots], new_keys[:, 0])
    np.testing.assert_array_equal(kv.values[1][:, :, slots], new_values[:, 0])
    np.testing.assert_array_equal(keys_read[:, slots], new_keys[:, 0])  # what the attention reads: [B, S, K, Dh]
    np.testing.assert_array_equal(values_read[:, slots], new_values[:, 0])
    np.testing.assert_array_equal(kv.keys[0], wider.keys[0])  # other layers untouched


def test_a_joining_step_attends_as_cached_rows(rng, monkeypatch):
    """Both of a joining step's attentions (the decode step's rows and the joining prompt's) read the cache, so
    ``attention: auto`` keeps them on grouped attention (cuDNN is measured for training and scoring rows only)."""
    from jaxalign.models import llama

    seen = []
    attend = llama.Attention.attend

    def spy(self, *args, cached=False, **kwargs):
        seen.append((args[0].shape[1], cached))
        return attend(self, *args, cached=cached, **kwargs)

    monkeypatch.setattr(llama.Attention, "attend", spy)
    model = LlamaForCausalLM(TINY, rngs=nnx.Rngs(0))
    _, cache = model.hidden_states(jnp.asarray(rng.integers(0, V, size=(2, 6))), cache=KVCache.init(TINY, 2, 16))
    joining = Joining(jnp.asarray(rng.integers(0, V, size=(1, 4))), jnp.ones((1, 4), jnp.int32), jnp.int32(1), None)
    seen.clear()
    unstack_layers(model).decode_joining(jnp.asarray([3, 4]), jnp.asarray([True, False]), cache.per_layer(), joining)
    assert sorted(set(seen)) == [(1, True), (4, True)] and len(seen) == 2 * TINY.n_layers
