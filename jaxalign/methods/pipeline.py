"""One training run end to end from a :class:`~jaxalign.methods.recipe.RunConfig`: SFT, distillation, reward
model, DPO, KTO and TFPO here, PPO and GRPO through :func:`jaxalign.methods.rl.run_online`.

::

    from jaxalign.methods import pipeline, recipe
    config = recipe.load_run_config("hh_rlhf", ["train.total_steps=100"], method="dpo")
    result = pipeline.run(config)        # checkpoints, metrics.jsonl/.png, TensorBoard, export/, eval.json

A run: refuse an output directory that holds an earlier run (unless resuming or overwriting) -> load the model
(HF directory, GGUF, or the embedded default) and its tokenizer -> tokenise the data (optionally ordered as a
curriculum) and the held-out data, checking both suit the method -> build the method's objective
(:mod:`~jaxalign.methods.sft`, :mod:`~jaxalign.methods.distill`, :mod:`~jaxalign.methods.reward`,
:mod:`~jaxalign.methods.dpo`, :mod:`~jaxalign.methods.kto`) -> write ``run.json`` (a run refused for its data leaves
no output directory) -> :class:`~jaxalign.train.Trainer` (resumes from ``output_dir/checkpoints`` when a checkpoint
is there) -> method epilogue (reward normalisation) ->
held-out evaluation with the same objective -> Hugging Face export and the plot of the curves.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
from flax import nnx

from jaxalign import data as jdata
from jaxalign import models
from jaxalign.methods import contrastive, critique, distill, dpo, kto, probe, reward, sft, tfpo
from jaxalign.methods.common import (
    EVAL_FILE,
    EXPORT_DIR,
    RUN_FILE,
    RunResult,
    check_output_dir,
    curriculum_order,
    evaluate_objective,
    load_pretrained,
    loading_mesh,
    one_pass,
    prepare_output_dir,
    training_batches,
    write_json,
)
from jaxalign.methods.recipe import ONLINE_METHODS, RunConfig
from jaxalign.methods.rl import run_online
from jaxalign.models.hub import provenance
from jaxalign.train import Trainer
from jaxalign.train.mesh import batch_shard_count
from jaxalign.train.plots import plot_metrics

# Methods that train on sequences: preference pairs given to them train (and are held out) on their chosen side.
CHOSEN_SIDE_METHODS = ("sft", "distill")


def run(config: RunConfig, *, overwrite: bool = False) -> RunResult:
    """Train, evaluate and export one run (see the module docstring).

    A run resumes from its checkpoints with ``train.checkpoint.resume``; otherwise an output directory that
    holds anything is refused before any work (:func:`check_output_dir`) unless ``overwrite`` replaces it.
    ``ppo`` and ``grpo`` runs go to :func:`jaxalign.methods.rl.run_online`.
    """
    check_output_dir(config, overwrite=overwrite)
    try:  # now, not once the model has loaded: a mesh this job's devices cannot hold is a setting to fix
        config.train.mesh.resolve(jax.device_count())
    except ValueError as error:
        raise ValueError(f"train.mesh: {error}") from None
    if config.method in ONLINE_METHODS:
        return run_online(config, overwrite=overwrite)
    if config.method == "tfpo" and len(config.doctor.dimensions) > 1:
        return run_doctors(config, overwrite=overwrite)
    if config.method == "critique":
        return run_critique(config, overwrite=overwrite)
    out = Path(config.output_dir)
    lm, tokenizer = load_pretrained(config.model, mesh=loading_mesh(config))
    dataset = jdata.build_dataset(config.data, tokenizer)
    if config.curriculum is not None:
        dataset = curriculum_order(dataset, config.curriculum)
    eval_dataset = None if config.eval_data is None else jdata.build_dataset(config.eval_data, tokenizer)
    if config.method in CHOSEN_SIDE_METHODS and eval_dataset is not None and eval_dataset.kind == "preference":
        eval_dataset = sft.chosen_as_sft(eval_dataset)
    if config.method == "kto":  # preference pairs give a desirable and an undesirable example each (TRL)
        dataset = kto.as_unpaired(dataset)
        eval_dataset = None if eval_dataset is None else kto.as_unpaired(eval_dataset)
    if eval_dataset is not None:  # checked now, not when the evaluation would fail after training
        check_eval_kind(config, dataset, eval_dataset)
    if config.method == "tfpo":  # the patient makes both splits' token rewards, then is released
        model, objective, references, dataset, extra = tfpo.build(config, lm, tokenizer, dataset, eval_dataset)
        eval_dataset = extra.pop("eval_dataset")
    else:
        builder = {"sft": sft.build, "distill": distill.build, "reward": reward.build, "dpo": dpo.build,
                   "kto": kto.build}[config.method]
        model, objective, references, dataset, extra = builder(config, lm, tokenizer, dataset)
        if eval_dataset is not None:  # held out in the layout the method chose (shared prompts, target slots)
            eval_dataset = eval_dataset.batched_as(share_prompts=dataset.share_prompts,
                                                   compact_targets=dataset.compact_targets)
    # Written once the data is known to suit the method: a refused run leaves no output directory behind.
    prepare_output_dir(config, overwrite=overwrite)
    write_json(out / RUN_FILE, {"config": config.to_dict(), "data_reports": [str(r) for r in dataset.reports],
                                "data_sources": [s.as_dict() for s in dataset.mixture], "examples": len(dataset),
                                "model_source": provenance(config.model.path, config.model.revision)})
    mesh = None  # the probe fits on one process, as the model was loaded
    if config.freeze_backbone:
        # A frozen trunk: its features once, then the head fitted to convergence (no optimizer steps).
        if jax.process_count() > 1:
            raise NotImplementedError("freeze_backbone (the linear probe) runs in one process: each host would "
                                      "fit a head on its own shard of the pairs")
        features = probe.pooled_features(model, one_pass(config.data, dataset), total=len(dataset))
        extra["probe"] = probe.fit_reward_probe(model, objective, features, l2=config.probe_l2,
                                                max_iterations=config.probe_iterations, log=config.train.log)
    else:
        trainable = nnx.Param
        if config.model.lora is not None:  # adapters only; a reward model's new head trains too
            heads = [head for head in ({"reward": "reward_head", "tfpo": "value_head"}.get(config.method),
                                       contrastive.HEAD if hasattr(model, contrastive.HEAD) else None) if head]
            trainable = nnx.Any(nnx.LoRAParam, *map(nnx.PathContains, heads)) if heads else nnx.LoRAParam
        # Curriculum order is kept across epochs (no shuffle), so a dropped last batch would leave out the
        # same (hardest) examples every epoch: it is kept, padded, instead.
        batches = training_batches(config.data, dataset, shuffle=False if config.curriculum else None,
                                   drop_last=False if config.curriculum else None)
        update_scales = None
        if config.method == "tfpo" and config.doctor.value_lr_scale != 1.0:
            update_scales = {"value_head": config.doctor.value_lr_scale}
        rules = models.DEFAULT_RULES | (contrastive.RULES if hasattr(model, contrastive.HEAD) else {})
        trainer = Trainer(config.train, model, objective, batches, references=references, trainable=trainable,
                          extra_metadata=config.checkpoint_metadata(), update_scales=update_scales,
                          label=progress_label(config), rules=rules)
        if eval_dataset is not None and config.eval_data.batch_size % batch_shard_count(trainer.mesh):
            raise ValueError(f"eval_data.batch_size {config.eval_data.batch_size} must be a multiple of the mesh's "
                             f"batch shards (data × fsdp = {batch_shard_count(trainer.mesh)}): the evaluation after "
                             "training splits its rows as the train step does")
        trainer.run()
        model = trainer.trained_model()
        # The evaluation runs on the training mesh, with the references as the step placed them.
        mesh, references = trainer.mesh, trainer.train_step.reference_models()

    eval_metrics: dict[str, float] = {}
    if eval_dataset is not None:
        if config.method in ("dpo", "kto") and config.reference == "precomputed":
            chunking = {"chunk_size": config.loss.chunk_size} if config.method == "kto" else {}
            eval_dataset = dpo.precompute_reference_logps(extra.pop("reference_model"), eval_dataset, config.eval_data,
                                                          **chunking)
        eval_metrics = evaluate_objective(objective, model, one_pass(config.eval_data, eval_dataset), references,
                                          mesh=mesh)
        if config.method == "sft" and "loss" in eval_metrics:
            eval_metrics["perplexity"] = math.exp(min(eval_metrics["loss"], 700.0))
        if config.method == "distill":  # the student's NLL of the held-out completions, exact over the set
            eval_metrics.update(distill.heldout_nll(model, one_pass(config.eval_data, eval_dataset), mesh=mesh))
    extra.pop("reference_model", None)
    contrastive.detach_projection(model)  # a training-only head: the export is the model alone

    export_dir = None
    if config.method == "reward":
        export_dir = reward.finish(config, model, tokenizer, dataset, extra)
    elif config.method == "tfpo" and config.export and jax.process_index() == 0:
        export_dir = tfpo.export(config, model, tokenizer, extra)
    elif config.export and jax.process_index() == 0:
        export_dir = models.save_hf(model, model.config, out / EXPORT_DIR, tokenizer)
    if jax.process_index() == 0:
        write_json(out / EVAL_FILE, {"eval": eval_metrics, **extra})
        plot_metrics(out / "metrics.jsonl", out / "metrics.png", title=f"{config.method} — {out.name}")
    return RunResult(config, model, tokenizer, eval_metrics, export_dir, extra)


def progress_label(config: RunConfig) -> str:
    """What the training bar says is trained: the method, and for a doctor its preference dimension."""
    if config.method == "tfpo":
        return f"tfpo {config.doctor.dimensions[0]}"
    return config.method


def run_doctors(config: RunConfig, *, overwrite: bool = False) -> RunResult:
    """A ``tfpo`` run over several dimensions: one doctor each, in ``output_dir/<dimension>``, one after the
    other (each resumes on its own); ``doctors.json`` names their exports for ``jaxalign generate --doctor``."""
    results = {dimension.doctor.dimensions[0]: run(dimension, overwrite=overwrite)
               for dimension in tfpo.per_dimension(config)}
    out = Path(config.output_dir)
    doctors = {name: None if result.export_dir is None else str(result.export_dir) for name, result in results.items()}
    if jax.process_index() == 0:
        write_json(out / tfpo.INDEX_FILE, {"doctors": doctors, "config": config.to_dict()})
    first = next(iter(results.values()))
    eval_metrics = {f"{name}/{key}": value for name, result in results.items()
                    for key, value in result.eval_metrics.items()}
    return RunResult(config, first.model, first.tokenizer, eval_metrics, out, {"doctors": doctors})


def run_critique(config: RunConfig, *, overwrite: bool = False) -> RunResult:
    """A ``critique`` run: the policy answers, critiques and revises (:func:`jaxalign.methods.critique.prepare`),
    then its stages train one after the other in ``output_dir/sft`` and ``output_dir/dpo``."""
    plan = critique.prepare(config, overwrite=overwrite)
    results = [run(stage, overwrite=overwrite) for stage in plan.stages]
    return critique.finish(config, plan, results)


def check_eval_kind(config: RunConfig, dataset: jdata.TokenizedDataset, eval_dataset: jdata.TokenizedDataset):
    """The held-out set feeds the training objective: it must hold the same kind of examples."""
    chosen_sides = config.method in CHOSEN_SIDE_METHODS and dataset.kind == "preference"
    trained = "sft" if chosen_sides else dataset.kind
    if eval_dataset.kind != trained:
        hint = (f"; set eval_data.dimension to one of {list(eval_dataset.dimensions)}"
                if eval_dataset.kind == "preference_group" and trained == "preference" else "")
        raise ValueError(f"eval_data {config.eval_data.name} holds {eval_dataset.kind!r} records, but method "
                         f"{config.method} trains on {trained!r} ones here ({config.data.name}): give "
                         f"held-out data of the same kind{hint}")
    if eval_dataset.dimensions != dataset.dimensions:
        raise ValueError(f"eval_data {config.eval_data.name} has preference dimensions "
                         f"{list(eval_dataset.dimensions)}, the training data {list(dataset.dimensions)}")
