"""Driving a :class:`~jaxalign.rollout.continuous.ContinuousEngine` as a server's scheduler does: requests arrive
at given iterations, are prefilled together (or join a decode step), and leave when they have their tokens.

Imports nothing from the test fixtures (no transformers, no torch), so the 8-device subprocess check uses it too.
"""

from __future__ import annotations

import dataclasses

from jaxalign.rollout.continuous import ContinuousEngine

MAX_ITERATIONS = 200


@dataclasses.dataclass
class Join:
    """Rows ``{row_id: settings}`` sharing the prompt ``prompt`` join at iteration ``at`` (or as soon as they fit
    after it) and leave once they have ``tokens`` tokens each."""

    at: int
    prompt: list[int]
    rows: dict
    tokens: int


def drive(engine: ContinuousEngine, joins: list[Join], *, limit: int = MAX_ITERATIONS, joining: bool = False) -> dict:
    """Run the joins to the end: ``{row_id: [TokenOut, ...]}``. Each iteration releases the rows that have their
    tokens, admits the joins that are due (prefilled together, as the scheduler does), and steps once. With
    ``joining``, the first due join the engine lets join a step runs inside that step instead of being prefilled."""
    outs: dict = {}
    wanted: dict = {}
    pending = sorted(joins, key=lambda j: j.at)

    def release_done():
        for row_id in [r for r, w in wanted.items() if len(outs[r]) >= w]:
            engine.release(row_id)
            del wanted[row_id]

    try:
        for iteration in range(limit):
            release_done()
            due, free = [], engine.free
            while pending and pending[0].at <= iteration and free >= len(pending[0].rows):
                free -= len(pending[0].rows)
                due.append(pending.pop(0))
            stepping = next((j for j in due if engine.joinable(j.prompt, len(j.rows))), None) if joining else None
            if stepping is not None:
                due.remove(stepping)
                wanted.update({row_id: stepping.tokens for row_id in stepping.rows})
            if due:
                for join, prefilled in zip(due, engine.prefill_many([j.prompt for j in due])):
                    for row_id, out in engine.admit(prefilled, join.rows).items():
                        outs[row_id], wanted[row_id] = [out], join.tokens
                release_done()
            if not pending and not wanted:
                return outs
            stepped = engine.step() if stepping is None else engine.step((stepping.prompt, stepping.rows))
            for row_id, out in stepped.items():
                outs.setdefault(row_id, []).append(out)
        raise AssertionError(f"the rows did not finish in {limit} iterations")
    finally:
        for row_id in wanted:
            engine.release(row_id)


def tokens_of(outs: dict, row_id) -> list[int]:
    return [out.token for out in outs[row_id]]
