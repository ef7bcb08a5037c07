"""Model structure: stacked layout, scan (depth-independent program), remat, dtype policy, padding safety."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.models import KVCache, LlamaForCausalLM, load_hf
from tests.models.conftest import TINY, B, T, V, left_padded, right_padded


def test_layer_parameters_are_stacked():
    model = LlamaForCausalLM(TINY, rngs=nnx.Rngs(0))
    layers = model.model.layers
    chex.assert_shape(layers.self_attn.q_proj.kernel[...], (2, 32, 32))
    chex.assert_shape(layers.self_attn.k_proj.kernel[...], (2, 32, 16))
    chex.assert_shape(layers.mlp.down_proj.kernel[...], (2, 64, 32))
    chex.assert_shape(layers.input_layernorm.scale[...], (2, 32))
    chex.assert_shape(model.lm_head.kernel[...], (32, V))
    # Each layer draws its own initial weights.
    assert not np.allclose(layers.mlp.up_proj.kernel[0], layers.mlp.up_proj.kernel[1])


def _program_size(config):
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    tokens = jnp.zeros((B, T), jnp.int32)
    jaxpr = jax.make_jaxpr(jax.grad(lambda m: jnp.sum(m(tokens)[0])))(model)
    return len(str(jaxpr).splitlines())


@pytest.mark.parametrize("remat", ["none", "full"])
def test_traced_program_does_not_grow_with_depth(remat):
    shallow = dataclasses.replace(TINY, n_layers=2, remat=remat)
    deep = dataclasses.replace(TINY, n_layers=7, remat=remat)
    assert _program_size(shallow) == _program_size(deep)


def test_remat_policies_give_the_same_gradients(rng):
    tokens = jnp.asarray(rng.integers(0, V, size=(B, T)))
    reference = LlamaForCausalLM(TINY, rngs=nnx.Rngs(0))
    params = nnx.state(reference, nnx.Param)

    def grads(remat):
        model = LlamaForCausalLM(TINY.with_policy(remat=remat), rngs=nnx.Rngs(1))
        nnx.update(model, params)

        def loss(m):
            return jnp.sum(jax.nn.log_softmax(m(tokens)[0])[..., 0])

        # jax.checkpoint shows up as the remat primitive in the traced gradient, only when asked for.
        assert ("remat" in str(jax.make_jaxpr(nnx.grad(loss))(model))) == (remat != "none")
        return nnx.state(nnx.jit(nnx.grad(loss))(model), nnx.Param)

    expected = grads("none")
    for remat in ("full", "dots", "dots_no_batch"):
        chex.assert_trees_all_close(grads(remat), expected, atol=1e-5, rtol=1e-5)


def test_bf16_compute_keeps_float32_logits(hf_checkpoint, rng):
    tokens = jnp.asarray(rng.integers(0, V, size=(B, T)))
    full = load_hf(hf_checkpoint("llama"))
    half = load_hf(hf_checkpoint("llama"), compute_dtype="bfloat16")
    hidden, _ = half.hidden_states(tokens)
    assert hidden.dtype == jnp.bfloat16
    logits = half(tokens)[0]
    assert logits.dtype == jnp.float32
    reference = full(tokens)[0]
    # bf16 keeps ~3 significant digits through 2 layers; the two runs agree to that, not to float32.
    assert 0 < float(jnp.max(jnp.abs(logits - reference))) < 0.05 * float(jnp.max(jnp.abs(reference)))

    stored_bf16 = load_hf(hf_checkpoint("llama"), param_dtype="bfloat16", compute_dtype="bfloat16")
    assert {leaf.dtype for leaf in jax.tree.leaves(nnx.state(stored_bf16, nnx.Param))} == {jnp.dtype("bfloat16")}


def test_padding_never_produces_nan_in_logits_or_gradients(hf_checkpoint, rng):
    model = load_hf(hf_checkpoint("mistral_window"))
    tokens = jnp.asarray(rng.integers(0, V, size=(B, T)))
    mask = left_padded([7, 3, 0])  # the last row is entirely padding
    logits = model(tokens, attention_mask=jnp.asarray(mask))[0]
    assert np.isfinite(np.asarray(logits)).all()

    def loss(m):
        logps = jax.nn.log_softmax(m(tokens, attention_mask=jnp.asarray(mask))[0])[..., 1]
        return jnp.sum(jnp.where(mask > 0, logps, 0.0))

    grads = nnx.grad(loss)(model)
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(nnx.state(grads, nnx.Param)))


def test_out_of_range_token_ids_raise_eagerly_and_never_give_nan_under_jit(rng):
    model = LlamaForCausalLM(TINY, rngs=nnx.Rngs(0))
    tokens = rng.integers(0, V, size=(B, T))
    for bad_id in (V + 5, -1):
        bad = tokens.copy()
        bad[0, 3] = bad_id
        with pytest.raises(ValueError, match=rf"token id {bad_id} is out of range.*\[0, {V}\), vocab_size={V}"):
            model(jnp.asarray(bad))

    # Under jit nothing can raise: the id is clipped into the table, so every logit stays finite, the other
    # rows and the tokens before the bad one are untouched (a NaN value row would reach them through 0·NaN).
    forward = nnx.jit(lambda m, t, mask: m(t, attention_mask=mask)[0])
    ones = jnp.ones((B, T), jnp.int32)
    good = np.asarray(forward(model, jnp.asarray(tokens), ones))
    bad = tokens.copy()
    bad[0, 3] = V + 5
    got = np.asarray(forward(model, jnp.asarray(bad), ones))
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got[1:], good[1:])
    np.testing.assert_allclose(got[0, :3], good[0, :3], atol=1e-6, rtol=0)

    # Ids under attention_mask = 0 are padding: never checked, never change the real tokens' logits.
    mask = right_padded([7, 4, 2])
    padded = tokens.copy()
    padded[1, 5], padded[2, 6] = V + 100, -7
    np.testing.assert_allclose(model(jnp.asarray(padded), attention_mask=jnp.asarray(mask))[0][mask > 0],
                               model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))[0][mask > 0],
                               atol=1e-6, rtol=0)


def test_the_attention_policy_is_validated_and_not_part_of_the_architecture():
    with pytest.raises(ValueError, match="attention must be one of"):
        TINY.with_policy(attention="flash")
    with pytest.raises(ValueError, match="needs compute_dtype bfloat16"):
        TINY.with_policy(attention="cudnn")  # TINY computes in float32
    cudnn = TINY.with_policy(compute_dtype="bfloat16", attention="cudnn")
    assert TINY.attention == "auto" and cudnn.attention == "cudnn" and TINY.same_architecture(cudnn)


@pytest.mark.parametrize(("attention", "dtype", "head_dim", "cudnn_here", "new_tokens", "cached", "fused"), [
    ("auto", jnp.bfloat16, 8, True, 6, False, True),  # training and scoring rows where cuDNN runs
    ("auto", jnp.float16, 64, True, 6, False, True),
    ("auto", jnp.bfloat16, 8, True, 6, True, False),  # prefill into a cache: not measured through cuDNN
    ("auto", jnp.bfloat16, 8, True, 1, True, False),  # a decode step
    ("auto", jnp.float32, 8, True, 6, False, False),  # cuDNN has no float32 kernel
    ("auto", jnp.bfloat16, 12, True, 6, False, False),  # cuDNN takes head dims that are multiples of 8
    ("auto", jnp.bfloat16, 256, True, 6, False, False),  # ... up to 128 (256 on Hopper only)
    ("auto", jnp.bfloat16, 8, False, 6, False, False),  # a CPU, TPU, AMD or pre-Ampere GPU
    ("grouped", jnp.bfloat16, 8, True, 6, False, False),
    ("cudnn", jnp.bfloat16, 8, True, 6, True, True),  # asked for: prefill too
    ("cudnn", jnp.bfloat16, 8, True, 1, True, False),
])
def test_the_attention_policy_picks_the_kernel(monkeypatch, attention, dtype, head_dim, cudnn_here, new_tokens,
                                                cached, fused):
    from jaxalign.models import llama

    calls = []
    monkeypatch.setattr(llama, "cudnn_flash_attention_available", lambda: cudnn_here)
    monkeypatch.setattr(llama, "cudnn_attention", lambda *a, **kw: calls.append(1) or llama.grouped_attention(*a, **kw))
    compute = {jnp.float32: "float32", jnp.bfloat16: "bfloat16", jnp.float16: "float16"}[dtype]
    config = dataclasses.replace(TINY, head_dim=head_dim, compute_dtype=compute, attention=attention)
    layer = llama.Attention(config, rngs=nnx.Rngs(0))
    q = jnp.zeros((1, new_tokens, TINY.n_heads, head_dim), dtype)
    k = v = jnp.zeros((1, 9, TINY.n_kv_heads, head_dim), dtype)
    layer.attend(q, k, v, jnp.ones((1, new_tokens, 9), bool), cached=cached)
    assert bool(calls) == fused


def test_a_model_without_a_cache_attends_as_training_rows(monkeypatch):
    """The model passes ``cached`` through: a forward pass over rows takes cuDNN's kernel under ``auto`` on a
    GPU in bf16 (stood in for here), a prefill into a cache does not."""
    from jaxalign.models import llama

    calls = []
    monkeypatch.setattr(llama, "cudnn_flash_attention_available", lambda: True)
    monkeypatch.setattr(llama, "cudnn_attention", lambda *a, **kw: calls.append(1) or llama.grouped_attention(*a, **kw))
    model = LlamaForCausalLM(TINY.with_policy(compute_dtype="bfloat16"), rngs=nnx.Rngs(0))
    model(jnp.zeros((B, T), jnp.int32))
    assert len(calls) == 1  # traced once inside the scanned stack
    model(jnp.zeros((B, T), jnp.int32), cache=KVCache.init(model.config, B, T + 1))  # a prefill
    assert len(calls) == 1


def causal_row_masks(length: int) -> jax.Array:
    """``[4, length, length]`` masks as the model builds them: a full row, a right-padded one, two packed
    sequences, and a shared prompt (the first third) with two branches that do not see each other."""
    from jaxalign.models.masks import attention_mask

    slots = np.arange(length)
    valid = np.stack([slots >= 0, slots < 2 * length // 3, slots >= 0, slots >= 0])
    segments = np.stack([np.zeros(length), np.zeros(length), slots >= length // 2, np.zeros(length)]).astype(np.int32)
    branches = np.stack([np.zeros(length)] * 3 + [np.minimum(slots // -(-length // 3), 2)]).astype(np.int32)
    return attention_mask(jnp.asarray(valid), jnp.arange(length), query_segments=jnp.asarray(segments),
                          key_segments=jnp.asarray(segments), query_branches=jnp.asarray(branches),
                          key_branches=jnp.asarray(branches))


@pytest.mark.parametrize(("length", "block"), [(13, 4), (72, 48), (125, 48), (194, 48)])
def test_causal_block_attention_is_grouped_attention_over_causal_rows(rng, length, block):
    """Outputs and gradients of every query that sees a key equal grouped_attention's over the whole row (a
    padded query, which sees none, is finite and left out of the loss, as the model's loss masks leave it)."""
    from jaxalign.models import llama

    mask = causal_row_masks(length)
    sees = jnp.any(mask, axis=-1)[..., None]  # [4, T, 1]
    q = jnp.asarray(rng.standard_normal((4, length, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((4, length, 2, 8)), jnp.float32) for _ in range(2))

    def loss(attend):
        return lambda q, k, v: jnp.sum(jnp.where(sees, jnp.sin(attend(q, k, v)), 0.0))

    whole = functools.partial(llama.grouped_attention, mask=mask, scale=0.3)
    blocks = functools.partial(llama.causal_block_attention, mask=mask, scale=0.3, block=block)
    got, want = blocks(q, k, v), whole(q, k, v)
    assert np.isfinite(np.asarray(got)).all()
    chex.assert_trees_all_close(jnp.where(sees, got, 0.0), jnp.where(sees, want, 0.0), atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(jax.grad(loss(blocks), argnums=(0, 1, 2))(q, k, v),
                                jax.grad(loss(whole), argnums=(0, 1, 2))(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("length", "key_widths"), [(40, [40]), (72, [36, 72]), (194, [48, 97, 146, 194]),
                                                  (600, [150, 300, 450, 600])])
def test_causal_blocks_attend_to_the_keys_up_to_their_last_query(monkeypatch, length, key_widths):
    """About 48 queries a block, at most 4 blocks (compile time), each block over its prefix of the keys."""
    from jaxalign.models import llama

    widths = []
    whole = llama.grouped_attention
    monkeypatch.setattr(llama, "grouped_attention",
                        lambda q, k, *a, **kw: widths.append(k.shape[1]) or whole(q, k, *a, **kw))
    q = jnp.zeros((1, length, 4, 8))
    k = v = jnp.zeros((1, length, 2, 8))
    out = llama.causal_block_attention(q, k, v, jnp.tril(jnp.ones((1, length, length), bool)), scale=0.3)
    assert widths == key_widths and out.shape == (1, length, 32)
    with pytest.raises(ValueError, match="a row's own keys"):
        llama.causal_block_attention(q, jnp.zeros((1, length + 1, 2, 8)), jnp.zeros((1, length + 1, 2, 8)),
                                     jnp.ones((1, length, length + 1), bool), scale=0.3)


def test_a_model_attending_in_causal_blocks_gives_the_whole_rows_logits_and_gradients(rng, monkeypatch):
    """End to end through the model, blocks of 2 queries (4 blocks a row) against whole rows: padded, packed and
    shared-prompt rows give the same logits at real tokens and the same parameter gradients."""
    from jaxalign.models import llama

    length = 8
    tokens = jnp.asarray(rng.integers(0, V, size=(3, length)))
    mask = jnp.asarray(right_padded([length, 5, length], length))
    segments = jnp.asarray(np.stack([np.zeros(length), np.zeros(length), np.arange(length) >= 3]).astype(np.int32))
    branches = jnp.asarray(np.stack([np.zeros(length), np.zeros(length), np.zeros(length)]).astype(np.int32)
                           ).at[0, 3:].set(jnp.asarray([1, 1, 1, 2, 2]))
    model = LlamaForCausalLM(TINY, rngs=nnx.Rngs(0))

    def loss(m):
        logits = m(tokens, attention_mask=mask, segment_ids=segments, branch_ids=branches)[0]
        return jnp.sum(jnp.where(mask[..., None] > 0, jax.nn.log_softmax(logits), 0.0)[..., :5]), logits

    def run():
        (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        return np.asarray(logits)[np.asarray(mask) > 0], nnx.state(grads, nnx.Param)

    monkeypatch.setattr(llama, "CAUSAL_BLOCK", 2)
    blocks = run()
    monkeypatch.setattr(llama, "causal_block_attention", lambda *a, **kw: llama.grouped_attention(*a, **kw))
    whole = run()
    chex.assert_trees_all_close(blocks, whole, atol=1e-5, rtol=1e-5)


def test_rows_without_a_cache_attend_in_causal_blocks_on_a_cpu(monkeypatch):
    """The model's rows (no cache) take causal_block_attention on CPUs; a prefill into a cache, whose keys
    include the cache's slots, and a direct call that promises nothing take grouped_attention."""
    from jaxalign.models import llama

    calls = []
    monkeypatch.setattr(llama, "causal_block_attention",
                        lambda *a, **kw: calls.append(1) or llama.grouped_attention(*a, **kw))
    model = LlamaForCausalLM(TINY, rngs=nnx.Rngs(0))
    model(jnp.zeros((B, T), jnp.int32))
    assert len(calls) == (jax.default_backend() == "cpu")  # traced once inside the scanned stack
    model(jnp.zeros((B, T), jnp.int32), cache=KVCache.init(model.config, B, T + 1))
    q = jnp.zeros((1, T, TINY.n_heads, TINY.head_dim))
    k = v = jnp.zeros((1, T, TINY.n_kv_heads, TINY.head_dim))
    model.model.layers.self_attn.attend(q, k, v, jnp.ones((1, T, T), bool))
    assert len(calls) == (jax.default_backend() == "cpu")


def test_cudnn_flash_attention_is_available_on_the_gpus_we_test_on_only():
    """False on CPUs (CI); True on the H100/H200 where the GPU suite runs these tests."""
    from jaxalign.models.llama import cudnn_flash_attention_available

    assert cudnn_flash_attention_available() == (jax.default_backend() == "gpu")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention runs on NVIDIA GPUs only")
def test_cudnn_attention_matches_grouped_attention_on_a_gpu(rng):
    """Logits and gradients of a bf16 model, padded rows included, through cuDNN and through grouped_attention;
    a decode step (one query) runs grouped attention either way. Tolerances are bf16's (the products differ in
    accumulation order and cuDNN's probabilities are bf16)."""
    grouped = dataclasses.replace(TINY, head_dim=64, compute_dtype="bfloat16")  # cuDNN's head dims: 8k, <= 128
    tokens = jnp.asarray(rng.integers(0, V, size=(B, 2 * T)))
    mask = jnp.asarray(right_padded([2 * T, T, 0], 2 * T))  # the last row all padding: finite, unused
    models = {name: LlamaForCausalLM(grouped.with_policy(attention=name), rngs=nnx.Rngs(0))
              for name in ("grouped", "cudnn")}

    def loss(m):
        logps = jax.nn.log_softmax(m(tokens, attention_mask=mask)[0].astype(jnp.float32))
        return jnp.sum(jnp.where(mask[..., None] > 0, logps, 0.0)[..., :8])

    logits = {name: np.asarray(m(tokens, attention_mask=mask)[0], np.float32)[np.asarray(mask) > 0]
              for name, m in models.items()}
    np.testing.assert_allclose(logits["cudnn"], logits["grouped"], atol=3e-2, rtol=3e-2)
    assert all(np.isfinite(np.asarray(m(tokens, attention_mask=mask)[0], np.float32)).all() for m in models.values())
    grads = {name: nnx.state(nnx.grad(loss)(m), nnx.Param) for name, m in models.items()}
    for got, want in zip(jax.tree.leaves(grads["cudnn"]), jax.tree.leaves(grads["grouped"]), strict=True):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        assert np.linalg.norm(got - want) <= 2e-2 * np.linalg.norm(want) + 1e-6


def test_cudnn_attention_pads_odd_lengths_without_changing_the_result(rng, monkeypatch):
    """The padding to a multiple of 8 around cuDNN's kernel, checked on the CPU with XLA's kernel in its place:
    the same outputs and input gradients as grouped_attention for odd query and key counts (a cache's prefill)."""
    from jaxalign.models import llama

    library_call = jax.nn.dot_product_attention

    def xla_in_cudnns_place(q, k, v, *, implementation, **kwargs):
        assert q.shape[1] % 8 == 0 and k.shape[1] % 8 == 0, "cuDNN's backward with a bias takes even lengths"
        return library_call(q, k, v, implementation="xla", **kwargs)

    monkeypatch.setattr(llama.jax.nn, "dot_product_attention", xla_in_cudnns_place)
    q = jnp.asarray(rng.standard_normal((2, 5, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 11, 2, 8)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(rng.random((2, 5, 11)) < 0.7).at[:, :, 0].set(True)

    def loss(attend):
        return lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v, mask, scale=0.3)))

    chex.assert_trees_all_close(llama.cudnn_attention(q, k, v, mask, scale=0.3),
                                llama.grouped_attention(q, k, v, mask, scale=0.3), atol=1e-5)
    chex.assert_trees_all_close(jax.grad(loss(llama.cudnn_attention), argnums=(0, 1, 2))(q, k, v),
                                jax.grad(loss(llama.grouped_attention), argnums=(0, 1, 2))(q, k, v), atol=1e-5)
