"""PPO and GRPO on the online loop: the advantage wiring on a hand-made rollout (against a NumPy loop), a
tiny-model PPO run whose token-counting reward rises, GRPO's per-group advantages, and an interrupted PPO
run resumed to the same parameters, rewards and metrics as the uninterrupted one."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxalign import data as jdata
from jaxalign.methods.grpo import GRPOConfig, GRPOTrainer
from jaxalign.methods.online import RolloutBatch, sequence_inputs
from jaxalign.methods.ppo import PPOConfig, PPOTrainer, compute_advantages
from jaxalign.methods.rewards import FunctionReward, RewardOutput
from jaxalign.models import LlamaForCausalLM
from jaxalign.rollout import Sampler, SamplingParams
from jaxalign.train import CheckpointConfig, LogConfig, OptimizerConfig, TrainConfig
from tests.models.conftest import TINY
from tests.test_cli import VOCAB, tiny_tokenizer

BLUE = VOCAB["blue"]
PROMPTS = ["Hi", "sky ?", "Go away .", "blue sky", "Hi Hi ?", "away", "Go", "sky blue ."]


def count_blue(episodes) -> np.ndarray:
    """The token-counting reward: how many times the response says "blue"."""
    return ((episodes.response_tokens == BLUE) & episodes.response_mask).sum(axis=1).astype(np.float64)


def prompt_batches(tokenizer, batch_size: int, seed: int = 0) -> jdata.BatchIterator:
    records = [jdata.PromptRecord([{"role": "user", "content": p}]) for p in PROMPTS]
    dataset = jdata.tokenize(records, tokenizer)
    return jdata.BatchIterator(dataset, batch_size=batch_size, seed=seed, shuffle=True, drop_last=True)


def train_config(tmp_path: Path | None, steps: int, lr: float = 1e-2, **checkpoint) -> TrainConfig:
    directory = None if tmp_path is None else str(tmp_path / "checkpoints")
    return TrainConfig(total_steps=steps, seed=0, optimizer=OptimizerConfig(learning_rate=lr, warmup_steps=0),
                       checkpoint=CheckpointConfig(directory=directory, async_save=False, **checkpoint),
                       log=LogConfig(directory=None if tmp_path is None else str(tmp_path), progress_bar=False,
                                     tensorboard=False))


def tiny_policy(seed: int = 0) -> LlamaForCausalLM:
    return LlamaForCausalLM(TINY, rngs=nnx.Rngs(seed))


# ------------------------------------------------------------------------------------------ advantages


def numpy_advantages(score, logps, ref_logps, values, mask, kl_coef, gamma, lam):
    """TRL 0.11's recipe written out: KL-penalised rewards, score on the last token, GAE, whitening."""
    rows, length = logps.shape
    kl = np.where(mask, logps - ref_logps, 0.0)
    rewards = -kl_coef * kl
    for row in range(rows):
        rewards[row, np.flatnonzero(mask[row])[-1]] += score[row]
    advantages = np.zeros_like(rewards)
    for row in range(rows):
        valid = np.flatnonzero(mask[row])
        next_value = next_advantage = 0.0
        for t in valid[::-1]:
            delta = rewards[row, t] + gamma * next_value - values[row, t]
            next_advantage = delta + gamma * lam * next_advantage
            advantages[row, t] = next_advantage
            next_value = values[row, t]
    returns = np.where(mask, advantages + values, 0.0)
    flat = advantages[mask]
    whitened = np.where(mask, (advantages - flat.mean()) / np.sqrt(flat.var(ddof=1) + 1e-8), 0.0)
    return whitened, returns, rewards


def test_advantages_on_a_hand_made_rollout_match_a_numpy_loop():
    rng = np.random.default_rng(3)
    rows, length = 3, 7
    mask = np.arange(length)[None, :] < np.array([[7], [4], [1]])
    logps, ref_logps = -rng.random((rows, length)) * 3, -rng.random((rows, length)) * 3
    values, score = rng.normal(size=(rows, length)), np.array([1.5, -0.5, 2.0])
    config = PPOConfig(gamma=0.9, lam=0.8)
    out = jax.jit(compute_advantages, static_argnames="config")(
        score, logps, ref_logps, values, mask, 0.1, config=config)
    expected_adv, expected_returns, expected_rewards = numpy_advantages(score, logps, ref_logps, values, mask,
                                                                        0.1, 0.9, 0.8)
    np.testing.assert_allclose(out["rewards"], expected_rewards, atol=1e-6)
    np.testing.assert_allclose(out["returns"], expected_returns, atol=1e-5)
    np.testing.assert_allclose(out["advantages"], expected_adv, atol=1e-5)


def test_scores_penalise_missing_eos_then_scale_then_clip():
    trainer = ppo_trainer(None, 1, missing_eos_penalty=1.0, reward_scaling="running_norm", reward_clip=0.5)
    raw = np.array([2.0, -1.0, 0.5, 3.0])
    stopped = np.array([True, False, True, False])
    score, _ = trainer.scores(RewardOutput(raw, {}), stopped)
    penalised = raw - 1.0 * ~stopped
    expected = np.clip((penalised - penalised.mean()) / penalised.std(ddof=1), -0.5, 0.5)
    np.testing.assert_allclose(score, expected, rtol=1e-6)


# ------------------------------------------------------------------------------------------ PPO runs


def ppo_trainer(tmp_path, steps, *, critic="separate", batch_size=4, lr=1e-2, **ppo):
    tokenizer = tiny_tokenizer()
    policy = tiny_policy()
    config = PPOConfig(critic=critic, epochs=2, num_minibatches=2, kl_coef=0.01, **ppo)
    return PPOTrainer(train_config(tmp_path, steps, lr), config, policy, prompt_batches(tokenizer, batch_size),
                      reward=FunctionReward(count_blue, "blue", inputs="episodes"), tokenizer=tokenizer,
                      sampling=SamplingParams(max_new_tokens=6, stop_token_ids=()), reference=tiny_policy())


def metrics_of(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]


def test_ppo_raises_a_token_counting_reward(tmp_path):
    trainer = ppo_trainer(tmp_path, 10, critic="shared", batch_size=8, lr=0.1)
    trainer.run()
    records = metrics_of(tmp_path)
    rewards = [r["reward"] for r in records]
    assert len(records) == 10
    # Random tiny model: "blue" is ~1 token in 97, so ~0.06 per 6-token response at the start (6 at most).
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 2.0, rewards
    for key in ("kl", "entropy", "policy_loss", "value_loss", "policy/clipfrac", "value/explained_variance",
                "grad_norm", "time/generate", "time/score", "time/train", "kl_coef"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert records[-1]["kl"] > records[0]["kl"]


def test_adaptive_kl_coefficient_follows_the_controller(tmp_path):
    trainer = ppo_trainer(tmp_path, 3, kl_target=0.05, kl_horizon=10.0)
    trainer.run()
    beta = 0.01
    for record in metrics_of(tmp_path):
        assert record["kl_coef"] == pytest.approx(beta, rel=1e-6)
        # Ziegler et al. 2019: β ← β·(1 + clip(KL/target − 1, ±0.2)·rows/horizon), rows = 4 prompts.
        beta *= 1 + np.clip(record["kl_estimate"] / 0.05 - 1, -0.2, 0.2) * 4 / 10.0
        assert record["kl_coef_next"] == pytest.approx(beta, rel=1e-5)
    assert trainer.kl_coef == pytest.approx(beta, rel=1e-5)


def test_resumed_ppo_equals_the_uninterrupted_run(tmp_path):
    straight = ppo_trainer(tmp_path / "straight", 3, reward_scaling="running_norm", kl_target=1.0)
    straight.run()
    first = ppo_trainer(tmp_path / "resumed", 2, reward_scaling="running_norm", kl_target=1.0)
    first.run()
    second = ppo_trainer(tmp_path / "resumed", 3, reward_scaling="running_norm", kl_target=1.0)
    second.run()
    a, b = jax.device_get(straight.state.params), jax.device_get(second.state.params)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert straight.kl_coef == second.kl_coef
    assert straight.moments.state_dict() == second.moments.state_dict()
    last_straight, last_resumed = metrics_of(tmp_path / "straight")[-1], metrics_of(tmp_path / "resumed")[-1]
    for key in ("reward", "kl", "policy_loss", "value_loss", "grad_norm"):
        assert last_straight[key] == last_resumed[key], key


# ------------------------------------------------------------------------------------------ GRPO


def grpo_trainer(tmp_path, steps, group=4, lr=1e-2, **grpo):
    tokenizer = tiny_tokenizer()
    return GRPOTrainer(train_config(tmp_path, steps, lr), GRPOConfig(**grpo), tiny_policy(),
                       prompt_batches(tokenizer, 2),
                       reward=FunctionReward(count_blue, "blue", inputs="episodes"), tokenizer=tokenizer,
                       sampling=SamplingParams(max_new_tokens=6, n=group, stop_token_ids=()), reference=tiny_policy())


@pytest.mark.parametrize("scale", ["group", "none"])
def test_grpo_advantages_are_normalised_per_group(scale):
    trainer = grpo_trainer(None, 1, scale=scale, shared_prompt=False)  # plain rows: advantages [R]
    rewards = np.array([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0])

    class Rows:
        response_mask = np.ones((8, 3), bool)

    scored = {"logps": np.zeros((8, 3), np.float32), "ref_logps": np.zeros((8, 3), np.float32)}
    batch, _ = trainer.prepare(Rows, {"input_ids": np.zeros((8, 5), np.int32)}, scored,
                               RewardOutput(rewards, {}))
    grouped = rewards.reshape(2, 4)
    centred = grouped - grouped.mean(axis=1, keepdims=True)
    expected = centred / (grouped.std(axis=1, ddof=1, keepdims=True) + 1e-4) if scale == "group" else centred
    np.testing.assert_allclose(batch["advantages"], expected.reshape(-1), rtol=1e-5)


def test_grpo_raises_a_token_counting_reward(tmp_path):
    trainer = grpo_trainer(tmp_path, 10, group=8, lr=0.1, clip_eps_high=0.28, kl_coef=0.01)
    trainer.run()
    records = metrics_of(tmp_path)
    rewards = [r["reward"] for r in records]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 1.0, rewards
    assert all(np.isfinite(r["kl"]) and np.isfinite(r["policy/clip_ratio/region_mean"]) for r in records)


@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_the_sampler_stands_in_for_a_policy_forward_pass(critic):
    """Without a filter the scoring pass takes the sampler's log-probs (and, for a shared critic, values off
    the sampler's hidden states) instead of running the policy: the same numbers as the forward pass."""
    trainer = ppo_trainer(None, 1, critic=critic)
    assert trainer.sampler_hidden_states == (critic == "shared")
    model = trainer.train_step.trained_model(trainer.train_step.init(0))
    batch = next(iter(prompt_batches(tiny_tokenizer(), 4)))
    # Hidden states in both cases: a separate critic must not take its values from the policy's.
    rollout = Sampler(model.policy).generate(batch["input_ids"], batch["attention_mask"], key=jax.random.key(1),
                                             params=trainer.sampling, return_hidden=True)
    inputs = sequence_inputs(rollout)
    fast = trainer.score(model, rollout, inputs)
    # top_k = V keeps every token (the same distribution) but makes the trainer recompute the log-probs.
    trainer.sampling = dataclasses.replace(trainer.sampling, top_k=TINY.vocab_size)
    assert not trainer.sampler_is_policy
    recomputed = trainer.score(model, rollout, inputs)
    mask = np.asarray(rollout.response_mask, bool)
    np.testing.assert_allclose(fast["logps"][mask], recomputed["logps"][mask], atol=2e-5)
    np.testing.assert_allclose(fast["values"][mask], recomputed["values"][mask], atol=1e-5)
    np.testing.assert_allclose(fast["ref_logps"], recomputed["ref_logps"], atol=1e-6)


def test_an_iteration_keeps_its_arrays_on_the_device():
    """Generation -> scoring -> advantages -> minibatches: every training array stays a device array (the
    host sees only the decoded text for the reward and the metrics' scalars)."""
    trainer = ppo_trainer(None, 1, critic="separate")
    model = trainer.train_step.trained_model(trainer.train_step.init(0))
    batch = next(iter(prompt_batches(tiny_tokenizer(), 4)))
    rollout = Sampler(model.policy).generate(batch["input_ids"], batch["attention_mask"], key=jax.random.key(1),
                                             params=trainer.sampling)
    inputs = sequence_inputs(rollout)
    scored = trainer.score(model, rollout, inputs)
    rewards = RewardOutput(total=np.arange(4, dtype=np.float64), components={})
    rows, metrics = trainer.prepare(rollout, inputs, scored, rewards)
    on_device = {name: isinstance(value, jax.Array) for name, value in {**inputs, **scored, **rows}.items()}
    assert all(on_device.values()), on_device
    assert all(isinstance(value, float) for value in metrics.values()), metrics
    typed = RolloutBatch.from_arrays(rows).check()  # the shapes the online loop checks every iteration
    assert typed["advantages"].shape == typed["response_mask"].shape
    with pytest.raises(ValueError, match=r"RolloutBatch\.old_logps: expected float \[R N\]"):
        RolloutBatch.from_arrays({**rows, "old_logps": rows["old_logps"][:, 1:]}).check()


def test_critic_learning_rate_scale_applies_to_the_critic_only():
    rows = 4
    batch = {"input_ids": np.full((rows, 8), 5, np.int32), "attention_mask": np.ones((rows, 8), np.int32),
             "positions": np.tile(np.arange(8, dtype=np.int32), (rows, 1)),
             "response_mask": np.ones((rows, 3), np.int32), "old_logps": np.full((rows, 3), -4.0, np.float32),
             "old_values": np.zeros((rows, 3), np.float32), "advantages": np.ones((rows, 3), np.float32),
             "returns": np.ones((rows, 3), np.float32)}

    def largest_change(scale):
        # No value clipping: with old values 0 a clipped value loss could leave the critic without gradient.
        trainer = ppo_trainer(None, 1, critic_lr_scale=scale, value_clip_eps=None)
        state = trainer.train_step.init(0)
        before = jax.device_get(state.params)
        after = jax.device_get(trainer.train_step(state, batch)[0].params)
        return {part: max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
                          for x, y in zip(jax.tree.leaves(before[part]), jax.tree.leaves(after[part])))
                for part in ("policy", "critic", "value_head")}

    default, frozen, doubled = largest_change(1.0), largest_change(0.0), largest_change(2.0)
    assert all(change > 0 for change in default.values()), default
    assert frozen["critic"] == frozen["value_head"] == 0.0 and frozen["policy"] == pytest.approx(default["policy"])
    # Adam's first update is ±lr per element whatever the gradient's scale: doubled for the critic only.
    assert doubled["value_head"] == pytest.approx(2 * default["value_head"], rel=1e-4)
    assert doubled["policy"] == pytest.approx(default["policy"])
