"""Benchmark files in their published formats (fixtures written here): the readers name the file, line/record
and field of bad input; TruthfulQA's MC1/MC2 from log-likelihoods against a plain forward pass; the tokenizer
check of the likelihood benchmark."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import special

from jaxalign.eval.benchmarks import (
    check_same_tokenizer,
    continuation_logliks,
    mt_bench_answers,
    mt_bench_items,
    read_alpaca_eval,
    read_mt_bench,
    read_truthfulqa_mc,
    truthfulqa_scores,
)
from tests.eval.conftest import lm_logits, log_softmax
from tests.test_cli import tiny_tokenizer

ALPACA = [{"instruction": "Hi ?", "output": "sky blue .", "generator": "baseline_model", "dataset": "helpful_base"},
          {"instruction": "Go away .", "output": "Hi", "generator": "baseline_model", "dataset": "koala"},
          {"instruction": "sky ?", "output": "blue blue", "generator": "baseline_model", "dataset": "oasst"}]
MT_BENCH = [{"question_id": 81, "category": "writing", "turns": ["Hi ?", "Go away ."]},
            {"question_id": 111, "category": "math", "turns": ["sky ?", "blue ?"], "reference": ["blue", "sky"]},
            {"question_id": 91, "category": "roleplay", "turns": ["Go ?", "Hi Hi"]}]
TRUTHFULQA = [{"question": "sky ?", "mc1_targets": {"blue": 1, "Go away": 0, "Hi": 0},
               "mc2_targets": {"blue": 1, "blue sky": 1, "Go away": 0, "Hi": 0}},
              {"question": "Hi ?", "mc1_targets": {"Hi": 0, "Go": 1}, "mc2_targets": {"Hi": 0, "Go": 1, "away": 0}}]


def write_json(path, content):
    path.write_text(json.dumps(content, indent=2))
    return path


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_readers_take_the_published_formats(tmp_path):
    alpaca = read_alpaca_eval(write_json(tmp_path / "alpaca_eval.json", ALPACA))
    assert [a.instruction for a in alpaca] == ["Hi ?", "Go away .", "sky ?"] and alpaca[1].dataset == "koala"
    questions = read_mt_bench(write_jsonl(tmp_path / "question.jsonl", MT_BENCH))
    assert questions[1].reference == ("blue", "sky") and questions[0].reference is None
    assert [q.category for q in questions] == ["writing", "math", "roleplay"]
    mc = read_truthfulqa_mc(write_json(tmp_path / "mc_task.json", TRUTHFULQA))
    assert mc[0].mc1 == (("blue", 1), ("Go away", 0), ("Hi", 0)) and len(mc[1].mc2) == 3


@pytest.mark.parametrize("reader,content,message", [
    (read_alpaca_eval, "[{\"instruction\": \"a\"},\n {\"output\": \"b\"}]",
     r"alpaca.json, record 2: field 'instruction' is missing"),
    (read_alpaca_eval, "[{\"instruction\": \"a\", \"output\": 3}]",
     r"record 1: field 'output' must be a non-empty string"),
    (read_alpaca_eval, "{\"instruction\": \"a\"}", r"expected AlpacaEval's format, a non-empty JSON array"),
    (read_alpaca_eval, "[{\"instruction\": \"a\"},\n oops]", r"alpaca.json, line 2: not JSON"),
    (read_truthfulqa_mc, json.dumps([{"question": "q", "mc1_targets": {"a": 1, "b": 1},
                                      "mc2_targets": {"a": 1, "b": 0}}]),
     r"record 1: field 'mc1_targets' has 2 true answers; MC1 has exactly one"),
    (read_truthfulqa_mc, json.dumps([{"question": "q", "mc1_targets": {"a": 1, "b": 0}}]),
     r"record 1: field 'mc2_targets' is missing"),
    (read_truthfulqa_mc, json.dumps([{"question": "q", "mc1_targets": {"a": 1, "b": 0},
                                      "mc2_targets": {"a": 2, "b": 0}}]),
     r"answer 'a' has label 2"),
])
def test_bad_files_name_file_record_and_field(tmp_path, reader, content, message):
    path = tmp_path / "alpaca.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        reader(path)


@pytest.mark.parametrize("rows,message", [
    ([MT_BENCH[0], {"question_id": 82, "category": "writing"}], r"question.jsonl, line 2: field 'turns' must be"),
    ([MT_BENCH[0], "{not json"], r"question.jsonl, line 2: not JSON"),
    ([MT_BENCH[0], MT_BENCH[0]], r"line 2: field 'question_id' 81 repeats line 1"),
    ([{"category": "x", "turns": ["a"]}], r"line 1: field 'question_id' is missing"),
    ([{**MT_BENCH[1], "reference": ["only one"]}],
     r"line 1: field 'reference' must be a list of strings, one per turn"),
])
def test_bad_mt_bench_lines_are_named(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        read_mt_bench(write_jsonl(tmp_path / "question.jsonl", rows))


def test_continuation_logliks_equal_a_plain_forward(policy, tokenizer):
    pairs = [("Q: sky ?\nA:", " blue"), ("Q: Hi ?\nA:", " Go away ."), ("Hi", " sky sky blue blue .")]
    ours = continuation_logliks(policy, tokenizer, pairs, batch_size=2)
    expected = []
    for context, continuation in pairs:
        ctx = tokenizer(context)["input_ids"]
        ids = ctx + tokenizer(continuation, add_special_tokens=False)["input_ids"]
        logps = log_softmax(lm_logits(policy, [ids])[0])
        expected.append(sum(logps[t - 1, ids[t]] for t in range(len(ctx), len(ids))))
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)


def test_truthfulqa_mc1_mc2_from_the_logliks(tmp_path, policy, tokenizer):
    items = read_truthfulqa_mc(write_json(tmp_path / "mc_task.json", TRUTHFULQA))
    scores = truthfulqa_scores(policy, tokenizer, items, batch_size=4)
    answers = sorted({(item.question, a) for item in items for a, _ in item.mc1 + item.mc2})
    values = continuation_logliks(policy, tokenizer, [(f"Q: {q}\nA:", " " + a) for q, a in answers], batch_size=4)
    loglik = dict(zip(answers, values))
    for item, mc1, mc2 in zip(items, scores["mc1"], scores["mc2"]):
        best_true = max(loglik[(item.question, a)] for a, label in item.mc1 if label)
        best_false = max(loglik[(item.question, a)] for a, label in item.mc1 if not label)
        assert mc1 == float(best_true > best_false)
        true = [loglik[(item.question, a)] for a, label in item.mc2 if label]
        every = [loglik[(item.question, a)] for a, _ in item.mc2]
        assert mc2 == pytest.approx(np.exp(special.logsumexp(true) - special.logsumexp(every)), rel=1e-6)
        assert 0 < mc2 < 1


def test_tokenizers_must_match_for_likelihoods():
    check_same_tokenizer(tiny_tokenizer(), tiny_tokenizer())
    with pytest.raises(ValueError, match=r"different tokenizers \(the token '(sky|blue)' is id \d+ in one and \d+ "
                                         r"in the other\).*truthfulqa_mc"):
        check_same_tokenizer(tiny_tokenizer(), tiny_tokenizer(swap=("sky", "blue")))


def test_mt_bench_second_turn_sees_the_first_answer(tmp_path):
    questions = read_mt_bench(write_jsonl(tmp_path / "question.jsonl", MT_BENCH))
    calls = []

    def generate(conversations):
        calls.append(conversations)
        return [f"answer {len(calls)}.{i}" for i in range(len(conversations))]

    answers = mt_bench_answers(generate, questions)
    assert answers[0] == ["answer 1.0", "answer 2.0"]
    second = calls[1][1]
    assert [m.role for m in second] == ["user", "assistant", "user"] and second[1].content == "answer 1.1"
    items = mt_bench_items(questions, answers)
    assert items[1]["references"] == ["blue", "sky"] and items[0]["references"] is None
