"""Reward sources: every internal signal by hand on a hand-made batch, the composite and weighted formulas,
function validation, config parsing, the reward-model source against its judge, the VADER builtin against
VaderJudge, and the running moments against NumPy."""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import numpy as np
import pytest

from jaxalign.eval import RewardModelJudge, VaderJudge
from jaxalign.methods.rewards import (
    BUILTIN_FUNCTIONS,
    CompositeReward,
    Episodes,
    Faithfulness,
    FunctionReward,
    JudgeReward,
    RewardOutput,
    RunningMoments,
    WeightedRewards,
    build_reward,
    clip_rewards,
    coherence,
    fluency,
    length_penalty,
    response_length,
    run_source,
)
from jaxalign.rollout import Rollout
from tests.eval.conftest import tiny_reward_model
from tests.test_cli import tiny_tokenizer

EOS, PAD = 2, 0
V, D = 17, 3

# Four rows, two prompts (G = 2). Responses, right-padded to N = 6:
#   row 0: 5 6 5 6        not stopped -> distinct-2 2/3, L = 4
#   row 1: 9 9 9 EOS      stopped     -> content 9 9 9: distinct-2 1/2, L = 3
#   row 2: EOS            stopped     -> empty: distinct-2 1.0, L = 0
#   row 3: 11 .. 16       cut         -> distinct-2 1.0, L = 6
PROMPT_TOKENS = np.array([[PAD, PAD, 7, 8], [PAD, EOS, 7, 8], [PAD, PAD, 7, 10], [PAD, PAD, 7, 10]], np.int32)
PROMPT_MASK = PROMPT_TOKENS != PAD
RESPONSE_TOKENS = np.array([[5, 6, 5, 6, PAD, PAD], [9, 9, 9, EOS, PAD, PAD], [EOS, PAD, PAD, PAD, PAD, PAD],
                            [11, 12, 13, 14, 15, 16]], np.int32)
RESPONSE_MASK = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
STOPPED = np.array([False, True, True, False])
# Padding holds junk: only the mask may decide what counts.
REF_LOGPS = np.array([[-1, -2, -3, -4, 99, 99], [-0.5, -0.5, -1, -2, 99, 99], [-3, 99, 99, 99, 99, 99],
                      [-1, -1, -1, -1, -1, -1]], np.float32)

COHERENCE = [2 / 3, 1 / 2, 1.0, 1.0]
LENGTHS = [4.0, 3.0, 0.0, 6.0]
PENALTY_4 = [0.0, -1 / 4, -1.0, -2 / 4]  # target_length 4
FLUENCY = [-2.5, -1.0, -3.0, -1.0]


def embedding_table() -> np.ndarray:
    table = np.full((V, D), 7.0, np.float32)  # junk on ids that must be ignored (PAD, EOS)
    table[7], table[8], table[10] = [1, 0, 0], [0, 1, 0], [0, 0, 2]
    table[5], table[6] = [1, 0, 0], [3, 0, 0]
    table[9] = [0, 1, 1]
    table[11:17] = [1, 1, 0]
    return table


# Prompt means: rows 0, 1 (EOS ignored) [.5, .5, 0]; rows 2, 3 [.5, 0, 1].
# Response means: row 0 [2, 0, 0] -> cos = 1/sqrt(2); row 1 [0, 1, 1] (EOS ignored) -> .5 / (sqrt(.5) sqrt(2));
# row 2 nothing left -> 0; row 3 [1, 1, 0] -> .5 / (sqrt(2) sqrt(1.25)).
FAITHFULNESS = [1 / math.sqrt(2), 0.5, 0.0, 0.5 / (math.sqrt(2) * math.sqrt(1.25))]
IGNORE = (PAD, EOS)


def make_episodes(**overrides) -> Episodes:
    fields = dict(prompts=["Hi", "Hi", "sky ?", "sky ?"],
                  responses=["What a wonderful, lovely day!", "The table is brown.", "",
                             "This is terrible and I hate it."],
                  prompt_tokens=PROMPT_TOKENS, prompt_mask=PROMPT_MASK, response_tokens=RESPONSE_TOKENS,
                  response_mask=RESPONSE_MASK, stopped=STOPPED, ref_logps=REF_LOGPS, group_size=2)
    return Episodes(**{**fields, **overrides})


def close(a, b):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------- signals


def test_signals_by_hand():
    episodes = make_episodes()
    close(coherence(episodes), COHERENCE)
    close(response_length(episodes), LENGTHS)
    close(length_penalty(episodes, target_length=4), PENALTY_4)
    close(fluency(episodes), FLUENCY)
    close(Faithfulness(embedding_table(), ignore_ids=IGNORE)(episodes), FAITHFULNESS)
    for signal in (coherence(episodes), fluency(episodes)):
        assert signal.shape == (4,) and signal.dtype == np.float64


def test_coherence_counts_the_last_token_of_a_row_that_did_not_stop():
    """Row 0 cut after 5 6 5 6 2 without stopping: the trailing 2 is text (bigram (6, 2) is new): 3/4."""
    tokens = RESPONSE_TOKENS.copy()
    tokens[0, 4] = EOS
    mask = RESPONSE_MASK.copy()
    mask[0, 4] = True
    episodes = make_episodes(response_tokens=tokens, response_mask=mask)
    assert coherence(episodes)[0] == pytest.approx(3 / 4)
    assert response_length(episodes)[0] == 5.0
    # the same row 0 marked stopped: its last 6 is the stop token, the text 5 6 5 has no repeated bigram
    assert coherence(make_episodes(stopped=np.array([True, True, True, False])))[0] == 1.0


def test_signal_errors():
    with pytest.raises(ValueError, match="ref_logps"):
        fluency(make_episodes(ref_logps=None))
    with pytest.raises(ValueError, match="target_length must be a positive number"):
        length_penalty(make_episodes(), target_length=0)
    with pytest.raises(ValueError, match="token id 12 is outside the embedding table's 12 rows"):
        Faithfulness(embedding_table()[:12], ignore_ids=IGNORE)(make_episodes())
    with pytest.raises(ValueError, match=r"\[V, D\] float table"):
        Faithfulness(np.zeros(5))


def test_episodes_validate_shapes():
    with pytest.raises(ValueError, match="3 responses for 4 prompts"):
        make_episodes(responses=["a", "b", "c"])
    with pytest.raises(ValueError, match="response_mask has shape"):
        make_episodes(response_mask=RESPONSE_MASK[:, :5])
    with pytest.raises(ValueError, match="group_size 3 does not divide the 4 rows"):
        make_episodes(group_size=3)
    with pytest.raises(ValueError, match="ref_logps has shape"):
        make_episodes(ref_logps=REF_LOGPS[:, :2])


# ------------------------------------------------------------------------------------ sources


def constant(values, name="ext"):
    return FunctionReward(lambda prompts, responses: list(values), name)


def test_composite_is_the_adlf_formula():
    signals = {"coherence": coherence, "length_penalty": functools.partial(length_penalty, target_length=4),
               "fluency": fluency, "faithfulness": Faithfulness(embedding_table(), ignore_ids=IGNORE)}
    weights = {"coherence": 1.0, "length_penalty": 0.5, "fluency": 0.5, "faithfulness": 0.2}
    external = [1.0, -2.0, 0.5, 3.0]
    out = CompositeReward(constant(external), weights, alpha=0.2, signals=signals)(make_episodes())
    internal = (1.0 * np.array(COHERENCE) + 0.5 * np.array(PENALTY_4) + 0.5 * np.array(FLUENCY)
                + 0.2 * np.array(FAITHFULNESS))
    close(out.total, 0.8 * np.array(external) + 0.2 * internal)
    assert set(out.components) == {"external/ext", "internal/coherence", "internal/length_penalty",
                                   "internal/fluency", "internal/faithfulness", "internal"}
    close(out.components["internal"], internal)
    close(out.components["internal/fluency"], FLUENCY)
    close(out.components["external/ext"], external)
    # alpha 0 is the external reward alone; alpha 1 the internal term alone
    close(CompositeReward(constant(external), weights, alpha=0.0, signals=signals)(make_episodes()).total, external)
    close(CompositeReward(constant(external), weights, alpha=1.0, signals=signals)(make_episodes()).total, internal)


def test_composite_errors():
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        CompositeReward(constant([0] * 4), {"coherence": 1.0}, alpha=1.5, signals={"coherence": coherence})
    with pytest.raises(ValueError, match="'fluency' has no function in signals"):
        CompositeReward(constant([0] * 4), {"fluency": 1.0}, alpha=0.5, signals={"coherence": coherence})
    with pytest.raises(TypeError, match="not a reward source"):
        CompositeReward(coherence, {"coherence": 1.0}, alpha=0.5, signals={"coherence": coherence})
    bad = CompositeReward(constant([0] * 4), {"broken": 1.0}, alpha=0.5,
                          signals={"broken": lambda episodes: [0.0, 1.0, float("nan"), 0.0]})
    with pytest.raises(ValueError, match="internal signal 'broken': row 2: nan is not finite"):
        bad(make_episodes())


def test_weighted_sums_and_nests_components():
    inner = CompositeReward(constant([1.0, 1.0, 1.0, 1.0], "inner_ext"), {"coherence": 1.0}, alpha=0.5,
                            signals={"coherence": coherence})
    source = WeightedRewards([constant([1.0, 2.0, 3.0, 4.0], "a"), inner], [2.0, -0.5])
    out = source(make_episodes())
    composite = 0.5 + 0.5 * np.array(COHERENCE)
    close(out.total, 2.0 * np.array([1.0, 2.0, 3.0, 4.0]) - 0.5 * composite)
    assert set(out.components) == {"a", "composite", "composite/external/inner_ext", "composite/internal/coherence",
                                   "composite/internal"}
    close(out.components["composite"], composite)
    close(out.components["composite/internal"], COHERENCE)
    with pytest.raises(ValueError, match="sources 0 and 1 are both named 'a'"):
        WeightedRewards([constant([0] * 4, "a"), constant([1] * 4, "a")], [1.0, 1.0])
    with pytest.raises(ValueError, match="1 weights for 2 sources"):
        WeightedRewards([constant([0] * 4, "a"), constant([1] * 4, "b")], [1.0])


def test_function_reward_inputs_and_validation():
    def by_text(prompts, responses):
        return [len(p) + len(r) for p, r in zip(prompts, responses)]

    episodes = make_episodes()
    out = FunctionReward(by_text, "chars")(episodes)
    assert isinstance(out, RewardOutput) and out.total.dtype == np.float64
    close(out.total, [2 + 29, 2 + 19, 5 + 0, 5 + 31])
    assert list(out.components) == ["chars"]
    close(FunctionReward(lambda e: e.stopped * 1.0, "stop", inputs="episodes")(episodes).total, [0, 1, 1, 0])

    def returning(values):
        def fn(prompts, responses):
            return values
        return FunctionReward(fn, "mine")

    with pytest.raises(ValueError, match=r"reward function 'mine' \(.*fn\): returned 3 values for 4 responses"):
        returning([1, 2, 3])(episodes)
    with pytest.raises(ValueError, match="'mine'.*row 1: inf is not finite"):
        returning([0.0, math.inf, 1.0, 2.0])(episodes)
    with pytest.raises(ValueError, match="'mine'.*row 2: None is not a number"):
        returning([0.0, 1.0, None, 2.0])(episodes)
    with pytest.raises(ValueError, match="'mine'.*row 0: '1.5' is not a number"):
        returning(["1.5", 1.0, 1.0, 2.0])(episodes)
    with pytest.raises(ValueError, match=r"'mine'.*shape \(4, 2\).*dimension_weights"):
        returning(np.zeros((4, 2)))(episodes)
    with pytest.raises(ValueError, match="'mine'.*returned float"):
        returning(1.0)(episodes)
    with pytest.raises(ValueError, match="inputs must be 'text' or 'episodes'"):
        FunctionReward(by_text, "x", inputs="tokens")
    for reserved in ("std", "group_std", "running_std"):
        with pytest.raises(ValueError, match=rf"component name '{reserved}' is reserved \(the trainers log their "
                                             rf"own reward/{reserved}\)"):
            run_source(FunctionReward(by_text, reserved), episodes)
    assert list(run_source(FunctionReward(by_text, "chars"), episodes).components) == ["chars"]


def test_vader_builtin_equals_vader_judge():
    episodes = make_episodes()
    out = build_reward({"function": "vader"}, tokenizer=None)(episodes)
    expected = VaderJudge().score(episodes.prompts, episodes.responses)
    assert expected[0] > 0.5 and expected[3] < -0.5  # the texts carry sentiment, so equality means something
    close(out.total, expected)
    assert list(out.components) == ["vader"]
    close(JudgeReward(VaderJudge())(episodes).total, expected)


def test_clip_rewards():
    close(clip_rewards([-3.0, -0.5, 0.0, 2.5], 1.0), [-1.0, -0.5, 0.0, 1.0])
    with pytest.raises(ValueError, match="positive"):
        clip_rewards([1.0], 0.0)


def test_running_moments_equal_numpy_and_survive_json():
    rng = np.random.default_rng(7)
    batches = [rng.normal(3.0, 2.0, size) for size in (5, 1, 7, 2, 3)]
    moments = RunningMoments()
    assert moments.count == 0 and moments.mean == 0.0 and moments.std == 1.0
    seen = []
    for index, batch in enumerate(batches):
        batch_mean, batch_std = moments.update(batch)
        seen.extend(batch)
        assert batch_mean == pytest.approx(np.mean(batch), rel=1e-13)
        assert batch_std == (pytest.approx(np.std(batch, ddof=1), rel=1e-13) if batch.size > 1 else 0.0)
        assert moments.count == len(seen)
        assert moments.mean == pytest.approx(np.mean(seen), rel=1e-13)
        assert moments.std == pytest.approx(np.std(seen, ddof=1), rel=1e-12)
        if index == 2:  # resume mid-way from JSON: identical from then on
            restored = RunningMoments()
            restored.load_state_dict(json.loads(json.dumps(moments.state_dict())))
            assert restored.state_dict() == moments.state_dict()
    for batch in batches[3:]:
        restored.update(batch)
    assert restored.state_dict() == moments.state_dict()
    assert (restored.mean, restored.std) == (moments.mean, moments.std)
    with pytest.raises(ValueError, match="value 1 is nan"):
        moments.update([1.0, float("nan")])
    with pytest.raises(ValueError, match="count must be a non-negative int"):
        RunningMoments().load_state_dict({"count": -1, "mean": 0.0, "m2": 0.0})
    with pytest.raises(ValueError, match="expected keys count, mean, m2"):
        RunningMoments().load_state_dict({"count": 1})


# --------------------------------------------------------------------------------- build_reward


def score_text(prompts, responses):
    return [float(len(r)) for r in responses]


def score_episodes(episodes):
    return episodes.response_mask.sum(axis=1)


def build(spec, **kwargs):
    return build_reward(spec, tokenizer=None, **kwargs)


def test_build_function_forms():
    episodes = make_episodes()
    assert set(BUILTIN_FUNCTIONS) == {"vader", "length", "coherence", "length_penalty", "fluency", "faithfulness"}
    close(build({"function": "length"})(episodes).total, LENGTHS)
    penalty = build({"function": "length_penalty", "target_length": 4, "name": "short"})
    assert penalty.name == "short"
    close(penalty(episodes).total, PENALTY_4)
    faith = build({"function": "faithfulness"}, reference_embeddings=embedding_table(), ignore_ids=IGNORE)
    close(faith(episodes).total, FAITHFULNESS)
    mine = build({"function": "tests.methods.test_rewards:score_text", "inputs": "text", "name": "mine"})
    assert mine.name == "mine"
    close(mine(episodes).total, [29, 19, 0, 31])
    by_episodes = build({"function": "tests.methods.test_rewards:score_episodes", "inputs": "episodes"})
    assert by_episodes.name == "score_episodes"
    close(by_episodes(episodes).total, [4, 4, 1, 6])


def test_build_composite_and_weighted():
    episodes = make_episodes()
    composite = build({"composite": {"alpha": 0.2, "external": {"function": "length"}, "target_length": 4,
                                     "internal": {"coherence": 1.0, "length_penalty": 0.5, "fluency": 0.5,
                                                  "faithfulness": 0.2}}},
                      reference_embeddings=embedding_table(), ignore_ids=IGNORE)
    internal = (np.array(COHERENCE) + 0.5 * np.array(PENALTY_4) + 0.5 * np.array(FLUENCY)
                + 0.2 * np.array(FAITHFULNESS))
    close(composite(episodes).total, 0.8 * np.array(LENGTHS) + 0.2 * internal)
    assert "external/length" in composite(episodes).components

    weighted = build({"weighted": [{"function": "coherence", "weight": 1.0},
                                   {"function": "length_penalty", "weight": 0.1, "target_length": 4},
                                   {"function": "length"}]})  # weight defaults to 1
    out = weighted(episodes)
    close(out.total, np.array(COHERENCE) + 0.1 * np.array(PENALTY_4) + np.array(LENGTHS))
    assert set(out.components) == {"coherence", "length_penalty", "length"}


@pytest.mark.parametrize("spec, message", [
    ({"modle": "x"}, r"reward: give exactly one of model, function, composite, weighted; got keys \['modle'\]"),
    ({"reward": {"function": "vader"}}, "pass the mapping under `reward:`"),
    ({"function": "vader", "weight": 1.0}, r"reward: unknown key 'weight' \(known: function, inputs, name, "
                                           r"target_length\)"),
    ({"function": "vadr"}, "reward.function: unknown builtin 'vadr' .builtins: vader, length"),
    ({"function": "no_such_package_xyz.rewards:score"}, "reward.function: cannot import module "
                                                        "'no_such_package_xyz.rewards'"),
    ({"function": "tests.methods.test_rewards:nothing_here"}, "has no attribute 'nothing_here'"),
    ({"function": "tests.methods.test_rewards:score_text", "inputs": "tokens"}, "reward.inputs: expected 'text'"),
    ({"function": "vader", "inputs": "text"}, "reward.inputs: only for 'package.module:callable'"),
    ({"function": "length_penalty"}, "reward.target_length: required by length_penalty"),
    ({"function": "coherence", "target_length": 3}, "reward.target_length: coherence takes no target_length"),
    ({"function": "faithfulness"}, "reward: faithfulness needs the reference model's input embedding table"),
    ({"composite": {"alpha": 0.2, "external": {"function": "length"}, "internal": {"fluncy": 1.0}}},
     r"reward.composite.internal: unknown signal 'fluncy' \(known: coherence, length_penalty, fluency, "
     r"faithfulness\)"),
    ({"composite": {"alpha": 0.2, "external": {"function": "length"}, "internal": {"coherence": 1.0},
                    "beta": 1}}, r"reward.composite: unknown key 'beta' \(known: alpha, external, internal"),
    ({"composite": {"alpha": 1.2, "external": {"function": "length"}, "internal": {"coherence": 1.0}}},
     r"reward.composite.alpha: must be in \[0, 1\]"),
    ({"composite": {"alpha": "0.2", "external": {"function": "length"}, "internal": {"coherence": 1.0}}},
     "reward.composite.alpha: expected a finite number, got str '0.2'"),
    ({"composite": {"alpha": 0.2, "external": {"function": "length"}, "internal": {"coherence": 1.0},
                    "target_length": 8}}, "reward.composite.target_length: set, but length_penalty is not"),
    ({"composite": {"alpha": 0.2, "internal": {"coherence": 1.0}}}, "reward.composite.external: required"),
    ({"composite": {"alpha": 0.2, "external": {"functoin": "length"}, "internal": {"coherence": 1.0}}},
     "reward.composite.external: give exactly one of"),
    ({"weighted": [{"function": "length"}, {"function": "length", "weight": 2}]},
     "reward.weighted: entries 0 and 1 are both named 'length'"),
    ({"weighted": [{"function": "length", "weight": "heavy"}]}, r"reward.weighted\[0\].weight: expected a finite"),
    ({"weighted": [{"function": "length", "wieght": 1}]}, r"reward.weighted\[0\]: unknown key 'wieght'"),
    ({"weighted": []}, "reward.weighted: expected a non-empty list"),
])
def test_build_errors_name_the_config_path(spec, message):
    with pytest.raises(ValueError, match=message):
        build(spec)


def test_build_missing_model_path(tmp_path):
    missing = tmp_path / "no_reward_model"
    with pytest.raises(FileNotFoundError, match=r"reward.model: .*no_reward_model does not exist.*"
                                                r"`jaxalign train reward`"):
        build({"model": str(missing)})
    # an existing directory that is not a reward model: the default loader's error, with the key
    with pytest.raises(FileNotFoundError, match=r"reward.model: .*reward_model.json: missing.*jaxalign train reward"):
        build({"model": str(tmp_path)})


# ------------------------------------------------------------------------------ reward-model source

# Prompt width + response length + ChatML's one end-of-turn id = 32, the length RewardModelJudge.score pads texts
# to: the token and text paths share one compiled program.
WIDTH, LENGTH = 25, 6


def rollout_of(tokenizer, prompt_ids: list[int], responses: list[list[int]], stopped: list[bool]) -> Rollout:
    rows, width, length = len(responses), WIDTH, LENGTH
    prompt_tokens = np.full((rows, width), tokenizer.pad_token_id, np.int32)
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


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def reward_model():
    return tiny_reward_model(2)


@pytest.fixture(scope="module")
def rm_episodes(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                         tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    words = tokenizer("sky blue .", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    responses = [words + [eos], words, [eos]]
    rollout = rollout_of(tokenizer, prompt, responses, stopped=[True, False, True])
    return Episodes.from_rollout(rollout, tokenizer), prompt, responses


def test_from_rollout_decodes(rm_episodes):
    episodes, prompt, responses = rm_episodes
    assert episodes.responses == ["sky blue .", "sky blue .", ""]
    assert episodes.prompts[0] == "user\nHi\nassistant\n"
    assert episodes.response_tokens.dtype == np.int32 and episodes.stopped.tolist() == [True, False, True]


def test_reward_model_source_equals_score_tokens(rm_episodes, tokenizer, reward_model):
    """On a rollout: the judge's token scores of prompt + response (+ the end of turn on rows that stopped),
    built here by hand; without one: the judge's text scores."""
    episodes, prompt, responses = rm_episodes
    judge = RewardModelJudge(reward_model, tokenizer=tokenizer, gain=2.0, bias=-1.0, batch_size=4)
    end = list(judge.end_of_turn)
    assert end  # ChatML: the "\n" after <|im_end|>
    rows = [prompt + r + (end if stopped else []) for r, stopped in zip(responses, [True, False, True])]
    tokens = np.zeros((3, WIDTH + LENGTH + len(end)), np.int32)
    mask = np.zeros_like(tokens)
    for index, row in enumerate(rows):
        tokens[index, :len(row)], mask[index, :len(row)] = row, 1
    expected = judge.score_tokens(tokens, mask)
    assert abs(expected[0] - expected[1]) > 1e-3  # the end of turn changes the reward, so the test can tell
    source = JudgeReward(judge)
    out = source(episodes)
    assert source.name == "reward_model" and list(out.components) == ["reward_model"]
    np.testing.assert_allclose(out.total, expected, rtol=1e-5, atol=1e-5)
    texts = dataclasses.replace(episodes, rollout=None)
    np.testing.assert_allclose(source(texts).total, judge.score(texts.prompts, texts.responses), rtol=1e-6)


def test_build_reward_model_form(rm_episodes, tokenizer, reward_model, tmp_path):
    episodes, _, _ = rm_episodes
    model = reward_model
    loaded = []

    def loader(path):
        loaded.append(path)
        return model, {"gain": 2.0, "bias": -1.0, "num_objectives": None}

    source = build_reward({"model": str(tmp_path), "batch_size": 4}, tokenizer=tokenizer,
                          reward_model_loader=loader)
    assert loaded == [str(tmp_path)] and source.name == "reward_model"
    raw = RewardModelJudge(model, tokenizer=tokenizer, batch_size=4).score_rollout(episodes.rollout)
    np.testing.assert_allclose(source(episodes).total, 2.0 * raw - 1.0, rtol=1e-5, atol=1e-5)

    multi = tiny_reward_model(5, num_objectives=2)

    def multi_loader(path):
        return multi, {"gain": 1.0, "bias": 0.0, "num_objectives": 2}

    with pytest.raises(ValueError, match=r"scores 2 objectives.*set reward.dimension_weights"):
        build_reward({"model": str(tmp_path)}, tokenizer=tokenizer, reward_model_loader=multi_loader)
    with pytest.raises(ValueError, match=r"expected \(2,\)"):
        build_reward({"model": str(tmp_path), "dimension_weights": [1.0, 2.0, 3.0]}, tokenizer=tokenizer,
                     reward_model_loader=multi_loader)
    combined = build_reward({"model": str(tmp_path), "dimension_weights": [0.5, -1.0], "batch_size": 4},
                            tokenizer=tokenizer, reward_model_loader=multi_loader)
    per_objective = RewardModelJudge(multi, tokenizer=tokenizer, batch_size=4).score_rollout(episodes.rollout)
    assert per_objective.shape == (3, 2)
    np.testing.assert_allclose(combined(episodes).total, per_objective @ [0.5, -1.0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dimension_weights"):
        JudgeReward(RewardModelJudge(multi))
