"""Token-level distillation (``jaxalign train distill``): the objective is the generalized JSD of the two models'
full logits at the completion positions (with target slots, on full rows, chunked or not); a few steps bring a
tiny student closer to a tiny teacher on held-out data; a teacher of another vocabulary or tokenizer is refused;
the command resolves its config."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
import transformers
from flax import nnx

from jaxalign import data, losses, models
from jaxalign.methods import common, distill, pipeline, recipe
from jaxalign.models import LlamaForCausalLM
from tests.models.conftest import _TINY, TINY, make_hf_model
from tests.test_cli import tiny_tokenizer

B, T = 3, 11
PROMPT = 3  # the first target is token 3: loss_mask from position 3 on


def batch_of(rng, *, slots: bool):
    lengths = np.array([T, 8, 5])
    attention = (np.arange(T) < lengths[:, None]).astype(np.int32)
    loss_mask = attention * (np.arange(T) >= PROMPT)
    batch = {"input_ids": rng.integers(0, TINY.vocab_size, (B, T)).astype(np.int32) * attention,
             "attention_mask": attention, "positions": (np.cumsum(attention, -1) - 1).clip(0).astype(np.int32),
             "loss_mask": loss_mask.astype(np.int32), "example_mask": np.array([1, 1, 0], np.int32)}
    if slots:  # K = T - 2 slots (more than any row's targets): padding slots must add nothing
        targets = np.zeros((B, T - 2), np.int32)
        for b, length in enumerate(lengths):
            targets[b, :length - PROMPT] = np.arange(PROMPT, length)
        batch["target_slots"] = targets
        batch["source_slots"] = np.where(targets > 0, targets - 1, 0).astype(np.int32)
    return batch


@pytest.fixture(scope="module")
def student():
    return LlamaForCausalLM(TINY, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def teacher():
    # Another width and depth: only the vocabulary is shared.
    return LlamaForCausalLM(dataclasses.replace(TINY, d_model=48, n_layers=3, head_dim=12), rngs=nnx.Rngs(1))


def direct(student, teacher, batch, *, beta, temperature):
    """The loss from both models' full [B, T, V] logits, at the loss_mask's targets of the valid rows."""
    kwargs = {"attention_mask": batch["attention_mask"], "positions": batch["positions"]}
    student_logits, _ = student(batch["input_ids"], **kwargs)
    teacher_logits, _ = teacher(batch["input_ids"], **kwargs)
    mask = batch["loss_mask"][:, 1:] * batch["example_mask"][:, None]
    per, _ = losses.generalized_jsd_loss(student_logits[:, :-1], teacher_logits[:, :-1], mask, beta=beta,
                                         temperature=temperature)
    total, count = losses.aggregate(per, mask)
    nll = -losses.token_logps(student_logits[:, :-1], batch["input_ids"][:, 1:], mask)
    return total, count, losses.masked_mean(nll, mask)


@pytest.mark.parametrize(("beta", "temperature", "slots", "chunk_size"),
                         [(0.0, 1.0, True, 3), (0.5, 2.0, True, None), (1.0, 1.0, False, 4), (0.3, 1.5, False, None)])
def test_objective_is_the_loss_of_the_full_logits_at_completion_positions(student, teacher, beta, temperature, slots,
                                                                          chunk_size):
    batch = batch_of(np.random.default_rng(1), slots=slots)
    objective = distill.distill_objective(beta=beta, temperature=temperature, chunk_size=chunk_size)
    (total, count), metrics = jax.jit(lambda b: objective(student, b, key=None, teacher=teacher))(batch)
    expected_total, expected_count, expected_nll = direct(student, teacher, batch, beta=beta, temperature=temperature)
    assert count == expected_count == (T - PROMPT) + (8 - PROMPT)  # the third row is epoch padding
    np.testing.assert_allclose(total, expected_total, rtol=2e-5)
    np.testing.assert_allclose(metrics["nll"], expected_nll, rtol=2e-5)
    assert 0.0 <= metrics["top1_agreement"] <= 1.0 and metrics["distill_tokens"] == count


def test_gradients_agree_across_layouts_and_chunks_and_skip_the_teacher(student, teacher):
    full, compact = batch_of(np.random.default_rng(2), slots=False), batch_of(np.random.default_rng(2), slots=True)
    graphdef, params = nnx.split(student)
    teacher_graphdef, teacher_params = nnx.split(teacher)

    def loss(params, teacher_params, batch, chunk_size):
        objective = distill.distill_objective(beta=0.5, chunk_size=chunk_size)
        (total, count), _ = objective(nnx.merge(graphdef, params), batch, key=None,
                                      teacher=nnx.merge(teacher_graphdef, teacher_params))
        return total / count

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=3)
    (reference, teacher_grad) = grad(params, teacher_params, full, None)
    for batch, chunk_size in ((compact, 2), (full, 3)):
        student_grad, _ = grad(params, teacher_params, batch, chunk_size)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), student_grad, reference)
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(reference)) > 0
    assert all(float(np.abs(g).max()) == 0 for g in jax.tree.leaves(teacher_grad))  # the teacher is a constant


def test_sums_and_counts_add_over_micro_batches(student, teacher):
    """Gradient accumulation is exact: the micro-batches' (sum, count) add up to the whole batch's."""
    batch = batch_of(np.random.default_rng(3), slots=True)
    objective = distill.distill_objective(beta=0.3, chunk_size=4)
    (total, count), _ = objective(student, batch, key=None, teacher=teacher)
    parts = [objective(student, {k: v[rows] for k, v in batch.items()}, key=None, teacher=teacher)[0]
             for rows in (slice(0, 1), slice(1, 3))]
    np.testing.assert_allclose(sum(part[0] for part in parts), total, rtol=1e-5)
    assert sum(part[1] for part in parts) == count


def test_objective_refuses_bad_options_and_a_missing_teacher(student):
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        distill.distill_objective(beta=1.2)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        distill.distill_objective(temperature=0.0)
    with pytest.raises(ValueError, match="needs the frozen teacher"):
        distill.distill_objective()(student, batch_of(np.random.default_rng(0), slots=True), key=None)


# --------------------------------------------------------------------------------------------- end to end

TEXTS = [("Hi", "sky blue ."), ("sky ?", "blue ."), ("Go", "Hi ."), ("Hi ?", "blue sky"), ("away ?", "Hi Hi"),
         ("blue", "sky ."), ("Go away", "Go Go ."), ("sky", "away blue sky .")]


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}],
                                        "completion": [{"role": "assistant", "content": c}]}) + "\n"
                            for p, c in TEXTS))
    return path


def save_teacher(directory: Path, *, vocab_size: int | None = None, tokenizer=None) -> Path:
    if vocab_size is None:
        model = make_hf_model("llama", seed=1)
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**_TINY, "vocab_size": vocab_size}))
    model.save_pretrained(directory)
    (tokenizer or tiny_tokenizer()).save_pretrained(directory)
    return directory


def run_config(checkpoint, sft_file, tmp_path, *overrides):
    values = {"method": "distill", "output_dir": str(tmp_path / "distill"), "model": {"path": str(checkpoint)},
              "data": {"source": str(sft_file), "batch_size": 4, "max_length": 32},
              "eval_data": {"source": str(sft_file), "batch_size": 8, "max_length": 32},
              "train": {"total_steps": 12, "optimizer": {"learning_rate": 3e-3},
                        "log": {"progress_bar": False, "tensorboard": False}}}
    return recipe.load_run_config(values, list(overrides))


def test_a_few_steps_bring_the_student_closer_to_the_teacher(checkpoint, sft_file, tmp_path):
    teacher_dir = save_teacher(tmp_path / "teacher")
    config = run_config(checkpoint, sft_file, tmp_path, f"teacher={teacher_dir}", "loss.beta=0.5",
                        "loss.chunk_size=4")
    student, tokenizer = models.load_pretrained(checkpoint)
    teacher, _ = models.load_pretrained(teacher_dir)
    held_out = data.build_dataset(config.eval_data, tokenizer).batched_as(compact_targets=True)
    objective = distill.distill_objective(beta=0.5)
    before = common.evaluate_objective(objective, student, common.one_pass(config.eval_data, held_out),
                                       {"teacher": teacher})
    result = pipeline.run(config)
    after = result.eval_metrics
    assert after["loss"] < 0.7 * before["loss"], (before, after)
    assert after["top1_agreement"] > before["top1_agreement"]
    assert after["perplexity"] == pytest.approx(np.exp(after["nll"]))
    assert {"top1_agreement", "distill_tokens", "examples"} <= set(after)
    out = Path(config.output_dir)
    assert json.loads((out / "eval.json").read_text())["teacher"] == str(teacher_dir)
    assert json.loads((out / "run.json").read_text())["config"]["teacher"] == str(teacher_dir)
    # The export is the student.
    tokens = np.array([[2, 5, 6, 7]], np.int32)
    np.testing.assert_allclose(models.load_hf(out / "export")(tokens)[0], result.model(tokens)[0], atol=1e-5)


def test_a_teacher_of_another_vocabulary_or_tokenizer_is_refused(checkpoint, sft_file, tmp_path):
    wide = save_teacher(tmp_path / "wide", vocab_size=101)
    config = run_config(checkpoint, sft_file, tmp_path, f"teacher={wide}")
    message = f"the teacher ({wide}) has vocab_size 101 but the student ({checkpoint}) has vocab_size 97"
    with pytest.raises(ValueError, match=re.escape(message)):
        pipeline.run(config)
    assert not Path(config.output_dir).exists()  # refused before anything is written
    swapped = save_teacher(tmp_path / "swapped", tokenizer=tiny_tokenizer(swap=("sky", "blue")))
    with pytest.raises(ValueError, match=r"tokenize differently \(2 token\(s\) with other ids: 'blue' is"):
        pipeline.run(run_config(checkpoint, sft_file, tmp_path, f"teacher={swapped}"))


def test_distill_trains_on_the_chosen_side_of_pairs(checkpoint, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": "away"}) + "\n" for p, c in TEXTS))
    config = run_config(checkpoint, pairs, tmp_path, "teacher=" + str(checkpoint), "train.total_steps=1")
    result = pipeline.run(config)
    # The teacher is the student's own start: the held-out divergence after one step is small but the run is real.
    assert result.eval_metrics["examples"] == len(TEXTS) and np.isfinite(result.eval_metrics["loss"])


def test_train_distill_print_config_resolves(capsys):
    from jaxalign.cli import main

    assert main(["train", "distill", "--config", "hh_rlhf", "--print-config", "teacher=big/export",
                 "loss.beta=0.2", "loss.temperature=2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["method"] == "distill" and printed["teacher"] == "big/export"
    assert printed["loss"] == {"beta": 0.2, "temperature": 2.0, "lmbda": 0.0, "chunk_size": 128}
    assert recipe.RunConfig.from_dict(printed).loss == recipe.load_run_config(
        "hh_rlhf", ["teacher=big/export", "loss.beta=0.2", "loss.temperature=2"], method="distill").loss


@pytest.mark.parametrize(("override", "message"), [
    ("loss.lmbda=0.5", r"loss\.lmbda \(DistillSpec\) must be 0: on-policy distillation"),
    ("loss.beta=1.5", r"loss\.beta \(DistillSpec\) must be in \[0, 1\]"),
    ("loss.temperature=0", r"loss\.temperature \(DistillSpec\) must be > 0"),
    ("loss.seq_kd=true", r"loss\.seq_kd is `jaxalign train sft` on completions the teacher sampled"),
    ("loss.teacher_model_name_or_path=x", r"loss\.teacher_model_name_or_path is the top-level key teacher"),
])
def test_bad_settings_are_refused_before_any_work(override, message):
    with pytest.raises(ValueError, match=message):
        recipe.load_run_config("hh_rlhf", [override], method="distill")


def test_teacher_belongs_to_distill_only():
    with pytest.raises(ValueError, match="RunConfig.teacher is the distill method's teacher; method sft takes none"):
        recipe.load_run_config("hh_rlhf", ["teacher=x"], method="sft")
