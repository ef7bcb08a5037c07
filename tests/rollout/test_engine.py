"""The compiled sampling loop on tiny random models: parity with transformers, log-probs equal to a training
forward pass, reproducibility, stopping, sample layout and bucketed shapes that do not recompile."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxalign.losses import token_logps
from jaxalign.models import load_hf
from jaxalign.models.scoring import target_logps
from jaxalign.rollout import Sampler, SamplingParams, filtered_logprobs
from tests.rollout.conftest import PROMPTS, N, V, count_engine_compilations

GREEDY = SamplingParams(max_new_tokens=N, temperature=0.0, stop_token_ids=())
SAMPLED = SamplingParams(max_new_tokens=N, temperature=0.8, top_k=40, top_p=0.9, min_p=0.02, stop_token_ids=())


def hf_greedy(hf_model, prompt: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """transformers' greedy tokens and the log-softmax of its logits at them, for one unpadded prompt."""
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                max_new_tokens=N, do_sample=False, eos_token_id=None, pad_token_id=0,
                                output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].numpy()
    logps = torch.stack([torch.log_softmax(step[0].float(), -1)[t] for step, t in zip(out.logits, tokens)])
    return tokens, logps.numpy()


def test_greedy_equals_transformers_llama(llama, sampler):
    _, hf_model = llama
    out = sampler.generate(PROMPTS, key=jax.random.key(0), params=GREEDY)
    for row, prompt in enumerate(PROMPTS):
        tokens, logps = hf_greedy(hf_model, prompt)
        np.testing.assert_array_equal(np.asarray(out.tokens[row]), tokens)
        np.testing.assert_allclose(np.asarray(out.model_logps[row]), logps, atol=1e-4)
    assert np.all(np.asarray(out.sampling_logps) == 0.0), "greedy draws from a point mass"


def test_greedy_equals_transformers_gpt2(checkpoints):
    directory, hf_model = checkpoints("gpt2")
    out = Sampler(load_hf(directory)).generate(PROMPTS, key=jax.random.key(0), params=GREEDY)
    for row, prompt in enumerate(PROMPTS):
        tokens, logps = hf_greedy(hf_model, prompt)
        np.testing.assert_array_equal(np.asarray(out.tokens[row]), tokens)
        np.testing.assert_allclose(np.asarray(out.model_logps[row]), logps, atol=1e-4)


def test_logps_equal_a_training_forward_pass(llama, sampler):
    model, _ = llama
    out = sampler.generate(PROMPTS, key=jax.random.key(1), params=SAMPLED)
    tokens, mask = out.sequences()
    logits, _ = model(tokens, attention_mask=mask)  # the training forward: whole sequences, no cache
    width = out.prompt_tokens.shape[1]
    predicting = logits[:, width - 1:-1]
    forward_logps = token_logps(predicting, out.tokens, out.response_mask)
    assert float(jnp.max(jnp.abs(forward_logps - out.model_logps))) <= 1e-5
    # The trainers' and evaluation's scorer (LM head in chunks) gives the same numbers.
    scored = target_logps(model, tokens, mask, chunk_size=3)[:, width - 1:]
    assert float(jnp.max(jnp.abs(jnp.where(out.response_mask, scored, 0.0) - out.model_logps))) <= 1e-5
    sampled_logps = filtered_logprobs(predicting, SAMPLED.filters())
    expected = jnp.take_along_axis(sampled_logps, out.tokens[..., None], axis=-1)[..., 0]
    assert float(jnp.max(jnp.abs(jnp.where(out.response_mask, expected, 0.0) - out.sampling_logps))) <= 1e-5
    # Filtering and temperature make the sampling distribution differ from the model's.
    assert float(jnp.max(jnp.abs(out.sampling_logps - out.model_logps))) > 1e-2


def test_hidden_states_equal_a_training_forward_pass(llama, sampler):
    model, _ = llama
    free = sampler.generate(PROMPTS, key=jax.random.key(2), params=SamplingParams(max_new_tokens=N, stop_token_ids=()))
    # Stop on tokens this key draws early in rows 0 and 1 (the same key draws the same tokens up to a stop).
    stops = (int(free.tokens[0, 3]), int(free.tokens[1, 2]))
    stopping = SamplingParams(max_new_tokens=N, stop_token_ids=stops)
    out = sampler.generate(PROMPTS, key=jax.random.key(2), params=stopping, return_hidden=True)
    assert not np.all(np.asarray(out.response_mask)), "some row should stop early"
    tokens, mask = out.sequences()
    hidden, _ = model.hidden_states(tokens, attention_mask=mask)
    width = out.prompt_tokens.shape[1]
    response = np.asarray(out.response_mask)
    kept = np.asarray(out.hidden_states)
    assert kept.shape == (len(PROMPTS), N, model.config.d_model)
    np.testing.assert_allclose(kept[response], np.asarray(hidden[:, width - 1:-1])[response], atol=1e-5)
    assert np.all(kept[~response] == 0.0)
    # The same tokens with or without the hidden states; without, none are returned.
    plain = sampler.generate(PROMPTS, key=jax.random.key(2), params=stopping)
    np.testing.assert_array_equal(np.asarray(plain.tokens), np.asarray(out.tokens))
    assert plain.hidden_states is None


def test_same_key_same_samples_other_key_others(sampler):
    first = sampler.generate(PROMPTS, key=jax.random.key(7), params=SAMPLED)
    again = sampler.generate(PROMPTS, key=jax.random.key(7), params=SAMPLED)
    other = sampler.generate(PROMPTS, key=jax.random.key(8), params=SAMPLED)
    np.testing.assert_array_equal(np.asarray(first.tokens), np.asarray(again.tokens))
    np.testing.assert_array_equal(np.asarray(first.sampling_logps), np.asarray(again.sampling_logps))
    assert not np.array_equal(np.asarray(first.tokens), np.asarray(other.tokens))


def test_temperature_zero_is_greedy_whatever_the_filters(sampler):
    greedy = sampler.generate(PROMPTS, key=jax.random.key(0), params=GREEDY)
    filtered = SamplingParams(max_new_tokens=N, temperature=0.0, top_k=3, top_p=0.5, min_p=0.3, stop_token_ids=())
    out = sampler.generate(PROMPTS, key=jax.random.key(5), params=filtered)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(greedy.tokens))


def test_rows_stop_at_their_first_stop_token(sampler):
    greedy = np.asarray(sampler.generate(PROMPTS, key=jax.random.key(0), params=GREEDY).tokens)
    stop = (int(greedy[0, 2]), int(greedy[1, 4]))  # a stop set: row 0 reaches it by step 2, row 1 by step 4
    out = sampler.generate(PROMPTS, key=jax.random.key(0),
                           params=SamplingParams(max_new_tokens=N, temperature=0.0, stop_token_ids=stop))
    tokens, mask = np.asarray(out.tokens), np.asarray(out.response_mask)
    for row in range(len(PROMPTS)):
        hits = np.flatnonzero(np.isin(greedy[row], stop))
        length = int(hits[0]) + 1 if hits.size else N
        assert int(out.lengths[row]) == length
        assert bool(out.stopped[row]) == bool(hits.size)
        np.testing.assert_array_equal(tokens[row, :length], greedy[row, :length])  # the stop token included
        assert mask[row, :length].all() and not mask[row, length:].any()
        assert (tokens[row, length:] == sampler.pad_token_id).all()
        assert (np.asarray(out.model_logps[row, length:]) == 0).all()
    assert int(out.lengths[0]) <= 3 and int(out.lengths[1]) <= 5


def test_max_new_tokens_without_a_stop(sampler):
    out = sampler.generate(PROMPTS, key=jax.random.key(3), params=SAMPLED)
    assert out.tokens.shape == (len(PROMPTS), N)
    np.testing.assert_array_equal(np.asarray(out.lengths), N)
    assert not np.asarray(out.stopped).any() and np.asarray(out.response_mask).all()


def test_eos_of_the_config_is_the_default_stop(sampler):
    eos = sampler.config.eos_token_ids
    assert eos == (2,)
    stopped_rows = 0
    for seed in range(20):  # hot sampling; some rows emit the EOS within N tokens
        out = sampler.generate(PROMPTS, key=jax.random.key(seed), params=SamplingParams(max_new_tokens=N,
                                                                                         temperature=3.0))
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        for row in range(len(PROMPTS)):
            assert bool(out.stopped[row]) == (int(tokens[row, lengths[row] - 1]) in eos)
            assert not np.isin(tokens[row, :lengths[row] - 1], eos).any()
            stopped_rows += int(out.stopped[row])
    assert stopped_rows > 0


def test_prompt_without_tokens_generates_nothing(sampler):
    tokens = np.zeros((2, 5), np.int32)
    mask = np.array([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    tokens[0, 2:] = PROMPTS[0]
    out = sampler.generate(tokens, mask, key=jax.random.key(0), params=GREEDY)
    assert int(out.lengths[1]) == 0 and not np.asarray(out.response_mask[1]).any()
    greedy = sampler.generate([PROMPTS[0]], key=jax.random.key(0), params=GREEDY)
    np.testing.assert_array_equal(np.asarray(out.tokens[0]), np.asarray(greedy.tokens[0]))


def test_n_samples_are_grouped_by_prompt(sampler):
    params = SamplingParams(max_new_tokens=N, temperature=1.0, n=3, stop_token_ids=())
    out = sampler.generate(PROMPTS, key=jax.random.key(4), params=params)
    assert out.tokens.shape == (3 * len(PROMPTS), N)
    prompts, tokens = np.asarray(out.prompt_tokens), np.asarray(out.tokens)
    for b in range(len(PROMPTS)):
        group = slice(3 * b, 3 * b + 3)
        assert (prompts[group] == prompts[3 * b]).all()
        assert len({tuple(t) for t in tokens[group]}) > 1, "samples of one prompt differ"
    # Sample j of prompt b depends on (key, b, j), not on n: the single sample is each group's first.
    single = sampler.generate(PROMPTS, key=jax.random.key(4), params=SamplingParams(
        max_new_tokens=N, temperature=1.0, stop_token_ids=()))
    np.testing.assert_array_equal(tokens[::3], np.asarray(single.tokens))


def test_n_samples_share_one_prefill_and_equal_a_training_forward_pass(llama, sampler):
    """Each prompt is prefilled once and its cache copied for its n samples: every sample's log-probs still equal
    a training forward pass over its own whole sequence (left-padded prompts of different lengths), and n greedy
    samples are the single greedy answer n times."""
    model, _ = llama
    out = sampler.generate(PROMPTS, key=jax.random.key(5), params=dataclasses.replace(SAMPLED, n=3))
    tokens, mask = out.sequences()
    logits, _ = model(tokens, attention_mask=mask)
    forward_logps = token_logps(logits[:, out.prompt_tokens.shape[1] - 1:-1], out.tokens, out.response_mask)
    assert float(jnp.max(jnp.abs(forward_logps - out.model_logps))) <= 1e-5
    single = sampler.generate(PROMPTS, key=jax.random.key(0), params=GREEDY)
    twice = sampler.generate(PROMPTS, key=jax.random.key(0), params=dataclasses.replace(GREEDY, n=2))
    for copy in (0, 1):
        np.testing.assert_array_equal(np.asarray(twice.tokens[copy::2]), np.asarray(single.tokens))
        np.testing.assert_allclose(np.asarray(twice.model_logps[copy::2]), np.asarray(single.model_logps), atol=1e-5)


def test_bucketed_shapes_do_not_recompile(sampler):
    rng = np.random.default_rng(0)
    sampler.generate(PROMPTS, key=jax.random.key(0), params=SAMPLED)  # compiled for [4 rows, 16 columns]
    with count_engine_compilations() as compiled:
        for batch, length in ((4, 12), (3, 16), (4, 1)):  # the same buckets; other keys and settings
            prompts = rng.integers(0, V, size=(batch, length))
            sampler.generate(prompts, key=jax.random.key(length), params=SamplingParams(
                max_new_tokens=N, temperature=0.5 + length / 10, top_p=0.95, stop_token_ids=(length,)))
        assert compiled == []
        sampler.generate(rng.integers(0, V, size=(3, 17)), key=jax.random.key(0), params=SAMPLED)
        assert len(compiled) == 1, "a prompt beyond the 16-column bucket compiles the 24-column program once"


def test_prompts_must_be_left_padded(sampler):
    with pytest.raises(ValueError, match="prompt row 1 is not left-padded"):
        sampler.generate(np.ones((2, 3), np.int32), np.array([[1, 1, 1], [1, 1, 0]]), key=jax.random.key(0))


def test_explicit_buckets_bound_the_prompt_length(llama):
    bounded = Sampler(llama[0], length_buckets=(4, 8))
    with pytest.raises(ValueError, match="prompt length 9 exceeds the largest bucket 8"):
        bounded.generate([list(range(9))], key=jax.random.key(0))


def test_positions_beyond_the_model_are_refused(checkpoints):
    directory, _ = checkpoints("gpt2")  # n_positions = 64
    with pytest.raises(ValueError, match="65 tokens, beyond the 64 positions"):
        Sampler(load_hf(directory)).generate([[1] * 60], key=jax.random.key(0), params=SamplingParams(max_new_tokens=5))


def test_stop_ids_outside_the_vocabulary_are_refused(sampler):
    with pytest.raises(ValueError, match=r"stop token id\(s\) \[97\] are outside the vocabulary of 97"):
        sampler.generate(PROMPTS, key=jax.random.key(0), params=SamplingParams(stop_token_ids=(97,)))



def test_a_lone_models_weight_divides_the_temperature(llama, sampler):
    """Without guides the score ``alpha·logits`` at temperature T is drawn as the logits at T / alpha: the same
    tokens; the model log-probabilities stay the model's own (a training forward pass's)."""
    model, _ = llama
    settings = dict(max_new_tokens=N, top_p=0.9, stop_token_ids=())
    halved = sampler.generate(PROMPTS, key=jax.random.key(3), params=SamplingParams(temperature=0.5, **settings))
    weighted = sampler.generate(PROMPTS, key=jax.random.key(3), params=SamplingParams(temperature=1.0, **settings),
                                alpha=2.0)
    np.testing.assert_array_equal(np.asarray(weighted.tokens), np.asarray(halved.tokens))
    np.testing.assert_array_equal(np.asarray(weighted.sampling_logps), np.asarray(halved.sampling_logps))
    tokens, mask = weighted.sequences()
    logits, _ = model(tokens, attention_mask=mask)
    forward = token_logps(logits[:, weighted.prompt_tokens.shape[1] - 1:-1], weighted.tokens, weighted.response_mask)
    assert float(jnp.max(jnp.abs(forward - weighted.model_logps))) <= 1e-5
    for alpha in (0.0, -1.0, 1e-50, float("inf")):  # 1e-50 is 0 in float32
        with pytest.raises(ValueError, match=f"alpha={alpha} without guide models must be a positive finite"):
            sampler.generate(PROMPTS, key=jax.random.key(3), params=SamplingParams(**settings), alpha=alpha)
