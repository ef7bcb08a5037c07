"""GRPO's generation, scoring pass and update with each group's prompt run once (group rows) against once per
response.

What it measures: :class:`jaxalign.methods.grpo.GRPOTrainer`'s two passes that read the prompt, on the same
rollout, laid out both ways (``shared_prompt: true``, the default, and ``false``), and the sampler's generation
of that rollout:

- model: SmolLM2-135M-Instruct (the embedded GGUF, dequantised to float32), float32 on CPU; a frozen copy as
  the reference (``kl_coef`` 0.04, so the update reads ``ref_logps`` too);
- one rollout of ``--prompts`` prompts × ``--group`` responses, ``--new-tokens`` at temperature 1 stopping at
  EOS, sampled once by the policy; the prompts are the main job's review requests in the chat template (its
  default system prompt included) and, in the second setting (``--settings``: words), behind a longer system
  prompt (a task description, as math and code prompts carry), so the prompt's share of each row grows;
- the scoring pass: the reference's log-probs of every response token (``GRPOTrainer.score``);
- the update: one optimizer step of GRPO's loss over the whole iteration (``epochs=1``, one minibatch,
  AdamW), the trainer's own jitted step;
- generation: :meth:`jaxalign.rollout.Sampler.generate` of ``--group`` samples a prompt (``n``: each prompt
  prefilled once, its cache copied for its samples) against the same rows given as repeated prompts with
  ``n=1`` (a prefill per row), ``--new-tokens`` each with no stop token, so that both
  decode the same number of steps;
- the two layouts alternate in one process, ``--repeats`` times after one warm-up each (compilation), and the
  medians are reported with the FLOPs each layout runs (every slot of its padded shapes:
  :func:`jaxalign.methods.groups.saves_work`'s count).

TRL's ``GRPOTrainer`` (1.16) runs one row per response, the plain layout here; it is not timed in this run,
so the ratio below is jaxalign's group rows against jaxalign's plain rows, not against TRL.

Commands::

    python benchmarks/grpo_groups.py                     # chat and 60-word system prompts, ~35 min
    python benchmarks/grpo_groups.py --repeats 2 --settings 0   # quick check

Writes ``benchmarks/results/grpo_groups.json`` and ``.png`` (time per phase, both layouts, per setting).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import provenance  # noqa: E402
from experiments.sentiment import make_prompts  # noqa: E402
from jaxalign import data as jdata  # noqa: E402
from jaxalign import models  # noqa: E402
from jaxalign.methods.groups import forward_flops  # noqa: E402
from jaxalign.methods.grpo import GRPOConfig, GRPOTrainer  # noqa: E402
from jaxalign.methods.online import RolloutBatch, sequence_inputs  # noqa: E402
from jaxalign.methods.rewards import FunctionReward, RewardOutput  # noqa: E402
from jaxalign.rollout import Sampler, SamplingParams  # noqa: E402
from jaxalign.train import CheckpointConfig, LogConfig, OptimizerConfig, TrainConfig  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
LAYOUTS = ("group rows", "plain rows")
# A task description, repeated or cut to a setting's words.
SYSTEM = ("You review products for a consumer magazine. Write a short, specific and honest review: name what "
          "works and what does not, compare with what a buyer would expect for the price, and end with a clear "
          "recommendation. Keep a friendly tone and avoid jargon. ")


def system_prompt(words: int) -> str | None:
    if words <= 0:
        return None
    text = SYSTEM.split()
    return " ".join(text[i % len(text)] for i in range(words))


def prompt_batch(tokenizer, prompts: list[str], system_words: int) -> dict:
    """The prompts as the trainers tokenize them (the chat template, behind a ``system_words``-word system
    prompt, or the template's default one for 0), as one padded batch."""
    system = system_prompt(system_words)
    records = [jdata.PromptRecord(([{"role": "system", "content": system}] if system else [])
                                  + [{"role": "user", "content": prompt}]) for prompt in prompts]
    return next(iter(jdata.BatchIterator(jdata.tokenize(records, tokenizer), batch_size=len(prompts),
                                         shuffle=False, drop_last=True)))


def trainer_for(policy, reference, tokenizer, sampling, shared: bool) -> GRPOTrainer:
    config = TrainConfig(total_steps=1, seed=0, optimizer=OptimizerConfig(learning_rate=1e-6, warmup_steps=0),
                         checkpoint=CheckpointConfig(directory=None), log=LogConfig(directory=None, progress_bar=False,
                                                                                     tensorboard=False))
    return GRPOTrainer(config, GRPOConfig(kl_coef=0.04, shared_prompt=shared), policy, iter(()),
                       reward=FunctionReward(lambda texts: np.zeros(len(texts)), "none"), tokenizer=tokenizer,
                       sampling=sampling, reference=reference)


def layout_flops(config, prompt_length: int, response_length: int, group: int, rows: int, shared: bool) -> float:
    """Forward FLOPs of the trunk over the padded shapes (products and all T² attention pairs), as saves_work."""
    length = prompt_length + (group * response_length if shared else response_length)
    return float((rows // group if shared else rows) * forward_flops(config, length))


def timed(fn, repeats_log: list[float]):
    started = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    repeats_log.append(time.perf_counter() - started)
    return out


def time_generation(policy, tokens: np.ndarray, mask: np.ndarray, args) -> dict[str, list[float]]:
    """Seconds per generation of ``--group`` samples a prompt, group rows (``n``) and plain rows (repeated
    prompts, ``n=1``) alternated after a compiling warm-up each."""
    sampler = Sampler(policy)
    once = SamplingParams(max_new_tokens=args.new_tokens, n=1, temperature=1.0, stop_token_ids=())
    calls = {"group rows": partial(sampler.generate, tokens, mask, params=dataclasses.replace(once, n=args.group)),
             "plain rows": partial(sampler.generate, np.repeat(tokens, args.group, axis=0),
                                   np.repeat(mask, args.group, axis=0), params=once)}
    seconds = {name: [] for name in LAYOUTS}
    for repeat in range(args.repeats + 1):
        for name in LAYOUTS:
            log = []
            rollout = timed(partial(calls[name], key=jax.random.key(repeat)), log)
            assert rollout.tokens.shape == (len(tokens) * args.group, args.new_tokens)
            if repeat:
                seconds[name] += log
    return seconds


def run_setting(policy, reference, tokenizer, prompts: list[str], args, system_words: int) -> dict:
    batch = prompt_batch(tokenizer, prompts, system_words)
    stop = tuple(policy.config.eos_token_ids) or (tokenizer.eos_token_id,)
    sampling = SamplingParams(max_new_tokens=args.new_tokens, n=args.group, temperature=1.0, stop_token_ids=stop)
    rollout = Sampler(policy).generate(batch["input_ids"], batch["attention_mask"], key=jax.random.key(0),
                                       params=sampling)
    inputs = sequence_inputs(rollout)
    generate_s = time_generation(policy, np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"]), args)
    prompt_length, response_length = int(rollout.prompt_tokens.shape[1]), int(rollout.tokens.shape[1])
    rows = int(rollout.tokens.shape[0])
    rewards = RewardOutput(np.random.default_rng(0).normal(size=rows), {})
    sides = {}
    for name, shared in zip(LAYOUTS, (True, False)):
        trainer = trainer_for(policy, reference, tokenizer, sampling, shared)
        sides[name] = {"trainer": trainer, "state": trainer.train_step.init(0), "score_s": [], "update_s": [],
                       "grouped": bool(trainer.shared_group(rollout))}
    assert sides["group rows"]["grouped"] and not sides["plain rows"]["grouped"], "the layouts did not differ"
    logps = {}
    for repeat in range(args.repeats + 1):
        for name in LAYOUTS:
            side = sides[name]
            trainer, score_log, update_log = side["trainer"], [], []
            model = trainer.train_step.trained_model(side["state"])  # the step donates the state it is given
            scored = timed(partial(trainer.score, model, rollout, inputs), score_log)
            prepared, _ = trainer.prepare(rollout, inputs, scored, rewards)
            minibatch = RolloutBatch.from_arrays(prepared).check()
            side["state"], metrics = timed(partial(trainer.train_step, side["state"], minibatch), update_log)
            if repeat == 0:
                logps[name] = np.asarray(scored["ref_logps"])
                side["first_loss"] = float(metrics["loss"])
                continue  # compilation
            side["score_s"] += score_log
            side["update_s"] += update_log
    mask = np.asarray(rollout.response_mask, bool)
    result = {"system_words": system_words, "prompt_length": prompt_length, "response_length": response_length,
              "rows": rows, "group": args.group, "mean_response_tokens": float(mask.sum(1).mean()),
              "max_abs_ref_logps_difference": float(np.abs(logps["group rows"] - logps["plain rows"])[mask].max()),
              "first_loss": {name: sides[name]["first_loss"] for name in LAYOUTS}}
    for name, shared in zip(LAYOUTS, (True, False)):
        side = sides[name]
        flops = layout_flops(policy.config, prompt_length, response_length, args.group, rows, shared)
        prefills = rows // args.group if shared else rows
        result[name] = {"generate_s": statistics.median(generate_s[name]),
                        "score_s": statistics.median(side["score_s"]), "update_s": statistics.median(side["update_s"]),
                        "generate_s_all": generate_s[name], "score_s_all": side["score_s"],
                        "update_s_all": side["update_s"], "trunk_forward_flops": flops,
                        "prefill_trunk_flops": float(prefills * forward_flops(policy.config, prompt_length))}
    for key in ("generate_s", "score_s", "update_s"):
        result[f"speedup_{key.removesuffix('_s')}"] = result["plain rows"][key] / result["group rows"][key]
    flops = [result[name]["trunk_forward_flops"] for name in LAYOUTS]
    result["flops_saved"] = 1 - flops[0] / flops[1]
    return result


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for axis, result in zip(axes[0], results):
        x = np.arange(3)
        for offset, (name, colour) in enumerate(zip(LAYOUTS, ("#55a868", "#4c72b0"))):
            values = [result[name]["generate_s"], result[name]["score_s"], result[name]["update_s"]]
            bars = axis.bar(x + (offset - 0.5) * 0.38, values, 0.38, color=colour, label=name)
            axis.bar_label(bars, fmt="%.2f s", fontsize=7)
        axis.set_xticks(x, ["generation", "scoring pass", "update step"])
        axis.set_ylabel("seconds (median)")
        axis.set_title(f"P={result['prompt_length']}, G={result['group']}, N={result['response_length']}: "
                       f"{result['speedup_generate']:.2f}x / {result['speedup_score']:.2f}x / "
                       f"{result['speedup_update']:.2f}x\n"
                       f"{100 * result['flops_saved']:.0f} % fewer trunk FLOPs (scoring, update)", fontsize=9)
        axis.legend(fontsize=7)
    figure.suptitle("GRPO, SmolLM2-135M fp32: each prompt once per group vs once per response", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--settings", type=int, nargs="+", default=[0, 60],
                        help="system-prompt words per setting (0: the chat template's own)")
    parser.add_argument("--out", type=Path, default=RESULTS / "grpo_groups.json")
    args = parser.parse_args(argv)
    policy, tokenizer = models.load_gguf(models.default_model_path())
    reference, _ = models.load_gguf(models.default_model_path())
    prompts = make_prompts(args.prompts, seed=1)
    results = []
    for words in args.settings:
        result = run_setting(policy, reference, tokenizer, prompts, args, words)
        results.append(result)
        print(f"P={result['prompt_length']:>4} G={args.group} N={result['response_length']}: "
              f"{100 * result['flops_saved']:.0f} % fewer trunk FLOPs | "
              + " | ".join(f"{name}: generate {result[name]['generate_s']:.2f} s, "
                           f"score {result[name]['score_s']:.2f} s, update {result[name]['update_s']:.2f} s"
                           for name in LAYOUTS)
              + f" | {result['speedup_generate']:.2f}x / {result['speedup_score']:.2f}x / "
                f"{result['speedup_update']:.2f}x")
    output = {"setup": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)",
                        "kl_coef": 0.04, "jax_backend": jax.default_backend()},
              "results": results, "provenance": provenance.describe()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(output, indent=1) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
