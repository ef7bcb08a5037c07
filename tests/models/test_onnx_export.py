"""ONNX export read back by onnxruntime: a cached decode loop in ONNX Runtime against jaxalign's forward and
greedy sampler, int8 quantisation, and reward models' scores."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from flax import nnx

from jaxalign.models import ModelConfig, RewardModel, load_hf
from jaxalign.models.llama import LlamaForCausalLM
from jaxalign.models.onnx_export import ONNX_OPSET, down_projections, quantize_onnx, save_onnx, save_reward_onnx
from jaxalign.rollout import Sampler, SamplingParams
from tests.models.conftest import V, left_padded, make_hf_model

TOL = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``exported(arch) -> (jaxalign model, onnxruntime session)`` (cached per module)."""
    root = tmp_path_factory.mktemp("onnx_export")
    cache = {}

    def export(arch: str):
        if arch not in cache:
            make_hf_model(arch).save_pretrained(root / arch)
            model = load_hf(root / arch)
            path = save_onnx(model, root / f"{arch}.onnx", progress=False)
            cache[arch] = model, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return cache[arch]

    return export


def empty_cache(session, batch: int) -> dict[str, np.ndarray]:
    return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
            for i in session.get_inputs() if i.name.startswith("past_key_values.")}


def run_step(session, ids, mask, positions, cache):
    outputs = session.run(None, {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64),
                                 "position_ids": positions.astype(np.int64), **cache})
    names = [o.name for o in session.get_outputs()]
    presents = {name.replace("present.", "past_key_values."): value for name, value in zip(names[1:], outputs[1:])}
    return outputs[0], presents


@pytest.mark.parametrize("arch", ["llama_tied_3_layers", "qwen2_window", "gpt2"])
def test_cached_decode_in_onnxruntime_equals_jaxalign(arch, exported, rng):
    """A left-padded prefill then single-token steps through the ONNX cache give jaxalign's full-forward logits."""
    model, session = exported(arch)
    tokens = rng.integers(0, V, size=(3, 11))
    mask = left_padded([11, 8, 5], length=11)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    expected = np.asarray(model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask))[0])
    cache, logits = empty_cache(session, 3), []
    for start, end in ((0, 8), (8, 9), (9, 10), (10, 11)):
        step, cache = run_step(session, tokens[:, start:end], mask[:, :end], positions[:, start:end], cache)
        logits.append(step)
    logits = np.concatenate(logits, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(logits[real], expected[real], atol=TOL, rtol=0)
    assert cache["past_key_values.0.key"].shape[2] == 11


def test_graph_interface_is_documented(exported):
    model, session = exported("llama_tied_3_layers")
    inputs = {i.name: (i.type, i.shape) for i in session.get_inputs()}
    assert inputs["input_ids"] == ("tensor(int64)", ["batch", "sequence"])
    assert inputs["position_ids"] == ("tensor(int64)", ["batch", "sequence"])
    assert inputs["attention_mask"][0] == "tensor(int64)"
    assert inputs["past_key_values.1.value"] == ("tensor(float)", ["batch", 2, "past_sequence", 8])
    outputs = {o.name: o.shape for o in session.get_outputs()}
    assert outputs["logits"] == ["batch", "sequence", V]
    assert outputs["present.2.key"] == ["batch", 2, "past_sequence + sequence", 8]
    assert set(outputs) == {"logits"} | {f"present.{i}.{k}" for i in range(3) for k in ("key", "value")}


def test_greedy_32_tokens_in_onnxruntime_equal_jaxalign_sampler(exported):
    model, session = exported("llama_tied_3_layers")
    prompt = np.array([[5, 17, 42, 8, 3, 60, 11]])
    params = SamplingParams(max_new_tokens=32, temperature=0.0, stop_token_ids=())
    out = Sampler(model).generate(jnp.asarray(prompt), jnp.ones_like(jnp.asarray(prompt)), key=jax.random.key(0),
                                  params=params)
    ours = np.asarray(out.tokens)[0][np.asarray(out.response_mask)[0]].tolist()
    assert len(ours) == 32
    tokens, cache = prompt, empty_cache(session, 1)
    step_ids, generated = prompt, []
    for _ in range(32):
        length = tokens.shape[1]
        positions = np.arange(length - step_ids.shape[1], length)[None]
        logits, cache = run_step(session, step_ids, np.ones((1, length)), positions, cache)
        step_ids = logits[:, -1].argmax(axis=-1)[:, None]
        generated.append(int(step_ids[0, 0]))
        tokens = np.concatenate([tokens, step_ids], axis=1)
    assert generated == ours


def test_int8_quantises_the_products_and_stays_close(tmp_path, rng):
    config = ModelConfig(architecture="llama", vocab_size=V, d_model=128, n_layers=1, n_heads=4, n_kv_heads=2,
                         head_dim=32, intermediate_size=256)
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(1))
    full = save_onnx(model, tmp_path / "model.onnx", progress=False)
    small = quantize_onnx(full, tmp_path / "model-int8.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-int8.onnx", "model.onnx"], "no leftovers"
    graph = onnx.load(small).graph
    ops = {node.op_type for node in graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops and "Gemm" not in ops
    # The down projection (the only product with 256 input rows) stays float32; the other six are int8.
    assert down_projections(onnx.load(full).graph, 256) and [n.name for n in graph.node if n.op_type == "MatMul"] \
        == down_projections(graph, 256)
    assert sum(node.op_type == "MatMulInteger" for node in graph.node) == 7  # q, k, v, o, gate, up, LM head
    assert small.stat().st_size < 0.5 * full.stat().st_size
    tokens = rng.integers(0, V, size=(2, 9))
    expected = np.asarray(model(jnp.asarray(tokens))[0])
    session = ort.InferenceSession(str(small), providers=["CPUExecutionProvider"])
    positions = np.tile(np.arange(9), (2, 1))
    logits, _ = run_step(session, tokens, np.ones((2, 9)), positions, empty_cache(session, 2))
    error = np.abs(logits - expected).max() / np.abs(expected).max()
    assert 0 < error < 0.1, f"int8 logits off by {error:.1%} of the largest"


@pytest.mark.parametrize(("pooling", "objectives"), [("last", None), ("mean", 3)])
def test_reward_model_scores_equal_jaxalign(pooling, objectives, tmp_path, rng):
    make_hf_model("llama").save_pretrained(tmp_path / "trunk")
    reward_model = RewardModel(load_hf(tmp_path / "trunk"), num_objectives=objectives, pooling=pooling,
                               rngs=nnx.Rngs(2))
    gain, bias = (2.0, -0.5) if objectives is None else ([1.0, 2.0, 3.0], [0.1, 0.2, 0.3])
    path = save_reward_onnx(reward_model, tmp_path / "reward.onnx", gain=gain, bias=bias, progress=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tokens = rng.integers(0, V, size=(3, 9))
    for mask in (left_padded([9, 6, 2], length=9), left_padded([9, 6, 2], length=9)[:, ::-1].copy()):
        expected = np.asarray(reward_model(jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
        rewards, normalized = session.run(None, {"input_ids": tokens.astype(np.int64),
                                                 "attention_mask": mask.astype(np.int64)})
        assert rewards.shape == ((3,) if objectives is None else (3, objectives))
        np.testing.assert_allclose(rewards, expected, atol=TOL, rtol=0)
        np.testing.assert_allclose(normalized, np.asarray(gain) * expected + np.asarray(bias), atol=TOL, rtol=0)
    metadata = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert metadata["jaxalign.pooling"] == pooling


def test_opset_and_bad_models(exported, tmp_path):
    config = ModelConfig(architecture="llama", vocab_size=V, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                         head_dim=8, intermediate_size=64, compute_dtype="bfloat16")
    with pytest.raises(ValueError, match="ONNX export writes float32 graphs"):
        save_onnx(LlamaForCausalLM(config, rngs=nnx.Rngs(0)), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="not RewardModel"):
        save_onnx(RewardModel(LlamaForCausalLM(config.with_policy(compute_dtype="float32"), rngs=nnx.Rngs(0)),
                              rngs=nnx.Rngs(0)), tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []
    _, session = exported("llama_tied_3_layers")
    assert session.get_modelmeta().custom_metadata_map["jaxalign.kind"] == "causal_lm"
    path = session._model_path
    assert {o.domain: o.version for o in onnx.load(path).opset_import}[""] == ONNX_OPSET
