"""The shared scorer: chunked LM-head log-probs (and entropies, at a temperature) equal one plain forward
pass in values and gradients, for chunk sizes that divide the sequence and ones that do not."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign import losses
from jaxalign.models import LlamaForCausalLM
from jaxalign.models.scoring import head_logps, map_position_chunks, target_logps
from tests.models.conftest import TINY

B, T = 3, 11


@pytest.fixture(scope="module")
def model():
    return LlamaForCausalLM(TINY, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, T + 1, size=B)
    attention = (np.arange(T) < lengths[:, None]).astype(np.int32)
    return {"input_ids": rng.integers(0, TINY.vocab_size, (B, T)).astype(np.int32) * attention,
            "attention_mask": attention,
            "positions": np.cumsum(attention, -1).astype(np.int32) * attention - attention,
            "loss_mask": attention * (np.arange(T) >= 3)}


@pytest.mark.parametrize("chunk", [1, 3, 4, 128])
def test_chunked_target_logps_equal_plain(model, batch, chunk):
    args = (batch["input_ids"], batch["attention_mask"], batch["positions"])

    def total(model, chunk_size):
        return jnp.sum(target_logps(model, *args, chunk_size=chunk_size) * batch["loss_mask"][:, 1:])

    logits, _ = model(batch["input_ids"], attention_mask=batch["attention_mask"], positions=batch["positions"])
    expected = losses.token_logps(logits[:, :-1], batch["input_ids"][:, 1:])
    np.testing.assert_allclose(target_logps(model, *args, chunk_size=chunk), expected, atol=1e-5)
    plain = nnx.grad(lambda m: total(m, None))(model)
    chunked = nnx.grad(lambda m: total(m, chunk))(model)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), nnx.state(plain), nnx.state(chunked))


@pytest.mark.parametrize("chunk", [3, None])
def test_head_logps_at_a_temperature_with_entropy(model, batch, chunk):
    temperature = 0.7
    hidden, _ = model.hidden_states(batch["input_ids"], attention_mask=batch["attention_mask"],
                                    positions=batch["positions"])
    targets = batch["input_ids"][:, 1:]
    logps, entropies = head_logps(model, hidden[:, :-1], targets, chunk_size=chunk, temperature=temperature,
                                  with_entropy=True)
    log_probs = jax.nn.log_softmax(model.logits(hidden[:, :-1]) / temperature, axis=-1)
    np.testing.assert_allclose(logps, jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0], atol=1e-5)
    np.testing.assert_allclose(entropies, -jnp.sum(jnp.exp(log_probs) * log_probs, -1), atol=1e-5)
    assert logps.shape == entropies.shape == targets.shape


def test_the_models_log_softmax_is_the_losses_one():
    """models.scoring spells the float32 log-softmax at the targets itself (models import nothing of
    jaxalign); it must stay the formula of losses.token_logps / losses.entropy, bf16 and -inf entries included."""
    from jaxalign.models import scoring

    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(4, 7, 50)) * 8, jnp.float32).at[0, 0, 5].set(-jnp.inf)
    targets = jnp.asarray(rng.integers(0, 50, (4, 7)), jnp.int32)
    for dtype in (jnp.float32, jnp.bfloat16):
        z = logits.astype(dtype)
        np.testing.assert_array_equal(scoring.token_logps(z, targets), losses.token_logps(z, targets))
        np.testing.assert_array_equal(scoring.entropy(z), losses.entropy(z))
    grads = [jax.grad(lambda z, f=f: jnp.sum(f(z, targets[1:])))(logits[1:]) for f in (scoring.token_logps,
                                                                                       losses.token_logps)]
    np.testing.assert_array_equal(*grads)


@pytest.mark.parametrize("chunk", [1, 4, 7, None])
def test_map_position_chunks_equals_one_call_in_values_and_gradients(chunk):
    """The chunk walker alone: a pytree of outputs, arrays of 2 and 3 dimensions, a length no chunk divides."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 9, 5)), jnp.float32)
    mask = jnp.asarray(rng.random((2, 9)) > 0.3)
    weight = jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)

    def fn(w, xs, ms):
        h = jnp.tanh(xs @ w)
        return {"sum": jnp.where(ms, h.sum(-1), 0.0), "h": h}

    def total(w, chunk_size):
        out = map_position_chunks(fn, w, (x, mask), chunk_size=chunk_size)
        return jnp.sum(out["sum"]) + jnp.sum(out["h"] ** 2), out

    (value, out), grad = jax.value_and_grad(total, has_aux=True)(weight, chunk)
    (expected_value, expected), expected_grad = jax.value_and_grad(total, has_aux=True)(weight, None)
    assert out["sum"].shape == (2, 9) and out["h"].shape == (2, 9, 6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), out, expected)
    np.testing.assert_allclose(value, expected_value, rtol=1e-6)
    # Each weight's gradient sums 18 positions' terms, in another order per chunking: an entry where they cancel
    # (0.0214, among entries up to 4) keeps the rounding of its larger terms (1.5e-6 apart at the suite's LLVM level 0).
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-5)
