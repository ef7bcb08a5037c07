"""Keep activations split by rows over the mesh's batch axes while the weights are gathered (FSDP).

The train step places the batch split over ``data`` × ``fsdp`` and each weight split over ``fsdp`` (and
``tensor``), and lets XLA's sharding propagation place everything in between. Left alone, the SPMD partitioner
may contract a batch-split activation with an ``fsdp``-split kernel by regathering the *activations* (every
device then holds the whole global batch's hidden states and all-reduces partial products) instead of gathering
the kernel, as FSDP intends: per-device activation memory then grows with the global batch instead of shrinking
with the mesh. Constraining each layer's hidden states to stay split by rows (as MaxText's logical activation
axes do) leaves the partitioner one choice: gather the layer's weights, one layer at a time inside the scan.

The constraint applies only under a mesh context (``jax.set_mesh``, set by the train step around its program), so
the models run unchanged anywhere else.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec

#: The mesh axes a batch's rows are split over: data parallel and fully sharded data parallel.
BATCH_AXES = ("data", "fsdp")


def constrain_rows(x: jax.Array) -> jax.Array:
    """``x`` (rows first) constrained to be split by rows over the current mesh's batch axes, replicated along
    the rest; ``x`` unchanged without a mesh context, or when its rows do not divide over those axes."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    axes = tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names and mesh.shape[axis] > 1)
    if not axes or x.shape[0] % math.prod(mesh.shape[axis] for axis in axes):
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(axes, *([None] * (x.ndim - 1))))
