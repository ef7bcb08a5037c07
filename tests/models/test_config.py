"""ModelConfig from/to Hugging Face config.json: supported variants, and clear errors for the rest."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import transformers

from jaxalign.models import GPT2Config, ModelConfig, RopeScaling, load_hf_config
from jaxalign.models.rope import inverse_frequencies
from tests.models.conftest import HF_CONFIGS

# SmolLM2-135M-Instruct's config.json as published (nanotron keys included).
SMOLLM2 = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576,
    "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "is_llama_config": True,
    "max_position_embeddings": 8192, "model_type": "llama", "num_attention_heads": 9,
    "num_hidden_layers": 30, "num_key_value_heads": 3, "pad_token_id": 2, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.42.3",
    "use_cache": True, "vocab_size": 49152,
}

# Llama 3.1's legacy spelling: rope_theta at top level, rope_scaling with rope_type, a list of eos ids.
LLAMA31_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}


def _llama31(**changes):
    return {**SMOLLM2, "tie_word_embeddings": False, "rope_theta": 500000.0, "rope_scaling": LLAMA31_ROPE,
            "eos_token_id": [128001, 128008, 128009], **changes}


def test_smollm2_config():
    config = ModelConfig.from_hf(SMOLLM2)
    assert (config.architecture, config.vocab_size, config.d_model, config.n_layers) == ("llama", 49152, 576, 30)
    assert (config.n_heads, config.n_kv_heads, config.head_dim, config.intermediate_size) == (9, 3, 64, 1536)
    assert config.rope_theta == 1e5 and config.rope_scaling is None and config.tie_word_embeddings
    assert (config.bos_token_id, config.eos_token_ids, config.pad_token_id) == (1, (2,), 2)
    assert config.rms_norm_eps == 1e-5 and not (config.qkv_bias or config.o_bias or config.mlp_bias)


def test_llama31_legacy_rope_scaling_and_eos_list():
    config = ModelConfig.from_hf(_llama31())
    assert config.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert config.rope_theta == 5e5 and config.eos_token_ids == (128001, 128008, 128009)


@pytest.mark.parametrize("arch", list(HF_CONFIGS))
def test_transformers_configs_parse_and_round_trip(arch):
    config_class, kwargs = HF_CONFIGS[arch]
    hf = json.loads(config_class(**kwargs).to_json_string())
    config = ModelConfig.from_hf(hf)
    assert config.architecture == hf["model_type"]
    assert ModelConfig.from_hf(config.to_hf()) == config
    reloaded = transformers.AutoConfig.for_model(**config.to_hf())
    assert reloaded.rope_parameters == hf["rope_parameters"]
    assert getattr(reloaded, "sliding_window", None) == hf.get("sliding_window")


def test_qwen2_has_qkv_bias_only_and_mistral_keeps_its_window():
    qwen = ModelConfig.from_hf(json.loads(transformers.Qwen2Config(**HF_CONFIGS["qwen2"][1]).to_json_string()))
    assert (qwen.qkv_bias, qwen.o_bias, qwen.mlp_bias, qwen.sliding_window) == (True, False, False, None)
    mistral_kwargs = HF_CONFIGS["mistral_window"][1]
    mistral = ModelConfig.from_hf(json.loads(transformers.MistralConfig(**mistral_kwargs).to_json_string()))
    assert mistral.sliding_window == 4


@pytest.mark.parametrize("arch", ["llama3_rope", "linear_rope", "llama"])
def test_rope_frequencies_match_transformers(arch):
    config_class, kwargs = HF_CONFIGS[arch]
    hf_config = config_class(**kwargs)
    rope = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_config)
    ours = inverse_frequencies(ModelConfig.from_hf(json.loads(hf_config.to_json_string())))
    np.testing.assert_array_equal(ours, rope.inv_freq.to(torch.float32).numpy())


@pytest.mark.parametrize(
    ("hf", "named"),
    [
        ({**SMOLLM2, "my_new_flag": True}, "my_new_flag"),
        ({**SMOLLM2, "model_type": "gpt_neox"}, "gpt_neox"),
        ({**SMOLLM2, "architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
        ({**SMOLLM2, "hidden_act": "gelu"}, "hidden_act"),
        ({**SMOLLM2, "attention_dropout": 0.1}, "attention_dropout"),
        ({**SMOLLM2, "rope_interleaved": True}, "rope_interleaved"),
        ({**SMOLLM2, "quantization_config": {"bits": 4}}, "quantization_config"),
        ({**SMOLLM2, "sliding_window": 4096}, "sliding_window"),  # llama has none: not silently dropped
        (_llama31(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
        (_llama31(rope_scaling={**LLAMA31_ROPE, "beta_fast": 32}), "beta_fast"),
        (_llama31(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}), "disagree"),
        ({**SMOLLM2, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "attention_bias": False,
          "rope_interleaved": None, "is_llama_config": None}, "attention_bias"),
        ({**json.loads(transformers.Qwen2Config(**HF_CONFIGS["qwen2"][1]).to_json_string()),
          "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1, "layer_types": None},
         "max_window_layers"),
    ],
)
def test_unsupported_configs_raise_naming_the_key(hf, named):
    with pytest.raises(ValueError, match=named):
        ModelConfig.from_hf(hf)


def test_config_validates_itself_and_is_hashable():
    config = ModelConfig.from_hf(SMOLLM2)
    assert hash(config) == hash(ModelConfig.from_hf(SMOLLM2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.d_model = 8
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        dataclasses.replace(config, n_kv_heads=4)
    with pytest.raises(ValueError, match="compute_dtype"):
        config.with_policy(compute_dtype="float8")
    with pytest.raises(ValueError, match="remat"):
        config.with_policy(remat="sometimes")
    with pytest.raises(ValueError, match="qwen2 cannot express biases"):
        dataclasses.replace(config, architecture="qwen2")
    assert config.same_architecture(config.with_policy(param_dtype="bfloat16", remat="full"))
    assert not config.same_architecture(dataclasses.replace(config, rope_theta=1e4))


def _without(hf, key):
    return {k: v for k, v in hf.items() if k != key}


GPT2_TINY = {"model_type": "gpt2", "vocab_size": 97, "n_embd": 32, "n_layer": 2, "n_head": 4}


@pytest.mark.parametrize(
    ("parse", "hf", "message"),
    [
        (ModelConfig.from_hf, _without(SMOLLM2, "hidden_size"),
         r"required key 'hidden_size' \(a positive int\) is missing"),
        (ModelConfig.from_hf, _without(SMOLLM2, "vocab_size"), r"required key 'vocab_size'"),
        (ModelConfig.from_hf, {**SMOLLM2, "intermediate_size": None}, r"'intermediate_size' .* is null"),
        (ModelConfig.from_hf, {**SMOLLM2, "hidden_size": "576"},
         r"hidden_size must be a positive int, got '576' \(str\)"),
        (ModelConfig.from_hf, {**SMOLLM2, "num_attention_heads": 9.0}, r"num_attention_heads must be a positive int"),
        (ModelConfig.from_hf, {**SMOLLM2, "num_hidden_layers": True}, r"num_hidden_layers must be a positive int"),
        (ModelConfig.from_hf, {**SMOLLM2, "tie_word_embeddings": "false"}, r"tie_word_embeddings must be a boolean"),
        (ModelConfig.from_hf, {**SMOLLM2, "rms_norm_eps": "1e-5"}, r"rms_norm_eps must be a positive number"),
        (ModelConfig.from_hf, {**SMOLLM2, "rope_theta": "1e5"}, r"rope_theta must be a positive number"),
        (ModelConfig.from_hf, {**SMOLLM2, "rope_scaling": "linear"}, r"rope_scaling must be a JSON object"),
        (ModelConfig.from_hf, {**SMOLLM2, "eos_token_id": "2"}, r"eos_token_id must be a token id"),
        (ModelConfig.from_hf, [SMOLLM2], r"expected a JSON object"),
        (GPT2Config.from_hf, _without(GPT2_TINY, "n_embd"), r"required key 'n_embd' \(a positive int\) is missing"),
        (GPT2Config.from_hf, {**GPT2_TINY, "n_head": "4"}, r"n_head must be a positive int, got '4'"),
        (GPT2Config.from_hf, {**GPT2_TINY, "layer_norm_epsilon": None, "n_positions": 0},
         r"n_positions must be a positive"),
    ],
)
def test_missing_or_mistyped_keys_name_the_key_and_type(parse, hf, message):
    with pytest.raises(ValueError, match=r"config\.json: .*" + message):
        parse(hf)


def test_load_hf_config_names_the_file_of_a_broken_key(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_without(SMOLLM2, "num_hidden_layers")))
    with pytest.raises(ValueError, match=rf"{tmp_path / 'config.json'}: .*required key 'num_hidden_layers'"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**GPT2_TINY, "vocab_size": [97]}))
    with pytest.raises(ValueError, match=rf"{tmp_path / 'config.json'}: .*vocab_size must be a positive int"):
        load_hf_config(tmp_path)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_missing_sliding_window_gets_the_transformers_default(arch):
    if arch == "mistral":
        hf = json.loads(transformers.MistralConfig(**HF_CONFIGS["mistral_window"][1]).to_json_string())
    else:
        hf = json.loads(transformers.Qwen2Config(**HF_CONFIGS["qwen2_window"][1]).to_json_string())
    hf = {k: v for k, v in hf.items() if k not in ("sliding_window", "layer_types")}
    expected = transformers.AutoConfig.for_model(**hf).sliding_window
    assert expected == 4096  # transformers 5's MistralConfig / Qwen2Config default
    assert ModelConfig.from_hf(hf).sliding_window == expected
    # An explicit null is no window, in transformers and here.
    assert transformers.AutoConfig.for_model(**hf, sliding_window=None).sliding_window is None
    assert ModelConfig.from_hf({**hf, "sliding_window": None}).sliding_window is None
