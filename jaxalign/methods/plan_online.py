"""``jaxalign plan`` for the online methods (PPO, GRPO): an iteration's phases compiled from abstract shapes.

An iteration of :class:`~jaxalign.methods.online.OnlineTrainer` runs three programs one after another, each
with everything the run keeps on the device:

- **sampling**: the rollout engine's prefill + decode loop (:mod:`jaxalign.rollout.engine`) over
  ``prompts × samples`` rows with its KV cache of ``prompt + max_new_tokens − 1`` slots, compiled here for the
  sampler's two forms of the policy (stacked layers for the prefill, per-layer copies for the decode loop);
- **scoring**: the method's no-grad pass (reference log-probs; PPO's values; the policy's log-probs when the
  sampler's do not stand for them);
- **update**: the method's :class:`~jaxalign.train.TrainStep` on one minibatch of the iteration's rows (PPO's
  actor-critic loss, GRPO's clipped loss, on group rows where the run would use them).

What stays resident through all three: the train state (float32 masters of the policy and the critic, the
optimizer state), the frozen and quantised weights, the reference, a reward model that runs in the process,
the sampler's per-layer copy of the layer weights (and, below float32, its cast of the trained ones), and the
initial weights the trainer was built from (its scoring pass keeps the modules it was given, and
``jaxalign train`` keeps the policy it loaded, for the whole run). The plan's total is the largest phase.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: The methods planned here (an iteration of sampling, scoring and updates).
ONLINE_METHODS = ("ppo", "grpo")


@dataclasses.dataclass(frozen=True)
class IterationShapes:
    """The iteration's shapes: ``prompts`` (the sampler's bucketed prompt rows) × ``samples`` = sampled rows,
    ``rows`` = prompts × samples trained on, ``minibatch`` of them per update, sequences of
    ``prompt_length + new_tokens`` tokens; ``group`` > 0 when GRPO runs each group's prompt once."""

    prompts: int
    samples: int
    rows: int
    minibatch: int
    prompt_length: int
    new_tokens: int
    group: int = 0


def sampling_params(config, model_config):
    """The run's :class:`~jaxalign.rollout.SamplingParams` (stop ids: the model's EOS when unset)."""
    from jaxalign.methods.rl import SAMPLING_KEYS
    from jaxalign.rollout import SamplingParams

    values = dict(config.sampling)
    unknown = sorted(set(values) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(f"sampling: unknown key(s) {unknown} (known: {', '.join(SAMPLING_KEYS)})")
    if values.get("stop_token_ids") is None:
        values["stop_token_ids"] = tuple(model_config.eos_token_ids or ())
    values["stop_token_ids"] = tuple(values["stop_token_ids"])
    return SamplingParams(**values)


def sampler_is_policy(params) -> bool:
    """As :attr:`~jaxalign.methods.online.OnlineTrainer.sampler_is_policy`."""
    return params.temperature > 0 and params.top_k == 0 and params.top_p == 1.0 and params.min_p == 0.0


def rollout_shapes(config, model_config, params, mesh) -> IterationShapes:
    """The iteration's shapes as the run gets them: prompt rows and length bucketed as the sampler buckets them,
    GRPO's group rows where :meth:`~jaxalign.methods.grpo.GRPOTrainer.shared_group` would take them."""
    from jaxalign.methods.groups import saves_work
    from jaxalign.rollout.batching import MIN_LENGTH_BUCKET, bucket
    from jaxalign.rollout.engine import BATCH_AXES
    from jaxalign.train.mesh import batch_shard_count

    data_parallel = math.prod(mesh.shape.get(axis, 1) for axis in BATCH_AXES)
    batch = config.data.batch_size
    prompts = bucket(batch, None, multiple=data_parallel, what="batch size")
    prompt_length = bucket(config.data.max_length, None, minimum=MIN_LENGTH_BUCKET, half_octaves=True,
                           what="prompt length")
    loss = config.loss
    rows = batch * params.n
    if rows % loss.num_minibatches:
        raise ValueError(f"loss.num_minibatches={loss.num_minibatches} does not divide the {rows} rows of an "
                         f"iteration (data.batch_size {batch} x sampling n {params.n})")
    splits = config.train.micro_batches * batch_shard_count(mesh)
    group = 0
    if config.method == "grpo":
        windowed = getattr(model_config, "sliding_window", None) is not None
        whole_groups = loss.num_minibatches == 1 or loss.minibatch_groups
        if loss.shared_prompt and whole_groups and not windowed:
            per_minibatch, remainder = divmod(batch, loss.num_minibatches)
            if remainder == 0 and per_minibatch % splits == 0 and saves_work(
                    model_config, prompt_length=prompt_length, response_length=params.max_new_tokens,
                    group=params.n):
                group = params.n
    minibatch = rows // loss.num_minibatches
    if minibatch % splits:
        raise ValueError(f"loss.num_minibatches={loss.num_minibatches}: a minibatch of {minibatch} rows does not split "
                         f"over train.micro_batches={config.train.micro_batches} x {batch_shard_count(mesh)} batch "
                         "shards (data x fsdp); use fewer minibatches or more prompts (data.batch_size)")
    return IterationShapes(prompts=prompts, samples=params.n, rows=rows, minibatch=minibatch,
                           prompt_length=prompt_length, new_tokens=params.max_new_tokens, group=group)


# --- the run's modules, abstract ----------------------------------------------------------------------------------


def trained_module(config, model_config):
    """``(module trained, policy)``: PPO's :class:`~jaxalign.methods.ppo.ActorCritic` (the critic a copy of the
    policy or a value head on its trunk, as ``loss.critic`` says) or GRPO's policy, built as the run builds
    them, as shapes."""
    from flax import nnx

    from jaxalign.methods.plan_parts import abstract_model

    lora = config.model.lora is not None
    if config.method == "grpo":
        policy = abstract_model(model_config, config, lora=lora)
        return policy, policy

    def actor_critic(lm):
        from jaxalign.methods.ppo import ActorCritic

        critic = nnx.clone(lm) if config.loss.critic == "separate" else None
        return ActorCritic(lm, critic=critic, rngs=nnx.Rngs(config.train.seed))

    model = abstract_model(model_config, config, lora=lora, wrap=actor_critic)
    return model, model.policy


def reward_models(spec: Any, where: str = "reward") -> list[tuple[str, str]]:
    """``(config key, directory)`` of every reward model in a ``reward:`` mapping (``model`` keys, nested in
    ``composite``/``weighted``)."""
    found = []
    if isinstance(spec, Mapping):
        for key, value in spec.items():
            if key == "model":
                found.append((f"{where}.model", value))
            else:
                found.extend(reward_models(value, f"{where}.{key}"))
    elif isinstance(spec, list):
        for index, value in enumerate(spec):
            found.extend(reward_models(value, f"{where}[{index}]"))
    return found


def reward_model_bytes(config) -> int:
    """The float32 weights of the run's reward model(s) (:func:`jaxalign.models.load_reward_model`'s default
    dtype), from each directory's ``config.json`` and ``reward_model.json``; they sit on one device."""
    from flax import nnx

    from jaxalign import models
    from jaxalign.models.heads import RewardModel
    from jaxalign.models.hf_io import layout_for

    total = 0
    for key, location in reward_models(config.reward or {}):
        directory = Path(str(location))
        info_file = directory / "reward_model.json"
        if not (directory / "config.json").is_file() or not info_file.is_file():
            raise ValueError(f"{key} {location}: jaxalign plan sizes a reward model from its directory's config.json "
                             "and reward_model.json (a model exported by `jaxalign train reward`); no such directory "
                             "here (download a Hub model first)")
        info = json.loads(info_file.read_text())
        architecture = models.load_hf_config(directory)

        def build(architecture=architecture, info=info):
            lm = layout_for(architecture).model_class(architecture, rngs=nnx.Rngs(0))
            return RewardModel(lm, num_objectives=info.get("num_objectives"), pooling=info.get("pooling", "last"),
                               rngs=nnx.Rngs(0), **info.get("head", {}))

        total += _bytes(nnx.state(nnx.eval_shape(build)))
    return total


def _bytes(tree) -> int:
    import jax

    return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def _sharded(tree, shardings):
    """``tree``'s leaves as ``jax.ShapeDtypeStruct`` carrying ``shardings``' (a tree of the same structure)."""
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _placed(module, mesh):
    """``(graphdef, state)`` of ``module`` with its variables placed by the training rules on ``mesh``."""
    from flax import nnx

    from jaxalign import models

    graphdef, state = nnx.split(module)
    return graphdef, _sharded(state, models.named_shardings(state, mesh))


def _replicated(module, mesh):
    import jax
    from flax import nnx

    graphdef, state = nnx.split(module)
    everywhere = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=everywhere), state)


def _rows(mesh, *shape, dtype="int32"):
    """An abstract ``[rows, ...]`` array split over the batch axes."""
    import jax
    import numpy as np

    from jaxalign.models import fit_spec
    from jaxalign.rollout.engine import BATCH_AXES

    spec = jax.sharding.PartitionSpec(tuple(a for a in BATCH_AXES if a in mesh.shape), *([None] * (len(shape) - 1)))
    sharding = jax.sharding.NamedSharding(mesh, fit_spec(spec, shape, mesh))
    return jax.ShapeDtypeStruct(shape, np.dtype(dtype), sharding=sharding)


def _analysis(compiled) -> dict[str, int]:
    memory = compiled.memory_analysis()
    return {"arguments": int(memory.argument_size_in_bytes), "outputs": int(memory.output_size_in_bytes),
            "aliased": int(memory.alias_size_in_bytes), "temporaries": int(memory.temp_size_in_bytes)}


def _per_device(tree) -> int:
    from jaxalign.methods.plan_parts import _tree_bytes

    return _tree_bytes(tree)


# --- the sampling program -----------------------------------------------------------------------------------------


def sampler_member(policy, mesh, sampler_mesh):
    """The policy as :class:`~jaxalign.rollout.Sampler` holds it, abstract: ``(graphdefs, states, extra)`` with
    ``extra`` the per-device bytes of its per-layer copy of the layer weights (the arrays it does not share)."""
    import jax
    from flax import nnx

    from jaxalign import models
    from jaxalign.models.stack import unstack_layers
    from jaxalign.rollout import engine

    view = nnx.view(policy, deterministic=True, raise_if_not_found=False)
    graphdef, params, rest = nnx.split(view, nnx.Param, ...)
    if sampler_mesh is not None:
        params = _sharded(params, models.named_shardings(params, mesh))
        everywhere = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        rest = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=everywhere), rest)
    unstacked_graphdef = nnx.graphdef(nnx.eval_shape(
        lambda p, r: unstack_layers(nnx.merge(graphdef, p, r)), params, rest))
    shapes = jax.eval_shape(engine._unstacked_state, graphdef, (params, rest))
    if sampler_mesh is not None:  # the shardings XLA gives the copies, as in the run
        placed = engine._unstacked_state.lower(graphdef, (params, rest)).compile().output_shardings
        shapes = _sharded(shapes, placed)
    original = dict(jax.tree_util.tree_flatten_with_path((params, rest))[0])
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    unstacked = jax.tree_util.tree_unflatten(treedef, [original.get(path, leaf) for path, leaf in flat])
    extra = _per_device([leaf for path, leaf in flat if path not in original])
    return (graphdef, unstacked_graphdef), ((params, rest), unstacked), extra


def compile_sampling(member, model_config, params, shapes: IterationShapes, mesh, sampler_mesh, *, return_hidden: bool):
    """The engine's compiled prefill + decode loop for the run's rows: its memory analysis."""
    import jax
    import numpy as np

    from jaxalign.rollout import engine
    from jaxalign.rollout.filters import DEFAULT_CANDIDATES

    graphdefs, states, _ = member
    if sampler_mesh is None:
        tokens = jax.ShapeDtypeStruct((shapes.prompts, shapes.prompt_length), np.int32)
    else:
        tokens = _rows(mesh, shapes.prompts, shapes.prompt_length)
    weights = np.ones(1, np.float32)
    stop_mask = params.stop_mask(model_config.vocab_size, model_config.eos_token_ids)
    lowered = engine._generate.for_rows(shapes.prompts * shapes.samples).lower(
        (states,), tokens, tokens, jax.random.key(0), weights, params.filters(), stop_mask, np.int32(0),
        graphdefs=(graphdefs,), max_new_tokens=shapes.new_tokens, n=shapes.samples, candidates=DEFAULT_CANDIDATES,
        mesh=sampler_mesh, stream=None, return_hidden=return_hidden)
    return _analysis(lowered.compile())


def kv_cache_bytes(model_config, shapes: IterationShapes, mesh) -> int:
    """Per device, the decode loop's per-layer KV cache (keys, values, slot validity, positions) of
    ``prompts × samples`` rows and ``prompt + new_tokens − 1`` slots, rows split over the batch axes and kv
    heads over ``tensor``, exactly as :meth:`~jaxalign.models.KVCache.per_layer` shapes it."""
    import jax

    from jaxalign.models import KVCache
    from jaxalign.rollout.engine import BATCH_AXES

    slots = shapes.prompt_length + shapes.new_tokens - 1
    cache = jax.eval_shape(lambda: KVCache.init(model_config, batch_size=shapes.prompts,
                                                max_length=shapes.prompt_length).per_layer(slots)
                           .repeat_rows(shapes.samples))
    rows = math.prod(mesh.shape.get(axis, 1) for axis in BATCH_AXES)
    tensor = mesh.shape.get("tensor", 1)
    heads = tensor if model_config.n_kv_heads % tensor == 0 else 1
    kv = _bytes((cache.keys, cache.values)) // (rows * heads)
    return kv + _bytes((cache.valid, cache.next_position)) // rows


# --- the scoring pass and the update ------------------------------------------------------------------------------


def _lower_pass(fn, modules, arrays, static):
    """``fn(*modules, *arrays, **static)`` jitted as :func:`~jaxalign.methods.online.jitted_pass` runs it, from
    ``(graphdef, state)`` pairs: its memory analysis."""
    import jax
    from flax import nnx

    graphdefs = tuple(graphdef for graphdef, _ in modules)

    @jax.jit
    def compiled(states, *values):
        merged = [nnx.merge(g, s) for g, s in zip(graphdefs, states, strict=True)]
        return fn(*merged, *values, **static)

    return _analysis(compiled.lower(tuple(state for _, state in modules), *arrays).compile())


def compile_scoring(config, trained_view, reference, shapes: IterationShapes, mesh, params, temperature) -> dict | None:
    """The method's no-grad scoring pass over the iteration's rows (None when the run skips it)."""

    sequence = shapes.prompt_length + shapes.new_tokens
    inputs = [_rows(mesh, shapes.rows, sequence) for _ in range(3)]
    sampled = sampler_is_policy(params)
    loss = config.loss
    reference_mode = {"model": "model", "lora_base": "lora_base"}.get(config.reference, "none")
    policy = trained_view.policy if config.method == "ppo" else trained_view
    if reference_mode == "lora_base" and not _has_lora(policy):
        reference_mode = "none"
    scorer = _placed(trained_view, mesh)
    other = _replicated(reference, mesh) if reference is not None else _placed(policy, mesh)
    static = {"prompt_length": shapes.prompt_length, "temperature": temperature, "chunk_size": loss.chunk_size,
              "reference_mode": reference_mode, "policy_logps": not sampled}
    if config.method == "ppo":
        from jaxalign.methods.ppo import _score_pass

        if reference_mode == "none":
            raise ValueError("reference: PPO needs a reference (reference=model, or a LoRA policy with "
                             "reference=lora_base)")
        shared = loss.critic == "shared"
        hidden = None
        if sampled and shared:
            hidden = _rows(mesh, shapes.rows, shapes.new_tokens, policy.config.d_model,
                           dtype=policy.config.compute_jnp_dtype)
        return _lower_pass(_score_pass, (scorer, other), (*inputs, hidden), static)
    from jaxalign.methods.grpo import _score_pass

    if sampled and reference_mode == "none":
        return None
    return _lower_pass(_score_pass, (scorer, other), inputs, {**static, "group": shapes.group})


def _has_lora(module) -> bool:
    from jaxalign.models import has_lora

    return has_lora(module)


def update_batch(config, shapes: IterationShapes, with_reference: bool) -> dict:
    """One minibatch of the iteration's prepared rows (:meth:`prepare` of the method), abstract."""
    import functools

    import jax
    import numpy as np

    rows, sequence, new = shapes.rows, shapes.prompt_length + shapes.new_tokens, shapes.new_tokens

    def array(*shape, dtype=np.int32):
        return jax.ShapeDtypeStruct(shape, np.dtype(dtype))

    batch = {"input_ids": array(rows, sequence), "attention_mask": array(rows, sequence),
             "positions": array(rows, sequence), "response_mask": array(rows, new),
             "old_logps": array(rows, new, dtype=np.float32)}
    if config.method == "ppo":
        batch.update({name: array(rows, new, dtype=np.float32) for name in ("old_values", "advantages", "returns")})
    else:
        batch["advantages"] = array(rows, dtype=np.float32)
        if with_reference:
            batch["ref_logps"] = array(rows, new, dtype=np.float32)
        if shapes.group:
            from jaxalign.methods.grpo import GRPOTrainer

            batch = jax.eval_shape(functools.partial(GRPOTrainer.group_batch, prompt_length=shapes.prompt_length,
                                                     group=shapes.group), batch)
    return batch


def minibatch_of(batch: dict, parts: int) -> dict:
    """One of ``parts`` equal minibatches of ``batch``'s rows, abstract."""
    import jax

    return {name: jax.ShapeDtypeStruct((value.shape[0] // parts, *value.shape[1:]), value.dtype)
            for name, value in batch.items()}


def _batch_bytes(batch: dict, mesh) -> int:
    from jaxalign.methods.plan_parts import _shard_bytes

    return sum(_shard_bytes(value, _rows(mesh, *value.shape, dtype=value.dtype).sharding) for value in batch.values())


def train_step(config, model, trainable, shapes: IterationShapes, mesh, params):
    """The run's :class:`~jaxalign.train.TrainStep` (objective, optimizer over every update, critic scales)."""
    import optax

    from jaxalign.train.optimizer import make_optimizer, scale_updates_by_path
    from jaxalign.train.step import TrainStep

    loss = config.loss
    temperature = params.temperature if params.temperature > 0 else 1.0
    if config.method == "ppo":
        from jaxalign.methods.ppo import ppo_objective

        objective = ppo_objective(loss, temperature)
        scales = ({"value_head": loss.critic_lr_scale, "critic": loss.critic_lr_scale}
                  if loss.critic_lr_scale != 1.0 else None)
    else:
        from jaxalign.methods.grpo import grpo_objective

        objective = grpo_objective(loss, temperature, params.max_new_tokens)
        scales = None
    optimizer = make_optimizer(config.train.optimizer, config.train.total_steps * loss.epochs * loss.num_minibatches)
    if scales:
        optimizer = optax.chain(optimizer, scale_updates_by_path(scales))
    return TrainStep(objective, model, optimizer, mesh=mesh, trainable=trainable,
                     micro_batches=config.train.micro_batches, max_update_ratio=config.train.max_update_ratio)


@dataclasses.dataclass
class Parts:
    """A run's modules, step and iteration shapes, abstract, and the bytes per device of what stays resident
    (``sizes``: the :class:`~jaxalign.methods.plan.Plan` fields of the same names); nothing compiled but the
    sampler's per-layer copy on a mesh (to learn its shardings)."""

    config: Any
    params: Any  # SamplingParams
    mesh: Any
    shapes: IterationShapes
    model: Any
    policy: Any
    reference: Any
    step: Any
    iteration: dict
    minibatch: dict
    member: Any
    sizes: dict[str, int]


def build_parts(config, model_config) -> Parts:
    """The run's parts (see :class:`Parts`); bad settings raise ``ValueError`` naming their key."""
    import jax
    from flax import nnx

    from jaxalign.methods.online import default_trainable
    from jaxalign.methods.plan_parts import _weights_bytes, abstract_model
    from jaxalign.models.quantized import WEIGHTS, QuantizedWeight
    from jaxalign.train.mesh import make_mesh

    if config.method == "grpo" and config.reference == "none" and config.loss.kl_coef > 0:
        raise ValueError(f"loss.kl_coef={config.loss.kl_coef}: GRPO's KL term needs a reference (reference=model or "
                         "a LoRA policy)")
    params = sampling_params(config, model_config)
    reward = reward_model_bytes(config)  # a reward model that cannot be sized fails before anything compiles
    if config.method == "ppo" and params.n != 1:
        raise ValueError(f"sampling.n={params.n}: PPO samples one response per prompt (GRPO samples groups)")
    if config.method == "grpo" and params.n < 2:
        raise ValueError(f"sampling.n={params.n}: GRPO needs groups of 2 or more responses per prompt")
    mesh = make_mesh(config.train.mesh)
    shapes = rollout_shapes(config, model_config, params, mesh)
    model, policy = trained_module(config, model_config)
    reference = abstract_model(model_config, config, lora=False) if config.reference == "model" else None
    trainable = default_trainable(policy)
    step = train_step(config, model, trainable, shapes, mesh, params)
    with_reference = config.reference in ("model", "lora_base") and (reference is not None or _has_lora(policy))
    iteration = update_batch(config, shapes, with_reference)
    minibatch = minibatch_of(iteration, config.loss.num_minibatches)
    state = step.abstract_state()
    critic = _per_device([leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]
                          if _key(path[0]) in ("critic", "value_head")])
    member = sampler_member(policy, mesh, mesh if mesh.size > 1 else None)
    sampler_copy = member[2]
    if config.model.param_dtype != "float32":  # the sampler's cast of the trained weights, in the model's dtype
        sampler_copy += _weights_bytes(model, mesh, nnx.All(nnx.Param, trainable, nnx.Not(nnx.PathContains("critic")),
                                                            nnx.Not(nnx.PathContains("value_head"))))
    sizes = {"quantized_base": _weights_bytes(model, mesh, QuantizedWeight),
             "frozen_weights": _weights_bytes(model, mesh, nnx.All(nnx.Param, nnx.Not(trainable))),
             "trained_weights": _per_device(state.params) - critic, "critic": critic,
             "optimizer_state": _per_device(state.opt_state),
             "reference": 0 if reference is None else _bytes(nnx.state(reference, WEIGHTS)),
             "reward_model": reward, "initial_weights": _bytes(nnx.state(model)), "sampler_weights": sampler_copy,
             "kv_cache": kv_cache_bytes(model_config, shapes, mesh), "rollout_batch": _batch_bytes(iteration, mesh),
             "batch_bytes": _batch_bytes(minibatch, mesh)}
    return Parts(config, params, mesh, shapes, model, policy, reference, step, iteration, minibatch, member, sizes)


def plan_online(config, model_config, *, model_name: str = "model"):
    """Plan one iteration of a PPO or GRPO run (see the module docstring): bytes per device of each phase."""
    import time

    from flax import nnx

    from jaxalign.methods.plan_parts import Plan

    parts = build_parts(config, model_config)
    mesh, shapes, params, sizes, step = parts.mesh, parts.shapes, parts.params, parts.sizes, parts.step
    start = time.perf_counter()
    update = _analysis(step.lower(parts.minibatch, with_update_ratio=step.max_update_ratio is not None).compile())
    hidden = config.method == "ppo" and config.loss.critic == "shared" and sampler_is_policy(params)
    sampling = compile_sampling(parts.member, model_config, params, shapes, mesh, mesh if mesh.size > 1 else None,
                                return_hidden=hidden)
    temperature = params.temperature if params.temperature > 0 else 1.0
    trained_view = nnx.view(parts.model, deterministic=True, raise_if_not_found=False)
    scoring = compile_scoring(config, trained_view, parts.reference, shapes, mesh, params, temperature)
    seconds = time.perf_counter() - start

    # Resident beside the train step's own arguments (its state, frozen weights and minibatch).
    kept = sizes["reference"] + sizes["reward_model"] + sizes["initial_weights"] + sizes["sampler_weights"]
    resident = kept + sum(sizes[name] for name in ("trained_weights", "critic", "optimizer_state", "quantized_base",
                                                   "frozen_weights"))
    sequence_inputs = 3 * 4 * shapes.rows * (shapes.prompt_length + shapes.new_tokens) // _batch_shards(mesh)
    # The sampler makes the new weights' per-layer copy while it still holds the last one, then samples.
    phases = {"sampling": resident + max(sizes["sampler_weights"], sampling["outputs"] + sampling["temporaries"])}
    if scoring is not None:
        phases["scoring"] = (resident + sampling["outputs"] + sequence_inputs + scoring["outputs"]
                             + scoring["temporaries"])
    phases["update"] = (update["arguments"] + update["outputs"] - update["aliased"] + update["temporaries"]
                        + kept + sizes["rollout_batch"])
    temporaries = {"sampling": sampling["temporaries"], "update": update["temporaries"]}
    if scoring is not None:
        temporaries["scoring"] = scoring["temporaries"]
    return Plan(method=config.method, model=model_name, mesh=dict(mesh.shape),
                batch={name: list(value.shape) for name, value in parts.minibatch.items()},
                temporaries=update["temporaries"], total=int(max(phases.values())), compile_seconds=round(seconds, 1),
                phases={name: int(value) for name, value in phases.items()}, phase_temporaries=temporaries,
                rollout=dataclasses.asdict(shapes), **sizes)


def advice(plan, config, usable: float) -> list[str]:
    """Changes that would bring an online ``plan`` under ``usable`` bytes, each with its estimated total: the
    sharded state divides by the mesh, a phase's temporaries by its rows (estimates, not compiled)."""
    GiB = 2**30
    peak = max(plan.phases, key=plan.phases.get)
    ideas = []
    sharded = (plan.trained_weights + plan.critic + plan.optimizer_state + plan.frozen_weights + plan.quantized_base
               + plan.sampler_weights)
    devices = math.prod(plan.mesh.values())
    for factor in (2, 4, 8):
        estimate = plan.total - sharded + sharded / factor
        if estimate <= usable:
            ideas.append(f"--mesh fsdp={devices * factor} (the train state over {devices * factor} devices): about "
                         f"{estimate / GiB:.1f} GiB")
            break
    if config.model.lora is None:
        ideas.append("model.lora={rank: 16, alpha: 32} (only adapters and the critic train; reference=lora_base "
                     "needs no reference model)")
    if config.method == "ppo" and config.loss.critic == "separate":
        ideas.append(f"loss.critic=shared (a value head on the policy's trunk): about "
                     f"{(plan.total - plan.critic * 3 - plan.initial_weights / 2) / GiB:.1f} GiB")
    temporaries = plan.phase_temporaries.get(peak, 0)
    shards = plan.mesh.get("data", 1) * plan.mesh.get("fsdp", 1)
    halves = plan.rollout.get("minibatch", 1) % (2 * config.train.micro_batches * shards) == 0
    if peak == "update" and halves:
        ideas.append(f"loss.num_minibatches={2 * config.loss.num_minibatches} or train.micro_batches="
                     f"{2 * config.train.micro_batches} (half the rows per forward pass): about "
                     f"{(plan.total - temporaries / 2) / GiB:.1f} GiB")
    elif peak in ("sampling", "scoring") and config.data.batch_size > 1:
        ideas.append(f"data.batch_size={config.data.batch_size // 2} (half the rows sampled and scored at once): "
                     f"about {(plan.total - temporaries / 2) / GiB:.1f} GiB")
    return ideas


def _key(entry) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", entry)))


def _batch_shards(mesh) -> int:
    from jaxalign.rollout.engine import BATCH_AXES

    return math.prod(mesh.shape.get(axis, 1) for axis in BATCH_AXES)
