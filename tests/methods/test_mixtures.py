"""Dataset mixtures in training runs: the command as a user runs it, per-source counts in run.json and on stderr,
a resumed run that continues the mixture exactly, held-out data read once per example, and settings refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxalign import data
from jaxalign.methods import common, kto, pipeline, recipe
from tests.train.conftest import python_env

# Word-level tokens, the EOS appended: " sky blue ." after "Hi" is 8 tokens; the last of B is 22 (filtered out).
A_ROWS = [{"prompt": "Hi", "completion": c} for c in (" sky blue .", " Go away .", " blue sky", " sky blue .")]
B_ROWS = [{"prompt": "Go", "completion": c} for c in (" away .", " Hi Hi", " blue", " sky . sky . sky . sky . sky .")]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def workdir(checkpoint, tmp_path) -> Path:
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    os.symlink(checkpoint, work / "tiny")
    write_rows(work / "data" / "a.jsonl", A_ROWS)
    write_rows(work / "data" / "b.jsonl", B_ROWS)
    (work / "sft.yaml").write_text(
        "output_dir: runs/mix\nmodel: {path: tiny}\n"
        "data: {sources: [data/a.jsonl, {source: data/b.jsonl, weight: 3}], dedup: exact, filter: {max_length: 12},"
        " batch_size: 2, max_length: 16}\n"
        "train: {total_steps: 4, checkpoint: {save_every_steps: 2}, log: {progress_bar: false, tensorboard: false}}\n")
    return work


def jaxalign(work: Path, *args: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "jaxalign"), *args]
    return subprocess.run(command, cwd=work, env=python_env(), capture_output=True, text=True, timeout=900)


def losses_of(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_mixture_trains_reports_its_sources_and_resumes_exactly(workdir):
    done = jaxalign(workdir, "train", "sft", "--config", "sft.yaml", "train.total_steps=2")
    assert done.returncode == 0, done.stderr[-4000:]
    # Printed: what de-duplication and the filter removed, and the mixture's composition.
    assert "data/a.jsonl: read 4, duplicates 1 -> 3 examples; weight 1 (25.0%), 2 per mixture epoch" in done.stderr
    assert "data/b.jsonl: read 4, too long 1 -> 3 examples; weight 3 (75.0%), 4 per mixture epoch" in done.stderr
    run = json.loads((workdir / "runs" / "mix" / "run.json").read_text())
    assert [(s["source"], s["weight"], s["duplicates"], s["too_long"], s["examples"]) for s in run["data_sources"]] == [
        ("data/a.jsonl", 1.0, 1, 0, 3), ("data/b.jsonl", 3.0, 0, 1, 3)]
    assert run["config"]["data"]["sources"][1] == {"source": "data/b.jsonl", "weight": 3, "split": None,
                                                   "format": None}
    # Resumed to 4 steps, it trains on exactly the batches an uninterrupted 4-step run trains on.
    resumed = jaxalign(workdir, "train", "sft", "--config", "sft.yaml", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    straight = jaxalign(workdir, "train", "sft", "--config", "sft.yaml", "output_dir=runs/straight")
    assert straight.returncode == 0, straight.stderr[-4000:]
    assert losses_of(workdir / "runs" / "mix") == pytest.approx(losses_of(workdir / "runs" / "straight"), rel=1e-6)
    metadata = json.loads(next((workdir / "runs" / "mix" / "checkpoints").glob("4/data/metadata")).read_text())
    mixture = metadata["positions"][0]["mixture"]
    assert mixture["sources"] == ["data/a.jsonl", "data/b.jsonl"] and sum(mixture["drawn"]) == 8


def test_a_list_as_source_is_a_one_line_error_naming_sources(workdir):
    done = jaxalign(workdir, "train", "sft", "--config", "sft.yaml", "data.sources=null",
                    "data.source=[data/a.jsonl,data/b.jsonl]")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "jaxalign train: error: data.source=[data/a.jsonl,data/b.jsonl] (command line): data.source must be a string "
        "(one file), got ['data/a.jsonl', 'data/b.jsonl']: mix several files with sources: [a.jsonl, b.jsonl] (entries "
        "{source, weight, split, format})")


@pytest.mark.parametrize("override, message", [
    ("data.weights=[1, 2, 3]", r"weights \[1, 2, 3\] do not match the 2 sources"),
    ("data.dedup=near", r"dedup must be one of exact, prompt or null, got 'near'"),
    ("data.filter={min_length: 20, max_length: 12}", r"filter.min_length 20 is above filter.max_length 12"),
    ("curriculum=length", r"curriculum orders one dataset easy to hard, but data.sources mixes several"),
])
def test_bad_mixture_settings_fail_before_any_work(workdir, override, message):
    with pytest.raises(ValueError, match=message):
        recipe.load_run_config(str(workdir / "sft.yaml"), [override], method="sft")


def test_held_out_mixtures_are_read_once_per_example(checkpoint, tmp_path):
    a = write_rows(tmp_path / "a.jsonl", A_ROWS)
    b = write_rows(tmp_path / "b.jsonl", B_ROWS)
    values = {"method": "sft", "output_dir": str(tmp_path / "out"), "model": {"path": str(checkpoint)},
              "data": {"sources": [str(a), str(b)], "weights": [1, 9], "batch_size": 2, "max_length": 32},
              "eval_data": {"sources": [str(a), str(b)], "weights": [1, 9], "batch_size": 3, "max_length": 32},
              "train": {"total_steps": 1, "log": {"progress_bar": False, "tensorboard": False}}}
    config = recipe.load_run_config(values)
    _, tokenizer = common.load_pretrained(config.model)
    eval_dataset = data.build_dataset(config.eval_data, tokenizer)
    # Each example once, in order: the weights shape the training stream, not an evaluation.
    assert common.one_pass(config.eval_data, eval_dataset).order(0).tolist() == list(range(8))
    result = pipeline.run(config)
    assert result.eval_metrics["examples"] == 8


def test_kto_keeps_each_example_s_source(checkpoint, tmp_path):
    pairs = [{"prompt": "Hi", "chosen": "sky blue .", "rejected": "Go away ."},
             {"prompt": "Go", "chosen": "blue", "rejected": "away ."}]
    a = write_rows(tmp_path / "a.jsonl", pairs)
    b = write_rows(tmp_path / "b.jsonl", pairs[:1])
    _, tokenizer = common.load_pretrained(recipe.ModelSpec(path=str(checkpoint)))
    dataset = data.build_dataset(data.DataConfig(sources=[str(a), str(b)]), tokenizer)
    unpaired = kto.as_unpaired(dataset)
    assert [e.source for e in unpaired.examples] == [0, 0, 1, 0, 0, 1]  # chosen sides, then rejected
    assert data.BatchIterator(unpaired, batch_size=2).epoch_length == 6


def test_the_command_line_chooses_between_source_and_sources():
    preset = recipe.load_run_config("hh_rlhf", ["data.sources=[a.jsonl, b.jsonl]", "data.weights=[3, 1]"],
                                    method="sft")
    assert preset.data.source is None and [(s.source, s.weight) for s in preset.data.sources] == [("a.jsonl", 3),
                                                                                                  ("b.jsonl", 1)]
    back = recipe.load_run_config({"method": "sft", "output_dir": "x", "train": {"total_steps": 1},
                                   "data": {"sources": ["a.jsonl", "b.jsonl"], "weights": [1, 2]}},
                                  ["data.source=c.jsonl"])
    assert back.data.source == "c.jsonl" and back.data.sources is None
    with pytest.raises(ValueError, match=r"not both"):
        recipe.load_run_config("hh_rlhf", ["data.sources=[a.jsonl]", "data.source=b.jsonl"], method="sft")
