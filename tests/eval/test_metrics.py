"""KL on the policy's samples, perplexity and reward-model accuracy against NumPy computations on tiny models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import data
from jaxalign.eval import perplexity, reference_logps, reward_accuracy, sequence_kl, token_nll
from jaxalign.rollout import Sampler, SamplingParams
from tests.eval.conftest import lm_logits, log_softmax, plain_rewards

R, N = 5, 7


def test_sequence_kl_equals_numpy():
    rng = np.random.default_rng(0)
    logps, ref = -rng.exponential(size=(R, N)), -rng.exponential(size=(R, N))
    mask = rng.random((R, N)) < 0.7
    mask[2] = False  # an empty response has KL 0
    ref_poisoned = np.where(mask, ref, np.nan)  # masked slots never reach the sum
    k1 = np.asarray(sequence_kl(jnp.asarray(logps), jnp.asarray(ref_poisoned), jnp.asarray(mask)))
    np.testing.assert_allclose(k1, np.sum(np.where(mask, logps - ref, 0.0), axis=1), rtol=1e-5, atol=1e-6)
    assert k1[2] == 0.0
    k3 = np.asarray(sequence_kl(logps, ref, mask, estimator="k3"))
    log_ratio = ref - logps  # log(π_ref/π)
    np.testing.assert_allclose(k3, np.sum(np.where(mask, np.exp(log_ratio) - 1 - log_ratio, 0.0), axis=1),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(sequence_kl(logps, logps, mask)), np.zeros(R))
    with pytest.raises(ValueError, match="unknown estimator"):
        sequence_kl(logps, ref, mask, estimator="k9")


@pytest.fixture(scope="module")
def rollout(policy):
    prompts = [[5, 9, 17], [30, 8, 7, 21, 2, 60, 11], [44], [12, 13]]
    return Sampler(policy).generate(prompts, key=jax.random.key(1),
                                    params=SamplingParams(max_new_tokens=N, stop_token_ids=tuple(range(0, 97, 4))))


def test_reference_logps_equal_numpy_log_softmax(rollout, other):
    """batch_size 3 over 4 rows: the last batch is padded, and the rows still come out in order."""
    got = np.asarray(reference_logps(other, rollout, batch_size=3, chunk_size=4))
    tokens, prompt_mask = np.asarray(rollout.tokens), np.asarray(rollout.prompt_mask)
    response_mask = np.asarray(rollout.response_mask)
    assert response_mask.sum() > 4 and not response_mask.all()  # some rows stopped early
    lengths = response_mask.sum(axis=1)
    prompts = [np.asarray(rollout.prompt_tokens)[row][prompt_mask[row]] for row in range(tokens.shape[0])]
    sequences = [np.r_[prompt, tokens[row, :lengths[row]]] for row, prompt in enumerate(prompts)]
    for row, logits in enumerate(lm_logits(other, sequences)):
        length = lengths[row]
        expected = log_softmax(logits)[len(prompts[row]) - 1 + np.arange(length), tokens[row, :length]]
        np.testing.assert_allclose(got[row, :length], expected, atol=2e-5)
        assert np.all(got[row, length:] == 0.0)


def test_reference_logps_of_the_sampler_are_its_model_logps(rollout, policy, twin):
    for model in (policy, twin):
        got = np.asarray(reference_logps(model, rollout))
        np.testing.assert_allclose(got, np.asarray(rollout.model_logps), atol=2e-5)
        kl = np.asarray(sequence_kl(rollout.model_logps, got, rollout.response_mask))
        assert np.all(np.abs(kl) < 1e-4)


def sft_dataset(tokenizer):
    records = [data.SFTRecord([{"role": "user", "content": p}], [{"role": "assistant", "content": c}])
               for p, c in [("Hi", "sky blue ."), ("Go away .", "Hi ?"), ("sky ?", "blue blue sky ."),
                            ("Hi Hi", "Go .")]]
    return data.tokenize(records, tokenizer, progress=False)


def numpy_nll(model, dataset) -> tuple[float, int]:
    sequences = [example.sequences[0] for example in dataset.examples]
    total, count = 0.0, 0
    for sequence, logits in zip(sequences, lm_logits(model, [s.ids for s in sequences])):
        ids = np.asarray(sequence.ids)
        targets = np.arange(max(sequence.prompt_length, 1), len(ids))
        total -= log_softmax(logits)[targets - 1, ids[targets]].sum()
        count += len(targets)
    return total, count


def test_perplexity_equals_exp_mean_nll(policy, tokenizer):
    dataset = sft_dataset(tokenizer)
    total, count = numpy_nll(policy, dataset)
    # 4 examples in batches of 3: the second batch has 2 padding rows (example_mask 0)
    batches = list(data.BatchIterator(dataset, batch_size=3, shuffle=False, drop_last=False, num_epochs=1))
    assert len(batches) == 2 and batches[1]["example_mask"].tolist() == [1, 0, 0]
    got_total, got_count = token_nll(policy, batches, chunk_size=3)
    assert got_count == count
    assert got_total == pytest.approx(total, rel=1e-5)
    assert perplexity(policy, batches) == pytest.approx(np.exp(total / count), rel=1e-5)  # unchunked


def test_perplexity_of_packed_batches_equals_unpacked(policy, tokenizer):
    dataset = sft_dataset(tokenizer)
    total, count = numpy_nll(policy, dataset)
    packed = list(data.BatchIterator(dataset, batch_size=2, shuffle=False, drop_last=False, num_epochs=1,
                                     pack_length=48))
    assert "segment_ids" in packed[0] and packed[0]["segment_ids"].max() > 1
    assert perplexity(policy, packed) == pytest.approx(np.exp(total / count), rel=1e-5)


def test_perplexity_errors(policy, tokenizer):
    batch = data.collate(sft_dataset(tokenizer), [0, 1], 24)
    with pytest.raises(ValueError, match=r"lacks \['loss_mask'\]"):
        perplexity(policy, [{k: v for k, v in batch.items() if k != "loss_mask"}])
    with pytest.raises(ValueError, match="no completion tokens"):
        perplexity(policy, [dict(batch, loss_mask=np.zeros_like(batch["loss_mask"]))])
    pairs = {k: np.stack([v, v], axis=1) if v.ndim == 2 else v for k, v in batch.items()}
    with pytest.raises(ValueError, match=r"must be \[B, T\]"):
        perplexity(policy, [pairs])


PAIRS = [("Hi", "sky blue .", "Go away .", 2.0), ("sky ?", "blue", "Go", 0.5), ("Go away .", "Hi", "away away", 3.0),
         ("Hi ?", "blue sky", "sky", 0.1), ("blue", "Hi Hi .", "Go Go", 1.5)]


def test_reward_accuracy_equals_numpy_count(tokenizer, reward_model):
    model = reward_model
    records = [data.PreferenceRecord([{"role": "user", "content": p}], [{"role": "assistant", "content": c}],
                                     [{"role": "assistant", "content": r}], margin=m) for p, c, r, m in PAIRS]
    dataset = data.tokenize(records, tokenizer, progress=False)
    rewards = plain_rewards(model, [s.ids for e in dataset.examples for s in e.sequences]).reshape(-1, 2)
    correct = rewards[:, 0] > rewards[:, 1]
    margins = np.asarray([m for *_, m in PAIRS])
    assert 0 < correct.sum() < len(PAIRS) and 0 < correct[margins > 1.0].sum() <= (margins > 1.0).sum()
    batches = data.BatchIterator(dataset, batch_size=2, shuffle=False, drop_last=False, num_epochs=1)
    result = reward_accuracy(model, batches, min_margin=1.0)
    assert result["pairs"] == 5 and result["correct"] == int(correct.sum())
    assert result["accuracy"] == pytest.approx(correct.mean())
    assert result["min_margin"] == 1.0
    assert result["above_margin"]["pairs"] == 3
    assert result["above_margin"]["correct"] == int(correct[margins > 1.0].sum())
    assert result["ties"] == 0


def test_reward_accuracy_per_dimension(tokenizer, multi_reward_model):
    """Group batches [B, D, 2, T]: a 2-objective head reads objective d for dimension d; a missing pair
    (pair_mask 0) is not counted."""
    model = multi_reward_model
    groups = []
    for index, (p, c, r, m) in enumerate(PAIRS):
        prompt = [{"role": "user", "content": p}]
        pairs = [data.PreferenceRecord(prompt, [{"role": "assistant", "content": c}],
                                       [{"role": "assistant", "content": r}], margin=m, dimension="helpful")]
        if index != 1:  # prompt 1 has no "safe" pair
            pairs.append(data.PreferenceRecord(prompt, [{"role": "assistant", "content": r}],
                                               [{"role": "assistant", "content": c}], margin=m / 2, dimension="safe"))
        groups.append(data.PreferenceGroup(pairs))
    dataset = data.tokenize(groups, tokenizer, progress=False)
    assert dataset.dimensions == ("helpful", "safe")
    present = [s for e in dataset.examples for s in e.sequences if s is not None]
    rewards = iter(plain_rewards(model, [s.ids for s in present]))
    expected = {name: [] for name in dataset.dimensions}
    for example, (*_, m) in zip(dataset.examples, PAIRS):
        for d, name in enumerate(dataset.dimensions):
            if example.sequences[2 * d] is not None:
                chosen, rejected = next(rewards), next(rewards)
                expected[name].append((chosen[d] > rejected[d], m / (1 + d)))
    batches = data.BatchIterator(dataset, batch_size=3, shuffle=False, drop_last=False, num_epochs=1)
    result = reward_accuracy(model, batches, min_margin=1.0, dimensions=dataset.dimensions)
    assert result["pairs"] == 9
    for name, hits in expected.items():
        entry = result["dimensions"][name]
        assert entry["pairs"] == len(hits) and entry["correct"] == sum(h for h, _ in hits)
        assert entry["above_margin"]["pairs"] == sum(m > 1.0 for _, m in hits)
        assert entry["above_margin"]["correct"] == sum(h for h, m in hits if m > 1.0)
    assert result["correct"] == sum(h for hits in expected.values() for h, _ in hits)


def test_reward_accuracy_errors(tokenizer, reward_model, multi_reward_model):
    records = [data.PreferenceRecord(p, " " + c, " " + r) for p, c, r, _ in PAIRS]
    dataset = data.tokenize(records, tokenizer, progress=False)
    batches = list(data.BatchIterator(dataset, batch_size=5, shuffle=False, num_epochs=1))
    assert reward_accuracy(reward_model, batches)["pairs"] == 5
    with pytest.raises(ValueError, match="has no 'margin'"):
        reward_accuracy(reward_model, batches, min_margin=0.0)
    with pytest.raises(ValueError, match="no valid pairs"):
        reward_accuracy(reward_model, [dict(batches[0], example_mask=np.zeros(5, np.int32))])
    flat = {k: v[:, 0] if v.ndim == 3 else v for k, v in batches[0].items()}
    with pytest.raises(ValueError, match=r"\[B, 2, T\]"):
        reward_accuracy(reward_model, [flat])
    with pytest.raises(ValueError, match="2 objectives scores group batches"):
        reward_accuracy(multi_reward_model, batches)
    with pytest.raises(TypeError, match="RewardModel"):
        reward_accuracy(object(), batches)
