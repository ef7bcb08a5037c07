"""A decode step's attention and cache writes over SmolLM2-135M's 30 layers, per KV-cache layout, on this CPU.

One decode step writes every row's new key and value into each layer's cache and attends from the row's one
query over all the cache's slots (3 kv heads of 3 query heads each, head dim 64, float32). How the per-layer
buffers are laid out decides whether both products read them as plain matrices and whether the write is
contiguous:

- **jaxalign**: what ships, ``KVCache.per_layer`` written by ``LayerKV.append`` and read by
  ``llama.grouped_attention``: keys ``[B, K, Dh, S]`` (the query·key product contracts the head dim, the key
  buffer's rows), values ``[B, K, S, Dh]`` (the probability·value product contracts the slots, the value buffer's
  rows; a token's values are written as ``K`` contiguous rows);
- **both slots innermost**: keys and values ``[B, K, Dh, S]`` read through
  ``jax.nn.dot_product_attention``, and through ``grouped_attention`` (to tell the layout's
  share from the attention function's);
- **both slots-major**: keys and values ``[B, K, S, Dh]`` (transformers' static cache layout), grouped einsums;
- **PyTorch** (the peer): transformers' static-cache decode, ``index_copy_`` into ``[B, K, S, Dh]`` buffers and
  ``scaled_dot_product_attention(..., enable_gqa=True)``.

Each variant runs ``--repeats`` steps per round, in alternating blocks over ``--rounds`` rounds (so load from
elsewhere hits all alike); medians are reported with each one's time over PyTorch's.

    python benchmarks/attention_layouts.py [--repeats 9] [--rounds 3]

Writes ``benchmarks/results/attention_layouts.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import provenance  # benchmarks/provenance.py: run as `python benchmarks/attention_layouts.py`

from jaxalign.models.cache import KVCache, LayerKV
from jaxalign.models.config import ModelConfig
from jaxalign.models.llama import grouped_attention

RESULTS = Path(__file__).resolve().parent / "results"
LAYERS, KV_HEADS, GROUPS, HEAD_DIM = 30, 3, 3, 64
HEADS = KV_HEADS * GROUPS
SCALE = HEAD_DIM**-0.5
CASES = [(32, 128), (32, 256), (2, 128)]  # (rows, slots): a full serving batch, one client
PEER = "PyTorch: static cache + SDPA (peer)"


def _random(rng, *shape):
    return rng.standard_normal(shape, dtype=np.float32)


def jax_variants(rows: int, slots: int, rng: np.random.Generator) -> dict:
    """``{name: run}``; each run is one decode step's 30 layers of writes and attention, in place."""
    config = ModelConfig(architecture="llama", vocab_size=8, d_model=HEADS * HEAD_DIM, n_layers=LAYERS,
                         n_heads=HEADS, n_kv_heads=KV_HEADS, head_dim=HEAD_DIM, intermediate_size=8)
    queries = jnp.asarray(_random(rng, LAYERS, rows, 1, HEADS, HEAD_DIM))
    new = jnp.asarray(_random(rng, LAYERS, rows, 1, KV_HEADS, HEAD_DIM))
    mask = jnp.asarray(rng.random((rows, 1, slots)) < 0.8)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def shipped(cache, index):
        kv = LayerKV(cache.keys, cache.values, 0, index)
        total = jnp.zeros((), jnp.float32)
        for layer in range(LAYERS):
            kv, k, v = kv.at_layer(layer).append(new[layer], new[layer] * 0.5)
            total += grouped_attention(queries[layer], k, v, mask, scale=SCALE).sum()
        return KVCache(kv.keys, kv.values, cache.valid, cache.next_position, cache.index), total

    def explicit(layout: str, library: bool):
        def write(buffer, x, index):  # x [B, 1, K, Dh]
            if layout == "DS":
                return jax.lax.dynamic_update_slice(buffer, jnp.transpose(x, (0, 2, 3, 1)), (0, 0, 0, index))
            return jax.lax.dynamic_update_slice(buffer, jnp.transpose(x, (0, 2, 1, 3)), (0, 0, index, 0))

        def view(buffer):  # as [B, S, K, Dh]
            return jnp.transpose(buffer, (0, 3, 1, 2) if layout == "DS" else (0, 2, 1, 3))

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def step(keys, values, index):
            total, out_keys, out_values = jnp.zeros((), jnp.float32), [], []
            for layer in range(LAYERS):
                k, v = write(keys[layer], new[layer], index), write(values[layer], new[layer] * 0.5, index)
                out_keys.append(k)
                out_values.append(v)
                if library:
                    out = jax.nn.dot_product_attention(queries[layer], view(k), view(v), mask=mask[:, None],
                                                       scale=SCALE)
                else:
                    out = grouped_attention(queries[layer], view(k), view(v), mask, scale=SCALE)
                total += out.sum()
            return tuple(out_keys), tuple(out_values), total

        shape = (rows, KV_HEADS, HEAD_DIM, slots) if layout == "DS" else (rows, KV_HEADS, slots, HEAD_DIM)
        state = [tuple(jnp.zeros(shape) for _ in range(LAYERS)) for _ in range(2)]

        def run(index):
            state[0], state[1], total = step(state[0], state[1], np.int32(index))
            total.block_until_ready()

        return run

    cache = [KVCache.init(config, batch_size=rows, max_length=1).per_layer(slots)]

    def run_shipped(index):
        cache[0], total = shipped(cache[0], np.int32(index))
        total.block_until_ready()

    return {"jaxalign: keys [B,K,Dh,S], values [B,K,S,Dh]": run_shipped,
            "both [B,K,Dh,S], library attention (before)": explicit("DS", library=True),
            "both [B,K,Dh,S], grouped_attention": explicit("DS", library=False),
            "both [B,K,S,Dh], grouped_attention": explicit("SD", library=False)}


def torch_variant(rows: int, slots: int, rng: np.random.Generator):
    import torch

    queries = torch.from_numpy(_random(rng, LAYERS, rows, HEADS, 1, HEAD_DIM))
    new = torch.from_numpy(_random(rng, LAYERS, rows, KV_HEADS, 1, HEAD_DIM))
    mask = torch.from_numpy(rng.random((rows, 1, 1, slots)) < 0.8)
    keys = [torch.zeros(rows, KV_HEADS, slots, HEAD_DIM) for _ in range(LAYERS)]
    values = [torch.zeros(rows, KV_HEADS, slots, HEAD_DIM) for _ in range(LAYERS)]

    def run(index):
        with torch.no_grad():
            position = torch.tensor([index])
            total = torch.zeros(())
            for layer in range(LAYERS):
                keys[layer].index_copy_(2, position, new[layer])
                values[layer].index_copy_(2, position, new[layer] * 0.5)
                total += torch.nn.functional.scaled_dot_product_attention(
                    queries[layer], keys[layer], values[layer], attn_mask=mask, scale=SCALE, enable_gqa=True).sum()
        return total

    return run


def _times(run, repeats: int, first_index: int) -> list[float]:
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        run(first_index + i)
        times.append(time.perf_counter() - start)
    return times


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r["rows"], r["slots"]) for r in rows}, key=lambda c: (-c[0], c[1]))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(variants)
    for v, variant in enumerate(variants):
        times = [next(r["ms"] for r in rows if r["variant"] == variant and (r["rows"], r["slots"]) == c)
                 for c in cases]
        ax.bar(np.arange(len(cases)) + (v - (len(variants) - 1) / 2) * width, times, width, label=variant)
    ax.set_xticks(np.arange(len(cases)), [f"batch {b}, {s} slots" for b, s in cases])
    ax.set(ylabel="ms per decode step (30 layers)",
           title="decode attention + cache writes, SmolLM2-135M shapes, float32, 2 threads")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    results = []
    print(f"{'batch':>5} {'slots':>5}  {'variant':46} {'ms/step':>8} {'/ PyTorch':>10}")
    for rows, slots in CASES:
        variants = {**jax_variants(rows, slots, rng), PEER: torch_variant(rows, slots, rng)}
        times = {name: [] for name in variants}
        for run in variants.values():
            run(0)  # compile / warm up
        for _ in range(args.rounds):
            for name, run in variants.items():
                run(1)  # the first call after another variant's, while its threads may still spin
                times[name] += _times(run, args.repeats, 2)
        peer = statistics.median(times[PEER])
        for name, samples in times.items():
            ms = statistics.median(samples) * 1e3
            results.append({"rows": rows, "slots": slots, "variant": name, "ms": ms, "over_torch": ms / 1e3 / peer})
            print(f"{rows:5d} {slots:5d}  {name:46} {ms:8.2f} {ms / 1e3 / peer:9.2f}x")
    path = RESULTS / "attention_layouts.json"
    provenance.write_result(path, "attention_layouts", setup={
        "dtype": "float32", "layers": LAYERS, "kv_heads": KV_HEADS, "query_heads": HEADS, "head_dim": HEAD_DIM,
        "repeats": args.repeats, "rounds": args.rounds, "torch_threads": 2}, cases=results)
    plot(results, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
