"""The order in which a benchmark times its two sides (jaxalign and its peer) in one process.

- ``blocks`` (the default): each side's timed calls back to back, jaxalign's first, each block right after one
  untimed call of its own side, as each framework's users make their calls.
- ``interleaved``: the two alternate call by call, so that load from other processes on a shared machine hits
  both alike.

Alternating lets each side's freed memory sit idle through the other side's call. On a virtual machine that
hands freed memory back to its host (Firecracker's free page reporting: ``page_reporting.page_reporting_order``
on the kernel's command line), memory idle for about 2 s is reclaimed and the next call faults it in again, so
the interleaved order charges each side for the other's call: at one commit on 2 Xeon cores a DPO step measured
2.04x TRL's in blocks and 1.54x interleaved (benchmarks/README.md, "Reading the machine's noise").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

ORDERS = ("blocks", "interleaved")
HELP = "blocks: each side's timed calls back to back; interleaved: alternating call by call"


def timed(run: Callable[[], object]) -> float:
    """Wall-clock seconds of one call (the caller's ``run`` waits for its results)."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def time_sides(ours: Callable[[int], object], theirs: Callable[[int], object], calls: Sequence[int],
               order: str) -> tuple[list[float], list[float]]:
    """Seconds of ``ours(c)`` and ``theirs(c)`` for each ``c`` of ``calls``, timed in ``order``; in ``blocks``
    each side first makes one untimed call ``(0)``."""
    if order == "interleaved":
        pairs = [(timed(lambda c=c: ours(c)), timed(lambda c=c: theirs(c))) for c in calls]
        return [pair[0] for pair in pairs], [pair[1] for pair in pairs]
    if order != "blocks":
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    sides = []
    for run in (ours, theirs):
        run(0)
        sides.append([timed(lambda c=c, run=run: run(c)) for c in calls])
    return sides[0], sides[1]
