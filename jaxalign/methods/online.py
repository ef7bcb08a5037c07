"""The online RL loop shared by PPO and GRPO: sample -> score -> train on minibatches, resumable.

One *iteration*::

    prompts  = next(prompt batches)                            # [B, P] left-padded (jaxalign.data "prompt" kind)
    rollout  = sampler.generate(prompts, key=fold_in(key, i))  # jaxalign.rollout: one compiled loop
    scored   = score(policy, reference, rollout)               # one no-grad pass: reference log-probs, values
    rewards  = reward(Episodes(...))                           # jaxalign.methods.rewards: a model, functions, ADLF
    batch    = prepare(rollout, scored, rewards)               # advantages (GAE or group-normalised)
    for epoch: for minibatch in shuffled rows: state = train_step(state, minibatch)
    sampler.update_weights(policy of state)

The loop itself is the core's one :class:`~jaxalign.train.Trainer`: :class:`OnlineTrainer` is its
:class:`~jaxalign.train.StepSource`, whose step is one iteration and whose minibatches are the iteration's
shuffled rows; the guards, logging, checkpoints, signals and resume are the offline methods' own code.
``TrainConfig.total_steps`` counts iterations here (the learning-rate schedule runs over the optimizer
updates: iterations × epochs × minibatches). Everything an iteration draws is a function of the run's seed
and the iteration index (the sampling key, the minibatch order) or is saved with the checkpoint (the
parameters, the optimizer, the step RNG, the prompt iterator's position and the algorithm's own state:
the adaptive KL coefficient, reward statistics), so a resumed run continues exactly as if it had not
stopped. Checkpoints are written at iteration boundaries; ``checkpoint.save_every_steps`` counts iterations.

Logged per iteration (besides each method's own): ``reward`` (the training reward), its components,
``gold_reward`` (when a gold judge is given), ``kl`` (mean over responses of the summed per-token k1
estimate against the reference), ``entropy`` (mean per response token, over the iteration's updates: the
first one sees the sampling policy), ``response_length``,
``stopped_fraction``, the averaged minibatch metrics (``grad_norm``, ``loss`` ...), ``updates`` and
``time/generate``, ``time/score``, ``time/train`` (seconds).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Float, Int

from jaxalign.data import Batch
from jaxalign.methods.common import lora_base
from jaxalign.methods.rewards import Episodes, RewardOutput, RewardSource, run_source
from jaxalign.models import has_lora
from jaxalign.models.scoring import DEFAULT_CHUNK, head_logps
from jaxalign.models.sharding import DEFAULT_RULES
from jaxalign.rollout import Rollout, Sampler, SamplingParams
from jaxalign.train.config import TrainConfig
from jaxalign.train.state import TrainState
from jaxalign.train.step import Objective, TrainStep
from jaxalign.train.trainer import StepSource, Trainer

F32 = jnp.float32


Array = jax.Array


def positions_of(attention_mask: Array) -> Array:
    """RoPE positions of a left-padded row: ``cumsum(mask) − 1``, 0 on the padding before it."""
    return jnp.maximum(jnp.cumsum(jnp.asarray(attention_mask, jnp.int32), axis=-1) - 1, 0)


def response_logps(lm, hidden: Array, tokens: Array, prompt_length: int, *, temperature: float = 1.0,
                   chunk_size: int | None = DEFAULT_CHUNK, with_entropy: bool = False):
    """Log-probs (and entropies) of the response tokens ``tokens[:, P:]`` from the trunk's ``hidden``.

    The logits predicting response token ``t`` sit at position ``P − 1 + t``; the prompt's own positions
    never reach the LM head.
    """
    return head_logps(lm, hidden[:, prompt_length - 1:-1], tokens[:, prompt_length:], chunk_size=chunk_size,
                      temperature=temperature, with_entropy=with_entropy)


def reference_logps(policy: nnx.Module, reference: nnx.Module | None, tokens: Array, attention_mask: Array,
                    positions: Array, *, mode: str, prompt_length: int, temperature: float,
                    chunk_size: int | None) -> Array:
    """``[R, N]`` log-probs of the response tokens under the reference, the one reference pass of PPO and GRPO.

    ``mode`` is the run's notion of the reference (:data:`jaxalign.methods.common.REFERENCE_MODES`):
    ``"model"``, the frozen ``reference``; ``"lora_base"``, the ``policy`` with its LoRA adapters off.
    """
    reference = reference_model(policy, reference, mode)
    hidden, _ = reference.hidden_states(tokens, positions=positions, attention_mask=attention_mask)
    return response_logps(reference, hidden, tokens, prompt_length, temperature=temperature, chunk_size=chunk_size)


def reference_model(policy: nnx.Module, reference: nnx.Module | None, mode: str) -> nnx.Module:
    """The model that scores the reference (see :func:`reference_logps`' ``mode``)."""
    if mode not in ("model", "lora_base"):
        raise ValueError(f"reference_logps: mode must be 'model' or 'lora_base', got {mode!r}")
    return lora_base(policy) if mode == "lora_base" else reference


def sequence_inputs(rollout: Rollout) -> dict[str, Array]:
    """Prompt + response rows of a rollout, ``input_ids``, ``attention_mask``, ``positions``, on the device."""
    tokens, mask = rollout.sequences()
    return {"input_ids": tokens.astype(jnp.int32), "attention_mask": mask.astype(jnp.int32),
            "positions": positions_of(mask)}


@dataclasses.dataclass(frozen=True, eq=False)
class RolloutBatch(Batch):
    """An online iteration's training rows: prompt + response ``[R, S]`` (``S = P + N``), per response token
    ``[R, N]``; ``advantages`` per token (PPO) or per row (GRPO). Checked once per iteration
    (:meth:`~jaxalign.data.Batch.check`); minibatches are :meth:`~jaxalign.data.Batch.select` of its rows."""

    kind = "rollout"

    input_ids: Int[Any, "R S"]
    attention_mask: Int[Any, "R S"]
    positions: Int[Any, "R S"]
    response_mask: Int[Any, "R N"]
    old_logps: Float[Any, "R N"]
    advantages: Float[Any, "R ..."]
    returns: Float[Any, "R N"] | None = None
    old_values: Float[Any, "R N"] | None = None
    ref_logps: Float[Any, "R N"] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def rollout_metrics(rollout: Rollout, scored: Mapping[str, Array], rewards: RewardOutput,
                    gold: RewardOutput | None) -> dict[str, float]:
    """What every online method logs about its samples (see the module docstring): device reductions, one
    fetch of their scalars."""
    device = {"response_length": jnp.mean(jnp.asarray(rollout.lengths, F32)),
              "stopped_fraction": jnp.mean(jnp.asarray(rollout.stopped, F32))}
    if "ref_logps" in scored:
        log_ratio = jnp.where(rollout.response_mask, scored["logps"] - scored["ref_logps"], 0.0)
        device["kl"] = jnp.mean(jnp.sum(log_ratio, axis=1))
    metrics = {name: float(value) for name, value in jax.device_get(device).items()}
    total = np.asarray(rewards.total, np.float64)
    metrics.update({"reward": float(total.mean()), "reward/std": float(total.std()), "rows": len(total)})
    metrics.update({f"reward/{name}": float(np.mean(value)) for name, value in rewards.components.items()})
    if gold is not None:
        metrics["gold_reward"] = float(np.mean(gold.total))
    return metrics


def default_trainable(policy: nnx.Module) -> Any:
    """Every parameter, or for a LoRA policy its adapters plus the critic (value head, separate critic):
    the LoRA base is then the frozen reference, so it must not move."""
    if has_lora(policy):
        return nnx.Any(nnx.LoRAParam, nnx.PathContains("value_head"), nnx.PathContains("critic"))
    return nnx.Param


class OnlineTrainer(StepSource):
    """The loop of the module docstring: a :class:`~jaxalign.train.StepSource` whose step is one iteration,
    run by the core's one :class:`~jaxalign.train.Trainer`. :class:`~jaxalign.methods.ppo.PPOTrainer` and
    :class:`~jaxalign.methods.grpo.GRPOTrainer` supply the model, the objective, the scoring pass and the
    advantages.

    Args:
        config: the training core's config (``total_steps`` = iterations).
        model: the module trained (the policy, or the policy with a critic).
        objective: the minibatch loss (see :class:`~jaxalign.train.step.TrainStep`).
        prompts: an iterator of prompt batches (``input_ids``/``attention_mask`` ``[B, P]``, left-padded)
            with ``state_dict()``/``load_state_dict()`` (jaxalign.data's ``BatchIterator``), endless.
        reward: the training reward (:mod:`jaxalign.methods.rewards`).
        tokenizer: decodes prompts and responses for text rewards.
        sampling: how responses are sampled (``n`` = samples per prompt).
        epochs, num_minibatches: passes over each iteration's rows and minibatches per pass.
            The rows of a minibatch (prompts × n / num_minibatches) must be a multiple of
            ``micro_batches`` × the data-parallel devices.
        gold: a reward source only logged (``gold_reward``), e.g. the gold judge.
        trainable: NNX filter of the trained parameters (see :func:`default_trainable`).
        extra_metadata: recorded with every checkpoint.
        update_scales: ``{module name: factor}``: the optimizer's updates of parameters under a module of that
            name are multiplied by the factor (e.g. a critic learning rate apart from the policy's).
    """

    unit = "iteration"
    label = "online"  # the progress bar's label; each method names itself
    # Subclasses that read the policy's hidden states from the sampler (Rollout.hidden_states) set it.
    sampler_hidden_states: bool = False

    def __init__(self, config: TrainConfig, model: nnx.Module, objective: Objective, prompts, *,
                 reward: RewardSource, tokenizer, sampling: SamplingParams, epochs: int, num_minibatches: int,
                 gold: RewardSource | None = None, trainable: Any = nnx.Param, rules: Mapping = DEFAULT_RULES,
                 extra_metadata: Mapping[str, Any] | None = None, update_scales: Mapping[str, float] | None = None):
        if jax.process_count() > 1:
            raise NotImplementedError("online training runs in one process (one host, any number of local "
                                      "devices); multi-host sampling is not supported yet")
        if not isinstance(epochs, int) or epochs < 1 or not isinstance(num_minibatches, int) or num_minibatches < 1:
            raise ValueError(f"epochs and num_minibatches must be positive ints, got {epochs}, {num_minibatches}")
        self.prompts, self.reward, self.gold, self.tokenizer, self.sampling = prompts, reward, gold, tokenizer, sampling
        self.epochs, self.num_minibatches = epochs, num_minibatches
        self.updates_per_step = epochs * num_minibatches
        self.key = jax.random.key(config.seed)
        self.trainer = Trainer(config, model, objective, self, trainable=trainable, rules=rules,
                               extra_metadata=extra_metadata, update_scales=update_scales, label=self.label)
        self._sampler: Sampler | None = None
        self._prompt_batches = None
        self._iteration: dict[str, Any] = {}  # what step_metrics reports about the iteration being trained

    # ------------------------------------------------------------------ the core's run, seen from here

    config = property(lambda self: self.trainer.config)
    mesh = property(lambda self: self.trainer.mesh)
    train_step = property(lambda self: self.trainer.train_step)
    checkpointer = property(lambda self: self.trainer.checkpointer)
    metadata = property(lambda self: self.trainer.metadata)
    schedule = property(lambda self: self.trainer.schedule)
    state = property(lambda self: self.trainer.state)

    def run(self) -> TrainState:
        """Train to ``config.total_steps`` iterations, resuming from the latest checkpoint if there is one.

        Raises:
            NonFiniteError: a non-finite loss or gradient, or a diverging update (``TrainingDiverged``), with
                ``on_nonfinite="raise"``.
            TrainingInterrupted: SIGTERM/SIGINT arrived; the last completed iteration is saved.
        """
        return self.trainer.run()

    def trained_model(self) -> nnx.Module:
        """The trained module after :meth:`run`."""
        return self.trainer.trained_model()

    # ------------------------------------------------------------------ what a method provides

    def policy_of(self, model: nnx.Module) -> nnx.Module:
        """The causal LM that samples (the trained module itself, or its policy part)."""
        return model

    def score(self, model: nnx.Module, rollout: Rollout, inputs: Mapping[str, Array]) -> dict[str, Array]:
        """No-grad pass over the rollout: ``logps`` (see :meth:`sampled_logps`), ``ref_logps`` ``[R, N]`` and,
        for PPO, ``values``."""
        raise NotImplementedError

    @property
    def sampler_is_policy(self) -> bool:
        """Whether the sampler draws from the training objective's distribution (temperature ``T > 0`` and
        no top-k/top-p/min-p filter: ``softmax(logits / T)`` either way), so that what it computed on the
        way — its log-probs, its hidden states — stands for a policy forward pass, to float rounding."""
        params = self.sampling
        return params.temperature > 0 and params.top_k == 0 and params.top_p == 1.0 and params.min_p == 0.0

    def sampled_logps(self, rollout: Rollout) -> Array | None:
        """The policy's log-probs of its own tokens as the sampler computed them when
        :attr:`sampler_is_policy` (the scoring pass then needs no policy forward); else None."""
        return jnp.asarray(rollout.sampling_logps, F32) if self.sampler_is_policy else None

    def prepare(self, rollout: Rollout, inputs: Mapping[str, Array], scored: Mapping[str, Array],
                rewards: RewardOutput) -> tuple[dict[str, Array], dict[str, float]]:
        """The training rows of the iteration (device arrays ``[R, ...]``) and the metrics of the advantages."""
        raise NotImplementedError

    def after_iteration(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """Update the algorithm's state from the iteration's metrics (e.g. adaptive KL); extra metrics."""
        return {}

    def should_stop_epochs(self, minibatch_metrics: Mapping[str, float]) -> bool:
        """Early stop of the epochs of this iteration (PPO's approx-KL target)."""
        return False

    def algorithm_state(self) -> dict[str, Any]:
        """JSON-serialisable state saved with each checkpoint."""
        return {}

    def load_algorithm_state(self, values: Mapping[str, Any]) -> None:
        del values

    # ------------------------------------------------------------------ the StepSource of the core's loop

    def start(self, train_step: TrainStep) -> None:
        self._prompt_batches = iter(self.prompts)

    def state_dict(self) -> dict[str, Any]:
        """The run's "data position": the prompt iterator and the algorithm's state."""
        return {"prompts": self.prompts.state_dict(), "algorithm": self.algorithm_state()}

    def load_state_dict(self, values: Mapping[str, Any]) -> None:
        self.prompts.load_state_dict(values["prompts"])
        self.load_algorithm_state(values["algorithm"])

    def ended_message(self, step: int, total_steps: int) -> str:
        return (f"the prompts ended after iteration {step}, before total_steps={total_steps} (data.num_epochs is "
                "set; leave it unset to cycle)")

    def minibatches(self, state: TrainState, step: int) -> Iterator[RolloutBatch]:
        """Sample, score, reward and prepare iteration ``step + 1``; then its shuffled minibatches."""
        prompts = next(self._prompt_batches)
        started = time.perf_counter()
        # Dropout off (LoRA adapters may carry some): old log-probs are those of the policy that sampled.
        model = nnx.view(self.train_step.trained_model(state), deterministic=True, raise_if_not_found=False)
        if self._sampler is None:
            self._sampler = Sampler(self.policy_of(model), mesh=self.mesh if self.mesh.size > 1 else None)
        else:
            self._sampler.update_weights(self.policy_of(model))
        rollout = self._sampler.generate(prompts["input_ids"], prompts["attention_mask"],
                                         key=jax.random.fold_in(self.key, step), params=self.sampling,
                                         return_hidden=self.sampler_hidden_states)
        jax.block_until_ready(rollout.tokens)
        generated = time.perf_counter()

        inputs = sequence_inputs(rollout)
        scored = self.score(model, rollout, inputs)
        rollout = dataclasses.replace(rollout, hidden_states=None)  # [R, N, D]: not kept through training
        episodes = Episodes.from_rollout(rollout, self.tokenizer, ref_logps=scored.get("ref_logps"),
                                         group_size=self.sampling.n)
        rewards = run_source(self.reward, episodes)
        gold = run_source(self.gold, episodes) if self.gold is not None else None
        prepared, advantage_metrics = self.prepare(rollout, inputs, scored, rewards)
        batch = RolloutBatch.from_arrays(prepared).check()
        rows = int(batch["input_ids"].shape[0])
        unit = self.shuffle_unit(rollout, rows)
        if (rows // unit) % self.num_minibatches:
            what = "rows per iteration (prompts × samples)" if unit == 1 else f"groups of {unit} rows per iteration"
            raise ValueError(f"{rows // unit} {what} is not a multiple of num_minibatches={self.num_minibatches}")
        scored_at = time.perf_counter()
        self._iteration = {"metrics": {**rollout_metrics(rollout, scored, rewards, gold), **advantage_metrics},
                           "started": started, "generated": generated, "scored": scored_at, "stopped": False}
        return self._shuffled(batch, rows, step, unit)

    def shuffle_unit(self, rollout: Rollout, rows: int) -> int:
        """Consecutive rows of the prepared batch (``rows`` of them) that are shuffled into minibatches together:
        1 (rows one by one, as TRL), or GRPO's ``G`` where its minibatches draw whole groups."""
        return 1

    def _shuffled(self, batch: RolloutBatch, rows: int, step: int, unit: int = 1) -> Iterator[RolloutBatch]:
        size = rows // self.num_minibatches
        for epoch in range(self.epochs):
            # The order is a function of (seed, iteration, epoch): a resumed run shuffles identically. Units of
            # one row draw the permutation they always did.
            units = np.random.default_rng([self.config.seed, step, epoch]).permutation(rows // unit)
            order = (units[:, None] * unit + np.arange(unit)).reshape(-1)
            for start in range(0, rows, size):
                # A gather on the device: the rows never leave it.
                yield batch.select(order[start:start + size])

    def stop_early(self, metrics: Mapping[str, Any]) -> bool:
        stop = self.should_stop_epochs(metrics)
        self._iteration["stopped"] |= stop
        return stop

    def step_metrics(self, state: TrainState, step: int, updates: list[Mapping[str, Any]]) -> dict[str, Any]:
        """The iteration's rollout and advantage metrics, its updates' mean metrics, the algorithm's
        end-of-iteration update (:meth:`after_iteration`) and the time of each phase."""
        trained = time.perf_counter()
        iteration = self._iteration
        averaged = {name: float(np.mean([float(update[name]) for update in updates])) for name in updates[0]
                    if name not in ("finite", "diverging", "tokens")}
        metrics = {**iteration["metrics"], **averaged, "updates": len(updates),
                   "early_stopped": float(iteration["stopped"])}
        metrics.update(self.after_iteration(metrics))
        metrics.update({"time/generate": iteration["generated"] - iteration["started"],
                        "time/score": iteration["scored"] - iteration["generated"],
                        "time/train": trained - iteration["scored"], "time/iteration": trained - iteration["started"]})
        return metrics


def jitted_pass(fn: Callable, *modules: nnx.Module) -> Callable:
    """``fn(*modules, *arrays)`` compiled once per module structure: ``call(*modules, *arrays)`` splits the
    modules, passes their states through ``jax.jit`` and merges them inside (no retrace per new weights)."""
    cache: dict[Any, Callable] = {}

    def call(*args, static: Mapping[str, Any] | None = None):
        parts = [nnx.split(m) for m in args[:len(modules)]]
        graphdefs = tuple(p[0] for p in parts)
        static = dict(static or {})
        key = (graphdefs, tuple(sorted(static.items())))
        if key not in cache:
            @jax.jit
            def compiled(states, *arrays):
                merged = [nnx.merge(g, s) for g, s in zip(graphdefs, states)]
                return fn(*merged, *arrays, **static)
            cache[key] = compiled
        return cache[key](tuple(p[1] for p in parts), *args[len(modules):])

    return call
