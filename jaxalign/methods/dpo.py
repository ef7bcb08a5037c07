"""DPO and its variants (every TRL pairwise loss type, mixtures, RPO), SimPO and ORPO; the reference model on
the fly, precomputed once, or the LoRA base."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxalign import data as jdata
from jaxalign import losses
from jaxalign.methods import contrastive as contrastive_term
from jaxalign.methods.common import (
    REFERENCE_MODES,
    load_pretrained,
    loading_mesh,
    lora_base,
    one_pass,
    pair_layout,
    sequence_logps,
    with_lora,
    without_loss,
)
from jaxalign.methods.recipe import RunConfig
from jaxalign.methods.specs import ContrastiveSpec
from jaxalign.models.scoring import DEFAULT_CHUNK

REFERENCE_FREE_LOSSES = ("simpo", "orpo", "genarm")
DPO_FAMILY = (*losses.DPO_LOSS_TYPES, *REFERENCE_FREE_LOSSES)


def dpo_objective(*, loss_type: str | Sequence[str] = "sigmoid", reference: str = "model",
                  chunk_size: int | None = DEFAULT_CHUNK, contrastive: ContrastiveSpec | dict | None = None,
                  **loss_options):
    """DPO and its variants on pair batches ``[B, 2, T]`` or shared-prompt rows; ``loss_type`` selects by name.

    Sequence log-probs come from :func:`~jaxalign.methods.common.sequence_logps`: with the target slots the
    data loader adds for the pairwise methods, the LM head runs only on completion tokens, and on
    shared-prompt rows (:class:`~jaxalign.data.SharedPairBatch`) each prompt runs once for both sides, for
    the policy and the reference alike. Both are exact; TRL runs the prompt twice and the head everywhere.

    ``loss_type``: any of :data:`jaxalign.losses.DPO_LOSS_TYPES` (or a list of them: a weighted mixture with
    ``loss_weights``), or the reference-free ``"simpo"`` / ``"orpo"`` / ``"genarm"`` (GenARM's autoregressive
    reward model). As in TRL, ``"sft"`` in the list adds
    its weight times the token-mean NLL of every chosen completion of the batch (RPO, TRL's spelling; with
    gradient accumulation the mean is per micro-batch, as in TRL). ``loss_options`` go to the loss
    (``beta``, ``label_smoothing``, ``rpo_alpha``, ``gamma``, ...); a misspelt option raises.

    ``reference``: where ``log π_ref`` comes from —

    - ``"model"``: a frozen reference model passed as ``ref=`` (``TrainStep(references={"ref": ...})``);
    - ``"precomputed"``: the batch's ``ref_logps [B, 2]`` (one pass before training, see
      :func:`jaxalign.train.dpo.precompute_reference_logps`);
    - ``"lora_base"``: the policy itself with its LoRA updates zeroed (no second copy of the weights);
    - ``"none"``: for the reference-free losses.

    ``contrastive`` (a :class:`~jaxalign.methods.specs.ContrastiveSpec` or its mapping) adds
    ``weight × InfoNCE`` per pair (:mod:`jaxalign.methods.contrastive`): the chosen response against the
    rejected one and the batch's other responses, pooled from the policy's same forward pass.
    """
    contrastive = ContrastiveSpec.from_value(contrastive)
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
    reference_free_losses = {"simpo": losses.simpo_loss, "orpo": losses.orpo_loss, "genarm": losses.genarm_loss}
    loss_fn = reference_free_losses.get(loss_types[0], losses.dpo_loss)
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
        if contrastive is None:
            seq, lengths = sequence_logps(model, batch, chunk_size)
        else:  # the hidden states of the same pass feed the contrastive term
            hidden, logps, mask = contrastive_term.hidden_and_logps(model, batch, chunk_size)
            seq, lengths = losses.masked_sum(logps, mask, axis=-1)
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
                ref_seq, _ = sequence_logps(lora_base(model), batch, chunk_size)
            else:
                if ref is None:
                    raise ValueError("dpo_objective(reference='model') needs the reference model: "
                                     "TrainStep(..., references={'ref': reference_model})")
                ref_seq, _ = sequence_logps(ref, batch, chunk_size)
            ref_seq = jax.lax.stop_gradient(ref_seq)
            per, metrics = loss_fn(seq[:, 0], seq[:, 1], ref_seq[:, 0], ref_seq[:, 1], lengths[:, 0], lengths[:, 1],
                                   chosen_nll, None, valid, **options)
        if contrastive is not None:
            extra, contrastive_metrics = contrastive_term.contrastive_term(model, hidden, batch, contrastive)
            per = per + contrastive.weight * extra
            metrics = {**metrics, **contrastive_metrics}
        return losses.masked_sum(per, valid), without_loss(metrics)

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
        seq, _ = sequence_logps(model, batch, chunk_size)
        return seq

    return fn


def precompute_reference_logps(reference: nnx.Module, dataset: jdata.TokenizedDataset, config: jdata.DataConfig,
                               *, chunk_size: int | None = DEFAULT_CHUNK) -> jdata.TokenizedDataset:
    """The dataset with ``ref_logps [2]`` per pair: the reference's summed completion log-probs, one pass.

    Training batches then carry ``ref_logps`` and DPO runs with ``reference="precomputed"``: no reference
    forward pass per step, and no reference weights on the devices while training.
    """
    graphdef, state = nnx.split(reference)
    fn = reference_logps_fn(chunk_size)

    @jax.jit
    def logps(state, batch):
        return fn(nnx.merge(graphdef, state), batch)

    values = []
    iterator = one_pass(config, dataset)
    with tqdm(total=len(dataset), unit="pair", desc="reference log-probs", dynamic_ncols=True) as bar:
        for batch in iterator:
            keep = batch["example_mask"].astype(bool)
            values.append(np.asarray(logps(state, batch))[keep])
            bar.update(int(keep.sum()))
    return dataset.with_values("ref_logps", np.concatenate(values).astype(np.float32))


def build(config: RunConfig, lm, tokenizer, dataset):
    if dataset.kind != "preference":
        hint = (f" (grouped pairs: pick one dimension with data.dimension, one of {list(dataset.dimensions)})"
                if dataset.kind == "preference_group" else "")
        raise ValueError(f"method dpo needs preference pairs; {config.data.name} holds {dataset.kind!r} "
                         f"records{hint}")
    options = config.loss.objective_options()
    loss_type = options.pop("loss_type")
    objective = dpo_objective(loss_type=loss_type, reference=config.reference, contrastive=config.loss.contrastive,
                              **options)
    model = with_lora(lm, config)
    contrastive_term.attach_projection(model, config.loss.contrastive, seed=config.train.seed)
    # Before the reference pass: the precomputed reference log-probs come from the same rows.
    dataset = pair_layout(dataset, lm, shared_prompt=config.loss.shared_prompt)
    references, dataset, extra = frozen_reference(config, dataset)
    return model, objective, references, dataset, extra


def frozen_reference(config: RunConfig, dataset, **precompute) -> tuple[dict | None, object, dict]:
    """The separate frozen reference of ``reference: model`` (``references`` for every step) or ``precomputed``
    (its log-probs added to ``dataset`` once, by :func:`precompute_reference_logps` with ``precompute``; the model
    kept in ``extra["reference_model"]`` for the held-out set); none for ``lora_base`` and ``none``.
    Returns ``(references, dataset, extra)``."""
    references, extra = None, {}
    if config.reference in ("model", "precomputed"):
        mesh = loading_mesh(config) if config.reference == "model" else None  # the step's placement
        reference_model, _ = load_pretrained(dataclasses.replace(config.model, lora=None), mesh=mesh)
        if config.reference == "model":
            references = {"ref": reference_model}
        else:
            dataset = precompute_reference_logps(reference_model, dataset, config.data, **precompute)
            extra["reference_model"] = reference_model
    return references, dataset, extra
