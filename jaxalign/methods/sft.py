"""Supervised fine-tuning: completion-only next-token cross-entropy (TRL's SFTTrainer), on SFT records or on
the chosen side of preference pairs."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxalign import data as jdata
from jaxalign import losses
from jaxalign.methods.common import F32, completion_logps, with_lora
from jaxalign.methods.recipe import RunConfig
from jaxalign.methods.specs import SFT_AVERAGES
from jaxalign.models.scoring import DEFAULT_CHUNK, target_logps


def sft_objective(*, label_smoothing: float = 0.0, average: str = "token_mean",
                  chunk_size: int | None = DEFAULT_CHUNK):
    """Completion-only next-token cross-entropy (:func:`jaxalign.losses.sft_loss`) on ``[B, T]`` batches.

    ``average="token_mean"`` weighs every completion token of the batch alike (TRL's SFTTrainer);
    ``"sequence_mean"`` weighs every example alike. Packed batches (``segment_ids``) keep attention inside
    each sequence. ``example_mask`` rows (epoch padding) add nothing.

    Batches with target slots (:mod:`jaxalign.data.layouts`, which :func:`build` asks for) run the LM head and
    its log-softmax only at the completion targets, not at the prompt's positions (TRL computes the logits of
    every position and masks the loss); the loss is the same. Label smoothing needs every logit of a target
    position and reads the full logits.
    """
    if average not in SFT_AVERAGES:
        raise ValueError(f"sft_objective: average must be one of {SFT_AVERAGES}, got {average!r}")

    def objective(model, batch, *, key):
        del key
        tokens = batch["input_ids"]
        valid = batch["example_mask"].astype(bool)
        if "target_slots" in batch and not label_smoothing:
            logps, mask = completion_logps(model, batch, chunk_size)
            mask = mask & valid[:, None]
            total, count = losses.aggregate(-logps, mask, mode=average)
            return (total, count), {"nll_tokens": jnp.sum(mask, dtype=F32)}
        if label_smoothing:
            logits, _ = model(tokens, attention_mask=batch["attention_mask"], positions=batch["positions"],
                              segment_ids=batch.get("segment_ids"))
            nll, _ = losses.sft_loss(logits[:, :-1], tokens[:, 1:], label_smoothing=label_smoothing)
        else:
            nll = -target_logps(model, tokens, batch["attention_mask"], batch["positions"],
                                batch.get("segment_ids"), chunk_size=chunk_size)
        mask = batch["loss_mask"][:, 1:].astype(bool) & valid[:, None]
        total, count = losses.aggregate(nll, mask, mode=average)
        tokens_trained = jnp.sum(mask, dtype=F32)
        return (total, count), {"nll_tokens": tokens_trained}

    return objective


def chosen_as_sft(dataset: jdata.TokenizedDataset) -> jdata.TokenizedDataset:
    """SFT examples from the chosen side of preference pairs (SFT on the preferred responses)."""
    examples = [jdata.TokenizedExample(sequences=(e.sequences[0],)) for e in dataset.examples]
    return dataclasses.replace(dataset, kind="sft", layout=(), examples=examples, value_keys=(), dimensions=())


def build(config: RunConfig, lm, tokenizer, dataset):
    if dataset.kind == "preference":
        dataset = chosen_as_sft(dataset)
    if dataset.kind != "sft":
        raise ValueError(f"method sft needs SFT data (prompt/completion, messages, text, scored conversations) or "
                         f"preference pairs (their chosen side); {config.data.source} holds {dataset.kind!r} records")
    options = config.loss.options()
    model = with_lora(lm, config)
    extra: dict[str, Any] = {}
    if config.data.score_template is not None and "score" in dataset.value_keys:
        # Score-conditioned SFT: generate conditioned on the best score seen in training.
        best = max(float(e.values["score"]) for e in dataset.examples)
        extra["condition_on"] = {"best_score": best, "system": config.data.score_template.format(score=best)}
    # The LM head only at completion tokens (packed rows, which carry no target slots, run it everywhere).
    return model, sft_objective(**options), None, dataset.batched_as(compact_targets=True), extra
