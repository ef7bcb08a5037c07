"""The ``loss.contrastive`` term of sft, dpo and reward runs: InfoNCE over pooled hidden states of the step's own
forward pass (:func:`jaxalign.losses.contrastive_loss`).

What is pooled, in every layout the methods batch (:mod:`jaxalign.data.layouts`):

- a response: its completion tokens (the loss targets: ``target_slots``, else ``loss_mask``);
- the anchor (the prompt): the example's first sequence's tokens before its completion (the same tokens whether a
  pair's prompt is shared in one row or repeated in two).

``pooling: last`` takes the final hidden state of the last such token (a response's last token has read the
prompt and the whole response; the prompt's last token the whole prompt), ``mean`` their mean. An optional
projection head (``projection: N``, a linear map ``D -> N`` trained with the model, SimCLR's projection head)
maps both before the similarities; it lives on the model as ``contrastive_head`` and is dropped before export.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array

from jaxalign import losses
from jaxalign.methods.specs import ContrastiveSpec
from jaxalign.models.scoring import head_logps, slot_logps, slot_targets

HEAD = "contrastive_head"
# The projection head's partition rules (jaxalign.models.sharding): split like a reward head's.
RULES = {(HEAD, "kernel"): ("fsdp", None), (HEAD, "bias"): (None,)}


def d_model(model) -> int:
    config = getattr(model, "config", None) or model.backbone.config
    return int(config.d_model)


def attach_projection(model, spec: ContrastiveSpec | None, *, seed: int) -> None:
    """Give ``model`` the spec's projection head (``model.contrastive_head``), when it asks for one."""
    if spec is not None and spec.projection is not None:
        setattr(model, HEAD, nnx.Linear(d_model(model), spec.projection, rngs=nnx.Rngs(seed)))


def detach_projection(model) -> None:
    """Drop the projection head: it serves the training loss only, and an export holds the model alone."""
    if hasattr(model, HEAD):
        delattr(model, HEAD)


def _rows(batch: dict, key: str) -> Array:
    value = batch[key]
    return value.reshape(-1, value.shape[-1])


def hidden_and_logps(model, batch: dict, chunk_size: int | None) -> tuple[Array, Array, Array]:
    """``(hidden [R, S, D], logps, mask)`` from one trunk pass over the batch's rows: the final hidden states and
    the completion targets' log-probs with their mask, ``[B, *layout, K]`` with target slots (as
    :func:`jaxalign.methods.common.completion_logps`), else ``[B, *layout, T-1]`` (as ``loss_mask[..., 1:]``)."""
    rows = _rows(batch, "input_ids")
    hidden, _ = model.hidden_states(rows, positions=_rows(batch, "positions"),
                                    attention_mask=_rows(batch, "attention_mask"),
                                    branch_ids=_rows(batch, "branch_ids") if "branch_ids" in batch else None)
    if "target_slots" in batch:
        slots = batch["target_slots"]
        per_row = slots.size // (rows.shape[0] * slots.shape[-1])
        logps = slot_logps(model, hidden, batch["source_slots"].reshape(rows.shape[0], -1),
                           slot_targets(rows, slots.reshape(rows.shape[0], -1)),
                           chunk_size=None if chunk_size is None else chunk_size * per_row)
        return hidden, logps.reshape(slots.shape), slots > 0
    logps = head_logps(model, hidden[:, :-1], rows[:, 1:], chunk_size=chunk_size)
    layout = batch["input_ids"].shape[:-1]
    mask = batch["loss_mask"][..., 1:].astype(bool)
    return hidden, logps.reshape(*layout, -1), mask


def sequence_masks(batch: dict) -> tuple[Array, Array]:
    """``(anchor [R, S], responses [R, N, S])``: the slots pooled for each row's prompt and its ``N`` responses."""
    rows = _rows(batch, "input_ids")
    count, width = rows.shape
    real = _rows(batch, "attention_mask").astype(bool)
    slots = jnp.arange(width)
    if "target_slots" in batch:
        targets = batch["target_slots"]
        targets = targets.reshape(count, -1, targets.shape[-1])  # [R, N, K]
        responses = jnp.any((targets[..., None] == slots) & (targets[..., None] > 0), axis=-2)
    else:
        responses = _rows(batch, "loss_mask").astype(bool)[:, None]
    responses = responses & real[:, None]
    # The first sequence's tokens before its completion: its prompt (in a shared-prompt row the shared prefix and
    # the chosen side's own prompt tail, if any: the rejected side's tokens all come after the chosen's).
    first = jnp.min(jnp.where(responses[:, 0], slots, width), axis=-1)
    return real & (slots[None] < first[:, None]), responses


def sequence_states(hidden: Array, batch: dict, *, pooling: str) -> tuple[Array, Array]:
    """``(anchors [B, D], responses [B, N, D])``: each example's pooled prompt and its ``N`` responses (a pair:
    chosen, rejected; a sequence: its one completion), float32."""
    if batch.get("segment_ids") is not None:
        raise ValueError("loss.contrastive pools one sequence per row: packed rows (data.packing) hold several; "
                         "set data.packing: false")
    anchor_mask, response_mask = sequence_masks(batch)
    examples = batch["example_mask"].shape[0]
    anchors = losses.pool_states(hidden, anchor_mask[:, None], pooling=pooling)[:, 0]
    responses = losses.pool_states(hidden, response_mask, pooling=pooling)
    size = responses.shape[-1]
    return anchors.reshape(examples, -1, size)[:, 0], responses.reshape(examples, -1, size)


def contrastive_term(model, hidden: Array, batch: dict, spec: ContrastiveSpec) -> tuple[Array, dict[str, Any]]:
    """``(loss [B], metrics)``: the unweighted contrastive loss of each example and its metrics (``contrastive_*``).

    A pair's chosen response is the positive; its rejected response and (``in_batch_negatives``) the other
    examples' responses are negatives. Sequences (SFT) have only the other examples' responses.
    """
    anchors, responses = sequence_states(hidden, batch, pooling=spec.pooling)
    head = getattr(model, HEAD, None)
    if head is not None:
        anchors, responses = head(anchors), head(responses)
    if responses.shape[1] == 1 and not spec.in_batch_negatives:
        raise ValueError("loss.contrastive.in_batch_negatives: false leaves a sequence (SFT) example no negative: "
                         "only pairs carry their own (the rejected response)")
    negatives = responses[:, 1] if responses.shape[1] > 1 else None
    per, metrics = losses.contrastive_loss(anchors, responses[:, 0], negatives, batch["example_mask"].astype(bool),
                                           temperature=spec.temperature, in_batch=spec.in_batch_negatives)
    return per, {f"contrastive_{name}": value for name, value in metrics.items()}


def check_rows(spec: ContrastiveSpec | None, *, rows_per_micro_batch: int, pairs: bool) -> None:
    """Refuse, before any work, a contrastive term that would have no negative: sequences one per micro-batch."""
    if spec is not None and not pairs and rows_per_micro_batch < 2:
        raise ValueError(f"loss.contrastive on sequences needs at least 2 examples per micro-batch (the other "
                         f"examples' responses are the negatives), got {rows_per_micro_batch}: raise "
                         "data.batch_size or lower train.micro_batches")
