"""What ``/metrics`` exports, in Prometheus' text format (``prometheus_client``, one registry per server).

Names follow vLLM's where they mean the same thing (``*_time_to_first_token_seconds``, ``*_e2e_request_latency``
...), prefixed ``jaxalign_``. Latency percentiles come from the histograms (``histogram_quantile`` in
PromQL); the benchmark measures them on the client side as well.
"""

from __future__ import annotations

import collections
import threading
import time
import weakref

from jax import monitoring
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: N811
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE", "Metrics"]

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
_STEP_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2, 5)
RATE_WINDOW_S = 10.0
# JAX records the seconds of every XLA compilation (or load from its persistent cache) under this event, with the
# jitted function's name (jax/_src/dispatch.py, BACKEND_COMPILE_EVENT).
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class Metrics:
    """The server's counters, gauges and histograms."""

    def __init__(self, model: str):
        self.registry = CollectorRegistry()
        labels = {"model": model}
        r = self.registry

        def counter(name, text, extra=()):
            return Counter(name, text, ["model", *extra], registry=r)

        self.requests = counter("jaxalign_requests", "HTTP requests answered, by endpoint and status",
                                ("endpoint", "status"))
        self.prompt_tokens = counter("jaxalign_prompt_tokens", "prompt tokens prefilled").labels(**labels)
        self.cached_prompt_tokens = counter(
            "jaxalign_prompt_tokens_cached",
            "prompt tokens read from a cached prompt head (the chat template's) instead of computed").labels(**labels)
        self.generation_tokens = counter("jaxalign_generation_tokens", "tokens generated").labels(**labels)
        self.joined = counter("jaxalign_prompts_joined",
                              "requests whose prompt ran in a decode step, not a prefill call").labels(**labels)
        self.cancelled = counter("jaxalign_requests_dropped",
                                 "requests that left before finishing (client gone or timed out)").labels(**labels)
        self.queue_depth = Gauge("jaxalign_queue_depth", "requests waiting for a decode slot", ["model"],
                                 registry=r).labels(**labels)
        self.running = Gauge("jaxalign_running_requests", "requests decoding", ["model"], registry=r).labels(**labels)
        self.live_rows = Gauge("jaxalign_live_rows", "decode slots in use (a request with n > 1 uses n)", ["model"],
                               registry=r).labels(**labels)
        self.batch_bucket = Gauge("jaxalign_batch_bucket", "rows of the compiled decode step now running", ["model"],
                                  registry=r).labels(**labels)
        self.tokens_per_second = Gauge("jaxalign_generation_tokens_per_second",
                                       f"tokens generated per second over the last {RATE_WINDOW_S:g} s", ["model"],
                                       registry=r).labels(**labels)
        self.latency = Histogram("jaxalign_e2e_request_latency_seconds", "request latency, arrival to last token",
                                 ["model"], buckets=_LATENCY_BUCKETS, registry=r).labels(**labels)
        self.ttft = Histogram("jaxalign_time_to_first_token_seconds", "arrival to first token", ["model"],
                              buckets=_LATENCY_BUCKETS, registry=r).labels(**labels)
        self.step_time = Histogram("jaxalign_decode_step_seconds", "one decode step of the whole batch", ["model"],
                                   buckets=_STEP_BUCKETS, registry=r).labels(**labels)
        # Where the scheduler thread's time goes: decode steps, prefill calls (with the admission of their rows),
        # handing tokens to requests (text, stop strings, events), waiting for work, and the rest of its loop.
        self.scheduler_seconds = counter("jaxalign_scheduler_seconds",
                                         "seconds of the scheduler thread, by phase (decode, prefill, deliver, "
                                         "idle, other)", ("phase",))
        # A program compiled while serving stalls every live row for its compile time: a warm server shows none.
        self.compilations = counter("jaxalign_xla_compilations",
                                    "XLA programs compiled (or read from JAX's compilation cache), by jitted function",
                                    ("function",))
        self.compile_seconds = counter("jaxalign_xla_compile_seconds",
                                       "seconds spent compiling XLA programs, by jitted function", ("function",))
        self.model = model
        _listening.add(self)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(model=self.model, endpoint=endpoint, status=str(status)).inc()

    def first_token(self, seconds: float, prompt_tokens: int, rows: int, *, cached: int = 0,
                    joined: bool = False) -> None:
        """A request's first tokens (``rows`` of them; a joined request's came from a decode step, counted there)."""
        self.ttft.observe(seconds)
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_prompt_tokens.inc(cached)
        if joined:
            self.joined.inc()
        else:
            self.generation_tokens.inc(rows)

    def decode_step(self, seconds: float, tokens: int) -> None:
        self.step_time.observe(seconds)
        self.generation_tokens.inc(tokens)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, tokens))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            self.tokens_per_second.set(sum(t for _, t in self._recent) / RATE_WINDOW_S)

    def scheduler_time(self, phase: str, seconds: float) -> None:
        self.scheduler_seconds.labels(model=self.model, phase=phase).inc(seconds)

    def finished(self, seconds: float, tokens: int) -> None:
        self.latency.observe(seconds)

    def dropped(self) -> None:
        self.cancelled.inc()

    def load(self, *, queued: int, running: int, live_rows: int, batch_bucket: int) -> None:
        self.queue_depth.set(queued)
        self.running.set(running)
        self.live_rows.set(live_rows)
        self.batch_bucket.set(batch_bucket)

    def compiled(self, function: str, seconds: float) -> None:
        self.compilations.labels(model=self.model, function=function).inc()
        self.compile_seconds.labels(model=self.model, function=function).inc(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# JAX's listeners are process-wide: one listener, registered once, feeds every server still alive (a listener per
# server would outlive a server that was never closed, as in tests).
_listening: weakref.WeakSet[Metrics] = weakref.WeakSet()


def _on_compile(event: str, seconds: float, **kwargs) -> None:
    if event == COMPILE_EVENT:
        name = str(kwargs.get("fun_name", "?"))
        name = name[4:-1] if name.startswith("jit(") and name.endswith(")") else name  # "jit(_decode)"
        for metrics in list(_listening):
            metrics.compiled(name, seconds)


monitoring.register_event_duration_secs_listener(_on_compile)
