"""The offline trainers end to end on a tiny Llama and a word-level ChatML tokenizer: SFT (full and LoRA),
reward model (pairs, groups), DPO (reference on the fly, precomputed, LoRA base, reference-free), configs,
presets, resume, exports that load back."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxalign import data, models
from jaxalign.eval import RewardModelJudge
from jaxalign.methods import common, pipeline, recipe

PAIRS = [("Hi", "sky blue .", "Go away ."), ("sky ?", "blue .", "away"), ("Go", "Hi .", "away away ."),
         ("Hi ?", "blue sky", "Go away"), ("away ?", "Hi Hi", "Go"), ("blue", "sky .", "away .")]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps({
        "prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
        "rejected": [{"role": "assistant", "content": r}], "margin": 0.5 + i / 10}) + "\n"
        for i, (p, c, r) in enumerate(PAIRS)))
    return path


def config(checkpoint, source, tmp_path, method, *overrides, **extra):
    values = {"method": method, "output_dir": str(tmp_path / method), "model": {"path": str(checkpoint)},
              "data": {"source": str(source), "batch_size": 2, "max_length": 32},
              "train": {"total_steps": 3, "optimizer": {"learning_rate": 1e-3},
                        "log": {"progress_bar": False, "tensorboard": False}},
              "normalize_samples": 4, "normalize_max_new_tokens": 3, **extra}
    return recipe.load_run_config(values, list(overrides))


def test_sft_on_chosen_side_trains_exports_and_plots(checkpoint, pairs_file, tmp_path):
    run_config = config(checkpoint, pairs_file, tmp_path, "sft", f"eval_data.source={pairs_file}",
                        "eval_data.max_length=32", "eval_data.batch_size=4")
    result = pipeline.run(run_config)
    out = Path(run_config.output_dir)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert (out / "metrics.png").stat().st_size > 0 and (out / "run.json").is_file()
    assert result.eval_metrics["perplexity"] == pytest.approx(np.exp(result.eval_metrics["loss"]))
    reloaded = models.load_hf(out / "export")
    tokens = np.array([[2, 5, 6, 7]], np.int32)
    np.testing.assert_allclose(reloaded(tokens)[0], result.model(tokens)[0], atol=1e-5)


def test_dpo_reference_modes_agree_at_start(checkpoint, pairs_file, tmp_path):
    """On-the-fly, precomputed and (zero-initialised) LoRA-base references all give the DPO loss ln 2 at
    step 1, where the policy equals its reference."""
    first = {}
    for reference, extra in (("model", []), ("precomputed", []),
                             ("lora_base", ["model.lora={rank: 2, alpha: 4, targets: [q_proj, v_proj]}"])):
        run_config = config(checkpoint, pairs_file, tmp_path / reference, "dpo", f"reference={reference}",
                            "train.total_steps=1", *extra)
        pipeline.run(run_config)
        record = json.loads((Path(run_config.output_dir) / "metrics.jsonl").read_text().splitlines()[0])
        first[reference] = record["loss"]
    np.testing.assert_allclose(list(first.values()), np.log(2), atol=1e-5)


def test_dpo_learns_the_preferences(checkpoint, pairs_file, tmp_path):
    run_config = config(checkpoint, pairs_file, tmp_path, "dpo", "train.total_steps=6", "loss.beta=0.5",
                        f"eval_data.source={pairs_file}", "eval_data.batch_size=6", "eval_data.max_length=32")
    result = pipeline.run(run_config)
    assert result.eval_metrics["rewards/accuracies"] >= 0.8
    assert result.eval_metrics["loss"] < np.log(2)


def test_reference_free_simpo(checkpoint, pairs_file, tmp_path):
    run_config = config(checkpoint, pairs_file, tmp_path, "dpo", "loss.loss_type=simpo", "reference=none")
    pipeline.run(run_config)
    assert (Path(run_config.output_dir) / "export" / "config.json").is_file()


def test_reward_model_normalised_and_reloaded(checkpoint, pairs_file, tmp_path):
    run_config = config(checkpoint, pairs_file, tmp_path, "reward", "train.total_steps=4",
                        "loss.use_margin=true", "loss.center_coef=0.01")
    result = pipeline.run(run_config)
    normalization = result.extra["normalization"]
    assert normalization["samples"] == 4 and normalization["gain"] > 0
    reloaded, info = models.load_reward_model(Path(run_config.output_dir) / "export")
    assert info["gain"] == pytest.approx(normalization["gain"])
    tokens, mask = np.array([[2, 5, 6, 7]], np.int32), np.ones((1, 4), np.int32)
    np.testing.assert_allclose(reloaded(tokens, attention_mask=mask), result.model(tokens, attention_mask=mask),
                               atol=1e-5)
    # A reward model saved before heads had a pooling option read the last token, and loads that way.
    meta_file = Path(run_config.output_dir) / "export" / models.reward_io.META_FILE
    meta = json.loads(meta_file.read_text())
    assert meta.pop("pooling") == "last"
    meta_file.write_text(json.dumps(meta))
    assert models.load_reward_model(meta_file.parent)[1]["pooling"] == "last"


def test_curriculum_orders_by_length_and_margin(checkpoint, pairs_file):
    tokenizer = data.load_tokenizer(checkpoint)
    dataset = data.build_dataset(data.DataConfig(str(pairs_file), max_length=32), tokenizer)
    by_length = common.curriculum_order(dataset, "length")
    assert list(by_length.lengths) == sorted(dataset.lengths)
    by_margin = common.curriculum_order(dataset, "score")
    margins = [e.values["margin"] for e in by_margin.examples]
    assert margins == sorted(margins, reverse=True)


def test_config_errors_name_the_key(tmp_path, pairs_file):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['totl_steps'\]"):
        recipe.load_run_config({"method": "sft", "output_dir": "x", "data": {"source": "a"},
                                "train": {"totl_steps": 3}})
    with pytest.raises(ValueError, match="method is 'dpo', but the command trains 'sft'"):
        recipe.load_run_config({"method": "dpo", "output_dir": "x", "data": {"source": "a"},
                                "train": {"total_steps": 1}}, method="sft")
    with pytest.raises(FileNotFoundError, match="not a YAML file and not a preset"):
        recipe.load_run_config("no_such_preset")


@pytest.mark.parametrize("override, message", [
    ("data.max_length=abc",
     r"data.max_length=abc \(command line\): data.max_length must be an integer or null, got 'abc'"),
    ("data.shuffle=maybe", r"data.shuffle must be true or false, got 'maybe'"),
    ("data.buckets=[64, x]", r"data.buckets must be a list of integers or null, got \[64, 'x'\]"),
    ("data.on_error=ignore", r"data.on_error must be one of 'raise', 'skip', got 'ignore'"),
    ("eval_data.max_length=64",
     r"eval_data.max_length=64 \(command line\): eval_data: missing the required key 'source'"),
    ("model.lora={rank: x}", r"model.lora.rank must be an integer, got 'x'"),
    ("normalize_samples=1.5", r"normalize_samples=1.5 \(command line\): normalize_samples must be an integer, got 1.5"),
    ("data.buckets=[64, 128]",
     r"data.buckets=\[64, 128\] \(command line\): data: DataConfig: max_length 160 exceeds the largest bucket 128"),
])
def test_overrides_of_the_wrong_type_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        recipe.load_run_config("sentiment", [override], method="dpo")


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_reward_probe_fits_the_head_on_a_frozen_trunk(checkpoint, pairs_file, tmp_path, pooling):
    run_config = config(checkpoint, pairs_file, tmp_path, "reward", "freeze_backbone=true", "probe_l2=0.001",
                        f"loss.pooling={pooling}", f"eval_data.source={pairs_file}", "eval_data.max_length=32",
                        "eval_data.batch_size=4", "normalize_samples=0")
    result = pipeline.run(run_config)
    base = models.load_hf(checkpoint)
    trained = jax.tree.leaves(nnx.state(result.model.backbone, nnx.Param))
    for before, after in zip(jax.tree.leaves(nnx.state(base.model, nnx.Param)), trained, strict=True):
        np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
    fit = result.extra["probe"]
    # Six pairs, a 32-wide feature, almost no penalty: L-BFGS separates them all and converges.
    assert fit["converged"] and fit["rewards/accuracies"] == 1.0 and fit["objective_loss"] < 0.1
    # The standardisation folded into the head: scoring tokens (the eval pass) reproduces the fit exactly.
    assert result.eval_metrics["loss"] == pytest.approx(fit["objective_loss"], rel=1e-4, abs=1e-6)
    assert result.eval_metrics["rewards/margins"] == pytest.approx(fit["rewards/margins"], rel=1e-4)
    iterations = [json.loads(line) for line in (Path(run_config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert len(iterations) == fit["iterations"] and iterations[-1]["loss"] < iterations[0]["loss"]
    reloaded, info = models.load_reward_model(Path(run_config.output_dir) / "export")
    assert info["pooling"] == pooling == reloaded.reward_head.pooling
    with pytest.raises(ValueError, match="freeze_backbone applies to reward models only"):
        config(checkpoint, pairs_file, tmp_path, "dpo", "freeze_backbone=true")
    with pytest.warns(UserWarning, match="not converged after 1 L-BFGS iterations"):
        pipeline.run(config(checkpoint, pairs_file, tmp_path / "short", "reward", "freeze_backbone=true",
                           "probe_iterations=1", f"loss.pooling={pooling}", "normalize_samples=0", "export=false"))
    with pytest.raises(ValueError, match="probe_l2 must be >= 0"):
        config(checkpoint, pairs_file, tmp_path, "reward", "probe_l2=-1")


def test_overrides_read_exponent_floats_as_numbers():
    # YAML 1.1 reads 5e-5 as a string; a learning rate typed that way on the command line is the number.
    run_config = recipe.load_run_config({"method": "sft", "output_dir": "x", "data": {"source": "a"},
                                         "train": {"total_steps": 1}}, ["train.optimizer.learning_rate=5e-5"])
    assert run_config.train.optimizer.learning_rate == 5e-5


@pytest.mark.parametrize("preset, method", [("sentiment_ppo", "ppo"), ("sentiment_grpo", "grpo")])
def test_online_presets_resolve(preset, method):
    run_config = recipe.load_run_config(preset, ["train.total_steps=5"])
    assert run_config.method == method and run_config.reward and run_config.gold == "vader"
    assert run_config.sampling["max_new_tokens"] == 32


@pytest.mark.parametrize("preset", ["hh_rlhf", "pku_saferlhf", "sentiment"])
@pytest.mark.parametrize("method", ["sft", "reward", "dpo"])
def test_presets_resolve(preset, method):
    run_config = recipe.load_run_config(preset, ["train.total_steps=5"], method=method)
    assert run_config.method == method and run_config.train.total_steps == 5
    assert run_config.train.checkpoint.directory.startswith(run_config.output_dir)


@pytest.mark.parametrize("preset, dimensions, init_layers", [
    ("hh_rlhf", ("helpfulness", "harmlessness"), None), ("pku_saferlhf", ("helpfulness", "safety"), None),
    ("weak_to_strong", ("helpfulness",), 4)])
def test_doctor_presets_resolve(preset, dimensions, init_layers):
    run_config = recipe.load_run_config(preset, ["train.total_steps=5"], method="tfpo")
    assert run_config.method == "tfpo" and run_config.doctor.dimensions == dimensions
    assert run_config.doctor.init_layers == init_layers and run_config.loss.gamma == 0.1
    assert set(run_config.doctor.resolved_faces()) == set(dimensions)


def test_llmdoctor_preset_resolves_its_three_stages():
    """experiments.llmdoctor's stages: TFPO doctors, GenARM (the DPO trainer's genarm loss, no reference) and the
    weak doctor's distillation (token-level, from the embedded patient)."""
    doctor = recipe.load_run_config("llmdoctor", ["doctor.dimensions=[conciseness]"], method="tfpo")
    assert doctor.doctor.dimensions == ("conciseness",) and set(doctor.doctor.resolved_faces()) == {"conciseness"}
    genarm = recipe.load_run_config("llmdoctor", [], method="dpo")
    assert genarm.loss.loss_type == "genarm" and genarm.reference == "none" and genarm.loss.beta == 0.1
    distill = recipe.load_run_config("llmdoctor", [], method="distill")
    assert distill.train.total_steps == 64 and distill.train.optimizer.learning_rate == 1e-3
    assert distill.loss.beta == 0.0 and distill.teacher is None


def test_train_command_runs_resumes_and_refuses_mixing(checkpoint, pairs_file, tmp_path, capsys):
    from jaxalign.cli import main

    out = tmp_path / "cli_run"
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(f"output_dir: {out}\nmodel: {{path: {checkpoint}}}\n"
                         f"data: {{source: {pairs_file}, batch_size: 2, max_length: 32}}\n"
                         "train: {total_steps: 2, log: {progress_bar: false, tensorboard: false}}\n"
                         "methods: {dpo: {loss: {beta: 0.2}}}\n")
    assert main(["train", "dpo", "--config", str(yaml_file), "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["method"] == "dpo" and printed["loss"]["beta"] == 0.2 and printed["loss"]["loss_type"] == "sigmoid"
    assert main(["train", "dpo", "--config", str(yaml_file)]) == 0
    assert "trained dpo for 2 steps" in capsys.readouterr().out
    # The directory now holds checkpoints: a second run without --resume is refused, with --resume it
    # continues to the new total.
    assert main(["train", "dpo", "--config", str(yaml_file), "train.total_steps=3"]) == 2
    assert "error" in capsys.readouterr().err
    # The warning names the one changed setting once: not --resume itself, not the run config's copy of train.
    with pytest.warns(UserWarning, match=r"resuming step 2 with a config that differs in \['total_steps'\]$"):
        assert main(["train", "dpo", "--config", str(yaml_file), "train.total_steps=3", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert main(["train", "dpo", "--config", str(yaml_file), "loss.bta=1", "--resume"]) == 2
    assert "bta" in capsys.readouterr().err


def test_multi_dimensional_reward_model_on_pku_rows(checkpoint, tmp_path):
    rows = [{"prompt": p, "response_0": c, "response_1": r, "better_response_id": i % 2, "safer_response_id": 1 - i % 2}
            for i, (p, c, r) in enumerate(PAIRS)]
    source = tmp_path / "pku.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    # Normalisation on, as the pku_saferlhf preset leaves it: one gain and bias per dimension reach the export.
    run_config = config(checkpoint, source, tmp_path, "reward", "data.text_as_chat=true", "normalize_samples=4",
                        "loss.dimension_weights=[1.0, 0.5]")
    result = pipeline.run(run_config)
    assert result.extra["dimensions"] == ["helpfulness", "safety"] and result.extra["num_objectives"] == 2
    reward_model, info = models.load_reward_model(Path(run_config.output_dir) / "export")
    assert info["num_objectives"] == 2 and info["metadata"]["dimensions"] == ["helpfulness", "safety"]
    assert info["gain"] == result.extra["normalization"]["gain"] and len(info["gain"]) == len(info["bias"]) == 2
    assert info["dimension_weights"] == [1.0, 0.5]  # the training weights are the default combination
    judge = RewardModelJudge(reward_model, gain=info["gain"], bias=info["bias"],
                             dimension_weights=info["dimension_weights"])
    tokens = np.array([[1, 2, 3, 4]], np.int32)
    raw = np.asarray(reward_model(tokens, attention_mask=np.ones_like(tokens)), np.float64)
    expected = (raw * info["gain"] + info["bias"]) @ [1.0, 0.5]
    np.testing.assert_allclose(judge.score_tokens(tokens, np.ones_like(tokens)), expected, rtol=1e-5)
    record = json.loads((Path(run_config.output_dir) / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"rewards/accuracies/0", "rewards/accuracies/1"} <= set(record)


def test_dpo_on_one_dimension_of_pku_rows(checkpoint, tmp_path):
    rows = [{"prompt": p, "response_0": c, "response_1": r, "better_response_id": i % 2,
             "safer_response_id": None if i == 0 else 1 - i % 2} for i, (p, c, r) in enumerate(PAIRS)]
    source = tmp_path / "pku.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"holds 'preference_group' records \(grouped pairs: pick one dimension "
                                         r"with data.dimension, one of \['helpfulness', 'safety'\]\)"):
        pipeline.run(config(checkpoint, source, tmp_path, "dpo", "data.text_as_chat=true"))
    # The preset's DPO section picks the safety pairs, and the held-out data follows.
    preset = recipe.load_run_config("pku_saferlhf", [f"data.source={source}", f"eval_data.source={source}"],
                                    method="dpo")
    assert preset.data.dimension == preset.eval_data.dimension == "safety"
    with pytest.raises(ValueError, match=r"loss.dimension_weights / num_objectives are for a reward head per "
                                         r"dimension of grouped data; .* gives 'preference' records"):
        pipeline.run(config(checkpoint, source, tmp_path, "reward", "data.text_as_chat=true", "data.dimension=safety",
                           "loss.dimension_weights=[1.0, 1.0]"))
    with pytest.raises(ValueError, match=r"eval_data .*pku.jsonl holds 'preference_group' records, but method dpo "
                                         r"trains on 'preference' ones here .*set eval_data.dimension to one of "
                                         r"\['helpfulness', 'safety'\]"):
        pipeline.run(config(checkpoint, source, tmp_path, "dpo", "data.text_as_chat=true", "data.dimension=safety",
                           f"eval_data.source={source}", "eval_data.text_as_chat=true", "eval_data.dimension=null"))
    run_config = config(checkpoint, source, tmp_path, "dpo", "data.text_as_chat=true", "data.dimension=safety",
                        "train.total_steps=1")
    pipeline.run(run_config)
    run = json.loads((Path(run_config.output_dir) / common.RUN_FILE).read_text())
    assert run["examples"] == len(PAIRS) - 1  # the row without a safety preference is left out, and noted
    assert "groups_without_safety: 1" in run["data_reports"][0]
    with pytest.raises(ValueError, match=r"data.dimension='honesty': no pair of .*pku.jsonl has that dimension "
                                         r"\(it has \['helpfulness', 'safety'\]\)"):
        pipeline.run(config(checkpoint, source, tmp_path, "dpo", "data.text_as_chat=true", "data.dimension=honesty"))


def test_held_out_data_of_another_kind_fails_before_training(checkpoint, pairs_file, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": [{"role": "user", "content": "Hi"}]}) + "\n")
    run_config = config(checkpoint, pairs_file, tmp_path, "dpo", f"eval_data.source={prompts}")
    with pytest.raises(ValueError, match=r"eval_data .*prompts.jsonl holds 'prompt' records, but method dpo trains "
                                         r"on 'preference' ones"):
        pipeline.run(run_config)
    assert not Path(run_config.output_dir).exists()  # a refused run leaves nothing behind


def test_reward_use_margin_without_margins_is_a_clear_error(checkpoint, tmp_path):
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}],
                                          "chosen": [{"role": "assistant", "content": c}],
                                          "rejected": [{"role": "assistant", "content": r}]}) + "\n"
                              for p, c, r in PAIRS))
    with pytest.raises(ValueError, match="use_margin=True but the batches carry no 'margin'"):
        pipeline.run(config(checkpoint, source, tmp_path, "reward", "loss.use_margin=true", "normalize_samples=0"))


def test_best_of_n_records_never_train_as_pairs(checkpoint, pairs_file, tmp_path):
    """lm-human-preferences records under a preset's bradley_terry loss are refused (it would read samples 0 and
    1 as chosen/rejected and ignore ``best``); with loss.loss=best_of_n (the default without a preset) they train."""
    rows = [{"query": p, "sample0": c, "sample1": r, "sample2": "Hi", "best": (i + 1) % 3}
            for i, (p, c, r) in enumerate(PAIRS)]
    source = tmp_path / "bon.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"best-of-N records .* loss.loss=bradley_terry .* set loss.loss=best_of_n"):
        pipeline.run(config(checkpoint, source, tmp_path, "reward", "loss.loss=bradley_terry"))
    assert not (tmp_path / "reward").exists()
    result = pipeline.run(config(checkpoint, source, tmp_path, "reward", "normalize_samples=0", "export=false"))
    steps = [json.loads(line) for line in (Path(result.config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 3 and all(np.isfinite(step["loss"]) for step in steps)
    with pytest.raises(ValueError, match="loss.loss=best_of_n needs best-of-N records"):
        pipeline.run(config(checkpoint, pairs_file, tmp_path / "pairs", "reward", "loss.loss=best_of_n"))


@pytest.mark.parametrize(("override", "message"), [
    ("model.remat=dots_saveable", r"model.remat must be one of \('none', 'full', 'dots', 'dots_no_batch'\), "
                                  r"got 'dots_saveable'"),
    ("model.compute_dtype=float16", "model.compute_dtype=float16 does not run on CPU"),
    ("model.param_dtype=float8", "model.param_dtype must be one of"),
    ("model.attention=flash", r"model.attention must be one of \('auto', 'grouped', 'cudnn'\), got 'flash'"),
    ("train.log.wandb_project=x", r"wandb_project='x' needs Weights & Biases, which is not installed: "
                                  r"pip install 'jaxalign\[wandb\]'"),
])
def test_settings_that_cannot_run_fail_before_any_work(override, message, capsys, monkeypatch, tmp_path):
    """Refused while the config is read, against the run config's own key: no model or data is loaded."""
    from jaxalign.cli import main

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    monkeypatch.setattr(pipeline, "load_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    status = main(["train", "dpo", "--config", "hh_rlhf", f"output_dir={tmp_path / 'run'}", override])
    error = capsys.readouterr().err
    assert status == 2 and re.search(message, error), error
    assert "config.json" not in error and not (tmp_path / "run").exists()


def test_recipe_docstring_example_trains_dpo_with_trls_sft_term(checkpoint, pairs_file, tmp_path):
    """``loss.loss_type=[sigmoid,sft]`` (the recipe docstring's example, TRL's spelling of RPO) trains."""
    assert "loss.loss_type=[sigmoid,sft]" in recipe.__doc__
    run_config = config(checkpoint, pairs_file, tmp_path, "dpo", "loss.loss_type=[sigmoid,sft]",
                        "loss.loss_weights=[1.0, 0.5]", "export=false")
    pipeline.run(run_config)
    record = json.loads((Path(run_config.output_dir) / "metrics.jsonl").read_text().splitlines()[-1])
    assert "nll_loss" in record and np.isfinite(record["loss"])


def test_a_run_without_export_exports_its_checkpoint_as_its_own_export(checkpoint, pairs_file, tmp_path, capsys):
    """``jaxalign export RUN`` on a LoRA DPO run whose export/ is gone (a run stopped before it finished) rebuilds
    the model from run.json and the newest Orbax checkpoint: the HF directory it writes equals the run's own
    export (the same merge of the same adapters), and an older step is reachable by its directory."""
    from jaxalign.cli import main

    run_config = config(checkpoint, pairs_file, tmp_path, "dpo", "model.lora={rank: 2, alpha: 4}",
                        "train.checkpoint.save_every_steps=2", "train.checkpoint.async_save=false")
    pipeline.run(run_config)
    out = Path(run_config.output_dir)
    (out / "export").rename(tmp_path / "finished_export")
    capsys.readouterr()
    assert main(["export", str(out), "--format", "hf", "--output", str(tmp_path / "restored")]) == 0
    assert "dpo run" in capsys.readouterr().err
    tokens = np.array([[2, 5, 6, 7, 9]], np.int32)
    finished, restored = models.load_hf(tmp_path / "finished_export"), models.load_hf(tmp_path / "restored")
    np.testing.assert_allclose(restored(tokens)[0], finished(tokens)[0], atol=1e-6, rtol=0)
    step2 = ["export", str(out / "checkpoints" / "2"), "--format", "hf", "--output", str(tmp_path / "step2")]
    assert main(step2) == 0
    assert main(["export", str(out / "checkpoints" / "9"), "--format", "hf", "--output", str(tmp_path / "x")]) == 2
    assert "no finished checkpoint at step 9 (the run has steps 2, 3)" in capsys.readouterr().err
