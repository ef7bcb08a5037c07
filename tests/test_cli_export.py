"""``jaxalign export`` as users run it: a run directory to GGUF (read back by transformers), a reward model to
ONNX, a doctor to HF and GGUF, the refusals before any work, and the command from another directory."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxalign import models
from jaxalign.cli import main
from tests.models.conftest import V, make_hf_model
from tests.models.test_gguf_export import byte_level_tokenizer, chat_ids, stored_weights

ROOT = Path(__file__).resolve().parents[1]
UMASK = os.umask(0o022)
os.umask(UMASK)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished run's output directory: run.json and export/ (a tiny Llama with a byte-level tokenizer)."""
    run = tmp_path_factory.mktemp("export_cli") / "runs" / "dpo"
    make_hf_model("llama_tied_3_layers").save_pretrained(run / "export")
    byte_level_tokenizer().save_pretrained(run / "export")
    (run / "run.json").write_text(json.dumps({"config": {"method": "dpo"}}))
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "config.json").write_text(json.dumps({"config": {}}))  # Orbax's run metadata
    return run


def export(capsys, *args) -> tuple[int, str, str]:
    status = main(["export", *map(str, args)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_run_to_gguf_read_by_transformers_and_refused_twice(run_dir, tmp_path, capsys):
    output = tmp_path / "model-q8_0.gguf"
    status, out, err = export(capsys, run_dir, "--format", "gguf", "--quant", "q8_0", "--output", output)
    assert status == 0, err
    assert "exporting causal LM" in err and f"wrote {output}" in out
    assert stat.S_IMODE(output.stat().st_mode) == 0o666 & ~UMASK, "readable by a server running as another user"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=output.name, dtype=torch.float32)
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=output.name)
    policy = models.load_hf(run_dir / "export")
    ids = chat_ids(their_tokenizer)
    assert ids == chat_ids(byte_level_tokenizer())
    with torch.no_grad():
        read = theirs(torch.tensor([ids])).logits.numpy()[0]
    expected = np.asarray(stored_weights(policy, "q8_0")(jnp.asarray([ids]))[0])[0]
    np.testing.assert_allclose(read, expected, atol=1e-3, rtol=0)

    capsys.readouterr()  # transformers' loading bars
    before = output.stat().st_mtime_ns
    status, _, err = export(capsys, run_dir, "--format", "gguf", "--output", output)
    assert status == 2 and "already exists" in err and "--overwrite" in err and err.count("\n") == 1
    assert output.stat().st_mtime_ns == before
    status, _, err = export(capsys, run_dir / "checkpoints", "--format", "gguf", "--output", output, "--overwrite")
    assert status == 0 and models.load_gguf(output)[0].config.n_layers == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-q8_0.gguf"], "no temporary files"


@pytest.mark.parametrize(("args", "message"), [
    (["--format", "safetensors"], "--format 'safetensors' is not one of gguf, onnx, hf"),
    (["--format", "gguf", "--quant", "q3_x"], "--quant 'q3_x' is not one of f16, bf16, q8_0, q4_0, q4_k_m"),
    (["--format", "gguf", "--int8"], "--int8 is for --format onnx"),
    (["--format", "onnx", "--quant", "q8_0"], "--quant is for --format gguf"),
    (["--format", "onnx", "--output-name", "x"], "unrecognized arguments"),
])
def test_bad_requests_fail_before_loading(run_dir, tmp_path, capsys, monkeypatch, args, message):
    def no_load(*_, **__):
        raise AssertionError("a model was loaded before the request was checked")

    monkeypatch.setattr("jaxalign.methods.export.load_source", no_load)
    output = tmp_path / ("x.onnx" if "onnx" in args else "x.gguf")
    if "--output-name" in args:
        with pytest.raises(SystemExit):
            export(capsys, run_dir, *args, "--output", output)
        assert message in capsys.readouterr().err
        return
    status, _, err = export(capsys, run_dir, *args, "--output", output)
    assert status == 2 and message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_sources_that_are_no_model_are_named(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hi")
    status, _, err = export(capsys, tmp_path / "notes", "--format", "gguf", "--output", tmp_path / "x.gguf")
    assert status == 2 and "is no model" in err
    status, _, err = export(capsys, tmp_path / "missing", "--format", "gguf", "--output", tmp_path / "x.gguf")
    assert status == 2 and "no such file or directory" in err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    status, _, err = export(capsys, tmp_path / "run", "--format", "gguf", "--output", tmp_path / "x.gguf")
    assert status == 2 and "run.json: not a run's record (KeyError: 'config')" in err
    config = {"method": "dpo", "output_dir": "run", "data": {"source": "pairs.jsonl"}, "train": {"total_steps": 1}}
    (tmp_path / "run" / "run.json").write_text(json.dumps({"config": config}))
    status, _, err = export(capsys, tmp_path / "run", "--format", "gguf", "--output", tmp_path / "x.gguf")
    assert status == 2 and "with neither an export/ directory nor a finished checkpoint" in err
    config["method"] = "reward"
    (tmp_path / "run" / "run.json").write_text(json.dumps({"config": config}))
    status, _, err = export(capsys, tmp_path / "run", "--format", "onnx", "--output", tmp_path / "x.onnx")
    assert status == 2 and "reward run without an export/ directory" in err
    status, _, err = export(capsys, tmp_path / "notes" / "readme.txt", "--format", "gguf", "--output",
                            tmp_path / "x.gguf")
    assert status == 2 and "must be a .gguf file" in err


def test_architecture_gguf_cannot_express_is_refused(tmp_path, capsys, monkeypatch):
    directory = tmp_path / "mistral"
    make_hf_model("mistral_window").save_pretrained(directory)
    byte_level_tokenizer().save_pretrained(directory)
    capsys.readouterr()

    def no_load(*_, **__):
        raise AssertionError("the model was loaded before its architecture was checked")

    monkeypatch.setattr("jaxalign.methods.export.load_source", no_load)
    status, _, err = export(capsys, directory, "--format", "gguf", "--output", tmp_path / "m.gguf")
    assert status == 2 and "sliding attention window" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mistral"]


def test_reward_model_to_onnx_scores_and_refuses_gguf(tmp_path, capsys):
    import onnxruntime as ort

    lm = models.load_hf(_saved_llama(tmp_path / "base"))
    reward_model = models.RewardModel(lm, pooling="mean", rngs=nnx.Rngs(4))
    directory = models.save_reward_model(tmp_path / "reward", reward_model, models.load_hf(tmp_path / "base"),
                                         byte_level_tokenizer(), gain=1.5, bias=-0.25)
    status, _, err = export(capsys, directory, "--format", "gguf", "--output", tmp_path / "r.gguf")
    assert status == 2 and "is a reward model" in err
    status, _, err = export(capsys, directory, "--format", "onnx", "--output", tmp_path / "reward.onnx")
    assert status == 0, err
    session = ort.InferenceSession(str(tmp_path / "reward.onnx"), providers=["CPUExecutionProvider"])
    tokens = np.random.default_rng(0).integers(0, V, size=(2, 6))
    mask = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    rewards, normalized = session.run(None, {"input_ids": tokens, "attention_mask": mask})
    loaded, info = models.load_reward_model(directory)
    expected = np.asarray(loaded(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(rewards, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(normalized, 1.5 * expected - 0.25, atol=1e-4, rtol=0)


def test_doctor_to_hf_with_its_value_head_and_to_gguf(tmp_path, capsys):
    lm = models.load_hf(_saved_llama(tmp_path / "base"))
    doctor = models.CausalLMWithValueHead(lm, rngs=nnx.Rngs(5))
    directory = models.save_doctor(tmp_path / "doctor", doctor, byte_level_tokenizer(), dimension="safety")
    status, _, err = export(capsys, directory, "--format", "hf", "--output", tmp_path / "copy")
    assert status == 0, err
    assert stat.S_IMODE((tmp_path / "copy").stat().st_mode) == 0o777 & ~UMASK
    copied, _, card = models.load_doctor(tmp_path / "copy")
    assert card["dimension"] == "safety"
    np.testing.assert_array_equal(np.asarray(copied.value_head.kernel[...]), np.asarray(doctor.value_head.kernel[...]))
    status, _, err = export(capsys, directory, "--format", "gguf", "--output", tmp_path / "doctor.gguf")
    assert status == 0, err
    patient_side, _ = models.load_gguf(tmp_path / "doctor.gguf")
    ids = chat_ids(byte_level_tokenizer())
    np.testing.assert_allclose(np.asarray(patient_side(jnp.asarray([ids]))[0]),
                               np.asarray(stored_weights(lm, "f16")(jnp.asarray([ids]))[0]), atol=1e-4, rtol=0)
    status, _, err = export(capsys, directory, "--format", "onnx", "--output", tmp_path / "d.onnx")
    assert status == 2 and "is a TFPO doctor" in err


def _saved_llama(directory: Path) -> Path:
    make_hf_model("llama").save_pretrained(directory)
    byte_level_tokenizer().save_pretrained(directory)
    return directory


def test_the_command_from_another_directory(run_dir, tmp_path):
    """As docs/export.md writes it: the console entry point, relative paths, another working directory."""
    workdir = run_dir.parent.parent  # holds runs/dpo
    command = [sys.executable, "-m", "jaxalign.cli", "export", "runs/dpo", "--format", "hf", "--output", "hf-copy"]
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "wrote hf-copy" in done.stdout
    copy = models.load_hf(workdir / "hf-copy")
    assert copy.config.same_architecture(models.load_hf(run_dir / "export").config)
    assert transformers.AutoTokenizer.from_pretrained(workdir / "hf-copy").chat_template is not None


def test_docs_onnx_decode_loop_runs_as_written(run_dir, tmp_path, monkeypatch, capsys):
    """docs/export.md's ONNX Runtime decode loop, run as written in a directory holding its two paths."""
    from jaxalign.models.onnx_export import save_onnx

    text = (ROOT / "docs" / "export.md").read_text()
    code = text.split("A\ndecode loop in ONNX Runtime:\n\n```python\n", 1)[1].split("```", 1)[0]
    export_dir = tmp_path / "runs" / "sentiment" / "dpo" / "export"
    export_dir.parent.mkdir(parents=True)
    shutil.copytree(run_dir / "export", export_dir)
    save_onnx(models.load_hf(export_dir), tmp_path / "dpo.onnx", progress=False)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    namespace = {}
    exec(compile(code, "docs/export.md", "exec"), namespace)  # noqa: S102 (the documented example itself)
    printed = capsys.readouterr().out
    from jaxalign.rollout import Sampler, SamplingParams

    tokenizer, prompt = namespace["tokenizer"], jnp.asarray(namespace["ids"])
    params = SamplingParams(max_new_tokens=32, temperature=0.0, stop_token_ids=(tokenizer.eos_token_id,))
    out = Sampler(models.load_hf(export_dir)).generate(prompt, jnp.ones_like(prompt), key=jax.random.key(0),
                                                       params=params)
    greedy = [int(t) for t in np.asarray(out.tokens)[0][np.asarray(out.response_mask)[0]]]
    assert greedy, "jaxalign generated something to compare"
    expected = "".join(tokenizer.decode([t]) for t in greedy if t != tokenizer.eos_token_id)
    assert printed == expected


def test_a_checkpoint_named_by_a_relative_path(run_dir, tmp_path, capsys, monkeypatch):
    """``jaxalign export runs/sft/checkpoints/1`` from the directory holding runs/: Orbax refuses relative paths, so
    the checkpoint's parameters must still be found (and reach the export); a step without a train state is named."""
    import orbax.checkpoint as ocp

    run = tmp_path / "runs" / "sft"
    config = {"method": "sft", "output_dir": str(run), "model": {"path": str(run_dir / "export")},
              "data": {"source": "pairs.jsonl"}, "train": {"total_steps": 1}}
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"config": config}))
    base = models.load_hf(run_dir / "export")
    trained = jax.tree.map(lambda w: w * 2, nnx.to_pure_dict(nnx.state(base, nnx.Param)))
    # The layout jaxalign.train.checkpoint writes: checkpoints/<step>/state holding the train state's params.
    ocp.PyTreeCheckpointer().save(run / "checkpoints" / "1" / "state", {"params": trained})
    monkeypatch.chdir(tmp_path)
    status, out, err = export(capsys, "runs/sft/checkpoints/1", "--format", "hf", "--output", "hf-step1")
    assert status == 0, err
    assert "wrote hf-step1" in out
    exported = nnx.to_pure_dict(nnx.state(models.load_hf(tmp_path / "hf-step1"), nnx.Param))
    for got, want in zip(jax.tree.leaves(exported), jax.tree.leaves(trained), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    (run / "checkpoints" / "2").mkdir()
    status, _, err = export(capsys, "runs/sft/checkpoints/2", "--format", "hf", "--output", "hf-step2")
    assert status == 2
    assert err.splitlines()[-1] == ("jaxalign export: error: runs/sft/checkpoints/2/state: no train state that Orbax "
                                    "can read (a damaged checkpoint?)")
