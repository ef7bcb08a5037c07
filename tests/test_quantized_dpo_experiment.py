"""``python -m experiments.quantized_dpo --smoke`` end to end on a tiny random Llama (with a word-level tokenizer
of words VADER scores), from a working directory of its own, on pairs a main-job run left (``--pairs-from``): both
DPO runs train in child processes on the same pairs, the nf4 one on a quantised base, each with its own peak
memory and train time, both evaluated against the base on the same samples; a rerun reuses what is done."""

from __future__ import annotations

import json

import pytest

from experiments.quantized_dpo import main
from tests.methods.test_multistage import sentiment_tokenizer
from tests.models.conftest import make_hf_model

# Words the tiny tokenizer knows (tests.methods.test_multistage), chosen positive, rejected negative.
PAIRS = [("love", "great lovely .", "awful sad ."), ("fine", "happy .", "terrible"), ("ok", "nice nice", "bad ."),
         ("cool", "superb .", "worst poor"), ("kind", "glad", "hurt ."), ("calm", "best fun .", "ugly")]
SETTINGS = {"prompts": 8, "samples": 2, "max_new_tokens": 6, "seed": 3}


@pytest.fixture(scope="module")
def main_run(tmp_path_factory):
    """A tiny base model and the files a main-job run leaves: its pairs, held-out prompts and their settings."""
    root = tmp_path_factory.mktemp("quantized_dpo")
    model = root / "tiny_llama"
    make_hf_model("llama").save_pretrained(model)
    sentiment_tokenizer().save_pretrained(model)
    sentiment = root / "runs" / "sentiment"
    sentiment.mkdir(parents=True)
    (sentiment / "pairs_train.jsonl").write_text("".join(json.dumps({
        "prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
        "rejected": [{"role": "assistant", "content": r}], "margin": 0.5}) + "\n" for p, c, r in PAIRS))
    (sentiment / "prompts_eval.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("good", "sad")))
    (sentiment / "pairs.json").write_text(json.dumps({"settings": SETTINGS}))
    return root, model


def test_both_runs_train_apart_on_the_same_pairs_and_meet_the_same_base_samples(main_run, tmp_path, monkeypatch,
                                                                                  capsys):
    root, model = main_run
    monkeypatch.chdir(root)
    argv = ["--smoke", "--model", str(model), "--block-size", "16", "--pairs-from", "runs/sentiment"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    out = root / "runs" / "quantized_dpo_smoke"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["train_pairs"] == len(PAIRS) and summary["settings"]["eval_prompts"] == 2
    assert summary["settings"]["max_new_tokens"] == 6 and summary["settings"]["seed"] == 3  # the main run's
    configs = {name: json.loads((out / name / "run.json").read_text())["config"] for name in ("float32", "nf4")}
    for config in configs.values():
        assert config["data"]["source"] == str(root / "runs" / "sentiment" / "pairs_train.jsonl")
        assert config["model"]["lora"]["rank"] == 16 and config["model"]["lora"]["alpha"] == 32
        assert len(config["model"]["lora"]["targets"]) == 7
        assert config["model"]["param_dtype"] == "float32" and config["train"]["total_steps"] == 2
    assert configs["float32"]["model"]["quantize"] is None
    assert configs["nf4"]["model"]["quantize"] == {"type": "nf4", "block_size": 16, "double_quant": True,
                                                   "compute_dtype": None, "targets": None}
    assert list(summary["runs"]) == ["float32", "nf4", "nf4 base, no DPO"]
    quantization = summary["runs"]["nf4 base, no DPO"]  # evaluated, not trained
    assert quantization["responses"] == 2 and "peak_rss_mib" not in quantization
    assert summary["verdict"]["quantization_kl"] == quantization["kl"]["mean"]
    for name in ("float32", "nf4"):
        row = summary["runs"][name]
        assert 0.2 < row["peak_rss_mib"] / 1024 < 20, name  # a process's own, in MiB
        assert 0 < row["train_seconds"] <= row["wall_seconds"], name
        assert row["win_rate"]["low"] <= row["win_rate"]["rate"] <= row["win_rate"]["high"]
        assert row["responses"] == 2
    assert 0 < summary["runs"]["nf4"]["base_weights_mib"] < summary["runs"]["float32"]["base_weights_mib"] / 2
    reference = summary["runs"]["float32"]["win_rate"]
    assert summary["verdict"]["inside"] == (reference["low"] <= summary["verdict"]["nf4_rate"] <= reference["high"])
    bases = [[r["base"] for r in json.loads((out / "evaluation" / f"{name}.json").read_text())["records"]]
             for name in ("float32", "nf4", "nf4_base")]
    assert bases[0] == bases[1] == bases[2]  # the same key: both policies meet the same base samples
    assert (out / "summary.png").stat().st_size > 10_000
    assert not (root / "experiments").exists()  # a smoke run publishes nothing
    assert "gold win rate vs base [95% CI]" in printed and "peak RSS" in printed

    assert main(argv) == 0  # a rerun reads the finished runs and evaluations back
    assert capsys.readouterr().out.count("done earlier") == 2
    assert json.loads((out / "summary.json").read_text())["runs"] == summary["runs"]


def test_a_bad_held_out_prompt_is_named_by_file_record_and_field(tmp_path, capsys):
    (tmp_path / "pairs_train.jsonl").write_text("{}\n")
    (tmp_path / "pairs.json").write_text(json.dumps({"settings": SETTINGS}))
    (tmp_path / "prompts_eval.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(SystemExit):
        main(["--pairs-from", str(tmp_path), "--output-dir", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.endswith(f"{tmp_path / 'prompts_eval.jsonl'}: record 2: field 'prompt' must be a string")


def test_overrides_other_than_the_dpo_stage_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--output-dir", str(tmp_path / "out"), "reward.loss.center_coef=0.1"])
    assert "dpo.<key>=<value>" in capsys.readouterr().err
