"""The online runs: PPO and GRPO from a :class:`~jaxalign.methods.recipe.RunConfig` (``jaxalign train ppo|grpo``).

A run: write ``run.json`` -> load the policy (HF directory, GGUF or the embedded default; LoRA adapters when
``model.lora``) and the frozen reference -> tokenise the prompts (optionally ordered as a curriculum) ->
build the reward (:func:`jaxalign.methods.rewards.build_reward`) and the gold judge -> :class:`PPOTrainer` or
:class:`GRPOTrainer` (resumes from ``output_dir/checkpoints``) -> held-out evaluation (gold win rate against
the reference with a confidence interval, KL, rewards) -> Hugging Face export of the policy -> plots of the
curves (``metrics.png``) and of gold and proxy reward against KL (``reward_vs_kl.png``, the
over-optimisation picture of Gao et al. 2022, arXiv 2210.10760).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxalign import data as jdata
from jaxalign import models
from jaxalign.methods import common
from jaxalign.methods.grpo import GRPOTrainer
from jaxalign.methods.ppo import PPOTrainer
from jaxalign.methods.recipe import RunConfig
from jaxalign.methods.rewards import JudgeReward, build_reward
from jaxalign.models.hub import provenance
from jaxalign.rollout import SamplingParams
from jaxalign.train.plots import plot_metrics, plot_reward_vs_kl

SAMPLING_KEYS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def sampling_params(config: RunConfig, lm, tokenizer) -> SamplingParams:
    """The run's :class:`SamplingParams`; stop ids default to the model's and the tokenizer's EOS."""
    values = dict(config.sampling)
    unknown = sorted(set(values) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(f"sampling: unknown key(s) {unknown} (known: {', '.join(SAMPLING_KEYS)})")
    if values.get("stop_token_ids") is None:
        values["stop_token_ids"] = common.stop_ids(lm, tokenizer)
    values["stop_token_ids"] = tuple(values["stop_token_ids"])
    return SamplingParams(**values)


def _gold_judge(config: RunConfig):
    if config.gold == "vader":
        from jaxalign.eval.judges import VaderJudge

        return VaderJudge()
    return None


def _special_ids(tokenizer) -> tuple[int, ...]:
    return tuple(int(i) for i in getattr(tokenizer, "all_special_ids", ()) or ())


def _embeddings(lm) -> np.ndarray:
    """The input embedding table ``[V, D]`` (the ADLF faithfulness signal compares mean embeddings)."""
    table = lm.transformer.wte if hasattr(lm, "transformer") else lm.model.embed_tokens
    return np.asarray(table.embedding[...], np.float32)


def run_online(config: RunConfig, *, overwrite: bool = False) -> common.RunResult:
    """Train, evaluate and export one PPO or GRPO run (see the module docstring, and
    :func:`~jaxalign.methods.pipeline.run` for resuming and ``overwrite``)."""
    common.check_output_dir(config, overwrite=overwrite)
    out = Path(config.output_dir)
    lm, tokenizer = common.load_pretrained(config.model)
    dataset = jdata.build_dataset(config.data, tokenizer)
    if dataset.kind != "prompt":
        raise ValueError(f"method {config.method} trains on prompts ({{\"prompt\": ...}} records); "
                         f"{config.data.name} holds {dataset.kind!r} records")
    # Read and checked now, not when the evaluation would fail after training.
    eval_prompts = None if config.eval_data is None else held_out_prompts(config)
    if config.curriculum is not None:
        dataset = common.curriculum_order(dataset, config.curriculum)
    common.prepare_output_dir(config, overwrite=overwrite)  # a run refused for its data leaves none
    common.write_json(out / common.RUN_FILE, {"config": config.to_dict(),
                                                 "data_reports": [str(r) for r in dataset.reports],
                                                 "data_sources": [s.as_dict() for s in dataset.mixture],
                                                 "examples": len(dataset),
                                                 "model_source": provenance(config.model.path, config.model.revision)})
    reference = None
    if config.reference == "model":
        reference, _ = common.load_pretrained(dataclasses.replace(config.model, lora=None))
    policy = common.with_lora(lm, config)
    reward = build_reward(config.reward, tokenizer=tokenizer, reference_embeddings=_embeddings(lm),
                          ignore_ids=_special_ids(tokenizer))
    gold_judge = _gold_judge(config)
    gold = JudgeReward(gold_judge, name=config.gold) if gold_judge is not None else None
    sampling = sampling_params(config, lm, tokenizer)
    # Endless prompts (a curriculum keeps its order across passes), whole batches only.
    prompts = common.training_batches(config.data, dataset, shuffle=False if config.curriculum else None,
                                      drop_last=True, num_epochs=config.data.num_epochs)
    left_over = len(dataset) % config.data.batch_size
    if config.curriculum and left_over:
        warnings.warn(f"curriculum: the last {left_over} prompts (the hardest) never fill a batch of "
                      f"{config.data.batch_size} and are not trained on; make the prompt count a multiple of "
                      "data.batch_size", stacklevel=2)
    trainer_args = dict(reward=reward, tokenizer=tokenizer, sampling=sampling, reference=reference, gold=gold,
                  extra_metadata=config.checkpoint_metadata())
    if config.method == "ppo":
        trainer = PPOTrainer(config.train, config.loss, policy, prompts, **trainer_args)
    else:
        trainer = GRPOTrainer(config.train, config.loss, policy, prompts, **trainer_args,
                              use_reference=config.reference != "none")
    trainer.run()
    trained = trainer.trained_model()
    policy = trained.policy if config.method == "ppo" else trained
    if models.has_lora(policy):
        policy = models.merge_lora(policy)

    extra: dict[str, Any] = {}
    eval_metrics: dict[str, float] = {}
    if eval_prompts is not None:
        evaluation = evaluate_online(config, eval_prompts, policy, tokenizer, sampling, gold_judge,
                                     _learned_judge(reward))
        extra["evaluation"] = evaluation.to_dict()
        eval_metrics = _headline(evaluation)
    export_dir = None
    if jax.process_index() == 0:
        if config.export:
            export_dir = models.save_hf(policy, policy.config, out / common.EXPORT_DIR, tokenizer)
        common.write_json(out / common.EVAL_FILE, {"eval": eval_metrics, **extra})
        plot_metrics(out / "metrics.jsonl", out / "metrics.png", title=f"{config.method} — {out.name}",
                     keys=ONLINE_PANELS)
        plot_reward_vs_kl(out / "metrics.jsonl", out / "reward_vs_kl.png", title=f"{config.method} — {out.name}")
    return common.RunResult(config, policy, tokenizer, eval_metrics, export_dir, extra)


# PPO logs policy/clipfrac and a value loss, GRPO policy/clip_ratio/region_mean; plot_metrics keeps those logged.
ONLINE_PANELS = ("gold_reward", "reward", "kl", "entropy", "value_loss", "policy/clipfrac",
                 "policy/clip_ratio/region_mean", "grad_norm", "response_length")


def _learned_judge(reward):
    """The reward model behind a ``reward: {model: DIR}`` reward (scored in the evaluation too), else None."""
    judge = getattr(reward, "judge", None)
    return judge if callable(getattr(judge, "score_rollout", None)) else None


def held_out_prompts(config: RunConfig) -> list:
    """The prompt records of ``config.eval_data``; an error naming the file for any other kind."""
    records, _ = jdata.read_records(config.eval_data.source, format=config.eval_data.format,
                                    on_error=config.eval_data.on_error, limit=config.eval_data.limit)
    if not records or not all(isinstance(r, jdata.PromptRecord) for r in records):
        kinds = sorted({type(r).__name__ for r in records})
        raise ValueError(f"eval_data {config.eval_data.name}: method {config.method} evaluates on prompt records "
                         f"({{\"prompt\": ...}}), the file holds {', '.join(kinds) or 'none'}")
    return records


def evaluate_online(config: RunConfig, records: list, policy, tokenizer, sampling: SamplingParams, gold_judge,
                    learned_judge=None):
    """The trained policy against the initial one on the held-out prompt ``records``: gold reward and win rate
    (``gold``, VADER when unset), the learned reward model's when the training reward is one, KL."""
    from jaxalign.eval import VaderJudge, evaluate_policy

    reference, _ = common.load_pretrained(dataclasses.replace(config.model, lora=None))
    params = dataclasses.replace(sampling, n=1)
    return evaluate_policy(policy, reference, tokenizer, records, judge=gold_judge or VaderJudge(),
                           reward_judge=learned_judge, params=params,
                           samples_per_prompt=config.eval_samples_per_prompt,
                           key=jax.random.fold_in(jax.random.key(config.train.seed), 10**6),
                           batch_size=config.eval_data.batch_size)


def _headline(evaluation) -> dict[str, float]:
    values = evaluation.to_dict()
    return {key: value for key, value in _flatten(values).items() if isinstance(value, int | float)}


def _flatten(values, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        elif not isinstance(value, list):
            flat[f"{prefix}{key}"] = value
    return flat
