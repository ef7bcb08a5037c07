"""The scheduler: one thread that owns the :class:`~jaxalign.rollout.continuous.ContinuousEngine` and turns its
tokens into text for the requests waiting on it.

Each loop iteration (as vLLM's scheduler, prefills first so a new request's first token is not held behind
running ones): drop cancelled and timed-out requests; admit waiting requests while slots are free, up to
``prefill_tokens`` prompt tokens per iteration (so a burst of arrivals cannot stall the running rows for
long), prefilled together in groups whose first tokens go out as soon as each group is done; run one decode
step for every live row; hand each row's new text to its request.

While rows decode, a request that continues the cached chat-template head by a short question (up to 24 tokens;
``ContinuousEngine.joinable``) is not prefilled at all: it joins the next decode step, its prompt tokens riding in
the step's matrix products (vLLM's chunked prefill, one prompt per step), so the running rows do not stop for it
(SmolLM2-135M on 2 CPU cores, 31 rows and 128 cache columns: the step takes 13 ms more, where a prefill call stalls
them for about 105 ms). One request joins per step unless more than ``JOIN_BACKLOG`` of the waiting ones could
start now (as many as there are free slots): such a burst is prefilled in groups as below, so that its last
request does not wait one step per request before it. A long line behind few free slots (more clients than
slots) still joins, one request per freed slot, instead of paying a prefill call for each.

While rows decode, a request that arrives alone may be held for up to ``prefill_wait`` decode steps so that
it shares its prefill call with the next arrival (vLLM's ``scheduler_delay_factor``, counted in steps): every
prefill call stalls all running rows, and a call of short prompts (up to 32 columns, as the rest of most chat
prompts after the cached head) prefills at least two rows, so a lone one pays for two (SmolLM2-135M on 2 CPU
cores: 92 ms for one prompt, 93 ms for two, 125 ms for four, against 107-146 ms for a decode step of 32 rows).
A request is admitted at once when nothing decodes, when another waits with it, or when it has waited
``prefill_wait`` steps.
A row leaves its slot the moment it ends (a stop token, a stop string, ``max_tokens``, the context length) or
its client goes away. The HTTP side never touches the engine: it submits a :class:`Job` and reads
:class:`Event`\\ s from the job's asyncio queue, which the scheduler fills with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from jaxalign.rollout.continuous import MAX_PREFILL_ROWS, MIN_BATCH_BUCKET, ContinuousEngine, RowSettings, TokenOut
from jaxalign.rollout.text import TextStream
from jaxalign.serve.protocol import APIError

log = logging.getLogger("jaxalign.serve")

# Most requests that could start now (waiting, each with a free slot) for which the first one joins the next decode
# step (one per step); more are prefilled in groups, so that the last of a burst does not wait one step per request
# before it.
JOIN_BACKLOG = 4


@dataclasses.dataclass
class Event:
    """What a job's queue receives.

    ``kind``: ``"start"`` (the job holds its rows; ``version`` is the model version that answers it),
    ``"delta"`` (``index``'s new ``text`` and the ``tokens`` behind it), ``"finish"`` (``index`` ended with
    ``reason``), ``"done"`` (every sample ended; ``completion_tokens``), ``"error"`` (``error``).
    """

    kind: str
    version: str | None = None
    index: int = 0
    text: str = ""
    tokens: list[TokenOut] = dataclasses.field(default_factory=list)
    reason: str | None = None
    completion_tokens: int = 0
    error: APIError | None = None


class _Sample:
    """One row's text so far: decoding, stop strings held back until they can no longer match."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.stream = TextStream(tokenizer)
        self.text = ""  # the complete characters so far (one decode per token, in TextStream.push)
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.sent = 0  # characters handed out
        self.pending: list[TokenOut] = []
        self.tokens = 0
        self.reason: str | None = None

    def push(self, out: TokenOut, *, is_stop_token: bool) -> str:
        """Add a token; return the text that can be sent now (and set ``reason`` when the row ends)."""
        self.tokens += 1
        self.pending.append(out)
        if is_stop_token:
            self.reason = "stop"
            return self._release(len(self.stream.text()), self.stream.text())
        self.text += self.stream.push(out.token)  # nothing while a character is incomplete
        text = self.text
        if self.stops:
            window = text[max(0, self.sent - self.hold):]
            found = [window.find(s) for s in self.stops]
            found = [f for f in found if f >= 0]
            if found:
                self.reason = "stop"
                return self._release(max(0, self.sent - self.hold) + min(found), text)
        return self._release(len(text) - self.hold, text)

    def finish(self, reason: str) -> str:
        """End the row (length limits) and flush what was held back."""
        self.reason = reason
        text = self.stream.text()
        return self._release(len(text), text)

    def _release(self, end: int, text: str) -> str:
        if end <= self.sent:
            return ""
        piece, self.sent = text[self.sent:end], end
        return piece


@dataclasses.dataclass(eq=False)
class Job:
    """One request as the scheduler runs it (``n`` rows, one per sample)."""

    prompt_ids: list[int]
    settings: list[RowSettings]
    max_tokens: int
    stops: tuple[str, ...]
    deadline: float
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    queued_at_iteration: int = 0  # the first scheduler iteration that could admit it
    first_token_at: float | None = None
    ignore_eos: bool = False  # stop tokens do not end the rows (vLLM's extension, for load tests)
    cancelled: bool = False
    samples: list[_Sample] = dataclasses.field(default_factory=list)

    def cancel(self) -> None:
        """Called by the HTTP side when the client goes away: the rows leave at the next iteration."""
        self.cancelled = True



class Scheduler:
    """Runs the engine in a background thread for submitted jobs.

    Args:
        engine: the decode slots.
        tokenizer: decodes tokens to text.
        stop_token_ids: ids that end a row (the model's EOS ids).
        max_queue: most requests waiting for a slot; :meth:`submit` refuses more with a 429.
        prefill_tokens: most prompt tokens admitted per iteration (at least one request always is).
        prefill_wait: most decode steps a waiting request is held, while rows decode, for others to join its
            prefill (0: admit at once).
        metrics: the server's :class:`~jaxalign.serve.metrics.Metrics` (or None).
        version: a name for the weights being served (OpenAI's ``system_fingerprint``); :meth:`swap_model`
            changes both.
    """

    def __init__(self, engine: ContinuousEngine, tokenizer, *, stop_token_ids: Sequence[int], max_queue: int = 256,
                 prefill_tokens: int = 2048, prefill_wait: int = 0, metrics=None, version: str | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        self.max_queue = max_queue
        self.prefill_tokens = prefill_tokens
        if prefill_wait < 0:
            raise ValueError(f"prefill_wait must be >= 0 decode steps, got {prefill_wait}")
        self.prefill_wait = prefill_wait
        self.metrics = metrics
        self._inbox: collections.deque[Job] = collections.deque()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: dict[int, Job] = {}  # id(job) -> job
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._outbox: list[tuple[Job, Event]] = []  # handed to the event loops once per iteration
        self._swap: tuple[Any, str, concurrent.futures.Future] | None = None
        self.version = version
        self.iterations = 0
        self._marked = time.perf_counter()  # see _mark (reset when the thread starts)

    # -- the HTTP side ----------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="jaxalign-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return len(self._inbox) + len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, job: Job) -> None:
        """Queue a job, or raise a 429 :class:`APIError` when ``max_queue`` requests already wait."""
        if len(job.settings) > self.engine.max_batch:
            raise APIError(400, f"n={len(job.settings)} needs more rows than the server's batch of "
                                f"{self.engine.max_batch}", param="n")
        with self._wake:
            if self._stopping:
                raise APIError(503, "the server is shutting down")
            if self.queued - self.engine.free >= self.max_queue:  # requests a free slot will take do not wait
                raise APIError(429, f"the server's queue is full ({self.max_queue} requests waiting); retry later",
                               code="queue_full")
            job.samples = [_Sample(self.tokenizer, job.stops) for _ in job.settings]
            self._inbox.append(job)
            self._wake.notify()
        self._gauges()

    def swap_model(self, model, version: str) -> concurrent.futures.Future:
        """Serve ``model`` (the base model's structure, e.g. a retrained version) as ``version``.

        Running requests finish on the old weights; requests that arrive meanwhile wait and run on the new
        ones, so each answer comes from one version. The returned future resolves (to ``version``) once the new
        weights serve, or holds the error if they do not fit; a later call replaces a swap still pending.
        """
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if self._stopping:
                raise RuntimeError("the scheduler has stopped")
            if self._swap is not None:
                self._swap[2].set_exception(RuntimeError(f"replaced by a swap to {version}"))
            self._swap = (model, version, future)
            self._wake.notify()
        return future

    # -- the engine thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        self._marked = time.perf_counter()  # see _mark
        while True:
            with self._wake:
                self._mark("other")
                while (not self._stopping and not self._inbox and not self._waiting and not self._running
                       and self._swap is None):
                    self._wake.wait()
                self._mark("idle")
                if self._stopping:
                    break
                self._take_inbox()
            try:
                self._iterate()
            except Exception as error:  # a bug must not kill the server: fail the running jobs, keep serving
                log.exception("scheduler iteration failed")
                for job in list(self._running.values()):
                    self._fail(job, APIError(500, f"generation failed: {type(error).__name__}: {error}"))
            self._mark("other")
            self._flush()
            self._mark("deliver")
        for job in [*self._running.values(), *self._waiting, *self._inbox]:
            self._send(job, Event("error", error=APIError(503, "the server is shutting down")))
        self._flush()
        if self._swap is not None:
            self._swap[2].set_exception(RuntimeError("the scheduler stopped before the swap"))

    def _take_inbox(self) -> None:
        """Submitted jobs join the waiting line (called holding ``_wake``)."""
        for job in self._inbox:
            job.queued_at_iteration = self.iterations + 1  # the first iteration that can admit it
        self._waiting.extend(self._inbox)
        self._inbox.clear()

    def _iterate(self) -> None:
        self.iterations += 1
        now = time.perf_counter()
        for job in [*self._waiting, *self._running.values()]:
            if job.cancelled or now > job.deadline:
                if not job.cancelled:
                    self._send(job, Event("error", error=APIError(408, "the request timed out before it finished",
                                                           code="timeout")))
                self._drop(job)
        if self._swap is not None and not self.engine.live:
            self._apply_swap()
        joining = None
        if self._swap is None:  # while a swap waits for the running rows, nothing new starts
            joining = self._joining_job()
            if joining is None:
                self._mark("other")
                self._admit()
                self._mark("prefill")
        if self.engine.live:
            self._mark("other")
            started = time.perf_counter()
            outputs = self._step(joining)
            if self.metrics is not None:
                self.metrics.decode_step(time.perf_counter() - started, len(outputs))
            self._mark("decode")
            self._deliver(outputs)
            self._mark("deliver")
        self._gauges()

    def _mark(self, phase: str) -> None:
        """Count the scheduler thread's time since the last mark as ``phase`` (``/metrics``:
        ``jaxalign_scheduler_seconds_total``), so a load test can tell where the server's time went."""
        now = time.perf_counter()
        if self.metrics is not None:
            self.metrics.scheduler_time(phase, now - self._marked)
        self._marked = now

    def _apply_swap(self) -> None:
        with self._wake:
            (model, version, future), self._swap = self._swap, None
        try:
            self.engine.replace_model(model)
        except Exception as error:
            log.exception("swapping to %s failed; still serving %s", version, self.version)
            future.set_exception(error)
            return
        self.version = version
        log.info("now serving %s", version)
        future.set_result(version)

    def _joining_job(self) -> Job | None:
        """The first waiting job when it joins this iteration's decode step instead of being prefilled."""
        if not self._waiting or min(len(self._waiting), self.engine.free) > JOIN_BACKLOG or not self.engine.live:
            return None
        job = self._waiting[0]
        if not self.engine.joinable(job.prompt_ids, len(job.settings)):
            return None
        return self._waiting.popleft()

    def _step(self, joining: Job | None) -> dict[Any, TokenOut]:
        """One decode step, with ``joining``'s prompt run inside it (when given)."""
        if joining is None:
            return self.engine.step()
        rows = {(id(joining), 0): joining.settings[0]}
        try:
            cached = len(self.engine.check_join(joining.prompt_ids, rows).head.tokens)
        except ValueError as error:  # the request's own fault (its prompt or settings); nothing changed
            self._send(joining, Event("error", error=APIError(400, f"the request could not start: {error}",
                                                               param="prompt")))
            return self.engine.step()
        try:
            outputs = self.engine.step(join=(joining.prompt_ids, rows))
        except Exception:  # the engine freed the row; the request hears of it, the running ones from _run
            self._send(joining, Event("error", error=APIError(500, "the request could not start")))
            raise
        self._started(joining, rows=1, cached=cached, joined=True)
        return outputs

    def _started(self, job: Job, *, rows: int, cached: int, joined: bool = False) -> None:
        """The job has its rows: it runs from now on, and its first tokens are on their way."""
        self._running[id(job)] = job
        self._send(job, Event("start", version=self.version))
        job.first_token_at = time.perf_counter()
        if self.metrics is not None:
            self.metrics.first_token(job.first_token_at - job.submitted, len(job.prompt_ids), rows, cached=cached,
                                     joined=joined)

    def _prefill_due(self) -> bool:
        """Whether the waiting jobs are prefilled now (see the module docstring), rather than held for company."""
        if not self._waiting or not self.engine.live or not self.prefill_wait:
            return True
        waited = self.iterations - self._waiting[0].queued_at_iteration  # decode steps it has been held
        # Prompts, not rows: a request for n samples is prefilled once (one prompt row, the rest padding).
        return len(self._waiting) >= MIN_BATCH_BUCKET or waited >= self.prefill_wait

    def _admit(self) -> None:
        """Admit waiting jobs in arrival order while their rows fit and ``prefill_tokens`` lasts."""
        if not self._prefill_due():
            return
        budget, free, chosen = self.prefill_tokens, self.engine.free, []
        while self._waiting and free >= len(self._waiting[0].settings) and (budget > 0 or not chosen):
            job = self._waiting.popleft()
            try:
                self.engine.check_prompt(job.prompt_ids)
            except ValueError as error:
                self._send(job, Event("error", error=APIError(400, str(error), param="prompt")))
                continue
            chosen.append(job)
            free -= len(job.settings)
            budget -= len(job.prompt_ids)
        # One prefill call's worth at a time, each group's first tokens sent before the next group's prefill:
        # in a burst of arrivals the first requests do not wait for the last ones' prompts.
        for start in range(0, len(chosen), MAX_PREFILL_ROWS):
            self._start(chosen[start:start + MAX_PREFILL_ROWS])
            self._flush()

    def _start(self, chosen: list[Job]) -> None:
        """Prefill ``chosen`` together, then give each its slots and first tokens."""
        try:
            prefilled = self.engine.prefill_many([j.prompt_ids for j in chosen])
        except Exception:  # find the job that fails: prefill them one by one, so only it gets the error
            log.exception("grouped prefill failed; prefilling one by one")
            prefilled = []
            for job in chosen:
                try:
                    prefilled.append(self.engine.prefill(job.prompt_ids))
                except Exception as error:
                    prefilled.append(error)
        for job, prompt in zip(chosen, prefilled, strict=True):
            rows = {(id(job), j): settings for j, settings in enumerate(job.settings)}
            try:
                if isinstance(prompt, Exception):
                    raise prompt
                first = self.engine.admit(prompt, rows)
            except Exception as error:  # this job alone fails; the others go on
                for row_id in rows:
                    self.engine.release(row_id)
                status = 400 if isinstance(error, ValueError) else 500
                if status == 500:
                    log.exception("admitting a request failed")
                self._send(job, Event("error", error=APIError(status, f"the request could not start: {error}")))
                continue
            self._started(job, rows=len(rows), cached=prompt.reused)
            self._deliver(first)

    def _deliver(self, outputs: dict[Any, TokenOut]) -> None:
        by_job: dict[int, list] = collections.defaultdict(list)
        for (job_id, index), out in outputs.items():
            by_job[job_id].append((index, out))
        for job_id, items in by_job.items():
            job = self._running.get(job_id)
            if job is None:
                continue
            for index, out in items:
                sample = job.samples[index]
                if sample.reason is not None:
                    continue
                text = sample.push(out, is_stop_token=not job.ignore_eos and out.token in self.stop_token_ids)
                if sample.reason is None:
                    total = len(job.prompt_ids) + sample.tokens
                    if sample.tokens >= job.max_tokens or total >= self.engine.max_model_len:
                        text += sample.finish("length")
                if text or sample.reason is not None:
                    self._send(job, Event("delta", index=index, text=text, tokens=sample.pending))
                    sample.pending = []
                if sample.reason is not None:
                    self.engine.release((job_id, index))
                    self._send(job, Event("finish", index=index, reason=sample.reason))
            if all(s.reason is not None for s in job.samples):
                self._complete(job)

    def _complete(self, job: Job) -> None:
        self._running.pop(id(job), None)
        tokens = sum(s.tokens for s in job.samples)
        self._send(job, Event("done", completion_tokens=tokens))
        if self.metrics is not None:
            self.metrics.finished(time.perf_counter() - job.submitted, tokens)

    def _drop(self, job: Job) -> None:
        """Take a job out wherever it is, freeing its rows."""
        if job in self._waiting:
            self._waiting.remove(job)
        if self._running.pop(id(job), None) is not None:
            for index in range(len(job.settings)):
                self.engine.release((id(job), index))
        if self.metrics is not None:
            self.metrics.dropped()

    def _fail(self, job: Job, error: APIError) -> None:
        self._send(job, Event("error", error=error))
        self._drop(job)

    def _send(self, job: Job, event: Event) -> None:
        self._outbox.append((job, event))

    def _flush(self) -> None:
        """Hand this iteration's events to their event loops: one wake-up per loop, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Event]]] = collections.defaultdict(list)
        for job, event in self._outbox:
            by_loop[job.loop].append((job, event))
        self._outbox = []
        for loop, events in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, events)
            except RuntimeError:  # the event loop has closed (server shutting down)
                for job, _ in events:
                    job.cancelled = True

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.load(queued=self.queued, running=self.running, live_rows=self.engine.live,
                              batch_bucket=self.engine.batch_bucket)


def _put_all(events: list[tuple[Job, Event]]) -> None:
    for job, event in events:
        job.queue.put_nowait(event)


def settings_for(*, n: int, temperature: float, top_p: float, top_k: int, min_p: float, seed: int,
                 top_logprobs: int, weights: tuple[float, ...] | None,
                 make: Callable[..., RowSettings] = RowSettings) -> list[RowSettings]:
    """One :class:`RowSettings` per sample of a request (sample ``j`` draws from ``fold_in(key(seed), j)``)."""
    return [make(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, sample=j,
                 weights=weights, top_logprobs=top_logprobs) for j in range(n)]
