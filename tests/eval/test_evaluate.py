"""evaluate_policy on tiny random models: the policy against itself (same samples: KL ≈ 0, all ties) and against
another model (KL ≠ 0), the learned-reward path, the report's dict, table and plot."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from jaxalign.eval import PolicyEval, RewardModelJudge, evaluate_policy, proportion_ci, reference_logps, sequence_kl
from jaxalign.rollout import SamplingParams
from tests.eval.conftest import PROMPTS, TextJudge

PARAMS = SamplingParams(max_new_tokens=5, temperature=1.0)


def run(policy, reference, tokenizer, **kwargs) -> PolicyEval:
    options = dict(judge=TextJudge(), params=PARAMS, samples_per_prompt=2, key=jax.random.key(0), batch_size=2,
                   progress=False)
    return evaluate_policy(policy, reference, tokenizer, PROMPTS, **(options | kwargs))


def test_policy_against_an_identical_reference(policy, twin, tokenizer):
    """Two objects with the same weights, sampled separately with the same keys: the same responses, KL ≈ 0."""
    result = run(policy, twin, tokenizer)
    assert result.prompts == 3 and result.samples_per_prompt == 2 and len(result.records) == 6
    assert [(r["index"], r["sample"]) for r in result.records] == [(i, j) for i in range(3) for j in range(2)]
    assert all(r["policy"] == r["reference"] for r in result.records)
    assert len({r["policy"] for r in result.records}) > 1, "different prompts and samples give different texts"
    assert np.all(np.abs(result.kl) < 1e-4) and np.all(np.abs(result.kl_k3) < 1e-4)
    rate = result.win_rate
    assert (rate.rate, rate.ties, rate.n) == (0.5, 6, 6)
    np.testing.assert_array_equal(result.length_policy, result.length_reference)


def test_policy_against_another_model(policy, other, tokenizer, reward_model):
    """A different reference: KL ≠ 0 and equal to the reference's log-probs of the policy's tokens; the
    learned reward of a tokenizer-less reward judge comes from the sampled tokens."""
    judge = RewardModelJudge(reward_model, batch_size=4)
    result = run(policy, other, tokenizer, reward_judge=judge)
    assert np.mean(np.abs(result.kl)) > 1e-2 and np.all(result.kl_k3 >= 0) and np.mean(result.kl_k3) > 1e-3
    assert any(r["policy"] != r["reference"] for r in result.records)
    # the same KL computed by hand from a fresh sample of the first batch (2 prompts x 2 samples, same key)
    from jaxalign import data
    from jaxalign.rollout import Sampler

    encoded = data.tokenize([data.PromptRecord([data.Message("user", p)]) for p in PROMPTS], tokenizer,
                            progress=False)
    length = max(len(e.sequences[0]) for e in encoded.examples)
    batch = data.collate(encoded, [0, 1], length)
    params = SamplingParams(max_new_tokens=5, temperature=1.0, n=2, stop_token_ids=(tokenizer.eos_token_id,))
    rollout = Sampler(policy, pad_token_id=tokenizer.pad_token_id).generate(
        batch["input_ids"], batch["attention_mask"], key=jax.random.fold_in(jax.random.key(0), 0), params=params)
    kl = np.asarray(sequence_kl(rollout.model_logps, reference_logps(other, rollout), rollout.response_mask))
    np.testing.assert_allclose(result.kl[:4], kl, atol=1e-5)
    learned = judge.score_rollout(rollout)
    np.testing.assert_allclose(result.learned_policy[:4], learned, rtol=1e-5, atol=1e-5)
    assert result.learned_win_rate is not None and result.learned_win_rate.n == 6
    assert {"learned_policy", "learned_reference"} <= set(result.records[0])


def test_report_dict_table_and_plot(policy, other, tokenizer, tmp_path):
    result = run(policy, other, tokenizer, num_samples=2)
    summary = result.to_dict()
    json.dumps(summary)  # plain values only
    assert summary["responses"] == 6 and summary["win_rate"] == result.win_rate.to_dict()
    assert summary["kl"]["mean"] == pytest.approx(float(np.mean(result.kl)))
    assert summary["gold_reward"]["policy"]["mean"] == pytest.approx(float(np.mean(result.gold_policy)))
    assert summary["learned_reward"] is None and summary["learned_win_rate"] is None
    table = result.table()
    lines = table.splitlines()
    assert lines[0].startswith("metric") and "reference" in lines[0]
    assert any(line.startswith("win rate vs reference (crc)") and f"of {result.win_rate.n})" in line for line in lines)
    assert any(line.startswith("KL(policy || reference), k1") for line in lines)
    assert len(result.samples) == 2 and result.samples[0] == result.records[0]
    # A fraction's interval is Wilson's (inside [0, 1], where a t interval went below 0), counting prompts: both
    # samples of one prompt stopped, which is worth one observation, not two.
    flags = np.isin(np.arange(6), [2, 3])
    stopped = dataclasses.replace(result, stopped_policy=flags).to_dict()["stopped"]["policy"]
    expected = proportion_ci(flags, clusters=result.prompt_of_row)
    assert result.prompts == 3 and expected.low < proportion_ci(flags).low
    assert stopped["mean"] == pytest.approx(1 / 3) and 0.0 < stopped["low"] < 1 / 3 < stopped["high"] < 1.0
    assert (stopped["low"], stopped["high"]) == pytest.approx((expected.low, expected.high))
    path = result.plot(tmp_path / "plots" / "eval.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_same_object_is_sampled_once(policy, tokenizer):
    result = run(policy, policy, tokenizer)
    assert result.win_rate.ties == 6 and np.all(np.abs(result.kl) < 1e-4)
    assert all(r["policy"] == r["reference"] for r in result.records)


def test_bad_settings(policy, other, tokenizer):
    with pytest.raises(ValueError, match="no prompts"):
        evaluate_policy(policy, other, tokenizer, [], judge=TextJudge(), key=jax.random.key(0))
    with pytest.raises(ValueError, match="params.n is 3 but samples_per_prompt is 2"):
        run(policy, other, tokenizer, params=SamplingParams(max_new_tokens=5, n=3))
    with pytest.raises(ValueError, match="batch_size"):
        run(policy, other, tokenizer, batch_size=0)
    with pytest.raises(ValueError, match="raw=True encodes text prompts only"):
        evaluate_policy(policy, other, tokenizer, [[{"role": "user", "content": "Hi"}]], judge=TextJudge(),
                        key=jax.random.key(0), raw=True, progress=False)
