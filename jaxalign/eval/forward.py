"""Jitted, fixed-shape forward passes the evaluation metrics share: target log-probs of a causal LM and the
rewards of a reward model.

Evaluation visits many batches, so each function takes the model as ``(graphdef, state)`` (split once by
:func:`split_model`): the graphdef is a static argument, the state an ordinary array argument, and every
batch of the same shape reuses one compiled program. :func:`padded_batches` pads the last batch with
all-padding rows instead of compiling a smaller one.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxalign.models import scoring


class SplitModel(NamedTuple):
    """A model as ``(graphdef, state)`` in inference mode (dropout off), ready for the jitted functions."""

    graphdef: Any
    state: nnx.State


def split_model(model: nnx.Module) -> SplitModel:
    """``model`` with dropout off (a view; the caller's model is untouched), split for the jitted forwards."""
    model = nnx.view(model, deterministic=True, raise_if_not_found=False)
    graphdef, state = nnx.split(model)
    return SplitModel(graphdef, state)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size"))
def target_logps(graphdef, state, input_ids: Int[Array, "R T"], attention_mask: Array, positions: Array | None,
                 segment_ids: Array | None, *, chunk_size: int | None) -> Float[Array, "R T-1"]:
    """:func:`jaxalign.models.scoring.target_logps` (the trainers' scorer, LM head chunked) compiled once per
    batch shape: ``log p(input_ids[:, t+1] | input_ids[:, :t+1])`` for every ``t``, float32."""
    return scoring.target_logps(nnx.merge(graphdef, state), input_ids, attention_mask, positions, segment_ids,
                                chunk_size=chunk_size)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def rewards(graphdef, state, input_ids: Int[Array, "R T"], attention_mask: Array,
            positions: Array | None) -> Float[Array, " R *D"]:
    """A :class:`~jaxalign.models.RewardModel`'s rewards ``[R]`` (or ``[R, D]`` for a D-objective head)."""
    return nnx.merge(graphdef, state)(input_ids, attention_mask=attention_mask, positions=positions)


def padded_batches(arrays: dict[str, np.ndarray | None], batch_size: int) -> Iterator[tuple[int, dict]]:
    """``(real rows, batch)`` over the leading axis in batches of exactly ``batch_size`` rows.

    The last batch is completed with rows of zeros (``attention_mask`` 0: padding the model never attends
    to), so every batch has one shape and compiles once; the caller keeps the first ``real rows`` outputs.
    None values pass through as None.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = next(len(v) for v in arrays.values() if v is not None)
    for start in range(0, total, batch_size):
        rows = min(batch_size, total - start)
        batch = {}
        for name, value in arrays.items():
            if value is None:
                batch[name] = None
                continue
            chunk = np.asarray(value[start:start + rows])
            if rows < batch_size:
                chunk = np.concatenate([chunk, np.zeros((batch_size - rows, *chunk.shape[1:]), chunk.dtype)])
            batch[name] = chunk
        yield rows, batch
