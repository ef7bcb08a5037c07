"""Scalar human scores as rewards: a reward model regressed on ADLF records' scores (MSE or Gaussian NLL, scores
normalised and restored on export), reward heads with a hidden layer and dropout that load back and export, and
score-weighted SFT (a weighted mean, exact under gradient accumulation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxalign import data, models
from jaxalign.eval.judges import load_reward_judge
from jaxalign.methods import common, pipeline, recipe, sft
from jaxalign.train import TrainStep
from tests.train.conftest import python_env

# (question, answer, score): the answer decides the score.
QUESTIONS = ["What color is the sky ?", "Hi !", "What is blue ?", "Go", "The sky is", "What ?"]
ANSWERS = {"blue .": 9.0, "green .": 2.0, "yes": 7.0, "no": 3.0}


def adlf_rows(extra_scores: dict | None = None) -> list[dict]:
    rows = []
    for index, question in enumerate(QUESTIONS):
        for answer, score in ANSWERS.items():
            if (index + len(answer)) % 3 == 0:
                continue  # not every pair: questions see different answers
            rows.append({"conversation": [{"role": "human", "content": question},
                                          {"role": "assistant", "content": answer}],
                         "meta_eval_score": score, "score_reason": f"{answer!r} to {question!r}"})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_config(checkpoint, source, tmp_path, method, *overrides):
    values = {"method": method, "output_dir": str(tmp_path / method), "model": {"path": str(checkpoint)},
              "data": {"source": str(source), "batch_size": 4, "max_length": 32},
              "train": {"total_steps": 3, "optimizer": {"learning_rate": 1e-3},
                        "log": {"progress_bar": False, "tensorboard": False}},
              "normalize_samples": 0}
    return recipe.load_run_config(values, list(overrides))


def losses_of(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_regression_reward_model_trains_from_the_command_line(checkpoint, tmp_path):
    """As docs/offline-trainers.md writes it: the console command, relative paths, another working directory."""
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    os.symlink(checkpoint, work / "tiny")
    rows = adlf_rows()
    write_rows(work / "data" / "adlf.jsonl", rows)
    (work / "reward.yaml").write_text(
        "output_dir: runs/scores\nmodel: {path: tiny}\n"
        f"data: {{source: data/adlf.jsonl, batch_size: {len(rows)}, max_length: 32}}\n"
        "train: {total_steps: 8, optimizer: {learning_rate: 3.0e-3, warmup_steps: 0}, "
        "log: {progress_bar: false, tensorboard: false}}\n")
    command = [str(Path(sys.executable).parent / "jaxalign"), "train", "reward", "--config", "reward.yaml",
               "loss.loss=regression", "model.reward_head={hidden: 16, dropout: 0.1}"]
    done = subprocess.run(command, cwd=work, env=python_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    out = work / "runs" / "scores"
    assert "trained reward for 8 steps: runs/scores" in done.stdout
    trained = losses_of(out)
    assert len(trained) == 8 and trained[-1] < 0.7 * trained[0], trained
    reward_model, info = models.load_reward_model(out / "export")
    scores = np.array([row["meta_eval_score"] for row in rows])
    assert info["head"] == {"hidden": 16, "dropout": 0.1, "activation": "tanh", "log_variance": False}
    assert info["gain"] == pytest.approx(scores.std()) and info["bias"] == pytest.approx(scores.mean())
    assert info["metadata"]["scores"] == {"mean": pytest.approx(scores.mean()), "std": pytest.approx(scores.std()),
                                          "count": len(rows), "normalized": True, "loss": "mse"}
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["loss"]["loss"] == "regression" and run["examples"] == len(rows)


def test_gaussian_nll_with_a_hidden_head_loads_back_exports_and_scores_on_the_scores_scale(checkpoint, tmp_path):
    source = write_rows(tmp_path / "adlf.jsonl", adlf_rows())
    config = run_config(checkpoint, source, tmp_path, "reward", "loss.regression=gaussian_nll",
                        "model.reward_head={hidden: 8, dropout: 0.2, activation: gelu}", "train.total_steps=2",
                        f"eval_data.source={source}")
    result = pipeline.run(config)
    head = result.model.reward_head
    assert head.log_variance and head.up_proj.kernel[...].shape == (32, 8) and head.kernel[...].shape == (8, 2)
    assert result.extra["scores"]["loss"] == "gaussian_nll" and "log_variance" in result.eval_metrics
    export = Path(config.output_dir) / "export"
    reloaded, info = models.load_reward_model(export)
    assert info["head"] == {"hidden": 8, "dropout": 0.2, "activation": "gelu", "log_variance": True}
    tokens, mask = jnp.array([[2, 5, 6, 7, 9]], jnp.int32), jnp.ones((1, 5), jnp.int32)
    raw = np.asarray(result.model(tokens, attention_mask=mask))
    np.testing.assert_allclose(reloaded(tokens, attention_mask=mask), raw, atol=1e-5)
    # Dropout only with a key, and never on a deterministic view (evaluation).
    key = jax.random.key(3)
    assert not np.allclose(reloaded(tokens, attention_mask=mask, key=key), raw, atol=1e-6)
    np.testing.assert_allclose(nnx.view(reloaded, deterministic=True)(tokens, attention_mask=mask, key=key), raw,
                               atol=1e-5)
    # The judge of the exported model scores on the scores' scale: gain·raw + bias = std·raw + mean.
    judge, _, _ = load_reward_judge(export)
    scores = np.array([r["meta_eval_score"] for r in adlf_rows()])
    assert (judge.gain, judge.bias) == (pytest.approx(scores.std()), pytest.approx(scores.mean()))
    # ONNX: the hidden layer and the log-variance column are part of the graph; its rewards are the means.
    import onnxruntime as ort

    from jaxalign.models.onnx_export import save_reward_onnx

    path = save_reward_onnx(reloaded, tmp_path / "reward.onnx", gain=info["gain"], bias=info["bias"], progress=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rewards, normalized = session.run(None, {"input_ids": np.asarray(tokens, np.int64),
                                             "attention_mask": np.asarray(mask, np.int64)})
    np.testing.assert_allclose(rewards, raw, atol=1e-4)
    np.testing.assert_allclose(normalized, scores.std() * raw + scores.mean(), atol=1e-3)


def test_held_out_evaluation_runs_without_dropout(checkpoint, tmp_path):
    """evaluate_objective measures the model, not a dropout draw: a head with dropout scores its held-out loss
    as the same head without it."""
    source = write_rows(tmp_path / "adlf.jsonl", adlf_rows())
    config = run_config(checkpoint, source, tmp_path, "reward", "loss.loss=regression")
    lm, tokenizer = common.load_pretrained(config.model)
    dataset = data.build_dataset(config.data, tokenizer)
    from jaxalign.methods import reward

    with_dropout, objective, _, dataset, _ = reward.build(
        run_config(checkpoint, source, tmp_path, "reward", "model.reward_head={hidden: 8, dropout: 0.5}"),
        lm, tokenizer, dataset)
    plain = models.RewardModel(lm, hidden=8, rngs=nnx.Rngs(0))
    nnx.update(plain, nnx.state(with_dropout))
    evaluated = common.evaluate_objective(objective, with_dropout, common.one_pass(config.data, dataset))
    expected = common.evaluate_objective(objective, plain, common.one_pass(config.data, dataset))
    assert evaluated["loss"] == pytest.approx(expected["loss"], rel=1e-6)


def test_a_frozen_trunk_fits_a_ridge_regression_head(checkpoint, tmp_path):
    source = write_rows(tmp_path / "adlf.jsonl", adlf_rows())
    config = run_config(checkpoint, source, tmp_path, "reward", "freeze_backbone=true", "loss.loss=regression",
                        f"eval_data.source={source}")
    result = pipeline.run(config)
    assert result.extra["probe"]["converged"] and result.eval_metrics["mse"] < 1.0  # below the targets' variance
    _, info = models.load_reward_model(Path(config.output_dir) / "export")
    scores = np.array([row["meta_eval_score"] for row in adlf_rows()])
    assert (info["gain"], info["bias"]) == (pytest.approx(scores.std()), pytest.approx(scores.mean()))
    with pytest.raises(ValueError, match="freeze_backbone fits a convex probe; loss.regression=gaussian_nll"):
        run_config(checkpoint, source, tmp_path, "reward", "freeze_backbone=true", "loss.regression=gaussian_nll")


@pytest.mark.parametrize("rows, overrides, message", [
    ([{"prompt": "Hi", "completion": " yes"}, {"prompt": "Go", "completion": " no"}], ["loss.loss=regression"],
     r"sft.jsonl, line 1, field 'score': has no score: loss.loss=regression fits the reward model to each "
     r"record's score"),
    ([{"prompt": "Hi", "chosen": "sky blue .", "rejected": "Go away ."}], ["loss.loss=regression"],
     r"loss.loss=regression fits a reward model to scored records .* holds 'preference' records"),
    (adlf_rows()[:4], ["loss.loss=bradley_terry"], r"holds scored records .* set loss.loss=regression"),
    (adlf_rows()[:4], ["data.score_template='Score: {score:g}'"], r"data.score_template writes each record's score"),
    ([{**row, "meta_eval_score": 5} for row in adlf_rows()[:4]], [], r"every one of the 4 training scores is 5"),
])
def test_regression_on_unfit_data_fails_before_training(checkpoint, tmp_path, rows, overrides, message):
    source = write_rows(tmp_path / "sft.jsonl", rows)
    config = run_config(checkpoint, source, tmp_path, "reward", *overrides)
    with pytest.raises(ValueError, match=message) as error:
        pipeline.run(config)
    assert "\n" not in str(error.value)
    assert not Path(config.output_dir).exists()  # refused before the run wrote anything


@pytest.mark.parametrize("override, message", [
    ("loss.regression=huber", r"loss.regression \(RewardSpec\) must be one of \('mse', 'gaussian_nll'\) or null"),
    ("loss.use_margin=true", r"loss.use_margin \(RewardSpec\) must be left at its default: it applies to "
                             r"preference losses, not to loss: regression"),
    ("model.reward_head={hidden: 0}", r"model.reward_head.hidden must be a positive int or null, got 0"),
    ("model.reward_head={dropout: 1.0}", r"model.reward_head.dropout must be in \[0, 1\), got 1.0"),
    ("model.reward_head={activation: swish}", r"model.reward_head.activation must be one of"),
    ("model.reward_head={width: 8}", r"unknown key\(s\) \['width'\] for RewardHeadSpec"),
])
def test_bad_regression_settings_are_named(override, message, tmp_path):
    values = {"method": "reward", "output_dir": str(tmp_path), "data": {"source": "x.jsonl"},
              "train": {"total_steps": 1}, "loss": {"loss": "regression"}}
    with pytest.raises(ValueError, match=message):
        recipe.load_run_config(values, [override])


def test_reward_head_settings_belong_to_reward_runs(tmp_path):
    values = {"method": "sft", "output_dir": str(tmp_path), "data": {"source": "x.jsonl"}, "train": {"total_steps": 1}}
    with pytest.raises(ValueError, match=r"model.reward_head shapes a reward model's head; method sft trains none"):
        recipe.load_run_config(values, ["model.reward_head={hidden: 8}"])
    with pytest.raises(ValueError, match="freeze_backbone fits a linear head"):
        recipe.load_run_config({**values, "method": "reward"}, ["model.reward_head={hidden: 8}",
                                                                "freeze_backbone=true"])
    with pytest.raises(ValueError, match=r"loss.regression \(RewardSpec\) must be left unset: it applies to loss: "
                                         r"regression, not bradley_terry"):
        recipe.load_run_config({**values, "method": "reward"}, ["loss.loss=bradley_terry", "loss.regression=mse"])


# --- score-weighted SFT ---------------------------------------------------------------------------------------


def sft_rows(scores: list[float]) -> list[dict]:
    answers = ["blue .", "green", "yes", "no no", "Hi", "Go away ."]
    return [{"conversation": [{"role": "human", "content": QUESTIONS[i % len(QUESTIONS)]},
                              {"role": "assistant", "content": answers[i % len(answers)]}],
             "meta_eval_score": score} for i, score in enumerate(scores)]


SCORES = [4.0, 1.0, 0.0, 2.5, 8.0, 0.5]


@pytest.fixture
def weighted(checkpoint, tmp_path):
    """A built score-weighted SFT run: (config, model, objective, dataset, extra)."""
    source = write_rows(tmp_path / "scored.jsonl", sft_rows(SCORES))
    config = run_config(checkpoint, source, tmp_path, "sft", "loss.example_weights=score")
    lm, tokenizer = common.load_pretrained(config.model)
    dataset = data.build_dataset(config.data, tokenizer)
    model, objective, _, dataset, extra = sft.build(config, lm, tokenizer, dataset)
    return config, model, objective, dataset, extra


def per_example_nll(model, dataset) -> tuple[np.ndarray, np.ndarray]:
    """Each example's summed completion NLL and its token count, one example at a time."""
    sums, counts = [], []
    for example in dataset.examples:
        sequence = example.sequences[0]
        tokens = jnp.asarray(sequence.ids[None])
        logits = np.asarray(model(tokens)[0], np.float64)[0, :-1]
        logps = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
            -1, keepdims=True)
        targets = sequence.ids[1:]
        completion = np.arange(1, len(sequence.ids)) >= sequence.prompt_length
        nll = -logps[np.arange(len(targets)), targets]
        sums.append(nll[completion].sum())
        counts.append(completion.sum())
    return np.array(sums), np.array(counts)


@pytest.mark.parametrize("average", ["token_mean", "sequence_mean"])
def test_score_weighted_sft_is_the_hand_weighted_average(weighted, average):
    config, model, _, dataset, extra = weighted
    assert extra["example_weights"]["weight_scale"] == pytest.approx(1 / 0.5)  # the smallest positive score
    objective = sft.sft_objective(average=average, example_weights="score",
                                  weight_scale=extra["example_weights"]["weight_scale"])
    sums, counts = per_example_nll(model, dataset)
    w = np.array(SCORES)
    expected = ((w * sums).sum() / (w * counts).sum() if average == "token_mean"
                else (w * sums / counts).sum() / w.sum())
    batch = next(common.one_pass(dataclass_replace(config.data, batch_size=len(SCORES)), dataset))
    (total, count), _ = objective(model, batch, key=jax.random.key(0))
    assert float(total) / float(count) == pytest.approx(expected, rel=1e-5)
    # The unweighted loss differs: the weights matter.
    (plain_total, plain_count), _ = sft.sft_objective(average=average)(model, batch, key=jax.random.key(0))
    assert float(plain_total) / float(plain_count) != pytest.approx(expected, rel=1e-3)


def dataclass_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_score_weighted_sft_is_exact_under_gradient_accumulation(weighted):
    config, model, objective, dataset, _ = weighted
    batch = next(common.one_pass(dataclass_replace(config.data, batch_size=6), dataset))
    # Micro-batches of 2 rows: their weight sums differ (4+1, 0+2.5, 8+0.5), so averaging their means would not
    # give the batch's weighted mean; only the summed (weighted loss, weight) pairs do.
    results = {}
    for micro_batches in (1, 3):
        step = TrainStep(objective, nnx.clone(model), optax.sgd(0.1), micro_batches=micro_batches)
        state, metrics = step(step.init(0), dict(batch))
        results[micro_batches] = (jax.device_get(metrics), jax.device_get(state.params))
    (one, one_params), (three, three_params) = results[1], results[3]
    assert three["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert three["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), three_params, one_params)


def test_score_weighted_sft_refuses_negative_or_missing_scores(checkpoint, tmp_path):
    source = write_rows(tmp_path / "neg.jsonl", sft_rows([1.0, 2.0, -1.0]))
    config = run_config(checkpoint, source, tmp_path, "sft", "loss.example_weights=score")
    with pytest.raises(ValueError, match=r"neg.jsonl, line 3, field 'score': is -1: loss.example_weights=score "
                                         r"needs scores >= 0"):
        pipeline.run(config)
    plain = write_rows(tmp_path / "plain.jsonl", [{"prompt": "Hi", "completion": " yes"}])
    config = run_config(checkpoint, plain, tmp_path, "sft", "loss.example_weights=score")
    with pytest.raises(ValueError, match=r"plain.jsonl, line 1, field 'score': has no score: "
                                         r"loss.example_weights=score"):
        pipeline.run(config)
    assert not Path(config.output_dir).exists()


def test_the_adlf_preset_trains_both_stages_on_scores():
    sft_run = recipe.load_run_config("adlf", [], method="sft")
    assert sft_run.loss.example_weights == "score" and sft_run.output_dir == "runs/adlf/sft"
    assert sft_run.data.format == "scored_conversation" and sft_run.data.filter.max_length == 1024
    reward_run = recipe.load_run_config("adlf", [], method="reward")
    assert reward_run.loss.loss == "regression" and reward_run.model.reward_head.hidden == 1024
    assert reward_run.model.reward_head.dropout == 0.1 and reward_run.output_dir == "runs/adlf/reward"


def test_loss_as_a_value_names_the_option_that_picks_the_loss(tmp_path):
    values = {"method": "reward", "output_dir": str(tmp_path), "data": {"source": "x.jsonl"},
              "train": {"total_steps": 1}}
    with pytest.raises(ValueError, match=r"^loss=regression \(command line\): loss is the section of reward options "
                                         r"\(known: loss, regression, .*\), not a value: write loss.loss=regression$"):
        recipe.load_run_config(values, ["loss=regression"])
    with pytest.raises(ValueError, match=r"write loss.loss_type=ipo$"):
        recipe.load_run_config({**values, "method": "dpo"}, ["loss=ipo"])
