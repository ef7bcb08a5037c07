"""PPO for language models on the online loop: actor, critic, frozen reference and a reward source.

::

    trainer = PPOTrainer(train_config, PPOConfig(kl_coef=0.05), policy, prompts, reward=reward,
                         tokenizer=tokenizer, sampling=SamplingParams(max_new_tokens=48))
    trainer.run()                     # resumable; metrics.jsonl, TensorBoard, progress bar
    policy = trainer.trained_model().policy

Per iteration (after the shared steps of :mod:`jaxalign.methods.online`):

1. score: the policy's log-probs of its own tokens (``old_logps``, at the sampling temperature: the
   sampler's own when no filter is set, else recomputed), the critic's values and the reference's
   log-probs, in one compiled no-grad pass;
2. the sequence reward: penalised when the response has no EOS (``missing_eos_penalty``, on the raw score
   as ``trl.experimental.ppo`` does), optionally scaled by running statistics (``reward_scaling``), then
   clipped (``reward_clip``; TRL 0.11's order of those two);
3. :func:`compute_advantages`: per-token KL shaping ``r_t = −β·KL_t (+ score at the last token)``
   (:func:`jaxalign.losses.shape_rewards`, k1/k3/...), optional reward whitening, GAE, advantage whitening;
4. ``epochs`` passes over shuffled minibatches of the clipped policy loss plus ``vf_coef`` × the clipped
   value loss (token mean over each minibatch), stopping the passes early when the approximate KL to the
   sampling policy exceeds ``1.5 × target_kl``;
5. the KL coefficient β follows the adaptive controller when ``kl_target`` is set ("dynamic KL").

References: Ziegler et al. 2019 (arXiv 1909.08593); Stiennon et al. 2020 (arXiv 2009.01325); Huang et al.
2024, "The N+ implementation details of RLHF with PPO" (arXiv 2403.17031); TRL 0.11 ``PPOTrainer`` and
``trl.experimental.ppo``.

Notes (deviations from TRL):
    - The critic is initialised from the policy's weights (a fresh value head); TRL's examples start it
      from the reward model. ``critic="shared"`` puts the value head on the policy's trunk (TRL 0.11's
      ``AutoModelForCausalLMWithValueHead``), one trunk pass instead of two.
    - The score sits on the last response token (TRL 0.11); see :func:`jaxalign.losses.shape_rewards`.
    - The policy and value losses are summed and stepped by one optimizer (TRL does the same with
      ``vf_coef``); gradient clipping applies to their joint norm.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float

from jaxalign import losses
from jaxalign.methods.online import (
    OnlineTrainer,
    default_trainable,
    jitted_pass,
    reference_logps,
    response_logps,
)
from jaxalign.methods.rewards import RewardOutput, RewardSource, RunningMoments, clip_rewards
from jaxalign.methods.specs import PPOConfig
from jaxalign.models import ValueHead, has_lora
from jaxalign.rollout import Rollout, SamplingParams
from jaxalign.train.config import TrainConfig

F32 = jnp.float32


class ActorCritic(nnx.Module):
    """The policy (a causal LM) and its critic: a value head on a model of its own or on the policy's trunk.

    ``__call__`` returns the response tokens' log-probs (at ``temperature``) and the values of the states
    before each of them (the hidden state at position ``P − 1 + t`` predicts token ``t`` and values it).
    """

    def __init__(self, policy: nnx.Module, *, critic: nnx.Module | None = None, rngs: nnx.Rngs):
        # ``critic``: a causal LM whose final hidden states feed the value head (its LM head is unused).
        self.policy = policy
        self.critic = critic
        self.value_head = ValueHead(policy.config.d_model, rngs=rngs)

    @property
    def config(self):
        return self.policy.config

    def __call__(self, tokens, attention_mask, positions, *, prompt_length: int, temperature: float,
                 chunk_size: int | None, with_entropy: bool = False):
        hidden, _ = self.policy.hidden_states(tokens, positions=positions, attention_mask=attention_mask)
        logps = response_logps(self.policy, hidden, tokens, prompt_length, temperature=temperature,
                               chunk_size=chunk_size, with_entropy=with_entropy)
        if self.critic is not None:
            hidden, _ = self.critic.hidden_states(tokens, positions=positions, attention_mask=attention_mask)
        values = self.value_head(hidden[:, prompt_length - 1:-1])
        return logps, values


def compute_advantages(
    score: Float[Array, " B"],
    logps: Float[Array, "B N"],
    ref_logps: Float[Array, "B N"],
    values: Float[Array, "B N"],
    mask: Bool[Array, "B N"],
    kl_coef: float | Float[Array, ""],
    *,
    config: PPOConfig,
) -> dict[str, Array]:
    """KL-shaped rewards, GAE and whitening for one batch of responses (pure; jit it).

    Formula: ``r_t = −β·KL_t + 1[t = last]·s`` (:func:`jaxalign.losses.shape_rewards`; ``s`` already carries
    the missing-EOS penalty, scaling and clipping of :meth:`PPOTrainer.scores`),
    ``r ← whiten(r)`` without mean shift when ``whiten_rewards``, ``(A, R) = GAE(r, V; γ, λ)``,
    ``A ← whiten(A)`` when ``whiten_advantages`` (TRL's order: returns before whitening).

    Returns:
        ``advantages``, ``returns``, ``rewards`` (shaped), ``kl`` (per-token estimate), all ``[B, N]``.
    """
    shaped = losses.shape_rewards(score, logps, ref_logps, mask, kl_coef=kl_coef, estimator=config.kl_estimator)
    rewards = shaped.rewards
    if config.whiten_rewards:
        rewards = losses.whiten(rewards, mask, shift_mean=False)
    advantages, returns = losses.gae(rewards, values, mask, gamma=config.gamma, lam=config.lam)
    if config.whiten_advantages:
        advantages = losses.whiten(advantages, mask)
    return {"advantages": advantages, "returns": returns, "rewards": rewards, "kl": shaped.kl}


def ppo_objective(config: PPOConfig, temperature: float):
    """The minibatch loss: clipped policy loss + ``vf_coef`` × clipped value loss, token mean."""

    def objective(model: ActorCritic, batch, *, key):
        del key
        prompt_length = batch["input_ids"].shape[1] - batch["old_logps"].shape[1]
        (logps, entropy), values = model(batch["input_ids"], batch["attention_mask"], batch["positions"],
                                         prompt_length=prompt_length, temperature=temperature,
                                         chunk_size=config.chunk_size, with_entropy=True)
        mask = batch["response_mask"].astype(bool)
        policy_loss, policy_metrics = losses.ppo_policy_loss(
            logps, batch["old_logps"], batch["advantages"], mask, clip_eps=config.clip_eps,
            clip_eps_high=config.clip_eps_high, dual_clip=config.dual_clip)
        value_loss, value_metrics = losses.ppo_value_loss(values, batch["old_values"], batch["returns"], mask,
                                                          clip_eps=config.value_clip_eps)
        total, count = losses.aggregate(policy_loss + config.vf_coef * value_loss, mask)
        metrics = {"policy_loss": losses.masked_mean(policy_loss, mask), "entropy": losses.masked_mean(entropy, mask),
                   "value_loss": losses.masked_mean(value_loss, mask),
                   **{f"policy/{k}": v for k, v in policy_metrics.items()},
                   **{f"value/{k}": v for k, v in value_metrics.items()}}
        return (total, count), jax.lax.stop_gradient(metrics)

    return objective


def _score_pass(model: ActorCritic, reference, tokens, attention_mask, positions, sampler_hidden, *,
                prompt_length: int, temperature: float, chunk_size: int | None, reference_mode: str,
                policy_logps: bool):
    if sampler_hidden is not None:  # a shared critic on the sampler's hidden states: no policy pass at all
        out = {"values": model.value_head(sampler_hidden)}
    elif model.critic is None or policy_logps:
        logps, values = model(tokens, attention_mask, positions, prompt_length=prompt_length,
                              temperature=temperature, chunk_size=chunk_size)
        out = {"logps": logps, "values": values}
    else:  # the sampler's log-probs serve: only the separate critic runs
        hidden, _ = model.critic.hidden_states(tokens, positions=positions, attention_mask=attention_mask)
        out = {"values": model.value_head(hidden[:, prompt_length - 1:-1])}
    ref_logps = reference_logps(model.policy, reference, tokens, attention_mask, positions, mode=reference_mode,
                                prompt_length=prompt_length, temperature=temperature, chunk_size=chunk_size)
    return {**out, "ref_logps": ref_logps}


class PPOTrainer(OnlineTrainer):
    """PPO (see the module docstring) on :class:`~jaxalign.methods.online.OnlineTrainer`'s loop.

    Args:
        config: the training core's config (``total_steps`` = PPO iterations).
        ppo: :class:`PPOConfig`.
        policy: the causal LM to train (LoRA adapters applied already, for LoRA training).
        prompts: endless, resumable prompt batches (``jaxalign.data.BatchIterator`` over a "prompt" dataset).
        reward: the sequence reward (a reward model, a function, an ADLF composite).
        tokenizer: decodes texts for text rewards.
        sampling: ``max_new_tokens``, temperature, filters (``n`` must be 1: one response per prompt).
        reference: the frozen reference LM; None with a LoRA policy uses the policy with its adapters off.
        critic: the separate critic (``critic="separate"``): a causal LM whose hidden states feed the value
            head, e.g. a copy of the policy or a model loaded from the reward model's trunk; a copy of the
            policy when None.
        gold: logged only (``gold_reward``).
        trainable: NNX filter of trained parameters; None: every parameter, or for a LoRA policy its
            adapters and the critic (:func:`jaxalign.methods.online.default_trainable`).
    """

    label = "ppo"

    def __init__(self, config: TrainConfig, ppo: PPOConfig, policy: nnx.Module, prompts, *, reward: RewardSource,
                 tokenizer, sampling: SamplingParams, reference: nnx.Module | None = None,
                 critic: nnx.Module | None = None, gold: RewardSource | None = None, trainable: Any = None,
                 extra_metadata: Mapping[str, Any] | None = None):
        if sampling.n != 1:
            raise ValueError(f"PPO samples one response per prompt; got sampling n={sampling.n} (use GRPO for groups)")
        self.ppo = ppo
        self.reference_mode = "lora_base" if reference is None else "model"
        if self.reference_mode == "lora_base" and not has_lora(policy):
            raise ValueError("PPOTrainer: no reference model given and the policy has no LoRA adapters; pass "
                             "reference= (a frozen copy of the initial policy)")
        if ppo.critic == "separate" and critic is None:
            critic = nnx.clone(policy)
        model = ActorCritic(policy, critic=critic if ppo.critic == "separate" else None,
                            rngs=nnx.Rngs(config.seed))
        self.reference = reference
        self.temperature = sampling.temperature if sampling.temperature > 0 else 1.0
        self.kl_coef = float(ppo.kl_coef)
        self.moments = RunningMoments()
        self._score = jitted_pass(_score_pass, model, reference if reference is not None else policy)
        self._advantages = jax.jit(compute_advantages, static_argnames="config")
        super().__init__(config, model, ppo_objective(ppo, self.temperature), prompts, reward=reward,
                         tokenizer=tokenizer, sampling=sampling, epochs=ppo.epochs,
                         num_minibatches=ppo.num_minibatches, gold=gold,
                         trainable=default_trainable(policy) if trainable is None else trainable,
                         update_scales=({"value_head": ppo.critic_lr_scale, "critic": ppo.critic_lr_scale}
                                        if ppo.critic_lr_scale != 1.0 else None),
                         extra_metadata=extra_metadata)

    @property
    def sampler_hidden_states(self) -> bool:
        """A shared critic reads its values off the hidden states the sampler computed anyway, when the
        sampler draws from the policy itself (its log-probs then serve too): scoring runs no policy pass."""
        return self.ppo.critic == "shared" and self.sampler_is_policy

    def policy_of(self, model: ActorCritic) -> nnx.Module:
        return model.policy

    def score(self, model: ActorCritic, rollout: Rollout, inputs) -> dict[str, Array]:
        reference = model.policy if self.reference is None else self.reference
        sampled = self.sampled_logps(rollout)
        static = {"prompt_length": int(rollout.prompt_tokens.shape[1]), "temperature": self.temperature,
                  "chunk_size": self.ppo.chunk_size, "reference_mode": self.reference_mode,
                  "policy_logps": sampled is None}
        # Only a shared critic's values live on the policy's hidden states.
        hidden = rollout.hidden_states if sampled is not None and model.critic is None else None
        scored = self._score(model, reference, inputs["input_ids"], inputs["attention_mask"], inputs["positions"],
                             hidden, static=static)
        return {"logps": sampled, **scored} if "logps" not in scored else scored

    def scores(self, rewards: RewardOutput, stopped: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """The sequence scores PPO optimises: the missing-EOS penalty on the raw score, then scaling by the
        running statistics, then clipping."""
        score = np.asarray(rewards.total, np.float64)
        metrics = {}
        if self.ppo.missing_eos_penalty is not None:
            score = np.where(np.asarray(stopped, bool), score, score - self.ppo.missing_eos_penalty)
        if self.ppo.reward_scaling != "none":
            self.moments.update(score)
            shift = self.moments.mean if self.ppo.reward_scaling == "running_norm" else 0.0
            score = (score - shift) / max(self.moments.std, 1e-8)
            metrics["reward/running_std"] = float(self.moments.std)
        if self.ppo.reward_clip is not None:
            score = clip_rewards(score, self.ppo.reward_clip)
        return score, metrics

    def prepare(self, rollout: Rollout, inputs, scored, rewards: RewardOutput):
        score, metrics = self.scores(rewards, np.asarray(rollout.stopped, bool))
        mask = rollout.response_mask
        out = self._advantages(jnp.asarray(score, F32), scored["logps"], scored["ref_logps"], scored["values"], mask,
                               jnp.float32(self.kl_coef), config=self.ppo)
        batch = {**inputs, "response_mask": mask.astype(jnp.int32), "old_logps": scored["logps"],
                 "old_values": scored["values"], "advantages": out["advantages"], "returns": out["returns"]}
        sequence_kl = jnp.sum(jnp.where(mask, out["kl"], 0.0), axis=1)
        device = {"kl_penalty": jnp.mean(-self.kl_coef * sequence_kl), "kl_estimate": jnp.mean(sequence_kl),
                  "advantage/mean": losses.masked_mean(out["advantages"], mask),
                  "returns/mean": losses.masked_mean(out["returns"], mask),
                  "value/mean": losses.masked_mean(scored["values"], mask)}
        metrics.update({name: float(value) for name, value in jax.device_get(device).items()})
        metrics.update({"score": float(np.mean(score)), "kl_coef": self.kl_coef})
        return batch, metrics

    def should_stop_epochs(self, metrics) -> bool:
        target = self.ppo.target_kl
        return target is not None and float(metrics["policy/approx_kl/k1"]) > 1.5 * target

    def after_iteration(self, metrics) -> dict[str, float]:
        # The controller observes the k1 estimate (the logged "kl") whatever the shaping estimator, over the
        # iteration's rows (TRL 0.11's AdaptiveKLController).
        if self.ppo.kl_target is not None:
            state = losses.adaptive_kl_update(losses.adaptive_kl_init(self.kl_coef), jnp.float32(metrics["kl"]),
                                              int(metrics["rows"]), target=self.ppo.kl_target,
                                              horizon=self.ppo.kl_horizon)
            self.kl_coef = float(state.kl_coef)
        return {"kl_coef_next": self.kl_coef}

    def algorithm_state(self) -> dict[str, Any]:
        return {"kl_coef": self.kl_coef, "reward_moments": self.moments.state_dict()}

    def load_algorithm_state(self, values: Mapping[str, Any]) -> None:
        self.kl_coef = float(values["kl_coef"])
        self.moments.load_state_dict(values["reward_moments"])
