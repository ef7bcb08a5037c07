"""``--quantize`` in ``jaxalign generate``, ``serve`` and ``hitl``: the model sampled and served is the quantised one,
hitl retrains on that base, and a setting the checkpoint cannot take fails in one line before any weight is read."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxalign import models
from jaxalign.cli import build_parser, main
from jaxalign.serve.command import build_served
from jaxalign.serve.hitl import build_hitl
from tests.serve.conftest import serve_args


def greedy(model, tokens: list[int], steps: int) -> list[int]:
    """Greedy continuation by full forward passes (no cache: the reference for the sampler's)."""
    out = list(tokens)
    for _ in range(steps):
        logits, _ = model(np.asarray([out], np.int32))
        out.append(int(np.argmax(logits[0, -1])))
    return out[len(tokens):]


def test_generate_samples_the_quantised_model(tiny_checkpoint, tmp_path, capsys):
    output = tmp_path / "samples.jsonl"
    assert main(["generate", "--model", str(tiny_checkpoint), "--quantize", "int8", "--prompt", "sky blue", "--raw",
                 "--temperature", "0", "--max-new-tokens", "4", "--stop-token-id", "96", "--output",
                 str(output)]) == 0
    record = json.loads(output.read_text().splitlines()[0])
    tokenizer = models.load_pretrained(tiny_checkpoint)[1]
    quantized = models.quantize_model(models.load_hf(tiny_checkpoint), models.QuantizeConfig(type="int8"))
    prompt = tokenizer("sky blue", add_special_tokens=False)["input_ids"]
    expected = greedy(quantized, prompt, 4)
    assert record["response"] == tokenizer.decode(expected, skip_special_tokens=True)


def test_nf4_blocks_that_do_not_divide_are_refused_before_any_weight_is_read(tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(models.hf_io, "model_from_tensors", lambda *a, **k: pytest.fail("weights were read"))
    assert main(["generate", "--model", str(tiny_checkpoint), "--quantize", "nf4", "--prompt", "Hi"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--quantize nf4: block_size=64 does not divide the input dimension 32" in error[0]


def test_serve_and_hitl_hold_the_quantised_model(tiny_checkpoint, tmp_path):
    served = build_served(serve_args(tiny_checkpoint, quantize="int8"))
    leaves = jax.tree.leaves(served.scheduler.engine._members[0])
    assert any(getattr(leaf, "dtype", None) == np.int8 for leaf in leaves)  # int8 codes, not float kernels
    args = build_parser().parse_args(["hitl", "--model", str(tiny_checkpoint), "--output-dir", str(tmp_path / "h"),
                                      "--no-warmup", "--max-model-len", "48", "--quantize", "int8"])
    hitl = build_hitl(args)
    try:
        assert any(getattr(leaf, "dtype", None) == np.int8
                   for leaf in jax.tree.leaves(hitl.served.scheduler.engine._members[0]))
        assert "model.quantize={type: int8}" in hitl.retrainer.overrides
    finally:
        hitl.close()
