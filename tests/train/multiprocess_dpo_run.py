"""Run by test_multiprocess_dpo.py: jaxalign's DPO objective (a frozen reference model) on an 8-device
(data=2, fsdp=4) mesh, as one process of 8 CPU devices or as 4 processes of 2 joined over loopback.

The Trainer trains to ``--steps`` on the same global batches of pairs from the same initial weights, each process
feeding its rows, checkpointing every step in WORKDIR/checkpoints and logging in WORKDIR/logs; when the
checkpoint directory already holds steps (the test copies another layout's there), it resumes from the newest.
Process 0 writes the gathered parameters at the end to WORKDIR/params.npz; every process evaluates two held-out
batches on the mesh (jaxalign.methods.common.evaluate_objective) and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np

from jaxalign.methods.common import evaluate_objective
from jaxalign.methods.dpo import dpo_objective
from jaxalign.train import (
    CheckpointConfig,
    LogConfig,
    MeshConfig,
    TrainConfig,
    Trainer,
    add_distributed_arguments,
    initialize_from_args,
)
from tests.train.multiprocess_run import global_params
from tests.train.tiny import SGD, T, V, tiny_model

MESH = MeshConfig(data=2, fsdp=4, tensor=1)
PAIRS = 16  # a global batch: 2 micro-batches × 8 batch shards
PROMPT = 3  # the first tokens of each row are the prompt: the loss covers the completion after them


class PairBatches:
    """Random global batches of ``PAIRS`` pairs (``[B, 2, T]``, the layout of jaxalign.data's preference
    batches), of which this process takes its rows. The position is global, the same on every process (as
    :class:`jaxalign.data.BatchIterator`'s), so a checkpoint resumes under another process count."""

    def __init__(self, process: int, processes: int, seed: int = 7):
        self.process, self.processes, self.position, self.seed = process, processes, 0, seed

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.position])
        self.position += 1
        lengths = rng.integers(PROMPT + 2, T + 1, size=(PAIRS, 2))
        attention = (np.arange(T) < lengths[..., None]).astype(np.int32)
        tokens = rng.integers(0, V, size=(PAIRS, 2, T), dtype=np.int32)
        tokens[:, 1, :PROMPT] = tokens[:, 0, :PROMPT]  # both responses answer one prompt
        batch = {"input_ids": tokens * attention, "attention_mask": attention,
                 "positions": (np.cumsum(attention, -1) - 1).astype(np.int32) * attention,
                 "loss_mask": attention * (np.arange(T) >= PROMPT), "example_mask": np.ones(PAIRS, np.int32)}
        rows = PAIRS // self.processes
        return {name: array[self.process * rows:(self.process + 1) * rows] for name, array in batch.items()}

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def main() -> None:
    parser = add_distributed_arguments(argparse.ArgumentParser())
    parser.add_argument("workdir")
    parser.add_argument("--steps", type=int, required=True)
    args = parser.parse_args()
    initialize_from_args(args)
    process, processes = jax.process_index(), jax.process_count()
    assert jax.device_count() == 8, jax.devices()

    config = TrainConfig(
        total_steps=args.steps, micro_batches=2, optimizer=SGD, mesh=MESH,
        checkpoint=CheckpointConfig(directory=os.path.join(args.workdir, "checkpoints"), save_every_steps=1,
                                    keep_last=None),
        log=LogConfig(directory=os.path.join(args.workdir, "logs"), progress_bar=False),
    )
    data = PairBatches(process, processes)
    trainer = Trainer(config, tiny_model(), dpo_objective(beta=0.5, chunk_size=None), data,
                      references={"ref": tiny_model()})  # the same seed: the policy starts as the reference
    params = global_params(trainer.run())
    # Held-out pairs (another seed) evaluated on the mesh, each process passing its rows, as the pipeline does
    # after training: every layout must measure the same global batches.
    held_out = PairBatches(process, processes, seed=8)
    metrics = evaluate_objective(dpo_objective(beta=0.5, chunk_size=None), trainer.trained_model(),
                                 (next(held_out) for _ in range(2)), trainer.train_step.reference_models(),
                                 mesh=trainer.mesh)
    if process == 0:
        np.savez(os.path.join(args.workdir, "params.npz"), **params)
    print(json.dumps({"process": process, "process_count": processes, "local_devices": jax.local_device_count(),
                      "mesh": dict(trainer.mesh.shape), "data_position": data.state_dict(),
                      "saved_steps": trainer.checkpointer.all_steps(), "eval": metrics}))


if __name__ == "__main__":
    main()
