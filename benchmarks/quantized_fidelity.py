"""What a quantised base costs in fidelity: SmolLM2-135M with NF4 and int8 projections against float32.

    python benchmarks/quantized_fidelity.py [--windows 12] [--prompts 8] [--new-tokens 32]

The embedded SmolLM2-135M-Instruct (``default_model_path()``, read by ``load_gguf`` and dequantised to float32) is
the reference. Each variant quantises the projections of its decoder layers (``jaxalign.models.quantize_model``:
embeddings, norms and the tied head stay float32) and is scored on held-out text: the docstrings of a fixed list of
Python standard-library modules (the text benchmarks/export_formats.py uses), cut into windows of 256 tokens.

- **logits**: the largest and the mean absolute difference from float32's, over every position and vocabulary
  entry of the windows;
- **perplexity** of the windows' next tokens, and **top-1 agreement**: the share of positions whose most likely
  next token is float32's (teacher-forced, on the same text);
- **greedy agreement**: ``--prompts`` prompts (the first 32 tokens of windows), ``--new-tokens`` tokens decoded
  greedily with a KV cache by each model; the share of generated tokens equal to float32's at the same step,
  and the mean length of the generated prefix equal to float32's;
- **size**: bytes of the quantised projections' storage, against their float32 kernels;
- **bitsandbytes**: the same float32 weights loaded by transformers with ``BitsAndBytesConfig(load_in_4bit=True,
  bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=float32)`` (every projection
  of the layers quantised by bitsandbytes on the CPU, the rest float32, as ours): its logits against ours (nf4)
  and against float32, its perplexity, and its greedy tokens (``generate``) against ours. Skipped when
  bitsandbytes is not installed (``--no-bitsandbytes`` skips it too).

Writes ``benchmarks/results/quantized_fidelity.json``; docs/models.md ("Quantised base") shows its table.
"""

# ruff: noqa: E402  (JAX is imported after the huge-pages re-execution)
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import tempfile
from pathlib import Path

from jaxalign.hostmem import use_transparent_huge_pages

if __name__ == "__main__":
    use_transparent_huge_pages()

import jax
import jax.numpy as jnp
import numpy as np
import provenance  # benchmarks/provenance.py: run as `python benchmarks/quantized_fidelity.py`
from flax import nnx

from jaxalign.models import (
    KVCache,
    QuantizeConfig,
    default_model_path,
    load_gguf,
    load_gguf_tokenizer,
    quantize_model,
    save_hf,
    storage_bytes,
)

RESULTS = Path(__file__).resolve().parent / "results"
TEXT_MODULES = ("json", "argparse", "collections", "logging", "subprocess", "pathlib", "dataclasses", "datetime",
                "decimal", "heapq", "itertools", "functools", "textwrap", "unittest", "tarfile", "zipfile")
WINDOW = 256
PROMPT = 32
BNB = "bitsandbytes nf4"
VARIANTS = {
    "nf4": QuantizeConfig(type="nf4"),
    "nf4 (scales float32)": QuantizeConfig(type="nf4", double_quant=False),
    "int8": QuantizeConfig(type="int8"),
}


def held_out_windows(tokenizer) -> np.ndarray:
    """``[N, 256]`` token ids of the standard-library docstrings, concatenated and cut into windows."""
    text = "\n\n".join(importlib.import_module(name).__doc__ or "" for name in TEXT_MODULES)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    count = len(ids) // WINDOW
    return np.asarray(ids[:count * WINDOW], np.int32).reshape(count, WINDOW)


def scorer(model):
    """A jitted ``tokens [4, T] -> (logits, next-token NLL [4, T-1], argmax [4, T])`` of ``model``."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def score(state, tokens):
        logits, _ = nnx.merge(graphdef, state)(tokens)
        log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
        return logits, nll, jnp.argmax(logits, axis=-1)

    return lambda tokens: jax.device_get(score(state, jnp.asarray(tokens)))


def bitsandbytes_model(reference, directory: str):
    """The reference's float32 weights loaded by transformers with bitsandbytes' NF4 (double quantisation)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # bitsandbytes' CPU backend would wait on a kernel download
    import torch
    import transformers

    save_hf(reference, reference.config, directory)
    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.float32)
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, device_map="cpu",
                                                             quantization_config=quantization).eval()


def torch_scorer(model):
    import torch

    def score(tokens):
        with torch.inference_mode():
            logits = model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float()
            nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, torch.tensor(tokens[:, 1:, None]).long())[..., 0]
        return logits.numpy(), nll.numpy(), logits.argmax(-1).numpy()

    return score


def torch_greedy(model, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    import torch

    with torch.inference_mode():
        out = model.generate(torch.tensor(prompts, dtype=torch.long), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False,
                             attention_mask=torch.ones(prompts.shape, dtype=torch.long))
    return out[:, prompts.shape[1]:].numpy()


def greedy(model, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    """``[B, new_tokens]`` greedy continuations of ``prompts`` (a KV cache, one jitted call per token)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, tokens, cache):
        logits, cache = nnx.merge(graphdef, state)(tokens, cache=cache)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

    cache = KVCache.init(model.config, batch_size=len(prompts), max_length=prompts.shape[1] + new_tokens)
    token, cache = step(state, jnp.asarray(prompts), cache)
    out = [token]
    for _ in range(new_tokens - 1):
        token, cache = step(state, token[:, None], cache)
        out.append(token)
    return np.stack([np.asarray(t) for t in out], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=12, help="held-out windows of 256 tokens")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--no-bitsandbytes", action="store_true", help="skip the bitsandbytes comparison")
    parser.add_argument("--output", type=Path, default=RESULTS / "quantized_fidelity.json")
    args = parser.parse_args()
    with_bitsandbytes = not args.no_bitsandbytes and importlib.util.find_spec("bitsandbytes") is not None

    path = default_model_path()
    windows = held_out_windows(load_gguf_tokenizer(path))[:args.windows]
    prompts = windows[:args.prompts, :PROMPT]
    reference, _ = load_gguf(path)
    # New graphs over the reference's arrays: each variant replaces its own projections.
    models = {"float32": reference} | {name: quantize_model(nnx.merge(*nnx.split(reference)), config)
                                       for name, config in VARIANTS.items()}
    scorers = {name: scorer(model) for name, model in models.items()}
    scratch = tempfile.TemporaryDirectory()
    if with_bitsandbytes:
        torch_model = bitsandbytes_model(reference, scratch.name)
        scorers[BNB] = torch_scorer(torch_model)
    stats = {name: {"nll": [], "argmax": [], "max": 0.0, "sum": 0.0, "max_vs_nf4": 0.0, "sum_vs_nf4": 0.0}
             for name in scorers}
    for start in range(0, len(windows), 4):  # a few windows at a time: full-vocabulary logits are large
        chunk = windows[start:start + 4]
        float_logits = nf4_logits = None
        for name, score in scorers.items():
            logits, nll, argmax = score(chunk)
            stats[name]["nll"].append(nll)
            stats[name]["argmax"].append(argmax)
            if float_logits is None:
                float_logits = logits
                continue
            nf4_logits = logits if name == "nf4" else nf4_logits
            for suffix, other in (("", float_logits), ("_vs_nf4", nf4_logits)):
                difference = np.abs(logits - other)
                stats[name]["max" + suffix] = max(stats[name]["max" + suffix], float(difference.max()))
                stats[name]["sum" + suffix] += float(difference.sum(dtype=np.float64))
    float_greedy = greedy(reference, prompts, args.new_tokens)
    float_argmax = np.concatenate(stats["float32"]["argmax"])
    rows = {"float32": {"perplexity": float(np.exp(np.concatenate(stats["float32"]["nll"]).astype(np.float64).mean()))}}
    greedy_tokens = {}
    for name, config in VARIANTS.items():
        generated = greedy_tokens[name] = greedy(models[name], prompts, args.new_tokens)
        same = generated == float_greedy
        prefix = np.where(same.all(axis=1), args.new_tokens, np.argmin(same, axis=1))
        sizes = storage_bytes(models[name])
        rows[name] = {
            "config": {"type": config.type, "block_size": config.effective_block_size,
                       "double_quant": config.effective_double_quant},
            "logits_max_abs_diff": stats[name]["max"],
            "logits_mean_abs_diff": stats[name]["sum"] / (windows.size * reference.config.vocab_size),
            "perplexity": float(np.exp(np.concatenate(stats[name]["nll"]).astype(np.float64).mean())),
            "top1_agreement": float(np.mean(np.concatenate(stats[name]["argmax"]) == float_argmax)),
            "greedy_token_agreement": float(same.mean()),
            "greedy_common_prefix_mean": float(prefix.mean()),
            "projection_bytes": sizes["quantized"],
            "projection_float32_bytes": sizes["dequantized"],
            "bits_per_weight": 8 * sizes["quantized"] / (sizes["dequantized"] / 4),
        }
    if with_bitsandbytes:
        import bitsandbytes

        generated = torch_greedy(torch_model, prompts, args.new_tokens)
        count = windows.size * reference.config.vocab_size
        rows[BNB] = {
            "bitsandbytes": bitsandbytes.__version__,
            "logits_max_abs_diff": stats[BNB]["max"],
            "logits_mean_abs_diff": stats[BNB]["sum"] / count,
            "logits_max_abs_diff_vs_jaxalign_nf4": stats[BNB]["max_vs_nf4"],
            "logits_mean_abs_diff_vs_jaxalign_nf4": stats[BNB]["sum_vs_nf4"] / count,
            "perplexity": float(np.exp(np.concatenate(stats[BNB]["nll"]).astype(np.float64).mean())),
            "top1_agreement": float(np.mean(np.concatenate(stats[BNB]["argmax"]) == float_argmax)),
            "top1_agreement_vs_jaxalign_nf4": float(np.mean(np.concatenate(stats[BNB]["argmax"])
                                                            == np.concatenate(stats["nf4"]["argmax"]))),
            "greedy_token_agreement": float(np.mean(generated == float_greedy)),
            "greedy_token_agreement_vs_jaxalign_nf4": float(np.mean(generated == greedy_tokens["nf4"])),
        }
    scratch.cleanup()
    setup = {"model": "SmolLM2-135M-Instruct (embedded Q4_1 GGUF, dequantised to float32)", "held_out": {
        "text": f"docstrings of {', '.join(TEXT_MODULES)}", "windows": int(len(windows)), "window": WINDOW,
        "tokens": int(windows.size)}, "greedy": {"prompts": int(len(prompts)), "prompt_tokens": PROMPT,
                                                 "new_tokens": args.new_tokens},
        "jax_backend": jax.default_backend()}
    provenance.write_result(args.output, "quantized_fidelity", setup=setup, results=rows)

    print(f"\nSmolLM2-135M, {windows.size} held-out tokens; greedy: {len(prompts)} prompts x {args.new_tokens} tokens")
    header = (f"{'':22}{'max |dlogit|':>13}{'mean |dlogit|':>14}{'perplexity':>11}{'top-1 agree':>12}"
              f"{'greedy agree':>13}{'bits/weight':>12}")
    print(header)
    print(f"{'float32':22}{'-':>13}{'-':>14}{rows['float32']['perplexity']:>11.3f}{'-':>12}{'-':>13}{32:>12}")
    for name in [*VARIANTS, *([BNB] if with_bitsandbytes else [])]:
        row = rows[name]
        bits = f"{row['bits_per_weight']:>12.3f}" if "bits_per_weight" in row else f"{'-':>12}"
        print(f"{name:22}{row['logits_max_abs_diff']:>13.3f}{row['logits_mean_abs_diff']:>14.4f}"
              f"{row['perplexity']:>11.3f}{row['top1_agreement']:>12.3f}{row['greedy_token_agreement']:>13.3f}"
              f"{bits}")
    if with_bitsandbytes:
        row = rows[BNB]
        print(f"bitsandbytes against jaxalign nf4: max |dlogit| {row['logits_max_abs_diff_vs_jaxalign_nf4']:.2e}, "
              f"mean {row['logits_mean_abs_diff_vs_jaxalign_nf4']:.2e}, top-1 agreement "
              f"{row['top1_agreement_vs_jaxalign_nf4']:.4f}, greedy agreement "
              f"{row['greedy_token_agreement_vs_jaxalign_nf4']:.4f}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
