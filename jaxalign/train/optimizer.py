"""The optax optimizer a :class:`~jaxalign.train.config.OptimizerConfig` describes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxalign.train.config import OptimizerConfig
from jaxalign.train.schedules import make_schedule

# Parameter names that weight decay skips: biases, and the scales of LayerNorm/RMSNorm (every norm in
# jaxalign.models and flax.nnx names its weight ``scale``). transformers' Trainer skips the same set
# (``Trainer.get_decay_parameter_names``: names containing "bias" and LayerNorm/RMSNorm weights).
NO_DECAY_NAMES = frozenset({"bias", "scale"})


def _parameter_name(path) -> str | None:
    """The last dict key of a parameter's tree path (``.../q_proj/kernel/.value`` -> ``kernel``)."""
    names = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
    return str(names[-1]) if names else None


def weight_decay_mask(params):
    """True where decoupled weight decay applies: every parameter except biases and norm scales
    (:data:`NO_DECAY_NAMES`), the choice of transformers' Trainer, TRL and MaxText. Embeddings, projection
    kernels, LoRA factors and head kernels are decayed."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _parameter_name(path) not in NO_DECAY_NAMES, params)


def decay_weights(weight_decay: float, mask: bool = True) -> optax.GradientTransformation:
    """``update + weight_decay · param`` where :func:`weight_decay_mask` is True (everywhere with
    ``mask=False``). Unlike ``optax.add_decayed_weights(weight_decay, mask)``, whose state becomes an
    ``optax.MaskedState``, the state is ``optax.EmptyState()`` either way: checkpoints of runs that decayed
    every parameter still restore."""
    def update(updates, state, params):
        decayed = weight_decay_mask(params) if mask else jax.tree.map(lambda _: True, params)
        return jax.tree.map(lambda u, p, d: u + weight_decay * p if d else u, updates, params, decayed), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class ClippedOptimizer(optax.GradientTransformationExtraArgs):
    """What :func:`make_optimizer` returns when it clips: optax's ``chain(clip_by_global_norm(max_norm), rest)``
    (the same state; the same numbers up to float rounding, as it multiplies by one scalar ``max_norm / norm``)
    whose update also takes ``grad_norm=``, the global norm of the gradients it is given, and clips with it
    instead of reading every gradient a second time.

    :class:`~jaxalign.train.TrainStep` passes the norm it reports only to optimizers of this type: wrapped in
    anything that changes the gradients first (``optax.MultiSteps``, another ``chain`` link before it, a mask),
    the norm it was given would be another tree's, so a wrapped one takes its own, as optax does. XLA does not
    merge the two reductions itself: the update runs inside a conditional."""


def _clipped(max_norm: float, rest: optax.GradientTransformationExtraArgs) -> ClippedOptimizer:
    def init(params):
        return optax.EmptyState(), rest.init(params)  # optax.chain's state: one entry per link

    def update(updates, state, params=None, *, grad_norm=None, **extra_args):
        clip_state, rest_state = state
        norm = jnp.squeeze(optax.tree.norm(updates) if grad_norm is None else grad_norm).astype(jnp.float32)
        # One scalar factor (exactly 1 below max_norm). optax.clip_by_global_norm selects between ``t`` and
        # ``(t / norm) * max_norm``; XLA:CPU does not copy a division into the two moments' passes that read
        # the gradient, so it wrote ``t / norm`` out as a pass of its own and both moments read two arrays
        # where a multiply by a scalar fuses into each. Clipped values differ from optax's by float rounding: the
        # factor is float32 and each product is rounded once, to the gradient's dtype.
        factor = jnp.where(norm < max_norm, jnp.ones_like(norm), max_norm / norm)
        updates = jax.tree.map(lambda t: (t * factor).astype(t.dtype), updates)
        updates, rest_state = rest.update(updates, rest_state, params, **extra_args)
        return updates, (clip_state, rest_state)

    return ClippedOptimizer(init, update)


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """``clip_by_global_norm(max_grad_norm)`` (a :class:`ClippedOptimizer`), then AdamW (or SGD with momentum)
    on the scheduled rate.

    Clipping comes first, on the gradient of the (accumulated) batch, as in transformers' Trainer and
    MaxText. Weight decay is decoupled (AdamW: ``optax.adamw``'s chain, ``-lr·(adam + wd·p)``) and applies
    where :func:`weight_decay_mask` is True (not to biases or norm scales), unless
    ``config.decay_biases_and_norms``.
    """
    schedule = make_schedule(config, total_steps)
    # Without decay, identity (state EmptyState as well) spares a pass over every parameter each step.
    decay = (decay_weights(config.weight_decay, mask=not config.decay_biases_and_norms) if config.weight_decay
             else optax.identity())
    if config.name == "adamw":
        update = optax.chain(optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps), decay,
                             optax.scale_by_learning_rate(schedule))
    else:
        update = optax.chain(decay, optax.sgd(schedule, momentum=config.momentum or None))
    if config.max_grad_norm is None:
        return update
    return _clipped(config.max_grad_norm, update)


def scale_updates_by_path(scales: dict[str, float]) -> optax.GradientTransformation:
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
