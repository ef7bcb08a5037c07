"""Guided decoding, ``α·log π_base + Σ βᵢ·log π_guideᵢ``: its identities, traced weights, and its errors; and
LLMDoctor's named preference dimensions on top (``GuidedSampler``: ``βᵢ = β·wᵢ``, doctor directories)."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxalign.models import CausalLMWithValueHead, LlamaForCausalLM, load_hf, save_doctor
from jaxalign.rollout import GuidedSampler, Sampler, SamplingParams
from tests.rollout.conftest import PROMPTS, N, count_engine_compilations
from tests.test_cli import tiny_tokenizer

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


# --- GuidedSampler: named preference dimensions (LLMDoctor) -------------------------------------------------


@pytest.fixture(scope="module")
def doctored(llama, guide):
    """The patient with one doctor for 'safety' (the engine program of ``guided`` above is reused)."""
    return GuidedSampler(llama[0], {"safety": guide})


def test_zero_weights_are_the_patient(doctored, sampler):
    key = jax.random.key(4)
    base = sampler.generate(PROMPTS, key=key, params=PARAMS)
    _assert_same_draws(doctored.generate(PROMPTS, key=key, params=PARAMS, preference_weights={"safety": 0.0}), base)
    _assert_same_draws(doctored.generate(PROMPTS, key=key, params=PARAMS, beta=0.0), base)
    _assert_same_draws(doctored.generate(PROMPTS, key=key, params=PARAMS, preference_weights={}), base)


def test_betas_are_beta_times_the_weights(llama, guide):
    two = GuidedSampler(llama[0], [("helpfulness", guide), ("safety", guide)], beta=0.5)
    assert two.dimensions == ("helpfulness", "safety")
    assert two.betas() == (0.5, 0.5), "no weights: every doctor weight 1"
    assert two.betas({"helpfulness": 0.8, "safety": 0.2}) == (0.4, 0.1)
    assert two.betas({"safety": 1.0}) == (0.0, 0.5), "an unnamed dimension gets 0"
    assert two.betas({"safety": 2}, beta=0.25) == (0.0, 0.5)


def test_a_doctor_equal_to_the_patient_at_half_and_half_is_the_patient(llama, sampler):
    # 0.5·logits + 0.5·logits is the patient's logits exactly (halving is exact in float32).
    same = GuidedSampler(llama[0], {"helpfulness": llama[0]}, alpha=0.5, beta=0.5)
    greedy = SamplingParams(max_new_tokens=N, temperature=0.0, stop_token_ids=())
    key = jax.random.key(5)
    out = same.generate(PROMPTS, key=key, params=greedy)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(sampler.generate(PROMPTS, key=key,
                                                                                      params=greedy).tokens))
    np.testing.assert_allclose(np.asarray(out.guide_logps[0]), np.asarray(out.model_logps), atol=1e-6)
    # Sampled, too: the scores are the patient's bit for bit.
    _assert_same_draws(same.generate(PROMPTS, key=key, params=PARAMS), sampler.generate(PROMPTS, key=key,
                                                                                        params=PARAMS))


def test_new_weights_take_effect_without_recompiling(doctored):
    key = jax.random.key(6)
    doctored.generate(PROMPTS, key=key, params=PARAMS)  # compiled (or reused) here
    with count_engine_compilations() as compiled:
        outs = [doctored.generate(PROMPTS, key=key, params=PARAMS, preference_weights=weights, alpha=alpha)
                for weights, alpha in (({"safety": 0.0}, 1.0), ({"safety": 4.0}, 1.0), ({"safety": 4.0}, 0.0))]
        assert compiled == [], "weights are traced: no new program"
    tokens = [np.asarray(out.tokens) for out in outs]
    assert not np.array_equal(tokens[0], tokens[1]) and not np.array_equal(tokens[1], tokens[2])


@pytest.mark.parametrize(("weights", "message"), [
    ({"helpfulness": 1.0}, "no doctor for the dimension(s) 'helpfulness'; the doctors' dimensions are 'safety'"),
    ({"safety": -0.1}, "the weight of 'safety' must be finite and >= 0, got -0.1"),
    ({"safety": float("nan")}, "the weight of 'safety' must be finite and >= 0, got nan"),
    ({"safety": float("inf")}, "must be finite and >= 0, got inf"),
    ({"safety": "1"}, "the weight of 'safety' must be a number, got '1'"),
    ({"safety": True}, "must be a number, got True"),
    ([0.5], "expected an object mapping preference dimensions to weights"),
])
def test_bad_weights_are_named(doctored, weights, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        doctored.generate(PROMPTS, key=jax.random.key(0), params=PARAMS, preference_weights=weights)


def test_bad_scales_and_flat_scores(doctored):
    with pytest.raises(ValueError, match=re.escape("alpha (the patient's weight) must be finite and >= 0")):
        doctored.generate(PROMPTS, key=jax.random.key(0), params=PARAMS, alpha=-1.0)
    with pytest.raises(ValueError, match=re.escape("beta (the doctors' weight) must be finite and >= 0, got nan")):
        doctored.generate(PROMPTS, key=jax.random.key(0), params=PARAMS, beta=float("nan"))
    with pytest.raises(ValueError, match="alpha and every doctor's weight beta·w are 0"):
        doctored.generate(PROMPTS, key=jax.random.key(0), params=PARAMS, alpha=0.0, preference_weights={})


def test_doctors_are_checked(llama, guide):
    with pytest.raises(ValueError, match="at least one doctor"):
        GuidedSampler(llama[0], {})
    with pytest.raises(ValueError, match="doctor 0 and doctor 1 are both doctors for the dimension 'safety'"):
        GuidedSampler(llama[0], [("safety", guide), ("safety", llama[0])])
    with pytest.raises(ValueError, match="preference dimension must be a non-empty string"):
        GuidedSampler(llama[0], [("", guide)])
    other = LlamaForCausalLM(dataclasses.replace(llama[0].config, vocab_size=101), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="doctor 'safety' has a vocabulary of 101 tokens but the patient has 97"):
        GuidedSampler(llama[0], {"safety": other})
    with pytest.raises(ValueError, match=re.escape("beta (the doctors' weight) must be finite and >= 0")):
        GuidedSampler(llama[0], {"safety": guide}, beta=-0.5)


# --- GuidedSampler.from_pretrained: doctor directories --------------------------------------------------------


@pytest.fixture(scope="module")
def directories(tmp_path_factory, checkpoints):
    """A patient checkpoint and doctors (tiny Llamas with the word-level tokenizer of tests/test_cli.py)."""
    root = tmp_path_factory.mktemp("guided")
    patient_dir, _ = checkpoints("llama")
    patient = root / "patient"
    shutil.copytree(patient_dir, patient)
    tiny_tokenizer().save_pretrained(patient)
    guide_dir, _ = checkpoints("llama_tied_3_layers", seed=1)

    def doctor(name: str, dimension: str, tokenizer) -> Path:
        lm = load_hf(guide_dir)
        return save_doctor(root / name, CausalLMWithValueHead(lm, rngs=nnx.Rngs(0)), tokenizer, dimension=dimension)

    swapped = tiny_tokenizer(swap=("sky", "blue"))  # same size, other ids: only the tokenizers tell
    return {"patient": patient, "safety": doctor("safe", "safety", tiny_tokenizer()),
            "helpfulness": doctor("helpful", "helpfulness", tiny_tokenizer()),
            "swapped": doctor("swapped", "honesty", swapped), "plain": patient}


def test_from_pretrained_loads_doctors(directories, guided):
    loaded = GuidedSampler.from_pretrained(directories["patient"], [directories["safety"], directories["helpfulness"]])
    assert loaded.dimensions == ("safety", "helpfulness") and loaded.tokenizer is not None
    assert loaded.doctor_sources == (f"doctor {directories['safety']}", f"doctor {directories['helpfulness']}")
    assert (loaded.alpha, loaded.beta) == (1.0, 0.5)
    assert loaded.sampler.pad_token_id == loaded.tokenizer.pad_token_id
    # Only the safety doctor: the same draws as the engine with that guide alone (same weights, other structure).
    greedy = SamplingParams(max_new_tokens=N, temperature=0.0, stop_token_ids=())
    out = loaded.generate(PROMPTS, key=jax.random.key(0), params=greedy, preference_weights={"safety": 1.0})
    expected = guided.generate(PROMPTS, key=jax.random.key(0), params=greedy, alpha=1.0, betas=[0.5])
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))


def test_from_pretrained_errors(directories):
    not_a_doctor = f"--doctor {directories['plain']} is not a doctor: it has no doctor.json"
    with pytest.raises(FileNotFoundError, match=re.escape(not_a_doctor)):
        GuidedSampler.from_pretrained(directories["patient"], [directories["plain"]], doctor_source="--doctor")
    with pytest.raises(ValueError, match="both doctors for the dimension 'safety'"):
        GuidedSampler.from_pretrained(directories["patient"], [directories["safety"], directories["safety"]])
    mismatch = (f"--model {directories['patient']} and doctor {directories['swapped']} do not share a tokenizer "
                "('blue' is 14 vs 13, 'sky' is 13 vs 14)")
    with pytest.raises(ValueError, match=re.escape(mismatch)):
        GuidedSampler.from_pretrained(directories["patient"], [directories["swapped"]], patient_source="--model")
