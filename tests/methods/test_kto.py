"""KTO (``jaxalign train kto``): the mismatched pairs and the objective against TRL 1.16's own collator and
``KTOTrainer._compute_loss`` on the same logits, one-class and padded batches, the reference modes, unpairing,
the command end to end (training, resume, LoRA on the seven projections) and its bad-input errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxalign import data, losses, models
from jaxalign.cli import main
from jaxalign.methods import kto, pipeline, recipe
from jaxalign.methods.common import lora_base, sequence_logps
from jaxalign.models import LlamaForCausalLM
from tests.losses.test_dpo import FakeFusedLM, _bare_trainer
from tests.models.conftest import TINY

T = 11
# (prompt length, completion length): example 3's prompt (7) with example 2's completion (9) is longer than T,
# so one mismatched sequence is cut at T, as TRL cuts it at max_length = T.
SHAPES = [(2, 4), (6, 2), (1, 9), (7, 4), (3, 5)]
PAD_ROW = 2  # a padding row (example_mask 0) in the middle of the batch: it takes no part


def examples(labels, seed=0):
    rng = np.random.default_rng(seed)
    return [{"prompt_ids": rng.integers(4, TINY.vocab_size, p).tolist(),
             "completion_ids": rng.integers(4, TINY.vocab_size, c).tolist(), "label": bool(label)}
            for (p, c), label in zip(SHAPES, labels, strict=True)]


def our_batch(rows):
    """The batch jaxalign.data.collate makes of ``rows`` (right padding, targets from the prompt's end), with a
    padding row inserted at PAD_ROW."""
    rows = rows[:PAD_ROW] + [None] + rows[PAD_ROW:]
    batch = {name: np.zeros((len(rows), T), np.int32) for name in ("input_ids", "attention_mask", "positions",
                                                                   "loss_mask")}
    batch["example_mask"] = np.array([row is not None for row in rows], np.int32)
    batch["label"] = np.array([row is not None and row["label"] for row in rows], np.int32)
    for i, row in enumerate(rows):
        if row is None:
            continue
        ids = row["prompt_ids"] + row["completion_ids"]
        batch["input_ids"][i, :len(ids)] = ids
        batch["attention_mask"][i, :len(ids)] = 1
        batch["positions"][i, :len(ids)] = np.arange(len(ids))
        batch["loss_mask"][i, len(row["prompt_ids"]):len(ids)] = 1
    return batch


def trl_batch(rows, with_kl: bool):
    """TRL's batch of the same examples: ``add_kl_completion_ids`` (its rotation of the completions by one) and
    ``DataCollatorForUnpairedPreference`` with ``max_length = T``."""
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    rows = [dict(row) for row in rows]
    if with_kl:
        completions = [row["completion_ids"] for row in rows]
        for row, kl in zip(rows, [completions[-1]] + completions[:-1], strict=True):  # TRL's add_kl_completion_ids
            row["KL_completion_ids"] = kl
    return DataCollatorForUnpairedPreference(pad_token_id=0, max_length=T)(rows)


def logits_of(model, ids, attention):
    ids, attention = np.asarray(ids, np.int32), np.asarray(attention, np.int32)
    logits, _ = model(ids, attention_mask=attention, positions=(np.cumsum(attention, -1) - 1) * attention)
    return np.asarray(logits, np.float64)[:, :-1]


def completion_logps(logits, ids, completion_mask):
    """An independent float64 NumPy scorer: Σ over completion tokens of log softmax(logits)[target]."""
    ids, mask = np.asarray(ids), np.asarray(completion_mask)[:, 1:]
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return (np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0] * mask).sum(-1)


@pytest.fixture(scope="module")
def policies():
    return LlamaForCausalLM(TINY, rngs=nnx.Rngs(0)), LlamaForCausalLM(TINY, rngs=nnx.Rngs(1))


def test_mismatched_rows_are_trls_kl_sequences():
    """Each prompt with the previous example's completion (the first with the last one's), cut at T: TRL's
    KL_input_ids / KL_completion_mask for the same examples, the padding row skipped."""
    rows = examples([1, 0, 1, 1, 0])
    kl = jax.jit(kto.mismatched_rows)(our_batch(rows))
    theirs = trl_batch(rows, with_kl=True)
    keep = np.arange(len(rows) + 1) != PAD_ROW
    width = theirs["KL_input_ids"].shape[1]
    assert width == T
    attention = theirs["KL_attention_mask"].numpy()
    np.testing.assert_array_equal(np.asarray(kl["input_ids"])[keep], theirs["KL_input_ids"].numpy() * attention)
    np.testing.assert_array_equal(np.asarray(kl["attention_mask"])[keep], attention)
    np.testing.assert_array_equal(np.asarray(kl["loss_mask"])[keep], theirs["KL_completion_mask"].numpy())
    np.testing.assert_array_equal(np.asarray(kl["positions"])[keep], np.arange(T) * attention)
    np.testing.assert_array_equal(np.asarray(kl["partner"]), [5, 0, 2, 1, 3, 4])  # the padding row keeps itself
    np.testing.assert_array_equal(np.asarray(kl["truncated"]), [False, False, False, False, True, False])
    assert not np.any(np.asarray(kl["attention_mask"])[PAD_ROW])


@pytest.mark.parametrize("loss_type", losses.KTO_LOSS_TYPES)
@pytest.mark.parametrize("labels", [(1, 0, 1, 1, 0), (0, 0, 0, 0, 0), (1, 1, 1, 1, 1)])
def test_objective_matches_trls_kto_trainer(policies, loss_type, labels):
    """Our objective (policy and reference Flax models, the mismatched pairs made in the batch) against TRL's
    ``KTOTrainer._compute_loss`` on TRL's own batch, fed the same policy logits and reference log-probs (an
    independent NumPy scorer): loss, reference point z₀ and reward/log-prob metrics to 1e-5, one-class batches
    included."""
    policy, reference = policies
    rows = examples(labels, seed=sum(labels))
    with_kl = loss_type == "kto"
    theirs = trl_batch(rows, with_kl)
    if with_kl:  # the roles chosen so that z₀ > 0: the clamp must not hide the reference point
        ids, attention, mask = (theirs[f"KL_{name}"] for name in ("input_ids", "attention_mask", "completion_mask"))
        z0 = np.mean(completion_logps(logits_of(policy, ids, attention), ids, mask)
                     - completion_logps(logits_of(reference, ids, attention), ids, mask))
        policy, reference = (policy, reference) if z0 > 0 else (reference, policy)
    table, inputs = [], {name: theirs[name] for name in ("label", "input_ids", "attention_mask", "completion_mask")}
    for prefix in ("", "KL_") if with_kl else ("",):
        ids, attention = theirs[f"{prefix}input_ids"], theirs[f"{prefix}attention_mask"]
        table.append((ids, torch.tensor(logits_of(policy, ids, attention))))
        inputs[f"ref_{prefix}logps"] = torch.tensor(completion_logps(
            logits_of(reference, ids, attention), ids, theirs[f"{prefix}completion_mask"]))
        inputs[f"{prefix}input_ids"], inputs[f"{prefix}attention_mask"] = ids, attention
        inputs[f"{prefix}completion_mask"] = theirs[f"{prefix}completion_mask"]
    config = {"beta": 0.7, "desirable_weight": 1.3, "undesirable_weight": 0.6}
    from trl.trainer.kto_trainer import KTOTrainer

    trainer = _bare_trainer(KTOTrainer, FakeFusedLM(table), calculate_KL=with_kl, precompute_ref_logps=True,
                            loss_type=loss_type, **config)
    trl_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False).item()
    trl_metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}

    objective = kto.kto_objective(loss_type=loss_type, chunk_size=4, **config)
    (total, count), metrics = jax.jit(objective)(policy, our_batch(rows), key=None, ref=reference)
    assert count == len(rows) and "loss" not in metrics
    np.testing.assert_allclose(total / count, trl_loss, rtol=1e-5, atol=1e-6)
    compared = [name for name in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                                  "logps/rejected") if name in trl_metrics]
    assert {"kl", "rewards/chosen" if labels[0] else "rewards/rejected"} <= set(compared)
    for name in compared:
        np.testing.assert_allclose(metrics[name], trl_metrics[name], rtol=1e-5, atol=1e-6, err_msg=name)
    if with_kl:
        assert trl_metrics["kl"] > 0  # the clamp at 0 did not hide the reference point
    # TRL leaves out the metrics of an absent side; here they are 0, never NaN.
    assert metrics["count/desirable"] == sum(labels) and metrics["count/undesirable"] == len(labels) - sum(labels)
    assert all(np.isfinite(value) for value in jax.tree.leaves(metrics))
    for side, present in (("chosen", any(labels)), ("rejected", not all(labels))):
        if not present:
            assert metrics[f"rewards/{side}"] == 0 and metrics[f"logps/{side}"] == 0
    if with_kl:
        assert metrics["kl_truncated"] == pytest.approx(1 / 5)


def test_the_reference_point_is_clamped_detached_and_skips_padding(policies):
    policy, reference = policies
    batch = our_batch(examples([1, 0, 1, 1, 0]))
    objective = kto.kto_objective(beta=0.5, chunk_size=None)
    run = jax.jit(objective)
    (total, count), metrics = run(policy, batch, key=None, ref=policy)
    # At the reference: every implied reward and z₀ are 0, each example's loss is 1 - σ(0).
    np.testing.assert_allclose(total / count, 0.5, rtol=1e-6)
    np.testing.assert_allclose([metrics["kl"], metrics["rewards/chosen"], metrics["rewards/rejected"]], 0, atol=1e-6)

    # Swapping policy and reference negates the mean log-ratio on the mismatched pairs: one order gives z₀ > 0,
    # the other is clamped to 0.
    z0 = [run(a, batch, key=None, ref=b)[1]["kl"] for a, b in ((policy, reference), (reference, policy))]
    assert max(z0) > 0 and min(z0) == 0
    if z0[0] == 0:
        policy, reference = reference, policy

    # The mismatched pass carries no gradient: the gradient equals that of the loss with z₀ held constant.
    def loss(params, z0):
        model = nnx.merge(graphdef, params, rest)
        (total, count), metrics = objective(model, batch, key=None, ref=reference)
        return total / count, metrics

    def loss_fixed_z0(params, z0):
        model = nnx.merge(graphdef, params, rest)
        seq, _ = sequence_logps(model, batch, None)
        ref, _ = sequence_logps(reference, batch, None)
        valid, label = batch["example_mask"].astype(bool), batch["label"].astype(bool)
        per, _ = losses.kto_loss(seq, seq, ref, ref, jnp.reshape(z0, 1), jnp.zeros(1), valid & label,
                                 valid & ~label, beta=0.5)
        return jnp.sum(per) / jnp.sum(valid)

    graphdef, params, rest = nnx.split(policy, nnx.Param, ...)
    (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, 0.0)
    assert metrics["kl"] > 0
    expected_value, expected = jax.jit(jax.value_and_grad(loss_fixed_z0))(params, metrics["kl"])
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    for ours, theirs in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-7)
    # A padding row changes nothing: the same examples without it.
    unpadded = {name: np.delete(array, PAD_ROW, axis=0) for name, array in batch.items()}
    (other_total, other_count), other = run(policy, unpadded, key=None, ref=reference)
    np.testing.assert_allclose(other_total / other_count, value, rtol=1e-5)
    np.testing.assert_allclose(other["kl"], metrics["kl"], rtol=1e-5)


def test_objective_refuses_what_cannot_run(policies):
    with pytest.raises(ValueError, match="unknown loss_type 'bco'"):
        kto.kto_objective(loss_type="bco")
    with pytest.raises(ValueError, match="precomputed reference"):
        kto.kto_objective(reference="precomputed")
    with pytest.raises(ValueError, match="reference must be one of"):
        kto.kto_objective(reference="none")
    with pytest.raises(ValueError, match="beta must be > 0"):
        kto.kto_objective(beta=0.0)
    batch = our_batch(examples([1, 0, 1, 1, 0]))
    with pytest.raises(ValueError, match="needs the reference model"):
        kto.kto_objective()(policies[0], batch, key=None)
    with pytest.raises(ValueError, match="no 'label'"):
        kto.kto_objective()(policies[0], {k: v for k, v in batch.items() if k != "label"}, key=None, ref=policies[1])
    # A precomputed reference serves the loss without a reference point.
    (total, count), metrics = kto.kto_objective(loss_type="apo_zero_unpaired", reference="precomputed")(
        policies[0], dict(batch, ref_logps=np.zeros(len(batch["label"]), np.float32)), key=None)
    assert count == 5 and np.isfinite(total) and metrics["kl"] == 0


def test_preference_pairs_are_unpaired_as_trl_does():
    dataset = data.TokenizedDataset(
        kind="preference", layout=(2,), pad_token_id=0, value_keys=("margin",),
        examples=[data.TokenizedExample(sequences=(f"c{i}", f"r{i}"), values={"margin": 1.0}) for i in range(3)])
    unpaired = kto.as_unpaired(dataset)
    assert unpaired.kind == "unpaired" and unpaired.layout == () and unpaired.value_keys == ("label",)
    assert [e.sequences for e in unpaired.examples] == [("c0",), ("c1",), ("c2",), ("r0",), ("r1",), ("r2",)]
    assert [e.values for e in unpaired.examples] == [{"label": 1}] * 3 + [{"label": 0}] * 3
    assert kto.as_unpaired(unpaired) is unpaired
    advice = kto.class_weight_advice(unpaired, 1.0, 1.0)
    assert advice is None
    skewed = data.TokenizedDataset(kind="unpaired", layout=(), pad_token_id=0, value_keys=("label",),
                                   examples=[data.TokenizedExample(("x",), {"label": int(i < 8)}) for i in range(10)])
    assert "undesirable_weight in [3.01, 4.0]" in kto.class_weight_advice(skewed, 1.0, 1.0)
    assert kto.class_weight_advice(skewed, 1.0, 3.5) is None


# ----------------------------------------------------------------------------------------------------------
# jaxalign train kto
# ----------------------------------------------------------------------------------------------------------

FEEDBACK = [("Hi", "sky blue .", True), ("sky ?", "Go away .", False), ("Go", "blue sky", True),
            ("Hi ?", "away away", False), ("blue", "sky .", True), ("away ?", "Go Go", False)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def feedback_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("kto") / "feedback.jsonl", [
        {"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": c}],
         "label": label} for p, c, label in FEEDBACK])


def run_yaml(tmp_path: Path, checkpoint, source, out, extra="") -> Path:
    path = tmp_path / "kto.yaml"
    path.write_text(f"output_dir: {out}\nmodel: {{path: {checkpoint}}}\n"
                    f"data: {{source: {source}, batch_size: 6, max_length: 32}}\n"
                    "train: {total_steps: 3, optimizer: {learning_rate: 5.0e-4}, "
                    "log: {progress_bar: false, tensorboard: false}}\n"
                    f"loss: {{beta: 0.5}}\n{extra}")
    return path


def metrics_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_kto_command_learns_and_resumes(checkpoint, feedback_file, tmp_path, capsys):
    out = tmp_path / "run"
    config = run_yaml(tmp_path, checkpoint, feedback_file, out)
    assert main(["train", "kto", "--config", str(config), "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["loss"] == {"loss_type": "kto", "beta": 0.5, "desirable_weight": 1.0, "undesirable_weight": 1.0,
                               "chunk_size": 128}
    assert main(["train", "kto", "--config", str(config)]) == 0
    assert "trained kto for 3 steps" in capsys.readouterr().out
    # Without --resume the run is refused; with it, it continues to the new total.
    assert main(["train", "kto", "--config", str(config), "train.total_steps=5"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "kto", "--config", str(config), "train.total_steps=5", "--resume"]) == 0
    steps = metrics_of(out)
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5]
    # Step 1: the policy is its reference (implied rewards and z₀ are 0): the loss is 1 - σ(0). The two sides'
    # log-probabilities come from two programs (the train step, the reference pass), summed over a completion in
    # float32: they round apart by a few ulps (KL 1.3e-6 at the suite's LLVM level 0, tests/conftest.py).
    assert steps[0]["loss"] == pytest.approx(0.5, abs=1e-5) and steps[0]["kl"] == pytest.approx(0, abs=1e-5)
    assert steps[0]["count/desirable"] == steps[0]["count/undesirable"] == 3
    losses_ = [s["loss"] for s in steps]
    assert all(b < a for a, b in zip(losses_, losses_[1:])), losses_
    assert steps[-1]["rewards/chosen"] > 0 > steps[-1]["rewards/rejected"]
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["method"] == "kto" and run["examples"] == 6
    assert (out / "export" / "config.json").is_file()


def test_lora_kto_on_the_seven_projections(checkpoint, feedback_file, tmp_path):
    """The HITL app's retraining: LoRA r=16 on q/k/v/o/gate/up/down, the reference the base with the adapters
    off, held-out feedback evaluated after training."""
    targets = "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]"
    config = recipe.load_run_config(run_yaml(tmp_path, checkpoint, feedback_file, tmp_path / "lora"), [
        f"model.lora={{rank: 16, alpha: 32, targets: {targets}}}", "reference=lora_base", "train.total_steps=3",
        "export=false",
        f"eval_data={{source: {feedback_file}, batch_size: 3, max_length: 32}}"], method="kto")
    result = pipeline.run(config)
    steps = metrics_of(Path(config.output_dir))
    assert steps[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # zero-initialised adapters: the policy is the base
    assert steps[-1]["loss"] < steps[0]["loss"]
    adapted = {str(path[-2]) for path, _ in nnx.to_flat_state(nnx.state(result.model, nnx.LoRAParam))}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # Only the adapters trained: with them zeroed the model is the checkpoint again.
    tokens = np.array([[2, 9, 5, 3]], np.int32)
    np.testing.assert_allclose(lora_base(result.model)(tokens)[0], models.load_hf(checkpoint)(tokens)[0], atol=1e-5)
    assert result.eval_metrics["examples"] == 6 and result.eval_metrics["loss"] < 0.5
    assert {"rewards/chosen", "rewards/rejected", "kl", "count/desirable"} <= set(result.eval_metrics)


def test_apo_zero_unpaired_on_preference_pairs_with_a_precomputed_reference(checkpoint, tmp_path):
    """Preference pairs train KTO as TRL unpairs them; apo_zero_unpaired takes a precomputed reference (the
    held-out pairs get their own pass)."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in [
        ("Hi", "sky blue .", "Go away ."), ("sky ?", "blue .", "away"), ("Go", "Hi .", "away away .")]])
    config = recipe.load_run_config(run_yaml(tmp_path, checkpoint, pairs, tmp_path / "apo"), [
        "loss.loss_type=apo_zero_unpaired", "reference=precomputed", "train.total_steps=1", "export=false",
        f"eval_data={{source: {pairs}, batch_size: 2, max_length: 32}}"], method="kto")
    result = pipeline.run(config)
    steps = metrics_of(Path(config.output_dir))
    assert steps[0]["loss"] == pytest.approx(0.5, abs=1e-6) and steps[0]["count/desirable"] == 3
    assert result.eval_metrics["examples"] == 6 and np.isfinite(result.eval_metrics["loss"])


def bad_run(capsys, checkpoint, source, tmp_path) -> tuple[int, str]:
    status = main(["train", "kto", "--config", str(run_yaml(tmp_path, checkpoint, source, tmp_path / "bad"))])
    return status, capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("label, problem", [
    ("yes", r"line 3, field 'label': expected a boolean, got 'yes'"),
    (2, r"line 3, field 'label': expected a boolean, got 2"),
    (None, r"line 3, field 'label': is null"),
])
def test_a_bad_label_is_one_error_naming_file_line_and_field(checkpoint, tmp_path, capsys, label, problem):
    rows = [{"prompt": p, "completion": c, "label": flag} for p, c, flag in FEEDBACK]
    rows[2]["label"] = label
    source = write_jsonl(tmp_path / "bad.jsonl", rows)
    status, error = bad_run(capsys, checkpoint, source, tmp_path)
    assert status == 2 and re.search(re.escape(str(source)) + ", " + problem, error), error
    assert error.startswith("jaxalign train: error: ") and not (tmp_path / "bad").exists()


def test_records_without_labels_are_refused_naming_the_field(checkpoint, tmp_path, capsys):
    source = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": p, "completion": c} for p, c, _ in FEEDBACK])
    status, error = bad_run(capsys, checkpoint, source, tmp_path)
    assert status == 2 and not (tmp_path / "bad").exists()
    assert "method kto needs unpaired records" in error and f"{source} holds 'sft' records" in error
    assert "no field 'label' (the first record included)" in error
    # With the format named, the first record without a label is named.
    status, error = main(["train", "kto", "--config", str(run_yaml(tmp_path, checkpoint, source, tmp_path / "bad")),
                          "data.format=unpaired"]), capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2 and re.search(re.escape(str(source)) + r", line 1, field 'label'", error), error


def test_mismatched_pairs_need_two_examples_per_micro_batch(checkpoint, feedback_file, tmp_path, capsys):
    config = run_yaml(tmp_path, checkpoint, feedback_file, tmp_path / "one")
    assert main(["train", "kto", "--config", str(config), "data.batch_size=2", "train.micro_batches=2"]) == 2
    assert "at least 2 examples per micro-batch" in capsys.readouterr().err
    assert main(["train", "kto", "--config", str(config), "reference=precomputed"]) == 2
    assert "reference='precomputed' cannot serve loss.loss_type=kto" in capsys.readouterr().err
    assert not (tmp_path / "one").exists()
