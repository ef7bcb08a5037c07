"""Run by test_resume.py: the full Trainer on the tiny model, checkpointing and logging under WORKDIR.

``python -m tests.train.resume_run WORKDIR [--pause-at N]`` trains to step 20 (resuming from
WORKDIR/checkpoints if a checkpoint is there) and writes WORKDIR/final_params.npz when it completes.
With ``--pause-at N`` it creates WORKDIR/paused while fetching the N-th batch and waits there until
WORKDIR/signalled exists: the test sends SIGTERM, then creates that file, so the signal lands in step N.
The objective draws from the step's RNG key and the batches come from a resumable iterator, so only an
exact restore of parameters, optimizer state, step, RNG key and data position reproduces a straight run.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from jaxalign.train import CheckpointConfig, LogConfig, OptimizerConfig, TrainConfig, Trainer
from tests.train.tiny import BATCH, TinyBatches, host_params, keyed_sft_objective, tiny_model

TOTAL_STEPS = 20
PAUSED_FILE, SIGNALLED_FILE = "paused", "signalled"


class PausingBatches(TinyBatches):
    def __init__(self, *args, workdir: str, pause_at: int | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.workdir, self.pause_at = workdir, pause_at

    def __next__(self):
        if self.position + 1 == self.pause_at:
            open(os.path.join(self.workdir, PAUSED_FILE), "w").close()
            deadline = time.monotonic() + 120
            while not os.path.exists(os.path.join(self.workdir, SIGNALLED_FILE)) and time.monotonic() < deadline:
                time.sleep(0.02)
        return super().__next__()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--pause-at", type=int, help="signal the batch of this step (1-based) with a file")
    args = parser.parse_args()
    config = TrainConfig(
        total_steps=TOTAL_STEPS, seed=3, micro_batches=2,
        optimizer=OptimizerConfig(learning_rate=3e-3, schedule="cosine", warmup_steps=3, weight_decay=0.01),
        checkpoint=CheckpointConfig(directory=os.path.join(args.workdir, "checkpoints"), save_every_steps=4,
                                    keep_last=2),
        log=LogConfig(directory=os.path.join(args.workdir, "logs"), progress_bar=False),
    )
    data = PausingBatches(BATCH, seed=1, workdir=args.workdir, pause_at=args.pause_at)
    state = Trainer(config, tiny_model(), keyed_sft_objective, data).run()
    np.savez(os.path.join(args.workdir, "final_params.npz"), **host_params(state))


if __name__ == "__main__":
    main()
