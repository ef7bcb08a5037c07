"""Learning-rate schedules with linear warm-up: constant, linear, cosine and cosine with hard restarts.

The step ``s`` a schedule receives is optax's update count: 0 for the first update. With ``w`` warm-up
steps, ``η`` the peak and ``η_end`` the final learning rate::

    warm-up  (s < w):  η · s / w                                   (the first update has rate 0 when w > 0)
    then, with k = clip(s − w, 0, D) for D = decay_steps and p = k / D:
      constant              η
      linear                η_end + (η − η_end) · (1 − p)
      cosine                η_end + (η − η_end) · ½ (1 + cos π p)
      cosine_with_restarts  η_end + (η − η_end) · ½ (1 + cos π ((k · R mod D) / D)),  η_end once k = D

These are transformers' ``get_{constant,linear,cosine,cosine_with_hard_restarts}_schedule_with_warmup``
(with ``num_cycles = 0.5`` for cosine and ``R`` = ``restarts`` cycles), generalised to a non-zero final
rate; the tests compare them with transformers step by step, eagerly and under ``jax.jit``. The position
in the decay is computed in integers, so a restart is exactly at the peak under jit too. A setting the schedule
does not read (``restarts`` other than 1 without ``cosine_with_restarts``; ``final_learning_rate`` or
``decay_steps`` with ``constant``) is refused by :class:`~jaxalign.train.config.OptimizerConfig`.
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

    if config.schedule == "cosine_with_restarts" and decay_steps * config.restarts >= 2**31:
        raise ValueError(f"decay_steps × restarts = {decay_steps * config.restarts} must be below 2**31 "
                         "(the cycle position is computed in int32)")

    def schedule(step):
        # Integer arithmetic for the position in the decay: under jit XLA turns a division by a constant
        # into a multiplication by its reciprocal, and (R · p) mod 1 at a restart (R · p = 1 exactly)
        # would then land just below 1 and give a rate of η_end instead of the peak.
        step = jnp.asarray(step, jnp.int32)
        elapsed = jnp.clip(step - warmup, 0, decay_steps)  # k
        progress = elapsed.astype(jnp.float32) / decay_steps
        if config.schedule == "constant":
            # No dependence on the run length, so runs of different lengths compile the same step.
            decayed = jnp.full(step.shape, peak, jnp.float32)
        elif config.schedule == "linear":
            decayed = final + (peak - final) * (1.0 - progress)
        elif config.schedule == "cosine":
            decayed = final + (peak - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        else:  # cosine_with_restarts: each of the `restarts` cycles decays from the peak again
            cycle_position = jnp.mod(elapsed * config.restarts, decay_steps).astype(jnp.float32) / decay_steps
            decayed = jnp.where(elapsed >= decay_steps, final,
                                final + (peak - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * cycle_position)))
        if warmup == 0:
            return decayed
        return jnp.where(step < warmup, peak * step.astype(jnp.float32) / warmup, decayed)

    return schedule
