"""The step factory: an objective, a model and an optax optimizer compiled into one sharded training step.

The objective is the user's bridge between the model and :mod:`jaxalign.losses`::

    def sft_objective(model, batch, *, key):
        logits, _ = model(batch["input_ids"], attention_mask=batch["attention_mask"])
        per_token, metrics = losses.sft_loss(logits[:, :-1], batch["input_ids"][:, 1:], batch["loss_mask"][:, 1:])
        return losses.aggregate(per_token, batch["loss_mask"][:, 1:]), metrics

It returns ``((loss_sum, loss_count), metrics)``: the batch loss is ``Σ loss_sum / Σ loss_count`` over the
micro-batches, so accumulation gives exactly the large-batch mean. Frozen models it needs (a DPO
reference) arrive as keyword arguments named as in ``references``.

One call of :class:`TrainStep` runs, inside a single ``jax.jit`` with explicit in/out shardings and the
train state donated:

1. split the step key off the state's RNG;
2. for each of the ``M`` micro-batches (a ``lax.scan``): merge the trainable parameters (cast from their
   float32 master copy to the model's ``param_dtype``) with the frozen ones, run the objective, and add
   up ``∇ loss_sum``, ``loss_sum`` and ``loss_count``;
3. divide by the total count (with one micro-batch, ``1/count`` seeds the backward pass instead, so no pass
   over the gradients divides them), take the global gradient norm, and apply the optax update (clipping
   and the schedule live in the optimizer) inside a ``lax.cond`` on step 4's test, so that the parameters
   and moments are written once;
4. if the loss or the gradient norm is not finite, keep the old parameters, optimizer and model state
   (the step counter, the schedule's count and the RNG still advance: the batch was consumed) and report
   ``finite = False`` (without a divergence guard ``update_ratio`` is then 0: nothing was applied; with one it
   is the refused update's); likewise, with ``max_update_ratio``, an update larger than that multiple of the
   parameters (``diverging = True``: the divergence guard, which catches a run whose loss stays finite, even
   flat, while its weights blow up), decided before the update is written.

``update_ratio`` (``‖Δθ‖/‖θ‖``) costs passes over every parameter that the update itself does not need (on
SmolLM2-135M, 2 CPU cores, 0.17-0.30 s of a 2.5-2.7 s SFT step): a call with ``with_update_ratio=False``
leaves it out (a second compiled variant of the step). The :class:`~jaxalign.train.trainer.Trainer` asks for
it on the steps it logs; a divergence guard needs it on every step and always takes it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxalign.models.quantized import WEIGHTS
from jaxalign.models.sharding import DEFAULT_RULES, named_shardings
from jaxalign.train.mesh import (
    BATCH_AXES,
    batch_shard_count,
    batch_sharding,
    global_rows,
    replicated,
    shard_batch,
    single_device_mesh,
)
from jaxalign.train.optimizer import ClippedOptimizer
from jaxalign.train.state import TrainState

F32 = jnp.float32

# ((loss_sum [], loss_count []), {name: [] metric})
Objective = Callable[..., tuple[tuple[jax.Array, jax.Array], Mapping[str, jax.Array]]]

STEP_METRICS = ("loss", "loss_count", "grad_norm", "update_ratio", "finite", "diverging", "tokens")


def default_token_count(batch: Any) -> jax.Array | None:
    """Tokens in a batch, for throughput: the sum of every ``*attention_mask`` array, else the size of
    ``tokens``/``input_ids``; None (no throughput) for a batch with neither."""
    if not isinstance(batch, Mapping):
        return None
    masks = [value for key, value in batch.items() if str(key).endswith("attention_mask")]
    if masks:
        return sum(jnp.sum(mask, dtype=F32) for mask in masks)
    for key in ("tokens", "input_ids"):
        if key in batch:
            return jnp.asarray(batch[key].size, F32)
    return None


def _shardings_like(state: nnx.State, shardings: nnx.State) -> nnx.State:
    """The entries of ``shardings`` (a State over all parameters) at the paths ``state`` has."""
    by_path = dict(nnx.to_flat_state(shardings))
    return nnx.from_flat_state([(path, by_path[path]) for path, _ in nnx.to_flat_state(state)])


def _as_master(params: nnx.State) -> nnx.State:
    """Floating parameters in float32: the optimizer updates these, never the low-precision copies."""
    return jax.tree.map(lambda p: p.astype(F32) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)


class _Strong:
    """A reference to a leaf that cannot be weakly referenced (a Python scalar): callable like a weakref."""

    def __init__(self, value):
        self.value = value

    def __call__(self):
        return self.value


def _weak(leaf):
    try:
        return weakref.ref(leaf)
    except TypeError:
        return _Strong(leaf)


def _place(tree, shardings):
    """``jax.device_put``; an abstract model's shapes (``nnx.eval_shape``, a memory plan) get the shardings only."""
    if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(tree)):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
    return jax.device_put(tree, shardings)


def _ratio(update_norm: jax.Array, param_norm: jax.Array) -> jax.Array:
    """``‖Δθ‖ / ‖θ‖``, 0 when there are no parameters to compare with (e.g. all-zero weights)."""
    return jnp.where(param_norm > 0, update_norm / jnp.maximum(param_norm, 1e-30), 0.0)


def _keep_if(condition: jax.Array, new, old):
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), new, old)


def _keep_optimizer_state_if(condition: jax.Array, new, old):
    """``_keep_if`` for an optax state, except that schedule counters (``optax.ScaleByScheduleState``)
    always advance: a skipped step still moves the learning-rate schedule on, so the rate of update ``s``
    is ``schedule(s)`` for ``s`` = ``TrainState.step`` (what the logs report), skipped steps or not."""
    is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    return jax.tree.map(lambda a, b: a if is_schedule(a) else _keep_if(condition, a, b), new, old,
                        is_leaf=is_schedule)


def _unpack_objective_output(output) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    try:
        (loss_sum, loss_count), metrics = output
    except (TypeError, ValueError):
        raise TypeError(
            "the objective must return ((loss_sum, loss_count), metrics), e.g. "
            "(losses.aggregate(per_token, mask), metrics); got " + type(output).__name__
        ) from None
    if not isinstance(metrics, Mapping):
        raise TypeError(f"the objective's metrics must be a dict of scalars, got {type(metrics).__name__}")
    if jnp.shape(loss_sum) != () or jnp.shape(loss_count) != ():
        raise ValueError(
            f"the objective's loss_sum and loss_count must be scalars, got shapes {jnp.shape(loss_sum)} and "
            f"{jnp.shape(loss_count)}: reduce per-token or per-example values with losses.aggregate / masked_sum"
        )
    shaped = {str(name): jnp.shape(value) for name, value in metrics.items() if jnp.shape(value) != ()}
    if shaped:
        raise ValueError(
            f"the objective's metrics must be scalars, but {shaped} (name: shape) are not: reduce per-row or "
            "per-token values inside the objective (e.g. a masked mean)"
        )
    clashes = sorted(set(metrics) & set(STEP_METRICS))
    if clashes:
        raise ValueError(f"objective metric name(s) {clashes} are reserved for the step's own metrics {STEP_METRICS}")
    return jnp.asarray(loss_sum, F32), jnp.asarray(loss_count, F32), dict(metrics)


class TrainStep:
    """A jitted, sharded, donated training step for ``model`` (see the module docstring for what it does).

    Args:
        objective: ``objective(model, batch, *, key, **references) -> ((loss_sum, loss_count), metrics)``;
            pure JAX on the batch's arrays. ``key`` differs per step and per micro-batch.
        model: the NNX model to train; its current values are the initial parameters. It is not modified:
            :meth:`trained_model` gives a module with a state's parameters.
        optimizer: any optax ``GradientTransformation`` (:func:`~jaxalign.train.optimizer.make_optimizer`
            builds one from a config).
        mesh: the device mesh (:func:`~jaxalign.train.mesh.make_mesh`); None runs on one device.
        trainable: an NNX filter selecting the parameters to train among the model's ``nnx.Param``s: a
            Variable type (``nnx.LoRAParam`` for LoRA adapters), a path predicate
            (``nnx.PathContains("lm_head")``, ``lambda path, variable: ...``) or a combination
            (``nnx.All``/``nnx.Any``/``nnx.Not``). The other parameters are frozen: no gradient, no
            optimizer state, not checkpointed.
        micro_batches: gradient-accumulation micro-batches per step. Micro-batch ``i`` takes the
            contiguous rows ``[i·B/M, (i+1)·B/M)``, so groups of adjacent rows (GRPO's completions of one
            prompt, DPO pairs) stay together when ``B/M`` is a multiple of the group size.
        references: frozen models the objective receives by name (e.g. ``{"ref": reference_model}``),
            sharded on the same mesh by their own partition table; never differentiated or updated.
        rules: the partition table for every model (``jaxalign.models.DEFAULT_RULES`` plus any new module).
        count_tokens: ``batch -> [] tokens or None`` for the ``tokens`` metric (throughput).
        max_update_ratio: refuse (do not apply) an update with ``‖Δθ‖ > max_update_ratio·‖θ‖`` over the
            trained parameters and report ``diverging``; None never refuses one (see ``TrainConfig``). The guard
            computes the update before it decides, and the optimizer's new state again once it has (in place):
            for AdamW two multiply-adds, for an optimizer with costly state updates (matrix roots) those twice.

    Attributes:
        mesh: the mesh everything lives on.
        state_shardings: a :class:`TrainState` of ``NamedSharding`` values (parameters and optimizer state per
            the partition table; step, RNG and model state replicated).
        frozen: the frozen parameters, placed on the mesh.
        references: the reference models' ``(params, other)`` states, placed on the mesh.
    """

    def __init__(self, objective: Objective, model: nnx.Module, optimizer: optax.GradientTransformation, *,
                 mesh: Mesh | None = None, trainable: Any = nnx.Param, micro_batches: int = 1,
                 references: Mapping[str, nnx.Module] | None = None, rules: Mapping = DEFAULT_RULES,
                 count_tokens: Callable[[Any], jax.Array | None] = default_token_count,
                 max_update_ratio: float | None = None):
        if not isinstance(micro_batches, int) or micro_batches < 1:
            raise ValueError(f"micro_batches must be a positive int, got {micro_batches!r}")
        if max_update_ratio is not None and not max_update_ratio > 0:
            raise ValueError(f"max_update_ratio must be > 0 or None, got {max_update_ratio!r}")
        self.objective, self.optimizer = objective, optimizer
        self.max_update_ratio = max_update_ratio
        self.micro_batches, self.count_tokens = micro_batches, count_tokens
        self.mesh = single_device_mesh() if mesh is None else mesh
        # Without the divergence guard, ‖Δθ‖ from the parameters before and after the update (faster on XLA:CPU,
        # one more parameter-sized buffer) or inside the update (elsewhere); see _train_step.
        self._ratio_from_parameters = self.mesh.devices.flat[0].platform == "cpu"
        if any(axis_type != AxisType.Auto for axis_type in self.mesh.axis_types):
            raise ValueError(
                f"the mesh has axis types {self.mesh.axis_types}; the step relies on XLA's sharding propagation "
                "and needs Auto axes: build it with jaxalign.train.make_mesh"
            )
        everywhere = replicated(self.mesh)

        # Frozen: the other parameters and a quantised base's storage (sharded like its kernels, never checkpointed).
        self.graphdef, params, frozen, model_state = nnx.split(model, nnx.All(nnx.Param, trainable), WEIGHTS, ...)
        if not jax.tree.leaves(params):
            raise ValueError(f"the trainable filter {trainable!r} selects none of the model's parameters")
        # The initial values are held strongly only until the first init() (or discard_initial_values()):
        # a reference for the whole run would keep a second copy of the parameters alive after the caller
        # dropped its model. Later inits find them through weak references while the caller's model lives.
        self._initial_values: tuple[nnx.State, nnx.State] | None = (params, model_state)
        self._initial_refs = jax.tree.map(_weak, (params, model_state))
        self._initial_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (params, model_state))
        # The dtypes the model computes with; the state keeps float32 masters and casts to these.
        self._param_templates = self._initial_shapes[0]

        all_shardings = named_shardings(model, self.mesh, rules=rules)
        self._param_shardings = _shardings_like(params, all_shardings)
        self._model_state_shardings = jax.tree.map(lambda _: everywhere, model_state)
        frozen_shardings = _shardings_like(frozen, all_shardings)
        self.frozen = _place(frozen, frozen_shardings)

        self._reference_graphdefs, self.references, reference_shardings = {}, {}, {}
        for name, reference in (references or {}).items():
            graphdef, reference_params, reference_other = nnx.split(reference, WEIGHTS, ...)
            shardings = (named_shardings(reference, self.mesh, rules=rules),
                         jax.tree.map(lambda _: everywhere, reference_other))
            self._reference_graphdefs[name] = graphdef
            self.references[name] = _place((reference_params, reference_other), shardings)
            reference_shardings[name] = shardings

        opt_state_shapes = jax.eval_shape(optimizer.init, jax.eval_shape(_as_master, params))
        opt_state_shardings = optax.tree_map_params(
            optimizer, lambda _, sharding: sharding, opt_state_shapes, self._param_shardings,
            transform_non_params=lambda _: everywhere,
        )
        self.state_shardings = TrainState(step=everywhere, params=self._param_shardings,
                                          opt_state=opt_state_shardings,
                                          model_state=self._model_state_shardings, rng=everywhere)
        self._init = jax.jit(self._initial_state,
                             in_shardings=(self._param_shardings, self._model_state_shardings, everywhere),
                             out_shardings=self.state_shardings)
        self._step = jax.jit(
            self._train_step,
            in_shardings=(self.state_shardings, batch_sharding(self.mesh), frozen_shardings, reference_shardings),
            out_shardings=(self.state_shardings, everywhere),
            donate_argnums=0,
            static_argnums=4,  # with_update_ratio: one compiled variant each
        )

    # ----------------------------------------------------------------------------------------- public

    def init(self, seed: int) -> TrainState:
        """A fresh state on the mesh: step 0, the model's parameters, a new optimizer state, key ``seed``.

        The step keeps no copy of the model's initial values after the first call: a later call needs the
        model given to the constructor to be alive and unchanged (it reads the same arrays again), and
        raises otherwise.
        """
        if self._initial_values is not None:
            (params, model_state), self._initial_values = self._initial_values, None
        else:
            params, model_state = jax.tree.map(lambda ref: ref(), self._initial_refs)
            if any(leaf is None for leaf in jax.tree.leaves((params, model_state), is_leaf=lambda x: x is None)):
                raise RuntimeError(
                    "TrainStep.init() was called again, but the model's initial parameters are gone: the step "
                    "releases them after the first init() so that they do not stay in memory for the whole "
                    "run. Keep the model (unchanged) alive to init() again, or build a new TrainStep."
                )
        params = jax.device_put(params, self._param_shardings)
        model_state = jax.device_put(model_state, self._model_state_shardings)
        return self._init(params, model_state, jax.random.PRNGKey(seed))

    def discard_initial_values(self) -> None:
        """Drop the step's reference to the model's initial values (a run that restores instead of
        calling :meth:`init`); :meth:`init` then works only while the caller's model is alive."""
        self._initial_values = None

    def abstract_state(self) -> TrainState:
        """The state's shapes, dtypes and shardings (as ``jax.ShapeDtypeStruct`` values), e.g. to restore into."""
        shapes = jax.eval_shape(self._initial_state, *self._initial_shapes, jax.random.PRNGKey(0))
        return jax.tree.map(lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
                            shapes, self.state_shardings)

    def __call__(self, state: TrainState, batch: Any, *, with_update_ratio: bool = True,
                 ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step on ``batch``; ``state`` is donated (do not use it afterwards).

        Args:
            state: from :meth:`init`, a restore, or the previous call.
            batch: a pytree of arrays ``[B, ...]``: this process's rows as NumPy (placed with
                :func:`~jaxalign.train.mesh.shard_batch`) or global ``jax.Array``s. ``B`` must be a
                multiple of ``micro_batches`` × the batch shards (``data`` × ``fsdp``).
            with_update_ratio: measure ``update_ratio``; False saves its passes over the parameters (the
                new state is the same either way). Ignored with ``max_update_ratio``, which needs it.

        Returns:
            ``(new_state, metrics)``: scalar device arrays: the objective's metrics (means weighted by each
            micro-batch's ``loss_count``), ``loss``, ``loss_count``, ``grad_norm`` (before clipping),
            ``update_ratio`` (``‖Δθ‖/‖θ‖``; absent when not measured), ``finite``, ``diverging`` and, when
            countable, ``tokens``. Nothing is synchronised with the host.
        """
        if isinstance(batch, Mapping) and not isinstance(batch, dict):
            batch = dict(batch)  # a typed batch (jaxalign.data.Batch) travels as the dict of its arrays
        self._check_batch_size(batch)
        with_update_ratio = bool(with_update_ratio) or self.max_update_ratio is not None
        batch = shard_batch(batch, self.mesh)
        with jax.set_mesh(self.mesh):  # the models keep their activations split by rows (constrain_rows)
            return self._step(state, batch, self.frozen, self.references, with_update_ratio)

    def lower(self, batch: Any, *, with_update_ratio: bool = False):
        """The step lowered for ``batch`` (arrays or ``jax.ShapeDtypeStruct``s) from the state's shapes alone:
        ``.compile().memory_analysis()`` is what one device holds (:mod:`jaxalign.methods.plan`)."""
        with jax.set_mesh(self.mesh):
            return self._step.lower(self.abstract_state(), batch, self.frozen, self.references, with_update_ratio)

    def trained_model(self, state: TrainState) -> nnx.Module:
        """A module with ``state``'s parameters (in the model's ``param_dtype``) and the frozen ones.

        Float32 parameters share buffers with ``state``: take the model after the last step, or copy it,
        since the next step donates the state.
        """
        return nnx.merge(self.graphdef, self._compute_params(state.params), self.frozen, state.model_state)

    def reference_models(self) -> dict[str, nnx.Module]:
        """The frozen reference models as the step holds them: placed on the mesh by the same rules as the
        model (what an evaluation on the mesh passes to the objective)."""
        return {name: nnx.merge(self._reference_graphdefs[name], *states) for name, states in self.references.items()}

    # ----------------------------------------------------------------------------------------- traced

    def _compute_params(self, master: nnx.State) -> nnx.State:
        return jax.tree.map(lambda p, template: p.astype(template.dtype), master, self._param_templates)

    def _initial_state(self, params, model_state, rng) -> TrainState:
        master = _as_master(params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=master, opt_state=self.optimizer.init(master),
                          model_state=model_state, rng=rng)

    def _micro_loss(self, params, frozen, model_state, batch, key, references):
        # copy=True: fresh Variables of this trace. Without it the module would reuse the State's own
        # Variables, made outside the value_and_grad/scan trace, and a model that updates non-parameter
        # state (dropout's RngCount, BatchNorm statistics) would raise TraceContextError.
        model = nnx.merge(self.graphdef, self._compute_params(params), frozen, model_state, copy=True)
        reference_models = {name: nnx.merge(self._reference_graphdefs[name], *states, copy=True)
                            for name, states in references.items()}
        loss_sum, loss_count, metrics = _unpack_objective_output(
            self.objective(model, batch, key=key, **reference_models))
        return loss_sum, (jax.lax.stop_gradient(loss_count), metrics, nnx.state(model, nnx.Not(WEIGHTS)))

    def _accumulate(self, params, frozen, model_state, batch, key, references):
        """Σ over micro-batches of (∇ loss_sum, loss_sum), per-micro-batch (loss_count, metrics), model state."""
        m = self.micro_batches
        if m == 1:
            # No loop, and the mean's 1/count seeds the backward pass: the gradient comes out of it already
            # divided, with no zeros to add it to and no pass over every gradient to divide it.
            def mean_loss(*args):
                loss_sum, (count, metrics, model_state) = self._micro_loss(*args)
                return loss_sum / jnp.maximum(count, 1.0), (loss_sum, count, metrics, model_state)

            (_, (loss_sum, count, metrics, model_state)), grads = jax.value_and_grad(mean_loss, has_aux=True)(
                params, frozen, model_state, batch, jax.random.fold_in(key, 0), references)
            return grads, loss_sum, count[None], jax.tree.map(lambda x: x[None], metrics), model_state
        # Contiguous: micro-batch i is rows [i·B/M, (i+1)·B/M), so rows that belong together (a GRPO
        # group, the completions of one prompt, a pair laid out side by side) stay in one micro-batch
        # when B/M is a multiple of the group. Each micro-batch is then spread over the batch devices
        # again (the constraint below), which costs one all-to-all of the batch per step.
        micro_batches = jax.tree.map(lambda x: x.reshape(m, x.shape[0] // m, *x.shape[1:]), batch)
        micro_batches = jax.lax.with_sharding_constraint(
            micro_batches, NamedSharding(self.mesh, PartitionSpec(None, BATCH_AXES)))
        value_and_grad = jax.value_and_grad(self._micro_loss, has_aux=True)

        def one_micro_batch(carry, inputs):
            grad_sum, loss_sum, model_state = carry
            micro_batch, index = inputs
            (micro_loss_sum, (micro_count, metrics, model_state)), grads = value_and_grad(
                params, frozen, model_state, micro_batch, jax.random.fold_in(key, index), references)
            grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
            return (grad_sum, loss_sum + micro_loss_sum, model_state), (micro_count, metrics)

        zero_grads = jax.tree.map(jnp.zeros_like, params)
        (grad_sum, loss_sum, model_state), (counts, metrics) = jax.lax.scan(
            one_micro_batch, (zero_grads, jnp.zeros((), F32), model_state), (micro_batches, jnp.arange(m)))
        denominator = jnp.maximum(jnp.sum(counts), 1.0)
        return jax.tree.map(lambda g: g / denominator, grad_sum), loss_sum, counts, metrics, model_state

    def _train_step(self, state: TrainState, batch, frozen, references, with_update_ratio: bool):
        rng, step_key = jax.random.split(state.rng)
        grads, loss_sum, counts, micro_metrics, model_state = self._accumulate(
            state.params, frozen, state.model_state, batch, step_key, references)
        count = jnp.sum(counts)
        # An empty batch (count 0) gives loss 0 and zero gradients rather than 0/0.
        denominator = jnp.maximum(count, 1.0)
        loss = loss_sum / denominator
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # make_optimizer's clipping takes the norm rather than reading every gradient a second time; any other
        # optimizer (a wrapped one included) computes what it needs itself.
        norm_given = {"grad_norm": grad_norm} if isinstance(self.optimizer, ClippedOptimizer) else {}

        def skip(_):  # the schedule's counters advance all the same (see _keep_optimizer_state_if)
            _, opt_state = self.optimizer.update(grads, state.opt_state, state.params, **norm_given)
            return state.params, _keep_optimizer_state_if(False, opt_state, state.opt_state), state.model_state

        # ‖θ‖ and ‖Δθ‖ cost passes over every parameter (hence with_update_ratio=False, the "no ratio" below). For
        # the divergence guard, see its branch. Without the guard, on CPU, ‖Δθ‖ comes from the parameters before
        # and after the update (one more parameter-sized buffer, as the donated old values are read after the
        # update); on accelerators, where that buffer is memory a large model needs, the update's norm is taken
        # inside the update. On SmolLM2-135M's 134.5M parameters (AdamW with clipping, 2 CPU cores) the update and
        # its ratio take 0.42 s (the norm inside the update: 0.55 s), 0.28 s with no ratio at all.
        assert with_update_ratio or self.max_update_ratio is None, "the divergence guard needs the update ratio"
        if not with_update_ratio:
            def update_only(_):
                updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params, **norm_given)
                return optax.apply_updates(state.params, updates), opt_state, model_state

            params, opt_state, model_state = jax.lax.cond(finite, update_only, skip, None)
            update_ratio, diverging = None, jnp.zeros((), bool)
        elif self.max_update_ratio is None:
            param_norm = optax.tree.norm(state.params)
            # Whether the update applies is known before it is computed: the conditional computes it only then
            # and writes the parameters and moments once (a select after it would pass over every weight again).
            from_parameters = self._ratio_from_parameters

            def update(_):
                updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params, **norm_given)
                norm = jnp.zeros((), F32) if from_parameters else optax.tree.norm(updates)
                return optax.apply_updates(state.params, updates), opt_state, model_state, norm

            def skip_without_update(_):
                return (*skip(_), jnp.zeros((), F32))

            params, opt_state, model_state, update_norm = jax.lax.cond(finite, update, skip_without_update, None)
            if from_parameters:
                update_norm = optax.tree.norm(jax.tree.map(jnp.subtract, params, state.params))  # 0 when skipped
            update_ratio = _ratio(update_norm, param_norm)
            diverging = jnp.zeros((), bool)
        else:  # the divergence guard needs the update's size before it decides
            param_norm = optax.tree.norm(state.params)
            # The update is written once (behind an optimization barrier: XLA:CPU would otherwise fuse the
            # optimizer's arithmetic into the norm's reduction, with every scalar factor broadcast to a parameter-
            # sized buffer first) and read by its norm and, if it applies, by the parameters' update. The new
            # moments are computed inside the conditional, in place: computed outside it, they were copied into
            # the state's buffers (SFT step of SmolLM2-135M, 2 CPU cores, one process, steps alternated: 2.68 s
            # without the ratio, 3.47 s with the guard's moments copied in, 3.13 s computed in place).
            updates, _ = self.optimizer.update(grads, state.opt_state, state.params, **norm_given)
            updates = jax.lax.optimization_barrier(updates)
            update_ratio = _ratio(optax.tree.norm(updates), param_norm)
            diverging = finite & ~(update_ratio <= self.max_update_ratio)

            def apply(_):
                _, opt_state = self.optimizer.update(grads, state.opt_state, state.params, **norm_given)
                return optax.apply_updates(state.params, updates), opt_state, model_state

            params, opt_state, model_state = jax.lax.cond(finite & ~diverging, apply, skip, None)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state,
                               rng=rng)
        metrics = {name: jnp.sum(values * counts) / denominator for name, values in micro_metrics.items()}
        metrics |= {"loss": loss, "loss_count": count, "grad_norm": grad_norm, "finite": finite, "diverging": diverging}
        if update_ratio is not None:
            metrics["update_ratio"] = update_ratio
        tokens = self.count_tokens(batch)
        if tokens is not None:
            metrics["tokens"] = tokens
        return new_state, metrics

    def _check_batch_size(self, batch) -> None:
        sizes = {global_rows(leaf, self.mesh) for leaf in jax.tree.leaves(batch)}
        if len(sizes) != 1:
            raise ValueError(f"every array of a batch needs the same leading (batch) size, got {sorted(sizes)}")
        size, = sizes
        multiple = self.micro_batches * batch_shard_count(self.mesh)
        if size % multiple:
            raise ValueError(
                f"global batch size {size} must be a multiple of micro_batches ({self.micro_batches}) × the "
                f"batch shards (data × fsdp = {batch_shard_count(self.mesh)}) = {multiple}"
            )
