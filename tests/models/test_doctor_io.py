"""Doctor directories (save_doctor / load_doctor / read_doctor_card), the tokenizer check between a patient and a
doctor, and first_layers (a smaller model cut from a larger one), checked against transformers' own model with
its later layers removed."""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import pytest
from flax import nnx

from jaxalign import models
from jaxalign.models import CausalLMWithValueHead, first_layers, load_doctor, load_hf, read_doctor_card, save_doctor
from tests.models.conftest import TOL, hf_logits, make_hf_model
from tests.test_cli import tiny_tokenizer

TOKENS = np.array([[5, 17, 3, 88, 41, 9, 60], [2, 2, 70, 11, 0, 96, 33]], np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def forward(module, tokens=TOKENS) -> list[np.ndarray]:
    """The module's outputs (jitted: an eager forward pass is slower than compiling one), None dropped."""
    return [np.asarray(x) for x in _forward(*nnx.split(module), tokens) if x is not None]


def params(module) -> dict:
    return {path: np.asarray(value[...]) for path, value in nnx.to_flat_state(nnx.state(module, nnx.Param))}


# ------------------------------------------------------------------------------------------ first_layers


def truncated_hf(hf_model, n: int):
    """transformers' model keeping its first ``n`` decoder blocks (the independent reference)."""
    if hasattr(hf_model, "transformer"):  # GPT-2
        hf_model.transformer.h = hf_model.transformer.h[:n]
        hf_model.config.n_layer = n
    else:
        hf_model.model.layers = hf_model.model.layers[:n]
        hf_model.config.num_hidden_layers = n
    return hf_model


@pytest.mark.parametrize("arch, n", [("llama_tied_3_layers", 1), ("llama", 2), ("gpt2_untied_exact_gelu", 2)])
def test_first_layers_is_the_original_without_its_later_layers(hf_checkpoint, arch, n):
    lm = load_hf(hf_checkpoint(arch))
    total = lm.config.n_layers
    before = params(lm)
    small = first_layers(lm, n)
    assert type(small) is type(lm) and small.config.n_layers == n
    assert small.config == type(lm.config)(**{**vars(lm.config), "n_layers": n})  # nothing else changed
    # Logits: transformers' model with its later blocks dropped (embeddings, final norm and head kept).
    np.testing.assert_allclose(forward(small)[0], hf_logits(truncated_hf(make_hf_model(arch), n), TOKENS),
                               atol=TOL, rtol=TOL)
    # Parameters: the stacked layer arrays are the original's first n, the rest equal; shapes [n, ...].
    cut = params(small)
    assert cut.keys() == before.keys()
    stacked_paths = {path for path in before if models.hf_io.is_stacked(tuple(map(str, path)))}
    assert len(stacked_paths) >= 4 and all(before[path].shape[0] == total for path in stacked_paths)
    for path, value in before.items():
        stacked = path in stacked_paths
        np.testing.assert_array_equal(cut[path], value[:n] if stacked else value, err_msg=str(path))
    # The original is untouched, and the copy does not share its arrays.
    for _, value in nnx.to_flat_state(nnx.state(small, nnx.Param)):
        value[...] = value[...] + 1.0
    after = params(lm)
    assert lm.config.n_layers == total and all(np.array_equal(after[p], before[p]) for p in before)


@pytest.mark.parametrize("n", [0, 3, -1, True, 1.0, "1", None])
def test_first_layers_refuses_a_layer_count_the_model_does_not_have(hf_checkpoint, n):
    lm = load_hf(hf_checkpoint("llama"))
    with pytest.raises(ValueError, match=r"n_layers must be an int in 1\.\.2 \(the model's layers\), got"):
        first_layers(lm, n)


# ------------------------------------------------------------------------------------------ doctor directories


def random_doctor(lm, seed: int = 1) -> CausalLMWithValueHead:
    doctor = CausalLMWithValueHead(lm, rngs=nnx.Rngs(0))
    keys = jax.random.split(jax.random.key(seed))
    doctor.value_head.kernel[...] = jax.random.normal(keys[0], doctor.value_head.kernel[...].shape)
    doctor.value_head.bias[...] = jax.random.normal(keys[1], doctor.value_head.bias[...].shape)
    return doctor


def test_a_saved_doctor_loads_back_equal(hf_checkpoint, tmp_path):
    doctor = random_doctor(load_hf(hf_checkpoint("llama_biases_untied")))
    metadata = {"patient": "somewhere", "face": {"positive": "a", "negative": "b"}, "loss": {"gamma": 0.1}}
    out = save_doctor(tmp_path / "doctor", doctor, tiny_tokenizer(), dimension="helpfulness", metadata=metadata)
    loaded, tokenizer, card = load_doctor(out)
    assert card == {"dimension": "helpfulness", "metadata": metadata} == read_doctor_card(out)
    assert type(loaded.lm) is type(doctor.lm) and loaded.lm.config == doctor.lm.config
    assert tokenizer.get_vocab() == tiny_tokenizer().get_vocab()
    for a, b in zip(forward(doctor), forward(loaded), strict=True):  # logits and log V at every position
        np.testing.assert_allclose(b, a, atol=1e-6)
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(np.asarray(getattr(loaded.value_head, name)[...]),
                                      np.asarray(getattr(doctor.value_head, name)[...]))
    # The directory is also a plain causal-LM checkpoint (what `generate --model` and transformers read).
    lm, _ = models.load_pretrained(out)
    np.testing.assert_allclose(forward(lm)[0], forward(doctor.lm)[0], atol=1e-6)


def test_not_a_doctor_is_named(hf_checkpoint, tmp_path):
    lm = load_hf(hf_checkpoint("llama"))
    with pytest.raises(FileNotFoundError, match=r"doctor .*nowhere: no such directory"):
        read_doctor_card(tmp_path / "nowhere")
    plain = models.save_hf(lm, lm.config, tmp_path / "policy", tiny_tokenizer())  # an SFT/DPO export
    for reader in (read_doctor_card, load_doctor):
        with pytest.raises(FileNotFoundError, match=r"policy is not a doctor: it has no doctor\.json"):
            reader(plain)
    (plain / "doctor.json").write_text(json.dumps({"dimension": "helpfulness"}))
    with pytest.raises(FileNotFoundError, match=r"--doctor .*policy is not a doctor: it has no value_head\."
                                                r"safetensors"):
        load_doctor(plain, source="--doctor")

    out = save_doctor(tmp_path / "doctor", random_doctor(lm), tiny_tokenizer(), dimension="helpfulness")
    card = out / "doctor.json"
    for text, message in (("{not json", r"doctor\.json: not valid JSON"),
                          ('["helpfulness"]', r"doctor\.json: needs a non-empty string field 'dimension'"),
                          ('{"dimension": ""}', r"needs a non-empty string field 'dimension'"),
                          ('{"metadata": {}}', r"needs a non-empty string field 'dimension'")):
        card.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_doctor(out)
    card.write_text(json.dumps({"dimension": "helpfulness"}))
    # A value head of another model's width, or without its bias.
    from safetensors.numpy import save_file

    save_file({"kernel": np.zeros((16, 1), np.float32), "bias": np.zeros(1, np.float32)},
              str(out / "value_head.safetensors"))
    with pytest.raises(ValueError, match=r"value_head\.safetensors: tensor 'kernel' is \(16, 1\), the doctor's LM "
                                         r"needs \(32, 1\)"):
        load_doctor(out)
    save_file({"kernel": np.zeros((32, 1), np.float32)}, str(out / "value_head.safetensors"))
    with pytest.raises(ValueError, match=r"tensor 'bias' is missing"):
        load_doctor(out)


def test_save_doctor_refuses_a_plain_lm_or_no_dimension(hf_checkpoint, tmp_path):
    lm = load_hf(hf_checkpoint("llama"))
    with pytest.raises(TypeError, match="save_doctor needs a CausalLMWithValueHead .* got LlamaForCausalLM"):
        save_doctor(tmp_path / "x", lm, dimension="helpfulness")
    with pytest.raises(ValueError, match="dimension must be a non-empty name, got ''"):
        save_doctor(tmp_path / "x", random_doctor(lm), dimension="")
    assert not (tmp_path / "x").exists()


def test_check_same_tokenizer_names_where_they_differ():
    from tests.data.conftest import make_tiny_tokenizer

    models.check_same_tokenizer(tiny_tokenizer(), tiny_tokenizer())  # the same: no error
    with pytest.raises(ValueError, match=r"the patient \(p\) and the doctor \(d\) do not share a tokenizer "
                                         r"\(97 tokens vs 34\)"):
        models.check_same_tokenizer(tiny_tokenizer(), make_tiny_tokenizer(), patient="the patient (p)",
                                    doctor="the doctor (d)")
    # The same size, two words exchanged: only an id-by-id comparison tells them apart.
    with pytest.raises(ValueError, match=r"'blue' is 14 vs 13, 'sky' is 13 vs 14"):
        models.check_same_tokenizer(tiny_tokenizer(), tiny_tokenizer(swap=("sky", "blue")))
