"""Learning-rate schedules with linear warm-up: constant, linear, cosine and cosine with hard restarts.

The step ``s`` a schedule receives is optax's update count: 0 for the first update. With ``w`` warm-up
steps, ``η`` the peak and ``η_end`` the final learning rate::

    warm-up  (s < w):  η · s / w                                   (the first update has rate 0 when w > 0)
    then, with p = clip((s − w) / decay_steps, 0, 1):
      constant              η
      linear                η_end + (η − η_end) · (1 − p)
      cosine                η_end + (η − η_end) · ½ (1 + cos π p)
      cosine_with_restarts  η_end + (η − η_end) · ½ (1 + cos π ((R · p) mod 1)),  η_end once p = 1

These are transformers' ``get_{constant,linear,cosine,cosine_with_hard_restarts}_schedule_with_warmup``
(with ``num_cycles = 0.5`` for cosine and ``R`` = ``restarts`` cycles), generalised to a non-zero final
rate; the tests compare them with transformers step by step.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from jaxalign.train.config import OptimizerConfig


def make_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """The schedule of ``config`` for a run of ``total_steps`` updates.

    ``decay_steps`` defaults to ``total_steps − warmup_steps`` (at least 1), so the decay ends with the run.
    """
    peak, final, warmup = config.learning_rate, config.final_learning_rate, config.warmup_steps
    decay_steps = config.decay_steps or max(total_steps - warmup, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if config.schedule == "constant":
            # No dependence on the run length, so runs of different lengths compile the same step.
            decayed = jnp.full_like(step, peak)
        elif config.schedule == "linear":
            decayed = final + (peak - final) * (1.0 - progress)
        elif config.schedule == "cosine":
            decayed = final + (peak - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        else:  # cosine_with_restarts: each of the `restarts` cycles decays from the peak again
            cycle_position = jnp.mod(config.restarts * progress, 1.0)
            decayed = jnp.where(progress >= 1.0, final,
                                final + (peak - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * cycle_position)))
        if warmup == 0:
            return decayed
        return jnp.where(step < warmup, peak * step / warmup, decayed)

    return schedule
