"""The offline trainers: SFT, reward model and DPO runs from a :class:`~jaxalign.train.recipe.RunConfig`.

::

    from jaxalign.train import methods, recipe
    config = recipe.load_run_config("hh_rlhf", ["train.total_steps=100"], method="dpo")
    result = methods.run(config)        # checkpoints, metrics.jsonl/.png, TensorBoard, export/, eval.json

A run: load the model (HF directory, GGUF, or the embedded default) and its tokenizer -> tokenise the data
(optionally ordered as a curriculum) and the held-out data, checking both suit the method -> build the
method's objective (:mod:`jaxalign.train.objectives`) -> write ``run.json`` (a run refused for its data
leaves no output directory) -> :class:`~jaxalign.train.trainer.Trainer` (resumes from
``output_dir/checkpoints`` when a checkpoint is there) -> method epilogue (reward normalisation) ->
held-out evaluation with the same objective -> Hugging Face export and the plot of the curves.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxalign import data as jdata
from jaxalign import models
from jaxalign.rollout import Sampler, SamplingParams
from jaxalign.rollout.scoring import DEFAULT_CHUNK
from jaxalign.train import objectives, probe
from jaxalign.train.plots import plot_metrics
from jaxalign.train.recipe import ONLINE_METHODS, ModelSpec, RunConfig
from jaxalign.train.trainer import Trainer

RUN_FILE = "run.json"
EVAL_FILE = "eval.json"
EXPORT_DIR = "export"
REWARD_OPTIONS = ("loss", "use_margin", "margin_scale", "center_coef", "dimension_weights")
SFT_OPTIONS = ("label_smoothing", "average")


@dataclasses.dataclass
class RunResult:
    """What :func:`run` leaves: the trained model, where things went, and the held-out metrics."""

    config: RunConfig
    model: nnx.Module
    tokenizer: Any
    eval_metrics: dict[str, float]
    export_dir: Path | None
    extra: dict[str, Any]


def load_pretrained(spec: ModelSpec, *, source: str = "model.path"):
    """``(causal LM, tokenizer)`` of a run's ``model`` section: :func:`jaxalign.models.load_pretrained` of
    ``spec.path`` with its dtypes and remat policy (errors name ``source``)."""
    return models.load_pretrained(spec.path, source=source, param_dtype=spec.param_dtype,
                                  compute_dtype=spec.compute_dtype, remat=spec.remat)


def _check_eval_kind(config: RunConfig, dataset: jdata.TokenizedDataset, eval_dataset: jdata.TokenizedDataset):
    """The held-out set feeds the training objective: it must hold the same kind of examples."""
    trained = "sft" if config.method == "sft" and dataset.kind == "preference" else dataset.kind  # chosen sides
    if eval_dataset.kind != trained:
        hint = (f"; set eval_data.dimension to one of {list(eval_dataset.dimensions)}"
                if eval_dataset.kind == "preference_group" and trained == "preference" else "")
        raise ValueError(f"eval_data {config.eval_data.source} holds {eval_dataset.kind!r} records, but method "
                         f"{config.method} trains on {trained!r} ones here ({config.data.source}): give "
                         f"held-out data of the same kind{hint}")
    if eval_dataset.dimensions != dataset.dimensions:
        raise ValueError(f"eval_data {config.eval_data.source} has preference dimensions "
                         f"{list(eval_dataset.dimensions)}, the training data {list(dataset.dimensions)}")


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


def _batches(config: jdata.DataConfig, dataset: jdata.TokenizedDataset, *, shuffle: bool | None = None,
             num_epochs: int | None = None, drop_last: bool | None = None) -> jdata.BatchIterator:
    return jdata.BatchIterator(
        dataset, batch_size=config.batch_size, seed=config.seed,
        shuffle=config.shuffle if shuffle is None else shuffle,
        drop_last=config.drop_last if drop_last is None else drop_last,
        num_epochs=config.num_epochs if num_epochs is None else num_epochs, buckets=config.buckets,
        pad_to_multiple_of=config.pad_to_multiple_of, pack_length=config.max_length if config.packing else None,
        process_index=jax.process_index(), process_count=jax.process_count())


def one_pass(config: jdata.DataConfig, dataset: jdata.TokenizedDataset) -> jdata.BatchIterator:
    """Every example once, in order; the last batch padded with ``example_mask`` 0 rows."""
    return _batches(config, dataset, shuffle=False, num_epochs=1, drop_last=False)


def precompute_reference_logps(reference: nnx.Module, dataset: jdata.TokenizedDataset, config: jdata.DataConfig,
                               *, chunk_size: int | None = DEFAULT_CHUNK) -> jdata.TokenizedDataset:
    """The dataset with ``ref_logps [2]`` per pair: the reference's summed completion log-probs, one pass.

    Training batches then carry ``ref_logps`` and DPO runs with ``reference="precomputed"``: no reference
    forward pass per step, and no reference weights on the devices while training.
    """
    graphdef, state = nnx.split(reference)
    fn = objectives.reference_logps_fn(chunk_size)

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


def evaluate_objective(objective, model: nnx.Module, batches, references: Mapping[str, nnx.Module] | None = None,
                       ) -> dict[str, float]:
    """Mean loss (``Σ loss_sum / Σ count``) and example-weighted mean metrics of ``objective`` over ``batches``."""
    references = dict(references or {})
    graphdef, state = nnx.split(model)
    ref_parts = {name: nnx.split(ref) for name, ref in references.items()}

    @jax.jit
    def evaluate(state, ref_states, batch):
        refs = {name: nnx.merge(ref_parts[name][0], ref_state) for name, ref_state in ref_states.items()}
        (total, count), metrics = objective(nnx.merge(graphdef, state), batch, key=jax.random.key(0), **refs)
        return total, count, metrics

    ref_states = {name: parts[1] for name, parts in ref_parts.items()}
    total = count = examples = 0.0
    sums: dict[str, float] = {}
    for batch in batches:
        loss_sum, loss_count, metrics = jax.device_get(evaluate(state, ref_states, batch))
        weight = float(np.sum(batch["example_mask"]))
        total, count, examples = total + float(loss_sum), count + float(loss_count), examples + weight
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + float(value) * weight
    if examples == 0:
        return {}
    result = {"loss": total / max(count, 1.0), "examples": examples}
    result.update({name: value / examples for name, value in sums.items()})
    return result


def _check_options(options: Mapping[str, Any], allowed: tuple[str, ...], method: str) -> dict[str, Any]:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"loss: unknown option(s) {unknown} for method {method!r} (allowed: {list(allowed)})")
    return dict(options)


def _prompts_of(dataset: jdata.TokenizedDataset, count: int) -> list[list[int]]:
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


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, default=str) + "\n")


def _stop_ids(model, tokenizer) -> tuple[int, ...]:
    ids = tuple(getattr(model.config, "eos_token_ids", ()) or ())
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids += (tokenizer.eos_token_id,)
    return ids


# What a run writes into its output_dir (TensorBoard adds events.out.tfevents.* files): the things an earlier
# run there would lose.
RUN_ARTEFACTS = (RUN_FILE, EVAL_FILE, EXPORT_DIR, "checkpoints", "metrics.jsonl", "metrics.png", "reward_vs_kl.png",
                 "wandb_run_id")


def _earlier_run(out: Path) -> list[Path]:
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
    held = [path.name for path in _earlier_run(out)]
    if held:
        shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
        raise ValueError(f"output_dir {out} already holds a run ({shown}): continue it with --resume, choose "
                         "another output_dir, or replace it with --overwrite")


def prepare_output_dir(config: RunConfig, *, overwrite: bool = False) -> Path:
    """The output directory, with an earlier run's files removed first when ``overwrite`` replaces it (called once
    the data is known to suit the method, so a refused run leaves the earlier one intact)."""
    out = Path(config.output_dir)
    if overwrite and not config.train.checkpoint.resume:
        for path in _earlier_run(out):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def run(config: RunConfig, *, overwrite: bool = False) -> RunResult:
    """Train, evaluate and export one run (see the module docstring).

    A run resumes from its checkpoints with ``train.checkpoint.resume``; otherwise an output directory that
    holds anything is refused before any work (:func:`check_output_dir`) unless ``overwrite`` replaces it.
    ``ppo`` and ``grpo`` runs go to :func:`jaxalign.train.rl.run_online`.
    """
    check_output_dir(config, overwrite=overwrite)
    if config.method in ONLINE_METHODS:
        from jaxalign.train.rl import run_online  # it builds on this module's loaders

        return run_online(config, overwrite=overwrite)
    out = Path(config.output_dir)
    lm, tokenizer = load_pretrained(config.model)
    dataset = jdata.build_dataset(config.data, tokenizer)
    if config.curriculum is not None:
        dataset = curriculum_order(dataset, config.curriculum)
    eval_dataset = None if config.eval_data is None else jdata.build_dataset(config.eval_data, tokenizer)
    if config.method == "sft" and eval_dataset is not None and eval_dataset.kind == "preference":
        eval_dataset = chosen_as_sft(eval_dataset)
    if eval_dataset is not None:  # checked now, not when the evaluation would fail after training
        _check_eval_kind(config, dataset, eval_dataset)
    builder = {"sft": _sft, "reward": _reward, "dpo": _dpo}[config.method]
    model, objective, references, dataset, extra = builder(config, lm, tokenizer, dataset)
    # Written once the data is known to suit the method: a refused run leaves no output directory behind.
    prepare_output_dir(config, overwrite=overwrite)
    _write_json(out / RUN_FILE, {"config": config.to_dict(),
                                 "data_reports": [str(r) for r in dataset.reports],
                                 "examples": len(dataset)})
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
            trainable = nnx.Any(nnx.LoRAParam, nnx.PathContains("reward_head")) if config.method == "reward" \
                else nnx.LoRAParam
        # Curriculum order is kept across epochs (no shuffle), so a dropped last batch would leave out the
        # same (hardest) examples every epoch: it is kept, padded, instead.
        batches = _batches(config.data, dataset, shuffle=False if config.curriculum else None,
                           drop_last=False if config.curriculum else None)
        trainer = Trainer(config.train, model, objective, batches, references=references, trainable=trainable,
                          extra_metadata={"run": config.to_dict()})
        trainer.run()
        model = trainer.trained_model()

    eval_metrics: dict[str, float] = {}
    if eval_dataset is not None:
        if config.method == "dpo" and config.reference == "precomputed":
            eval_dataset = precompute_reference_logps(extra.pop("reference_model"), eval_dataset, config.eval_data)
        eval_metrics = evaluate_objective(objective, model, one_pass(config.eval_data, eval_dataset), references)
        if config.method == "sft" and "loss" in eval_metrics:
            eval_metrics["perplexity"] = math.exp(min(eval_metrics["loss"], 700.0))
    extra.pop("reference_model", None)

    export_dir = None
    if config.method == "reward":
        export_dir = _finish_reward(config, model, tokenizer, dataset, extra)
    elif config.export and jax.process_index() == 0:
        export_dir = models.save_hf(model, model.config, out / EXPORT_DIR, tokenizer)
    if jax.process_index() == 0:
        _write_json(out / EVAL_FILE, {"eval": eval_metrics, **extra})
        plot_metrics(out / "metrics.jsonl", out / "metrics.png", title=f"{config.method} — {out.name}")
    return RunResult(config, model, tokenizer, eval_metrics, export_dir, extra)


def chosen_as_sft(dataset: jdata.TokenizedDataset) -> jdata.TokenizedDataset:
    """SFT examples from the chosen side of preference pairs (SFT on the preferred responses)."""
    examples = [jdata.TokenizedExample(sequences=(e.sequences[0],)) for e in dataset.examples]
    return dataclasses.replace(dataset, kind="sft", layout=(), examples=examples, value_keys=(), dimensions=())


def _sft(config: RunConfig, lm, tokenizer, dataset):
    if dataset.kind == "preference":
        dataset = chosen_as_sft(dataset)
    if dataset.kind != "sft":
        raise ValueError(f"method sft needs SFT data (prompt/completion, messages, text, scored conversations) or "
                         f"preference pairs (their chosen side); {config.data.source} holds {dataset.kind!r} records")
    options = _check_options(config.loss, SFT_OPTIONS, "sft")
    model = _with_lora(lm, config)
    extra: dict[str, Any] = {}
    if config.data.score_template is not None and "score" in dataset.value_keys:
        # Score-conditioned SFT: generate conditioned on the best score seen in training.
        best = max(float(e.values["score"]) for e in dataset.examples)
        extra["condition_on"] = {"best_score": best, "system": config.data.score_template.format(score=best)}
    return model, objectives.sft_objective(**options), None, dataset, extra


def _reward(config: RunConfig, lm, tokenizer, dataset):
    if dataset.kind not in ("preference", "preference_group", "best_of_n"):
        raise ValueError(f"method reward needs preference pairs, groups or best-of-N records; {config.data.source} "
                         f"holds {dataset.kind!r} records")
    options = dict(config.loss)
    num_objectives = options.pop("num_objectives", None)
    pooling = options.pop("pooling", "last")
    options = _check_options(options, REWARD_OPTIONS, "reward")
    if dataset.kind == "best_of_n":
        # Never the pairwise loss on N candidates: it would read samples 0 and 1 as chosen/rejected, ignoring "best".
        if options.setdefault("loss", "best_of_n") != "best_of_n":
            raise ValueError(f"{config.data.source} holds best-of-N records (N samples and the index of the best), "
                             f"but loss.loss={options['loss']} trains chosen/rejected pairs (the preset sets it for "
                             "pair data): set loss.loss=best_of_n")
    elif options.get("loss") == "best_of_n":
        raise ValueError(f"loss.loss=best_of_n needs best-of-N records (OpenAI lm-human-preferences: query, "
                         f"sample0..N-1, best); {config.data.source} holds {dataset.kind!r} records: set "
                         "loss.loss=bradley_terry")
    if dataset.kind == "preference_group":
        num_objectives = num_objectives or len(dataset.dimensions)
        if num_objectives != len(dataset.dimensions):
            raise ValueError(f"loss.num_objectives={num_objectives}, but the data has {len(dataset.dimensions)} "
                             f"dimensions {dataset.dimensions}")
    elif options.get("dimension_weights") is not None or (num_objectives or 1) > 1:
        raise ValueError(f"loss.dimension_weights / num_objectives are for a reward head per dimension of grouped "
                         f"data; {config.data.source} gives {dataset.kind!r} records (one reward): set "
                         "loss.dimension_weights=null")
    if config.model.lora is not None:
        models.apply_lora(lm, _lora_config(config), rngs=nnx.Rngs(config.train.seed))
    model = models.RewardModel(lm, num_objectives=num_objectives, pooling=pooling, rngs=nnx.Rngs(config.train.seed))
    extra = {"dimensions": list(dataset.dimensions), "num_objectives": num_objectives}
    return model, objectives.reward_objective(**options), None, dataset, extra


def _dpo(config: RunConfig, lm, tokenizer, dataset):
    if dataset.kind != "preference":
        hint = (f" (grouped pairs: pick one dimension with data.dimension, one of {list(dataset.dimensions)})"
                if dataset.kind == "preference_group" else "")
        raise ValueError(f"method dpo needs preference pairs; {config.data.source} holds {dataset.kind!r} "
                         f"records{hint}")
    options = dict(config.loss)
    loss_type = options.pop("loss_type", "sigmoid")
    objective = objectives.dpo_objective(loss_type=loss_type, reference=config.reference, **options)
    references, extra = None, {}
    if config.reference in ("model", "precomputed"):
        reference_model, _ = load_pretrained(dataclasses.replace(config.model, lora=None))
        if config.reference == "model":
            references = {"ref": reference_model}
        else:
            dataset = precompute_reference_logps(reference_model, dataset, config.data)
            extra["reference_model"] = reference_model
    return _with_lora(lm, config), objective, references, dataset, extra


def _lora_config(config: RunConfig) -> models.LoRAConfig:
    spec = config.model.lora
    return models.LoRAConfig(rank=spec.rank, alpha=spec.alpha, dropout=spec.dropout, targets=spec.targets)


def _with_lora(lm, config: RunConfig):
    if config.model.lora is not None:
        models.apply_lora(lm, _lora_config(config), rngs=nnx.Rngs(config.train.seed))
    return lm


def _finish_reward(config: RunConfig, model, tokenizer, dataset, extra: dict[str, Any]) -> Path | None:
    """Fit the normalisation on the reference policy's samples and export the reward model."""
    base, _ = load_pretrained(dataclasses.replace(config.model, lora=None))
    gain, bias = 1.0, 0.0
    if config.normalize_samples:
        prompts = _prompts_of(dataset, config.normalize_samples)
        gain, bias, stats = fit_reward_normalization(
            model, base, prompts, max_new_tokens=config.normalize_max_new_tokens,
            stop_token_ids=_stop_ids(base, tokenizer), seed=config.train.seed)
        extra["normalization"] = {"gain": gain, "bias": bias, **stats}
    if not config.export or jax.process_index() != 0:
        return None
    if models.has_lora(model):
        model = models.merge_lora(model)
    weights = None
    if extra.get("num_objectives"):
        # The training loss's weights are the default combination of the normalised objectives.
        weights = config.loss.get("dimension_weights") or [1.0] * extra["num_objectives"]
    return models.save_reward_model(Path(config.output_dir) / EXPORT_DIR, model, base, tokenizer, gain=gain,
                                    bias=bias, dimension_weights=weights,
                                    metadata={"dimensions": extra.get("dimensions", [])})

