"""Guided decoding, ``α·log π_base + Σ βᵢ·log π_guideᵢ``: its identities, traced weights, and its errors."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from jaxalign.models import LlamaForCausalLM
from jaxalign.rollout import Sampler, SamplingParams
from tests.rollout.conftest import PROMPTS, N, count_engine_compilations

PARAMS = SamplingParams(max_new_tokens=N, temperature=1.0, top_p=0.95, stop_token_ids=())


@pytest.fixture(scope="module")
def guided(llama, guide):
    return Sampler(llama[0], guides=[guide])


def _assert_same_draws(out, expected):
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
    np.testing.assert_allclose(np.asarray(out.sampling_logps), np.asarray(expected.sampling_logps), atol=1e-6)


def test_beta_zero_is_the_base_model(guided, sampler):
    for key in (jax.random.key(0), jax.random.key(1)):
        out = guided.generate(PROMPTS, key=key, params=PARAMS, alpha=1.0, betas=[0.0])
        base = sampler.generate(PROMPTS, key=key, params=PARAMS)
        _assert_same_draws(out, base)
        np.testing.assert_allclose(np.asarray(out.model_logps), np.asarray(base.model_logps), atol=1e-6)


def test_alpha_zero_with_one_guide_is_the_guide(guided, guide):
    alone = Sampler(guide)
    for key in (jax.random.key(0), jax.random.key(1)):
        out = guided.generate(PROMPTS, key=key, params=PARAMS, alpha=0.0, betas=[1.0])
        expected = alone.generate(PROMPTS, key=key, params=PARAMS)
        _assert_same_draws(out, expected)
        # Each model's own log-probabilities of the tokens come back too.
        np.testing.assert_allclose(np.asarray(out.guide_logps[0]), np.asarray(expected.model_logps), atol=1e-6)


def test_mixture_differs_from_both_and_weights_do_not_recompile(guided, sampler):
    guided.generate(PROMPTS, key=jax.random.key(2), params=PARAMS, alpha=1.0, betas=[0.0])
    with count_engine_compilations() as compiled:
        mixed = guided.generate(PROMPTS, key=jax.random.key(2), params=PARAMS, alpha=0.5, betas=[2.0])
        assert compiled == []
    base = sampler.generate(PROMPTS, key=jax.random.key(2), params=PARAMS)
    assert not np.array_equal(np.asarray(mixed.tokens), np.asarray(base.tokens))
    assert mixed.guide_logps.shape == (1, len(PROMPTS), N)


def test_guided_greedy_is_the_argmax_of_the_weighted_log_probs(guided, llama, guide):
    greedy = SamplingParams(max_new_tokens=N, temperature=0.0, stop_token_ids=())
    out = guided.generate(PROMPTS, key=jax.random.key(0), params=greedy, alpha=0.7, betas=[1.5])
    for row, prompt in enumerate(PROMPTS):
        prompt = np.asarray([prompt])
        scores = (0.7 * jax.nn.log_softmax(llama[0](prompt)[0][0, -1])
                  + 1.5 * jax.nn.log_softmax(guide(prompt)[0][0, -1]))
        assert int(out.tokens[row, 0]) == int(np.argmax(np.asarray(scores)))


def test_vocabularies_must_match(llama):
    config = dataclasses.replace(llama[0].config, vocab_size=101)
    other = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="guide 0 has a vocabulary of 101 tokens but the base model has 97"):
        Sampler(llama[0], guides=[other])


def test_one_weight_per_guide(guided, sampler):
    with pytest.raises(ValueError, match=r"1 guide model\(s\): pass betas= with one weight each"):
        guided.generate(PROMPTS, key=jax.random.key(0), params=PARAMS)
    with pytest.raises(ValueError, match=r"0 guide model\(s\)"):
        sampler.generate(PROMPTS, key=jax.random.key(0), params=PARAMS, betas=[1.0])
