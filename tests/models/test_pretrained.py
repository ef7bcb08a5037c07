"""``models.load_pretrained``: a checkpoint directory with its tokenizer, with the dtype policy applied;
errors that name where the path came from."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from jaxalign.models import load_hf, load_pretrained
from tests.test_cli import tiny_tokenizer


def test_a_checkpoint_directory_loads_with_its_tokenizer_and_policy(hf_checkpoint, tmp_path):
    directory = tmp_path / "with_tokenizer"
    shutil.copytree(hf_checkpoint("llama"), directory)
    tiny_tokenizer().save_pretrained(directory)
    model, tokenizer = load_pretrained(directory, param_dtype="bfloat16")
    assert tokenizer("Hi")["input_ids"] == tiny_tokenizer()("Hi")["input_ids"]
    assert model.config.param_dtype == "bfloat16"
    tokens = np.array([[1, 5, 9, 2]], np.int32)
    expected, _ = load_hf(directory, param_dtype="bfloat16")(tokens)
    np.testing.assert_array_equal(np.asarray(model(tokens)[0]), np.asarray(expected))


def test_errors_name_the_source(hf_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--policy .*no_tokenizer has no tokenizer files"):
        directory = tmp_path / "no_tokenizer"
        shutil.copytree(hf_checkpoint("llama"), directory)
        load_pretrained(directory, source="--policy")
    with pytest.raises(FileNotFoundError, match=r"model\.path /no/such/dir: no such file or directory"):
        load_pretrained("/no/such/dir", source="model.path")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match=r"--reference .*model\.safetensors: expected a checkpoint directory or a "
                                         r"\.gguf file"):
        load_pretrained(weights, source="--reference")
