"""TFPO: LLMDoctor's doctor (arXiv 2601.10416), trained on token rewards from a frozen patient's two faces.

A ``tfpo`` run: load the doctor's starting model (``model``, optionally cut to its first ``doctor.init_layers``
layers) and the frozen patient (``doctor.patient``), check they share a tokenizer, build the token rewards of the
pairs (:mod:`jaxalign.methods.token_rewards`, cached under ``output_dir/token_rewards``), then train the doctor, a
causal LM with a value head, on the TFPO objective (:func:`tfpo_objective`) with the common training core
(checkpoints, exact resume, metrics, TensorBoard, plots), evaluate it on held-out pairs and export it as a doctor
directory (:func:`jaxalign.models.save_doctor`: HF checkpoint + value head + ``doctor.json``).

One doctor per preference dimension (``doctor.dimensions``): a run with several trains them one after the other,
each in ``output_dir/<dimension>`` (its own checkpoints, metrics and export), and writes ``doctors.json`` naming
the exports. Why not one doctor with several heads: guided decoding weighs a *policy* per dimension
(``π_patient^α · Π_i π_doctor_i^{β_i}``), and value heads alone do not give one; a doctor per dimension can be
retrained, added or dropped without touching the others, and each may be of another size. The cost is one
doctor forward pass per dimension and token at decode time (docs/llmdoctor.md).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxalign import data as jdata
from jaxalign import losses, models
from jaxalign.methods.common import frozen_model_spec, load_pretrained, lora_config, one_pass, without_loss
from jaxalign.methods.recipe import RunConfig
from jaxalign.methods.token_rewards import build_token_rewards, patient_identity
from jaxalign.models.scoring import DEFAULT_CHUNK, head_logps
from jaxalign.train.mesh import make_mesh

TOKEN_REWARDS_DIR = "token_rewards"
INDEX_FILE = "doctors.json"


def tfpo_objective(*, lam: float | None = None, lam_value: float = 1.0, gamma: float = 0.1,
                   value_states: str = "divergence", anchor_terminal: bool = True, reward_scale: float = 1.0,
                   value_hinge: str = "value", prior: str = "none", chunk_size: int | None = DEFAULT_CHUNK):
    """The TFPO objective of a doctor (:class:`~jaxalign.models.CausalLMWithValueHead`) on pair batches
    ``[B, 2, T]`` carrying ``token_rewards`` (aligned with ``input_ids``).

    One trunk pass over both responses gives the doctor's log-probs of the response tokens (its policy π̂) and
    its value head's ``log V`` at every state; :func:`jaxalign.losses.tfpo_loss` does the rest: subtrajectory
    balance of the flows ``log F(s_t) = Σ_{k<t} reward_scale·r_k + log V(s_t)`` on each response plus
    ``lam_value·max(0, γ − (V(s_t, y_w) − V(s_t, y_l)))`` at the states ``value_states`` selects (``divergence``:
    after the first token where the responses differ; ``first``: after each response's first token). A pair
    whose responses never differ (one a prefix of the other without EOS) has no divergence state and contributes
    SubTB only.

    ``prior="start"``: the batches also carry ``prior_logps`` (:func:`prior_token_logps`, the log-probs of the
    doctor's frozen start), added to the prefix scores: the doctor learns ``π̂ ∝ π₀·exp(reward_scale·Σ r)``.
    """
    if value_states not in ("divergence", "first"):
        raise ValueError(f"tfpo_objective: value_states must be 'divergence' or 'first', got {value_states!r}")
    if prior not in ("none", "start"):
        raise ValueError(f"tfpo_objective: prior must be 'none' or 'start', got {prior!r}")

    def objective(model, batch, *, key):
        del key
        if "token_rewards" not in batch:
            raise ValueError("tfpo_objective: the batch has no token_rewards (build them with "
                             "jaxalign.methods.token_rewards.build_token_rewards)")
        if prior == "start" and "prior_logps" not in batch:
            raise ValueError("tfpo_objective(prior='start'): the batch has no prior_logps (attach them with "
                             "jaxalign.methods.tfpo.prior_token_logps)")
        ids = batch["input_ids"]
        pairs, _, length = ids.shape

        def flat(name):
            return batch[name].reshape(2 * pairs, length)

        hidden, _ = model.lm.hidden_states(flat("input_ids"), positions=flat("positions"),
                                           attention_mask=flat("attention_mask"))
        logps = head_logps(model.lm, hidden[:, :-1], flat("input_ids")[:, 1:], chunk_size=chunk_size)
        log_v = model.value_head(hidden)
        mask = batch["loss_mask"][..., 1:]
        value_mask = None
        if value_states == "divergence":
            targets = ids[..., 1:]
            chosen_at, rejected_at = losses.first_divergence_mask(targets[:, 0], targets[:, 1], mask[:, 0], mask[:, 1])
            value_mask = jnp.stack([chosen_at, rejected_at], axis=1)
        prior_logps = batch["prior_logps"][..., 1:] if prior == "start" else None
        per_pair, metrics = losses.tfpo_loss(
            logps.reshape(pairs, 2, length - 1), log_v.reshape(pairs, 2, length),
            reward_scale * batch["token_rewards"][..., 1:], mask, value_mask, prior_logps, lam=lam, lam_value=lam_value,
            gamma=gamma, anchor_terminal=anchor_terminal, value_hinge=value_hinge)
        valid = batch["example_mask"].astype(bool)
        return losses.masked_sum(per_pair, valid), without_loss(metrics)

    return objective


def fit_value_head(doctor, dataset: jdata.TokenizedDataset, data_config: jdata.DataConfig, *,
                   reward_scale: float = 1.0, ridge: float = 1e-3, anchor_terminal: bool = True,
                   chunk_size: int | None = DEFAULT_CHUNK, desc: str = "value head start") -> dict[str, float]:
    """Start the doctor's value head at the least-squares fit of the log values that balance its training pairs.

    The targets are :func:`jaxalign.losses.balance_log_values` of each response under the starting policy (the
    rest of the response's ``Σ (reward_scale·r − log π̂)``, plus ``log π₀`` when the pairs carry a prior's
    ``prior_logps``) at every non-terminal state of its trajectory, and
    also at its terminal state (target 0) when ``anchor_terminal`` is False, since the head's value there is then
    read too; the features are the states' final hidden states, which the head reads. One forward pass over
    ``dataset`` accumulates ``XᵀX`` and ``Xᵀy`` (float64, bias column included), then
    ``(XᵀX + ridge·s·I) w = Xᵀy`` sets kernel and bias, with ``s`` the features' mean variance (the diagonal of
    the centred ``XᵀX`` over the states, so a large common offset of the hidden states does not inflate the
    shrinkage) and the bias unregularised. The shared prompt state of a pair gets one target per
    response, and least squares takes their mean: the common part of the two responses' flows, which is what
    subtrajectory balance would otherwise push into the policy (raising every training token) before the head
    caught up.

    Returns ``{"value_fit_r2", "value_fit_rmse", "value_fit_target_mean", "value_fit_states"}`` on the pairs.
    Single process only: each host would fit on its own shard of the pairs.
    """
    if ridge < 0:
        raise ValueError(f"{desc}: ridge must be >= 0, got {ridge}")
    graphdef, state = nnx.split(doctor)

    @jax.jit
    def moments(state, batch):
        model = nnx.merge(graphdef, state)
        pairs, _, length = batch["input_ids"].shape

        def flat(name):
            return batch[name].reshape(2 * pairs, length)

        hidden, _ = model.lm.hidden_states(flat("input_ids"), positions=flat("positions"),
                                           attention_mask=flat("attention_mask"))
        logps = head_logps(model.lm, hidden[:, :-1], flat("input_ids")[:, 1:], chunk_size=chunk_size)
        mask = flat("loss_mask")[:, 1:].astype(bool)
        rewards = reward_scale * flat("token_rewards")[:, 1:]
        if "prior_logps" in batch:  # loss.prior: start, attached before the fit
            rewards += flat("prior_logps")[:, 1:]
        targets = losses.balance_log_values(logps, rewards, mask)
        states = losses.non_terminal_states(mask)
        if not anchor_terminal:  # the terminal state follows the last non-terminal one (never at index 0)
            states |= jnp.roll(states, 1, axis=-1)
        states &= jnp.repeat(batch["example_mask"].astype(bool), 2)[:, None]
        weight = states.astype(jnp.float32)
        features = jnp.concatenate([hidden.astype(jnp.float32), jnp.ones(hidden.shape[:-1] + (1,))], axis=-1)
        features = jnp.where(states[..., None], features, 0.0)  # garbage at other states never enters
        targets = jnp.where(states, targets, 0.0)
        highest = jax.lax.Precision.HIGHEST  # no bf16 passes on accelerators: these are sums of squares
        return (jnp.einsum("btd,bte->de", features, features, precision=highest),
                jnp.einsum("btd,bt->d", features, targets, precision=highest),
                jnp.sum(targets), jnp.sum(targets**2), jnp.sum(weight))

    sums = None
    total = -(-len(dataset) // data_config.batch_size)
    for batch in tqdm(one_pass(data_config, dataset), total=total, desc=desc, unit="batch", dynamic_ncols=True):
        parts = [np.asarray(part, np.float64) for part in moments(state, batch)]
        sums = parts if sums is None else [a + b for a, b in zip(sums, parts, strict=True)]
    count = 0 if sums is None else sums[-1]
    if count < 2:
        raise ValueError(f"{desc}: doctor.value_init: fit needs response states to fit the value head on; the "
                         f"training pairs have {int(count)}")
    xtx, xty, y_sum, y_sq, count = sums
    centred_diag = np.diag(xtx)[:-1] - xtx[:-1, -1] ** 2 / count  # Σ x² − (Σ x)²/n per feature
    regulariser = ridge * max(float(np.mean(centred_diag)), 0.0) * np.eye(len(xty))
    regulariser[-1, -1] = 0.0  # the bias is not shrunk
    solution = np.linalg.solve(xtx + regulariser, xty)
    head = doctor.value_head
    head.kernel[...] = jnp.asarray(solution[:-1, None], head.kernel[...].dtype)
    head.bias[...] = jnp.asarray(solution[-1:], head.bias[...].dtype)
    residual = y_sq - 2 * solution @ xty + solution @ xtx @ solution  # Σ (y − x·w)², from the moments
    variance = y_sq - y_sum**2 / count
    return {"value_fit_r2": float(1 - residual / variance) if variance > 0 else 1.0,
            "value_fit_rmse": float(np.sqrt(max(residual, 0.0) / count)),
            "value_fit_target_mean": float(y_sum / count), "value_fit_states": int(count)}


def prior_token_logps(lm, dataset: jdata.TokenizedDataset, data_config: jdata.DataConfig, *,
                      chunk_size: int | None = DEFAULT_CHUNK, desc: str = "prior log-probs") -> jdata.TokenizedDataset:
    """The pairs with ``prior_logps``: the log-prob of every response token under ``lm`` (the doctor's frozen
    start, ``loss.prior: start``), aligned with ``input_ids`` (0 on prompt tokens and holes); one forward pass."""
    graphdef, state = nnx.split(lm)

    @jax.jit
    def response_logps(state, ids, positions, attention_mask, loss_mask):
        model = nnx.merge(graphdef, state)
        hidden, _ = model.hidden_states(ids, positions=positions, attention_mask=attention_mask)
        logps = head_logps(model, hidden[:, :-1], ids[:, 1:], chunk_size=chunk_size)
        return jnp.concatenate([jnp.zeros_like(logps[:, :1]), jnp.where(loss_mask[:, 1:] > 0, logps, 0.0)], axis=1)

    values, index = [], 0
    total = -(-len(dataset) // data_config.batch_size)
    for batch in tqdm(one_pass(data_config, dataset), total=total, desc=desc, unit="batch", dynamic_ncols=True):
        pairs, sides, length = batch["input_ids"].shape
        arrays = [np.asarray(batch[name]).reshape(pairs * sides, length)
                  for name in ("input_ids", "positions", "attention_mask", "loss_mask")]
        rows = np.asarray(response_logps(state, *arrays)).reshape(pairs, sides, length)
        for row in range(int(np.sum(batch["example_mask"]))):  # padding rows come last
            sequences = dataset.examples[index].sequences
            values.append(tuple(None if sequence is None else rows[row, side, :len(sequence)]
                                for side, sequence in enumerate(sequences)))
            index += 1
    return dataset.with_token_values("prior_logps", values)


def select_dimension(dataset: jdata.TokenizedDataset, dimension: str, source: str) -> jdata.TokenizedDataset:
    """The pairs of one dimension of a grouped dataset (records without a pair on it are left out, counted);
    a pair dataset is returned as it is."""
    if dataset.kind == "preference":
        return dataset
    if dataset.kind != "preference_group":
        raise ValueError(f"method tfpo needs preference pairs; {source} holds {dataset.kind!r} records")
    if dimension not in dataset.dimensions:
        raise ValueError(f"{source} has preference dimensions {list(dataset.dimensions)}, not {dimension!r}: name "
                         "one of them in doctor.dimensions")
    d = dataset.dimensions.index(dimension)
    examples = []
    for example in dataset.examples:
        pair = example.sequences[2 * d:2 * d + 2]
        if None in pair:
            continue
        values = {"margin": float(np.asarray(example.values["margin"])[d])} if "margin" in example.values else {}
        examples.append(dataclasses.replace(example, sequences=tuple(pair), values=values))
    if not examples:
        raise ValueError(f"{source}: no record has a pair on dimension {dimension!r}")
    return dataclasses.replace(dataset, kind="preference", layout=(2,), examples=examples, dimensions=(),
                               value_keys=("margin",) if "margin" in dataset.value_keys else ())


def per_dimension(config: RunConfig) -> list[RunConfig]:
    """One run config per dimension of ``config.doctor``, each in ``output_dir/<dimension>``."""
    out = Path(config.output_dir)
    runs = []
    for dimension in config.doctor.dimensions:
        faces = {dimension: config.doctor.faces[dimension]} if dimension in config.doctor.faces else {}
        doctor = dataclasses.replace(config.doctor, dimensions=(dimension,), faces=faces)
        train = dataclasses.replace(
            config.train, checkpoint=dataclasses.replace(config.train.checkpoint, directory=None),
            log=dataclasses.replace(config.train.log, directory=None))
        runs.append(dataclasses.replace(config, output_dir=str(out / dimension), doctor=doctor, train=train))
    return runs


def _token_rewards(config: RunConfig, patient, identity, tokenizer, dataset, split: str, data_config):
    dimension = config.doctor.dimensions[0]
    return build_token_rewards(
        patient, tokenizer, dataset, config.doctor.resolved_faces()[dimension], settings=config.doctor.settings(),
        face_format=config.doctor.face_format, chat_template=data_config.rendering().chat_template,
        batch_size=config.doctor.rewards_batch_size or data_config.batch_size,
        cache_dir=Path(config.output_dir) / TOKEN_REWARDS_DIR / split, mesh=make_mesh(config.train.mesh),
        identity=identity, chunk_size=config.loss.chunk_size, desc=f"token rewards ({dimension}, {split})")


def build(config: RunConfig, lm, tokenizer, dataset, eval_dataset):
    """``(doctor, objective, references, dataset, extra)`` for the pipeline; ``extra["eval_dataset"]`` is the
    held-out pairs with their token rewards (both made with the patient, which is then released)."""
    doctor_spec = config.doctor
    dimension = doctor_spec.dimensions[0]
    if doctor_spec.value_init == "fit" and jax.process_count() > 1:
        raise NotImplementedError("doctor.value_init: fit solves the value head's least squares on one process; "
                                  f"this run has {jax.process_count()} (use value_init: zero)")
    dataset = select_dimension(dataset, dimension, config.data.name)
    if eval_dataset is not None:
        eval_dataset = select_dimension(eval_dataset, dimension, config.eval_data.name)
    if doctor_spec.init_layers is not None:  # before the patient's pass: a bad init_layers costs no reward build
        lm = _first_layers(lm, doctor_spec.init_layers, config.model.quantize)
    patient, patient_tokenizer = load_pretrained(frozen_model_spec(config.model, doctor_spec.patient),
                                                 source="doctor.patient")
    models.check_same_tokenizer(patient_tokenizer, tokenizer,
                                patient=f"the patient ({doctor_spec.patient or 'embedded default'})",
                                doctor=f"the doctor ({config.model.path or 'embedded default'})")
    identity = patient_identity(patient, doctor_spec.patient)
    if config.model.quantize is not None:  # a quantised patient's rewards are not the float patient's
        identity["quantize"] = dataclasses.asdict(config.model.quantize)
    dataset = _token_rewards(config, patient, identity, tokenizer, dataset, "train", config.data)
    if eval_dataset is not None:
        eval_dataset = _token_rewards(config, patient, identity, tokenizer, eval_dataset, "eval", config.eval_data)
    del patient
    if config.loss.prior == "start":  # the start, before LoRA or training moves it
        dataset = prior_token_logps(lm, dataset, config.data, chunk_size=config.loss.chunk_size,
                                    desc=f"prior log-probs ({dimension}, train)")
        if eval_dataset is not None:
            eval_dataset = prior_token_logps(lm, eval_dataset, config.eval_data, chunk_size=config.loss.chunk_size,
                                             desc=f"prior log-probs ({dimension}, eval)")
    if config.model.lora is not None:
        models.apply_lora(lm, lora_config(config), rngs=nnx.Rngs(config.train.seed))
    doctor = models.CausalLMWithValueHead(lm, rngs=nnx.Rngs(config.train.seed))
    # log V starts at 0 (V = 1) at every state: the flows start as the rewards' Q alone, and the hinge on V itself
    # starts from comparable values (a random head gives log V of several nats and V that differ by orders).
    doctor.value_head.kernel[...] = jnp.zeros_like(doctor.value_head.kernel[...])
    value_fit = {}
    if doctor_spec.value_init == "fit":
        value_fit = fit_value_head(doctor, dataset, config.data, reward_scale=config.loss.reward_scale,
                                   anchor_terminal=config.loss.anchor_terminal, chunk_size=config.loss.chunk_size,
                                   desc=f"value head start ({dimension})")
    objective = tfpo_objective(**dataclasses.asdict(config.loss))
    extra = {"eval_dataset": eval_dataset, "dimension": dimension,
             "patient": doctor_spec.patient or "embedded SmolLM2-135M-Instruct",
             "token_rewards": _summary(dataset), **value_fit}
    return doctor, objective, None, dataset, extra


def _first_layers(lm, n_layers: int, quantize):
    """The doctor's start of ``n_layers`` layers; a quantised start is cut from its dequantised weights and
    quantised again (the cut takes float layers)."""
    if quantize is None:
        return models.first_layers(lm, n_layers)
    return models.quantize_model(models.first_layers(models.merge_for_export(lm), n_layers), quantize)


def _summary(dataset: jdata.TokenizedDataset) -> dict[str, float]:
    """How dense and how strong the token rewards of the training pairs are (logged in eval.json)."""
    chosen, rejected = [], []
    for example in dataset.examples:
        for side, values in zip((chosen, rejected), example.values["token_rewards"], strict=True):
            side.append(values)
    chosen, rejected = np.concatenate(chosen), np.concatenate(rejected)
    return {"chosen_rewarded_fraction": float(np.mean(chosen > 0)), "rejected_rewarded_fraction":
            float(np.mean(rejected < 0)), "chosen_mean_sum": float(np.sum(chosen) / len(dataset)),
            "rejected_mean_sum": float(np.sum(rejected) / len(dataset))}


def export(config: RunConfig, doctor, tokenizer, extra) -> Path:
    """The trained doctor as a doctor directory in ``output_dir/export`` (LoRA adapters merged by ``save_hf``)."""
    face = config.doctor.resolved_faces()[extra["dimension"]]
    metadata = {"patient": extra["patient"], "face": dataclasses.asdict(face), "face_format": config.doctor.face_format,
                "token_rewards": dataclasses.asdict(config.doctor.settings()), "loss": dataclasses.asdict(config.loss),
                "init_layers": config.doctor.init_layers, "run": config.output_dir}
    return models.save_doctor(Path(config.output_dir) / "export", doctor, tokenizer, dimension=extra["dimension"],
                              metadata=metadata)
