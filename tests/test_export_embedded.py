"""The export of a real model, as the main job ships its DPO policy: ``jaxalign export`` of the embedded default
(SmolLM2-135M-Instruct, the policy's architecture, tokenizer and chat template) to the ``q8_0`` GGUF that
``make demo`` writes, read back by transformers' own GGUF loader: its tokens of a chat-templated prompt are ours,
and its logits equal jaxalign's on the weights the file holds. tests/models/test_gguf_export.py does the same on
tiny models of every architecture and quantisation."""

from __future__ import annotations

import numpy as np

from jaxalign import models
from jaxalign.cli import main
from tests.models.test_gguf_export import chat_ids, logits_of, stored_weights, transformers_gguf


def test_the_embedded_model_exported_to_q8_0_reads_back_in_transformers(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["export", "default", "--format", "gguf", "--quant", "q8_0", "--output", "smol-q8_0.gguf"]) == 0
    capsys.readouterr()
    theirs, their_tokenizer = transformers_gguf(tmp_path / "smol-q8_0.gguf")
    ours, tokenizer = models.load_pretrained(None)
    ids = chat_ids(tokenizer)
    assert chat_ids(their_tokenizer) == ids
    read = logits_of(theirs, ids)
    expected = logits_of(stored_weights(ours, "q8_0"), ids)
    np.testing.assert_allclose(read, expected, atol=1e-3, rtol=0)
    assert (read.argmax(-1) == logits_of(ours, ids).argmax(-1)).mean() > 0.9  # q8_0 keeps the float model's picks
