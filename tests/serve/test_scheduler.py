"""The scheduler's admission policy, driven one iteration at a time (no thread): with ``prefill_wait``, a request
arriving alone while rows decode waits at most that many decode steps for company, and goes at once when nothing
decodes or when another request waits with it; and which waiting requests join a decode step instead of being
prefilled (one per step while at most JOIN_BACKLOG could start at once)."""

from __future__ import annotations

import asyncio
import math

import pytest

from jaxalign.models import load_hf
from jaxalign.rollout.continuous import ContinuousEngine, RowSettings
from jaxalign.serve.scheduler import Job, Scheduler
from tests.test_cli import tiny_tokenizer

GREEDY = RowSettings(temperature=0.0)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    model = load_hf(tiny_checkpoint)
    model = model[0] if isinstance(model, tuple) else model
    return ContinuousEngine(model, max_batch=4, max_model_len=48, pad_token_id=0)


class Driven:
    """A scheduler run by hand: ``tick()`` is one iteration of its thread; ``groups`` records each prefill call's
    jobs (by name) and the iteration it ran at."""

    def __init__(self, engine, prefill_wait: int):
        self.scheduler = Scheduler(engine, tiny_tokenizer(), stop_token_ids=(), prefill_wait=prefill_wait)
        self.loop = asyncio.new_event_loop()
        self.groups: list[tuple[int, list[str]]] = []
        self.names: dict[tuple, str] = {}
        prefill_many = engine.prefill_many

        def recording(prompts):
            self.groups.append((self.scheduler.iterations, [self.names[tuple(p)] for p in prompts]))
            return prefill_many(prompts)

        engine.prefill_many = recording
        self.engine = engine

    def submit(self, name: str, tokens: int, *, samples: int = 1, prompt: list[int] | None = None) -> Job:
        prompt = prompt or [3 + len(self.names), 5, 7]  # a prompt of its own per job
        self.names[tuple(prompt)] = name
        job = Job(prompt_ids=prompt, settings=[GREEDY] * samples, max_tokens=tokens, stops=(), deadline=math.inf,
                  loop=self.loop, queue=asyncio.Queue(), ignore_eos=True)
        self.scheduler.submit(job)
        return job

    def tick(self, times: int = 1) -> None:
        for _ in range(times):
            self.scheduler._take_inbox()
            self.scheduler._iterate()
            self.scheduler._flush()

    def close(self) -> None:
        del self.engine.prefill_many
        for job in list(self.scheduler._running.values()):
            self.scheduler._drop(job)
        self.loop.close()


@pytest.fixture
def driven(engine):
    runs = []

    def make(prefill_wait):
        runs.append(Driven(engine, prefill_wait))
        return runs[-1]

    yield make
    for run in runs:
        run.close()


def test_a_lone_arrival_waits_at_most_prefill_wait_steps(driven):
    run = driven(prefill_wait=3)
    run.submit("a", 30)
    run.tick()
    assert run.groups == [(1, ["a"])], "nothing decodes: the first request starts at once"
    run.tick(2)
    run.submit("b", 5)
    run.tick(5)
    # b is first considered at iteration 4, held through the decode steps of 4, 5 and 6, and starts alone at 7
    assert run.groups[1] == (4 + 3, ["b"])


def test_the_next_arrival_within_the_wait_shares_the_prefill_at_once(driven):
    run = driven(prefill_wait=4)
    run.submit("a", 30)
    run.tick(2)
    run.submit("b", 5)
    run.tick(2)
    run.submit("c", 5)
    run.tick(3)
    assert run.groups[1:] == [(5, ["b", "c"])], "b held through iterations 3 and 4, then starts with c"


def test_a_lone_request_for_several_samples_still_waits(driven):
    # n = 2 is one prompt: the prefill call would still run a padding row, so it waits like any lone prompt
    run = driven(prefill_wait=3)
    run.submit("a", 30)
    run.tick(3)
    run.submit("b", 5, samples=2)
    run.tick(5)
    assert run.groups[1] == (4 + 3, ["b"])


def test_requests_arriving_together_start_at_once(driven):
    run = driven(prefill_wait=10)
    run.submit("a", 30)
    run.tick(2)
    for name in "bcd":
        run.submit(name, 5)
    run.tick()
    assert run.groups[1:] == [(3, ["b", "c", "d"])]


def test_without_a_wait_each_arrival_starts_at_its_next_iteration(driven):
    run = driven(prefill_wait=0)
    run.submit("a", 30)
    run.tick(2)
    run.submit("b", 5)
    run.tick()
    run.submit("c", 5)
    run.tick()
    assert run.groups == [(1, ["a"]), (3, ["b"]), (4, ["c"])]


def test_a_negative_wait_is_refused(engine):
    with pytest.raises(ValueError, match="prefill_wait must be >= 0"):
        Scheduler(engine, tiny_tokenizer(), stop_token_ids=(), prefill_wait=-1)


HEAD = [11, 12, 13, 14, 15, 16, 17, 18]


def after_head(first: int) -> list[int]:
    """A prompt of its own continuing HEAD by 10 tokens (a joining row keeps its padding within slack // 2)."""
    return HEAD + [first] + [5] * 9


@pytest.fixture(scope="module")
def joining_engine(tiny_checkpoint):
    """Eight slots (joins need a batch bucket of 8) and a cached head the submitted prompts continue."""
    model = load_hf(tiny_checkpoint)
    model = model[0] if isinstance(model, tuple) else model
    engine = ContinuousEngine(model, max_batch=8, max_model_len=48, pad_token_id=0)
    engine.add_head(HEAD)
    return engine


@pytest.fixture
def joining_run(joining_engine):
    run = Driven(joining_engine, prefill_wait=0)
    yield run
    run.close()


def submit_many(run: Driven, prefix: str, count: int, tokens: int, *, first: int) -> list[str]:
    """``count`` one-sample requests continuing HEAD (names ``prefix0``...), in order; their names."""
    names = [f"{prefix}{index}" for index in range(count)]
    for index, name in enumerate(names):
        run.submit(name, tokens, prompt=after_head(first + index))
    return names


def test_a_long_line_behind_one_free_slot_joins_decode_steps(joining_run):
    # More clients than slots: the line is long, but one slot frees at a time. Prefilling each newcomer alone would
    # stall every running row for a whole prefill call; joining adds it to the step the rows run anyway.
    run, engine = joining_run, joining_run.engine
    busy = submit_many(run, "busy", 7, 30, first=40)
    run.tick()
    assert run.groups == [(1, busy)] and engine.free == 1
    submit_many(run, "line", 6, 2, first=60)
    joined = engine.joined
    run.tick()
    assert engine.joined == joined + 1 and len(run.groups) == 1, "the first in line joined the step"
    run.tick(3)  # its 2 tokens: it leaves and the next one joins in its slot
    assert engine.joined == joined + 2 and len(run.groups) == 1, run.groups


def test_a_burst_with_free_slots_is_prefilled_together(joining_run):
    run, engine = joining_run, joining_run.engine
    submit_many(run, "busy", 2, 30, first=40)
    run.tick()
    joined = engine.joined
    burst = submit_many(run, "burst", 6, 5, first=60)  # 6 free slots, 6 waiting: more than JOIN_BACKLOG could start
    run.tick()
    assert engine.joined == joined and run.groups[1:] == [(2, burst)]
