"""Supervised fine-tuning: completion-only next-token cross-entropy (TRL's SFTTrainer), on SFT records or on
the chosen side of preference pairs; optionally each example weighted by its record's score."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from jaxalign import data as jdata
from jaxalign import losses
from jaxalign.methods import contrastive as contrastive_term
from jaxalign.methods.common import F32, completion_logps, with_lora
from jaxalign.methods.recipe import RunConfig
from jaxalign.methods.specs import SFT_AVERAGES, SFT_EXAMPLE_WEIGHTS, ContrastiveSpec
from jaxalign.models.scoring import DEFAULT_CHUNK, target_logps


def weighted_sums(per_token: Array, mask: Array, weights: Array, *, average: str) -> tuple[Array, Array]:
    """``(Σ weighted loss, Σ weights)`` of a per-token loss ``[B, K]``: the weighted mean's two sums, which add up
    over micro-batches and devices as :func:`jaxalign.losses.aggregate`'s do.

    ``weights`` is ``[B]`` (one per example) or ``[B, K]`` (one per token: packed rows, each token its
    sequence's). ``token_mean``: ``(Σ_bt w·m·x, Σ_bt w·m)``; ``sequence_mean``: ``(Σ_b w_b·x̄_b, Σ_b w_b)`` with
    ``x̄_b`` the example's token mean, over examples with a token (``weights`` ``[B]`` only).
    """
    weights = jnp.asarray(weights, F32)
    mask = jnp.asarray(mask).astype(F32)
    if average == "token_mean":
        per_token_weight = mask * (weights[:, None] if weights.ndim == 1 else weights)
        return jnp.sum(per_token_weight * per_token), jnp.sum(per_token_weight)
    row_sum, row_count = losses.masked_sum(per_token, mask, axis=-1)
    has_tokens = row_count > 0
    return (jnp.sum(jnp.where(has_tokens, weights * row_sum / jnp.maximum(row_count, 1.0), 0.0)),
            jnp.sum(jnp.where(has_tokens, weights, 0.0)))


def sft_objective(*, label_smoothing: float = 0.0, average: str = "token_mean",
                  chunk_size: int | None = DEFAULT_CHUNK, example_weights: str | None = None,
                  weight_scale: float = 1.0, contrastive: ContrastiveSpec | dict | None = None):
    """Completion-only next-token cross-entropy (:func:`jaxalign.losses.sft_loss`) on ``[B, T]`` batches.

    ``average="token_mean"`` weighs every completion token of the batch alike (TRL's SFTTrainer);
    ``"sequence_mean"`` weighs every example alike. Packed batches (``segment_ids``) keep attention inside
    each sequence. ``example_mask`` rows (epoch padding) add nothing.

    ``example_weights="score"``: example ``b`` weighs ``w_b = weight_scale·score_b`` (``score ≥ 0``), and the
    loss is the weighted mean ``Σ_b w_b·Σ_t ℓ_bt / Σ_b w_b·n_b`` (``token_mean``: each token weighs its example's
    ``w``) or ``Σ_b w_b·ℓ̄_b / Σ_b w_b`` (``sequence_mean``), returned as those two sums (:func:`weighted_sums`), so
    that gradient accumulation and sharding stay exact. The scale cancels in the mean; :func:`build` sets it to
    one over the smallest positive training score, so that a batch's weight count is at least 1 whenever it
    holds a weighted token and the step's ``max(count, 1)`` never alters it.

    Batches with target slots (:mod:`jaxalign.data.layouts`, which :func:`build` asks for) run the LM head and
    its log-softmax only at the completion targets, not at the prompt's positions (TRL computes the logits of
    every position and masks the loss); the loss is the same. Label smoothing needs every logit of a target
    position and reads the full logits.

    ``contrastive`` (:class:`~jaxalign.methods.specs.ContrastiveSpec`) adds ``weight × InfoNCE`` of each prompt
    against its completion, the batch's other completions the negatives (:mod:`jaxalign.methods.contrastive`),
    from the same forward pass. It joins the loss's two sums with each example weighing what it weighs in the
    mean's denominator (``token_mean``: its completion tokens, times its weight under ``example_weights``;
    ``sequence_mean``: 1, or its weight), so the loss is ``NLL + weight × (that weighted mean of InfoNCE)`` and
    still adds up over micro-batches and devices. Not with packed rows (one sequence per row is pooled).
    """
    contrastive = ContrastiveSpec.from_value(contrastive)
    if average not in SFT_AVERAGES:
        raise ValueError(f"sft_objective: average must be one of {SFT_AVERAGES}, got {average!r}")
    if example_weights is not None and example_weights not in SFT_EXAMPLE_WEIGHTS:
        raise ValueError(f"sft_objective: example_weights must be one of {SFT_EXAMPLE_WEIGHTS} or None, got "
                         f"{example_weights!r}")

    def reduce(nll, mask, batch, shift: bool):
        if example_weights is None:
            return losses.aggregate(nll, mask, mode=average)
        if "score" not in batch:
            raise ValueError("sft_objective: example_weights='score' needs batches with 'score' (scored records)")
        weights = weight_scale * batch["score"]
        if weights.ndim == 2:  # packed rows: each token its sequence's score; a loss position's is its target's
            if average != "token_mean":
                raise ValueError("sft_objective: per-token weights (packed rows) need average='token_mean'")
            weights = weights[:, 1:] if shift else weights
        return weighted_sums(nll, mask, weights, average=average)

    def row_weights(mask, batch):
        """Each example's share of the count (the mean's denominator), ``[B]``."""
        tokens = jnp.sum(mask, axis=-1, dtype=F32)
        weights = jnp.ones_like(tokens) if example_weights is None else weight_scale * batch["score"]
        return weights * (tokens if average == "token_mean" else (tokens > 0).astype(F32))

    def with_contrastive(model, batch, hidden, nll, mask, shift: bool):
        total, count = reduce(nll, mask, batch, shift=shift)
        per, metrics = contrastive_term.contrastive_term(model, hidden, batch, contrastive)
        total = total + contrastive.weight * jnp.sum(row_weights(mask, batch) * per)
        return (total, count), {"nll_tokens": jnp.sum(mask, dtype=F32), **metrics}

    def objective(model, batch, *, key):
        del key
        tokens = batch["input_ids"]
        valid = batch["example_mask"].astype(bool)
        if contrastive is not None:
            if label_smoothing:
                hidden, _ = model.hidden_states(tokens, attention_mask=batch["attention_mask"],
                                                positions=batch["positions"])
                nll, _ = losses.sft_loss(model.logits(hidden)[:, :-1], tokens[:, 1:], label_smoothing=label_smoothing)
                mask, shift = batch["loss_mask"][:, 1:].astype(bool) & valid[:, None], True
            else:
                hidden, logps, mask = contrastive_term.hidden_and_logps(model, batch, chunk_size)
                nll, mask, shift = -logps, mask & valid[:, None], "target_slots" not in batch
            return with_contrastive(model, batch, hidden, nll, mask, shift)
        if "target_slots" in batch and not label_smoothing:
            logps, mask = completion_logps(model, batch, chunk_size)
            mask = mask & valid[:, None]
            total, count = reduce(-logps, mask, batch, shift=False)
            return (total, count), {"nll_tokens": jnp.sum(mask, dtype=F32)}
        if label_smoothing:
            logits, _ = model(tokens, attention_mask=batch["attention_mask"], positions=batch["positions"],
                              segment_ids=batch.get("segment_ids"))
            nll, _ = losses.sft_loss(logits[:, :-1], tokens[:, 1:], label_smoothing=label_smoothing)
        else:
            nll = -target_logps(model, tokens, batch["attention_mask"], batch["positions"],
                                batch.get("segment_ids"), chunk_size=chunk_size)
        mask = batch["loss_mask"][:, 1:].astype(bool) & valid[:, None]
        total, count = reduce(nll, mask, batch, shift=True)
        tokens_trained = jnp.sum(mask, dtype=F32)
        return (total, count), {"nll_tokens": tokens_trained}

    return objective


def chosen_as_sft(dataset: jdata.TokenizedDataset) -> jdata.TokenizedDataset:
    """SFT examples from the chosen side of preference pairs (SFT on the preferred responses)."""
    examples = [dataclasses.replace(e, sequences=(e.sequences[0],), values={}) for e in dataset.examples]
    return dataclasses.replace(dataset, kind="sft", layout=(), examples=examples, value_keys=(), dimensions=())


def build(config: RunConfig, lm, tokenizer, dataset):
    if dataset.kind == "preference":
        dataset = chosen_as_sft(dataset)
    if dataset.kind != "sft":
        raise ValueError(f"method sft needs SFT data (prompt/completion, messages, text, scored conversations) or "
                         f"preference pairs (their chosen side); {config.data.name} holds {dataset.kind!r} records")
    options = config.loss.options()
    rows = config.data.batch_size * jax.process_count() // config.train.micro_batches
    contrastive_term.check_rows(config.loss.contrastive, rows_per_micro_batch=rows, pairs=False)
    if config.loss.contrastive is not None and config.data.packing:
        raise ValueError("loss.contrastive pools one sequence per row: packed rows (data.packing) hold several; "
                         "set data.packing: false")
    model = with_lora(lm, config)
    contrastive_term.attach_projection(model, config.loss.contrastive, seed=config.train.seed)
    extra: dict[str, Any] = {}
    if options.get("example_weights") == "score":
        options["weight_scale"], extra["example_weights"] = score_weights(dataset, config.data.name)
    if config.data.score_template is not None and "score" in dataset.value_keys:
        # Score-conditioned SFT: generate conditioned on the best score seen in training.
        best = max(float(e.values["score"]) for e in dataset.examples)
        extra["condition_on"] = {"best_score": best, "system": config.data.score_template.format(score=best)}
    # The LM head only at completion tokens (packed rows, which carry no target slots, run it everywhere).
    return model, sft_objective(**options), None, dataset.batched_as(compact_targets=True), extra


def score_weights(dataset: jdata.TokenizedDataset, name: str) -> tuple[float, dict[str, Any]]:
    """``(weight_scale, summary)`` of score-weighted SFT (:func:`sft_objective`): one over the smallest positive
    training score, and the scores' range and mean weight.

    Raises:
        DataError: records without a score, or with a negative one (naming the first such record and field).
        ValueError: every score is 0 (nothing would be trained).
    """
    if "score" not in dataset.value_keys:
        first = dataset.examples[0].origin if dataset.examples else None
        raise jdata.DataError("has no score: loss.example_weights=score weighs each example by its record's score "
                              "(ADLF: meta_eval_score; prompt/completion, messages and medical_qa records: score)",
                              where=first, field="score", reason=jdata.Reason.MISSING_FIELD)
    scores = np.asarray([float(e.values["score"]) for e in dataset.examples], np.float64)
    negative = np.flatnonzero(scores < 0)
    if len(negative):
        first = dataset.examples[int(negative[0])]
        raise jdata.DataError(f"is {scores[negative[0]]:g}: loss.example_weights=score needs scores >= 0 (a weight "
                              f"each); {len(negative)} of {name}'s {len(scores)} scores are negative",
                              where=first.origin, field="score")
    if not (scores > 0).any():
        raise ValueError(f"every score of {name} is 0: loss.example_weights=score would train on nothing")
    scale = 1.0 / float(scores[scores > 0].min())
    summary = {"by": "score", "weight_scale": scale, "min_score": float(scores.min()),
               "max_score": float(scores.max()), "zero_weight_examples": int((scores == 0).sum())}
    return scale, summary
