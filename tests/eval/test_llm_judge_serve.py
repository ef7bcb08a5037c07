"""The LLM judge against a live ``jaxalign serve`` on loopback (a tiny random Llama): its verdicts are noise, so
the test checks what the counts say, that nothing crashes, and that a request the server refuses (a prompt
longer than its context) is counted as a client error, not retried. A server with room for three requests and
slowed decode steps answers a storm of eight with real 429s, retried through, and a generation longer than the
judge's timeout with a timeout."""

from __future__ import annotations

import pytest

from jaxalign.eval.llm_judge import JudgeSpec, grade, judged_win_rate
from jaxalign.eval.templates import DEFAULT_TEMPLATES, Template
from tests.serve.conftest import MODEL, running_server, serve_args, tiny_checkpoint  # noqa: F401 (fixture)
from tests.serve.test_server import slow_steps

PROMPTS = ["Hi", "sky ?", "Go away .", "blue sky", "Hi ?", "Go"]
POLICY = ["sky blue .", "Hi", "Go away", "blue", "sky", "Hi Hi"]
REFERENCE = ["Go", "blue blue", "sky", "Hi .", "Go away .", "?"]
# Templates short enough for the tiny server's context (its word-level tokenizer spends a token per word).
SHORT = {**DEFAULT_TEMPLATES,
         "pairwise": Template("pairwise", "{question} A: {answer_a} B: {answer_b}", "Say [[A]], [[B]] or [[C]]."),
         "single": Template("single", "{question} {answer}", "Rating: [[N]]"),
         "single_multi": Template("single_multi", "{question_1} {answer_1} {question_2} {answer_2}")}


@pytest.fixture(scope="module")
def served(tiny_checkpoint):  # noqa: F811
    with running_server(serve_args(tiny_checkpoint, max_model_len=96)) as (url, _):
        yield url + "/v1"


def spec(url, **overrides):
    options = dict(url=url, model=MODEL, templates=SHORT, cache_dir=None, max_tokens=6, timeout_s=120,
                   backoff_s=0.01, retries=2, concurrency=4)
    return JudgeSpec(**{**options, **overrides})


def test_pairwise_against_jaxalign_serve(served):
    result = judged_win_rate(PROMPTS, POLICY, REFERENCE, spec(served), lc_bootstrap=0)
    counts = result.counts
    assert counts["judgments"] == 12 and counts["ok"] + counts["unparseable"] == 12
    assert all(counts[k] == 0 for k in ("timeout", "rate_limited", "server_error", "client_error", "connection",
                                        "bad_response"))
    # Every request answered or retried (a busy machine can time out the first requests while the server
    # compiles): nothing is lost or double counted.
    assert counts["requests"] == 12 + counts["retries"]
    assert all(isinstance(j["raw"], str) and j["error"] is None for j in result.judgments)
    # A verdict is only ever what the text says.
    for j in result.judgments:
        assert (j["verdict"] is None) == (j["status"] == "unparseable")
    if result.win_rate is None:
        assert counts["ok"] == 0
    else:
        assert result.win_rate.n == counts["ok"]


def test_grading_against_jaxalign_serve(served):
    items = [{"turns": ["Hi", "sky ?"], "answers": ["blue", "Go away"], "category": "writing"},
             {"turns": ["Go ?"], "answers": ["sky"], "category": "math"}]
    grades = grade(items, spec(served))
    assert grades.counts["judgments"] == 3 and grades.counts["ok"] + grades.counts["unparseable"] == 3


def test_a_prompt_beyond_the_context_is_a_client_error(served):
    long = " ".join(["sky"] * 200)
    result = judged_win_rate(["Hi"], [long], ["Go"], spec(served), lc_bootstrap=0)
    assert result.counts["client_error"] == 2 and result.counts["requests"] == 2  # a 400 is not retried
    assert all(j["error"].startswith("HTTP 400") for j in result.judgments)
    assert result.win_rate is None


@pytest.fixture(scope="module")
def busy(tiny_checkpoint):  # noqa: F811
    """A server that answers two requests at a time and queues one more: the rest get 429 with Retry-After."""
    with running_server(serve_args(tiny_checkpoint, max_model_len=96, max_batch=2, max_queue=1)) as (url, served):
        yield url + "/v1", served


def test_a_429_storm_from_jaxalign_serve_is_retried_through(busy):
    """Eight requests in flight against room for three, each decode step slowed: the server refuses the rest
    with 429, the judge backs off exponentially and retries, and every judgment ends answered."""
    url, served = busy
    with slow_steps(served, 0.1):
        result = judged_win_rate(PROMPTS, POLICY, REFERENCE, spec(url, concurrency=8, retries=12, backoff_s=0.1,
                                                                  max_backoff_s=10.0), lc_bootstrap=0)
    counts = result.counts
    assert counts["retries"] > 0, counts
    ended = [(j["status"], j["error"]) for j in result.judgments]
    assert counts["ok"] + counts["unparseable"] == counts["judgments"] == 12, ended
    assert counts["rate_limited"] == 0 and counts["requests"] == 12 + counts["retries"]


def test_a_judge_slower_than_the_timeout_is_counted_not_waited_for(busy):
    """A generation that outlasts ``timeout_s`` (each step slowed past it) is a timeout, counted per judgment."""
    url, served = busy
    with slow_steps(served, 0.5):
        result = judged_win_rate(["Hi"], ["sky"], ["Go"], spec(url, timeout_s=0.4, retries=0, concurrency=1),
                                 lc_bootstrap=0)
    assert result.counts["timeout"] == 2 and result.win_rate is None
    assert all("no answer within 0.4 s" in j["error"] for j in result.judgments)
