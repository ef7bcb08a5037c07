"""ARGS with ``n`` samples a prompt: each prompt prefilled once for its samples against once per sample.

What it measures: :class:`jaxalign.rollout.ArgsSampler` (ARGS-stochastic, ``k`` candidates re-ranked by a
mean-pooled reward model) generating ``--samples`` responses to each of ``--prompts`` prompts (``n``: the
patient and the reward trunk prefill each prompt once and copy its caches and pooled state for its samples)
against the same rows given as repeated prompts with ``n=1`` (a prefill per row in both models):

- models: SmolLM2-135M-Instruct (the embedded GGUF, dequantised to float32) as the patient and as the reward
  trunk (a mean-pooled head of random weights: the time does not depend on them), float32 on CPU;
- prompts: the main job's review requests in the chat template and, in the second setting (``--settings``:
  words), behind a longer system prompt, so the prompt's share of the work grows;
- ``--new-tokens`` at temperature 1 with no stop token, so that both layouts decode the same number of steps;
- the layouts alternate in one process, ``--repeats`` times after one warm-up each (compilation); medians.

There is no peer to time: the public ARGS code (``argsearch.py``) takes one prompt and one sample at a time.

Commands::

    python benchmarks/args_samples.py                 # chat and 60-word system prompts, ~9 min on 2 cores
    python benchmarks/args_samples.py --repeats 1 --settings 0   # quick check

Writes ``benchmarks/results/args_samples.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import provenance  # noqa: E402
from benchmarks.grpo_groups import prompt_batch  # noqa: E402
from experiments.sentiment import make_prompts  # noqa: E402
from jaxalign import models  # noqa: E402
from jaxalign.rollout import ArgsSampler, SamplingParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LAYOUTS = ("once a prompt", "once a sample")


def chat_ids(tokenizer, prompts: list[str], system_words: int) -> list[list[int]]:
    """The prompts as the trainers tokenize them (the chat template, its default system prompt unless one is
    given), one unpadded id list each."""
    batch = prompt_batch(tokenizer, prompts, system_words)
    return [np.asarray(row)[np.asarray(mask, bool)].tolist()
            for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]


def run_setting(sampler: ArgsSampler, tokenizer, prompts: list[str], args, system_words: int) -> dict:
    ids = chat_ids(tokenizer, prompts, system_words)
    repeated = [row for row in ids for _ in range(args.samples)]
    calls = {"once a prompt": (ids, args.samples), "once a sample": (repeated, 1)}
    seconds = {name: [] for name in LAYOUTS}
    for repeat in range(args.repeats + 1):
        for name in LAYOUTS:
            rows, n = calls[name]
            params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, stop_token_ids=(), n=n)
            start = time.perf_counter()
            out = sampler.generate(rows, key=jax.random.key(repeat), params=params, mode="sample")
            jax.block_until_ready(out.tokens)
            if repeat:  # the first call of each layout compiles
                seconds[name].append(time.perf_counter() - start)
            print(f"  P~{max(map(len, ids))} {name}: {time.perf_counter() - start:.2f} s"
                  + (" (compiling)" if not repeat else ""), flush=True)
    result = {"system_words": system_words, "prompt_tokens": [len(row) for row in ids],
              "prompt_length_bucket": int(out.prompt_tokens.shape[1]), "rows": len(repeated),
              "samples": args.samples}
    for name in LAYOUTS:
        result[name] = {"seconds": statistics.median(seconds[name]), "seconds_all": seconds[name]}
    result["speedup"] = result["once a sample"]["seconds"] / result["once a prompt"]["seconds"]
    return result


def plot(results: list[dict], path: Path, machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 3.6))
    x = np.arange(len(results))
    for offset, (name, colour) in enumerate(zip(LAYOUTS, ("#55a868", "#4c72b0"))):
        bars = axis.bar(x + (offset - 0.5) * 0.38, [r[name]["seconds"] for r in results], 0.38, color=colour,
                        label=f"prefill {name}")
        axis.bar_label(bars, fmt="%.1f s", fontsize=8)
    axis.set_xticks(x, [f"P={r['prompt_length_bucket']}: {r['speedup']:.2f}x" for r in results])
    axis.set_ylabel("seconds per generate call (median)")
    first = results[0]
    axis.set_title(f"ARGS-stochastic, SmolLM2-135M fp32 patient + reward trunk\n{first['rows']} rows "
                   f"({first['samples']} samples a prompt), k={first['k']}, {first['new_tokens']} tokens; "
                   f"{machine}", fontsize=8)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--k", type=int, default=10, help="ARGS candidates a step (the paper's 10)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settings", type=int, nargs="+", default=[0, 60],
                        help="system-prompt words per setting (0: the chat template's own)")
    parser.add_argument("--out", type=Path, default=RESULTS / "args_samples.json")
    args = parser.parse_args(argv)
    patient, tokenizer = models.load_gguf(models.default_model_path())
    trunk, _ = models.load_gguf(models.default_model_path())
    reward_model = models.RewardModel(trunk, pooling="mean", rngs=nnx.Rngs(0))
    sampler = ArgsSampler(patient, reward_model, k=args.k, weight=1.5)
    prompts = make_prompts(args.prompts, seed=1)
    results = []
    print(f"{'prompt bucket':>13} | {'rows':>4} | {LAYOUTS[0]:>14} | {LAYOUTS[1]:>14} | speed-up")
    for words in args.settings:
        result = run_setting(sampler, tokenizer, prompts, args, words)
        result.update(k=args.k, new_tokens=args.new_tokens)
        results.append(result)
        print(f"{result['prompt_length_bucket']:>13} | {result['rows']:>4} | "
              f"{result[LAYOUTS[0]]['seconds']:>12.2f} s | {result[LAYOUTS[1]]['seconds']:>12.2f} s | "
              f"{result['speedup']:.2f}x", flush=True)
    setup = {**{key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
             "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32), patient and reward trunk",
             "mode": "sample", "temperature": 1.0, "jax_backend": jax.default_backend()}
    described = provenance.write_result(args.out, "args_samples", setup=setup, results=results)
    machine = f"{described['machine']['cpu']}, {described['machine']['cores']} cores"
    plot(results, args.out.with_suffix(".png"), machine)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
