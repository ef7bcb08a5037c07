"""Token-reward builder throughput against plain teacher-forced forward passes over the same tokens.

LLMDoctor's token rewards cost two patient forward passes per response, one behind each face
(:mod:`jaxalign.methods.token_rewards`). This measures how close the builder (host batching, the face prefixes,
both passes, the importance and reward arithmetic, the transfers back) comes to the bare cost of those passes:
the same face sequences, already padded on the host, through a jitted ``target_logps`` of the same patient. Both
sides run once to compile, then alternately ``--repeats`` times; medians. Issue 18's target: the builder at
>= 90 % of the plain passes' tokens/s.

    python benchmarks/token_reward_throughput.py [--pairs 32] [--batch 8] [--repeats 3] [--quick]

Writes ``benchmarks/results/token_reward_throughput.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import jax
import numpy as np
import provenance  # benchmarks/provenance.py: run as `python benchmarks/token_reward_throughput.py`
from flax import nnx

from jaxalign import data as jdata
from jaxalign import models
from jaxalign.methods.faces import DEFAULT_FACES
from jaxalign.methods.token_rewards import LENGTH_STEP, FaceRows, build_token_rewards, faced_batch
from jaxalign.models.scoring import target_logps

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = ("the a good bad service room food quiet loud staff friendly slow quick view city night morning coffee "
         "price clean dirty bed window street music garden people table menu").split()


def pairs(count: int, seed: int = 0) -> list[jdata.PreferenceRecord]:
    rng = np.random.default_rng(seed)

    def text(n):
        return " ".join(rng.choice(WORDS, n)).capitalize() + "."

    return [jdata.PreferenceRecord(prompt=(jdata.Message("user", f"Describe {text(int(rng.integers(12, 30)))}"),),
                                   chosen=(jdata.Message("assistant", text(int(rng.integers(20, 60)))),),
                                   rejected=(jdata.Message("assistant", text(int(rng.integers(20, 60)))),))
            for _ in range(count)]


def plain_batches(dataset, tokenizer, batch: int) -> tuple[list, int]:
    """The builder's face sequences, padded as it pads them: ``[(ids, mask, positions), ...]`` and real tokens."""
    faces = FaceRows(dataset, tokenizer, DEFAULT_FACES["helpfulness"], "auto")
    out, real = [], 0
    for start in range(0, len(dataset), batch):
        rows = list(range(start, min(start + batch, len(dataset))))
        heads = [faces.heads(i) for i in rows] + [[[None, None]] * 2] * (batch - len(rows))
        sequences = [s for i in rows for s in dataset.examples[i].sequences] + [None] * (2 * (batch - len(rows)))
        length = -(-max(len(h[0]) + len(s) - h[1] for per_pair, i in zip(heads, rows, strict=False)
                        for per_face in per_pair for h, s in zip(per_face, dataset.examples[i].sequences,
                                                                  strict=True)) // LENGTH_STEP) * LENGTH_STEP
        for face in (0, 1):
            ids, mask, positions, _ = faced_batch(sequences, [h for per_pair in heads for h in per_pair[face]],
                                                  length, dataset.pad_token_id)
            real += int(mask.sum())
            out.append((ids, mask, positions))
    return out, real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="8 pairs, 1 repeat")
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.repeats = 8, 1

    patient, tokenizer = models.load_pretrained(None)
    dataset = jdata.tokenize(pairs(args.pairs), tokenizer, progress=False)
    batches, real_tokens = plain_batches(dataset, tokenizer, args.batch)
    graphdef, state = nnx.split(patient)
    forward = jax.jit(lambda state, ids, mask, positions: target_logps(nnx.merge(graphdef, state), ids, mask,
                                                                       positions))

    def run_plain():
        # One call at a time, each waited for, as the builder's batches are: queuing them all at once makes XLA's
        # CPU runtime run several programs side by side on the same cores, which is slower, not a fairer baseline.
        for arrays in batches:
            jax.block_until_ready(forward(state, *arrays))

    def run_builder():
        build_token_rewards(patient, tokenizer, dataset, DEFAULT_FACES["helpfulness"], batch_size=args.batch,
                            identity={"benchmark": True}, desc="builder")

    run_plain(), run_builder()  # compile both
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run_builder()
        middle = time.perf_counter()
        run_plain()
        times.append((middle - start, time.perf_counter() - middle))
    builder_s = statistics.median(t[0] for t in times)
    plain_s = statistics.median(t[1] for t in times)
    results = {
        "setup": {"model": "SmolLM2-135M-Instruct (embedded, float32)", "pairs": args.pairs, "batch": args.batch,
                  "repeats": args.repeats, "patient_passes": 2 * 2 * args.pairs, "real_tokens": real_tokens,
                  "cpu_count": os.cpu_count(), "jax": jax.__version__, "jax_backend": jax.default_backend()},
        "builder": {"seconds": builder_s, "tokens_per_s": real_tokens / builder_s, "all": [t[0] for t in times]},
        "plain_forward": {"seconds": plain_s, "tokens_per_s": real_tokens / plain_s, "all": [t[1] for t in times]},
        "ratio": plain_s / builder_s,
        "target": 0.9,
        "provenance": provenance.describe(),
    }
    print(f"\ntoken rewards of {args.pairs} pairs (4 patient passes each counted: 2 responses x 2 faces), "
          f"{real_tokens} real tokens, batch {args.batch}, {os.cpu_count()} CPU cores, median of {args.repeats}")
    print(f"{'':34}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'token-reward builder':34}{builder_s:>10.2f}{real_tokens / builder_s:>12,.0f}")
    print(f"{'plain teacher-forced forwards':34}{plain_s:>10.2f}{real_tokens / plain_s:>12,.0f}")
    print(f"builder / plain throughput: {results['ratio']:.2f} (target >= 0.90: "
          f"{'met' if results['ratio'] >= 0.9 else 'NOT met'})")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / "token_reward_throughput.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axis = plt.subplots(figsize=(6, 3.2))
    names = ["plain forwards", "token-reward builder"]
    values = [results["plain_forward"]["tokens_per_s"], results["builder"]["tokens_per_s"]]
    axis.barh(names, values, color=["#9ca3af", "#2563eb"])
    for y, value in enumerate(values):
        axis.text(value, y, f" {value:,.0f}", va="center")
    axis.set_xlabel("tokens/s (both faces' passes counted)")
    axis.set_title(f"token rewards vs plain forwards: {results['ratio']:.2f}x ({os.cpu_count()} CPU cores)")
    figure.tight_layout()
    figure.savefig(args.output_dir / "token_reward_throughput.png", dpi=120)
    print(f"wrote {args.output_dir / 'token_reward_throughput.png'}")


if __name__ == "__main__":
    main()
