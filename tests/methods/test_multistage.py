"""``jaxalign pipeline``: a second process kept out by the lock, the presets' stage wiring (full and smoke forms),
and bad stage wiring refused in one line before anything trains. The production preset's smoke form runs end to
end in tests/test_docs_pipelines.py (docs/pipelines.md's commands)."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from jaxalign.cli import main
from jaxalign.methods import multistage
from tests.models.conftest import make_hf_model
from tests.test_cli import CHAT_TEMPLATE

SPECIALS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
WORDS = ["\n", " ", "user", "assistant", "system", "."]
# The rest of the vocabulary is words VADER scores (half positive, half negative), so a tiny random model's samples
# carry preferences.
SCORED = ["good", "great", "love", "happy", "nice", "best", "fine", "awesome", "excellent", "wonderful", "glad",
          "fantastic", "amazing", "brilliant", "superb", "delightful", "pleasant", "joy", "cheerful", "lovely",
          "perfect", "fun", "kind", "beautiful", "win", "hope", "calm", "proud", "bright", "sweet", "super", "cool",
          "free", "safe", "thanks", "yes", "ok", "like", "bad", "awful", "hate", "sad", "terrible", "worst", "poor",
          "horrible", "angry", "ugly", "nasty", "gross", "boring", "dull", "lame", "fail", "lost", "pain", "hurt",
          "cry", "fear", "sick", "weak", "broken", "worse", "wrong", "evil", "mad", "rude", "stupid", "upset",
          "annoying", "disaster", "tragic", "gloomy", "grim", "bitter", "harsh", "cruel", "ruin", "no", "miss",
          "lonely", "bored", "tired", "dead", "toxic", "shame", "panic"]
TINY_VOCAB = 97


def sentiment_tokenizer() -> PreTrainedTokenizerFast:
    words = SPECIALS + WORDS + SCORED
    assert len(words) == TINY_VOCAB == len(set(words)), len(words)
    vocab = {t: i for i, t in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s|\w+|[^\w\s]|<\|im_(start|end)\|>"), behavior="isolated")
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # words joined by spaces, as VADER reads them
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pipeline") / "tiny_llama"
    make_hf_model("llama").save_pretrained(directory)
    sentiment_tokenizer().save_pretrained(directory)
    return directory


def test_a_second_process_is_kept_out_of_the_directory(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs/production_pipeline_smoke"
    out.mkdir(parents=True)
    fd = os.open(out / multistage.LOCK_FILE, os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242\n")
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running pipeline holds it
    try:
        status = main(["pipeline", "--config", "production_pipeline", "--smoke", f"model.path={tiny_model}"])
    finally:
        os.close(fd)
    assert status == 2
    assert ("output_dir runs/production_pipeline_smoke is being written by process 4242" in
            capsys.readouterr().err)


@pytest.mark.parametrize(("preset", "stages", "reads", "data_format"), [
    ("adlf_pipeline", ["sft", "reward", "ppo"], {"sft": (), "reward": ("sft",), "ppo": ("reward", "sft")},
     "scored_conversation"),
    ("lm_human_preferences", ["reward", "ppo"], {"reward": (), "ppo": ("reward",)}, "openai_preferences"),
])
def test_the_other_presets_wire_their_stages(preset, stages, reads, data_format, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for smoke in (False, True):
        pipeline = multistage.load_pipeline(preset, smoke=smoke)
        assert [s.name for s in pipeline.stages] == stages
        assert {s.name: s.reads for s in pipeline.stages} == reads
        out = pipeline.output_dir
        assert out.name == (f"{preset}_smoke" if smoke else preset)
        first, ppo = pipeline.stages[0], pipeline.stages[-1]
        assert first.config.data.format == data_format
        assert first.config.data.source == str(out / "labels/train.jsonl")
        assert ppo.config.data.source == str(out / "labels/prompts_train.jsonl")
        assert pipeline.labels is not None
    assert ppo.config.train.total_steps <= 2 and first.config.train.total_steps <= 2  # the smoke form is tiny


def test_adlf_composite_reward_reads_the_reward_stage(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    ppo = multistage.load_pipeline("adlf_pipeline").stages[-1]
    assert ppo.config.reward["composite"]["external"] == {"model": "runs/adlf_pipeline/reward/export"}
    assert ppo.config.model.path == "runs/adlf_pipeline/sft/export"


def write_pipeline(path: Path, stages, **extra) -> Path:
    values = {"output_dir": "runs/p", "model": {"path": None}, "train": {"total_steps": 2},
              "data": {"max_length": 32, "batch_size": 2},
              "pipeline": {"labels": {"prompts": {"templates": ["{} ?"], "subjects": list("abcdefgh")}},
                           "stages": stages}, **extra}
    path.write_text(json.dumps(values))
    return path


@pytest.mark.parametrize(("stages", "extra", "message"), [
    (["sft", "ppo"], {}, r"stage ppo \(ppo\): method ppo needs a reward and no reward stage comes before it: add a "
                         r"reward stage earlier in pipeline.stages, or give the stage reward: \{model: DIR\}"),
    (["sft", {"name": "ppo", "method": "ppo", "config": {"reward": {"model": "stage:rm"}}}], {},
     r"stage ppo \(ppo\): 'stage:rm' names no earlier stage \(earlier: sft\)"),
    (["sft", "sft"], {}, r"pipeline.stages\[1\].name 'sft' is given twice"),
    (["sft", "dpo"], {"pipeline": {"labels": {"prompts": {"templates": ["{} ?"], "subjects": list("abcd")},
                                              "format": "scored"}, "stages": ["sft", "dpo"]}},
     r"stage dpo \(dpo\): method dpo cannot train on the labels' scored records \(it takes pairs\)"),
    (["sft", "bogus"], {}, r"pipeline.stages\[1\].method must be one of"),
    (["sft"], {"pipeline": {"stages": ["sft"]}},
     r"stage sft \(sft\): data.source is not set and the pipeline has no labels section"),
    (["sft"], {"pipeline": {"labels": {"prompts": {"templates": ["{} ?"], "subjects": list("abcd")}},
                            "stages": ["sft"], "keep_checkpoints": "no"}},
     r"pipeline.keep_checkpoints must be true or false, got 'no'"),
    (["sft"], {"export": False, "pipeline": {"labels": {"prompts": {"templates": ["{} ?"], "subjects": list("abcd")}},
                                             "stages": ["sft"], "keep_checkpoints": False}},
     r"pipeline.keep_checkpoints: false deletes a finished stage's checkpoints, and sft has export: false"),
])
def test_bad_stage_wiring_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, stages, extra, message):
    monkeypatch.chdir(tmp_path)
    config = write_pipeline(tmp_path / "p.yaml", stages, **extra)
    assert main(["pipeline", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert pytest.importorskip("re").search(message, err), err
    assert not (tmp_path / "runs").exists()


def test_train_on_a_pipeline_file_names_the_pipeline_command(capsys):
    """``jaxalign train sft --config production_pipeline`` is a pipeline's file given to the one-run command:
    the error says which command runs it, not which keys a single run lacks."""
    assert main(["train", "sft", "--config", "production_pipeline"]) == 2
    error = capsys.readouterr().err
    assert "is a pipeline" in error and "jaxalign pipeline --config production_pipeline" in error
    assert "unknown key" not in error


def test_a_run_presets_name_runs_its_pipeline():
    """ADLF's run preset is ``adlf`` (one method at a time) and its pipeline ``adlf_pipeline``: ``jaxalign pipeline
    --config adlf`` runs the pipeline, as ``--config production`` does ``production_pipeline``. A preset with neither
    a pipeline section nor a pipeline of its name is refused, naming the file."""
    for name in ("adlf", "production"):
        pipeline = multistage.load_pipeline(name)
        assert pipeline.source.endswith(f"{name}_pipeline.yaml")
        assert pipeline.stages == multistage.load_pipeline(f"{name}_pipeline").stages
    with pytest.raises(ValueError, match=r"sentiment\.yaml: no pipeline: section .*describes pipeline files$"):
        multistage.load_pipeline("sentiment")


def test_a_bad_override_of_a_pipeline_is_named_not_the_preset(capsys):
    """As ``jaxalign train`` does: a value the command line gave (for every stage, or one stage's) is blamed on
    the override, not on the preset file that is fine without it."""
    assert main(["pipeline", "--config", "production_pipeline", "data.batch_size=-1", "--print-config"]) == 2
    assert capsys.readouterr().err == ("jaxalign pipeline: error: data.batch_size=-1 (command line): stage sft (sft): "
                                       "data: DataConfig: batch_size must be a positive int, got -1\n")
    with pytest.raises(ValueError, match=r"^sft/train\.optimizer\.restarts=2 \(command line\): stage sft \(sft\): "
                                         r"train: OptimizerConfig\.restarts=2 is used only by schedule "):
        multistage.load_pipeline("production_pipeline", ["ppo/train.total_steps=3", "sft/train.optimizer.restarts=2"])
