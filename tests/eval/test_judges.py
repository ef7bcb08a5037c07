"""The VADER gold judge and the reward-model judge (token arrays, rollouts, texts rendered like jaxalign.data)."""

from __future__ import annotations

import builtins
import copy

import numpy as np
import pytest

from jaxalign import data
from jaxalign.eval import ConcisenessJudge, Judge, RewardModelJudge, VaderJudge, end_of_turn_ids
from jaxalign.rollout import Rollout
from tests.eval.conftest import plain_rewards


def test_vader_orders_sentiment():
    judge = VaderJudge()
    assert isinstance(judge, Judge)
    scores = judge.score(["a", "b", "c", "d"], ["What a wonderful, lovely day!", "The table is brown.",
                                                "This is terrible and I hate it.", ""])
    assert scores.shape == (4,) and scores.dtype == np.float64
    assert scores[0] > 0.5 and scores[2] < -0.5 and scores[1] == 0.0 and scores[3] == 0.0
    with pytest.raises(ValueError, match="2 prompts and 1 responses"):
        judge.score(["a", "b"], ["good"])


def test_conciseness_scores_by_word_count():
    judge = ConcisenessJudge(scale=4)
    assert isinstance(judge, Judge)
    scores = judge.score(["a"] * 4, ["", "Fine.", "It was a good  day\nindeed.", "one two three four"])
    # 1 / (1 + words / 4): 0, 1, 6 and 4 words
    np.testing.assert_allclose(scores, [1.0, 0.8, 0.4, 0.5])
    assert scores.dtype == np.float64
    with pytest.raises(ValueError, match="2 prompts and 1 responses"):
        judge.score(["a", "b"], ["short"])
    with pytest.raises(ValueError, match="scale"):
        ConcisenessJudge(scale=0)


def test_vader_missing_package_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_vader(name, *args, **kwargs):
        if name.startswith("vaderSentiment"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vader)
    with pytest.raises(ImportError, match="pip install vadersentiment"):
        VaderJudge()


ROWS = [[5, 9, 17], [30, 8, 7, 21, 2], [44], [12, 13, 14, 15, 16, 17], [3, 4]]


def right_padded(rows, length=8):
    tokens, mask = np.zeros((len(rows), length), np.int32), np.zeros((len(rows), length), np.int32)
    for index, row in enumerate(rows):
        tokens[index, :len(row)], mask[index, :len(row)] = row, 1
    return tokens, mask


def test_score_tokens_batches_pads_and_applies_gain_and_bias(reward_model):
    expected = plain_rewards(reward_model, ROWS)
    judge = RewardModelJudge(reward_model, gain=2.0, bias=-1.0, batch_size=2)  # 5 rows: 3 batches, the last padded
    np.testing.assert_allclose(judge.score_tokens(*right_padded(ROWS)), 2.0 * expected - 1.0, rtol=1e-5, atol=1e-5)
    # left padding reads the same last token
    tokens, mask = right_padded(ROWS)
    left_tokens, left_mask = np.zeros_like(tokens), np.zeros_like(mask)
    for index, row in enumerate(ROWS):
        left_tokens[index, 8 - len(row):], left_mask[index, 8 - len(row):] = row, 1
    np.testing.assert_allclose(judge.score_tokens(left_tokens, left_mask), 2.0 * expected - 1.0, rtol=1e-5,
                               atol=1e-5)


def test_multi_objective_rewards(multi_reward_model):
    model = multi_reward_model
    expected = plain_rewards(model, ROWS)
    assert expected.shape == (5, 2)
    tokens, mask = right_padded(ROWS)
    raw = RewardModelJudge(model, gain=[1.0, 2.0], bias=[0.0, 1.0], batch_size=2).score_tokens(tokens, mask)
    np.testing.assert_allclose(raw, expected * [1.0, 2.0] + [0.0, 1.0], rtol=1e-5, atol=1e-5)
    combined = RewardModelJudge(model, dimension_weights=[0.5, -1.0], gain=3.0, bias=0.25,
                                batch_size=2).score_tokens(tokens, mask)
    np.testing.assert_allclose(combined, (3.0 * expected + 0.25) @ [0.5, -1.0], rtol=1e-5, atol=1e-5)
    # A normalised multi-objective model: each objective normalised by its own gain and bias, then weighted.
    per_dimension = RewardModelJudge(model, dimension_weights=[0.5, -1.0], gain=[1.0, 2.0], bias=[0.0, 1.0],
                                     batch_size=2).score_tokens(tokens, mask)
    np.testing.assert_allclose(per_dimension, (expected * [1.0, 2.0] + [0.0, 1.0]) @ [0.5, -1.0], rtol=1e-5,
                               atol=1e-5)
    with pytest.raises(ValueError, match=r"expected \(2,\)"):
        RewardModelJudge(model, dimension_weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="gain has shape"):
        RewardModelJudge(model, dimension_weights=[1.0, 1.0], gain=[1.0, 2.0, 3.0])


def test_text_rendering_equals_jaxalign_data(reward_model, tokenizer):
    """A text pair is encoded exactly as jaxalign.data tokenises the chosen side of a pair (chat template)."""
    judge = RewardModelJudge(reward_model, tokenizer=tokenizer, batch_size=2)
    prompts = ["Hi", [data.Message("system", "blue"), data.Message("user", "sky ?")]]
    responses = ["sky blue .", "Go away"]
    records = [data.PreferenceRecord(p if isinstance(p, list) else [{"role": "user", "content": p}],
                                     [{"role": "assistant", "content": r}], [{"role": "assistant", "content": "?"}])
               for p, r in zip(prompts, responses)]
    expected = [list(e.sequences[0].ids) for e in data.tokenize(records, tokenizer, progress=False).examples]
    assert judge.encode(prompts, responses) == expected
    np.testing.assert_allclose(judge.score(prompts, responses), plain_rewards(reward_model, expected), rtol=1e-5,
                               atol=1e-5)
    # an empty response (a model that stopped at once) still scores
    assert np.isfinite(judge.score(["Hi"], [""])).all()


def test_text_without_chat_template_appends_eos(reward_model, tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    judge = RewardModelJudge(reward_model, tokenizer=plain)
    assert judge.encode(["Hi"], [" sky"]) == [plain("Hi sky")["input_ids"] + [plain.eos_token_id]]
    with pytest.raises(ValueError, match="chat template"):
        judge.encode([[data.Message("user", "Hi")]], ["sky"])


def test_end_of_turn_ids(tokenizer):
    assert end_of_turn_ids(tokenizer) == tuple(tokenizer("\n", add_special_tokens=False)["input_ids"])


def make_rollout(tokenizer, prompt_ids: list[int], responses: list[list[int]], stopped: list[bool]) -> Rollout:
    rows, width, length = len(responses), 16, 6
    prompt_tokens = np.zeros((rows, width), np.int32)
    prompt_mask = np.zeros((rows, width), bool)
    prompt_tokens[:, width - len(prompt_ids):], prompt_mask[:, width - len(prompt_ids):] = prompt_ids, True
    tokens = np.full((rows, length), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((rows, length), bool)
    for row, response in enumerate(responses):
        tokens[row, :len(response)], mask[row, :len(response)] = response, True
    zeros = np.zeros((rows, length), np.float32)
    return Rollout(tokens=tokens, response_mask=mask, lengths=mask.sum(1).astype(np.int32),
                   stopped=np.asarray(stopped), sampling_logps=zeros, model_logps=zeros,
                   guide_logps=np.zeros((0, rows, length), np.float32), prompt_tokens=prompt_tokens,
                   prompt_mask=prompt_mask)


def test_score_rollout_reads_where_training_reads(reward_model, tokenizer):
    """A stopped row gets the template's end of turn: its reward equals the text rendering's; a row cut at
    max_new_tokens is read at its last token."""
    judge = RewardModelJudge(reward_model, tokenizer=tokenizer, batch_size=2)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                         tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    words = tokenizer("sky blue .", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    rollout = make_rollout(tokenizer, prompt, [words + [eos], words, [eos]], stopped=[True, False, True])
    got = judge.score_rollout(rollout)
    texts = judge.score(["Hi", "Hi"], ["sky blue .", ""])
    np.testing.assert_allclose(got[[0, 2]], texts, rtol=1e-5, atol=1e-5)
    cut, at_eos = plain_rewards(reward_model, [prompt + words, prompt + words + [eos]])
    np.testing.assert_allclose(got[1], cut, rtol=1e-5, atol=1e-5)
    # without the end of turn a stopped row is read at its EOS, which gives another reward
    bare = RewardModelJudge(reward_model, end_of_turn=()).score_rollout(rollout)
    np.testing.assert_allclose(bare[0], at_eos, rtol=1e-5, atol=1e-5)
    assert abs(bare[0] - got[0]) > 1e-3


def test_texts_longer_than_the_reward_models_positions_are_refused(reward_model, tokenizer):
    judge = RewardModelJudge(reward_model, tokenizer=tokenizer)
    positions = reward_model.backbone.config.max_position_embeddings
    long = " ".join(["sky"] * positions)
    with pytest.raises(ValueError, match=rf"response 1 renders to \d+ tokens with its prompt, more than the reward "
                                         rf"model's {positions} positions"):
        judge.score(["Hi", "Hi"], ["sky", long])


def test_reward_judge_errors(reward_model):
    with pytest.raises(ValueError, match="needs the reward model's tokenizer"):
        RewardModelJudge(reward_model).score(["Hi"], ["sky"])
    with pytest.raises(TypeError, match="RewardModel"):
        RewardModelJudge(object())
    with pytest.raises(ValueError, match="batch_size"):
        RewardModelJudge(reward_model, batch_size=0)
    with pytest.raises(ValueError, match=r"\[rows, length\]"):
        RewardModelJudge(reward_model).score_tokens(np.zeros(3, np.int32), np.ones(3, np.int32))


def test_score_rollout_refuses_foreign_token_ids(reward_model, tokenizer):
    rollout = make_rollout(tokenizer, [2, 6], [[150, 3]], stopped=[True])
    with pytest.raises(ValueError, match="reward model's vocabulary"):
        RewardModelJudge(reward_model).score_rollout(rollout)
