"""Run by test_multiprocess.py as process 0 and 1 of one JAX job (4 CPU devices each, joined over loopback):

1. the Trainer runs 3 steps on an 8-device (data=2, tensor=4) mesh spanning both processes, each process
   feeding its half of every batch, and checkpoints steps 2 and 3 (both processes write their shards);
2. both processes restore step 3 (the state, and each its own data position) and train step 4 from it
   with the same compiled step.

Writes WORKDIR/final_params.npz (process 0) and prints one JSON line per process; process 0's
metrics.jsonl holds the losses of steps 1-3.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxalign.train import (
    CheckpointConfig,
    LogConfig,
    MeshConfig,
    TrainConfig,
    Trainer,
    add_distributed_arguments,
    initialize_from_args,
)
from tests.train.tiny import BATCH, SGD, TinyBatches, sft_objective, tiny_model

CONFIG = dict(micro_batches=4, optimizer=SGD, mesh=MeshConfig(data=2, fsdp=1, tensor=4))


def global_params(state) -> dict[str, np.ndarray]:
    """Every parameter as a whole NumPy array on this host (a collective: both processes call it)."""
    gathered = multihost_utils.process_allgather(state.params, tiled=True)
    return {"/".join(str(key.key) for key in path if hasattr(key, "key")): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(gathered)[0]}


def main() -> None:
    parser = add_distributed_arguments(argparse.ArgumentParser())
    parser.add_argument("workdir")
    args = parser.parse_args()
    assert initialize_from_args(args)
    process, processes = jax.process_index(), jax.process_count()

    config = TrainConfig(
        total_steps=3, **CONFIG,
        checkpoint=CheckpointConfig(directory=os.path.join(args.workdir, "checkpoints"), save_every_steps=2),
        log=LogConfig(directory=os.path.join(args.workdir, "logs"), progress_bar=False),
    )
    first = Trainer(config, tiny_model(), sft_objective, TinyBatches(BATCH, shard_index=process, shard_count=processes))
    after_three = global_params(first.run())

    restored = first.checkpointer.restore(first.train_step.abstract_state())
    restored_params = global_params(restored.state)
    data = TinyBatches(BATCH, shard_index=process, shard_count=processes)
    data.load_state_dict(restored.data_position)
    state, metrics = first.train_step(restored.state, next(data))
    after_four = global_params(state)
    if process == 0:
        np.savez(os.path.join(args.workdir, "final_params.npz"), **after_four)

    print(json.dumps({
        "process": process, "process_count": processes, "devices": jax.device_count(),
        "local_devices": jax.local_device_count(), "mesh": dict(first.mesh.shape),
        "saved_steps": first.checkpointer.all_steps(), "restored_step": restored.step,
        "restored_position": restored.data_position,
        "restored_equals_saved": all(np.array_equal(restored_params[k], after_three[k]) for k in after_three),
        "step_4_loss": float(jax.device_get(metrics["loss"])),
    }))


if __name__ == "__main__":
    main()
