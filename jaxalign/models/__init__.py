"""Flax NNX causal LMs (Llama family), heads, KV cache, sharding rules and Hugging Face weight IO."""

from jaxalign.models.cache import KVCache
from jaxalign.models.config import ModelConfig, RopeScaling
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
    load_hf,
    load_hf_config,
    model_from_tensors,
    save_hf,
)
from jaxalign.models.llama import LlamaForCausalLM, LlamaModel
from jaxalign.models.masks import derive_positions
from jaxalign.models.sharding import DEFAULT_RULES, MESH_AXES, fit_spec, named_shardings, partition_specs

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "CausalLMWithValueHead",
    "KVCache",
    "LlamaForCausalLM",
    "LlamaModel",
    "ModelConfig",
    "RewardHead",
    "RewardModel",
    "RopeScaling",
    "SafetensorsSource",
    "TensorSource",
    "ValueHead",
    "derive_positions",
    "fit_spec",
    "last_token_index",
    "load_hf",
    "load_hf_config",
    "model_from_tensors",
    "named_shardings",
    "partition_specs",
    "save_hf",
]
