"""``loss.contrastive`` beside DPO, SFT and the reward loss: the term equals InfoNCE of each sequence's states pooled
from a separate plain forward pass, in every batch layout; runs from a config with a projection head that the
export leaves out; bad settings are refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxalign import models
from jaxalign.methods import dpo, pipeline, reward, sft
from jaxalign.methods.specs import ContrastiveSpec
from jaxalign.models import LlamaForCausalLM, RewardModel
from tests.losses.test_contrastive import reference
from tests.methods.test_pipeline import PAIRS, config
from tests.methods.test_shared_prompt import LAYOUTS, LLAMA, batches, pairs_dataset

WEIGHT = 0.5


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}],
                                        "chosen": [{"role": "assistant", "content": c}],
                                        "rejected": [{"role": "assistant", "content": r}]}) + "\n"
                            for p, c, r in PAIRS))
    return path


@pytest.fixture(scope="module")
def model():
    return LlamaForCausalLM(LLAMA, rngs=nnx.Rngs(0))


def states_one_by_one(model, dataset, pooling):
    """Each pair's prompt, chosen and rejected representations from a plain forward pass: every sequence a row
    of its own, right-padded (causal: padding after a sequence changes none of its states)."""
    sequences = [sequence for example in dataset.examples for sequence in example.sequences]
    width = max(len(s) for s in sequences)
    ids = np.zeros((len(sequences), width), np.int32)
    for row, sequence in enumerate(sequences):
        ids[row, :len(sequence)] = sequence.ids
    hidden = np.asarray(jax.jit(lambda ids: model.hidden_states(ids)[0])(ids), np.float64)
    pool = (lambda h, a, b: h[b - 1]) if pooling == "last" else (lambda h, a, b: h[a:b].mean(0))
    prompts = [max(s.prompt_length, 1) for s in sequences]
    responses = np.stack([pool(hidden[r], prompts[r], len(s)) for r, s in enumerate(sequences)])
    anchors = np.stack([pool(hidden[r], 0, prompts[r]) for r in range(len(sequences))])
    sides = len(dataset.examples[0].sequences)
    return anchors[::sides], responses[::sides], responses[1::sides] if sides > 1 else None


def jitted(objective, model, **refs):
    return jax.jit(lambda batch: objective(model, batch, key=None, **refs))


@pytest.mark.parametrize(("layout", "pooling"), [("plain", "last"), ("shared", "mean")])
def test_dpo_adds_the_weighted_infonce_of_its_own_forward_pass(model, layout, pooling):
    dataset = pairs_dataset()
    batch = batches(dataset, **LAYOUTS[layout])[0]
    spec = {"weight": WEIGHT, "temperature": 0.1, "pooling": pooling}
    (total, count), metrics = jitted(dpo.dpo_objective(beta=0.1, contrastive=spec), model, ref=model)(batch)
    anchors, chosen, rejected = states_one_by_one(model, dataset, pooling)
    want = reference(anchors, chosen, rejected, np.ones(5, bool), temperature=0.1)
    assert count == 5
    np.testing.assert_allclose(total, 5 * np.log(2) + WEIGHT * want.sum(), rtol=2e-5)
    np.testing.assert_allclose(metrics["contrastive_loss"], want.mean(), rtol=2e-5)
    assert metrics["contrastive_negatives"] == 9  # four other pairs' two responses and its own rejected one


@pytest.mark.parametrize("average", ["token_mean"])
def test_sft_adds_infonce_weighted_as_its_mean_weighs_each_example(model, average):
    dataset = sft.chosen_as_sft(pairs_dataset(split_last_prompt=False))
    batch = batches(dataset, compact_targets=True)[0]
    plain = sft.sft_objective(average=average)
    with_term = sft.sft_objective(average=average, contrastive={"weight": WEIGHT, "temperature": 0.2})
    (nll_total, count), _ = jitted(plain, model)(batch)
    (total, term_count), metrics = jitted(with_term, model)(batch)
    anchors, responses, _ = states_one_by_one(model, dataset, "last")
    per = reference(anchors, responses, None, np.ones(5, bool), temperature=0.2)
    tokens = np.array([len(e.sequences[0]) - max(e.sequences[0].prompt_length, 1) for e in dataset.examples])
    shares = tokens if average == "token_mean" else np.ones(5)
    assert term_count == count
    np.testing.assert_allclose(total, nll_total + WEIGHT * np.sum(shares * per), rtol=2e-5)
    np.testing.assert_allclose(metrics["contrastive_loss"], per.mean(), rtol=2e-5)


@pytest.mark.parametrize("layout", ["shared"])
def test_reward_model_adds_infonce_of_its_trunk_states(model, layout):
    dataset = pairs_dataset()
    kind = {"share_prompts": True} if layout == "shared" else {}
    batch = batches(dataset, **kind)[0]
    reward_model = RewardModel(model, pooling="mean", rngs=nnx.Rngs(1))
    (plain_total, count), _ = jitted(reward.reward_objective(), reward_model)(batch)
    objective = reward.reward_objective(contrastive={"weight": WEIGHT, "pooling": "mean", "temperature": 0.3})
    (total, term_count), _ = jitted(objective, reward_model)(batch)
    anchors, chosen, rejected = states_one_by_one(model, dataset, "mean")
    want = reference(anchors, chosen, rejected, np.ones(5, bool), temperature=0.3)
    assert term_count == count == 5
    np.testing.assert_allclose(total, plain_total + WEIGHT * want.sum(), rtol=2e-5)


def test_dpo_with_a_contrastive_projection_head_trains_and_exports_the_model_alone(checkpoint, pairs_path,
                                                                                  tmp_path):
    run_config = config(checkpoint, pairs_path, tmp_path, "dpo", "reference=precomputed",
                        "loss.contrastive={weight: 0.5, temperature: 0.07, pooling: mean, projection: 8}")
    assert run_config.loss.contrastive == ContrastiveSpec(weight=0.5, pooling="mean", projection=8)
    result = pipeline.run(run_config)
    out = Path(run_config.output_dir)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 3 and all(np.isfinite(r["contrastive_loss"]) and r["contrastive_loss"] > 0 for r in logged)
    assert not hasattr(result.model, "contrastive_head")
    reloaded = models.load_hf(out / "export")
    tokens = np.array([[2, 5, 6, 7]], np.int32)
    np.testing.assert_allclose(reloaded(tokens)[0], result.model(tokens)[0], atol=1e-5)
    saved = json.loads((out / "run.json").read_text())["config"]["loss"]["contrastive"]
    assert saved == {"weight": 0.5, "temperature": 0.07, "pooling": "mean", "in_batch_negatives": True,
                     "projection": 8}


@pytest.mark.parametrize(("method", "overrides", "message"), [
    ("dpo", ["loss.contrastive.temperature=0"], r"loss.contrastive.temperature must be a number > 0, got 0"),
    ("dpo", ["loss.contrastive.temperature=-1"], r"loss.contrastive.temperature must be a number > 0"),
    ("sft", ["loss.contrastive={pooling: max}"], r"loss.contrastive.pooling must be one of \('last', 'mean'\)"),
    ("dpo", ["loss.contrastive={tau: 0.1}"], r"loss.contrastive: unknown option\(s\) \['tau'\]"),
    ("sft", ["loss.contrastive={weight: 1}", "data.batch_size=1"], "at least 2 examples per micro-batch"),
    ("reward", ["loss.contrastive={weight: 1}", "freeze_backbone=true"], "freeze_backbone keeps the trunk frozen"),
])
def test_bad_contrastive_settings_are_refused_before_training(checkpoint, pairs_path, tmp_path, method, overrides,
                                                              message):
    with pytest.raises(ValueError, match=message):
        pipeline.run(config(checkpoint, pairs_path, tmp_path, method, *overrides))
    assert not (tmp_path / method / "metrics.jsonl").exists()
