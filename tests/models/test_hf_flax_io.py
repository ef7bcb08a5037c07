"""HF Flax checkpoints (flax_model.msgpack), written here with HF Flax's naming from torch state dicts."""

import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from jaxalign.models import load_hf
from tests.models.conftest import B, T, V, make_hf_model

# The architectures transformers had Flax classes for (Qwen2 had none), tied and untied.
ARCHS = ["llama", "llama_tied_3_layers", "mistral_window", "gpt2", "gpt2_untied_exact_gelu"]


def flax_params(hf_model) -> dict:
    """The nested parameter dict a transformers Flax model of the same config holds.

    HF Flax conventions: ``kernel`` = torch ``weight``.T (``nn.Dense``; GPT-2's ``FlaxConv1D`` stores
    ``[out, in]``, the transpose of torch's ``Conv1D``), ``embedding`` for embeddings, ``scale``/``bias``
    for GPT-2's LayerNorms, ``weight`` for Flax Llama's RMSNorm; layer i under the key ``"i"``; no
    ``lm_head`` when the embeddings are tied.
    """
    gpt2 = hf_model.config.model_type == "gpt2"
    nested: dict = {}
    for name, tensor in hf_model.state_dict().items():
        if hf_model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        *modules, leaf = name.split(".")
        value = tensor.detach().numpy()
        if modules[-1] in ("wte", "wpe", "embed_tokens"):
            leaf = "embedding"
        elif leaf == "weight" and value.ndim == 2:
            leaf, value = "kernel", value.T
        elif leaf == "weight" and gpt2:
            leaf = "scale"
        node = nested
        for module in modules:
            node = node.setdefault(module, {})
        node[leaf] = value
    return nested


def _flax_checkpoint(arch, hf_checkpoint, directory, params=None):
    directory.mkdir()
    shutil.copy(hf_checkpoint(arch) / "config.json", directory / "config.json")
    params = flax_params(make_hf_model(arch)) if params is None else params
    (directory / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(params))
    return directory


@pytest.mark.parametrize("arch", ARCHS)
def test_flax_checkpoint_gives_the_safetensors_logits(arch, hf_checkpoint, tmp_path, rng):
    directory = _flax_checkpoint(arch, hf_checkpoint, tmp_path / "flax")
    tokens = jnp.asarray(rng.integers(0, V, size=(B, T)))
    np.testing.assert_array_equal(load_hf(directory)(tokens)[0], load_hf(hf_checkpoint(arch))(tokens)[0])


def test_base_model_checkpoint_without_prefix_loads(hf_checkpoint, tmp_path, rng):
    params = flax_params(make_hf_model("gpt2"))["transformer"]  # as saved from FlaxGPT2Model
    directory = _flax_checkpoint("gpt2", hf_checkpoint, tmp_path / "base", params)
    tokens = jnp.asarray(rng.integers(0, V, size=(B, T)))
    np.testing.assert_array_equal(load_hf(directory)(tokens)[0], load_hf(hf_checkpoint("gpt2"))(tokens)[0])


def test_errors_name_the_tensor_or_file(hf_checkpoint, tmp_path):
    params = flax_params(make_hf_model("llama"))
    del params["model"]["layers"]["1"]["mlp"]["up_proj"]
    missing = r"flax_model\.msgpack: missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"
    with pytest.raises(ValueError, match=missing):
        load_hf(_flax_checkpoint("llama", hf_checkpoint, tmp_path / "missing", params))

    params = flax_params(make_hf_model("llama"))
    params["model"]["norm"]["gamma"] = params["model"]["norm"].pop("weight")
    with pytest.raises(ValueError, match=r"model/norm/gamma.*unknown Flax leaf name 'gamma'"):
        load_hf(_flax_checkpoint("llama", hf_checkpoint, tmp_path / "leaf", params))

    broken = _flax_checkpoint("llama", hf_checkpoint, tmp_path / "broken")
    (broken / "flax_model.msgpack").write_bytes(b"\x00 not msgpack")
    with pytest.raises(ValueError, match=r"flax_model\.msgpack: not a readable Flax msgpack checkpoint"):
        load_hf(broken)
