"""What the methods share: loading a run's model, batching its data, evaluating an objective, LoRA, the
output directory and its files, and the helpers every objective uses on jaxalign.data's batches."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array

from jaxalign import data as jdata
from jaxalign import losses, models
from jaxalign.methods.recipe import ModelSpec, RunConfig
from jaxalign.models.quantize import check_checkpoint
from jaxalign.models.scoring import slot_logps, slot_targets, target_logps
from jaxalign.train.mesh import batch_shard_count, global_rows, make_mesh, shard_batch

RUN_FILE = "run.json"
EVAL_FILE = "eval.json"
EXPORT_DIR = "export"
F32 = jnp.float32
# The one notion of the reference model, for every method that has one (RunConfig.reference):
#   model:       a frozen copy of the initial policy (DPO: scored on the fly; PPO/GRPO: scored each iteration);
#   precomputed: DPO only: the frozen copy's log-probs, computed in one pass before training;
#   lora_base:   the policy itself with its LoRA adapters off (no second copy of the weights);
#   none:        no reference (SimPO/ORPO; GRPO with kl_coef 0).
REFERENCE_MODES = ("model", "precomputed", "lora_base", "none")

@dataclasses.dataclass
class RunResult:
    """What :func:`run` leaves: the trained model, where things went, and the held-out metrics."""

    config: RunConfig
    model: nnx.Module
    tokenizer: Any
    eval_metrics: dict[str, float]
    export_dir: Path | None
    extra: dict[str, Any]


def load_pretrained(spec: ModelSpec, *, source: str = "model.path", mesh: Mesh | None = None):
    """``(causal LM, tokenizer)`` of a run's ``model`` section: :func:`jaxalign.models.load_pretrained` of
    ``spec.path`` (at ``spec.revision``) with its execution policy (errors name ``source``), its projections
    quantised when ``spec.quantize`` says so. On ``mesh`` (:func:`loading_mesh`) each weight is placed with its
    sharding as it is read and quantised there: a device holds its blocks, never the whole float model."""
    if spec.quantize is not None:
        check_quantize(spec, source=source)
    lm, tokenizer = models.load_pretrained(spec.path, source=source, revision=spec.revision,
                                           param_dtype=spec.param_dtype, compute_dtype=spec.compute_dtype,
                                           remat=spec.remat, attention=spec.attention, mesh=mesh)
    if spec.quantize is not None:
        try:
            models.quantize_model(lm, spec.quantize)
        except ValueError as error:
            raise ValueError(f"{quantize_error(error)} ({source} {spec.path or 'embedded default'})") from None
    return lm, tokenizer


def loading_mesh(config: RunConfig) -> Mesh | None:
    """The training mesh a run's models load onto (:func:`load_pretrained`); None on one device."""
    if jax.device_count() == 1:
        return None
    return make_mesh(config.train.mesh)


def frozen_model_spec(spec: ModelSpec, path: str | None) -> ModelSpec:
    """The spec of another frozen model of a run (a distillation teacher, a TFPO patient) at ``path``: the run's
    execution policy and quantisation, not its adapters nor its ``model.revision`` (a revision names a commit of
    the run's own model; ``org/name@rev`` pins the other one's)."""
    return dataclasses.replace(spec, path=path, revision=None, lora=None, reward_head=None)


def quantize_error(error: ValueError, key: str = "model.quantize") -> str:
    """A quantiser's error in the terms the user wrote: the settings are ``key`` (``model.quantize.<field>``)."""
    message = str(error).replace("QuantizeConfig.", f"{key}.").replace("quantize_model: ", f"{key}: ")
    return message if message.startswith(key) else f"{key}: {message}"


def check_quantize(spec: ModelSpec, *, source: str = "model.path") -> None:
    """Refuse a ``model.quantize`` the checkpoint's shapes cannot take, from its shapes alone (before any weight
    is read; :func:`jaxalign.models.quantize.check_checkpoint`)."""
    try:
        check_checkpoint(spec.path, spec.quantize, revision=spec.revision)
    except ValueError as error:
        raise ValueError(f"{quantize_error(error)} ({source} {spec.path or 'embedded default'})") from None


def curriculum_order(dataset: jdata.TokenizedDataset, by: str) -> jdata.TokenizedDataset:
    """The examples sorted easy to hard: ``length`` (shortest longest-sequence first), ``score`` (highest
    ``score`` first, else the highest ``margin``: a clearer preference is easier) or ``difficulty`` (prompts'
    ``difficulty`` field, lowest first). Stable on ties."""
    if by == "length":
        keys = dataset.lengths
    elif by == "difficulty":
        if "difficulty" not in dataset.value_keys:
            raise ValueError(f"curriculum 'difficulty': the data has no 'difficulty' field (it carries "
                             f"{list(dataset.value_keys)}); give each prompt record one, or use curriculum: length")
        keys = np.asarray([e.values["difficulty"] for e in dataset.examples], np.float64)
    else:
        key = next((k for k in ("score", "margin") if k in dataset.value_keys), None)
        if key is None:
            raise ValueError(f"curriculum 'score': the data has neither 'score' nor 'margin' values "
                             f"(it carries {list(dataset.value_keys)}); use curriculum: length")
        keys = -np.asarray([np.mean(e.values[key]) for e in dataset.examples], np.float64)
    order = np.argsort(keys, kind="stable")
    return dataclasses.replace(dataset, examples=[dataset.examples[i] for i in order])


def training_batches(config: jdata.DataConfig, dataset: jdata.TokenizedDataset, *, shuffle: bool | None = None,
             num_epochs: int | None = None, drop_last: bool | None = None) -> jdata.BatchIterator:
    return jdata.BatchIterator(
        dataset, batch_size=config.batch_size, seed=config.seed,
        shuffle=config.shuffle if shuffle is None else shuffle,
        drop_last=config.drop_last if drop_last is None else drop_last,
        num_epochs=config.num_epochs if num_epochs is None else num_epochs, buckets=config.buckets,
        pad_to_multiple_of=config.pad_to_multiple_of, pack_length=config.max_length if config.packing else None,
        process_index=jax.process_index(), process_count=jax.process_count())


def one_pass(config: jdata.DataConfig, dataset: jdata.TokenizedDataset) -> jdata.BatchIterator:
    """Every example once, in order; the last batch padded with ``example_mask`` 0 rows (a mixture's examples
    each once too, not drawn by weight)."""
    dataset = dataclasses.replace(dataset, mixture=())
    return training_batches(config, dataset, shuffle=False, num_epochs=1, drop_last=False)


def evaluate_objective(objective, model: nnx.Module, batches, references: Mapping[str, nnx.Module] | None = None,
                       *, mesh: Mesh | None = None) -> dict[str, float]:
    """Mean loss (``Σ loss_sum / Σ count``) and example-weighted mean metrics of ``objective`` over ``batches``.

    With ``mesh`` (the training mesh a trained model and its references are placed on) each batch is placed
    as the train step places it: its rows split over ``data`` × ``fsdp``, each process passing its own rows, so
    every row is evaluated once and no device holds the whole batch.

    Raises:
        ValueError: with ``mesh``, a batch whose global rows are not a multiple of the batch shards.
    """
    references = dict(references or {})
    # Dropout off (LoRA's, a reward head's): an evaluation measures the model, not one draw of its masks.
    graphdef, state = nnx.split(nnx.view(model, deterministic=True, raise_if_not_found=False))
    ref_parts = {name: nnx.split(ref) for name, ref in references.items()}

    @jax.jit
    def evaluate(state, ref_states, batch):
        refs = {name: nnx.merge(ref_parts[name][0], ref_state) for name, ref_state in ref_states.items()}
        (total, count), metrics = objective(nnx.merge(graphdef, state), batch, key=jax.random.key(0), **refs)
        return total, count, jnp.sum(batch["example_mask"]), metrics  # the global number of real rows

    ref_states = {name: parts[1] for name, parts in ref_parts.items()}
    total = count = examples = 0.0
    sums: dict[str, float] = {}
    for batch in batches:
        if mesh is None:
            loss_sum, loss_count, weight, metrics = jax.device_get(evaluate(state, ref_states, batch))
        else:
            rows = global_rows(batch["example_mask"], mesh)
            if rows % batch_shard_count(mesh):
                raise ValueError(f"an evaluation batch of {rows} rows on a mesh of {batch_shard_count(mesh)} batch "
                                 "shards (data × fsdp): the evaluation batch size must be a multiple of it")
            with jax.set_mesh(mesh):  # the rows stay split over data × fsdp through the model (constrain_rows)
                loss_sum, loss_count, weight, metrics = jax.device_get(
                    evaluate(state, ref_states, shard_batch(dict(batch), mesh)))
        weight = float(weight)
        total, count, examples = total + float(loss_sum), count + float(loss_count), examples + weight
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + float(value) * weight
    if examples == 0:
        return {}
    result = {"loss": total / max(count, 1.0), "examples": examples}
    result.update({name: value / examples for name, value in sums.items()})
    return result


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, default=str) + "\n")


def stop_ids(model, tokenizer) -> tuple[int, ...]:
    ids = tuple(getattr(model.config, "eos_token_ids", ()) or ())
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids += (tokenizer.eos_token_id,)
    return ids


# What a run writes into its output_dir (TensorBoard adds events.out.tfevents.* files): the things an earlier
# run there would lose. Not tfpo's token_rewards/ cache: it is keyed by its data, patient, faces and settings, so
# a later run reads it only when it would compute the same values (and an interrupted pass continues from it).
RUN_ARTEFACTS = (RUN_FILE, EVAL_FILE, EXPORT_DIR, "checkpoints", "metrics.jsonl", "metrics.png", "reward_vs_kl.png",
                 "doctors.json", "wandb_run_id")


def earlier_run(out: Path) -> list[Path]:
    if not out.is_dir():
        return []
    return sorted(path for path in out.iterdir()
                  if path.name in RUN_ARTEFACTS or path.name.startswith("events.out.tfevents."))


def check_output_dir(config: RunConfig, *, overwrite: bool = False) -> None:
    """Refuse, before any work or write, an output directory that holds an earlier run's files (run.json,
    checkpoints, export, metrics, ...), unless this run resumes it (``train.checkpoint.resume``) or
    ``overwrite`` replaces it. Other files there (the user's data, say) are never touched."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} is a file, not a directory")
    if config.train.checkpoint.resume or overwrite:
        return
    held = [path.name for path in earlier_run(out)]
    if held:
        shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
        raise ValueError(f"output_dir {out} already holds a run ({shown}): continue it with --resume, choose "
                         "another output_dir, or replace it with --overwrite")


def prepare_output_dir(config: RunConfig, *, overwrite: bool = False) -> Path:
    """The output directory, with an earlier run's files removed first when ``overwrite`` replaces it (called once
    the data is known to suit the method, so a refused run leaves the earlier one intact)."""
    out = Path(config.output_dir)
    if overwrite and not config.train.checkpoint.resume:
        for path in earlier_run(out):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def lora_config(config: RunConfig) -> models.LoRAConfig:
    spec = config.model.lora
    return models.LoRAConfig(rank=spec.rank, alpha=spec.alpha, dropout=spec.dropout, targets=spec.targets)


def with_lora(lm, config: RunConfig):
    if config.model.lora is not None:
        models.apply_lora(lm, lora_config(config), rngs=nnx.Rngs(config.train.seed))
    return lm


def lora_base(model):
    """The model with every LoRA update zeroed: the implicit reference of LoRA training (constant)."""
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    zeros = jax.tree.map(jnp.zeros_like, lora)
    return nnx.merge(graphdef, zeros, jax.tree.map(jax.lax.stop_gradient, rest))


def without_loss(metrics: dict) -> dict:
    """The loss's metrics minus its own ``loss`` entry: the step reports the exact accumulated loss."""
    return {name: value for name, value in metrics.items() if name != "loss"}


def pair_layout(dataset: jdata.TokenizedDataset, model, *, shared_prompt: bool, targets: bool = True,
                ) -> jdata.TokenizedDataset:
    """Preference pairs batched for a pairwise objective: with their targets' slots when ``targets`` (the LM head
    only on completions; a reward model has no LM head) and, when ``shared_prompt``, with each pair's prompt run
    once (:mod:`jaxalign.data.layouts`).

    Sharing is exact, so it is only refused where it would not be: a model with a sliding window (the window
    counts slots, and a shared row's slots include the other completion) or a dataset with per-token values
    (aligned with one row per sequence); those pairs are batched unshared.
    """
    shared = (shared_prompt and getattr(model.config, "sliding_window", None) is None
              and not any(key in jdata.TOKEN_VALUES for key in dataset.value_keys))
    return dataset.batched_as(share_prompts=shared, compact_targets=targets)


def flat_rows(batch: dict, key: str) -> Array:
    """``[B, *layout, T]`` -> ``[B·prod(layout), T]``."""
    value = batch[key]
    return value.reshape(-1, value.shape[-1])


def sequence_logps(model, batch: dict, chunk_size: int | None) -> tuple[Array, Array]:
    """Per-sequence summed log-probs of the completions and their token counts, each with the batch's
    leading layout (``[B, 2]`` for pairs).

    Batches with target slots (:mod:`jaxalign.data.layouts`) run the LM head only at their completion
    targets; shared-prompt pair rows (``branch_ids``) also run each prompt once. All give the same numbers.
    """
    if "target_slots" not in batch:
        layout = batch["input_ids"].shape[:-1]
        logps = target_logps(model, flat_rows(batch, "input_ids"), flat_rows(batch, "attention_mask"),
                             flat_rows(batch, "positions"), chunk_size=chunk_size)
        mask = flat_rows(batch, "loss_mask")[:, 1:]
        total, count = losses.masked_sum(logps, mask, axis=-1)
        return total.reshape(layout), count.reshape(layout)
    logps, mask = completion_logps(model, batch, chunk_size)
    return losses.masked_sum(logps, mask, axis=-1)


def completion_logps(model, batch: dict, chunk_size: int | None) -> tuple[Array, Array]:
    """``(log-probs, mask)`` ``[B, *layout, K]`` of each sequence's completion targets, from a batch with
    target slots: the trunk over its rows (one per sequence, or one per pair with shared prompts), then the LM
    head on the ``K`` gathered positions of each sequence only.

    ``chunk_size`` counts positions per sequence: a shared-prompt row gathers both sequences' ``2K`` targets,
    and its LM-head chunks cover ``2·chunk_size`` of them, so a chunk holds as many logits as for the same pairs
    unshared. (Per row, pairs with ``K`` of 65-128 ran two rematerialised chunks shared where they ran one
    unshared: SmolLM2-135M's DPO step on the speed benchmark's 4 pairs, K = 78, took 5.71 s instead of 5.39.)
    """
    slots = batch["target_slots"]
    rows = batch["input_ids"].reshape(-1, batch["input_ids"].shape[-1])
    sequences_per_row = slots.size // (rows.shape[0] * slots.shape[-1])
    hidden, _ = model.hidden_states(rows, positions=flat_rows(batch, "positions"),
                                    attention_mask=flat_rows(batch, "attention_mask"),
                                    branch_ids=flat_rows(batch, "branch_ids") if "branch_ids" in batch else None)
    # [rows, (sequences in a row) · K]: a shared-prompt row holds both sides' targets.
    source = batch["source_slots"].reshape(rows.shape[0], -1)
    target = slots.reshape(rows.shape[0], -1)
    logps = slot_logps(model, hidden, source, slot_targets(rows, target),
                       chunk_size=None if chunk_size is None else chunk_size * sequences_per_row)
    return logps.reshape(slots.shape), slots > 0
