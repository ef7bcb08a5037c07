"""The online RL loop shared by PPO and GRPO: sample -> score -> train on minibatches, resumable.

One *iteration*::

    prompts  = next(prompt batches)                            # [B, P] left-padded (jaxalign.data "prompt" kind)
    rollout  = sampler.generate(prompts, key=fold_in(key, i))  # jaxalign.rollout: one compiled loop
    scored   = score(policy, reference, rollout)               # one no-grad pass: reference log-probs, values
    rewards  = reward(Episodes(...))                           # jaxalign.methods.rewards: a model, functions, ADLF
    batch    = prepare(rollout, scored, rewards)               # advantages (GAE or group-normalised)
    for epoch: for minibatch in shuffled rows: state = train_step(state, minibatch)
    sampler.update_weights(policy of state)

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

import contextlib
import dataclasses
import signal
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxalign.methods.rewards import Episodes, RewardOutput, RewardSource, run_source
from jaxalign.models import has_lora
from jaxalign.models.sharding import DEFAULT_RULES
from jaxalign.rollout import Rollout, Sampler, SamplingParams
from jaxalign.rollout.scoring import DEFAULT_CHUNK, head_logps
from jaxalign.train.checkpoint import Checkpointer, run_metadata
from jaxalign.train.config import MeshConfig, TrainConfig
from jaxalign.train.distributed import any_process
from jaxalign.train.mesh import make_mesh
from jaxalign.train.metrics import MetricsLogger
from jaxalign.train.optimizer import make_optimizer
from jaxalign.train.schedules import make_schedule
from jaxalign.train.signals import StopSignals, TrainingInterrupted
from jaxalign.train.state import TrainState
from jaxalign.train.step import Objective, TrainStep
from jaxalign.train.trainer import check_step

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


def sequence_inputs(rollout: Rollout) -> dict[str, np.ndarray]:
    """Prompt + response rows of a rollout as host arrays ``input_ids``, ``attention_mask``, ``positions``."""
    tokens, mask = rollout.sequences()
    return {"input_ids": np.asarray(tokens, np.int32), "attention_mask": np.asarray(mask, np.int32),
            "positions": np.asarray(positions_of(mask), np.int32)}


def _mean(values: np.ndarray, mask: np.ndarray | None = None) -> float:
    values = np.asarray(values, np.float64)
    if mask is not None:
        values = values[np.asarray(mask, bool)]
    return float(values.mean()) if values.size else 0.0


def rollout_metrics(rollout: Rollout, scored: Mapping[str, np.ndarray], rewards: RewardOutput,
                    gold: RewardOutput | None) -> dict[str, float]:
    """What every online method logs about its samples (see the module docstring)."""
    mask = np.asarray(rollout.response_mask, bool)
    metrics = {"reward": _mean(rewards.total), "reward/std": float(np.std(rewards.total)),
               "response_length": _mean(np.asarray(rollout.lengths)),
               "stopped_fraction": _mean(np.asarray(rollout.stopped))}
    metrics.update({f"reward/{name}": _mean(value) for name, value in rewards.components.items()})
    if "ref_logps" in scored:
        log_ratio = np.where(mask, scored["logps"] - scored["ref_logps"], 0.0)
        metrics["kl"] = float(np.sum(log_ratio, axis=1).mean())
    if gold is not None:
        metrics["gold_reward"] = _mean(gold.total)
    return metrics


class AlgorithmConfig:
    """What :class:`~jaxalign.methods.ppo.PPOConfig` and :class:`~jaxalign.methods.grpo.GRPOConfig` share:
    validation messages naming the field, the pass counts, and building from a config mapping."""

    label = ""  # the algorithm's name in messages ("PPO")

    def _require(self, ok: bool, name: str, what: str) -> None:
        if not ok:
            raise ValueError(f"{type(self).__name__}.{name} must be {what}, got {getattr(self, name)!r}")

    def _require_passes(self) -> None:
        for name in ("epochs", "num_minibatches"):
            value = getattr(self, name)
            self._require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name,
                          "a positive int")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "loss"):
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown {cls.label} option(s) {unknown} (known: {', '.join(known)})")
        return cls(**values)


def scale_updates_by_path(scales: Mapping[str, float]) -> optax.GradientTransformation:
    """Multiply the updates of parameters whose path passes through a module named in ``scales`` (chained after
    the optimizer, so with Adam it scales the learning rate of those parameters, weight decay included)."""

    def factor(path) -> float:
        names = {str(getattr(key, "key", getattr(key, "name", key))) for key in path}
        return next((scale for name, scale in scales.items() if name in names), 1.0)

    def scaled(path, update):
        scale = factor(path)
        return update if scale == 1.0 else update * scale

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(scaled, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def default_trainable(policy: nnx.Module) -> Any:
    """Every parameter, or for a LoRA policy its adapters plus the critic (value head, separate critic):
    the LoRA base is then the frozen reference, so it must not move."""
    if has_lora(policy):
        return nnx.Any(nnx.LoRAParam, nnx.PathContains("value_head"), nnx.PathContains("critic"))
    return nnx.Param


class _Progress:
    """What a checkpoint saves as the run's "data position": the prompt iterator and the algorithm state."""

    def __init__(self, prompts, algorithm: OnlineTrainer):
        self.prompts, self.algorithm = prompts, algorithm

    def state_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts.state_dict(), "algorithm": self.algorithm.algorithm_state()}

    def load_state_dict(self, values: Mapping[str, Any]) -> None:
        self.prompts.load_state_dict(values["prompts"])
        self.algorithm.load_algorithm_state(values["algorithm"])


class OnlineTrainer:
    """The loop of the module docstring; :class:`~jaxalign.methods.ppo.PPOTrainer` and
    :class:`~jaxalign.methods.grpo.GRPOTrainer` supply the model, the objective and the advantages.

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
        self.mesh = make_mesh(config.mesh)
        self.config = dataclasses.replace(config, mesh=MeshConfig(*self.mesh.devices.shape))
        self.reward, self.gold, self.tokenizer, self.sampling = reward, gold, tokenizer, sampling
        self.epochs, self.num_minibatches = epochs, num_minibatches
        self.progress = _Progress(prompts, self)
        total_updates = config.total_steps * epochs * num_minibatches
        self.schedule = make_schedule(config.optimizer, total_updates)
        optimizer = make_optimizer(config.optimizer, total_updates)
        if update_scales:
            optimizer = optax.chain(optimizer, scale_updates_by_path(update_scales))
        self.train_step = TrainStep(objective, model, optimizer, mesh=self.mesh,
                                    trainable=trainable, micro_batches=config.micro_batches, rules=rules,
                                    count_tokens=lambda batch: jnp.sum(batch["attention_mask"], dtype=F32),
                                    max_update_ratio=config.max_update_ratio)
        self.metadata = run_metadata(self.config, self.mesh, model_config=getattr(model, "config", None),
                                     extra=extra_metadata)
        self.checkpointer = None if config.checkpoint.directory is None else Checkpointer(config.checkpoint,
                                                                                          self.metadata)
        self.key = jax.random.key(config.seed)
        self.state: TrainState | None = None

    # ------------------------------------------------------------------ what a method provides

    def policy_of(self, model: nnx.Module) -> nnx.Module:
        """The causal LM that samples (the trained module itself, or its policy part)."""
        return model

    def score(self, model: nnx.Module, rollout: Rollout, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
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

    def sampled_logps(self, rollout: Rollout) -> np.ndarray | None:
        """The policy's log-probs of its own tokens as the sampler computed them when
        :attr:`sampler_is_policy` (the scoring pass then needs no policy forward); else None."""
        return np.asarray(rollout.sampling_logps, np.float32) if self.sampler_is_policy else None

    def prepare(self, rollout: Rollout, inputs: Mapping[str, np.ndarray], scored: Mapping[str, np.ndarray],
                rewards: RewardOutput) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """The training rows of the iteration (arrays ``[R, ...]``) and the metrics of the advantages."""
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

    # ------------------------------------------------------------------ the loop

    def trained_model(self) -> nnx.Module:
        """The trained module after :meth:`run`."""
        if self.state is None:
            raise RuntimeError("trained_model() needs a finished run(): call run() first")
        return self.train_step.trained_model(self.state)

    def run(self) -> TrainState:
        """Train to ``config.total_steps`` iterations, resuming from the latest checkpoint if there is one.

        Raises:
            NonFiniteError: a non-finite loss or gradient, or a diverging update (``TrainingDiverged``), with
                ``on_nonfinite="raise"``.
            TrainingInterrupted: SIGTERM/SIGINT arrived; the last completed iteration is saved.
        """
        state, iteration = self._start()
        config = self.config
        logger = MetricsLogger(config.log, total_steps=config.total_steps, start_step=iteration,
                               run_config=self.metadata)
        sampler = Sampler(self.policy_of(self.train_step.trained_model(state)),
                          mesh=self.mesh if self.mesh.size > 1 else None)
        prompts = iter(self.progress.prompts)
        save_on_signal = self.checkpointer is not None and config.checkpoint.save_on_signal
        with StopSignals() if save_on_signal else contextlib.nullcontext() as stop:
            try:
                while iteration < config.total_steps:
                    try:
                        batch = next(prompts)
                    except StopIteration:
                        warnings.warn(f"the prompts ended after iteration {iteration}, before total_steps="
                                      f"{config.total_steps} (data.num_epochs is set; leave it unset to cycle)",
                                      stacklevel=2)
                        break
                    state, metrics = self._iteration(state, iteration, batch, sampler)
                    iteration += 1
                    if iteration % config.log.every_steps == 0 or iteration == config.total_steps:
                        logger.log(iteration, metrics)
                    logger.advance()
                    if self.checkpointer is not None and self.checkpointer.should_save(iteration):
                        self.checkpointer.save(iteration, state, self.progress)
                    if save_on_signal and any_process(stop.received is not None):
                        self.checkpointer.save(iteration, state, self.progress)
                        self.checkpointer.wait()
                        raise TrainingInterrupted(stop.received or signal.SIGTERM, iteration)
                if self.checkpointer is not None:
                    self.checkpointer.save(iteration, state, self.progress)
            finally:
                if self.checkpointer is not None:
                    self.checkpointer.wait()
                logger.close()
        self.state = state
        return state

    def _iteration(self, state: TrainState, iteration: int, prompts: Mapping[str, np.ndarray],
                   sampler: Sampler) -> tuple[TrainState, dict[str, Any]]:
        started = time.perf_counter()
        rollout = sampler.generate(prompts["input_ids"], prompts["attention_mask"],
                                   key=jax.random.fold_in(self.key, iteration), params=self.sampling,
                                   return_hidden=self.sampler_hidden_states)
        jax.block_until_ready(rollout.tokens)
        generated = time.perf_counter()

        inputs = sequence_inputs(rollout)
        # Dropout off (LoRA adapters may carry some): old log-probs are those of the policy that sampled.
        model = nnx.view(self.train_step.trained_model(state), deterministic=True, raise_if_not_found=False)
        scored = self.score(model, rollout, inputs)
        rollout = dataclasses.replace(rollout, hidden_states=None)  # [R, N, D]: not kept through training
        episodes = Episodes.from_rollout(rollout, self.tokenizer, ref_logps=scored.get("ref_logps"),
                                         group_size=self.sampling.n)
        rewards = run_source(self.reward, episodes)
        gold = run_source(self.gold, episodes) if self.gold is not None else None
        batch, advantage_metrics = self.prepare(rollout, inputs, scored, rewards)
        scored_at = time.perf_counter()

        state, train_metrics = self._train(state, batch, iteration)
        trained = time.perf_counter()
        sampler.update_weights(self.policy_of(self.train_step.trained_model(state)))

        metrics = {**rollout_metrics(rollout, scored, rewards, gold), **advantage_metrics, **train_metrics}
        metrics.update(self.after_iteration(metrics))
        metrics.update({"time/generate": generated - started, "time/score": scored_at - generated,
                        "time/train": trained - scored_at, "time/iteration": time.perf_counter() - started,
                        "learning_rate": float(self.schedule(max(int(state.step) - 1, 0)))})
        return state, metrics

    def _train(self, state: TrainState, batch: Mapping[str, np.ndarray], iteration: int,
               ) -> tuple[TrainState, dict[str, float]]:
        rows = len(next(iter(batch.values())))
        if rows % self.num_minibatches:
            raise ValueError(f"{rows} rows per iteration (prompts × samples) is not a multiple of "
                             f"num_minibatches={self.num_minibatches}")
        size = rows // self.num_minibatches
        sums: dict[str, float] = {}
        updates = 0
        stopped = False
        for epoch in range(self.epochs):
            # The order is a function of (seed, iteration, epoch): a resumed run shuffles identically.
            order = np.random.default_rng([self.config.seed, iteration, epoch]).permutation(rows)
            for start in range(0, rows, size):
                rows_of = order[start:start + size]
                state, device_metrics = self.train_step(state, {k: v[rows_of] for k, v in batch.items()})
                metrics = jax.device_get(device_metrics)
                updates += 1
                check_step(self.config, iteration + 1, metrics, self.progress.state_dict, self.checkpointer,
                           unit="iteration")
                for name, value in metrics.items():
                    sums[name] = sums.get(name, 0.0) + float(value)
                if self.should_stop_epochs(metrics):
                    stopped = True
                    break
            if stopped:
                break
        averaged = {name: value / updates for name, value in sums.items()
                    if name not in ("finite", "diverging", "tokens")}
        averaged.update({"updates": updates, "early_stopped": float(stopped)})
        return state, averaged

    def _start(self) -> tuple[TrainState, int]:
        checkpointer = self.checkpointer
        if checkpointer is None or not self.config.checkpoint.resume or checkpointer.latest_step() is None:
            return self.train_step.init(self.config.seed), 0
        self.train_step.discard_initial_values()
        restored = checkpointer.restore(self.train_step.abstract_state())
        self.progress.load_state_dict(restored.data_position)
        return restored.state, restored.step


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


def to_host(values: Mapping[str, Array]) -> dict[str, np.ndarray]:
    return {name: np.asarray(value) for name, value in jax.device_get(dict(values)).items()}
