"""experiments.llmdoctor's bookkeeping: the evaluation cache follows the models it decoded with, and the Pareto
target needs the sweep to move each gold score the stated way (a flat sweep fails)."""

from __future__ import annotations

import os

from experiments.llmdoctor import fingerprint, monotone


def scores(*means, half_width=0.05):
    return [{"mean": m, "low": m - half_width, "high": m + half_width} for m in means]


def test_a_retrained_model_no_longer_matches_its_cached_evaluation(tmp_path):
    doctor = tmp_path / "doctor"
    doctor.mkdir()
    (doctor / "model.safetensors").write_bytes(b"weights")
    (doctor / "nested").mkdir()
    (doctor / "nested" / "value_head.safetensors").write_bytes(b"head")
    before = fingerprint((doctor,))
    assert before == fingerprint((doctor,))  # read twice, unchanged: the cache is reused
    assert [entry[0] for entry in before[str(doctor)]] == ["model.safetensors", "nested/value_head.safetensors"]
    stat = (doctor / "model.safetensors").stat()
    (doctor / "model.safetensors").write_bytes(b"retrain")  # same size: the modification time tells
    os.utime(doctor / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert fingerprint((doctor,)) != before
    (doctor / "extra.json").write_text("{}")
    assert len(fingerprint((doctor,))[str(doctor)]) == 3


def test_the_pareto_sweep_must_move_each_score_the_stated_way():
    assert monotone(scores(0.1, 0.2, 0.2, 0.35), increasing=True)
    assert monotone(scores(0.1, 0.18, 0.15, 0.3), increasing=True)  # a dip within the intervals
    assert not monotone(scores(0.1, 0.3, 0.1, 0.4), increasing=True)  # a step clearly the wrong way
    assert not monotone(scores(0.2, 0.2, 0.2), increasing=True)  # flat: the weights changed nothing
    assert not monotone(scores(0.20, 0.21, 0.205), increasing=True)  # a net move within the noise
    assert not monotone(scores(0.3, 0.25, 0.2), increasing=True)
    assert monotone(scores(0.3, 0.25, 0.15), increasing=False)
    assert not monotone(scores(0.3), increasing=False)


def test_a_speed_measured_under_load_is_not_published(tmp_path):
    import json

    from experiments.llmdoctor import quiet, results_with_quiet_speeds

    assert quiet({"load_average": 0.4, "cpus": 2}) is True
    assert quiet({"load_average": 9.0, "cpus": 2}) is False
    assert quiet({}) is None  # cached before the load was recorded: unknown
    published = tmp_path / "llmdoctor_summary.json"
    published.write_text(json.dumps({"methods": [
        {"method": "dpo", "tokens_per_second": 165.5},
        {"method": "args", "tokens_per_second": 45.3, "speed_quiet": False},
        {"method": "genarm", "tokens_per_second": 102.1, "speed_quiet": True}]}))
    summary = {"methods": [
        {"method": "dpo", "tokens_per_second": 40.0, "speed_quiet": False},
        {"method": "args", "tokens_per_second": 11.0, "speed_quiet": False},  # no quiet figure to keep
        {"method": "genarm", "tokens_per_second": 20.0, "speed_quiet": None},
        {"method": "patient", "tokens_per_second": 180.0, "speed_quiet": True},
        {"method": "new", "tokens_per_second": 5.0, "speed_quiet": False}]}
    rows = {row["method"]: row for row in results_with_quiet_speeds(summary, published)["methods"]}
    assert rows["dpo"]["tokens_per_second"] == 165.5 and rows["dpo"]["tokens_per_second_this_run"] == 40.0
    assert rows["genarm"]["tokens_per_second"] == 102.1 and rows["genarm"]["speed_quiet"] is True
    assert rows["args"]["tokens_per_second"] == 11.0 and "tokens_per_second_this_run" not in rows["args"]
    assert rows["patient"]["tokens_per_second"] == 180.0
    assert rows["new"] == summary["methods"][4]
    assert results_with_quiet_speeds(summary, tmp_path / "none.json") == summary


def test_the_llm_judge_compares_each_methods_first_sample_with_the_patients(tmp_path):
    from experiments.llmdoctor import judge_methods, table
    from jaxalign.eval.llm_judge import JudgeSpec
    from tests.eval.fake_judge import fake_judge

    texts = {"patient": ["good", "meh", "good", "good"], "doctor_same_size": ["good good", "x", "meh", "y"]}
    evaluation = {"prompts": ["q0", "q1"], "results": {
        name: {"texts": t, "sentiment": [float(text.count("good")) for text in t]} for name, t in texts.items()}}
    with fake_judge("fair") as (url, judge):
        spec = JudgeSpec(url=url, model="fake-judge", cache_dir=None, backoff_s=0.01)
        columns = judge_methods(tmp_path, evaluation, spec, names=("doctor_same_size",), samples=2,
                                judge_samples=1)
    assert judge.requests == 4  # rows 0 and 2 (each prompt's first sample), both orders
    column = columns["doctor_same_size"]
    assert column["win_rate"]["rate"] == 0.5 and column["agreement_with_gold"]["kappa"] == 1.0
    assert (tmp_path / "judged.json").is_file()
    row = {"label": "doctor", "win_rate_sentiment": {"rate": 0.7, "low": 0.6, "high": 0.8},
           "sentiment": {"mean": 0.5}, "conciseness": {"mean": 0.3}, "kl": {"mean": 15.0}, "length": {"mean": 28.0},
           "tokens_per_second": 50.0, "speed_quiet": False, "judged_sentiment": column}
    text = table({"methods": [row]})
    assert "50.0% [" in text and "κ 1.00" in text and "50.0*" in text and "not the method's speed" in text
