"""What each export format costs: GGUF quantisation's perplexity, ONNX int8's logit error, size and CPU speed.

    python benchmarks/export_formats.py [--model runs/sentiment/dpo] [--output benchmarks/results/export_formats.json]

The model is a run or export directory, a .gguf file, or the embedded SmolLM2-135M-Instruct (default). Held-out
text: the docstrings of a fixed list of Python standard-library modules (English prose the model was not tuned
on, the same on every machine with this Python), cut into windows of 256 tokens.

- **GGUF**: the model written as f16, q8_0, q4_0 and q4_k_m (:func:`jaxalign.models.gguf_export.save_gguf`),
  each read back with ``load_gguf`` (dequantised to float32) and scored by jaxalign: perplexity against the
  float32 source and the f16 file, the largest logit error, file size.
- **ONNX**: float32 and ``--int8`` files (:mod:`jaxalign.models.onnx_export`) run by onnxruntime on the CPU:
  the largest logit error against jaxalign (float32 should be rounding), perplexity, file size, and greedy
  decoding speed (prefill of a 16-token prompt, then 64 tokens through the past key/values, batch 1, tokens/s
  over the 64 steps, best of 3).

Writes one JSON (``--output``); docs/export.md shows its table.
"""

# ruff: noqa: E402  (JAX is imported after the huge-pages re-execution)
from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

from jaxalign.hostmem import use_transparent_huge_pages

if __name__ == "__main__":
    use_transparent_huge_pages()

import jax
import jax.numpy as jnp
import numpy as np
import provenance  # benchmarks/provenance.py: run as `python benchmarks/export_formats.py`

from jaxalign import models
from jaxalign.methods.export import load_source, resolve_source
from jaxalign.models.gguf_export import save_gguf

TEXT_MODULES = ("json", "argparse", "collections", "logging", "subprocess", "pathlib", "dataclasses", "datetime",
                "decimal", "heapq", "itertools", "functools", "textwrap", "unittest", "tarfile", "zipfile")
WINDOW = 256
GGUF_QUANTS = ("f16", "q8_0", "q4_0", "q4_k_m")


def held_out_windows(tokenizer, *, window: int = WINDOW) -> np.ndarray:
    """``[N, window]`` token ids of the standard-library docstrings, concatenated and cut into windows."""
    text = "\n\n".join(importlib.import_module(name).__doc__ or "" for name in TEXT_MODULES)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    count = len(ids) // window
    return np.asarray(ids[:count * window], np.int64).reshape(count, window)


def perplexity_from_logits(logits: np.ndarray, windows: np.ndarray) -> float:
    """``exp(mean NLL)`` of each window's next tokens."""
    logits = logits[:, :-1].astype(np.float64)
    targets = windows[:, 1:]
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return float(math.exp(nll.mean()))


def jax_logits(model, windows: np.ndarray) -> np.ndarray:
    forward = jax.jit(lambda tokens: model(tokens)[0])
    return np.concatenate([np.asarray(forward(jnp.asarray(windows[i:i + 4]))) for i in range(0, len(windows), 4)])


def onnx_logits(session, windows: np.ndarray) -> np.ndarray:
    out = []
    for row in windows:
        ids = row[None]
        outputs, _ = _ort_step(session, ids, np.arange(ids.shape[1])[None], _empty_cache(session))
        out.append(outputs)
    return np.concatenate(out)


def _empty_cache(session) -> dict[str, np.ndarray]:
    return {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
            for i in session.get_inputs() if i.name.startswith("past_key_values.")}


def _ort_step(session, ids, positions, cache):
    length = positions[0, -1] + 1
    outputs = session.run(None, {"input_ids": ids, "attention_mask": np.ones((1, length), np.int64),
                                 "position_ids": positions.astype(np.int64), **cache})
    names = [o.name for o in session.get_outputs()]
    return outputs[0], {n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], outputs[1:])}


def decode_speed(session, prompt: np.ndarray, steps: int = 64, repeats: int = 3) -> float:
    """Tokens/s of ``steps`` greedy single-token steps after prefilling ``prompt`` (best of ``repeats``)."""
    best = 0.0
    for _ in range(repeats):
        logits, cache = _ort_step(session, prompt[None], np.arange(len(prompt))[None], _empty_cache(session))
        position = len(prompt)
        started = time.perf_counter()
        for _ in range(steps):
            token = logits[:, -1].argmax(-1)[:, None]
            logits, cache = _ort_step(session, token, np.array([[position]]), cache)
            position += 1
        best = max(best, steps / (time.perf_counter() - started))
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="run/export directory, .gguf file, or 'default'")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/export_formats.json"))
    parser.add_argument("--windows", type=int, default=12, help="held-out windows of 256 tokens")
    args = parser.parse_args(argv)

    source = resolve_source(args.model)
    model, tokenizer, _ = load_source(source)
    windows = held_out_windows(tokenizer)[:args.windows]
    print(f"{source.describe()}: {windows.size} held-out tokens in {len(windows)} windows", file=sys.stderr)
    reference = jax_logits(model, windows)
    result = {"provenance": provenance.describe(), "model": source.describe(), "held_out_tokens": int(windows.size),
              "window": WINDOW,
              "float32": {"perplexity": perplexity_from_logits(reference, windows)}, "gguf": {}, "onnx": {},
              "python": platform.python_version()}

    with tempfile.TemporaryDirectory() as scratch:
        for quant in GGUF_QUANTS:
            path = save_gguf(model, tokenizer, Path(scratch) / f"model-{quant}.gguf", quant=quant, progress=False)
            loaded, _ = models.load_gguf(path)
            logits = jax_logits(loaded, windows)
            result["gguf"][quant] = {"perplexity": perplexity_from_logits(logits, windows),
                                     "max_logit_error": float(np.abs(logits - reference).max()),
                                     "mean_logit_error": float(np.abs(logits - reference).mean()),
                                     "size_mib": path.stat().st_size / 2**20}
            print(f"gguf {quant}: {result['gguf'][quant]}", file=sys.stderr)
            path.unlink()
        f16 = result["gguf"]["f16"]["perplexity"]
        for quant in GGUF_QUANTS:
            result["gguf"][quant]["perplexity_vs_f16"] = result["gguf"][quant]["perplexity"] / f16 - 1

        import onnxruntime as ort

        from jaxalign.models.onnx_export import quantize_onnx, save_onnx

        float_path = save_onnx(model, Path(scratch) / "model.onnx", progress=False)
        int8_path = quantize_onnx(float_path, Path(scratch) / "model-int8.onnx")
        prompt = windows[0, :16]
        for name, path in (("float32", float_path), ("int8", int8_path)):
            options = ort.SessionOptions()
            options.log_severity_level = 3
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            logits = onnx_logits(session, windows)
            result["onnx"][name] = {"perplexity": perplexity_from_logits(logits, windows),
                                    "max_logit_error": float(np.abs(logits - reference).max()),
                                    "mean_logit_error": float(np.abs(logits - reference).mean()),
                                    "size_mib": path.stat().st_size / 2**20,
                                    "decode_tokens_per_s": decode_speed(session, prompt)}
            print(f"onnx {name}: {result['onnx'][name]}", file=sys.stderr)
        result["onnx"]["int8"]["perplexity_vs_float32"] = (result["onnx"]["int8"]["perplexity"]
                                                           / result["onnx"]["float32"]["perplexity"] - 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
