"""Flax NNX causal LMs (Llama family, GPT-2), heads, KV cache, sharding rules and weight IO (HF, GGUF)."""

from jaxalign.models.cache import KVCache
from jaxalign.models.causal_lm import CausalLM
from jaxalign.models.config import ModelConfig, RopeScaling
from jaxalign.models.doctor_io import check_same_tokenizer, load_doctor, read_doctor_card, save_doctor
from jaxalign.models.gguf_io import GGUFSource, default_model_path, load_gguf, load_gguf_tokenizer
from jaxalign.models.gpt2 import GPT2Config, GPT2LMHeadModel, GPT2Model
from jaxalign.models.heads import (
    CausalLMWithValueHead,
    RewardHead,
    RewardModel,
    ValueHead,
    last_token_index,
)
from jaxalign.models.hf_io import (
    SafetensorsSource,
    TensorSource,
    config_from_hf,
    load_hf,
    load_hf_config,
    model_from_tensors,
    save_hf,
)
from jaxalign.models.llama import LlamaForCausalLM, LlamaModel
from jaxalign.models.lora import BASE_PARAMS, LoRAConfig, LoRALinear, apply_lora, has_lora, merge_lora
from jaxalign.models.masks import derive_positions
from jaxalign.models.pretrained import TOKENIZER_FILES, load_pretrained
from jaxalign.models.quantize import QuantizeConfig, is_quantized, merge_for_export, quantize_model, storage_bytes
from jaxalign.models.quantized import WEIGHTS, QuantizedKernel, QuantizedLinear, QuantizedWeight
from jaxalign.models.reward_io import load_reward_model, save_reward_model
from jaxalign.models.scoring import DEFAULT_CHUNK, head_logps, target_logps
from jaxalign.models.sharding import DEFAULT_RULES, MESH_AXES, fit_spec, named_shardings, partition_specs
from jaxalign.models.truncate import first_layers

__all__ = [
    "DEFAULT_CHUNK",
    "head_logps",
    "target_logps",
    "BASE_PARAMS",
    "DEFAULT_RULES",
    "MESH_AXES",
    "CausalLM",
    "CausalLMWithValueHead",
    "GGUFSource",
    "GPT2Config",
    "GPT2LMHeadModel",
    "GPT2Model",
    "KVCache",
    "LlamaForCausalLM",
    "LlamaModel",
    "LoRAConfig",
    "LoRALinear",
    "ModelConfig",
    "QuantizeConfig",
    "QuantizedKernel",
    "QuantizedLinear",
    "QuantizedWeight",
    "RewardHead",
    "RewardModel",
    "RopeScaling",
    "SafetensorsSource",
    "TOKENIZER_FILES",
    "TensorSource",
    "ValueHead",
    "WEIGHTS",
    "apply_lora",
    "check_same_tokenizer",
    "config_from_hf",
    "default_model_path",
    "derive_positions",
    "first_layers",
    "fit_spec",
    "has_lora",
    "is_quantized",
    "last_token_index",
    "load_gguf",
    "load_gguf_tokenizer",
    "load_hf",
    "load_doctor",
    "load_hf_config",
    "load_pretrained",
    "load_reward_model",
    "merge_for_export",
    "merge_lora",
    "model_from_tensors",
    "named_shardings",
    "partition_specs",
    "quantize_model",
    "read_doctor_card",
    "save_doctor",
    "save_hf",
    "save_reward_model",
    "storage_bytes",
]
