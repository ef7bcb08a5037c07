"""The optax optimizer a :class:`~jaxalign.train.config.OptimizerConfig` describes."""

from __future__ import annotations

import optax

from jaxalign.train.config import OptimizerConfig
from jaxalign.train.schedules import make_schedule


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """``clip_by_global_norm(max_grad_norm)`` then AdamW (or SGD with momentum) on the scheduled rate.

    Clipping comes first, on the gradient of the (accumulated) batch, as in transformers' Trainer and
    MaxText. Weight decay is decoupled (AdamW) and applies to every trainable parameter.
    """
    schedule = make_schedule(config, total_steps)
    if config.name == "adamw":
        update = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay)
    else:
        update = optax.chain(
            optax.add_decayed_weights(config.weight_decay) if config.weight_decay else optax.identity(),
            optax.sgd(schedule, momentum=config.momentum or None),
        )
    if config.max_grad_norm is None:
        return update
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), update)
