"""KTO: Kahneman–Tversky optimisation on unpaired desirable / undesirable completions (thumbs up / down),
TRL's ``KTOTrainer`` on jaxalign's core.

One step, for a batch of ``B`` unpaired examples ``(x_i, y_i, label_i)`` (``label`` 1 = desirable)::

    r_i  = β·(log π(y_i|x_i) − log π_ref(y_i|x_i))              implied reward, summed over completion tokens
    z₀   = sg(max(0, mean_i [log π(y_{i−1}|x_i) − log π_ref(y_{i−1}|x_i)]))   the KL reference point
    loss_i = λ_D·(1 − σ(r_i − β·z₀))   desirable            (loss_type kto; apo_zero_unpaired: no z₀,
             λ_U·(1 − σ(β·z₀ − r_i))   undesirable           λ_D·(1 − σ(r_i)) and λ_U·σ(r_i))

and the batch loss is the mean of ``loss_i`` over the examples (:func:`jaxalign.losses.kto_loss`). ``y_{i−1}`` is
the completion of the batch's previous example, cyclically (the first example takes the last one's): TRL's
mismatched (prompt, completion) pairs, each completion shifted to the prompt of another example.

The reference is the run's ``reference``: a frozen copy of the initial policy scored each step (``model``), the
policy with its LoRA adapters off (``lora_base``), or, for ``apo_zero_unpaired`` only, log-probs computed once
before training (``precomputed``: the reference point needs the reference on pairs made in each batch).
Preference pairs are unpaired as TRL does (each pair gives a desirable and an undesirable example).
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Int

from jaxalign import data as jdata
from jaxalign import losses
from jaxalign.methods.common import lora_base, sequence_logps, with_lora, without_loss
from jaxalign.methods.dpo import frozen_reference
from jaxalign.methods.recipe import RunConfig
from jaxalign.models.scoring import DEFAULT_CHUNK

KTO_REFERENCES = ("model", "precomputed", "lora_base")
# TRL unpairs a preference dataset with ``datasets.map(batched=True)``, whose default batch is 1000 pairs: the
# chosen sides of a block, then its rejected sides.
UNPAIR_BLOCK = 1000
TOKEN_FIELDS = ("input_ids", "attention_mask", "positions", "loss_mask")


def kto_objective(*, loss_type: str = "kto", beta: float = 0.1, desirable_weight: float = 1.0,
                  undesirable_weight: float = 1.0, reference: str = "model", chunk_size: int | None = DEFAULT_CHUNK):
    """KTO (or unpaired APO-zero) on unpaired batches ``[B, T]`` with ``label [B]`` (1 = desirable).

    Formula: see the module docstring and :func:`jaxalign.losses.kto_loss`. Sequence log-probs are summed over
    each completion's target tokens (``loss_mask``) by the one scorer (:func:`jaxalign.methods.common.
    sequence_logps`, float32, the LM head in chunks of ``chunk_size`` positions).

    Args:
        loss_type: ``kto`` or ``apo_zero_unpaired`` (:data:`jaxalign.losses.KTO_LOSS_TYPES`).
        beta: β > 0.
        desirable_weight: λ_D, the weight of a desirable example's loss.
        undesirable_weight: λ_U, the weight of an undesirable example's loss.
        reference: ``model`` (the objective's ``ref=`` module, ``TrainStep(references={"ref": ...})``),
            ``lora_base`` (the policy with every LoRA update zeroed), or ``precomputed`` (the batch's
            ``ref_logps [B]``, see :func:`jaxalign.methods.dpo.precompute_reference_logps`; ``apo_zero_unpaired``
            only).
        chunk_size: positions per LM-head chunk; None: all at once.

    Returns:
        ``objective(model, batch, *, key, ref=None) -> ((loss_sum, count), metrics)``: the sum of the valid
        examples' losses and their number (TRL's mean over the batch's examples, exact under gradient
        accumulation), and the metrics (scalars): ``rewards/chosen`` and ``rewards/rejected`` (mean implied reward
        ``β·(log π − log π_ref)`` of the batch's desirable / undesirable examples, 0 when it has none),
        ``rewards/margins`` (their difference), ``logps/chosen``, ``logps/rejected``, ``kl`` (z₀; 0 for
        ``apo_zero_unpaired``), ``count/desirable``, ``count/undesirable`` (examples of each class in the batch)
        and, for ``kto``, ``kl_truncated`` (the fraction of mismatched sequences cut at the batch's length, see
        Notes).

    References:
        Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", arXiv 2402.01306,
        Eq. 7 (the loss) and Eq. 8 (the class weights); TRL 1.16 ``KTOTrainer`` (the reference point on
        mismatched pairs, ``precompute_ref_log_probs``, the LoRA base as the reference).

    Notes:
        - The mismatched pairs are made inside each (micro-)batch, after shuffling: example ``i`` is scored with
          the completion of the batch's previous valid example, cyclically (:func:`mismatched_rows`). TRL rolls
          the completions by one over consecutive blocks of ``per_device_train_batch_size`` examples of the
          dataset and therefore requires sequential sampling; both give each prompt another example's completion
          and make the batch's mismatched completions the same set as its matched ones (which TRL recommends).
          With a random sampler TRL's pairs would come from other batches. Padding rows of a partial last batch
          take no part; a (micro-)batch with a single example pairs it with its own completion (the run
          configuration refuses fewer than 2 examples per micro-batch, as TRL refuses a per-device batch of 1).
        - z₀ is the mean over the micro-batch's examples (under a data-parallel mesh: over every shard of the
          micro-batch at once). TRL takes the mean per device, then averages the devices' means.
        - A mismatched sequence is the prompt of ``i`` followed by the completion of ``i − 1``, cut at the
          batch's padded length ``T`` (TRL cuts at ``max_length``). It is cut only when a longer prompt meets a
          longer completion than any matched example of the batch had; ``kl_truncated`` reports how often.
        - An example's prompt and completion are read off ``loss_mask`` (the completion is its target tokens).
          For a record with an empty prompt and no BOS token the completion's first token is no target (nothing
          precedes it), so that example's mismatched sequence starts with its own first completion token and the
          completion it lends starts at its second token; TRL's starts with the borrowed completion and lends the
          whole one. A prompt rendered with a chat template or a BOS token is never empty.
        - ``rewards/*``, ``logps/*`` and the counts are per micro-batch; with ``train.micro_batches`` > 1 the
          step logs their mean over the micro-batches weighted by examples (the core's rule for every metric),
          so a side's reward mean includes the 0 of micro-batches without that side. TRL logs a side's metric
          only for batches that have the side.
    """
    if loss_type not in losses.KTO_LOSS_TYPES:
        raise ValueError(f"kto_objective: unknown loss_type {loss_type!r}; expected one of {losses.KTO_LOSS_TYPES}")
    if reference not in KTO_REFERENCES:
        raise ValueError(f"kto_objective: reference must be one of {KTO_REFERENCES}, got {reference!r}")
    with_kl = loss_type == "kto"
    if with_kl and reference == "precomputed":
        raise ValueError("kto_objective: loss_type 'kto' cannot use a precomputed reference: its reference point "
                         "scores pairs made in each batch (use reference='model' or 'lora_base')")
    options = {"loss_type": loss_type, "beta": beta, "desirable_weight": desirable_weight,
               "undesirable_weight": undesirable_weight}
    losses.kto_loss(*(jnp.zeros(1),) * 6, **options)  # bad options are refused now, not at the first step

    def objective(model, batch, *, key, ref=None):
        del key
        if "label" not in batch:
            raise ValueError("kto_objective: the batch carries no 'label' (unpaired records: prompt, completion, "
                             "label)")
        valid = batch["example_mask"].astype(bool)
        label = batch["label"].astype(bool)
        desirable, undesirable = valid & label, valid & ~label
        seq, _ = sequence_logps(model, batch, chunk_size)
        kl_rows = mismatched_rows(batch) if with_kl else None
        kl_seq = ref_kl = None
        if with_kl:
            # z₀ is detached: the policy's pass on the mismatched pairs needs no gradient at all.
            kl_seq, _ = sequence_logps(_constant(model), kl_rows, chunk_size)
        if reference == "precomputed":
            if "ref_logps" not in batch:
                raise ValueError("kto_objective(reference='precomputed') needs the batch's ref_logps: "
                                 "precompute_reference_logps(reference_model, dataset, data_config)")
            ref_seq = batch["ref_logps"]
        else:
            if reference == "lora_base":
                reference_model = lora_base(model)
            elif ref is None:
                raise ValueError("kto_objective(reference='model') needs the reference model: "
                                 "TrainStep(..., references={'ref': reference_model})")
            else:
                reference_model = ref
            if with_kl:  # matched and mismatched rows in one reference pass, [B, 2, T]
                both = {name: jnp.stack([batch[name], kl_rows[name]], axis=1) for name in TOKEN_FIELDS}
                ref_both, _ = sequence_logps(reference_model, both, chunk_size)
                ref_seq, ref_kl = ref_both[:, 0], ref_both[:, 1]
            else:
                ref_seq, _ = sequence_logps(reference_model, batch, chunk_size)
        ref_seq = jax.lax.stop_gradient(ref_seq)
        ref_kl = None if ref_kl is None else jax.lax.stop_gradient(ref_kl)
        # Every example sits in both lists, masked to its own side: [2B] = desirable slots, then undesirable.
        loss, metrics = losses.kto_loss(seq, seq, ref_seq, ref_seq, kl_seq, ref_kl, desirable, undesirable, valid,
                                        **options)
        per_example = loss[: seq.shape[0]] + loss[seq.shape[0]:]
        metrics = without_loss(metrics)
        metrics["count/desirable"] = jnp.sum(desirable, dtype=jnp.float32)
        metrics["count/undesirable"] = jnp.sum(undesirable, dtype=jnp.float32)
        if with_kl:
            metrics["kl_truncated"] = losses.masked_mean(kl_rows["truncated"], valid)
        return losses.masked_sum(per_example, valid), metrics

    return objective


def mismatched_rows(batch) -> dict[str, Array]:
    """TRL's mismatched (prompt, completion) pairs of an unpaired batch: row ``i``'s prompt followed by the
    completion of its partner, the previous valid row (cyclically: the first valid row takes the last one's).

    Row ``i``'s prompt is its tokens before its first target (``loss_mask``); a completion is a row's target
    tokens. Rows keep the batch's right padding and width ``T``: a pair longer than ``T`` is cut there.

    Args:
        batch: ``input_ids``, ``attention_mask``, ``loss_mask`` ``[B, T]`` (right-padded, unpacked) and
            ``example_mask [B]``.

    Returns:
        ``input_ids``, ``attention_mask``, ``positions``, ``loss_mask`` ``[B, T]`` int32 of the mismatched
        sequences (the targets are the borrowed completion's tokens), ``partner [B]`` (the row whose
        completion row ``i`` borrows; padding rows keep their own index) and ``truncated [B]`` (the pair was
        cut at ``T``).
    """
    ids: Int[Array, "B T"] = jnp.asarray(batch["input_ids"])
    rows, width = ids.shape
    valid: Bool[Array, " B"] = batch["example_mask"].astype(bool)
    targets = batch["loss_mask"].astype(bool)
    length = jnp.sum(batch["attention_mask"].astype(bool), axis=-1)
    count = jnp.sum(targets, axis=-1)
    # Targets are one contiguous run at the end of each sequence (jaxalign.data.collate): [start, length).
    start = jnp.where(count > 0, jnp.argmax(targets, axis=-1), length)
    rank = jnp.cumsum(valid) - 1
    valid_first = jnp.argsort(jnp.where(valid, 0, 1), stable=True)  # the valid rows, in batch order
    previous = valid_first[jnp.mod(rank - 1, jnp.maximum(jnp.sum(valid), 1))]
    partner = jnp.where(valid, previous, jnp.arange(rows))
    t = jnp.arange(width)[None, :]
    own_start, their_start, their_count = start[:, None], start[partner][:, None], count[partner][:, None]
    end = own_start + their_count
    in_prompt = t < own_start
    in_completion = (t >= own_start) & (t < end)
    source_row = jnp.where(in_prompt, jnp.arange(rows)[:, None], partner[:, None])
    source_column = jnp.clip(jnp.where(in_prompt, t, t - own_start + their_start), 0, width - 1)
    real = in_prompt | in_completion
    return {
        "input_ids": jnp.where(real, ids[source_row, source_column], 0).astype(jnp.int32),
        "attention_mask": real.astype(jnp.int32),
        "positions": jnp.where(real, t, 0).astype(jnp.int32),
        "loss_mask": in_completion.astype(jnp.int32),
        "partner": partner,
        "truncated": valid & (end[:, 0] > width),
    }


def _constant(model: nnx.Module) -> nnx.Module:
    """``model`` with every array behind ``stop_gradient``: a forward pass whose backward is never built."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jax.lax.stop_gradient, state))


def as_unpaired(dataset: jdata.TokenizedDataset) -> jdata.TokenizedDataset:
    """KTO's examples: unpaired records as they are; preference pairs unpaired as TRL's
    ``unpair_preference_dataset`` does (per block of :data:`UNPAIR_BLOCK` pairs, the chosen completions with
    label 1, then the rejected ones with label 0; margins are dropped). Any other kind is returned unchanged
    (:func:`build` names it)."""
    if dataset.kind != "preference":
        return dataset
    examples = []
    for start in range(0, len(dataset), UNPAIR_BLOCK):
        block = dataset.examples[start:start + UNPAIR_BLOCK]
        for side, label in ((0, 1), (1, 0)):
            examples += [dataclasses.replace(e, sequences=(e.sequences[side],), values={"label": label})
                         for e in block]
    return dataclasses.replace(dataset, kind="unpaired", layout=(), examples=examples, value_keys=("label",),
                               dimensions=())


def class_weight_advice(dataset: jdata.TokenizedDataset, desirable_weight: float,
                        undesirable_weight: float) -> str | None:
    """TRL's check of the class weights against the data's balance (KTO paper Eq. 8: ``λ_D·n_D / (λ_U·n_U)``
    in [1, 4/3]): the advice when neither weight is in its range, else None."""
    desirable = max(sum(int(e.values["label"]) for e in dataset.examples), 1)
    undesirable = max(len(dataset) - desirable, 1)
    if desirable == undesirable:
        return None
    ratio_d, ratio_u = undesirable * undesirable_weight / desirable, desirable * desirable_weight / undesirable
    d_low, d_high = round(ratio_d, 2), round(ratio_d * 1.33, 2)
    u_low, u_high = round(ratio_u / 1.33, 2), round(ratio_u, 2)
    if d_low <= desirable_weight <= d_high or u_low <= undesirable_weight <= u_high:
        return None
    return (f"{desirable} desirable and {undesirable} undesirable examples with loss.desirable_weight "
            f"{desirable_weight} and loss.undesirable_weight {undesirable_weight}: the KTO paper's Eq. 8 suggests "
            f"EITHER desirable_weight in [{d_low}, {d_high}] OR undesirable_weight in [{u_low}, {u_high}] "
            "(not both)")


def build(config: RunConfig, lm, tokenizer, dataset):
    dataset = as_unpaired(dataset)
    if dataset.kind != "unpaired":
        source = config.data.name
        hint = (": its records have no field 'label' (the first record included), so they read as SFT data; "
                "give each record \"label\": true (desirable) or false (with data.format=unpaired every record "
                "without one is named)" if dataset.kind == "sft" else "")
        raise ValueError(f"method kto needs unpaired records (prompt, completion and a boolean label: TRL's "
                         f"unpaired format) or preference pairs; {source} holds {dataset.kind!r} records{hint}")
    options = config.loss.options()
    advice = class_weight_advice(dataset, options["desirable_weight"], options["undesirable_weight"])
    if advice is not None:
        warnings.warn(f"{config.data.name}: {advice}", stacklevel=2)
    objective = kto_objective(reference=config.reference, **options)
    references, dataset, extra = frozen_reference(config, dataset, chunk_size=config.loss.chunk_size)
    return with_lora(lm, config), objective, references, dataset, extra
