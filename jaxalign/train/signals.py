"""SIGTERM/SIGINT as a request to checkpoint and stop at the next step boundary.

Schedulers (SLURM, Kubernetes, spot/preemptible VMs) send SIGTERM some seconds before killing a job, and
Ctrl-C sends SIGINT. Stopping inside a step would lose it or corrupt the state, so the handler only
records the signal; the training loop checks it after each step, saves, and exits with
:class:`TrainingInterrupted`. Further signals are ignored (with a note on stderr) until the context
exits, i.e. until the checkpoint (the interrupted run's or the final one) is on disk: a scheduler or a
user repeating SIGTERM/Ctrl-C must not kill the process in the middle of the save it asked for. The
previous handlers are restored on exit. (SIGKILL still stops the process; an unfinished Orbax checkpoint
is never used.)
"""

from __future__ import annotations

import os
import signal
import threading
import warnings

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(SystemExit):
    """Raised after the checkpoint of an interrupted run is on disk; exits with status ``128 + signal``
    (the shell convention: 143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, signum: int, step: int):
        super().__init__(128 + signum)
        self.signum, self.step = signum, step

    def __str__(self) -> str:
        return f"{signal.Signals(self.signum).name} received: stopped after step {self.step}"


class StopSignals:
    """Context manager turning ``signals`` into ``received`` (the first signal's number, None before one
    arrives); later signals are ignored until the context exits, which restores the previous handlers.

    Handlers can only be installed from the main thread; elsewhere it warns and installs nothing.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("training outside the main thread: SIGTERM/SIGINT will not trigger a checkpoint",
                          stacklevel=2)
            return self
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            return
        os.write(2, f"jaxalign: {signal.Signals(signum).name} ignored: the run is stopping after "
                    "its checkpoint is written\n".encode())

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def __exit__(self, *exc_info) -> None:
        self._restore()
