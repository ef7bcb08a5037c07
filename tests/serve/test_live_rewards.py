"""Reward on live traffic (``jaxalign serve --reward-model``): every finished response scored off the request path,
the rewards on ``/metrics``; a full queue or a failing scorer never slows or stops the server."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
from flax import nnx
from prometheus_client import CollectorRegistry

from jaxalign import models
from jaxalign.eval.judges import load_reward_judge
from jaxalign.serve.live_rewards import LiveRewards
from tests.serve.conftest import MODEL, running_server, serve_args
from tests.serve.test_server import metric, wait_until
from tests.test_cli import tiny_tokenizer

WAIT_S = 120  # the reward model compiles on first use, on 2 shared cores


class LengthJudge:
    """Reward = the response's word count; ``gate`` (when set) holds every call until it opens."""

    def __init__(self, gate: threading.Event | None = None, fail: bool = False):
        self.gate, self.fail, self.calls = gate, fail, []

    def score(self, prompts, responses):
        self.calls.append(list(zip(prompts, responses, strict=True)))
        if self.gate is not None:
            self.gate.wait(30)
        if self.fail:
            raise RuntimeError("the scorer broke")
        return [float(len(r.split())) for r in responses]


def sample(registry, name, **labels) -> float:
    value = registry.get_sample_value(name, {"model": MODEL, **labels})
    return 0.0 if value is None else value


def test_every_response_is_scored_and_the_mean_exported():
    registry = CollectorRegistry()
    rewards = LiveRewards(LengthJudge(), registry, model=MODEL, batch_size=2)
    assert math.isnan(sample(registry, "jaxalign_response_reward_mean")), "no mean before the first response"
    rewards.start()
    try:
        rewards.submit("p1", ["a b", "a b c d"])
        rewards.submit([{"role": "user", "content": "hi"}], ["one"])
        wait_until(lambda: rewards.scored == 3, "three rewards", WAIT_S)
    finally:
        rewards.stop()
    assert sample(registry, "jaxalign_response_reward_count") == 3
    assert sample(registry, "jaxalign_response_reward_sum") == 2 + 4 + 1
    assert sample(registry, "jaxalign_response_reward_mean") == pytest.approx(7 / 3)
    assert sum(len(call) for call in rewards.judge.calls) == 3
    assert all(len(call) <= 2 for call in rewards.judge.calls), "at most batch_size responses per call"


def test_a_full_queue_counts_responses_as_unscored_and_never_waits():
    gate = threading.Event()
    registry = CollectorRegistry()
    rewards = LiveRewards(LengthJudge(gate), registry, model=MODEL, batch_size=1, max_pending=1)
    rewards.start()
    try:
        rewards.submit("p", ["first"])
        wait_until(lambda: rewards.judge.calls, "the scorer to take the first response", WAIT_S)
        rewards.submit("p", ["waits", "dropped", "dropped too"])  # one fits the queue; returns at once
        assert sample(registry, "jaxalign_responses_unscored_total", reason="queue_full") == 2
        assert sample(registry, "jaxalign_reward_queue_depth") == 1
        gate.set()
        wait_until(lambda: rewards.scored == 2, "the queued response", WAIT_S)
    finally:
        gate.set()
        rewards.stop()
    assert sample(registry, "jaxalign_response_reward_sum") == 2


def test_a_failing_scorer_is_counted_and_the_monitor_goes_on():
    registry = CollectorRegistry()
    judge = LengthJudge(fail=True)
    rewards = LiveRewards(judge, registry, model=MODEL, batch_size=4)
    rewards.start()
    try:
        rewards.submit("p", ["a", "b"])
        wait_until(lambda: sample(registry, "jaxalign_responses_unscored_total", reason="error") == 2,
                   "the failure to be counted", WAIT_S)
        judge.fail = False
        rewards.submit("p", ["a b c"])
        wait_until(lambda: rewards.scored == 1, "a reward after the failure", WAIT_S)
    finally:
        rewards.stop()
    assert sample(registry, "jaxalign_response_reward_mean") == 3


def test_a_response_the_scorer_refuses_costs_no_other_its_reward():
    class RefusesBad(LengthJudge):
        def score(self, prompts, responses):
            if any("bad" in r for r in responses):
                raise ValueError("response 1 renders to 200 tokens with its prompt, more than the reward model's 128")
            return super().score(prompts, responses)

    registry = CollectorRegistry()
    rewards = LiveRewards(RefusesBad(), registry, model=MODEL, batch_size=4)
    rewards.submit("p", ["one", "bad bad", "a b"])  # before start: one batch of three
    rewards.start()
    try:
        wait_until(lambda: rewards.scored == 2, "the two good responses", WAIT_S)
    finally:
        rewards.stop()
    assert sample(registry, "jaxalign_responses_unscored_total", reason="error") == 1
    assert sample(registry, "jaxalign_response_reward_sum") == 1 + 2


def test_the_unscored_series_exist_from_the_start():
    registry = CollectorRegistry()
    LiveRewards(LengthJudge(), registry, model=MODEL)
    for reason in ("queue_full", "error"):
        assert registry.get_sample_value("jaxalign_responses_unscored_total", {"model": MODEL, "reason": reason}) == 0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="batch_size and max_pending must be >= 1"):
        LiveRewards(LengthJudge(), CollectorRegistry(), model=MODEL, max_pending=0)


# --- a live server with --reward-model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model_dir(tiny_checkpoint, tmp_path_factory):
    """A reward model on the tiny checkpoint's trunk (a fresh head, gain 2, bias 0.5), saved as training saves it.

    It pools the mean over every token: the tiny word-level tokenizer reads any sampled response back as one unknown
    token, so a reward read at the last token would be the same for every request; the mean tells prompts apart."""
    reward_model = models.RewardModel(models.load_hf(tiny_checkpoint), pooling="mean", rngs=nnx.Rngs(3))
    return models.save_reward_model(tmp_path_factory.mktemp("live_rewards") / "reward_model", reward_model,
                                    models.load_hf(tiny_checkpoint), tiny_tokenizer(), gain=2.0, bias=0.5)


def test_a_served_response_is_scored_as_the_reward_model_scores_it(tiny_checkpoint, reward_model_dir):
    from openai import OpenAI

    args = serve_args(tiny_checkpoint, reward_model=reward_model_dir, reward_batch_size=4)
    with running_server(args) as (url, served):
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        chat, other = [{"role": "user", "content": "hello world"}], [{"role": "user", "content": "the cat sat"}]
        whole = client.chat.completions.create(model=MODEL, messages=chat, max_tokens=6, n=2, seed=1)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model=MODEL, messages=other, max_tokens=5, temperature=0, stream=True) if chunk.choices)
        completion = client.completions.create(model=MODEL, prompt="the cat", max_tokens=4, temperature=0)
        wait_until(lambda: metric(url, "jaxalign_response_reward_count") == 4, "four scored responses", WAIT_S)
        scored_sum = metric(url, "jaxalign_response_reward_sum")
        mean = metric(url, "jaxalign_response_reward_mean")
        assert metric(url, "jaxalign_responses_unscored_total") == 0
    judge, _, _ = load_reward_judge(reward_model_dir)  # the same directory, scored outside the server
    expected = judge.score([chat, chat, other, "the cat"],
                           [c.message.content for c in whole.choices] + [streamed, completion.choices[0].text])
    assert scored_sum == pytest.approx(float(sum(expected)), rel=1e-4, abs=1e-4)
    assert mean == pytest.approx(float(sum(expected)) / 4, rel=1e-4, abs=1e-4)
    assert len(set(expected.round(5))) > 1, "the requests get different rewards: the test can tell them apart"


def test_a_reward_model_that_cannot_render_chat_requests_is_refused(tiny_checkpoint, tmp_path):
    from jaxalign.serve.command import build_served

    plain = tiny_tokenizer()
    plain.chat_template = None
    reward_model = models.RewardModel(models.load_hf(tiny_checkpoint), rngs=nnx.Rngs(3))
    directory = models.save_reward_model(tmp_path / "plain_rm", reward_model, models.load_hf(tiny_checkpoint), plain)
    with pytest.raises(ValueError, match=rf"--reward-model {directory}: cannot render requests for scoring: "
                                         "chat-message prompts need a tokenizer with a chat template"):
        build_served(serve_args(tiny_checkpoint, reward_model=directory))


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(reward_model=Path("/no/such/reward_model")), "--reward-model /no/such/reward_model: no such directory"),
    (dict(reward_dimension_weights="1,2"), "--reward-dimension-weights combine a reward model's objectives"),
    (dict(reward_batch_size=0), "--reward-batch-size must be >= 1, got 0"),
])
def test_bad_reward_options_are_refused(tiny_checkpoint, overrides, message):
    from jaxalign.serve.command import build_served

    with pytest.raises(ValueError, match=message):
        build_served(serve_args(tiny_checkpoint, **overrides))
