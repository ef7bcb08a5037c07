"""GGUF export, read back by an independent reader (transformers' GGUF loader) and by ``load_gguf``.

Tiny random models of each architecture (tests/models/conftest.py) with a byte-level BPE tokenizer built with
the ``tokenizers`` library; the embedded SmolLM2 where it is cheap (its tokenizer through our writer and reader).
"""

from __future__ import annotations

import dataclasses

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from jaxalign.models import gguf_io, kquants, load_gguf, load_hf
from jaxalign.models.gguf_export import permute_qk, save_gguf, tensor_type
from tests.models.conftest import V, make_hf_model
from tests.models.gguf_files import CHAT_TEMPLATE, llama_cpp_permute, tiny_vocabulary

Q = gguf.GGMLQuantizationType
MESSAGES = [{"role": "user", "content": "hi abc"}, {"role": "assistant", "content": "ok 42!"},
            {"role": "user", "content": "the sky?"}]
# transformers on an f16 or q8_0 file against jaxalign on the weights the file holds (float16 / Q8_0-rounded).
STORED_TOL = 1e-3
# transformers and jaxalign reading the same file: the same weights, so float32 rounding only.
SAME_FILE_TOL = 1e-4


def byte_level_tokenizer(vocab_size: int = V) -> transformers.PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer of ``vocab_size`` ids with ChatML special tokens and template."""
    tokens, _, merges = tiny_vocabulary(vocab_size)
    backend = Tokenizer(models.BPE({token: i for i, token in enumerate(tokens)},
                                   [tuple(merge.split(" ")) for merge in merges]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def chat_ids(tokenizer) -> list[int]:
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """``source(arch) -> (jaxalign model, tokenizer)`` from a saved transformers checkpoint (cached)."""
    root = tmp_path_factory.mktemp("gguf_export_sources")
    cache = {}

    def source(arch: str):
        if arch not in cache:
            directory = root / arch
            hf_model = make_hf_model(arch)
            if arch == "gpt2":  # transformers' GGUF loader sizes GPT-2's position table at its default, 1024
                hf_model = make_gpt2_1024()
            hf_model.save_pretrained(directory)
            cache[arch] = load_hf(directory), byte_level_tokenizer()
        return cache[arch]

    return source


def make_gpt2_1024():
    config = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=1024)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(1 + 0.1 * torch.randn_like(param) if name.endswith("ln_1.weight") or name.endswith(
                "ln_2.weight") or name.endswith("ln_f.weight") else 0.3 * torch.randn_like(param))
    return model


def transformers_gguf(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def logits_of(model, ids) -> np.ndarray:
    if isinstance(model, torch.nn.Module):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits.float().numpy()[0]
    return np.asarray(model(jnp.asarray([ids]))[0])[0]


def _rounded(values: np.ndarray, quant: str, axis: int) -> np.ndarray:
    """``values`` through ``quant``'s storage, its blocks along ``axis`` (GGUF's rows: a matrix's input side)."""
    if quant == "f32":
        return values
    if quant == "f16":
        return values.astype(np.float16).astype(np.float32)
    rows = np.moveaxis(values, axis, -1)
    back = gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(rows), Q.Q8_0), Q.Q8_0)
    return np.moveaxis(back.reshape(rows.shape), -1, axis)


def stored_weights(model, quant: str):
    """``model`` with every matrix rounded as an ``f16`` or ``q8_0`` GGUF stores it (norms and biases stay float32):
    jaxalign running the weights the file holds, computed without reading the file."""
    graphdef, state = nnx.split(model)
    rounded = []
    for path, var in nnx.to_flat_state(state):
        leaf, value = str(path[-1]), np.asarray(var.get_value())
        if leaf == "kernel":  # [..., in, out]: GGUF's rows run over `in`
            value = _rounded(value, quant, -2)
        elif leaf == "embedding":  # [V, D]
            value = _rounded(value, quant if "wpe" not in str(path) else "f16" if quant == "f16" else "f32", -1)
        rounded.append((path, var.replace(jnp.asarray(value))))
    return nnx.merge(graphdef, nnx.from_flat_state(rounded))


@pytest.mark.parametrize(("arch", "quant"), [("llama", "f16"), ("llama_tied_3_layers", "f16"),
                                             ("llama_tied_3_layers", "q8_0"), ("qwen2", "f16"), ("qwen2", "q8_0"),
                                             ("gpt2", "f16"), ("gpt2", "q8_0")])
def test_transformers_and_load_gguf_read_our_file(arch, quant, sources, tmp_path):
    model, tokenizer = sources(arch)
    path = save_gguf(model, tokenizer, tmp_path / f"{arch}.gguf", quant=quant, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temporary file is left beside the export"
    theirs, their_tokenizer = transformers_gguf(path)
    ids = chat_ids(tokenizer)
    assert chat_ids(their_tokenizer) == ids, "the GGUF's tokenizer and chat template give our tokens"
    read = logits_of(theirs, ids)
    # The file holds the source's weights rounded to float16 / Q8_0: transformers reading it computes what
    # jaxalign computes on those weights.
    np.testing.assert_allclose(read, logits_of(stored_weights(model, quant), ids), atol=STORED_TOL, rtol=0)
    assert np.abs(read - logits_of(model, ids)).max() > 0, "the weights went through float16 / Q8_0"
    if arch != "gpt2":  # load_gguf reads the Llama family
        ours, our_tokenizer = load_gguf(path)
        np.testing.assert_allclose(logits_of(ours, ids), read, atol=SAME_FILE_TOL, rtol=0)
        assert chat_ids(our_tokenizer) == ids


def test_mistral_without_window_is_written_as_llama(sources, tmp_path):
    model, tokenizer = sources("llama")
    config = model.config
    model.config = dataclasses.replace(config, architecture="mistral")
    try:
        path = save_gguf(model, tokenizer, tmp_path / "mistral.gguf", progress=False)
    finally:
        model.config = config
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "llama"
    ours, _ = load_gguf(path)
    ids = chat_ids(tokenizer)
    np.testing.assert_allclose(logits_of(ours, ids), logits_of(stored_weights(model, "f16"), ids), atol=STORED_TOL,
                               rtol=0)


def test_q_and_k_rows_are_permuted_as_llama_cpp_does(rng):
    weight = rng.normal(size=(6 * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(permute_qk(weight, 6), llama_cpp_permute(weight, 6))
    np.testing.assert_array_equal(gguf_io.unpermute_qk(permute_qk(weight, 6), 6), weight)


@pytest.mark.parametrize(("quantize", "kind", "relative_rmse"), [
    (kquants.quantize_q4_k, Q.Q4_K, 0.08), (kquants.quantize_q6_k, Q.Q6_K, 0.02)])
def test_k_quants_round_trip_through_gguf_dequantize(quantize, kind, relative_rmse, rng):
    rows = (rng.standard_normal((7, 512)) * 0.02).astype(np.float32)
    rows[0] = 0.0  # an all-zero block
    rows[1, :256] = 0.5  # a constant block
    rows[2, 3] = 1.0  # an outlier
    data = quantize(rows)
    assert data.dtype == np.uint8 and data.shape == (7, 512 // 256 * gguf.GGML_QUANT_SIZES[kind][1])
    back = gguf.quants.dequantize(data, kind).reshape(rows.shape)
    np.testing.assert_array_equal(back[0], 0.0)
    np.testing.assert_allclose(back[1, :256], 0.5, rtol=2e-3)
    assert abs(back[2, 3] - 1.0) < 0.02, "the block's largest value keeps its scale"
    normal = rows[3:]
    error = np.sqrt(np.mean((back[3:] - normal) ** 2)) / normal.std()
    assert error < relative_rmse
    # Fewer bits, larger error: Q4_K sits between Q4_1 and Q5_0, Q6_K between Q5_0 and Q8_0.
    q5_0 = gguf.quants.dequantize(gguf.quants.quantize(normal, Q.Q5_0), Q.Q5_0)
    assert (error < np.sqrt(np.mean((q5_0 - normal) ** 2)) / normal.std()) == (kind == Q.Q6_K)


@pytest.mark.parametrize(("name", "shape", "quant", "expected"), [
    ("blk.0.attn_norm.weight", (256,), "q4_k_m", Q.F32),
    ("blk.0.attn_q.bias", (256,), "q8_0", Q.F32),
    ("blk.0.attn_q.weight", (256, 256), "f16", Q.F16),
    ("blk.0.attn_q.weight", (256, 256), "bf16", Q.BF16),
    ("blk.0.attn_q.weight", (256, 48), "q8_0", Q.F16),  # a row Q8_0's 32-blocks do not divide
    ("blk.0.attn_q.weight", (256, 256), "q4_0", Q.Q4_0),
    ("output.weight", (97, 256), "q4_0", Q.Q6_K),
    ("output.weight", (97, 64), "q4_0", Q.Q8_0),
    ("token_embd.weight", (97, 256), "q4_k_m", Q.Q6_K),  # tied: the embedding is the output projection
    ("blk.5.attn_q.weight", (256, 256), "q4_k_m", Q.Q4_K),
    ("blk.5.attn_q.weight", (256, 576), "q4_k_m", Q.Q5_0),  # SmolLM2's rows: llama.cpp's fallback
    ("blk.0.attn_v.weight", (64, 256), "q4_k_m", Q.Q6_K),  # first eighth of 16 layers
    ("blk.3.ffn_down.weight", (256, 512), "q4_k_m", Q.Q4_K),
    ("blk.4.ffn_down.weight", (256, 512), "q4_k_m", Q.Q6_K),  # (4 - 16/8) % 3 == 2
    ("blk.15.ffn_down.weight", (256, 576), "q4_k_m", Q.Q8_0),  # Q6_K's fallback
])
def test_tensor_types_follow_llama_quantize(name, shape, quant, expected):
    assert tensor_type(name, shape, quant, n_layers=16, tied=True) == expected


def test_q4_variants_write_k_quants_that_both_readers_load(tmp_path):
    """A model wide enough (256) for Q4_K/Q6_K blocks: q4_0 and q4_k_m files load in transformers and jaxalign
    alike, and their logits stay near the source's (perplexity against f16 is benchmarks/export_formats.py's)."""
    from jaxalign.models import ModelConfig
    from jaxalign.models.llama import LlamaForCausalLM

    config = ModelConfig(architecture="llama", vocab_size=V, d_model=256, n_layers=1, n_heads=4, n_kv_heads=2,
                         head_dim=64, intermediate_size=256)
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(3))
    tokenizer = byte_level_tokenizer()
    ids = chat_ids(tokenizer)
    source = logits_of(model, ids)
    for quant, kinds in (("q4_0", {Q.Q4_0, Q.Q6_K, Q.F32}), ("q4_k_m", {Q.Q4_K, Q.Q6_K, Q.F32})):
        path = save_gguf(model, tokenizer, tmp_path / f"{quant}.gguf", quant=quant, progress=False)
        assert {t.tensor_type for t in gguf.GGUFReader(path).tensors} == kinds
        theirs, _ = transformers_gguf(path)
        ours, _ = load_gguf(path)
        read = logits_of(theirs, ids)
        np.testing.assert_allclose(logits_of(ours, ids), read, atol=SAME_FILE_TOL, rtol=0)
        error = np.abs(read - source).max() / np.abs(source).max()
        assert 0 < error < 0.25, f"{quant}: relative logit error {error}"


@pytest.mark.smollm2
def test_smollm2_tokenizer_and_template_round_trip(tmp_path):
    """SmolLM2's tokenizer as jaxalign reads it, written back: the original file's vocabulary, merges, types,
    special ids and template, and the same tokens from transformers' reader of the new file (a
    vocabulary-only GGUF, as llama.cpp's ggml-vocab files are: the weights' path is the tiny models' tests)."""
    from jaxalign.models import default_model_path, load_gguf_tokenizer
    from jaxalign.models.gguf_vocab import tokenizer_metadata

    try:
        path = default_model_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    tokenizer = load_gguf_tokenizer(path)
    out = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(out, "llama")
    tokenizer_metadata(tokenizer, vocab_size=49152).add_to(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    written = {key: field.contents() for key, field in gguf.GGUFReader(out).fields.items()}
    original = {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items()}
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.chat_template", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token"):
        assert written[key] == original[key], key
    # jaxalign's tokenizer splits as GPT-2 does (transformers reads "smollm" so), and says so to llama.cpp.
    assert written["tokenizer.ggml.pre"] == "gpt-2"
    assert chat_ids(transformers.AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)) == chat_ids(tokenizer)


def test_unknown_quant_and_inexpressible_models_fail_before_writing(sources, tmp_path):
    model, tokenizer = sources("llama")
    with pytest.raises(ValueError, match="unknown GGUF quantisation 'q3_x'"):
        save_gguf(model, tokenizer, tmp_path / "x.gguf", quant="q3_x")
    windowed, _ = sources("mistral_window")
    with pytest.raises(ValueError, match="sliding attention window of 4 tokens"):
        save_gguf(windowed, tokenizer, tmp_path / "x.gguf")
    from tests.test_cli import tiny_tokenizer  # word-level

    with pytest.raises(ValueError, match="WordLevel tokenizer has no GGUF spelling"):
        save_gguf(model, tiny_tokenizer(), tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_no_file(sources, tmp_path, monkeypatch):
    from jaxalign.models import gguf_export

    model, tokenizer = sources("llama")
    calls = []

    def failing(values, kind):
        calls.append(kind)
        if len(calls) == 5:
            raise OSError("No space left on device")
        return original(values, kind)

    original = gguf_export._quantise
    monkeypatch.setattr(gguf_export, "_quantise", failing)
    with pytest.raises(OSError, match="No space left"):
        save_gguf(model, tokenizer, tmp_path / "model.gguf", progress=False)
    assert list(tmp_path.iterdir()) == []
