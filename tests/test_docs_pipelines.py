"""docs/pipelines.md's commands, run as written, in order, in a working directory of their own, on the embedded
default (SmolLM2-135M-Instruct), as a user runs them: the ``production_pipeline`` preset's smoke form end to end
(labels -> sft -> reward -> ppo -> summary), the rerun that skips every finished stage, and ``--print-config``;
then the page's command with the other two shipped presets. The commands go through ``jaxalign.cli.main`` in
this process; their repeated compiles load from the suite's compilation cache (tests/conftest.py)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from jaxalign.cli import main
from jaxalign.methods import multistage

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "pipelines.md"
BASH = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
STAGES = ("sft", "reward", "ppo")


def commands() -> list[str]:
    return [line for block in BASH.findall(PAGE.read_text(encoding="utf-8")) for line in block.splitlines()
            if line.startswith("jaxalign ")]


@pytest.fixture
def work(tmp_path, monkeypatch):
    """An empty working directory: the commands' relative paths land in it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(command: str, capsys) -> str:
    argv = shlex.split(command)
    assert argv[0] == "jaxalign"
    target = None
    if ">" in argv:
        argv, target = argv[:argv.index(">")], argv[argv.index(">") + 1]
    status = main(argv[1:])
    captured = capsys.readouterr()
    assert status == 0, f"{command}\n{captured.err[-4000:]}"
    if target is not None:
        Path(target).write_text(captured.out)
    return captured.out


class Killed(BaseException):
    """A kill: not an error the command reports, it ends the process (the CLI catches only Exception)."""


def test_the_page_commands_run_the_smoke_pipeline_then_skip_it(work, capsys, monkeypatch):
    first, again, printed = commands()
    out = work / "runs/production_pipeline_smoke"

    # The first command is killed after ppo's last checkpoint and before the pipeline recorded the stage as done.
    record = multistage._write_state

    def killed_when_ppo_is_recorded(path, state):
        if "ppo" in state["stages"]:
            raise Killed
        record(path, state)

    monkeypatch.setattr(multistage, "_write_state", killed_when_ppo_is_recorded)
    with pytest.raises(Killed):
        main(shlex.split(first)[1:])
    monkeypatch.setattr(multistage, "_write_state", record)
    shown = capsys.readouterr().out
    # The smoke form keeps no finished stage's checkpoints (keep_checkpoints: false): their exports feed the next.
    for name in ("sft", "reward"):
        assert f"{name}: finished; its checkpoints removed" in shown
        assert not (out / name / "checkpoints").exists() and (out / name / "export/config.json").is_file()
    assert (out / "ppo/checkpoints/1").is_dir()  # its last step, saved before the kill

    # The rerun skips the finished stages and resumes the interrupted one from its checkpoints.
    shown = run(again, capsys)
    for index, name in enumerate(STAGES[:2], 1):
        assert f"[{index}/3] {name} ({name}): finished earlier, skipped" in shown
    assert "[3/3] ppo (ppo): resuming from its checkpoints" in shown
    assert not (out / "ppo/checkpoints").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == list(STAGES)
    assert set(summary["evaluation"]) == {"sft", "base"}
    for evaluation in summary["evaluation"].values():
        assert evaluation["responses"] == summary["labels"]["eval"]["prompts"] > 0
        assert evaluation["learned_judge"] == "reward_model"
    assert (out / "summary.png").stat().st_size > 0
    assert "final policy (ppo) against sft:" in shown and "win rate vs reference (vader)" in shown
    assert (out / "summary.txt").read_text().strip() in shown
    ppo_run = json.loads((out / "ppo/run.json").read_text())
    assert ppo_run["config"]["model"]["path"] == "runs/production_pipeline_smoke/sft/export"
    assert ppo_run["config"]["reward"] == {"model": "runs/production_pipeline_smoke/reward/export"}
    assert json.loads((out / "reward/run.json").read_text())["config"]["model"]["path"].endswith("sft/export")
    state = json.loads((out / "pipeline.json").read_text())
    assert {name: record["status"] for name, record in state["stages"].items()} == dict.fromkeys(STAGES, "done")

    run(printed, capsys)
    stages = json.loads(Path("stages.json").read_text())["stages"]
    assert [(s["name"], s["reads"]) for s in stages] == [("sft", []), ("reward", ["sft"]), ("ppo", ["sft", "reward"])]

    # Changed settings of a finished stage are refused, not silently skipped.
    assert main([*shlex.split(first)[1:], "sft/train.total_steps=3"]) == 2
    assert "stage sft in runs/production_pipeline_smoke/sft finished with other settings" in capsys.readouterr().err


@pytest.mark.parametrize(("config", "preset", "stages", "references", "sft_weights", "reward_loss"), [
    ("adlf", "adlf_pipeline", ("sft", "reward", "ppo"), {"sft", "base"}, "score", "regression"),
    ("lm_human_preferences", "lm_human_preferences", ("reward", "ppo"), {"base"}, None, "best_of_n"),
])
def test_the_other_shipped_pipelines_run_to_a_summary_in_their_smoke_form(config, preset, stages, references,
                                                                           sft_weights, reward_loss, work, capsys):
    """The page's command with the other two presets: their own labels (ADLF's scored conversations,
    lm-human-preferences' best-of-4 records), every stage trained and wired, the final policy evaluated. ADLF's
    runs by its short name, as the page says: ``--config adlf`` is ADLF's pipeline, ``adlf_pipeline``."""
    shown = run(f"jaxalign pipeline --config {config} --smoke", capsys)
    out = work / f"runs/{preset}_smoke"
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == list(stages)
    assert set(summary["evaluation"]) == references
    for evaluation in summary["evaluation"].values():
        assert evaluation["responses"] == summary["labels"]["eval"]["prompts"] > 0
        assert evaluation["learned_judge"] == "reward_model"
    assert "final policy (ppo) against base:" in shown
    assert not list(out.glob("*/checkpoints")) and all((out / name / "export").is_dir() for name in stages)
    runs = {name: json.loads((out / name / "run.json").read_text())["config"] for name in stages}
    assert runs["reward"]["loss"]["loss"] == reward_loss
    if sft_weights is not None:
        assert runs["sft"]["loss"]["example_weights"] == sft_weights
        # ADLF's composite reward: the regressed reward model of the stage before, plus the internal terms
        composite = runs["ppo"]["reward"]["composite"]
        assert composite["external"] == {"model": f"runs/{preset}_smoke/reward/export"}
        assert composite["internal"] == {"coherence": 1.0, "length_penalty": 0.5, "faithfulness": 0.2}
    else:
        assert runs["ppo"]["reward"] == {"model": f"runs/{preset}_smoke/reward/export"}
