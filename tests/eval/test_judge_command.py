"""``jaxalign eval`` with judges and benchmarks, end to end through ``jaxalign.cli.main`` on tiny checkpoints, with
fake judges on loopback: toxicity and an LLM judge on the samples, AlpacaEval (resumed from the judge cache),
MT-Bench, TruthfulQA-MC; and bad input as one line before any model loads."""

from __future__ import annotations

import json
import socket

import pytest

from tests.eval.fake_judge import fake_judge
from tests.eval.test_benchmarks import ALPACA, MT_BENCH, TRUTHFULQA, write_json, write_jsonl
from tests.eval.test_command import SAMPLING, checkpoints, eval_parser, jaxalign_eval  # noqa: F401 (fixtures)
from tests.models.conftest import make_hf_model
from tests.test_cli import tiny_tokenizer

pytest.importorskip("profanity_check")
FAST = ["--max-new-tokens", "4", "--batch-size", "4", "--seed", "1", "--no-progress"]


def judge_options(url, *more):
    return ["--judge-url", url, "--judge-model", "fake-judge", "--judge-retries", "1", "--judge-timeout", "5", *more]


def test_prompts_with_toxicity_and_llm_judge(checkpoints, jaxalign_eval, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    policy, reference = (checkpoints[i].rename(tmp_path / "models" / checkpoints[i].name) for i in (0, 1))
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi"}, {"prompt": "sky ?"}, {"prompt": "Go away ."}])
    try:
        with fake_judge("fair") as (url, judge):
            status, stdout, stderr = jaxalign_eval(
                "--policy", f"models/{policy.name}", "--reference", f"models/{reference.name}",
                "--prompts", "prompts.jsonl", "--judge", "toxicity", "--judge", "llm",
                *judge_options(url, "--judge-cache", "cache"), "--output", "out", *SAMPLING)
    finally:
        for path, original in ((policy, checkpoints[0]), (reference, checkpoints[1])):
            path.rename(original)
    assert status == 0, stderr
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["policy_eval"]["judge"] == "non-toxicity (alt-profanity-check)"
    assert report["toxicity"]["policy"]["toxic_share"]["n"] == 6
    counts = report["llm_judge"]["counts"]
    assert counts["judgments"] == 12 == counts["ok"] == judge.requests and counts["prompts"] == 6
    assert report["llm_judge"]["win_rate"]["clusters"] == 3  # prompts, not samples, are the units
    rows = [json.loads(line) for line in (tmp_path / "out" / "judgments.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(row["raw"].startswith("Reasoning.") for row in rows)
    assert "toxicity (alt-profanity-check)" in stdout and "judged win rate (fake-judge @" in stdout
    assert "judgments.jsonl" in stderr and (tmp_path / "cache" / "judgments.jsonl").exists()


def test_alpaca_eval_benchmark_and_resume(checkpoints, jaxalign_eval, tmp_path):  # noqa: F811
    data = write_json(tmp_path / "alpaca_eval.json", ALPACA)
    common = ["--benchmark", "alpaca_eval", "--data", data, "--policy", checkpoints[0], *FAST]
    with fake_judge("fair") as (url, judge):
        status, stdout, stderr = jaxalign_eval(*common, *judge_options(url, "--judge-cache", tmp_path / "cache"),
                                               "--output", tmp_path / "out")
        assert status == 0, stderr
        assert judge.requests == 6
        status, stdout_again, stderr = jaxalign_eval(*common, *judge_options(url, "--judge-cache", tmp_path / "cache"))
        assert status == 0, stderr
        assert judge.requests == 6  # the rerun asked nothing: every judgment came from the cache
    assert "requests 0, retries 0, cached 6" in stdout_again
    assert "AlpacaEval (3 instructions) against baseline_model" in stdout
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    section = report["benchmark"]
    assert section["counts"]["ok"] == 6 and section["win_rate"]["n"] == 6
    assert section["length_controlled_note"] is not None  # 3 instructions are too few for the GLM's 5 folds
    outputs = json.loads((tmp_path / "out" / "model_outputs.json").read_text())
    assert [o["instruction"] for o in outputs] == [a["instruction"] for a in ALPACA]
    assert outputs[1]["dataset"] == "koala" and outputs[0]["generator"] == str(checkpoints[0])


def test_mt_bench_with_reference(checkpoints, jaxalign_eval, tmp_path):  # noqa: F811
    data = write_jsonl(tmp_path / "question.jsonl", MT_BENCH)
    with fake_judge("fair") as (url, judge):
        status, stdout, stderr = jaxalign_eval("--benchmark", "mt_bench", "--data", data, "--policy", checkpoints[0],
                                               "--reference", checkpoints[1], *FAST,
                                               *judge_options(url, "--no-judge-cache"), "--output", tmp_path / "out")
    assert status == 0, stderr
    assert judge.requests == 12  # 3 questions x 2 turns x 2 models
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    for side in ("policy", "reference"):
        scores = report["benchmark"][side]["scores"]
        assert sorted(scores["categories"]) == ["math", "roleplay", "writing"]
        assert scores["turns"]["1"]["n"] == 3 and scores["turns"]["2"]["n"] == 3
        assert report["benchmark"][side]["counts"]["ok"] == 6
    answers = [json.loads(line) for line in (tmp_path / "out" / "mt_bench_answers.jsonl").read_text().splitlines()]
    assert len(answers) == 6 and all(len(a["choices"][0]["turns"]) == 2 for a in answers)
    assert "MT-Bench (policy, 3 questions; 6 graded, 0 unparseable, 0 failed)" in stdout
    assert "  math" in stdout and "turn 2" in stdout


def test_truthfulqa_mc(checkpoints, jaxalign_eval, tmp_path):  # noqa: F811
    data = write_json(tmp_path / "mc_task.json", TRUTHFULQA)
    status, stdout, stderr = jaxalign_eval("--benchmark", "truthfulqa_mc", "--data", data, "--policy", checkpoints[0],
                                           "--reference", checkpoints[1], "--output", tmp_path / "out", *FAST)
    assert status == 0, stderr
    section = json.loads((tmp_path / "out" / "eval.json").read_text())["benchmark"]
    for side in ("policy", "reference"):
        assert section[side]["questions"] == 2 and 0 <= section[side]["mc2"]["mean"] <= 1
        assert section[side]["mc1"]["mean"] in (0, 0.5, 1)
    assert "TruthfulQA MC (policy, 2 questions)" in stdout and "MC2" in stdout


@pytest.fixture(scope="module")
def swapped_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("swapped") / "tiny_llama"
    make_hf_model("llama", seed=1).save_pretrained(directory)
    tiny_tokenizer(swap=("sky", "blue")).save_pretrained(directory)
    return directory


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_bad_input_is_one_line_before_any_model_loads(checkpoints, jaxalign_eval, tmp_path,  # noqa: F811
                                                      swapped_checkpoint):
    alpaca = write_json(tmp_path / "alpaca_eval.json", ALPACA)
    missing_model = tmp_path / "no_such_model"
    port = _free_port()

    def error(*args):
        status, _, stderr = jaxalign_eval(*args)
        assert status == 2, stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("jaxalign eval: error: "), stderr
        return lines[0]

    # The judge is checked before the (missing) policy is loaded.
    line = error("--benchmark", "alpaca_eval", "--data", alpaca, "--policy", missing_model, "--judge-url",
                 f"http://127.0.0.1:{port}/v1", "--judge-model", "j")
    assert f"--judge-url http://127.0.0.1:{port}/v1 is unreachable" in line
    bad = tmp_path / "question.jsonl"
    bad.write_text(json.dumps(MT_BENCH[0]) + "\n" + json.dumps({"question_id": 2, "category": "x", "turns": "hi"}))
    with fake_judge("fair") as (url, _):
        line = error("--benchmark", "mt_bench", "--data", bad, "--policy", missing_model, *judge_options(url))
        assert f"{bad}, line 2: field 'turns' must be a list" in line
        templates = tmp_path / "templates"
        templates.mkdir()
        (templates / "pairwise.yaml").write_text("prompt: 'Which is better? {answer_a} or {answer_b}'\n")
        line = error("--benchmark", "alpaca_eval", "--data", alpaca, "--policy", missing_model,
                     *judge_options(url, "--judge-templates", templates))
        assert "pairwise.yaml: the pairwise template's 'prompt' lacks the placeholder(s) {question}" in line
    line = error("--prompts", alpaca, "--judge", "llm")
    assert "--judge llm needs --judge-url and --judge-model" in line
    line = error("--benchmark", "alpaca_eval", "--data", tmp_path / "nope.json", "--judge-url", "http://x/v1",
                 "--judge-model", "j")
    assert "--data" in line and "no such file" in line
    # Different tokenizers: refused before the likelihoods are computed.
    mc = write_json(tmp_path / "mc_task.json", TRUTHFULQA)
    line = error("--benchmark", "truthfulqa_mc", "--data", mc, "--policy", checkpoints[0], "--reference",
                 swapped_checkpoint, *FAST)
    assert "--policy and --reference have different tokenizers" in line


def test_write_templates_then_use_them(jaxalign_eval, tmp_path):  # noqa: F811
    status, _, stderr = jaxalign_eval("--write-judge-templates", tmp_path / "t")
    assert status == 0 and "wrote 5 judge templates" in stderr
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [
        "pairwise.yaml", "single.yaml", "single_multi.yaml", "single_multi_reference.yaml", "single_reference.yaml"]
