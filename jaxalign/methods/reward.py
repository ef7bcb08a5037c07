"""Reward models: Bradley–Terry on pairs (margins, centring, one head per preference dimension), best-of-N
softmax cross-entropy, and regression on scalar scores (ADLF's ``meta_eval_score``); the normalisation fitted on
the reference policy's samples, or the scores' own scale for regression; the export."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxalign import data as jdata
from jaxalign import losses, models
from jaxalign.methods import contrastive as contrastive_term
from jaxalign.methods.common import (
    EXPORT_DIR,
    F32,
    flat_rows,
    load_pretrained,
    lora_config,
    pair_layout,
    stop_ids,
    without_loss,
)
from jaxalign.methods.recipe import RunConfig
from jaxalign.methods.specs import REWARD_LOSSES, ContrastiveSpec
from jaxalign.rollout import Sampler, SamplingParams


def reward_objective(*, loss: str = "bradley_terry", use_margin: bool = False, margin_scale: float = 1.0,
                     center_coef: float = 0.0, dimension_weights: Sequence[float] | None = None,
                     regression: str | None = None, score_mean: float = 0.0, score_std: float = 1.0,
                     contrastive: ContrastiveSpec | dict | None = None):
    """Reward-model training on pair ``[B, 2, T]`` (or shared-prompt rows, the prompt run once:
    :class:`~jaxalign.data.SharedPairBatch`), group ``[B, D, 2, T]``, best-of-N ``[B, N, T]`` or scored
    ``[B, T]`` batches.

    ``bradley_terry``: ``−log σ(r⁺ − r⁻ − m)`` with ``m = margin_scale·margin`` when ``use_margin`` (the data's
    margins, e.g. a score gap; Llama 2's margin loss) plus ``center_coef·(r⁺ + r⁻)²``; per dimension for
    groups, weighted by ``dimension_weights``. ``best_of_n``: softmax cross-entropy over the N candidates.
    ``regression``: :func:`jaxalign.losses.regression_loss` (``regression``: ``mse`` or ``gaussian_nll``) of each
    sequence's reward against its normalised score ``(score − score_mean) / score_std``, averaged over examples.
    The model is a :class:`~jaxalign.models.RewardModel` (with ``num_objectives=D`` for groups, a log-variance
    output for ``gaussian_nll``); ``key`` draws its head's dropout. A batch that carries ``features``
    (``[..., D]``, each sequence's pooled trunk state in place of its tokens) is scored by the head alone: how
    :mod:`jaxalign.methods.probe` fits a head on a frozen trunk.

    ``contrastive`` (:class:`~jaxalign.methods.specs.ContrastiveSpec`, ``bradley_terry`` on pairs only) adds
    ``weight × InfoNCE`` per pair on the trunk's pooled states of the same forward pass
    (:mod:`jaxalign.methods.contrastive`).
    """
    contrastive = ContrastiveSpec.from_value(contrastive)
    if contrastive is not None and loss != "bradley_terry":
        raise ValueError(f"reward_objective: loss.contrastive contrasts a pair's chosen and rejected responses; "
                         f"loss={loss!r} has no pairs (use bradley_terry)")
    if loss not in REWARD_LOSSES:
        raise ValueError(f"reward_objective: loss must be one of {REWARD_LOSSES}, got {loss!r}")
    if not score_std > 0:
        raise ValueError(f"reward_objective: score_std must be > 0, got {score_std}")
    weights = None if dimension_weights is None else jnp.asarray(dimension_weights, F32)
    kind = regression or "mse"

    def rewards_of(model, batch, key):
        if "branch_ids" in batch:  # shared-prompt pair rows: the prompt once, each side pooled with it
            return model.branch_rewards(batch["input_ids"], attention_mask=batch["attention_mask"],
                                        positions=batch["positions"], branch_ids=batch["branch_ids"], branches=2,
                                        key=key)
        if "features" in batch:  # pooled trunk features computed once (a frozen trunk, jaxalign.methods.probe)
            layout = batch["features"].shape[:-1]
            flat = model.reward_head.project(flat_rows(batch, "features"), key=key)
        else:
            layout = batch["input_ids"].shape[:-1]
            flat = model(flat_rows(batch, "input_ids"), attention_mask=flat_rows(batch, "attention_mask"),
                         positions=flat_rows(batch, "positions"), key=key)
        if flat.ndim == 2:  # a D-objective head reads [R, D]: keep the reward of each row's own dimension
            flat = flat.reshape(*layout, flat.shape[-1])
            if len(layout) != 3:
                raise ValueError(f"reward_objective: a {flat.shape[-1]}-objective head needs group batches "
                                 f"[B, D, 2, T]; got a batch of layout {tuple(layout)}")
            # group row d is the pair of dimension d: take head output d
            return jnp.einsum("bdpd->bdp", flat)
        return flat.reshape(layout)

    def pair_rewards_and_hidden(model, batch, key):
        """``(rewards [B, 2], hidden)`` of pair batches from one trunk pass (the rewards as ``rewards_of``'s)."""
        if "branch_ids" in batch:
            real, branches = batch["attention_mask"].astype(bool), batch["branch_ids"]
            hidden, _ = model.backbone(batch["input_ids"], positions=batch["positions"], attention_mask=real,
                                       branch_ids=branches)
            sides = [model.reward_head(hidden, real & ((branches == 0) | (branches == c)),
                                       key=None if key is None else jax.random.fold_in(key, c)) for c in (1, 2)]
            return jnp.stack(sides, axis=1), hidden
        if batch["input_ids"].ndim != 3 or "features" in batch:
            raise ValueError("reward_objective: loss.contrastive needs pair batches [B, 2, T] or shared-prompt rows")
        mask = flat_rows(batch, "attention_mask")
        hidden, _ = model.backbone(flat_rows(batch, "input_ids"), positions=flat_rows(batch, "positions"),
                                   attention_mask=mask)
        return model.reward_head(hidden, mask, key=key).reshape(batch["input_ids"].shape[:-1]), hidden

    def regress(model, batch, key):
        features = batch.get("features")  # pooled once (a frozen trunk, jaxalign.methods.probe)
        if "score" not in batch or (features if features is not None else batch["input_ids"]).ndim != 2:
            raise ValueError("reward_objective: loss='regression' needs scored sequence batches [B, T] with "
                             "'score' (scored conversations, prompt/completion records with a score)")
        valid = batch["example_mask"].astype(bool)
        targets = (batch["score"] - score_mean) / score_std
        if features is not None:
            head = model.reward_head
            outputs = (head.project_with_log_variance(features, key=key) if kind == "gaussian_nll"
                       else (head.project(features, key=key), None))
        else:
            rows = dict(attention_mask=batch["attention_mask"], positions=batch["positions"], key=key)
            outputs = (model.mean_and_log_variance(batch["input_ids"], **rows) if kind == "gaussian_nll"
                       else (model(batch["input_ids"], **rows), None))
        predictions, log_variance = outputs
        per, metrics = losses.regression_loss(predictions, targets, valid, kind=kind, log_variance=log_variance)
        return losses.masked_sum(per, valid), without_loss(metrics)

    def objective(model, batch, *, key):
        if loss == "regression":
            return regress(model, batch, key)
        if (loss == "best_of_n") != ("best" in batch):  # shapes alone cannot tell 2 candidates from a pair
            raise ValueError(f"reward_objective: loss={loss!r} on "
                             f"{'best-of-N batches' if 'best' in batch else 'pair batches (no best index)'}; "
                             f"use loss={'best_of_n' if 'best' in batch else 'bradley_terry'}")
        hidden = None
        if contrastive is None:
            rewards = rewards_of(model, batch, key)
        else:
            rewards, hidden = pair_rewards_and_hidden(model, batch, key)
        valid = batch["example_mask"].astype(bool)
        if loss == "best_of_n":
            candidates = batch["candidate_mask"].astype(bool) & valid[:, None]
            per, metrics = losses.best_of_n_loss(rewards, batch["best"], candidates)
            return losses.masked_sum(per, valid), without_loss(metrics)
        chosen, rejected = rewards[:, ..., 0], rewards[:, ..., 1]
        mask = valid if chosen.ndim == 1 else valid[:, None] & batch["pair_mask"].astype(bool)
        if use_margin and "margin" not in batch:
            raise ValueError("reward_objective: use_margin=True but the batches carry no 'margin' (the data's "
                             "records have no margin field)")
        margin = margin_scale * batch["margin"] if use_margin else None
        per, metrics = losses.bradley_terry_loss(chosen, rejected, mask, margin=margin, center_coef=center_coef,
                                                 weights=weights)
        if hidden is not None:
            extra, contrastive_metrics = contrastive_term.contrastive_term(model, hidden, batch, contrastive)
            per, metrics = per + contrastive.weight * extra, {**metrics, **contrastive_metrics}
        return losses.masked_sum(per, valid if per.ndim == 1 else mask), without_loss(metrics)

    return objective


def build(config: RunConfig, lm, tokenizer, dataset):
    name = config.data.name
    if dataset.kind not in ("preference", "preference_group", "best_of_n", "sft"):
        raise ValueError(f"method reward needs preference pairs, groups, best-of-N records or scored records; "
                         f"{name} holds {dataset.kind!r} records")
    spec = config.loss
    num_objectives, pooling = spec.num_objectives, spec.pooling
    options = spec.objective_options()
    extra: dict[str, Any] = {}
    if dataset.kind == "sft":
        if options.setdefault("loss", "regression") != "regression":
            raise ValueError(f"{name} holds scored records (one response and its score each), but "
                             f"loss.loss={options['loss']} trains on preferences: set loss.loss=regression")
        if config.data.score_template is not None:
            raise ValueError("data.score_template writes each record's score into its prompt: a reward model "
                             "regressed on the scores would read its own target; unset data.score_template")
        scores = score_statistics(dataset, normalize=spec.normalize_scores is not False)
        options.update(score_mean=scores["mean"], score_std=scores["std"])
        extra["scores"] = {**scores, "loss": spec.regression or "mse"}
    elif options.get("loss") == "regression" or spec.regression is not None or spec.normalize_scores is not None:
        raise ValueError(f"loss.loss=regression fits a reward model to scored records (ADLF conversations with "
                         f"meta_eval_score, prompt/completion records with a score); {name} holds "
                         f"{dataset.kind!r} records: use loss.loss=bradley_terry (or best_of_n)")
    elif dataset.kind == "best_of_n":
        # Never the pairwise loss on N candidates: it would read samples 0 and 1 as chosen/rejected, ignoring "best".
        if options.setdefault("loss", "best_of_n") != "best_of_n":
            raise ValueError(f"{name} holds best-of-N records (N samples and the index of the best), "
                             f"but loss.loss={options['loss']} trains chosen/rejected pairs (the preset sets it for "
                             "pair data): set loss.loss=best_of_n")
    elif options.get("loss") == "best_of_n":
        raise ValueError(f"loss.loss=best_of_n needs best-of-N records (OpenAI lm-human-preferences: query, "
                         f"sample0..N-1, best); {name} holds {dataset.kind!r} records: set "
                         "loss.loss=bradley_terry")
    if dataset.kind == "preference_group":
        num_objectives = num_objectives or len(dataset.dimensions)
        if num_objectives != len(dataset.dimensions):
            raise ValueError(f"loss.num_objectives={num_objectives}, but the data has {len(dataset.dimensions)} "
                             f"dimensions {dataset.dimensions}")
    elif options.get("dimension_weights") is not None or (num_objectives or 1) > 1:
        raise ValueError(f"loss.dimension_weights / num_objectives are for a reward head per dimension of grouped "
                         f"data; {name} gives {dataset.kind!r} records (one reward): set "
                         "loss.dimension_weights=null")
    if config.model.lora is not None:
        models.apply_lora(lm, lora_config(config), rngs=nnx.Rngs(config.train.seed))
    head = config.model.reward_head
    shape = {} if head is None else {"hidden": head.hidden, "dropout": head.dropout, "activation": head.activation}
    model = models.RewardModel(lm, num_objectives=num_objectives, pooling=pooling,
                               log_variance=options.get("regression") == "gaussian_nll",
                               rngs=nnx.Rngs(config.train.seed), **shape)
    if spec.contrastive is not None:
        if dataset.kind != "preference" or config.freeze_backbone:
            raise ValueError(f"loss.contrastive trains the trunk on preference pairs; {name} holds {dataset.kind!r} "
                             f"records{' and freeze_backbone keeps the trunk frozen' if config.freeze_backbone else ''}"
                             ": unset loss.contrastive")
        options["contrastive"] = spec.contrastive
        contrastive_term.attach_projection(model, spec.contrastive, seed=config.train.seed)
    if dataset.kind == "preference" and not config.freeze_backbone:  # the probe pools each sequence on its own
        dataset = pair_layout(dataset, lm, shared_prompt=spec.shared_prompt, targets=False)
    extra.update({"dimensions": list(dataset.dimensions), "num_objectives": num_objectives})
    return model, reward_objective(**options), None, dataset, extra


def score_statistics(dataset: jdata.TokenizedDataset, *, normalize: bool = True) -> dict[str, Any]:
    """The training scores' ``mean``, ``std`` (population) and ``count`` (each example once, whatever a mixture's
    weights), which a regression reward model fits ``(score − mean) / std`` with; ``normalize=False`` gives
    mean 0 and std 1 (raw scores), and reports the statistics as ``score_mean``/``score_std``.

    Raises:
        DataError: the records carry no score, naming the first record and the field.
        ValueError: every score is the same (nothing to regress).
    """
    if "score" not in dataset.value_keys:
        first = dataset.examples[0].origin if dataset.examples else None
        raise jdata.DataError("has no score: loss.loss=regression fits the reward model to each record's score "
                              "(ADLF: meta_eval_score; prompt/completion, messages and medical_qa records: score)",
                              where=first, field="score", reason=jdata.Reason.MISSING_FIELD)
    values = np.asarray([float(e.values["score"]) for e in dataset.examples], np.float64)
    mean, std = float(values.mean()), float(values.std())
    if not std > 0:
        raise ValueError(f"every one of the {len(values)} training scores is {mean:g}: a reward model regressed on "
                         "them can only learn that constant; give records with different scores")
    if not normalize:
        return {"mean": 0.0, "std": 1.0, "count": len(values), "normalized": False, "score_mean": mean,
                "score_std": std}
    return {"mean": mean, "std": std, "count": len(values), "normalized": True}


def prompts_of(dataset: jdata.TokenizedDataset, count: int) -> list[list[int]]:
    """The prompt tokens of the first ``count`` examples (the shared prompt of a pair)."""
    prompts = []
    for example in dataset.examples[:count]:
        sequence = next(s for s in example.sequences if s is not None)
        prompts.append([int(t) for t in sequence.ids[:sequence.prompt_length]])
    return prompts


def fit_reward_normalization(reward_model: nnx.Module, policy: nnx.Module, prompts: list[list[int]], *,
                             max_new_tokens: int, stop_token_ids: tuple[int, ...], seed: int = 0,
                             batch_size: int = 16) -> tuple[Any, Any, dict[str, float]]:
    """Gain and bias that give the reference policy's samples reward mean 0 and std 1.

    Samples one response per prompt from ``policy`` (temperature 1, no filters), scores prompt + response
    with the raw head and returns ``(gain, bias, stats)`` with ``gain = 1/std``, ``bias = −mean/std``
    (per objective for a multi-objective head), as lm-human-preferences normalises its reward model.
    """
    sampler = Sampler(policy)
    graphdef, state = nnx.split(reward_model)

    @jax.jit
    def score(state, tokens, mask):
        return nnx.merge(graphdef, state)(tokens, attention_mask=mask)

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, stop_token_ids=stop_token_ids)
    rewards = []
    with tqdm(total=len(prompts), unit="prompt", desc="reward normalisation", dynamic_ncols=True) as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            padded = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one compiled shape
            rollout = sampler.generate(padded, key=jax.random.fold_in(jax.random.key(seed), start), params=params)
            tokens, mask = rollout.sequences()
            rewards.append(np.asarray(score(state, tokens, mask))[:len(chunk)])
            bar.update(len(chunk))
    values = np.concatenate(rewards).astype(np.float64)
    mean, std = values.mean(axis=0), np.maximum(values.std(axis=0), 1e-6)
    gain, bias = 1.0 / std, -mean / std
    stats = {"raw_mean": np.asarray(mean).tolist(), "raw_std": np.asarray(std).tolist(), "samples": len(values)}
    return np.asarray(gain).tolist(), np.asarray(bias).tolist(), stats


def finish(config: RunConfig, model, tokenizer, dataset, extra: dict[str, Any]) -> Path | None:
    """Fit the normalisation on the reference policy's samples and export the reward model. A regression model
    is not renormalised: its gain and bias are the training scores' std and mean, so that it scores on their
    scale."""
    base, _ = load_pretrained(dataclasses.replace(config.model, lora=None))
    gain, bias = 1.0, 0.0
    metadata: dict[str, Any] = {"dimensions": extra.get("dimensions", [])}
    if "scores" in extra:
        gain, bias = extra["scores"]["std"], extra["scores"]["mean"]
        extra["normalization"] = {"gain": gain, "bias": bias, "from": "the training scores' std and mean"}
        metadata["scores"] = extra["scores"]
    elif config.normalize_samples:
        prompts = prompts_of(dataset, config.normalize_samples)
        gain, bias, stats = fit_reward_normalization(
            model, base, prompts, max_new_tokens=config.normalize_max_new_tokens,
            stop_token_ids=stop_ids(base, tokenizer), seed=config.train.seed)
        extra["normalization"] = {"gain": gain, "bias": bias, **stats}
    if not config.export or jax.process_index() != 0:
        return None
    # Written in float: a quantised trunk dequantised and adapters merged (the base is the file's causal LM).
    model.backbone, base = models.merge_for_export(model.backbone), models.merge_for_export(base)
    weights = None
    if extra.get("num_objectives"):
        # The training loss's weights are the default combination of the normalised objectives.
        weights = config.loss.dimension_weights or [1.0] * extra["num_objectives"]
    return models.save_reward_model(Path(config.output_dir) / EXPORT_DIR, model, base, tokenizer, gain=gain,
                                    bias=bias, dimension_weights=weights, metadata=metadata)
