"""The train state: everything a step changes, hence everything a checkpoint must hold to resume exactly."""

from __future__ import annotations

import dataclasses

import jax
import optax
from flax import nnx


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """A pytree passed to, donated to and returned by the jitted step.

    Frozen parameters (a LoRA base, a frozen trunk) and reference models are not part of it: they are
    constants of the run, held by the :class:`~jaxalign.train.step.TrainStep` and rebuilt by the script
    that resumes.

    Attributes:
        step: ``[]`` int32, the number of completed steps (the next step's 0-based index).
        params: the trainable parameters as an ``nnx.State``, in float32 whatever the model's
            ``param_dtype`` (the master weights of mixed-precision training).
        opt_state: the optax state of ``params`` (sharded like them).
        model_state: the model's non-parameter Variables (e.g. dropout RNG counters), as a forward pass
            leaves them.
        rng: ``[2]`` uint32 key; each step splits off the key its objective sees.
    """

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    model_state: nnx.State
    rng: jax.Array
