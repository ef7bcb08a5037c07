"""Evaluation: gold and learned rewards, win rates with confidence intervals, KL to the reference, perplexity,
reward-model accuracy.

Quick path::

    import jax
    from jaxalign import eval as ja_eval, models
    from jaxalign.rollout import SamplingParams

    policy, tokenizer = models.load_gguf(models.default_model_path())      # or models.load_hf("ppo_ckpt")
    reference, _ = models.load_gguf(models.default_model_path())
    result = ja_eval.evaluate_policy(policy, reference, tokenizer, ["Tell me about your day."] * 32,
                                     judge=ja_eval.VaderJudge(), params=SamplingParams(max_new_tokens=48),
                                     samples_per_prompt=2, key=jax.random.key(0))
    print(result.table())          # gold reward, KL, lengths; win rate with its 95% Wilson interval
    result.plot("eval.png")

    ja_eval.win_rate(policy_scores, reference_scores)                       # WinRate(rate, low, high, ...)
    ja_eval.reward_accuracy(reward_model, pair_batches, min_margin=0.5)     # {"accuracy", "pairs", ...}
    ja_eval.perplexity(model, sft_batches)

- :mod:`~jaxalign.eval.judges`: :class:`Judge`, :class:`VaderJudge` (the gold judge), :class:`ConcisenessJudge`,
  :class:`RewardModelJudge`.
- :mod:`~jaxalign.eval.stats`: :func:`win_rate`, :func:`mean_ci`, :func:`wilson_interval`.
- :mod:`~jaxalign.eval.metrics`: :func:`sequence_kl`, :func:`reference_logps`, :func:`perplexity`,
  :func:`token_nll`, :func:`reward_accuracy`.
- :mod:`~jaxalign.eval.evaluate`: :func:`evaluate_policy`, :class:`PolicyEval`.
- :mod:`~jaxalign.eval.toxicity`: :class:`ToxicityJudge`, :func:`toxicity_report` (alt-profanity-check, Detoxify).
- :mod:`~jaxalign.eval.llm_judge`: :class:`JudgeSpec`, :func:`judged_win_rate` (pairwise, both orders),
  :func:`grade` (1-10), :func:`cohen_kappa`; :mod:`~jaxalign.eval.templates`: the judge prompts.
- :mod:`~jaxalign.eval.length_control`: :func:`length_controlled_win_rate` (AlpacaEval 2's GLM).
- :mod:`~jaxalign.eval.benchmarks`: AlpacaEval, MT-Bench and TruthfulQA-MC files; MC1/MC2 from log-likelihoods.
- :mod:`~jaxalign.eval.command`: the ``jaxalign eval`` command (:func:`add_eval_command`; judge and benchmark
  options in :mod:`~jaxalign.eval.judging`).

See docs/eval.md.
"""

import importlib
from typing import TYPE_CHECKING

# Public name -> submodule. Loaded on first use (PEP 562), so `jaxalign --help`, which registers the eval
# command from jaxalign.eval.command, does not import jax, flax and the models.
_EXPORTS = {
    "PolicyEval": "evaluate", "evaluate_policy": "evaluate",
    "ConcisenessJudge": "judges", "Judge": "judges", "Prompt": "judges", "RewardModelJudge": "judges",
    "VaderJudge": "judges", "end_of_turn_ids": "judges",
    "perplexity": "metrics", "reference_logps": "metrics", "reward_accuracy": "metrics", "sequence_kl": "metrics",
    "token_nll": "metrics",
    "MeanCI": "stats", "WinRate": "stats", "mean_ci": "stats", "proportion_ci": "stats", "wilson_interval": "stats",
    "win_rate": "stats",
    "generate": "evaluate",
    "Agreement": "llm_judge", "Grades": "llm_judge", "JudgeSpec": "llm_judge", "JudgedWinRate": "llm_judge",
    "JudgeUnreachable": "llm_judge", "check_endpoint": "llm_judge", "cohen_kappa": "llm_judge", "grade": "llm_judge",
    "judge_pairs": "llm_judge", "judged_win_rate": "llm_judge",
    "GamedRows": "length_control", "LengthControlled": "length_control",
    "length_controlled_win_rate": "length_control",
    "DetoxifyModel": "toxicity", "ProfanityCheck": "toxicity", "ToxicityJudge": "toxicity",
    "toxicity_report": "toxicity",
    "Template": "templates", "load_templates": "templates", "write_templates": "templates",
    "read_alpaca_eval": "benchmarks", "read_mt_bench": "benchmarks", "read_truthfulqa_mc": "benchmarks",
    "truthfulqa_scores": "benchmarks",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from jaxalign.eval.benchmarks import read_alpaca_eval, read_mt_bench, read_truthfulqa_mc, truthfulqa_scores  # noqa: F401
    from jaxalign.eval.evaluate import PolicyEval, evaluate_policy, generate  # noqa: F401
    from jaxalign.eval.judges import ConcisenessJudge, Judge, Prompt, RewardModelJudge, VaderJudge, end_of_turn_ids  # noqa: F401
    from jaxalign.eval.length_control import GamedRows, LengthControlled, length_controlled_win_rate  # noqa: F401
    from jaxalign.eval.llm_judge import (  # noqa: F401
        Agreement,
        Grades,
        JudgedWinRate,
        JudgeSpec,
        JudgeUnreachable,
        check_endpoint,
        cohen_kappa,
        grade,
        judge_pairs,
        judged_win_rate,
    )
    from jaxalign.eval.metrics import perplexity, reference_logps, reward_accuracy, sequence_kl, token_nll  # noqa: F401
    from jaxalign.eval.stats import MeanCI, WinRate, mean_ci, proportion_ci, wilson_interval, win_rate  # noqa: F401
    from jaxalign.eval.templates import Template, load_templates, write_templates  # noqa: F401
    from jaxalign.eval.toxicity import DetoxifyModel, ProfanityCheck, ToxicityJudge, toxicity_report  # noqa: F401


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jaxalign.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"jaxalign.eval.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
