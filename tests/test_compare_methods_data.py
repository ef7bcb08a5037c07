"""The method comparison on a user's own data and judge: prompts from UltraMedical-style records (the fixture is
in the published ``conversations``/``answer``/``score`` layout), the gold judge named on the command line, and bad
input refused in one line before any model is loaded. (The LLM-judged column's judge runs against a fake
OpenAI-compatible judge on loopback.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from experiments.compare_methods import main, prompts_from
from experiments.judged import LLMGradeJudge, gold_judge, judged_cell, judged_column
from jaxalign.eval.llm_judge import JudgeSpec
from tests.eval.fake_judge import fake_judge

FIXTURE = Path(__file__).parent / "fixtures" / "ultramedical.jsonl"


def test_the_questions_of_ultramedical_records_in_a_seeded_order():
    questions = prompts_from(FIXTURE, 320, 0)
    assert len(questions) == 6  # seven records, one a duplicate question
    assert set(questions) == {json.loads(line)["conversations"][-1 if i != 4 else 0]["value"]
                              for i, line in enumerate(FIXTURE.read_text().splitlines())}
    assert questions == prompts_from(FIXTURE, 320, 0) and questions != prompts_from(FIXTURE, 320, 1)
    assert prompts_from(FIXTURE, 5, 0) == questions[:5]


def test_a_record_of_several_turns_is_named(tmp_path):
    path = tmp_path / "chat.jsonl"
    lines = FIXTURE.read_text().splitlines()
    lines[2] = json.dumps({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                                             {"from": "human", "value": "Is it serious?"}], "answer": "No."})
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"chat.jsonl, record 3: field 'prompt': 3 turns before the answer"):
        prompts_from(path, 320, 0)


def test_bad_data_and_judges_fail_before_any_model_is_loaded(tmp_path):
    out = ["--output-dir", str(tmp_path / "run")]
    with pytest.raises(FileNotFoundError, match="--data .*missing.jsonl: no such file"):
        main(["--data", str(tmp_path / "missing.jsonl"), *out])
    with pytest.raises(ValueError, match="--judge 'gpt4': expected vader, reward-model:DIR or llm:URL"):
        main(["--data", str(FIXTURE), "--judge", "gpt4", *out])
    with pytest.raises(FileNotFoundError, match="--judge reward-model:.*nowhere: no such directory"):
        main(["--judge", f"reward-model:{tmp_path / 'nowhere'}", *out])
    (tmp_path / "policy").mkdir()
    with pytest.raises(FileNotFoundError, match="is not a reward model"):
        gold_judge(f"reward-model:{tmp_path / 'policy'}")
    assert not (tmp_path / "run").exists()


def test_an_llm_gold_judge_grades_and_never_guesses():
    with fake_judge("fair") as (url, _):
        judge = gold_judge(f"llm:{url}")
        assert isinstance(judge, LLMGradeJudge) and judge.spec.model == "fake-judge"
        scores = judge.score(["q1", "q2", "q3"], ["good good good", "good", "bad"])  # grades 10, 4, 1
        np.testing.assert_allclose(scores, (np.asarray([10, 4, 1]) - 5.5) / 4.5)
    with fake_judge("garbage") as (url, _):
        judge = gold_judge(f"llm:{url}#fake-judge")
        with pytest.raises(ValueError, match=r"gave no grade for 2 of 2 answers \({'unparseable': 2}\)"):
            judge.score(["q1", "q2"], ["good", "bad"])


def test_the_judged_column_reports_kappa_against_the_gold_verdicts(tmp_path):
    prompts = [f"question {i // 2}" for i in range(8)]
    policy = ["good good", "good", "meh", "good good", "good", "meh", "good", "good good"]
    reference = ["good", "good", "good", "meh", "meh", "good", "good", "meh"]
    gold_policy = [2.0, 1.0, 0.0, 2.0, 1.0, 0.0, 1.0, 2.0]  # the fair judge's criterion: the gold agrees fully
    gold_reference = [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    with fake_judge("fair") as (url, _):
        spec = JudgeSpec(url=url, model="fake-judge", cache_dir=tmp_path / "cache", backoff_s=0.01)
        column = judged_column(spec, prompts, policy, reference, gold_policy, gold_reference, clusters=prompts)
    assert column["agreement_with_gold"] == {"kappa": 1.0, "observed": 1.0, "n": 16}
    assert column["win_rate"]["rate"] == pytest.approx(5 / 8) and column["win_rate"]["clusters"] == 4
    assert column["gold_win_rate_same_pairs"] == pytest.approx(5 / 8)
    assert judged_cell(column).startswith("62.5% [") and judged_cell(column).endswith("κ 1.00")
    assert judged_cell(None) == "-"


def test_each_method_gets_its_judged_column_in_the_table_and_the_plot(tmp_path):
    from experiments.compare_methods import judge_rows, plot, table

    def row(responses, gold):
        records = [{"prompt": f"q{i // 2}", "response": text, "gold": g, "base": "good", "gold_base": 1.0}
                   for i, (text, g) in enumerate(zip(responses, gold))]
        ci = {"mean": 0.5, "low": 0.4, "high": 0.6}
        return {"records": records, "samples_per_prompt": 2, "win_rate": {"rate": 0.6, "low": 0.5, "high": 0.7},
                "gold_reward": {"policy": ci, "reference": ci}, "kl": ci, "response_length": {"policy": ci},
                "seconds": 60.0, "peak_rss_mib": 1024.0, "trainable_parameters": 1e6}

    rows = {"sft": row(["good good", "meh", "meh", "good good"], [2.0, 0.0, 0.0, 2.0]),
            "dpo": row(["good good"] * 4, [2.0] * 4)}
    (tmp_path / "evaluation").mkdir()
    with fake_judge("fair") as (url, judge):
        spec = JudgeSpec(url=url, model="fake-judge", cache_dir=tmp_path / "judgments", backoff_s=0.01)
        judge_rows(tmp_path, rows, spec, samples=1)
        # Two methods, the first sample of two prompts, both orders: 8 judgments, of which dpo's first pair is
        # sft's exactly and comes from the judgment cache.
        assert judge.requests == 6
        judge_rows(tmp_path, rows, spec, samples=1)  # read back from evaluation/<method>.judged.json
        assert judge.requests == 6
    assert rows["sft"]["judged"]["win_rate"]["rate"] == 0.5 and rows["dpo"]["judged"]["win_rate"]["rate"] == 1.0
    assert (tmp_path / "evaluation" / "sft.judged.json").is_file()
    text = table(rows)
    assert "LLM-judged" in text and "50.0% [" in text and "100.0% [" in text
    plot(rows, 0.3, tmp_path / "summary.png", judge_name="vader")
    assert (tmp_path / "summary.png").stat().st_size > 10_000
