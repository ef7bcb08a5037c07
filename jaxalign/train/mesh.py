"""Device meshes over ``(data, fsdp, tensor)`` and the placement of batches on them.

Parameters follow the model's partition table (``jaxalign.models.named_shardings``); a batch is split
along its leading axis over ``data`` × ``fsdp`` and replicated over ``tensor``, so every data-parallel
rank sees its own rows and the tensor-parallel ranks of one group see the same rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxalign.models.activation_sharding import BATCH_AXES
from jaxalign.models.sharding import MESH_AXES
from jaxalign.train.config import MeshConfig


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes ``(data, fsdp, tensor)`` over ``devices`` (default: every device of every process).

    ``-1`` sizes are inferred (see :meth:`MeshConfig.resolve`). The axes are ``Auto``: XLA's sharding
    propagation places intermediates, as with pjit. ``jax.make_mesh`` orders the devices so that inner
    axes (``tensor``) stay on fast interconnect.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = (config or MeshConfig()).resolve(len(devices)).shape
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def single_device_mesh(device: jax.Device | None = None) -> Mesh:
    """A ``(1, 1, 1)`` mesh on one device (default: the first local one): the no-parallelism path."""
    return make_mesh(MeshConfig(1, 1, 1), [device or jax.local_devices()[0]])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data`` × ``fsdp``; every other axis whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_shard_count(mesh: Mesh) -> int:
    """Number of distinct batch slices: the global batch must be a multiple of it."""
    return int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))


def global_rows(leaf: Any, mesh: Mesh) -> int:
    """The global batch size a batch leaf stands for: a ``jax.Array`` is global already; a NumPy array is this
    process's share of the rows, which every process of the mesh passes in equal parts."""
    if isinstance(leaf, jax.Array):
        return leaf.shape[0]
    return np.shape(leaf)[0] * len({device.process_index for device in mesh.devices.flat})


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays (``jax.Array``) from this process's rows of a batch.

    Each process passes the rows its devices hold: with ``P`` processes over the batch axes and a global
    batch of ``B`` rows, ``B / P`` consecutive rows (process ``i`` holds rows ``i·B/P ... (i+1)·B/P − 1``
    for the default device order). On one process that is the whole batch. Arrays that already are global
    ``jax.Array`` values with the batch sharding pass through unchanged.

    Args:
        batch: a mapping (or any pytree) of NumPy arrays ``[B_local, ...]``.
        mesh: the training mesh.

    Returns:
        the same structure of global arrays ``[B, ...]`` sharded with :func:`batch_sharding`.
    """
    sharding = batch_sharding(mesh)

    def place(array):
        if isinstance(array, jax.Array) and array.sharding == sharding:
            return array
        return jax.make_array_from_process_local_data(sharding, np.asarray(array))

    return jax.tree.map(place, batch)
