"""Runs on a quantised base (``model.quantize``) end to end on a tiny saved Llama: every method trains its LoRA
adapters on the frozen NF4/int8 base, its frozen copies (reference, teacher, patient, probe trunk) are quantised
the same way, a run resumes exactly with checkpoints that hold no base weights, and its export is the dequantised
base with the adapters merged. Bad settings fail in one line naming the key before any weight is read."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxalign import models
from jaxalign.cli import main
from jaxalign.methods import pipeline, recipe
from tests.methods.test_online_methods import PROMPTS
from tests.methods.test_pipeline import PAIRS

NF4 = "model.quantize={type: nf4, block_size: 16}"  # the tiny model's widths (32, 64) take blocks of 16
LORA = "model.lora={rank: 2, alpha: 4, targets: [q_proj, v_proj, down_proj]}"
TOKENS = np.array([[2, 5, 6, 7, 5]], np.int32)
FACES = {"positive": "Hi sky blue .", "negative": "Go away"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    (root / "pairs.jsonl").write_text("".join(json.dumps({
        "prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
        "rejected": [{"role": "assistant", "content": r}]}) + "\n" for p, c, r in PAIRS))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n"
                                                for p in PROMPTS))
    return {"pairs": root / "pairs.jsonl", "prompts": root / "prompts.jsonl"}


def config(checkpoint, files, out: Path, method, *overrides, **extra):
    source = files["prompts" if method in ("ppo", "grpo") else "pairs"]
    values = {"method": method, "output_dir": str(out), "model": {"path": str(checkpoint)},
              "data": {"source": str(source), "batch_size": 2, "max_length": 32, "shuffle": False},
              "train": {"total_steps": 2, "optimizer": {"learning_rate": 1e-2},
                        "log": {"progress_bar": False, "tensorboard": False}},
              "normalize_samples": 0, **extra}
    if method in ("ppo", "grpo"):
        values.update(sampling={"max_new_tokens": 4, "stop_token_ids": []}, reward={"function": "vader"},
                      data={**values["data"], "batch_size": 4})
    if method == "tfpo":
        values["doctor"] = {"patient": str(checkpoint), "dimensions": ["sentiment"], "faces": {"sentiment": FACES}}
    return recipe.load_run_config(values, [NF4, *overrides])


def first_losses(out: Path, key: str = "loss") -> list[float]:
    return [json.loads(line)[key] for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_base_frozen(trained, checkpoint, block_size=16):
    """The trained model's quantised storage is exactly the checkpoint's, quantised."""
    base = models.quantize_model(models.load_hf(checkpoint), models.QuantizeConfig(type="nf4", block_size=block_size))
    expected = jax.tree.leaves(nnx.state(base, models.QuantizedWeight))
    stored = jax.tree.leaves(nnx.state(trained, models.QuantizedWeight))
    assert len(stored) == len(expected) > 0
    for before, after in zip(expected, stored, strict=True):
        np.testing.assert_array_equal(np.asarray(before), np.asarray(after))


def test_dpo_trains_resumes_exactly_and_exports_merged(checkpoint, files, tmp_path):
    """DPO with a frozen reference: policy and reference are the same quantised model at step 1 (loss ln 2); one
    step then one resumed equal two straight; checkpoints hold adapters and optimizer, not the base; the export
    is the dequantised base with the adapters merged."""
    straight = pipeline.run(config(checkpoint, files, tmp_path / "straight", "dpo", LORA))
    losses = first_losses(tmp_path / "straight")
    assert losses[0] == pytest.approx(np.log(2), abs=1e-6) and len(losses) == 2
    assert_base_frozen(straight.model, checkpoint)

    out = tmp_path / "resumed"
    pipeline.run(config(checkpoint, files, out, "dpo", LORA, "train.total_steps=1", "export=false"))
    resumed = pipeline.run(config(checkpoint, files, out, "dpo", LORA))
    np.testing.assert_allclose(first_losses(out), losses, rtol=1e-6)
    np.testing.assert_allclose(resumed.model(TOKENS)[0], straight.model(TOKENS)[0], rtol=1e-5, atol=1e-6)
    saved = [path for path in (out / "checkpoints").rglob("*") if path.is_file()]
    assert saved and not any("codes" in path.read_bytes().decode("latin-1") for path in saved
                             if path.name.startswith(("_METADATA", "_sharding", "manifest")))
    assert sum(path.stat().st_size for path in saved) < 4 * models.storage_bytes(straight.model)["quantized"] + 2e5

    export = models.load_hf(tmp_path / "straight" / "export")
    assert not models.is_quantized(export)
    merged = models.merge_for_export(straight.model)
    np.testing.assert_allclose(export(TOKENS)[0], merged(TOKENS)[0], atol=1e-5)
    np.testing.assert_allclose(export(TOKENS)[0], straight.model(TOKENS)[0], atol=1e-4)


# sft, kto and ppo take the same loading and frozen-copy paths as dpo and grpo: left out to keep the suite short.
@pytest.mark.parametrize("method, overrides", [
    ("distill", ()),
    ("tfpo", ("doctor.init_layers=1",)),
    ("grpo", ("sampling.n=2", "reference=model")),
])
def test_every_method_trains_its_adapters_on_the_quantised_base(checkpoint, files, tmp_path, method, overrides):
    """Each method runs with the quantised base, keeps it frozen and writes a float export; where the run has a
    frozen copy of the starting model, the copy is quantised too (the first step sees no difference)."""
    extra = {"teacher": str(checkpoint)} if method == "distill" else {}
    result = pipeline.run(config(checkpoint, files, tmp_path, method, LORA, "train.total_steps=1", *overrides,
                                 **extra))
    trained = result.model
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    if method == "distill":  # the teacher is the student's own quantised start: KL 0
        assert record["loss"] == pytest.approx(0.0, abs=1e-5)
    if method == "grpo":
        assert record["kl"] == pytest.approx(0.0, abs=1e-6)
    if method == "distill":
        assert_base_frozen(trained, checkpoint)
        export = models.load_hf(tmp_path / "export")
        np.testing.assert_allclose(export(TOKENS)[0], trained(TOKENS)[0], atol=1e-4)
    assert (tmp_path / "export").is_dir()


def test_reward_probe_on_a_quantised_trunk(checkpoint, files, tmp_path):
    """The probe's frozen trunk may be quantised without adapters (nothing trains it); the export writes it
    dequantised: the checkpoint's weights through nf4 and back."""
    result = pipeline.run(config(checkpoint, files, tmp_path, "reward", "freeze_backbone=true"))
    base = models.quantize_model(models.load_hf(checkpoint), models.QuantizeConfig(type="nf4", block_size=16))
    expected = jax.tree.leaves(nnx.state(models.merge_for_export(base).model, nnx.Param))
    written = jax.tree.leaves(nnx.state(result.model.backbone, nnx.Param))
    assert len(written) == len(expected) > 0
    for before, after in zip(expected, written, strict=True):
        np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
    reloaded, _ = models.load_reward_model(tmp_path / "export")
    mask = np.ones_like(TOKENS)
    np.testing.assert_allclose(reloaded(TOKENS, attention_mask=mask), result.model(TOKENS, attention_mask=mask),
                               atol=1e-4)


@pytest.mark.parametrize("override, message", [
    ("model.quantize.type=nf3", r"model.quantize.type=nf3 \(command line\): model.quantize: type must be one of"),
    ("model.quantize.blok_size=3", r"unknown key\(s\) \['blok_size'\]"),
    ("model.quantize.block_size=64", r"model.quantize.block_size=64 does not divide the input dimension 32"),
    ("model.quantize.targets=[lm_head]", r"model.quantize.targets: 'lm_head' .* outside the decoder layers"),
])
def test_bad_quantize_settings_name_the_key_before_any_weight_is_read(checkpoint, files, tmp_path, capsys,
                                                                     monkeypatch, override, message):
    monkeypatch.setattr(models.hf_io, "model_from_tensors", lambda *a, **k: pytest.fail("weights were read"))
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "model": {"path": str(checkpoint)},
                                     "data": {"source": str(files["pairs"]), "max_length": 32},
                                     "train": {"total_steps": 1}}))
    assert main(["train", "dpo", "--config", str(yaml_file), NF4, LORA, override]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and re.search(message, error[0]), error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method, extra", [("dpo", []), ("sft", []), ("ppo", []), ("tfpo", []),
                                           ("reward", ["freeze_backbone=false"])])
def test_quantize_without_adapters_is_refused_where_the_method_trains_the_base(checkpoint, files, tmp_path, method,
                                                                               extra):
    with pytest.raises(ValueError, match=rf"model.quantize \(nf4\) stores the base frozen, but method {method} "
                                         r"trains .* model.lora is null"):
        config(checkpoint, files, tmp_path, method, *extra)
