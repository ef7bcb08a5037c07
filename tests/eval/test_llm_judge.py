"""The LLM judge against small OpenAI-compatible judges on loopback: verdicts in both orders, position bias
cancelled, garbage counted as unparseable, a 429 storm retried through, a 5xx and a hung judge counted as
failures (nothing crashes), the disk cache, Cohen's kappa, single-answer grading, and the endpoint check."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from jaxalign.eval.llm_judge import (
    JudgeSpec,
    JudgeUnreachable,
    check_endpoint,
    cohen_kappa,
    grade,
    judge_pairs,
    judged_win_rate,
    parse_pairwise,
    parse_rating,
)
from jaxalign.eval.templates import DEFAULT_TEMPLATES, KINDS, Template, load_templates, write_templates
from tests.eval.fake_judge import fake_judge

PROMPTS = [f"question {i}" for i in range(10)]
# The policy's answer holds more "good" on prompts 0-5, fewer on 6-7, as many on 8-9; lengths vary.
POLICY = ["good good " + "x" * (i * 7) for i in range(6)] + ["meh", "meh"] + ["good", "good"]
POLICY = [text + f" ({i})" for i, text in enumerate(POLICY)]
REFERENCE = ["good" if i < 6 else "good good" if i < 8 else "good" for i in range(10)]
REFERENCE = [text + " ref" * (i % 4) for i, text in enumerate(REFERENCE)]


def spec(url, tmp_path=None, **overrides):
    options = dict(url=url, model="fake-judge", cache_dir=None if tmp_path is None else tmp_path / "cache",
                   backoff_s=0.01, max_backoff_s=0.05, timeout_s=5.0, retries=3, concurrency=4)
    options.update(overrides)
    return JudgeSpec(**options)


def test_parsers_take_only_one_clear_verdict():
    assert parse_pairwise("reasons... [[A]]") == "A"
    assert parse_pairwise("[[ C ]]") == "C"
    assert parse_pairwise("[[A]] or maybe [[B]]") is None
    assert parse_pairwise("A is better") is None
    assert parse_pairwise("[[A]] ... final: [[A]]") == "A"
    assert parse_rating("Rating: [[7]]") == 7.0
    assert parse_rating("Rating: [[7.5]]") == 7.5
    assert parse_rating("Rating: [[11]]") is None
    assert parse_rating("[[3]] then [[8]]") is None
    assert parse_rating("7/10") is None


def test_fair_judge_both_orders_and_win_rate():
    with fake_judge("fair") as (url, judge):
        result = judged_win_rate(PROMPTS, POLICY, REFERENCE, spec(url), lc_bootstrap=20)
    assert judge.requests == 20
    # Both orders asked: the policy's answer appears once as A and once as B for every prompt.
    firsts = {body["messages"][-1]["content"].split("[Assistant A's answer]\n")[1].split("\n")[0]
              for body in judge.bodies}
    assert set(POLICY) <= firsts and set(REFERENCE) <= firsts
    counts = result.counts
    assert counts["ok"] == 20 and counts["unparseable"] == 0 and counts["judgments"] == 20
    assert result.win_rate.wins == 12 and result.win_rate.losses == 4 and result.win_rate.ties == 4
    assert result.win_rate.rate == pytest.approx((6 + 0.5 * 2) / 10)
    assert result.win_rate.clusters == 10 and result.consistency == 1.0
    assert result.win_rate.low < result.win_rate.rate < result.win_rate.high
    assert result.length_controlled is not None and 0 <= result.length_controlled.rate <= 1
    text = "\n".join(result.lines())
    assert "20 parsed, 0 unparseable of 20 judgments" in text


def test_position_bias_cancels():
    with fake_judge("first") as (url, _):
        result = judged_win_rate(PROMPTS, POLICY, REFERENCE, spec(url), lc_bootstrap=0)
    assert result.win_rate.rate == 0.5 and result.win_rate.wins == 10 and result.win_rate.losses == 10
    assert result.consistency == 0.0


def test_garbage_is_counted_never_guessed():
    with fake_judge("garbage") as (url, _):
        result = judged_win_rate(PROMPTS, POLICY, REFERENCE, spec(url), lc_bootstrap=0)
    assert result.counts["unparseable"] == 20 and result.counts["ok"] == 0
    assert result.win_rate is None and result.length_controlled is None
    assert all(j["raw"].startswith("I cannot decide") and j["verdict"] is None for j in result.judgments)
    assert "no verdicts; 0 parsed, 20 unparseable of 20 judgments" in result.lines()[0]


def test_429_storm_is_retried_through():
    with fake_judge("storm", failures=2) as (url, judge):
        result = judged_win_rate(PROMPTS, POLICY, REFERENCE, spec(url), lc_bootstrap=0)
    assert result.counts["ok"] == 20 and result.counts["rate_limited"] == 0
    assert result.counts["retries"] == 40 and result.counts["requests"] == 60 == judge.requests
    assert all(j["attempts"] == 3 for j in result.judgments)


def test_429_storm_beyond_the_retries_is_counted():
    with fake_judge("storm", failures=10) as (url, _):
        result = judged_win_rate(PROMPTS[:3], POLICY[:3], REFERENCE[:3], spec(url, retries=1), lc_bootstrap=0)
    assert result.counts["rate_limited"] == 6 and result.counts["ok"] == 0 and result.win_rate is None
    assert all("HTTP 429" in j["error"] and j["raw"] is None for j in result.judgments)


def test_server_errors_are_counted():
    with fake_judge("error") as (url, _):
        result = judged_win_rate(PROMPTS[:2], POLICY[:2], REFERENCE[:2], spec(url, retries=1), lc_bootstrap=0)
    assert result.counts["server_error"] == 4 and result.counts["requests"] == 8


def test_a_hung_judge_times_out_and_is_counted():
    with fake_judge("hang") as (url, judge):
        start = time.monotonic()
        result = judged_win_rate(PROMPTS[:3], POLICY[:3], REFERENCE[:3],
                                 spec(url, timeout_s=0.5, retries=1, concurrency=6), lc_bootstrap=0)
        elapsed = time.monotonic() - start
    assert result.counts["timeout"] == 6 and judge.requests == 12
    assert all("no answer within 0.5 s" in j["error"] for j in result.judgments)
    assert elapsed < 10


def test_cache_makes_a_rerun_free(tmp_path):
    with fake_judge("fair") as (url, judge):
        first = judged_win_rate(PROMPTS, POLICY, REFERENCE, spec(url, tmp_path), lc_bootstrap=0)
        second = judged_win_rate(PROMPTS, POLICY, REFERENCE, spec(url, tmp_path), lc_bootstrap=0)
        assert judge.requests == 20
        # Another template is another question: asked again.
        edited = dict(DEFAULT_TEMPLATES)
        edited["pairwise"] = Template("pairwise", "Q: {question}\nA: {answer_a}\nB: {answer_b}")
        judged_win_rate(PROMPTS[:2], POLICY[:2], REFERENCE[:2], spec(url, tmp_path, templates=edited),
                        lc_bootstrap=0)
        assert judge.requests == 24
    assert second.counts["cache_hits"] == 20 and second.counts["requests"] == 0
    assert second.win_rate == first.win_rate
    assert all(j["cached"] for j in second.judgments)
    lines = (tmp_path / "cache" / "judgments.jsonl").read_text().splitlines()
    assert len(lines) == 24 and all("key" in json.loads(line) for line in lines)


def test_the_cache_tells_judges_of_one_name_apart_by_what_the_endpoint_lists(tmp_path):
    """Two checkpoints both served as ``fake-judge`` (``jaxalign serve`` names a directory after its folder, so
    two ``.../export`` are both ``export``): their weights' ``root`` differs, so their judgments are not shared.
    A restart of the same judge (another ``created``) keeps them."""
    with fake_judge("fair") as (url, judge):
        judge.root = "/models/a/export"
        judge_pairs(PROMPTS[:2], POLICY[:2], REFERENCE[:2], spec(url, tmp_path))
        judge.root = "/models/b/export"
        judge_pairs(PROMPTS[:2], POLICY[:2], REFERENCE[:2], spec(url, tmp_path))
        assert judge.requests == 8
        judge.root, judge.created = "/models/a/export", 12345
        again = judge_pairs(PROMPTS[:2], POLICY[:2], REFERENCE[:2], spec(url, tmp_path))
        assert judge.requests == 8 and all(j["cached"] for j in again)
    with fake_judge("fair") as (other_url, other):  # another endpoint with the same name and root
        other.root = "/models/a/export"
        judge_pairs(PROMPTS[:2], POLICY[:2], REFERENCE[:2], spec(other_url, tmp_path))
        assert other.requests == 4


def test_a_torn_cache_line_is_skipped_and_asked_again(tmp_path, capsys):
    with fake_judge("fair") as (url, judge):
        judge_pairs(PROMPTS[:2], POLICY[:2], REFERENCE[:2], spec(url, tmp_path))
        path = tmp_path / "cache" / "judgments.jsonl"
        text = path.read_text()
        path.write_text(text[:-30])  # the last line cut by a kill
        judgments = judge_pairs(PROMPTS[:2], POLICY[:2], REFERENCE[:2], spec(url, tmp_path))
        assert judge.requests == 5
    assert "1 unreadable line(s) skipped" in capsys.readouterr().err
    assert sum(not j["cached"] for j in judgments) == 1


def test_kappa_against_another_judge():
    with fake_judge("fair") as (url, _), fake_judge("first") as (biased, _):
        result = judged_win_rate(PROMPTS, POLICY, REFERENCE, spec(url), agreement_judge=spec(biased),
                                 lc_bootstrap=0)
        same = judged_win_rate(PROMPTS, POLICY, REFERENCE, spec(url), agreement_judge=spec(url), lc_bootstrap=0)
    fair = [j["outcome"] for j in result.judgments]
    first = [j["outcome"] for j in result.other.judgments]
    assert result.agreement.n == 20
    assert result.agreement.kappa == pytest.approx(cohen_kappa(fair, first).kappa)
    assert same.agreement.kappa == pytest.approx(1.0)
    assert result.to_dict()["other_judge"]["position_consistency"] == 0.0


def test_cohen_kappa_by_hand():
    a = ["x", "x", "y", "y", "x", None]
    b = ["x", "y", "y", "y", "x", "x"]
    # p_o = 4/5; p_x = (3/5)(2/5), p_y = (2/5)(3/5): p_e = 12/25; kappa = (4/5 - 12/25) / (13/25) = 8/13.
    agreement = cohen_kappa(a, b)
    assert agreement.n == 5 and agreement.observed == pytest.approx(0.8)
    assert agreement.kappa == pytest.approx(8 / 13)
    assert cohen_kappa(["x", "x"], ["x", "x"]).kappa is None


def test_grading_one_and_two_turns():
    items = [{"turns": ["q1"], "answers": ["good good"], "category": "writing"},
             {"turns": ["q1", "q2"], "answers": ["good", "good good good"], "category": "math",
              "references": ["r1", "r2"]},
             {"turns": ["q1", "q2"], "answers": ["bad", "good"], "category": "writing"}]
    with fake_judge("fair") as (url, judge):
        grades = grade(items, spec(url))
    scores = [(j["index"], j["turn"], j["score"]) for j in grades.judgments]
    assert scores == [(0, 1, 7.0), (1, 1, 4.0), (1, 2, 10.0), (2, 1, 1.0), (2, 2, 4.0)]
    systems = [body["messages"][0]["content"] for body in judge.bodies]
    assert sum("reference answer" in s.lower() for s in systems) == 2
    table = grades.table()
    assert table["categories"]["math"]["mean"] == pytest.approx(7.0)
    assert table["turns"][2]["mean"] == pytest.approx(7.0)
    assert grades.counts["ok"] == 5


def test_unreachable_judge_is_one_clear_error():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(JudgeUnreachable, match=rf"--judge-url http://127.0.0.1:{port}/v1 is unreachable"):
        check_endpoint(spec(f"http://127.0.0.1:{port}/v1"))


def test_spec_validation():
    with pytest.raises(ValueError, match="expected an http"):
        JudgeSpec(url="localhost:8000", model="m")
    with pytest.raises(ValueError, match="--judge-model"):
        JudgeSpec(url="http://127.0.0.1:1/v1", model="")


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sekret")
    seen = []
    with fake_judge("fair") as (url, judge):
        original = judge.reply

        def reply(body):
            seen.append(body)
            return original(body)

        judge.reply = reply
        judge_pairs(PROMPTS[:1], POLICY[:1], REFERENCE[:1], spec(url, api_key_env="MY_JUDGE_KEY"))
    assert len(seen) == 2  # the key travels as a header, never in the body
    assert all("sekret" not in json.dumps(body) for body in seen)


def test_templates_need_their_placeholders(tmp_path):
    with pytest.raises(ValueError, match=r"lacks the placeholder\(s\) \{answer_b\}"):
        Template("pairwise", "{question} {answer_a}", source="mine.yaml")
    with pytest.raises(ValueError, match=r"unknown placeholder\(s\) \{answr\}"):
        Template("single", "{question} {answer} {answr}")
    paths = write_templates(tmp_path / "t")
    assert sorted(p.stem for p in paths) == sorted(KINDS)
    loaded = load_templates(tmp_path / "t")
    assert loaded == {k: Template(k, v.prompt, v.system, source=str(tmp_path / "t" / f"{k}.yaml"))
                      for k, v in DEFAULT_TEMPLATES.items()}
    (tmp_path / "t" / "single.yaml").write_text("prompt: 'Grade {answer}'\n")
    with pytest.raises(ValueError, match=r"single.yaml: the single template's 'prompt' lacks the placeholder\(s\) "
                                         r"\{question\}"):
        load_templates(tmp_path / "t")
    (tmp_path / "t" / "single.yaml").unlink()
    (tmp_path / "t" / "pairwize.yaml").write_text("prompt: x\n")
    with pytest.raises(ValueError, match="pairwize.yaml: not a template kind"):
        load_templates(tmp_path / "t")


def test_nan_free_outputs_are_json():
    with fake_judge("fair") as (url, _):
        result = judged_win_rate(PROMPTS, POLICY, REFERENCE, spec(url), lc_bootstrap=0)
    text = json.dumps(result.to_dict(judgments=True), allow_nan=False)
    assert "judgments" in json.loads(text)
    assert not math.isnan(np.mean([j["outcome"] for j in result.judgments]))


def test_two_samples_of_a_prompt_are_one_unit_of_the_length_controlled_fit():
    from jaxalign.eval.llm_judge import summarize_pairs

    judgments = [{"index": i, "order": order, "outcome": float(i % 3 != 0), "status": "ok"}
                 for i in range(12) for order in ("policy_first", "reference_first")]
    policy = ["x" * (20 + 7 * i) for i in range(12)]
    reference = ["y" * (60 - 3 * i) for i in range(12)]
    result = summarize_pairs(judgments, policy, reference, judge="j", counts={}, clusters=[i // 2 for i in range(12)],
                             lc_bootstrap=0)
    assert (result.length_controlled.pairs, result.length_controlled.prompts) == (12, 6)
    assert result.win_rate.clusters == 6


def test_worked_examples_go_before_the_question(tmp_path):
    shots = (("Q: rain? A: awful B: lovely", "[[B]]"), ("Q: cafe? A: great B: a cafe", "[[A]]"))
    template = Template("pairwise", "Q: {question} A: {answer_a} B: {answer_b}", "Reply [[A]] or [[B]].",
                        shots=shots)
    messages = template.messages(question="sun?", answer_a="nice", answer_b="bad")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert messages[2]["content"] == "[[B]]" and messages[-1]["content"] == "Q: sun? A: nice B: bad"
    (tmp_path / "pairwise.yaml").write_text(
        "prompt: 'Q: {question} A: {answer_a} B: {answer_b}'\nshots:\n"
        "  - {user: 'Q: rain? A: awful B: lovely', assistant: '[[B]]'}\n")
    assert load_templates(tmp_path)["pairwise"].shots == shots[:1]
    (tmp_path / "pairwise.yaml").write_text("prompt: 'Q: {question} A: {answer_a} B: {answer_b}'\n"
                                            "shots: [{user: 'Q', assistant: null}]\n")
    with pytest.raises(ValueError, match="pairwise.yaml: shot 1 must be a \\(user, assistant\\) pair"):
        load_templates(tmp_path)
    (tmp_path / "pairwise.yaml").write_text("prompt: 'Q: {question} A: {answer_a} B: {answer_b}'\nshots: [1]\n")
    with pytest.raises(ValueError, match="field 'shots' must be a list of"):
        load_templates(tmp_path)
