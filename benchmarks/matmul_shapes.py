"""The matrix products jaxalign's hot paths run, in XLA (JAX) and in PyTorch, float32, on this CPU.

Serving and training spend most of their time in a few product shapes of SmolLM2-135M (d = 576, MLP 1536):

- **decode**: a chain of 30 SwiGLU MLPs (``x + (silu(x·G) · (x·U))·W``, every layer its own weights, 212 MB in all,
  so the weights stream from memory as in a decode step) on ``M`` rows: ``M`` = 2 is one client (a batch bucket of
  two rows), 32 a full serving batch, 64 what a joining prompt adds to it;
- **train**: one ``[776, 576] × [576, 1536]`` product (the DPO benchmark's 4 rows × 194 tokens), as the forward
  pass runs it (``x·W``), as the backward pass runs it for the input's gradient (``dy·Wᵀ``) and for the weight's
  (``xᵀ·dy``), called again and again on the same arrays (which stay in the caches);
- **train chain**: the decode chain's 30 MLPs on those 776 rows, as a training forward pass meets its products:
  every layer's own weights and fresh activations, each product's result a new buffer. Its rate against the
  single product's is what a training step can expect of XLA's and PyTorch's products on this machine, as
  opposed to what one product repeated reaches (the training benchmark's "share of the matmul peak" is measured
  against the latter, a 2048² product).

Each case runs ``--repeats`` times in each framework after a warm-up, in alternating blocks; the medians are
reported, with the FLOP rate and the ratio PyTorch / JAX of the times (above 1: PyTorch is faster). This is where
the serving and training benchmarks' ceilings come from: a serving step at 32 rows is mostly the decode chain's
products, and a training step's matmuls are these products.

    python benchmarks/matmul_shapes.py [--repeats 15] [--output benchmarks/results/matmul_shapes.json]

Writes ``benchmarks/results/matmul_shapes.json`` (or ``--output``) and a PNG of the same name.
``matmul_shapes.json`` is an Intel Xeon's, ``matmul_shapes_epyc.json`` an AMD EPYC's, where the two frameworks'
order is reversed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import provenance  # benchmarks/provenance.py: run as `python benchmarks/matmul_shapes.py`

RESULTS = Path(__file__).resolve().parent / "results"
LAYERS, D, F = 30, 576, 1536
TRAIN_TOKENS = 776
# Each framework runs its calls in blocks: calls alternating one by one slow both down (PyTorch's OpenMP threads
# spin after each call and take the cores XLA's threads need, and the other way round), by up to 1.9x for the
# millisecond-long training products.
ROUNDS = 3


def _times(run, repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls of `run`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def cases(rng: np.random.Generator):
    """``{name: (flops, jax_run, torch_run)}``; each run computes its case once, to the last byte."""
    import torch

    def weights(*shape):
        return [rng.standard_normal(shape, dtype=np.float32) * 0.02 for _ in range(LAYERS)]

    gate, up, down = weights(D, F), weights(D, F), weights(F, D)
    jgate, jup, jdown = ([jnp.asarray(w) for w in ws] for ws in (gate, up, down))
    tgate, tup, tdown = ([torch.from_numpy(w) for w in ws] for ws in (gate, up, down))

    @jax.jit
    def jax_chain(x):
        for g, u, w in zip(jgate, jup, jdown, strict=True):
            x = x + (jax.nn.silu(x @ g) * (x @ u)) @ w
        return x

    def torch_chain(x):
        with torch.no_grad():
            for g, u, w in zip(tgate, tup, tdown, strict=True):
                x = x + (torch.nn.functional.silu(x @ g) * (x @ u)) @ w
        return x

    out = {}
    for rows in (2, 32, 64):
        x = rng.standard_normal((rows, D), dtype=np.float32)
        jx, tx = jnp.asarray(x), torch.from_numpy(x)
        out[f"decode chain, M={rows}"] = (2 * rows * D * F * 3 * LAYERS,
                                          lambda jx=jx: jax_chain(jx).block_until_ready(),
                                          lambda tx=tx: torch_chain(tx))
    x = rng.standard_normal((TRAIN_TOKENS, D), dtype=np.float32)
    jx, tx = jnp.asarray(x), torch.from_numpy(x)
    out["train chain"] = (2 * TRAIN_TOKENS * D * F * 3 * LAYERS, lambda jx=jx: jax_chain(jx).block_until_ready(),
                          lambda tx=tx: torch_chain(tx))
    w = rng.standard_normal((D, F), dtype=np.float32)
    dy = rng.standard_normal((TRAIN_TOKENS, F), dtype=np.float32)
    jw, jdy = map(jnp.asarray, (w, dy))  # jx, tx: the train chain's input, converted above
    tw, tdy = map(torch.from_numpy, (w, dy))
    flops = 2 * TRAIN_TOKENS * D * F
    for name, jax_fn, jax_args, torch_fn, torch_args in (
            ("train x·W", lambda a, b: a @ b, (jx, jw), lambda a, b: a @ b, (tx, tw)),
            ("train dy·Wᵀ", lambda a, b: a @ b.T, (jdy, jw), lambda a, b: a @ b.T, (tdy, tw)),
            ("train xᵀ·dy", lambda a, b: a.T @ b, (jx, jdy), lambda a, b: a.T @ b, (tx, tdy))):
        compiled = jax.jit(jax_fn)
        out[name] = (flops, lambda f=compiled, a=jax_args: f(*a).block_until_ready(),
                     lambda f=torch_fn, a=torch_args: f(*a))
    return out


def plot(rows: list[dict], path: Path, machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["case"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4))
    positions = np.arange(len(rows))
    ax.bar(positions - 0.2, [r["jax_gflop_s"] for r in rows], 0.4, label="JAX (XLA)")
    ax.bar(positions + 0.2, [r["torch_gflop_s"] for r in rows], 0.4, label="PyTorch")
    ax.set_xticks(positions, names, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="GFLOP/s", title=f"float32 products of SmolLM2-135M's shapes, 2 threads ({machine})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--output", type=Path, default=RESULTS / "matmul_shapes.json",
                        help="the JSON written (and a PNG of the same name)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    rows = []
    header = ("case", "JAX ms", "torch ms", "JAX GFLOP/s", "torch GFLOP/s", "torch/JAX speed")
    print(f"{header[0]:22} {header[1]:>8} {header[2]:>9} {header[3]:>12} {header[4]:>14} {header[5]:>16}")
    for name, (flops, jax_run, torch_run) in cases(np.random.default_rng(0)).items():
        jax_run(), torch_run()  # compile / warm up
        jax_times, torch_times = [], []
        for _ in range(ROUNDS):  # alternating blocks, so load from elsewhere hits both alike
            jax_run()  # the first call after the other framework's runs while its threads still spin
            jax_times += _times(jax_run, args.repeats // ROUNDS)
            torch_run()
            torch_times += _times(torch_run, args.repeats // ROUNDS)
        j, t = statistics.median(jax_times), statistics.median(torch_times)
        rows.append({"case": name, "flops": flops, "jax_s": j, "torch_s": t, "jax_gflop_s": flops / j / 1e9,
                     "torch_gflop_s": flops / t / 1e9, "torch_speed_over_jax": j / t})
        print(f"{name:22} {j * 1e3:8.2f} {t * 1e3:9.2f} {flops / j / 1e9:12.0f} {flops / t / 1e9:14.0f} {j / t:15.2f}x")
    path = args.output
    described = provenance.write_result(path, "matmul_shapes", setup={
        "dtype": "float32", "repeats": args.repeats, "torch_threads": 2, "jax": jax.__version__,
        "torch": torch.__version__}, cases=rows)
    plot(rows, path.with_suffix(".png"), described["machine"]["cpu"])
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
