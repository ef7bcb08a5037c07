"""Weight IO: export -> transformers load -> same logits, sharded checkpoints, dtypes, and clear errors."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from jaxalign.models import load_hf, save_hf
from tests.models.conftest import TOL, B, T, V, hf_logits, hf_positions, left_padded, make_hf_model


def _copy(source, tmp_path):
    return shutil.copytree(source, tmp_path / "checkpoint")


@pytest.mark.parametrize("arch", ["llama_tied_3_layers", "llama_biases_untied", "qwen2", "mistral_window"])
def test_export_loads_in_transformers_with_the_same_logits(arch, hf_checkpoint, tmp_path, rng):
    model = load_hf(hf_checkpoint(arch))
    out = save_hf(model, model.config, tmp_path / "export")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(hf_model).__name__ == json.loads((out / "config.json").read_text())["architectures"][0]
    tokens = rng.integers(0, V, size=(B, T))
    mask = left_padded([7, 5, 2])
    ours = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))[0])
    expected = hf_logits(hf_model, tokens, mask, hf_positions(mask))
    np.testing.assert_allclose(ours[mask.astype(bool)], expected[mask.astype(bool)], atol=TOL, rtol=0)


def test_sharded_export_round_trips_through_both_loaders(hf_checkpoint, tmp_path, rng):
    model = load_hf(hf_checkpoint("llama"))
    out = save_hf(model, model.config, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(
        a.nbytes for f in files for a in load_file(out / f).values()
    )
    tokens = jnp.asarray(rng.integers(0, V, size=(B, T)))
    np.testing.assert_array_equal(load_hf(out)(tokens)[0], model(tokens)[0])
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(model(tokens)[0], hf_logits(hf_model, tokens), atol=TOL, rtol=0)
    # Re-exporting into the same directory as one file removes the old shards and index.
    save_hf(model, model.config, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_bf16_checkpoint_loads_as_float32_and_exports_bf16(tmp_path, rng):
    make_hf_model("qwen2").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = load_hf(tmp_path / "bf16")
    assert model.model.embed_tokens.embedding[...].dtype == jnp.float32
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    tokens = rng.integers(0, V, size=(B, T))
    np.testing.assert_allclose(model(jnp.asarray(tokens))[0], hf_logits(hf_model, tokens), atol=TOL, rtol=0)

    out = save_hf(model, model.config.with_policy(param_dtype="bfloat16"), tmp_path / "export_bf16")
    with safe_open(out / "model.safetensors", framework="numpy") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = load_hf(out)  # bf16 -> f32 again: the weights were bf16 all along, so nothing is lost
    np.testing.assert_array_equal(reloaded(jnp.asarray(tokens))[0], model(jnp.asarray(tokens))[0])


def test_export_writes_the_tokenizer(hf_checkpoint, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(V)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", eos_token="w2")
    model = load_hf(hf_checkpoint("llama"))
    out = save_hf(model, model.config, tmp_path / "with_tokenizer", tokenizer)
    assert transformers.AutoTokenizer.from_pretrained(out)("w5 w7")["input_ids"] == [5, 7]


def test_export_rejects_a_config_of_another_architecture(hf_checkpoint, tmp_path):
    model = load_hf(hf_checkpoint("llama"))
    other = load_hf(hf_checkpoint("qwen2")).config
    with pytest.raises(ValueError, match="different architecture"):
        save_hf(model, other, tmp_path / "wrong")


def _rewrite_weights(directory, change):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(hf_checkpoint, tmp_path):
    directory = _copy(hf_checkpoint("llama"), tmp_path)
    _rewrite_weights(directory, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf(directory)


def test_unexpected_tensor_is_named(hf_checkpoint, tmp_path):
    directory = _copy(hf_checkpoint("llama"), tmp_path)
    _rewrite_weights(directory, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensor.*q_proj\.bias.*model\.safetensors"):
        load_hf(directory)


def test_shape_mismatch_names_tensor_and_file(hf_checkpoint, tmp_path):
    directory = _copy(hf_checkpoint("llama"), tmp_path)
    _rewrite_weights(directory, lambda t: t.update({"model.norm.weight": np.ones(31, np.float32)}))
    expected = r"model\.safetensors: tensor 'model\.norm\.weight' has shape \(31,\), expected \(32,\)"
    with pytest.raises(ValueError, match=expected):
        load_hf(directory)


def test_missing_files_are_named(hf_checkpoint, tmp_path):
    directory = _copy(hf_checkpoint("llama"), tmp_path)
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has none of model.safetensors, model.safetensors.index.json or "
                                                "flax_model.msgpack"):
        load_hf(directory)
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(directory)

    model = load_hf(hf_checkpoint("llama"))
    sharded = save_hf(model, model.config, tmp_path / "sharded", max_shard_bytes=20_000)
    shard = sorted(set(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].values()))[1]
    (sharded / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard} is listed in"):
        load_hf(sharded)


def test_unknown_config_key_names_the_file_and_key(hf_checkpoint, tmp_path):
    directory = _copy(hf_checkpoint("llama"), tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "attn_logit_softcapping": 30.0}))
    with pytest.raises(ValueError, match=r"config\.json.*attn_logit_softcapping"):
        load_hf(directory)


def test_the_loaders_take_the_attention_policy(hf_checkpoint, monkeypatch):
    """``attention`` travels with the other policy keys (``jaxalign train``'s ``model.attention`` included);
    GPT-2, which has one attention, refuses any other than ``auto``."""
    from jaxalign.methods import common
    from jaxalign.methods.recipe import ModelSpec

    assert load_hf(hf_checkpoint("llama"), attention="grouped").config.attention == "grouped"
    asked = {}
    monkeypatch.setattr(common.models, "load_pretrained",
                        lambda path, **policy: (asked.update(policy), (object(), object()))[1])
    common.load_pretrained(ModelSpec(path="some/checkpoint", attention="grouped"))
    assert asked["attention"] == "grouped" and asked["remat"] == "dots_no_batch"
    assert load_hf(hf_checkpoint("gpt2")).config.remat == "none"
    with pytest.raises(ValueError, match="GPT-2 models take 'auto' only"):
        load_hf(hf_checkpoint("gpt2"), attention="grouped")
