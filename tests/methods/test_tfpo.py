"""TFPO (LLMDoctor's doctor) on a tiny Llama: the objective against the loss on the doctor's own full outputs and
against finite differences, then ``jaxalign train tfpo`` end to end through ``pipeline.run`` (the loss falls, the
export is a doctor that loads back equal, resume is exact, one doctor per dimension, LoRA, init_layers), and the
configs and data it refuses, each with an error that names what is wrong."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from jaxalign import cli, data, losses, models
from jaxalign.methods import pipeline, recipe, tfpo
from jaxalign.methods.tfpo import select_dimension, tfpo_objective
from tests.test_cli import tiny_tokenizer

PAIRS = [("Hi", "sky blue .", "Go away ."), ("sky ?", "blue . Hi", "blue away"), ("Go", "Hi .", "away away ."),
         ("Hi ?", "blue sky", "Go away"), ("away ?", "Hi Hi", "Go"), ("blue", "sky .", "away .")]
FACES = {"sentiment": {"positive": "Hi sky blue .", "negative": "Go away"},
         "politeness": {"positive": "Hi .", "negative": "Go away away"}}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tfpo_data") / "pairs.jsonl"
    path.write_text("".join(json.dumps({
        "prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
        "rejected": [{"role": "assistant", "content": r}]}) + "\n" for p, c, r in PAIRS))
    return path


@pytest.fixture(scope="module")
def pku_file(tmp_path_factory) -> Path:
    """PKU-SafeRLHF groups (helpfulness, and safety on all but the last record)."""
    path = tmp_path_factory.mktemp("tfpo_data") / "pku.jsonl"
    rows = [{"prompt": p, "response_0": " " + c, "response_1": " " + r, "better_response_id": i % 2,
             **({"safer_response_id": (i // 2) % 2} if i < len(PAIRS) - 1 else {})}
            for i, (p, c, r) in enumerate(PAIRS)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_config(checkpoint, source, out: Path, *overrides, doctor=None, **extra):
    values = {"method": "tfpo", "output_dir": str(out), "model": {"path": str(checkpoint)},
              "data": {"source": str(source), "batch_size": 6, "max_length": 32, "shuffle": False},
              "train": {"total_steps": 4, "optimizer": {"learning_rate": 3e-3},
                        "log": {"progress_bar": False, "tensorboard": False}},
              "doctor": {"patient": str(checkpoint), "dimensions": ["sentiment"],
                         "faces": {"sentiment": FACES["sentiment"]}, **(doctor or {})},
              **extra}
    return recipe.load_run_config(values, list(overrides))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def params(module, filter_=nnx.Param) -> dict:
    return {path: np.asarray(value[...]) for path, value in nnx.to_flat_state(nnx.state(module, filter_))}


# ------------------------------------------------------------------------------------------ the objective


def rewarded_pairs(pairs_file):
    """The pairs with synthetic token rewards of the right signs (on some response tokens, 0 on others)."""
    dataset = data.build_dataset(data.DataConfig(str(pairs_file), max_length=32), tiny_tokenizer())
    rng = np.random.default_rng(3)
    values = []
    for example in dataset.examples:
        per_side = []
        for side, sequence in enumerate(example.sequences):
            r = rng.uniform(0.1, 0.9, len(sequence)) * (rng.random(len(sequence)) < 0.6) * (1 - 2 * side)
            r[:sequence.prompt_length] = 0
            per_side.append(r.astype(np.float32))
        values.append(tuple(per_side))
    return dataset.with_token_values("token_rewards", values)


@pytest.fixture(scope="module")
def doctor_and_batch(checkpoint, pairs_file):
    """A doctor (the tiny Llama + a random value head) and a batch of 5 pairs whose last row pads a partial batch
    (``example_mask`` 0, but holding a real pair: it must not count), with synthetic token rewards of the right
    signs (on some response tokens, 0 on others)."""
    dataset = rewarded_pairs(pairs_file)
    batch = data.collate(dataset, [0, 1, 2, 3, 4], int(dataset.lengths.max()) + 2)
    batch["example_mask"][4] = 0
    doctor = models.CausalLMWithValueHead(models.load_hf(checkpoint), rngs=nnx.Rngs(0))
    key = jax.random.key(5)
    doctor.value_head.kernel[...] = 0.3 * jax.random.normal(key, doctor.value_head.kernel[...].shape)
    doctor.value_head.bias[...] = jnp.full_like(doctor.value_head.bias[...], -0.2)
    return doctor, {k: jnp.asarray(v) for k, v in batch.items()}


OPTIONS = (("gamma", 0.3), ("lam", 0.9))  # a margin the value hinge is active at, SubTB(λ) weights


@functools.partial(jax.jit, static_argnums=0)
def _objective(graphdef, state, batch):
    (total, count), metrics = tfpo_objective(**dict(OPTIONS))(nnx.merge(graphdef, state), batch, key=None)
    return total / count, (count, metrics)


def test_the_objective_is_tfpo_loss_on_the_doctors_full_outputs(doctor_and_batch):
    """The objective's one trunk pass, chunked head, shifts and reshapes equal the loss computed from the doctor's
    own ``(logits, log V)`` over the flattened rows, log-softmax in float64, value states found by hand; rows
    that only pad the batch do not count."""
    doctor, batch = doctor_and_batch
    graphdef, state = nnx.split(doctor)
    pairs, _, length = batch["input_ids"].shape
    flat = {k: np.asarray(batch[k]).reshape(2 * pairs, length) for k in ("input_ids", "attention_mask", "positions")}
    logits, log_v, _ = doctor(flat["input_ids"], positions=flat["positions"], attention_mask=flat["attention_mask"])
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logps = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    targets = flat["input_ids"][:, 1:]
    token_logps = np.take_along_axis(logps[:, :-1], targets[..., None], -1)[..., 0].reshape(pairs, 2, length - 1)
    mask = np.asarray(batch["loss_mask"])[..., 1:]
    ids = np.asarray(batch["input_ids"])[..., 1:]
    # The state after the first response token where chosen and rejected differ (or one has ended).
    divergence = np.zeros_like(mask)
    for b in range(pairs):
        for t in range(length - 1):
            if mask[b, 0, t] != mask[b, 1, t] or (mask[b, 0, t] and ids[b, 0, t] != ids[b, 1, t]):
                divergence[b, :, t] = mask[b, :, t]
                break
    first = mask.argmax(-1)
    assert np.any(divergence.argmax(-1)[:, 0] != first[:, 0])  # not always the first response token
    reference_loss = jax.jit(functools.partial(losses.tfpo_loss, **dict(OPTIONS)))  # jitted: faster than eager
    per_pair, _ = reference_loss(jnp.asarray(token_logps, jnp.float32), np.asarray(log_v).reshape(pairs, 2, length),
                                 batch["token_rewards"][..., 1:], mask, divergence)
    expected = np.asarray(per_pair)[:4].mean()
    got, (count, metrics) = _objective(graphdef, state, batch)
    assert int(count) == 4 and "loss" not in metrics and float(metrics["subtb"]) > 0
    assert float(metrics["value_loss"]) > 0  # the hinge is active: its gradient is checked below too
    np.testing.assert_allclose(float(got), expected, rtol=2e-5)
    assert abs(np.asarray(per_pair)[4] - expected) > 1e-3  # the padding row would have changed the mean


def test_the_gradient_matches_finite_differences(doctor_and_batch):
    """Directional derivatives (jvp) along random directions of the value head, of one LM weight matrix and of
    the LM head equal float32 central differences."""
    doctor, batch = doctor_and_batch
    graphdef, state = nnx.split(doctor)

    @jax.jit
    def derivative(state, direction):
        return jax.jvp(lambda s: _objective(graphdef, s, batch)[0], (state,), (direction,))

    def moved(t, direction):
        return jax.tree.map(lambda v, d: v + t * d, state, direction)

    rng = np.random.default_rng(0)
    flat = dict(nnx.to_flat_state(state))
    for prefix in (("value_head",), ("lm", "model", "layers", "mlp", "up_proj"), ("lm", "lm_head")):
        direction = {p: np.zeros(v[...].shape, np.float32) for p, v in flat.items()}
        chosen = [p for p in direction if p[:len(prefix)] == prefix]
        assert chosen
        for p in chosen:
            direction[p] = rng.standard_normal(direction[p].shape).astype(np.float32)
        norm = np.sqrt(sum(np.sum(direction[p] ** 2) for p in chosen))
        direction = nnx.from_flat_state([(p, flat[p].replace(jnp.asarray(d / norm))) for p, d in direction.items()])
        _, slope = derivative(state, direction)
        h = 1e-2
        central = (float(_objective(graphdef, moved(h, direction), batch)[0])
                   - float(_objective(graphdef, moved(-h, direction), batch)[0])) / (2 * h)
        assert abs(float(slope)) > 1e-3, prefix  # a direction the loss depends on
        np.testing.assert_allclose(float(slope), central, rtol=2e-2, atol=1e-4, err_msg=str(prefix))


def test_the_objective_refuses_batches_without_rewards_and_unknown_states(doctor_and_batch):
    doctor, batch = doctor_and_batch
    with pytest.raises(ValueError, match="the batch has no token_rewards"):
        tfpo_objective()(doctor, {k: v for k, v in batch.items() if k != "token_rewards"}, key=None)
    with pytest.raises(ValueError, match="value_states must be 'divergence' or 'first', got 'last'"):
        tfpo_objective(value_states="last")


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def straight(checkpoint, pairs_file, tmp_path_factory):
    """4 steps in one go, evaluated on the same pairs."""
    out = tmp_path_factory.mktemp("tfpo") / "straight"
    config = run_config(checkpoint, pairs_file, out, f"eval_data.source={pairs_file}", "eval_data.batch_size=6",
                        "eval_data.max_length=32")
    return pipeline.run(config)


def test_training_lowers_the_loss_and_exports_a_doctor(straight, checkpoint):
    out = Path(straight.config.output_dir)
    losses_ = [record["loss"] for record in metrics(out)]
    assert len(losses_) == 4 and losses_[-1] < losses_[0]  # the same six pairs every step
    assert straight.eval_metrics["loss"] < losses_[0]
    # The export is a doctor: the trained LM and value head, its dimension and what made its rewards.
    doctor, tokenizer, card = models.load_doctor(straight.export_dir)
    assert straight.export_dir == out / "export" and card["dimension"] == "sentiment"
    assert card["metadata"]["face"] == FACES["sentiment"] and card["metadata"]["patient"] == str(checkpoint)
    assert card["metadata"]["token_rewards"] == {"eps": 1e-8, "tau": 1.0, "threshold": 0.1}
    assert tokenizer.get_vocab() == tiny_tokenizer().get_vocab()
    trained = straight.model
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(np.asarray(getattr(doctor.value_head, name)[...]),
                                      np.asarray(getattr(trained.value_head, name)[...]))
    assert np.any(np.asarray(trained.value_head.kernel[...]) != 0)  # trained from its zero start
    tokens = np.array([[2, 6, 4, 9, 3, 4, 2, 7, 4, 13]], np.int32)
    for a, b in zip(doctor(tokens)[:2], trained(tokens)[:2], strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    # The LM moved from its start, and the rewards it trained on are logged.
    start = models.load_hf(checkpoint)
    assert any(not np.array_equal(v, params(start)[p]) for p, v in params(trained.lm).items())
    summary = json.loads((out / "eval.json").read_text())["token_rewards"]
    assert summary["chosen_rewarded_fraction"] > 0 and summary["rejected_mean_sum"] < 0 < summary["chosen_mean_sum"]
    assert (out / "token_rewards" / "train" / "token_rewards.json").is_file()
    assert (out / "token_rewards" / "eval" / "token_rewards.json").is_file()


def test_a_resumed_run_equals_the_straight_run(straight, checkpoint, pairs_file, tmp_path):
    out = tmp_path / "resumed"
    common = (f"eval_data.source={pairs_file}", "eval_data.batch_size=6", "eval_data.max_length=32")
    pipeline.run(run_config(checkpoint, pairs_file, out, "train.total_steps=2", *common))
    assert len(metrics(out)) == 2
    with pytest.warns(UserWarning, match=r"resuming step 2 with a config that differs in \['total_steps'\]$"):
        resumed = pipeline.run(run_config(checkpoint, pairs_file, out, *common))
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(Path(straight.config.output_dir))]
    expected = params(straight.model)
    for path, value in params(resumed.model).items():
        np.testing.assert_array_equal(value, expected[path], err_msg=str(path))
    assert resumed.eval_metrics == straight.eval_metrics


@pytest.mark.parametrize("anchor_terminal", [True, False])
def test_the_value_head_start_is_the_least_squares_fit_of_the_balancing_values(checkpoint, pairs_file,
                                                                               anchor_terminal, monkeypatch):
    """fit_value_head over batches of 4 against a float64 fit built here: features are the hidden states of every
    non-terminal response state (and of the terminal one, target 0, when it is not anchored), targets
    Σ_{k≥t} (2·r_k − log π_k) from a per-row loop. The last batch carries a real pair on a row marked
    ``example_mask`` 0, which must not count."""
    dataset = rewarded_pairs(pairs_file)
    real_batches = tfpo.one_pass

    def batches_with_a_masked_real_row(config, dataset):
        for batch in real_batches(config, dataset):
            if not batch["example_mask"].all():
                padded = int(np.argmin(batch["example_mask"]))
                real = data.collate(dataset, [0], batch["input_ids"].shape[-1])
                for name in batch:
                    batch[name][padded] = real[name][0]
                batch["example_mask"][padded] = 0
            yield batch

    monkeypatch.setattr(tfpo, "one_pass", batches_with_a_masked_real_row)
    assert len(dataset) % 4, "the last batch must be partial for the masked row to exist"
    doctor = models.CausalLMWithValueHead(models.load_hf(checkpoint), rngs=nnx.Rngs(0))
    stats = tfpo.fit_value_head(doctor, dataset, data.DataConfig(str(pairs_file), batch_size=4, max_length=32),
                                reward_scale=2.0, ridge=1e-3, anchor_terminal=anchor_terminal)
    batch = data.collate(dataset, list(range(len(dataset))), int(dataset.lengths.max()) + 1)
    pairs, _, length = batch["input_ids"].shape
    flat = {k: np.asarray(v).reshape(2 * pairs, length) for k, v in batch.items()
            if k in ("input_ids", "positions", "attention_mask", "loss_mask", "token_rewards")}
    hidden, _ = doctor.lm.hidden_states(flat["input_ids"], positions=flat["positions"],
                                        attention_mask=flat["attention_mask"])
    logits = np.asarray(doctor.lm.logits(hidden), np.float64)
    logps = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    features, targets = [], []
    for row in range(2 * pairs):
        tokens = np.nonzero(flat["loss_mask"][row, 1:])[0]  # target t predicts input t + 1
        steps = [2.0 * flat["token_rewards"][row, t + 1] - logps[row, t, flat["input_ids"][row, t + 1]]
                 for t in tokens]
        states = list(tokens) + ([] if anchor_terminal else [tokens[-1] + 1])
        for i, t in enumerate(states):  # state t: before target t, read at input position t
            features.append(np.append(np.asarray(hidden[row, t], np.float64), 1.0))
            targets.append(sum(steps[i:]))  # 0 at the terminal state
    x, y = np.array(features), np.array(targets)
    centred = x[:, :-1] - x[:, :-1].mean(axis=0)
    ridge = 1e-3 * np.mean(np.sum(centred**2, axis=0)) * np.eye(x.shape[1])
    ridge[-1, -1] = 0.0
    w = np.linalg.solve(x.T @ x + ridge, x.T @ y)
    # Compared through the values the head gives, relative to their spread (the kernel alone can be ill-posed).
    head = np.asarray(doctor.value_head(jnp.asarray(x[:, :-1], jnp.float32))).reshape(-1)
    np.testing.assert_allclose(head, x @ w, rtol=0, atol=1e-3 * np.std(y))
    assert stats["value_fit_states"] == len(y)
    np.testing.assert_allclose(stats["value_fit_target_mean"], y.mean(), rtol=1e-4)
    r2 = 1 - np.sum((y - x @ w) ** 2) / np.sum((y - y.mean()) ** 2)
    np.testing.assert_allclose(stats["value_fit_r2"], r2, atol=1e-3)


def test_prior_log_probs_are_the_starts_log_probs_of_each_response_token(checkpoint, pairs_file):
    """prior_token_logps over batches of 4 (the last one padded) against log-softmax in float64 of the model's
    own logits, sequence by sequence: aligned with input_ids, 0 on the prompt."""
    dataset = rewarded_pairs(pairs_file)
    lm = models.load_hf(checkpoint)
    with_prior = tfpo.prior_token_logps(lm, dataset, data.DataConfig(str(pairs_file), batch_size=4, max_length=32))
    assert with_prior.value_keys[-1] == "prior_logps"
    for example in with_prior.examples:
        for sequence, prior in zip(example.sequences, example.values["prior_logps"], strict=True):
            ids = np.asarray(sequence.ids)[None]
            logits = np.asarray(lm(ids, positions=np.arange(ids.shape[1])[None])[0], np.float64)[0]
            logps = logits - logits.max(-1, keepdims=True)
            logps -= np.log(np.exp(logps).sum(-1, keepdims=True))
            expected = np.zeros(len(sequence))
            for t in range(sequence.prompt_length, len(sequence)):
                expected[t] = logps[t - 1, ids[0, t]]
            np.testing.assert_allclose(prior, expected, rtol=1e-4, atol=1e-4)


def test_a_doctor_with_its_start_as_prior_starts_near_balance(checkpoint, pairs_file, tmp_path):
    """loss.prior: start: the doctor starts equal to its prior, so the first SubTB is made of the token rewards
    alone, far below the surprisal-dominated SubTB without a prior; the run trains with finite losses and the
    exported doctor records the prior."""
    runs = {prior: pipeline.run(run_config(checkpoint, pairs_file, tmp_path / prior, "train.total_steps=2",
                                           f"loss.prior={prior}"))
            for prior in ("none", "start")}
    first = {prior: metrics(Path(run.config.output_dir))[0]["subtb"] for prior, run in runs.items()}
    assert first["start"] < 0.2 * first["none"], first
    assert all(np.isfinite(r["loss"]) for r in metrics(Path(runs["start"].config.output_dir)))
    exported = json.loads((Path(runs["start"].config.output_dir) / "export" / "doctor.json").read_text())
    assert exported["metadata"]["loss"]["prior"] == "start"


def test_a_doctor_started_at_balance_trains_with_the_log_value_hinge(checkpoint, pairs_file, tmp_path):
    """value_init: fit with loss.value_hinge: log_value: the run starts at a far lower SubTB than from log V = 0
    and trains with finite losses; eval.json reports the fit."""
    runs = {init: pipeline.run(run_config(checkpoint, pairs_file, tmp_path / init, "train.total_steps=2",
                                          "loss.value_hinge=log_value", doctor={"value_init": init}))
            for init in ("zero", "fit")}
    first = {init: metrics(Path(run.config.output_dir))[0]["subtb"] for init, run in runs.items()}
    assert first["fit"] < 0.5 * first["zero"]
    assert all(np.isfinite(r["loss"]) for r in metrics(Path(runs["fit"].config.output_dir)))
    fit = json.loads((Path(runs["fit"].config.output_dir) / "eval.json").read_text())
    assert fit["value_fit_r2"] > 0 and fit["value_fit_states"] > 0
    assert "value_fit_r2" not in json.loads((Path(runs["zero"].config.output_dir) / "eval.json").read_text())


def test_value_lr_scale_scales_only_the_value_heads_updates(checkpoint, pairs_file, tmp_path):
    """One step at value_lr_scale 0, 1 and 10: the LM's update is the same, the value head's is 0, u and 10·u
    (Adam's first step sees the same gradients; the factor multiplies the update after it)."""
    runs = {scale: pipeline.run(run_config(checkpoint, pairs_file, tmp_path / str(scale), "train.total_steps=1",
                                           doctor={"value_lr_scale": scale})).model
            for scale in (0.0, 1.0, 10.0)}
    lm = {scale: params(model.lm) for scale, model in runs.items()}
    for path, value in lm[1.0].items():
        np.testing.assert_array_equal(lm[0.0][path], value, err_msg=str(path))
        np.testing.assert_array_equal(lm[10.0][path], value, err_msg=str(path))
    for name in ("kernel", "bias"):
        update = {scale: np.asarray(getattr(model.value_head, name)[...]) for scale, model in runs.items()}
        assert np.all(update[0.0] == 0) and np.any(update[1.0] != 0)  # from the zero start (bias: 0 at init)
        np.testing.assert_allclose(update[10.0], 10.0 * update[1.0], rtol=1e-5, atol=1e-9)


def test_two_dimensions_lora_and_init_layers(checkpoint, pku_file, tmp_path, monkeypatch, capsys):
    """Grouped PKU-SafeRLHF data, a doctor per dimension (each its own pairs), each cut to the first layer of
    the model and trained through LoRA adapters and its value head only; run as `jaxalign train tfpo`, which
    names each dimension's own export and metrics."""
    out = tmp_path / "doctors"
    overrides = ["train.total_steps=2", "data.batch_size=3", "data.buckets=[32]",
                 "model.lora={rank: 2, alpha: 4, targets: [q_proj, v_proj]}"]
    config = run_config(checkpoint, pku_file, out, *overrides,
                        doctor={"dimensions": ["helpfulness", "safety"], "init_layers": 1,
                                "faces": {"helpfulness": FACES["sentiment"], "safety": FACES["politeness"]}})
    config_file = tmp_path / "doctors.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()))
    results = []

    def recorded_run(*args, **kwargs):
        results.append(real_run(*args, **kwargs))
        return results[-1]

    real_run = pipeline.run
    monkeypatch.setattr(pipeline, "run", recorded_run)
    assert cli.main(["train", "tfpo", "--config", str(config_file)]) == 0
    result = results[-1]  # the outer run (the dimensions' own runs came first)
    printed = capsys.readouterr().out
    assert f"  doctors: {out / tfpo.INDEX_FILE}\n" in printed
    for dimension in ("helpfulness", "safety"):
        line = next(line for line in printed.splitlines() if line.startswith(f"  {dimension}: "))
        assert line == (f"  {dimension}: export {out / dimension / 'export'}; metrics "
                        f"{out / dimension / 'metrics.jsonl'} (plot: {out / dimension / 'metrics.png'})")
        named = re.findall(r"(/\S+?)[;)]?(?:\s|$)", line)
        assert len(named) == 3 and all(Path(path).exists() for path in named), named
    assert not (out / "metrics.jsonl").exists() and str(out / "metrics.jsonl") not in printed
    index = json.loads((out / tfpo.INDEX_FILE).read_text())
    assert index["doctors"] == {d: str(out / d / "export") for d in ("helpfulness", "safety")}
    assert set(result.extra["doctors"]) == {"helpfulness", "safety"}
    start = models.first_layers(models.load_hf(checkpoint), 1)
    base = params(start)
    examples = {}
    for dimension in ("helpfulness", "safety"):
        doctor, _, card = models.load_doctor(out / dimension / "export")
        assert card["dimension"] == dimension and card["metadata"]["init_layers"] == 1
        assert card["metadata"]["face"] == config.doctor.resolved_faces()[dimension].__dict__
        assert doctor.lm.config.n_layers == 1 and doctor.lm.config == start.config
        run = json.loads((out / dimension / "run.json").read_text())
        examples[dimension] = run["examples"]
        assert len(metrics(out / dimension)) == 2
        # The merged export differs from the start (adapters trained) only in the adapted projections.
        for path, value in params(doctor.lm).items():
            if path[-2] in ("q_proj", "v_proj"):
                assert not np.array_equal(value, base[path]), path
            else:
                np.testing.assert_array_equal(value, base[path], err_msg=str(path))
    assert examples == {"helpfulness": 6, "safety": 5}  # the last record has no safety pair
    # The trained model (the first dimension's): its LoRA adapters and value head trained, base weights frozen.
    trained = result.model
    assert models.has_lora(trained.lm)
    frozen = params(trained.lm, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    for path, value in frozen.items():
        np.testing.assert_array_equal(value, base[path], err_msg=str(path))
    assert np.any(np.asarray(trained.value_head.kernel[...]) != 0)


# ------------------------------------------------------------------------------------------ what is refused


def test_configs_that_cannot_train_a_doctor_are_named(checkpoint, pairs_file, tmp_path):
    base = {"output_dir": str(tmp_path / "x"), "data": {"source": str(pairs_file)}, "train": {"total_steps": 1}}
    with pytest.raises(ValueError, match=r"method tfpo needs a doctor: section \(patient, dimensions, faces"):
        recipe.load_run_config({**base, "method": "tfpo"})
    with pytest.raises(ValueError, match="RunConfig.doctor is the tfpo method's section; method dpo takes none"):
        recipe.load_run_config({**base, "method": "dpo", "doctor": {"dimensions": ["helpfulness"]}})
    tfpo_base = {**base, "method": "tfpo"}
    for doctor, message in [
        ({"dimensions": ["politeness"]}, r"doctor\.dimensions: no face for 'politeness': give "
                                         r"doctor\.faces\.politeness = \{positive: \.\.\., negative: \.\.\.\}"),
        ({"dimensions": ["helpfulness"], "faces": {"politeness": FACES["politeness"]}},
         r"doctor\.faces names \['politeness'\], which are not in doctor\.dimensions \['helpfulness'\]"),
        ({"dimensions": ["politeness"], "faces": {"politeness": {"positive": "Hi", "negative": "Hi"}}},
         r"doctor\.faces\.politeness: a face's positive and negative prompts are the same text"),
        ({"dimensions": []}, r"doctor\.dimensions must name one or more distinct dimensions, got \[\]"),
        ({"dimensions": ["safety", "safety"]}, r"distinct dimensions, got \['safety', 'safety'\]"),
        ({"dimension": ["safety"]}, r"doctor: unknown key\(s\) \['dimension'\]"),
        ({"init_layers": 0}, r"doctor\.init_layers must be a positive int or null, got 0"),
        ({"value_lr_scale": -1}, r"doctor\.value_lr_scale must be a number >= 0, got -1"),
        ({"value_init": "random"}, r"doctor\.value_init must be 'zero' or 'fit', got 'random'"),
        ({"value_init": "fit"}, r"doctor\.value_init: fit needs loss\.value_hinge: log_value"),
        ({"threshold": 1.5}, r"doctor\.threshold must be in \[0, 1\), got 1\.5"),
        ({"face_format": "html"}, r"doctor\.face_format must be one of \('auto', 'chat', 'text'\), got 'html'"),
    ]:
        with pytest.raises(ValueError, match=message):
            recipe.load_run_config({**tfpo_base, "doctor": doctor})
    with pytest.raises(ValueError, match=r"loss\.value_states \(TFPOSpec\) must be one of \('divergence', 'first'\), "
                                         r"got 'last'"):
        recipe.load_run_config({**tfpo_base, "doctor": {}, "loss": {"value_states": "last"}})
    # init_layers beyond the model's layers: named when the model is known, before any reward is built.
    config = run_config(checkpoint, pairs_file, tmp_path / "deep", doctor={"init_layers": 3})
    with pytest.raises(ValueError, match=r"n_layers must be an int in 1\.\.2 \(the model's layers\), got 3"):
        pipeline.run(config)
    assert not (tmp_path / "deep").exists()  # no token-reward cache either


def test_a_patient_with_another_tokenizer_is_refused(checkpoint, pairs_file, tmp_path):
    patient = tmp_path / "patient"
    models.save_hf(models.load_hf(checkpoint), models.load_hf_config(checkpoint), patient,
                   tiny_tokenizer(swap=("sky", "blue")))
    out = tmp_path / "run"
    message = (rf"the patient \({re.escape(str(patient))}\) and the doctor \({re.escape(str(checkpoint))}\) do not "
               r"share a tokenizer \('blue' is 13 vs 14, 'sky' is 14 vs 13\)")
    with pytest.raises(ValueError, match=message):
        pipeline.run(run_config(checkpoint, pairs_file, out, doctor={"patient": str(patient)}))
    assert not out.exists()  # refused before anything was written


def test_data_without_pairs_on_the_dimension_is_named(pku_file, pairs_file, tmp_path):
    tokenizer = tiny_tokenizer()
    groups = data.build_dataset(data.DataConfig(str(pku_file), max_length=32), tokenizer)
    assert groups.kind == "preference_group" and groups.dimensions == ("helpfulness", "safety")
    with pytest.raises(ValueError, match=rf"{re.escape(str(pku_file))} has preference dimensions \['helpfulness', "
                                         r"'safety'\], not 'politeness': name one of them in doctor\.dimensions"):
        select_dimension(groups, "politeness", str(pku_file))
    safety = select_dimension(groups, "safety", str(pku_file))
    assert safety.kind == "preference" and len(safety) == len(PAIRS) - 1
    assert select_dimension(safety, "anything", "x") is safety  # plain pairs are every dimension's
    sft_file = tmp_path / "sft.jsonl"
    sft_file.write_text(json.dumps({"prompt": "Hi", "completion": " sky"}) + "\n")
    sft = data.build_dataset(data.DataConfig(str(sft_file)), tokenizer)
    with pytest.raises(ValueError, match=rf"method tfpo needs preference pairs; {re.escape(str(sft_file))} holds 'sft' "
                                         r"records"):
        select_dimension(sft, "helpfulness", str(sft_file))
