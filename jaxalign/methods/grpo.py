"""GRPO on the online loop: G responses per prompt, weighted reward functions, group-normalised advantages.

::

    trainer = GRPOTrainer(train_config, GRPOConfig(loss_type="dapo", clip_eps_high=0.28), policy, prompts,
                          reward=WeightedRewards([vader, brevity], [1.0, 0.1]), tokenizer=tokenizer,
                          sampling=SamplingParams(max_new_tokens=48, n=8))
    trainer.run()

Per iteration: ``B`` prompts × ``G = sampling.n`` responses; the policy's log-probs (``old_logps``) come
from the sampler (recomputed in a no-grad pass when a top-k/top-p/min-p filter is set), the reference's
from a no-grad pass whenever there is a reference;
rewards ``[B·G]`` from the reward source(s); advantages ``A_i = (r_i − mean_group) / (std_group + ε)``
(``scale="group"``, GRPO), ``/ std_batch`` (``"batch"``) or unscaled (``"none"``, Dr. GRPO); then ``epochs``
(GRPO's μ) passes over shuffled minibatches of :func:`jaxalign.losses.grpo_loss` — clipped ratio with an
optional higher upper clip (DAPO's clip-higher), optional k3 KL to the reference with weight ``kl_coef`` —
aggregated per TRL's ``loss_type`` (``grpo``: per-sequence mean; ``bnpo``/``dapo``: token mean;
``dr_grpo``: token sum / (rows × max_new_tokens)). With ``shared_prompt`` (the default) the scoring pass and
the update run each group's prompt once for its ``G`` responses (:mod:`jaxalign.methods.groups`; exact, and
only where it saves work).

References: Shao et al. 2024 (GRPO, arXiv 2402.03300); Liu et al. 2025 (Dr. GRPO, arXiv 2503.20783); Yu et
al. 2025 (DAPO, arXiv 2503.14476); TRL 1.16 ``GRPOTrainer``.

Notes (deviations from TRL):
    - ``old_logps`` are the sampler's log-probs (no filters) or a no-grad recomputation (filters), also when
      μ = 1 with one minibatch, where TRL uses the current log-probs detached (the ratio is then 1 up to
      float rounding in both).
    - DAPO's "dapo" divides by the tokens of each minibatch (micro-batches accumulate exactly); TRL divides by
      the tokens of the whole accumulated generation batch. They agree with one minibatch.
    - The reference is scored whenever one is configured, for the logged KL, even with ``kl_coef = 0``
      (TRL skips the reference then); ``reference=None`` with a non-LoRA policy skips it.
    - Group rows (``shared_prompt``) run each prompt once per group where TRL runs it once per response: the
      same numbers up to float rounding; one iteration's minibatches then hold whole groups (hence only with
      one minibatch a pass, where the order of rows does not matter, or under ``minibatch_groups``).
    - ``minibatch_groups`` (off by default) shuffles an iteration's groups into minibatches whole, where TRL
      shuffles rows one by one: each minibatch then holds fewer prompts, all of their responses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import losses
from jaxalign.methods.groups import group_logps, group_rows, grouped, saves_work, ungroup
from jaxalign.methods.online import (
    OnlineTrainer,
    default_trainable,
    jitted_pass,
    reference_model,
    response_logps,
)
from jaxalign.methods.rewards import RewardOutput, RewardSource
from jaxalign.methods.specs import GRPOConfig
from jaxalign.models import has_lora
from jaxalign.rollout import Rollout, SamplingParams
from jaxalign.train.config import TrainConfig
from jaxalign.train.mesh import batch_shard_count

PER_TOKEN = ("response_mask", "old_logps", "ref_logps")


def grpo_objective(config: GRPOConfig, temperature: float, max_new_tokens: int):
    """The minibatch loss on rows with ``old_logps``, ``advantages [R]`` and (with β > 0) ``ref_logps``, or
    on group rows (:mod:`jaxalign.methods.groups`: ``branch_ids``, per-token arrays ``[B, G·N]``,
    ``advantages [B, G]``), whose log-probs and loss are the rows' own."""
    aggregation = losses.TRL_LOSS_TYPES[config.loss_type]

    def objective(lm, batch, *, key):
        del key
        tokens = batch["input_ids"]
        if "branch_ids" in batch:
            group = batch["advantages"].shape[1]
            logps, entropy = group_logps(lm, batch, group=group, temperature=temperature,
                                         chunk_size=config.chunk_size, with_entropy=True)
            rows = {name: ungroup(batch[name], group) for name in PER_TOKEN if name in batch}
            rows["advantages"] = batch["advantages"].reshape(-1)
        else:
            prompt_length = tokens.shape[1] - batch["old_logps"].shape[1]
            hidden, _ = lm.hidden_states(tokens, positions=batch["positions"],
                                         attention_mask=batch["attention_mask"])
            logps, entropy = response_logps(lm, hidden, tokens, prompt_length, temperature=temperature,
                                            chunk_size=config.chunk_size, with_entropy=True)
            rows = batch
        mask = rows["response_mask"].astype(bool)
        per_token, metrics = losses.grpo_loss(
            logps, rows["old_logps"], rows["ref_logps"] if config.kl_coef > 0 else None, rows["advantages"],
            mask, clip_eps=config.clip_eps, clip_eps_high=config.clip_eps_high, kl_coef=config.kl_coef,
            delta=config.delta, importance_sampling_level=config.importance_sampling_level)
        total, count = losses.aggregate(per_token, mask, mode=aggregation, max_tokens=max_new_tokens)
        metrics = {f"policy/{name}": value for name, value in metrics.items() if name != "loss"}
        metrics["entropy"] = losses.masked_mean(entropy, mask)
        return (total, count), jax.lax.stop_gradient(metrics)

    return objective


def _score_pass(lm, reference, tokens, attention_mask, positions, *, prompt_length: int, temperature: float,
                chunk_size: int | None, reference_mode: str, policy_logps: bool, group: int):
    """``[B·G, N]`` log-probs of the policy (``policy_logps``) and the reference; ``group`` > 0 runs each
    group's prompt once (:mod:`jaxalign.methods.groups`), 0 every row on its own."""
    inputs = {"input_ids": tokens, "attention_mask": attention_mask, "positions": positions}
    rows = group_rows(inputs, prompt_length=prompt_length, group=group) if group else None

    def logps_of(model):
        if rows is not None:
            return group_logps(model, rows, group=group, temperature=temperature, chunk_size=chunk_size)
        hidden, _ = model.hidden_states(tokens, positions=positions, attention_mask=attention_mask)
        return response_logps(model, hidden, tokens, prompt_length, temperature=temperature, chunk_size=chunk_size)

    out = {}
    if policy_logps:
        out["logps"] = logps_of(lm)
    if reference_mode != "none":
        out["ref_logps"] = logps_of(reference_model(lm, reference, reference_mode))
    return out


class GRPOTrainer(OnlineTrainer):
    """GRPO (see the module docstring) on :class:`~jaxalign.methods.online.OnlineTrainer`'s loop.

    Args:
        config: the training core's config (``total_steps`` = generation batches).
        grpo: :class:`GRPOConfig`.
        policy: the causal LM to train.
        prompts: endless, resumable prompt batches.
        reward: the reward (e.g. :class:`~jaxalign.methods.rewards.WeightedRewards` of several functions).
        tokenizer, sampling: as :class:`~jaxalign.methods.online.OnlineTrainer`; ``sampling.n`` = G ≥ 2.
        reference: the frozen reference LM; None uses the policy with its LoRA adapters off when it has
            some, else no reference (``kl_coef`` must then be 0; no KL is logged).
        use_reference: False scores no reference at all, even for a LoRA policy (``reference: none``).
        gold, extra_metadata: as :class:`~jaxalign.methods.online.OnlineTrainer`.
        trainable: None: every parameter, or for a LoRA policy its adapters
            (:func:`jaxalign.methods.online.default_trainable`).

    Attributes:
        group_size: ``G`` when ``grpo.shared_prompt`` may run each group's prompt once (minibatches of whole
            groups: one a pass, or ``grpo.minibatch_groups``; no sliding window), else 0; :meth:`shared_group`
            decides per iteration's shape.
    """

    label = "grpo"

    def __init__(self, config: TrainConfig, grpo: GRPOConfig, policy: nnx.Module, prompts, *, reward: RewardSource,
                 tokenizer, sampling: SamplingParams, reference: nnx.Module | None = None,
                 gold: RewardSource | None = None, trainable: Any = None,
                 extra_metadata: Mapping[str, Any] | None = None, use_reference: bool = True):
        if sampling.n < 2:
            raise ValueError(f"GRPO needs groups: sampling n (G) must be >= 2, got {sampling.n}")
        self.grpo = grpo
        self.reference = reference
        self.reference_mode = "none" if not use_reference else (
            "model" if reference is not None else ("lora_base" if has_lora(policy) else "none"))
        if self.reference_mode == "none" and grpo.kl_coef > 0:
            raise ValueError(f"GRPO kl_coef={grpo.kl_coef} needs a reference model (reference=...) or a LoRA policy")
        self.temperature = sampling.temperature if sampling.temperature > 0 else 1.0
        # Whole groups in every minibatch, and a mask that only sees branches: then sharing is exact.
        windowed = any(getattr(getattr(m, "config", None), "sliding_window", None) is not None
                       for m in (policy, reference) if m is not None)
        whole_groups = grpo.num_minibatches == 1 or grpo.minibatch_groups
        self.group_size = sampling.n if grpo.shared_prompt and whole_groups and not windowed else 0
        self.policy_config = policy.config
        self._score = jitted_pass(_score_pass, policy, reference if reference is not None else policy)
        self._advantages = jax.jit(losses.group_advantages, static_argnames=("group_size", "scale", "eps"))
        super().__init__(config, policy, grpo_objective(grpo, self.temperature, sampling.max_new_tokens), prompts,
                         reward=reward, tokenizer=tokenizer, sampling=sampling, epochs=grpo.epochs,
                         num_minibatches=grpo.num_minibatches, gold=gold,
                         trainable=default_trainable(policy) if trainable is None else trainable,
                         extra_metadata=extra_metadata)

    def shared_group(self, rollout: Rollout) -> int:
        """``G`` where this iteration runs each group's prompt once (:attr:`group_size` allows it, the group
        rows save work at this rollout's shape, :func:`~jaxalign.methods.groups.saves_work`, and the groups
        divide into the step's micro-batches and batch shards), else 0."""
        if not self.group_size:
            return 0
        prompt_length, response_length = int(rollout.prompt_tokens.shape[1]), int(rollout.tokens.shape[1])
        # Each minibatch's rows are split over micro-batches and batch shards: its groups must divide as its rows did.
        groups = int(rollout.tokens.shape[0]) // self.group_size
        per_minibatch, remainder = divmod(groups, self.grpo.num_minibatches)
        splits = self.train_step.micro_batches * batch_shard_count(self.train_step.mesh)
        divides = remainder == 0 and per_minibatch % splits == 0
        if divides and saves_work(self.policy_config, prompt_length=prompt_length, response_length=response_length,
                                  group=self.group_size):
            return self.group_size
        return 0

    def shuffle_unit(self, rollout: Rollout, rows: int) -> int:
        """``G`` when ``grpo.minibatch_groups``, several minibatches a pass and the iteration in plain rows (group
        rows are one group each already), else 1."""
        plain = rows == int(rollout.tokens.shape[0])
        # One minibatch holds every row whatever the order: the rows' own permutation keeps it bit for bit.
        return self.sampling.n if self.grpo.minibatch_groups and self.grpo.num_minibatches > 1 and plain else 1

    def score(self, model, rollout: Rollout, inputs) -> dict[str, jax.Array]:
        reference = self.reference if self.reference is not None else model
        sampled = self.sampled_logps(rollout)
        if sampled is not None and self.reference_mode == "none":
            return {"logps": sampled}
        static = {"prompt_length": int(rollout.prompt_tokens.shape[1]), "temperature": self.temperature,
                  "chunk_size": self.grpo.chunk_size, "reference_mode": self.reference_mode,
                  "policy_logps": sampled is None, "group": self.shared_group(rollout)}
        scored = self._score(model, reference, inputs["input_ids"], inputs["attention_mask"], inputs["positions"],
                             static=static)
        return scored if sampled is None else {"logps": sampled, **scored}

    def prepare(self, rollout: Rollout, inputs, scored, rewards: RewardOutput):
        group = self.sampling.n
        total = np.asarray(rewards.total, np.float32)
        advantages = self._advantages(jnp.asarray(total), group_size=group, scale=self.grpo.scale,
                                      eps=self.grpo.eps)
        batch = {**inputs, "response_mask": rollout.response_mask.astype(np.int32), "old_logps": scored["logps"],
                 "advantages": advantages}
        if "ref_logps" in scored:
            batch["ref_logps"] = scored["ref_logps"]
        group_size = self.shared_group(rollout)
        if group_size:
            batch = self.group_batch(batch, prompt_length=int(rollout.prompt_tokens.shape[1]), group=group_size)
        by_group = total.reshape(-1, group)
        metrics = {"advantage/abs_mean": float(jnp.mean(jnp.abs(advantages))),
                   "reward/group_std": float(np.mean(np.std(by_group, axis=1))),
                   "groups/all_equal": float(np.mean(np.ptp(by_group, axis=1) == 0))}
        return batch, metrics

    @staticmethod
    def group_batch(batch: dict, *, prompt_length: int, group: int) -> dict:
        """The iteration's rows as group rows (:func:`~jaxalign.methods.groups.group_rows`): per-token arrays
        ``[B, G·N]``, ``advantages [B, G]``; minibatches then draw whole groups."""
        rows = group_rows(batch, prompt_length=prompt_length, group=group)
        per_token = {name: grouped(batch[name], group) for name in PER_TOKEN if name in batch}
        return {**rows, **per_token, "advantages": batch["advantages"].reshape(-1, group)}
