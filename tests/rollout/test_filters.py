"""Top-k / top-p / min-p masks checked by hand and against a sort-based NumPy reference (transformers'
algorithm), the candidate fast path against the exact bisection, and the inverse-CDF sampler."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.rollout import Filters, filtered_logprobs, inverse_cdf, next_token, order_keys
from jaxalign.rollout.filters import top_candidates

filtered = jax.jit(filtered_logprobs, static_argnames="candidates")
draw = jax.jit(next_token, static_argnames="candidates")


def filters(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> Filters:
    return Filters(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), jnp.float32(min_p))


def kept(logits, candidates=64, **settings) -> list[int]:
    logps = np.asarray(filtered(jnp.asarray([logits], jnp.float32), filters(**settings), candidates=candidates))[0]
    return np.flatnonzero(np.isfinite(logps)).tolist()


PROBS = np.log([0.4, 0.3, 0.2, 0.1])


@pytest.mark.parametrize("candidates", [2, 64])  # 2: the exact bisection path; 64: the candidates suffice
def test_hand_checked_masks(candidates):
    check = functools.partial(kept, candidates=candidates)
    assert check([3.0, 1.0, 2.0, 5.0, 4.0], top_k=2) == [3, 4]
    assert check([1.0, 2.0, 2.0, 0.0], top_k=2) == [1, 2]  # ties with the k-th are kept (as transformers)
    assert check(PROBS, top_p=0.65) == [0, 1]  # mass before each token: 0, 0.4, 0.7, 0.9 -> keep < 0.65
    assert check(PROBS, top_p=0.75) == [0, 1, 2]
    assert check(PROBS, top_p=0.3) == [0]  # the top token is always kept
    assert check(PROBS, top_p=0.5) == [0, 1]
    assert check(PROBS, top_k=2, top_p=0.5) == [0]  # top-p after top-k: renormalised 4/7, 3/7
    assert check(PROBS, min_p=0.6) == [0, 1]  # p >= 0.6 * 0.4
    assert check(PROBS, min_p=0.8) == [0]
    assert check(PROBS, temperature=0.5, top_p=0.6) == [0, 1]  # sharpened: 16/30, 9/30, 4/30, 1/30
    assert check(PROBS, temperature=2.0, top_p=0.62) == [0, 1, 2]  # flattened: 0.33, 0.28, 0.23, 0.16
    assert check(PROBS) == [0, 1, 2, 3]


def test_kept_log_probs_are_renormalised_and_greedy_is_a_point_mass():
    logps = np.asarray(filtered(jnp.asarray([PROBS], jnp.float32), filters(top_p=0.75)))[0]
    np.testing.assert_allclose(np.exp(logps[:3]), np.array([0.4, 0.3, 0.2]) / 0.9, rtol=1e-6)
    greedy = np.asarray(filtered(jnp.asarray([[1.0, 3.0, 3.0, 0.0]]), filters(temperature=0.0)))[0]
    np.testing.assert_array_equal(greedy, [-np.inf, 0.0, -np.inf, -np.inf])  # the first maximum


def reference_mask(x, temperature, top_k, top_p, min_p) -> np.ndarray:
    """transformers' warpers in float64: temperature, top-k, top-p (keeping ties), min-p."""
    x = x.astype(np.float64) / temperature
    keep = np.ones(x.shape, bool)
    if top_k:
        keep &= x >= np.sort(x)[::-1][top_k - 1]
    if top_p < 1:
        z = np.where(keep, x, -np.inf)
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        mass_above = np.array([probs[probs > p].sum() for p in probs])
        keep &= mass_above < top_p
    if min_p:
        keep &= x >= x.max() + np.log(min_p)
    return keep


def test_random_settings_match_the_sort_based_reference():
    rng = np.random.default_rng(0)
    for trial in range(40):
        # Rounded scores make ties, the hard case for thresholds.
        x = np.round(rng.normal(size=(3, 97)) * rng.uniform(0.5, 4.0) * 4) / 4
        settings = dict(temperature=float(rng.choice([0.5, 1.0, 1.7])), top_k=int(rng.choice([0, 1, 5, 60, 96])),
                        top_p=float(rng.choice([1.0, 0.3, 0.9, 0.99])), min_p=float(rng.choice([0.0, 0.01, 0.2])))
        for candidates in (8, 97):
            logps = np.asarray(filtered(jnp.asarray(x, jnp.float32), filters(**settings), candidates=candidates))
            for row in range(3):
                expected = reference_mask(x[row].astype(np.float32), **settings)
                np.testing.assert_array_equal(np.isfinite(logps[row]), expected, err_msg=f"{trial} {settings}")


def test_order_keys_preserve_the_float_order():
    values = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, 7.5e10, np.inf], np.float32)
    keys = np.asarray(order_keys(jnp.asarray(values)))
    assert (np.diff(keys.astype(np.int64))[:3] > 0).all() and keys[3] == keys[4]  # -0.0 reads as +0.0
    assert (np.diff(keys.astype(np.int64))[4:] > 0).all()


def test_inverse_cdf_follows_the_weights_and_skips_zero_weights():
    weights = np.zeros((1, 300), np.float32)
    weights[0, [5, 130, 131, 299]] = [1.0, 2.0, 0.5, 0.5]  # across blocks of 128, zeros in between
    uniforms = (np.arange(4000) + 0.5) / 4000
    tokens, total = jax.jit(inverse_cdf)(jnp.broadcast_to(weights, (4000, 300)), jnp.asarray(uniforms, jnp.float32))
    counts = np.bincount(np.asarray(tokens), minlength=300)
    np.testing.assert_array_equal(counts[[5, 130, 131, 299]], [1000, 2000, 500, 500])
    assert counts.sum() == 4000 and float(total[0]) == 4.0
    edge, _ = inverse_cdf(jnp.asarray(weights), jnp.asarray([np.float32(1.0) - np.finfo(np.float32).eps]))
    assert int(edge[0]) == 299


def test_draws_follow_the_filtered_distribution():
    rng = np.random.default_rng(1)
    scores = jnp.asarray(rng.normal(size=(1, 300)) * 2, jnp.float32)
    settings = filters(temperature=0.8, top_p=0.9)
    expected = np.exp(np.asarray(filtered(scores, settings))[0])
    count = 100_000
    uniforms = jax.random.uniform(jax.random.key(0), (count,))
    tokens, logps = draw(jnp.broadcast_to(scores, (count, 300)), uniforms, settings, candidates=16)
    frequencies = np.bincount(np.asarray(tokens), minlength=300) / count
    assert frequencies[expected == 0].sum() == 0
    assert np.abs(frequencies - expected).max() < 5 * np.sqrt(expected.max() / count)
    np.testing.assert_allclose(np.asarray(logps), np.log(expected[np.asarray(tokens)]), atol=1e-5)


def test_greedy_rows_take_the_first_maximum_and_log_prob_zero():
    scores = jnp.asarray([[0.0, 2.0, 2.0, 1.0], [5.0, 0.0, 0.0, 0.0]])
    per_row = Filters(jnp.asarray([0.0, 1.0]), jnp.int32(0), jnp.float32(1.0), jnp.float32(0.0))
    tokens, logps = draw(scores, jnp.asarray([0.5, 0.0]), per_row)
    assert tokens.tolist() == [1, 0]
    assert float(logps[0]) == 0.0 and float(logps[1]) == pytest.approx(5.0 - np.log(np.exp(5.0) + 3.0), abs=1e-6)


def test_filters_match_transformers_logits_warpers():
    """The kept set and renormalised log-probs equal transformers' own temperature, top-k, top-p and min-p
    warpers, chained in generate's order (continuous scores: sorts break exact ties arbitrarily)."""
    import torch
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(2)
    for trial in range(30):
        x = (rng.normal(size=(3, 97)) * rng.uniform(0.5, 4.0)).astype(np.float32)
        temperature, top_k = float(rng.choice([0.5, 1.0, 1.7])), int(rng.choice([0, 1, 5, 60]))
        top_p, min_p = float(rng.choice([1.0, 0.3, 0.9])), float(rng.choice([0.0, 0.05, 0.2]))
        warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                                      + ([TopKLogitsWarper(top_k)] if top_k else [])
                                      + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
                                      + ([MinPLogitsWarper(min_p)] if min_p else []))
        expected = torch.log_softmax(warpers(None, torch.from_numpy(x)), -1).numpy()
        settings = filters(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        for candidates in (8, 64):
            logps = np.asarray(filtered(jnp.asarray(x), settings, candidates=candidates))
            np.testing.assert_array_equal(np.isfinite(logps), np.isfinite(expected), err_msg=f"trial {trial}")
            np.testing.assert_allclose(logps[np.isfinite(logps)], expected[np.isfinite(expected)], atol=1e-5)


@pytest.mark.parametrize("vocab", [49152, 5000])  # whole blocks; a ragged last block
def test_candidates_from_the_best_blocks_equal_a_top_k_over_the_vocabulary(vocab):
    rng = np.random.default_rng(3)
    # Rounded scores tie across blocks; -inf rows hold fewer finite scores than candidates.
    scores = np.round(rng.normal(size=(4, vocab)) * 3).astype(np.float32)
    scores[1] = rng.normal(size=vocab).astype(np.float32)
    scores[2, 40:] = -np.inf
    expected = jax.lax.top_k(jnp.asarray(scores), 64)
    found = jax.jit(top_candidates, static_argnums=1)(jnp.asarray(scores), 64)
    np.testing.assert_array_equal(np.asarray(found[0]), np.asarray(expected[0]))
    np.testing.assert_array_equal(np.asarray(found[1]), np.asarray(expected[1]))
