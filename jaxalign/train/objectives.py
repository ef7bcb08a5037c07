"""The objectives of the offline trainers (SFT, reward model, DPO family): model + batch -> (loss sum, count).

Each builder takes the method's hyperparameters (keyword-only) and returns an
:data:`~jaxalign.train.step.Objective` for :class:`~jaxalign.train.step.TrainStep`::

    objective = dpo_objective(loss_type="sigmoid", beta=0.1, reference="model")
    step = TrainStep(objective, policy, optimizer, references={"ref": reference_model})

Batches are jaxalign.data's (see docs/data.md): ``input_ids``/``attention_mask``/``positions``/``loss_mask``
of shape ``[B, T]`` (SFT), ``[B, 2, T]`` (pairs, index 0 chosen), ``[B, D, 2, T]`` (groups) or ``[B, N, T]``
(best-of-N), with ``example_mask [B]``.

Log-probabilities of the targets go through :func:`jaxalign.rollout.scoring.target_logps`, which runs the LM
head over chunks of the sequence under ``jax.checkpoint``: the full-vocabulary float32 logits (``T × 49152``
floats a row for SmolLM2) are never all alive at once, in the forward or the backward pass.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array

from jaxalign import losses
from jaxalign.rollout.scoring import DEFAULT_CHUNK, target_logps

F32 = jnp.float32
REFERENCE_MODES = ("model", "precomputed", "lora_base", "none")
REFERENCE_FREE_LOSSES = ("simpo", "orpo")
DPO_FAMILY = (*losses.DPO_LOSS_TYPES, *REFERENCE_FREE_LOSSES)
REWARD_LOSSES = ("bradley_terry", "best_of_n")
SFT_AVERAGES = ("token_mean", "sequence_mean")


def _without_loss(metrics: dict) -> dict:
    """The loss's metrics minus its own ``loss`` entry: the step reports the exact accumulated loss."""
    return {name: value for name, value in metrics.items() if name != "loss"}


def _flat(batch: dict, key: str) -> Array:
    """``[B, *layout, T]`` -> ``[B·prod(layout), T]``."""
    value = batch[key]
    return value.reshape(-1, value.shape[-1])


def _sequence_logps(model, batch: dict, chunk_size: int | None) -> tuple[Array, Array]:
    """Per-sequence summed log-probs of the completions and their token counts, each with the batch's
    leading layout (``[B, 2]`` for pairs)."""
    layout = batch["input_ids"].shape[:-1]
    logps = target_logps(model, _flat(batch, "input_ids"), _flat(batch, "attention_mask"),
                         _flat(batch, "positions"), chunk_size=chunk_size)
    mask = _flat(batch, "loss_mask")[:, 1:]
    total, count = losses.masked_sum(logps, mask, axis=-1)
    return total.reshape(layout), count.reshape(layout)


def sft_objective(*, label_smoothing: float = 0.0, average: str = "token_mean",
                  chunk_size: int | None = DEFAULT_CHUNK):
    """Completion-only next-token cross-entropy (:func:`jaxalign.losses.sft_loss`) on ``[B, T]`` batches.

    ``average="token_mean"`` weighs every completion token of the batch alike (TRL's SFTTrainer);
    ``"sequence_mean"`` weighs every example alike. Packed batches (``segment_ids``) keep attention inside
    each sequence. ``example_mask`` rows (epoch padding) add nothing.
    """
    if average not in SFT_AVERAGES:
        raise ValueError(f"sft_objective: average must be one of {SFT_AVERAGES}, got {average!r}")

    def objective(model, batch, *, key):
        del key
        tokens = batch["input_ids"]
        if label_smoothing:
            logits, _ = model(tokens, attention_mask=batch["attention_mask"], positions=batch["positions"],
                              segment_ids=batch.get("segment_ids"))
            nll, _ = losses.sft_loss(logits[:, :-1], tokens[:, 1:], label_smoothing=label_smoothing)
        else:
            nll = -target_logps(model, tokens, batch["attention_mask"], batch["positions"],
                                batch.get("segment_ids"), chunk_size=chunk_size)
        mask = batch["loss_mask"][:, 1:].astype(bool) & batch["example_mask"][:, None].astype(bool)
        total, count = losses.aggregate(nll, mask, mode=average)
        tokens_trained = jnp.sum(mask, dtype=F32)
        return (total, count), {"nll_tokens": tokens_trained}

    return objective


def reward_objective(*, loss: str = "bradley_terry", use_margin: bool = False, margin_scale: float = 1.0,
                     center_coef: float = 0.0, dimension_weights: Sequence[float] | None = None):
    """Reward-model training on pair ``[B, 2, T]``, group ``[B, D, 2, T]`` or best-of-N ``[B, N, T]`` batches.

    ``bradley_terry``: ``−log σ(r⁺ − r⁻ − m)`` with ``m = margin_scale·margin`` when ``use_margin`` (the data's
    margins, e.g. a score gap; Llama 2's margin loss) plus ``center_coef·(r⁺ + r⁻)²``; per dimension for
    groups, weighted by ``dimension_weights``. ``best_of_n``: softmax cross-entropy over the N candidates.
    The model is a :class:`~jaxalign.models.RewardModel` (with ``num_objectives=D`` for groups). A batch that
    carries ``features`` (``[..., D]``, each sequence's pooled trunk state in place of its tokens) is scored
    by the head alone: how :mod:`jaxalign.train.probe` fits a head on a frozen trunk.
    """
    if loss not in REWARD_LOSSES:
        raise ValueError(f"reward_objective: loss must be one of {REWARD_LOSSES}, got {loss!r}")
    weights = None if dimension_weights is None else jnp.asarray(dimension_weights, F32)

    def rewards_of(model, batch):
        if "features" in batch:  # pooled trunk features computed once (a frozen trunk, jaxalign.train.probe)
            layout = batch["features"].shape[:-1]
            flat = model.reward_head.project(_flat(batch, "features"))
        else:
            layout = batch["input_ids"].shape[:-1]
            flat = model(_flat(batch, "input_ids"), attention_mask=_flat(batch, "attention_mask"),
                         positions=_flat(batch, "positions"))
        if flat.ndim == 2:  # a D-objective head reads [R, D]: keep the reward of each row's own dimension
            flat = flat.reshape(*layout, flat.shape[-1])
            if len(layout) != 3:
                raise ValueError(f"reward_objective: a {flat.shape[-1]}-objective head needs group batches "
                                 f"[B, D, 2, T]; got a batch of layout {tuple(layout)}")
            # group row d is the pair of dimension d: take head output d
            return jnp.einsum("bdpd->bdp", flat)
        return flat.reshape(layout)

    def objective(model, batch, *, key):
        del key
        if (loss == "best_of_n") != ("best" in batch):  # shapes alone cannot tell 2 candidates from a pair
            raise ValueError(f"reward_objective: loss={loss!r} on "
                             f"{'best-of-N batches' if 'best' in batch else 'pair batches (no best index)'}; "
                             f"use loss={'best_of_n' if 'best' in batch else 'bradley_terry'}")
        rewards = rewards_of(model, batch)
        valid = batch["example_mask"].astype(bool)
        if loss == "best_of_n":
            candidates = batch["candidate_mask"].astype(bool) & valid[:, None]
            per, metrics = losses.best_of_n_loss(rewards, batch["best"], candidates)
            return losses.masked_sum(per, valid), _without_loss(metrics)
        chosen, rejected = rewards[:, ..., 0], rewards[:, ..., 1]
        mask = valid if chosen.ndim == 1 else valid[:, None] & batch["pair_mask"].astype(bool)
        if use_margin and "margin" not in batch:
            raise ValueError("reward_objective: use_margin=True but the batches carry no 'margin' (the data's "
                             "records have no margin field)")
        margin = margin_scale * batch["margin"] if use_margin else None
        per, metrics = losses.bradley_terry_loss(chosen, rejected, mask, margin=margin, center_coef=center_coef,
                                                 weights=weights)
        return losses.masked_sum(per, valid if per.ndim == 1 else mask), _without_loss(metrics)

    return objective


def _lora_base(model):
    """The model with every LoRA update zeroed: the implicit reference of LoRA training (constant)."""
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    zeros = jax.tree.map(jnp.zeros_like, lora)
    return nnx.merge(graphdef, zeros, jax.tree.map(jax.lax.stop_gradient, rest))


def dpo_objective(*, loss_type: str | Sequence[str] = "sigmoid", reference: str = "model",
                  chunk_size: int | None = DEFAULT_CHUNK, **loss_options):
    """DPO and its variants on pair batches ``[B, 2, T]``; ``loss_type`` selects by name.

    ``loss_type``: any of :data:`jaxalign.losses.DPO_LOSS_TYPES` (or a list of them: a weighted mixture with
    ``loss_weights``), or the reference-free ``"simpo"`` / ``"orpo"``. As in TRL, ``"sft"`` in the list adds
    its weight times the token-mean NLL of every chosen completion of the batch (RPO, TRL's spelling; with
    gradient accumulation the mean is per micro-batch, as in TRL). ``loss_options`` go to the loss
    (``beta``, ``label_smoothing``, ``rpo_alpha``, ``gamma``, ...); a misspelt option raises.

    ``reference``: where ``log π_ref`` comes from —

    - ``"model"``: a frozen reference model passed as ``ref=`` (``TrainStep(references={"ref": ...})``);
    - ``"precomputed"``: the batch's ``ref_logps [B, 2]`` (one pass before training, see
      :func:`jaxalign.train.dpo.precompute_reference_logps`);
    - ``"lora_base"``: the policy itself with its LoRA updates zeroed (no second copy of the weights);
    - ``"none"``: for the reference-free losses.
    """
    loss_types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    loss_options = dict(loss_options)
    sft_weight = None
    if "sft" in loss_types:
        loss_types, sft_weight, loss_options = _split_sft_term(loss_types, loss_options)
        loss_type = loss_types if len(loss_types) > 1 else loss_types[0]
    unknown = [name for name in loss_types if name not in DPO_FAMILY]
    if unknown or not loss_types:
        raise ValueError(f"dpo_objective: unknown loss_type {unknown or loss_type!r}; expected one of {DPO_FAMILY}")
    reference_free = loss_types[0] in REFERENCE_FREE_LOSSES
    if reference_free and len(loss_types) > 1:
        raise ValueError(f"dpo_objective: {loss_types[0]} cannot be mixed with other loss types")
    if reference not in REFERENCE_MODES:
        raise ValueError(f"dpo_objective: reference must be one of {REFERENCE_MODES}, got {reference!r}")
    if reference_free != (reference == "none"):
        raise ValueError(f"dpo_objective: loss_type {loss_type!r} needs reference="
                         f"{'none' if reference_free else 'model, precomputed or lora_base'}, got {reference!r}")
    loss_fn = {"simpo": losses.simpo_loss, "orpo": losses.orpo_loss}.get(loss_types[0], losses.dpo_loss)
    options = dict(loss_options)
    accepted = {name for name, p in inspect.signature(loss_fn).parameters.items() if p.kind is p.KEYWORD_ONLY}
    unknown_options = sorted(set(options) - accepted - {"loss_type"})
    if unknown_options or (reference_free and "loss_type" in options):
        raise ValueError(f"dpo_objective: unknown option(s) {unknown_options or ['loss_type']} for loss_type "
                         f"{loss_type!r} (accepted: {sorted(accepted - {'loss_type'})})")
    if not reference_free:
        options["loss_type"] = loss_types if len(loss_types) > 1 else loss_types[0]
    if sft_weight is not None:
        options["rpo_alpha"] = sft_weight
    needs_nll = (options.get("rpo_alpha") is not None or options.get("sft_weight", 0.0) != 0.0
                 or loss_types[0] == "orpo")

    def objective(model, batch, *, key, ref=None):
        del key
        seq, lengths = _sequence_logps(model, batch, chunk_size)
        valid = batch["example_mask"].astype(bool)
        chosen_nll = None
        if sft_weight is not None:  # TRL's "sft" term: one token mean over every chosen token of the batch
            (total, _), (count, _) = losses.masked_sum(seq[:, 0], valid), losses.masked_sum(lengths[:, 0], valid)
            chosen_nll = jnp.broadcast_to(-total / jnp.maximum(count, 1.0), seq[:, 0].shape)
        elif needs_nll:  # token-mean NLL of the chosen side (RPO / CPO / ORPO's SFT term)
            chosen_nll = -seq[:, 0] / jnp.maximum(lengths[:, 0], 1.0)
        if reference_free:
            per, metrics = loss_fn(seq[:, 0], seq[:, 1], lengths[:, 0], lengths[:, 1], chosen_nll, valid, **options)
        else:
            if reference == "precomputed":
                ref_seq = batch["ref_logps"]
            elif reference == "lora_base":
                ref_seq, _ = _sequence_logps(_lora_base(model), batch, chunk_size)
            else:
                if ref is None:
                    raise ValueError("dpo_objective(reference='model') needs the reference model: "
                                     "TrainStep(..., references={'ref': reference_model})")
                ref_seq, _ = _sequence_logps(ref, batch, chunk_size)
            ref_seq = jax.lax.stop_gradient(ref_seq)
            per, metrics = loss_fn(seq[:, 0], seq[:, 1], ref_seq[:, 0], ref_seq[:, 1], lengths[:, 0], lengths[:, 1],
                                   chosen_nll, None, valid, **options)
        return losses.masked_sum(per, valid), _without_loss(metrics)

    return objective


def _split_sft_term(loss_types: tuple[str, ...], options: dict) -> tuple[tuple[str, ...], float, dict]:
    """TRL's ``loss_type=[..., "sft"]`` with ``loss_weights``: the pairwise types, the SFT weight, the options.

    The SFT term becomes the losses' RPO term with the batch token mean TRL uses (see ``dpo_loss``'s notes).
    """
    if loss_types.count("sft") > 1 or len(loss_types) == 1:
        raise ValueError(f"dpo_objective: loss_type {list(loss_types)}: 'sft' is an extra term beside one or more "
                         "pairwise loss types, given once (for SFT alone, train with method sft)")
    if options.get("rpo_alpha") is not None:
        raise ValueError("dpo_objective: loss_type 'sft' and rpo_alpha both add the chosen NLL; give one")
    weights = options.pop("loss_weights", None)
    if weights is not None and len(weights) != len(loss_types):
        raise ValueError(f"dpo_objective: loss_weights {list(weights)} must give one weight per loss type "
                         f"{list(loss_types)}")
    index = loss_types.index("sft")
    sft_weight = 1.0 if weights is None else float(weights[index])
    if weights is not None:
        options["loss_weights"] = [w for i, w in enumerate(weights) if i != index]
    return tuple(t for t in loss_types if t != "sft"), sft_weight, options


def reference_logps_fn(chunk_size: int | None = DEFAULT_CHUNK):
    """``(model, batch) -> [B, 2]`` summed completion log-probs: the reference pass of ``precomputed`` DPO."""
    def fn(model, batch):
        seq, _ = _sequence_logps(model, batch, chunk_size)
        return seq

    return fn
