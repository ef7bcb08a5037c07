"""An LLM as judge over any OpenAI-compatible endpoint (``jaxalign serve``, vLLM, a hosted API).

- Pairwise: every pair is asked in both orders (the policy's answer as A, then as B), so a judge's preference
  for a position cancels; each order's verdict is an outcome for the policy (1 win, ½ tie, 0 loss) and the win
  rate is their mean with a Wilson interval that counts prompts, not judgments, as the independent units
  (:func:`jaxalign.eval.stats.win_rate` clustered by prompt). The length-controlled win rate
  (:mod:`jaxalign.eval.length_control`) is reported beside it.
- Single-answer grading on a 1–10 scale in MT-Bench's format, one or two turns (:func:`grade`).
- Requests run ``concurrency`` at a time; a 429, a 5xx, a timeout or a dropped connection is retried with
  exponential backoff and jitter (``Retry-After`` honoured); each judgment's raw text is kept beside its parsed
  verdict; a verdict that does not parse is counted as such and never guessed; every judgment the judge
  answered is cached on disk by the exact request (judge model, template, question, answers, order), so a rerun
  asks nothing twice.
- :func:`cohen_kappa` measures how far two judges agree beyond chance.

The API key is read from an environment variable (``OPENAI_API_KEY`` by default) when a request is sent; it
is never written anywhere.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fcntl
import hashlib
import http.client
import json
import math
import os
import random
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxalign.data import Message
from jaxalign.eval.length_control import LengthControlled, length_controlled_win_rate
from jaxalign.eval.stats import MeanCI, WinRate, mean_ci, win_rate
from jaxalign.eval.templates import DEFAULT_TEMPLATES, Template

__all__ = ["Agreement", "JudgeSpec", "JudgeUnreachable", "JudgedWinRate", "Grades", "check_endpoint",
           "cohen_kappa", "default_cache_dir", "grade", "judge_pairs", "judged_win_rate", "parse_pairwise",
           "parse_rating"]

# What happened to one judgment.
OK, UNPARSEABLE = "ok", "unparseable"
FAILURES = ("timeout", "rate_limited", "server_error", "client_error", "connection", "bad_response")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/jaxalign/judgments`` (``~/.cache/jaxalign/judgments``)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "jaxalign" / "judgments"


@dataclasses.dataclass(frozen=True)
class JudgeSpec:
    """Where the judge is and how to ask it.

    Attributes:
        url: the endpoint's base URL, as the ``openai`` client takes it (``http://127.0.0.1:8000/v1``);
            requests go to ``{url}/chat/completions``.
        model: the judge model's name at that endpoint.
        api_key_env: the environment variable holding the API key (sent as a bearer token when set).
        templates: the judge prompts by kind (:mod:`jaxalign.eval.templates`).
        concurrency: requests in flight at once.
        retries: further attempts after a 429, a 5xx, a timeout or a dropped connection.
        timeout_s: the socket timeout of a request (connecting, and each wait for bytes).
        backoff_s, max_backoff_s: the wait before retry ``k`` is ``min(max, backoff·2^k)`` times a jitter in
            ``[½, 1]``, or the server's ``Retry-After`` when longer (capped at ``max_backoff_s``).
        temperature, max_tokens: the judge's sampling.
        cache_dir: where judgments are cached (None: no cache).
    """

    url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    templates: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_TEMPLATES))
    concurrency: int = 8
    retries: int = 6
    timeout_s: float = 120.0
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    temperature: float = 0.0
    max_tokens: int = 1024
    cache_dir: Path | None = dataclasses.field(default_factory=default_cache_dir)

    def __post_init__(self):
        if not isinstance(self.url, str) or not re.match(r"^https?://[^/\s]+", self.url):
            raise ValueError(f"--judge-url {self.url!r}: expected an http(s) URL such as http://127.0.0.1:8000/v1")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("--judge-model: give the judge model's name at the endpoint")
        for name, low in (("concurrency", 1), ("retries", 0), ("max_tokens", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"judge {name} must be an int >= {low}, got {value!r}")
        for name in ("timeout_s", "backoff_s", "max_backoff_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"judge {name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"judge temperature must be in [0, 2], got {self.temperature!r}")
        for kind, template in self.templates.items():
            if not isinstance(template, Template) or template.kind != kind:
                raise ValueError(f"judge templates: {kind!r} maps to {template!r}, not a Template of that kind")

    @property
    def name(self) -> str:
        """The judge as reports name it: ``model @ url``."""
        return f"{self.model} @ {self.url}"

    @property
    def base(self) -> str:
        """The URL without a trailing slash, to which request paths are appended."""
        return self.url.rstrip("/")


class JudgeUnreachable(OSError):
    """The judge's URL answers nothing (refused, unknown host, no answer before the timeout)."""


def check_endpoint(spec: JudgeSpec, *, timeout_s: float = 10.0) -> None:
    """Ask ``{url}/models`` once, before any generation: an unreachable judge fails here in one line.

    Any HTTP answer proves the server is there (hosted APIs may not list models); a 401/403 means the key is
    wrong or missing. A model list without ``spec.model`` is reported on stderr, not refused (endpoints alias).

    Raises:
        JudgeUnreachable: no connection, or no answer within ``timeout_s``.
        ValueError: the endpoint refused the key.
    """
    request = urllib.request.Request(f"{spec.base}/models", headers=_headers(spec))
    try:
        with urllib.request.urlopen(request, timeout=min(timeout_s, spec.timeout_s)) as response:
            body = response.read()
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            raise ValueError(f"--judge-url {spec.url}: the endpoint refused the API key (HTTP {error.code}); set "
                             f"${spec.api_key_env}") from None
        return
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        raise JudgeUnreachable(f"--judge-url {spec.url} is unreachable: {reason}") from None
    try:
        names = {entry.get("id") for entry in json.loads(body).get("data", [])}
    except (ValueError, AttributeError, TypeError):
        return
    if names and spec.model not in names:
        print(f"warning: the judge endpoint lists {sorted(map(str, names))}, not {spec.model!r}", file=sys.stderr)


def _headers(spec: JudgeSpec) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    key = os.environ.get(spec.api_key_env)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


# ---------------------------------------------------------------------------------------------------- cache
class JudgmentCache:
    """Judge answers by request hash, in ``directory/judgments.jsonl`` (one JSON object a line, appended under
    an exclusive ``flock`` and fsynced, so processes sharing the directory never interleave lines; a torn last
    line from a killed writer is skipped and counted)."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / "judgments.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._entries: dict[str, str] = {}
        self._lock = threading.Lock()
        self.skipped_lines = 0
        if self.path.exists():
            with self.path.open("r", encoding="utf-8", errors="replace") as file:
                for line in file:
                    try:
                        entry = json.loads(line)
                        self._entries[entry["key"]] = entry["text"]
                    except (ValueError, KeyError, TypeError):
                        self.skipped_lines += 1
        if self.skipped_lines:
            print(f"warning: {self.path}: {self.skipped_lines} unreadable line(s) skipped (an interrupted write); "
                  "those judgments will be asked again", file=sys.stderr)

    def get(self, key: str) -> str | None:
        with self._lock:
            return self._entries.get(key)

    def put(self, key: str, model: str, text: str) -> None:
        line = json.dumps({"key": key, "judge_model": model, "text": text}, ensure_ascii=False) + "\n"
        with self._lock:
            self._entries[key] = text
            with self.path.open("a", encoding="utf-8") as file:
                fcntl.flock(file, fcntl.LOCK_EX)
                try:
                    file.write(line)
                    file.flush()
                    os.fsync(file.fileno())
                finally:
                    fcntl.flock(file, fcntl.LOCK_UN)


def judge_identity(spec: JudgeSpec) -> dict[str, Any]:
    """What tells one judge from another beyond its name: the endpoint's URL and what its ``/models`` lists for
    the model, less ``created`` (a server's start time; vLLM and ``jaxalign serve`` list the weights' path as
    ``root``), so two checkpoints both served as ``export`` do not share judgments. An endpoint that lists
    nothing is identified by its URL."""
    request = urllib.request.Request(f"{spec.base}/models", headers=_headers(spec))
    try:
        with urllib.request.urlopen(request, timeout=min(10.0, spec.timeout_s)) as response:
            listed = json.loads(response.read()).get("data", [])
        entry = next(e for e in listed if isinstance(e, dict) and e.get("id") == spec.model)
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError, AttributeError, StopIteration):
        entry = {}
    return {"url": spec.base, "listed": {k: v for k, v in entry.items() if k != "created"}}


def request_key(body: dict) -> str:
    """The cache key of a request: SHA-256 of its canonical JSON (model, messages, sampling, the judge's
    identity)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------- client
@dataclasses.dataclass
class _Reply:
    text: str | None
    status: str  # OK, or one of FAILURES
    error: str | None = None
    attempts: int = 0
    cached: bool = False


class _Retryable(Exception):
    def __init__(self, status: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class _Final(Exception):
    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


class JudgeClient:
    """Sends chat requests to the judge with retries and the cache; counts what happened (thread-safe)."""

    def __init__(self, spec: JudgeSpec):
        self.spec = spec
        self.cache = None if spec.cache_dir is None else JudgmentCache(spec.cache_dir)
        self.identity = None if self.cache is None else judge_identity(spec)
        self._lock = threading.Lock()
        self.requests = 0
        self.retries = 0
        self.cache_hits = 0

    def _count(self, **increments: int) -> None:
        with self._lock:
            for name, value in increments.items():
                setattr(self, name, getattr(self, name) + value)

    def _post(self, body: bytes) -> str:
        spec = self.spec
        request = urllib.request.Request(f"{spec.base}/chat/completions", data=body, headers=_headers(spec),
                                         method="POST")
        self._count(requests=1)
        try:
            with urllib.request.urlopen(request, timeout=spec.timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            detail = _error_detail(error)
            if error.code == 429:
                raise _Retryable("rate_limited", f"HTTP 429{detail}", _retry_after(error)) from None
            if error.code >= 500:
                raise _Retryable("server_error", f"HTTP {error.code}{detail}", _retry_after(error)) from None
            raise _Final("client_error", f"HTTP {error.code}{detail}") from None
        except (TimeoutError, socket.timeout) as error:
            raise _Retryable("timeout", f"no answer within {spec.timeout_s:g} s") from error
        except urllib.error.URLError as error:
            if isinstance(error.reason, (TimeoutError, socket.timeout)):
                raise _Retryable("timeout", f"no answer within {spec.timeout_s:g} s") from None
            raise _Retryable("connection", f"connection failed: {error.reason}") from None
        except (ConnectionError, http.client.HTTPException, OSError) as error:
            raise _Retryable("connection", f"connection failed: {type(error).__name__}: {error}") from None
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Final("bad_response", f"not a chat completion: {payload[:200]!r}") from None
        if not isinstance(content, str):
            raise _Final("bad_response", f"the message content is {type(content).__name__}, not text")
        return content

    def complete(self, messages: list[dict[str, str]]) -> _Reply:
        spec = self.spec
        body = {"model": spec.model, "messages": messages, "temperature": spec.temperature,
                "max_tokens": spec.max_tokens}
        key = request_key({**body, "judge": self.identity})
        if self.cache is not None and (text := self.cache.get(key)) is not None:
            self._count(cache_hits=1)
            return _Reply(text, OK, cached=True)
        data = json.dumps(body, ensure_ascii=False).encode()
        for attempt in range(spec.retries + 1):
            try:
                text = self._post(data)
            except _Final as error:
                return _Reply(None, error.status, str(error), attempt + 1)
            except _Retryable as error:
                if attempt == spec.retries:
                    return _Reply(None, error.status, f"{error} (after {attempt + 1} attempts)", attempt + 1)
                delay = min(spec.max_backoff_s, spec.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)
                if error.retry_after is not None:
                    delay = min(spec.max_backoff_s, max(delay, error.retry_after))
                self._count(retries=1)
                time.sleep(delay)
                continue
            if self.cache is not None:
                self.cache.put(key, spec.model, text)
            return _Reply(text, OK, attempts=attempt + 1)
        raise AssertionError("unreachable")

    def map(self, requests: list[list[dict[str, str]]], *, progress: bool = False, desc: str = "judging"
            ) -> list[_Reply]:
        """Every request's reply, in order, ``concurrency`` at a time."""
        from tqdm.auto import tqdm

        replies: list[_Reply | None] = [None] * len(requests)
        with concurrent.futures.ThreadPoolExecutor(self.spec.concurrency, thread_name_prefix="judge") as pool, \
                tqdm(total=len(requests), desc=desc, unit="judgment", disable=not progress, file=sys.stderr) as bar:
            futures = {pool.submit(self.complete, messages): index for index, messages in enumerate(requests)}
            try:
                for future in concurrent.futures.as_completed(futures):
                    replies[futures[future]] = future.result()
                    bar.update(1)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        return replies

    def counts(self) -> dict[str, int]:
        return {"requests": self.requests, "retries": self.retries, "cache_hits": self.cache_hits}


def _error_detail(error: urllib.error.HTTPError) -> str:
    try:
        text = error.read(300).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return f": {text[:200]}" if text else ""


def _retry_after(error: urllib.error.HTTPError) -> float | None:
    value = error.headers.get("Retry-After") if error.headers else None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


# -------------------------------------------------------------------------------------------------- parsing
_PAIRWISE_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")
_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")


def parse_pairwise(text: str) -> str | None:
    """``"A"``, ``"B"`` or ``"C"`` (tie) when the text holds ``[[A]]``, ``[[B]]`` or ``[[C]]`` and no other
    verdict; None otherwise (none, or contradicting verdicts)."""
    found = set(_PAIRWISE_VERDICT.findall(text))
    return found.pop() if len(found) == 1 else None


def parse_rating(text: str) -> float | None:
    """The ``[[N]]`` rating, 1 ≤ N ≤ 10, when the text holds exactly one distinct one; None otherwise."""
    found = {float(value) for value in _RATING.findall(text)}
    if len(found) != 1:
        return None
    value = found.pop()
    return value if 1 <= value <= 10 else None


def question_text(prompt) -> str:
    """A prompt as the judge reads it: text as is, a conversation as ``Role: content`` paragraphs."""
    if isinstance(prompt, str):
        return prompt
    lines = []
    for message in prompt:
        role, content = (message.role, message.content) if isinstance(message, Message) else (
            message["role"], message["content"])
        lines.append(f"{role.capitalize()}: {content}")
    return "\n\n".join(lines)


# ------------------------------------------------------------------------------------------------- pairwise
ORDERS = ("policy_first", "reference_first")
_OUTCOME = {("policy_first", "A"): 1.0, ("policy_first", "B"): 0.0, ("reference_first", "A"): 0.0,
            ("reference_first", "B"): 1.0}


def judge_pairs(prompts: Sequence, policy_responses: Sequence[str], reference_responses: Sequence[str],
                spec: JudgeSpec, *, client: JudgeClient | None = None, progress: bool = False) -> list[dict]:
    """Ask the judge about every pair in both orders: two judgments per prompt.

    Returns:
        One dict per judgment, prompt by prompt, ``policy_first`` then ``reference_first``: ``index``,
        ``order``, ``verdict`` (``"A"``/``"B"``/``"C"`` or None), ``outcome`` for the policy (1, 0.5, 0 or None),
        ``status`` (``"ok"``, ``"unparseable"`` or a failure: ``timeout``, ``rate_limited``, ``server_error``,
        ``client_error``, ``connection``, ``bad_response``), ``raw`` (the judge's text, None on failure),
        ``error``, ``attempts``, ``cached``.
    """
    _check_pairs(prompts, policy_responses, reference_responses)
    template = spec.templates["pairwise"]
    client = client or JudgeClient(spec)
    requests, keys = [], []
    for index, prompt in enumerate(prompts):
        question = question_text(prompt)
        ours, theirs = policy_responses[index], reference_responses[index]
        requests.append(template.messages(question=question, answer_a=ours, answer_b=theirs))
        requests.append(template.messages(question=question, answer_a=theirs, answer_b=ours))
        keys += [(index, "policy_first"), (index, "reference_first")]
    replies = client.map(requests, progress=progress, desc="judging pairs")
    judgments = []
    for (index, order), reply in zip(keys, replies):
        verdict = None if reply.text is None else parse_pairwise(reply.text)
        status = reply.status if reply.status != OK else (OK if verdict is not None else UNPARSEABLE)
        outcome = None if verdict is None else (0.5 if verdict == "C" else _OUTCOME[(order, verdict)])
        judgments.append({"index": index, "order": order, "verdict": verdict, "outcome": outcome, "status": status,
                          "raw": reply.text, "error": reply.error, "attempts": reply.attempts,
                          "cached": reply.cached})
    return judgments


def _check_pairs(prompts, ours, theirs) -> None:
    for name, values in (("policy_responses", ours), ("reference_responses", theirs)):
        if isinstance(values, str):
            raise TypeError(f"{name} must be a sequence of strings, got one string")
        if len(values) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(values)} {name}: one response per prompt")
    if not prompts:
        raise ValueError("no prompts to judge")


@dataclasses.dataclass(frozen=True)
class Agreement:
    """Two judges' agreement on the same judgments.

    Attributes:
        kappa: Cohen's κ, ``(p_o − p_e) / (1 − p_e)`` (None when undefined: both judges constant alike).
        observed: ``p_o``, the share of judgments on which they agree.
        n: judgments both judges gave a verdict on.
    """

    kappa: float | None
    observed: float | None
    n: int

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)


def cohen_kappa(first: Sequence, second: Sequence) -> Agreement:
    """Cohen's κ of two raters' categorical labels, over the positions where neither is None.

    ``κ = (p_o − p_e) / (1 − p_e)`` with ``p_o`` the observed agreement and ``p_e = Σ_c p₁(c)·p₂(c)`` the
    agreement expected by chance from each rater's own label frequencies (Cohen 1960).
    """
    if len(first) != len(second):
        raise ValueError(f"cohen_kappa: {len(first)} and {len(second)} labels; the raters label the same items")
    pairs = [(a, b) for a, b in zip(first, second) if a is not None and b is not None]
    if not pairs:
        return Agreement(None, None, 0)
    n = len(pairs)
    observed = sum(a == b for a, b in pairs) / n
    counts_a, counts_b = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    expected = sum(counts_a[c] * counts_b[c] for c in counts_a) / (n * n)
    kappa = None if expected == 1 else (observed - expected) / (1 - expected)
    return Agreement(kappa, observed, n)


@dataclasses.dataclass(frozen=True)
class JudgedWinRate:
    """An LLM judge's pairwise verdicts on the policy against the reference.

    Attributes:
        judge: the judge's name (model @ URL).
        win_rate: over the parsed judgments of both orders (None when there is none), its interval clustered by
            prompt.
        length_controlled: AlpacaEval 2's length-controlled win rate (None with fewer than 5 judged prompts or
            equal length differences; ``length_controlled_note`` says why).
        consistency: the share of prompts judged in both orders whose two outcomes agree (position bias shows
            as a low value); None when no prompt has both.
        counts: judgments by status (``ok``, ``unparseable``, each failure), ``prompts``, and the client's
            ``requests``, ``retries``, ``cache_hits``.
        judgments: every judgment (see :func:`judge_pairs`).
        agreement: Cohen's κ against ``other`` on the same judgments (when a second judge was asked).
        other: the second judge's own result.
    """

    judge: str
    win_rate: WinRate | None
    length_controlled: LengthControlled | None
    length_controlled_note: str | None
    consistency: float | None
    counts: dict
    judgments: tuple
    agreement: Agreement | None = None
    other: JudgedWinRate | None = None

    def to_dict(self, *, judgments: bool = False) -> dict:
        """A JSON-ready summary: the win rate, its length-controlled form, position consistency, the verdict
        counts and the agreement with a second judge; every judgment too when ``judgments``."""
        out = {"judge": self.judge, "win_rate": None if self.win_rate is None else self.win_rate.to_dict(),
               "length_controlled_win_rate": None if self.length_controlled is None else
               self.length_controlled.to_dict(), "length_controlled_note": self.length_controlled_note,
               "position_consistency": self.consistency, "counts": dict(self.counts)}
        if self.agreement is not None:
            out["agreement"] = self.agreement.to_dict()
            out["other_judge"] = self.other.to_dict(judgments=judgments)
        if judgments:
            out["judgments"] = list(self.judgments)
        return out

    def lines(self) -> list[str]:
        """Text lines for the command's output."""
        counts = self.counts
        failed = {k: counts[k] for k in FAILURES if counts.get(k)}
        tail = f"{counts['ok']} parsed, {counts['unparseable']} unparseable" + "".join(
            f", {v} {k}" for k, v in failed.items()) + f" of {counts['judgments']} judgments"
        lines = [f"judged win rate ({self.judge}): "
                 + ("no verdicts" if self.win_rate is None else str(self.win_rate)) + f"; {tail}"]
        if self.length_controlled is not None:
            lines.append(f"  length-controlled win rate: {self.length_controlled}")
        elif self.length_controlled_note:
            lines.append(f"  length-controlled win rate: - ({self.length_controlled_note})")
        if self.consistency is not None:
            lines.append(f"  position consistency: {self.consistency:.3f}")
        lines.append(f"  requests {counts['requests']}, retries {counts['retries']}, "
                     f"cached {counts['cache_hits']}")
        if self.agreement is not None:
            kappa = "undefined" if self.agreement.kappa is None else f"{self.agreement.kappa:.3f}"
            lines.append(f"  agreement with {self.other.judge}: kappa {kappa} over {self.agreement.n} judgments")
            lines += ["  " + line for line in self.other.lines()]
        return lines


def _status_counts(judgments: list[dict], prompts: int) -> dict:
    counts = Counter(j["status"] for j in judgments)
    return {"prompts": prompts, "judgments": len(judgments), OK: counts.get(OK, 0),
            UNPARSEABLE: counts.get(UNPARSEABLE, 0), **{k: counts.get(k, 0) for k in FAILURES}}


def summarize_pairs(judgments: list[dict], policy_responses: Sequence[str], reference_responses: Sequence[str], *,
                    judge: str, counts: dict, clusters: Sequence | None = None, confidence: float = 0.95,
                    lc_bootstrap: int = 200) -> JudgedWinRate:
    """Win rate, length-controlled win rate, position consistency and counts of :func:`judge_pairs`'s
    judgments."""
    prompts = len(policy_responses)
    labels = list(range(prompts)) if clusters is None else list(clusters)
    if len(labels) != prompts:
        raise ValueError(f"clusters has {len(labels)} labels for {prompts} prompts")
    valid = [j for j in judgments if j["outcome"] is not None]
    rate = None
    if valid:
        outcomes = np.asarray([j["outcome"] for j in valid])
        rate = win_rate(outcomes, np.full(outcomes.shape, 0.5), confidence=confidence,
                        clusters=[labels[j["index"]] for j in valid])
    by_prompt: dict[int, list[float]] = {}
    for j in valid:
        by_prompt.setdefault(j["index"], []).append(j["outcome"])
    both = [v for v in by_prompt.values() if len(v) == 2]
    consistency = float(np.mean([a == b for a, b in both])) if both else None
    preference = np.asarray([np.mean(by_prompt[i]) if i in by_prompt else np.nan for i in range(prompts)])
    lc, note = None, None
    try:
        lc = length_controlled_win_rate(preference, [len(t) for t in policy_responses],
                                        [len(t) for t in reference_responses], bootstrap=lc_bootstrap,
                                        confidence=confidence, groups=labels)
    except ValueError as error:
        note = str(error).split(": ", 1)[-1]
    return JudgedWinRate(judge=judge, win_rate=rate, length_controlled=lc, length_controlled_note=note,
                         consistency=consistency, counts={**_status_counts(judgments, prompts), **counts},
                         judgments=tuple(judgments))


def judged_win_rate(prompts: Sequence, policy_responses: Sequence[str], reference_responses: Sequence[str],
                    judge: JudgeSpec, *, agreement_judge: JudgeSpec | None = None, clusters: Sequence | None = None,
                    confidence: float = 0.95, lc_bootstrap: int = 200, progress: bool = False,
                    check: bool = True) -> JudgedWinRate:
    """The policy's win rate over the reference as an LLM judge sees it, both orders asked.

    Args:
        prompts: ``[N]`` prompts (text, or conversations of ``jaxalign.data.Message``).
        policy_responses, reference_responses: ``[N]`` texts, row ``i`` answering ``prompts[i]``.
        judge: the judge (:class:`JudgeSpec`).
        agreement_judge: a second judge asked the same judgments; Cohen's κ between the two is reported.
        clusters: ``[N]`` labels of correlated rows (several samples of one prompt); default: each row its own.
        confidence: the intervals' level.
        lc_bootstrap: bootstrap resamples for the length-controlled rate's interval (0: none).
        progress: a progress bar on stderr.
        check: ask the endpoint(s) once first (:func:`check_endpoint`).

    Returns:
        A :class:`JudgedWinRate`.

    Raises:
        JudgeUnreachable, ValueError: an endpoint that does not answer or refuses the key; inputs that do not
            pair up.
    """
    _check_pairs(prompts, policy_responses, reference_responses)
    specs = [judge] + ([] if agreement_judge is None else [agreement_judge])
    if check:
        for spec in specs:
            check_endpoint(spec)
    results = []
    for spec in specs:
        client = JudgeClient(spec)
        judgments = judge_pairs(prompts, policy_responses, reference_responses, spec, client=client,
                                progress=progress)
        results.append(summarize_pairs(judgments, policy_responses, reference_responses, judge=spec.name,
                                       counts=client.counts(), clusters=clusters, confidence=confidence,
                                       lc_bootstrap=lc_bootstrap))
    if agreement_judge is None:
        return results[0]
    first, second = results
    agreement = cohen_kappa([j["outcome"] for j in first.judgments], [j["outcome"] for j in second.judgments])
    return dataclasses.replace(first, agreement=agreement, other=second)


# -------------------------------------------------------------------------------------------------- grading
@dataclasses.dataclass(frozen=True)
class Grades:
    """Single-answer grades (1–10).

    Attributes:
        judge: the judge's name.
        judgments: one dict per graded answer: ``index``, ``turn`` (1 or 2), ``category``, ``score`` (None
            when not parsed), ``status``, ``raw``, ``error``, ``attempts``, ``cached``.
        counts: judgments by status, and the client's ``requests``, ``retries``, ``cache_hits``.
        confidence: the intervals' level.
    """

    judge: str
    judgments: tuple
    counts: dict
    confidence: float = 0.95

    def mean(self, *, turn: int | None = None, category: str | None = None) -> MeanCI | None:
        """The mean grade with its t interval over the parsed judgments of a turn and/or category."""
        scores = [j["score"] for j in self.judgments if j["score"] is not None
                  and (turn is None or j["turn"] == turn) and (category is None or j["category"] == category)]
        return mean_ci(scores, self.confidence) if scores else None

    def table(self) -> dict:
        """``{"overall": ..., "turns": {1: ..., 2: ...}, "categories": {name: ...}}`` of :meth:`mean`
        dicts (None where nothing parsed)."""
        def entry(value):
            return None if value is None else value.to_dict()

        turns = sorted({j["turn"] for j in self.judgments})
        categories = sorted({j["category"] for j in self.judgments if j["category"] is not None})
        return {"overall": entry(self.mean()), "turns": {t: entry(self.mean(turn=t)) for t in turns},
                "categories": {c: entry(self.mean(category=c)) for c in categories}}

    def to_dict(self, *, judgments: bool = False) -> dict:
        """A JSON-ready summary: the mean grade overall, per turn and per category (:meth:`table`) and the
        counts; every judgment too when ``judgments``."""
        out = {"judge": self.judge, "scores": self.table(), "counts": dict(self.counts)}
        if judgments:
            out["judgments"] = list(self.judgments)
        return out


def grade(items: Sequence[dict], spec: JudgeSpec, *, progress: bool = False, confidence: float = 0.95,
          check: bool = True) -> Grades:
    """Grade answers 1–10, MT-Bench style: turn 1 alone, turn 2 in the context of the whole conversation, with
    a reference answer in the prompt where the item has one.

    Args:
        items: dicts with ``turns`` (the user's questions, 1 or 2), ``answers`` (the assistant's, as many),
            optional ``references`` (reference answers, as many) and ``category``.
        spec: the judge.
        progress: a progress bar on stderr.
        confidence: the intervals' level.
        check: ask the endpoint once first.

    Returns:
        :class:`Grades`.
    """
    if check:
        check_endpoint(spec)
    requests, keys = [], []
    templates = spec.templates
    for index, item in enumerate(items):
        turns, answers, references = item["turns"], item["answers"], item.get("references")
        if len(answers) != len(turns) or len(turns) not in (1, 2):
            raise ValueError(f"item {index}: {len(turns)} turns and {len(answers)} answers (1 or 2 of each)")
        ref = references is not None and len(references) >= len(turns)
        if ref:
            requests.append(templates["single_reference"].messages(question=turns[0], answer=answers[0],
                                                                   reference=references[0]))
        else:
            requests.append(templates["single"].messages(question=turns[0], answer=answers[0]))
        keys.append((index, 1, item.get("category")))
        if len(turns) == 2:
            fields = dict(question_1=turns[0], answer_1=answers[0], question_2=turns[1], answer_2=answers[1])
            if ref:
                fields |= dict(reference_1=references[0], reference_2=references[1])
            requests.append(templates["single_multi_reference" if ref else "single_multi"].messages(**fields))
            keys.append((index, 2, item.get("category")))
    client = JudgeClient(spec)
    replies = client.map(requests, progress=progress, desc="grading")
    judgments = []
    for (index, turn, category), reply in zip(keys, replies):
        score = None if reply.text is None else parse_rating(reply.text)
        status = reply.status if reply.status != OK else (OK if score is not None else UNPARSEABLE)
        judgments.append({"index": index, "turn": turn, "category": category, "score": score, "status": status,
                          "raw": reply.text, "error": reply.error, "attempts": reply.attempts,
                          "cached": reply.cached})
    return Grades(judge=spec.name, judgments=tuple(judgments),
                  counts={**_status_counts(judgments, len(items)), **client.counts()}, confidence=confidence)
