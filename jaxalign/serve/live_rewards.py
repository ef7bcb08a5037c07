"""Reward on live traffic: every finished response scored by a reward model off the request path, on ``/metrics``.

``jaxalign serve --reward-model DIR`` hands each finished request's prompt and responses to :class:`LiveRewards`,
whose own thread scores them in batches with :class:`~jaxalign.eval.judges.RewardModelJudge` (the reward model's
saved normalisation; its tokenizer's chat template renders prompt and response as training rendered pairs) and
exports:

- ``jaxalign_response_reward`` (summary): ``_count`` and ``_sum`` of the rewards, so ``rate(_sum) / rate(_count)``
  is the mean over any window in PromQL (a summary, not a histogram: ``prometheus_client`` leaves out the ``_sum``
  of a histogram with negative buckets, and a normalised reward is negative half the time);
- ``jaxalign_response_reward_mean`` (gauge): the mean over every response scored since the server started (NaN
  before the first);
- ``jaxalign_responses_unscored_total{reason}``: responses not scored: ``queue_full`` (more than ``max_pending``
  waited: the server never slows down for its monitor) or ``error`` (the scorer refused or failed on that response,
  e.g. one longer than the reward model's positions; logged; a failing batch is scored again one response at a
  time, so only the responses that fail are lost);
- ``jaxalign_reward_queue_depth``: responses waiting to be scored.

Requests that fail or whose client left are not scored: they have no finished response.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence

from prometheus_client import Counter, Gauge, Summary

log = logging.getLogger("jaxalign.serve")

DEFAULT_MAX_PENDING = 256
STOP_POLL_S = 0.5


class LiveRewards:
    """Scores finished responses in a background thread and records the rewards in ``registry``.

    Args:
        judge: anything with ``score(prompts, responses) -> [N]`` (a
            :class:`~jaxalign.eval.judges.RewardModelJudge` in ``jaxalign serve``).
        registry: the server's ``prometheus_client`` registry (``Metrics.registry``).
        model: the served model's id (the metrics' ``model`` label).
        batch_size: most responses per scoring call.
        max_pending: most responses waiting to be scored; more are counted as unscored, never waited for.
    """

    def __init__(self, judge, registry, *, model: str, batch_size: int = 8, max_pending: int = DEFAULT_MAX_PENDING):
        if batch_size < 1 or max_pending < 1:
            raise ValueError(f"LiveRewards: batch_size and max_pending must be >= 1, got {batch_size}, {max_pending}")
        self.judge = judge
        self.batch_size = batch_size
        self._pending: queue.Queue = queue.Queue(maxsize=max_pending)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._total = 0.0
        self._count = 0
        self._lock = threading.Lock()
        self._model = model
        labels = {"model": model}
        self.rewards = Summary("jaxalign_response_reward", "reward-model score of each finished response", ["model"],
                               registry=registry).labels(**labels)
        self.mean = Gauge("jaxalign_response_reward_mean", "mean reward of every response scored since the start",
                          ["model"], registry=registry).labels(**labels)
        self.mean.set(float("nan"))  # no response scored yet
        self.unscored = Counter("jaxalign_responses_unscored", "finished responses left unscored, by reason",
                                ["model", "reason"], registry=registry)
        for reason in ("queue_full", "error"):  # both series exist from the start, so rate() sees them at 0
            self.unscored.labels(model=model, reason=reason)
        Gauge("jaxalign_reward_queue_depth", "finished responses waiting to be scored", ["model"],
              registry=registry).labels(**labels).set_function(self._pending.qsize)

    @property
    def scored(self) -> int:
        with self._lock:
            return self._count

    def submit(self, prompt, responses: Sequence[str]) -> None:
        """Queue ``responses`` (the choices of one request) to ``prompt`` for scoring; never blocks."""
        for response in responses:
            try:
                self._pending.put_nowait((prompt, response))
            except queue.Full:
                self.unscored.labels(model=self._model, reason="queue_full").inc()

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="jaxalign-live-rewards", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the batch being scored (what still waits is left unscored)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():  # else it is still scoring: start() must not add a second consumer
                self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                batch = [self._pending.get(timeout=STOP_POLL_S)]
            except queue.Empty:
                continue
            while len(batch) < self.batch_size:
                try:
                    batch.append(self._pending.get_nowait())
                except queue.Empty:
                    break
            self._score(batch)

    def _score(self, batch: list) -> None:
        prompts, responses = [p for p, _ in batch], [r for _, r in batch]
        try:
            rewards = [float(r) for r in self.judge.score(prompts, responses)]
        except Exception as error:  # a monitor must not take the server down: count, log, go on
            if len(batch) > 1:  # one bad response must not cost the others theirs
                for item in batch:
                    self._score([item])
                return
            log.warning("the reward model could not score a response: %s: %s", type(error).__name__, error)
            self.unscored.labels(model=self._model, reason="error").inc()
            return
        with self._lock:
            for reward in rewards:
                self.rewards.observe(reward)
                self._total += reward
                self._count += 1
            self.mean.set(self._total / self._count)
