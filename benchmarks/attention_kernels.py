"""Training attention (forward and backward) of a 1B Llama's shape, per implementation, on a GPU or a CPU.

The rows are shaped like those of ``benchmarks/train_throughput.py --synthetic-length N``: SFT rows of up to
``N`` tokens (right-padded) and DPO rows laid out as jaxalign trains them, one shared prompt and both
completions in one row (``[prompt | chosen | rejected]``, each completion seeing the prompt and itself:
``masks.attention_mask`` with branches). Per row layout, one layer's attention (32 query heads over 8 kv
heads, head dim 64; bf16 on a GPU, float32 on a CPU) runs forward and backward through:

- **grouped**: ``llama.grouped_attention``, what ``ModelConfig(attention="grouped")`` runs (float32 scores
  materialised ``[B, K, T·G, S]``);
- **grouped, causal blocks** (on a CPU only): ``llama.causal_block_attention``, what the model runs there for
  rows without a cache (blocks of about 48 queries, at most 4, each over the keys up to its last query);
- **xla** (on a CPU only): ``jax.nn.dot_product_attention(implementation="xla")`` with the boolean mask;
- **cudnn**: ``llama.cudnn_attention``, what ``ModelConfig(attention="cudnn")`` runs: cuDNN's fused attention
  with the mask as an additive bias, the rows padded to a multiple of 8;
- **cudnn causal** (SFT only, where the mask is causal plus right padding): cuDNN's causal mask and the rows'
  lengths, no bias;
- **PyTorch SDPA** (the peer): ``scaled_dot_product_attention(..., enable_gqa=True)``, ``is_causal`` for SFT,
  the boolean mask for DPO, with the backend PyTorch picks (on an H200 its errors matched JAX's cuDNN kernel's)
  and with each of flash, cuDNN and memory-efficient pinned (those that refuse the inputs are reported so).

Each is checked against float32 ``grouped_attention`` at full matmul precision on the same inputs (drawn in
float32, rounded to bf16, so that the rounding of the inputs does not hide the kernels' differences; output and
the three input gradients, real query rows only: ‖x − ref‖ / ‖ref‖), then timed
(median of ``--repeats`` after a warm-up). TFLOP/s count the useful work: ``12·H·Dh`` per visible query–key
pair (4 forward, 8 backward), the masked pairs not counted.

    python benchmarks/attention_kernels.py [--lengths 512,2048] [--repeats 10] [--output PATH]

Writes the JSON (default ``benchmarks/results/attention_kernels_<backend>.json``) and a PNG beside it. On a
CPU the cuDNN variants are skipped (``--small`` shrinks the shapes for a smoke run there).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import provenance  # benchmarks/provenance.py: run as `python benchmarks/attention_kernels.py`

from jaxalign.models.llama import causal_block_attention, cudnn_attention, grouped_attention
from jaxalign.models.masks import attention_mask

RESULTS = Path(__file__).resolve().parent / "results"
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 64  # Llama 3.2 1B
SCALE = HEAD_DIM**-0.5


def rows(method: str, length: int, batch: int):
    """``(mask [B, T, S], query_valid [B, T], lengths [B])`` of ``batch`` rows as train_throughput lays them."""
    if method == "sft":
        lengths = np.array([length - (length * 16 // 100) * i // max(batch - 1, 1) for i in range(batch)])
        valid = np.arange(length)[None] < lengths[:, None]
        mask = attention_mask(jnp.asarray(valid), jnp.arange(length))
        return mask, valid, lengths
    prompt = length * 39 // 100  # a pair's shared prompt, then both completions of length - prompt
    completion = length - prompt
    width = prompt + 2 * completion
    branch = np.concatenate([np.zeros(prompt), np.ones(completion), np.full(completion, 2)]).astype(np.int32)
    valid = np.ones((batch, width), bool)
    valid[1:, width - completion // 8:] = False  # the later rows' rejected completions are shorter
    branches = jnp.asarray(np.broadcast_to(branch, (batch, width)))
    mask = attention_mask(jnp.asarray(valid), jnp.arange(width), query_branches=branches, key_branches=branches)
    return mask, valid, valid.sum(1)


def variants(method: str, mask, lengths, on_gpu: bool) -> dict:
    """``{name: attention(q, k, v) -> [B, T, H, Dh]}``."""
    lengths = jnp.asarray(lengths, jnp.int32)
    out = {"grouped": lambda q, k, v: grouped_attention(q, k, v, mask, scale=SCALE).reshape(q.shape)}
    if not on_gpu:
        out["grouped, causal blocks"] = lambda q, k, v: causal_block_attention(q, k, v, mask,
                                                                              scale=SCALE).reshape(q.shape)
        out["xla"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=SCALE,
                                                                   implementation="xla")
    else:
        out["cudnn"] = lambda q, k, v: cudnn_attention(q, k, v, mask, scale=SCALE).reshape(q.shape)
        if method == "sft":
            out["cudnn causal"] = lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, scale=SCALE, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                implementation="cudnn")
    return out


def loss_and_grads(attend, cotangent):
    """Jitted ``(q, k, v) -> (Σ out·cotangent, (dq, dk, dv))``: one forward and one backward pass."""
    def loss(q, k, v):
        return jnp.sum(attend(q, k, v).astype(jnp.float32) * cotangent)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def relative_error(x, ref, query_valid) -> float:
    """‖x − ref‖ / ‖ref‖ in float64 over real query rows (``query_valid`` ``[B, T]``; None: every row)."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    if query_valid is not None:
        x, ref = x[query_valid], ref[query_valid]
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def torch_peers(method: str, mask, inputs, cotangent) -> dict:
    """``{name: (run, outputs)}``: PyTorch SDPA's forward and backward on the same inputs with the backend it
    picks and with each backend pinned (``torch.nn.attention.sdpa_kernel``; a backend that refuses the inputs
    fails when first run), or ``{}`` without torch on a GPU. ``run`` synchronises; ``outputs`` gives the output
    and the three input gradients as float32 NumPy ``[B, T, heads, Dh]``."""
    try:
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    q, k, v = (torch.tensor(np.asarray(x.astype(jnp.float32)), device="cuda").to(torch.bfloat16).transpose(1, 2)
               .requires_grad_() for x in inputs)  # [B, heads, T, Dh]
    grad_out = torch.tensor(np.asarray(cotangent), device="cuda").to(torch.bfloat16).transpose(1, 2)
    bool_mask = torch.tensor(np.asarray(mask), device="cuda")[:, None]

    def peer(backend):
        def run():
            for x in (q, k, v):
                x.grad = None
            with contextlib.nullcontext() if backend is None else sdpa_kernel(backend):
                if method == "sft":
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE, enable_gqa=True)
                else:
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask, scale=SCALE, enable_gqa=True)
            out.backward(grad_out)
            torch.cuda.synchronize()
            return out

        def outputs():
            return [run().detach().transpose(1, 2).float().cpu().numpy()] + [
                x.grad.transpose(1, 2).float().cpu().numpy() for x in (q, k, v)]
        return run, outputs

    backends = {"PyTorch SDPA": None, "PyTorch flash": SDPBackend.FLASH_ATTENTION,
                "PyTorch cuDNN": SDPBackend.CUDNN_ATTENTION, "PyTorch efficient": SDPBackend.EFFICIENT_ATTENTION}
    return {name: peer(backend) for name, backend in backends.items()}


def measure(method: str, length: int, batch: int, repeats: int, on_gpu: bool, rng) -> list[dict]:
    mask, query_valid, lengths = rows(method, length, batch)
    batch, width = query_valid.shape
    pairs = int(np.asarray(mask)[query_valid].sum())
    flops = 12 * HEADS * HEAD_DIM * pairs
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    # Drawn in float32 and rounded to the compute dtype: the reference sees the same (rounded) inputs, so the
    # errors are the kernels' own, not the inputs' rounding.
    inputs = [jnp.asarray(rng.standard_normal((batch, width, heads, HEAD_DIM), np.float32)).astype(dtype)
              .astype(jnp.float32) for heads in (HEADS, KV_HEADS, KV_HEADS)]
    cotangent = jnp.asarray(rng.standard_normal((batch, width, HEADS, HEAD_DIM), np.float32)
                            * query_valid[:, :, None, None])
    with jax.default_matmul_precision("highest"):  # the reference: float32 at full precision
        reference = loss_and_grads(variants(method, mask, lengths, False)["grouped"], cotangent)
        _, ref_grads = reference(*inputs)
        ref_out = grouped_attention(*inputs, mask, scale=SCALE)
    references = [ref_out.reshape(batch, width, HEADS, HEAD_DIM), *ref_grads]
    low = [x.astype(dtype) for x in inputs]
    results = []
    case = f"{method} {batch}×{length}" + ("" if method == "sft" else f" (rows of {width})")
    candidates = {}  # name: (run, outputs): one timed forward and backward; the output and the three gradients
    for name, attend in variants(method, mask, lengths, on_gpu).items():
        step = loss_and_grads(attend, cotangent)
        candidates[name] = (lambda step=step: jax.block_until_ready(step(*low)),
                            lambda step=step, attend=attend: [jax.jit(attend)(*low), *step(*low)[1]])
    candidates |= torch_peers(method, mask, inputs, cotangent)
    for name, (run, outputs) in candidates.items():
        try:
            outs = outputs()
        except Exception as error:  # noqa: BLE001  a kernel that refuses these shapes is a result, not a crash
            results.append({"case": case, "variant": name, "error": f"{type(error).__name__}: {error}"[:500]})
            print(f"{case:34} {name:22} failed: {results[-1]['error'][:200]}")
            continue
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()  # synchronises
            times.append(time.perf_counter() - start)
        results.append(_row(case, name, times, flops, outs, references, query_valid))
    return results


def _row(case, name, times, flops, outs, references, query_valid) -> dict:
    seconds = statistics.median(times)
    errors = {part: relative_error(x, ref, query_valid if part in ("out", "dq") else None)
              for part, x, ref in zip(("out", "dq", "dk", "dv"), outs, references, strict=True)}
    row = {"case": case, "variant": name, "seconds": seconds, "tflop_per_s": flops / seconds / 1e12,
           "useful_flops": flops, "relative_error": errors}
    print(f"{case:34} {name:22} {seconds * 1e3:9.2f} ms {row['tflop_per_s']:8.3f} TFLOP/s   max rel err "
          f"{max(errors.values()):.1e}")
    return row


def plot(results: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "seconds" in r]
    cases = list(dict.fromkeys(r["case"] for r in ok))
    names = list(dict.fromkeys(r["variant"] for r in ok))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        speeds = [next((r["tflop_per_s"] for r in ok if r["case"] == c and r["variant"] == name), 0) for c in cases]
        ax.bar(np.arange(len(cases)) + (i - (len(names) - 1) / 2) * width, speeds, width, label=name)
    ax.set_xticks(np.arange(len(cases)), cases, fontsize=8)
    ax.set(ylabel="useful TFLOP/s (forward + backward)", title=f"One layer's attention, 1B Llama heads ({device})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="512,2048", help="comma-separated row lengths (SFT; DPO pairs' N)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--small", action="store_true", help="4 rows of 64 tokens per method (a CPU smoke run)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    lengths = [64] if args.small else [int(n) for n in args.lengths.split(",")]
    rng = np.random.default_rng(0)
    results = []
    for length in lengths:
        batch = 4 if length <= 512 else 2  # train_throughput's batches on the GPU
        for method in ("sft", "dpo"):
            results += measure(method, length, batch, args.repeats, on_gpu, rng)
    path = args.output or RESULTS / f"attention_kernels_{jax.default_backend()}.json"
    described = provenance.write_result(path, "attention_kernels", setup={
        "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16" if on_gpu else "float32",
        "repeats": args.repeats}, results=results)
    plot(results, path.with_suffix(".png"), described["machine"].get("accelerator") or jax.default_backend())
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
