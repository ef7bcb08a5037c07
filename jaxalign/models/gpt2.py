"""GPT-2 causal LM in Flax NNX, numerically transformers' ``GPT2LMHeadModel``.

Pre-LayerNorm blocks with learned absolute positions, multi-head attention from one fused ``c_attn``
projection ``[D, 3D]`` (``q | k | v``), a GELU MLP (tanh approximation, HF's ``gelu_new``), a final
LayerNorm, and an LM head tied to the token embedding. HF's ``Conv1D`` stores weights ``[in, out]``,
which is already our kernel layout, so checkpoints map without transposes.

The call signature, the stacked ``[L]`` layer layout with one ``jax.lax.scan``, padding-aware positions
(``cumsum(mask) − 1``, here indexing the learned position table), packed segments and the KV cache are
those of :class:`jaxalign.models.llama.LlamaForCausalLM`, so rollout, heads and trainers use both alike.
Parameter paths follow transformers' names (``transformer/h/attn/c_attn/kernel`` is
``transformer.h.{i}.attn.c_attn.weight``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
from einops import rearrange
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from jaxalign.models.cache import KVCache, LayerKV
from jaxalign.models.causal_lm import CausalLM
from jaxalign.models.config import IGNORED_HF_KEYS, ExecutionPolicy, check_hf_mapping, hf_field, hf_token_ids
from jaxalign.models.stack import (
    advance_cache,
    attention_inputs,
    check_in_range,
    clip_index,
    per_token,
    scan_layers,
)

_INIT = nnx.initializers.normal(stddev=0.02)

# HF activation names -> whether jax.nn.gelu uses the tanh approximation. gelu_new, gelu_pytorch_tanh
# and gelu_fast are the same formula 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))); gelu is the exact erf form.
ACTIVATIONS = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu_fast": True, "gelu": False}

_GPT2_KEYS = frozenset({
    "model_type", "architectures", "vocab_size", "n_positions", "n_ctx", "n_embd", "n_layer", "n_head",
    "n_inner", "activation_function", "layer_norm_epsilon", "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id",
    # Dropout is a training-time regulariser; jaxalign runs without it (as TRL's disable_dropout).
    "resid_pdrop", "embd_pdrop", "attn_pdrop",
    # The multiple-choice head of GPT2DoubleHeadsModel, which a causal LM does not have.
    "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels", "summary_first_dropout",
})


@dataclasses.dataclass(frozen=True)
class GPT2Config(ExecutionPolicy):
    """Architecture and dtype policy of a GPT-2 model (frozen, hashable, validated).

    Field names follow :class:`jaxalign.models.ModelConfig` where the concept is shared (``d_model``,
    ``n_layers``, ``n_heads``, ``intermediate_size``...), so the KV cache, heads and sharding read
    either config alike; ``n_kv_heads``, ``head_dim`` and ``sliding_window`` are derived.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    intermediate_size: int
    max_position_embeddings: int = 1024
    layer_norm_eps: float = 1e-5
    activation: str = "gelu_new"
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"

    architecture = "gpt2"
    sliding_window = None

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"GPT2Config.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if self.layer_norm_eps <= 0:
            raise ValueError("layer_norm_eps must be > 0")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GPT2Config.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if not isinstance(self.eos_token_ids, tuple):
            raise ValueError(f"eos_token_ids must be a tuple, got {type(self.eos_token_ids).__name__}")
        self._validate_policy()

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads: as many as query heads (GPT-2 has no grouped-query attention)."""
        return self.n_heads

    @property
    def head_dim(self) -> int:
        """Features per attention head: ``d_model / n_heads``."""
        return self.d_model // self.n_heads

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], *, param_dtype: str = "float32", compute_dtype: str = "float32",
                remat: str = "none") -> GPT2Config:
        """Build from a parsed GPT-2 ``config.json``.

        Raises:
            ValueError: another ``model_type``/``architectures``, a key neither understood nor known to be
                irrelevant, or a variant we do not implement (unscaled or layer-scaled attention, cross
                attention, another activation). The message names the key.
        """
        check_hf_mapping(hf)
        if hf.get("model_type") != "gpt2":
            raise ValueError(f"config.json: model_type {hf.get('model_type')!r} is not 'gpt2'")
        architectures = hf_field(hf, "architectures", list, None)
        if architectures is not None and list(architectures) != ["GPT2LMHeadModel"]:
            raise ValueError(f"config.json: architectures {architectures!r} is not a causal LM we implement; "
                             "expected ['GPT2LMHeadModel']")
        unknown = sorted(set(hf) - _GPT2_KEYS - IGNORED_HF_KEYS)
        if unknown:
            raise ValueError(f"config.json: key(s) {unknown} are not understood for model_type 'gpt2'; they may "
                             "change the model, so loading stops instead of ignoring them")
        required = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False}
        for key, supported in required.items():
            if hf_field(hf, key, bool, supported) != supported:
                raise ValueError(f"config.json: {key}={hf[key]} is not supported (only {supported})")
        d_model = hf_field(hf, "n_embd", int, positive=True)
        return cls(
            vocab_size=hf_field(hf, "vocab_size", int, positive=True),
            d_model=d_model,
            n_layers=hf_field(hf, "n_layer", int, positive=True),
            n_heads=hf_field(hf, "n_head", int, positive=True),
            intermediate_size=hf_field(hf, "n_inner", int, 4 * d_model, positive=True),
            max_position_embeddings=hf_field(hf, "n_positions", int, 1024, positive=True),
            layer_norm_eps=hf_field(hf, "layer_norm_epsilon", float, 1e-5, positive=True),
            activation=hf_field(hf, "activation_function", str, "gelu_new"),
            tie_word_embeddings=hf_field(hf, "tie_word_embeddings", bool, True),
            bos_token_id=hf_field(hf, "bos_token_id", int, None),
            eos_token_ids=hf_token_ids(hf, "eos_token_id"),
            pad_token_id=hf_field(hf, "pad_token_id", int, None),
            param_dtype=param_dtype,
            compute_dtype=compute_dtype,
            remat=remat,
        )

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` dict transformers' ``GPT2LMHeadModel`` loads (dropout written as 0)."""
        eos = list(self.eos_token_ids)
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.max_position_embeddings,
            "n_embd": self.d_model,
            "n_layer": self.n_layers,
            "n_head": self.n_heads,
            "n_inner": self.intermediate_size,
            "activation_function": self.activation,
            "layer_norm_epsilon": self.layer_norm_eps,
            "scale_attn_weights": True,
            "tie_word_embeddings": self.tie_word_embeddings,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": self.pad_token_id,
            "dtype": self.param_dtype,
        }


def _linear(config: GPT2Config, n_in: int, n_out: int, *, rngs: nnx.Rngs, bias: bool = True) -> nnx.Linear:
    return nnx.Linear(n_in, n_out, use_bias=bias, dtype=config.compute_jnp_dtype,
                      param_dtype=config.param_jnp_dtype, kernel_init=_INIT, rngs=rngs)


def _layer_norm(config: GPT2Config, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # use_fast_variance=False: E[(x − μ)²] as torch computes it, not E[x²] − μ², which cancels badly.
    return nnx.LayerNorm(config.d_model, epsilon=config.layer_norm_eps, dtype=config.compute_jnp_dtype,
                         param_dtype=config.param_jnp_dtype, use_fast_variance=False, rngs=rngs)


class GPT2Attention(nnx.Module):
    """Multi-head self-attention from the fused ``c_attn`` projection, then ``c_proj``."""

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.c_attn = _linear(config, config.d_model, 3 * config.d_model, rngs=rngs)
        self.c_proj = _linear(config, config.d_model, config.d_model, rngs=rngs)

    def __call__(self, x: Float[Array, "B T D"], *, mask: Bool[Array, "B T S"],
                 kv: LayerKV | None) -> tuple[Float[Array, "B T D"], LayerKV | None]:
        q, k, v = rearrange(per_token(self.c_attn, x), "b t (qkv h dh) -> qkv b t h dh", qkv=3, dh=self.head_dim)
        if kv is not None:
            kv, k, v = kv.append(k, v)
        out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask[:, None],
                                           scale=self.head_dim**-0.5)
        return per_token(self.c_proj, rearrange(out, "b t h dh -> b t (h dh)")), kv


class GPT2MLP(nnx.Module):
    """``c_proj(gelu(c_fc(x)))``."""

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        self.approximate = ACTIVATIONS[config.activation]
        self.c_fc = _linear(config, config.d_model, config.intermediate_size, rngs=rngs)
        self.c_proj = _linear(config, config.intermediate_size, config.d_model, rngs=rngs)

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        return per_token(lambda t: self.c_proj(jax.nn.gelu(self.c_fc(t), approximate=self.approximate)), x)


class GPT2Block(nnx.Module):
    """Pre-norm block: ``h += attn(ln_1(h)); h += mlp(ln_2(h))``."""

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        self.ln_1 = _layer_norm(config, rngs=rngs)
        self.attn = GPT2Attention(config, rngs=rngs)
        self.ln_2 = _layer_norm(config, rngs=rngs)
        self.mlp = GPT2MLP(config, rngs=rngs)

    def __call__(self, h, *, mask, kv: LayerKV | None):
        attended, kv = self.attn(self.ln_1(h), mask=mask, kv=kv)
        h = h + attended
        return h + self.mlp(self.ln_2(h)), kv


class GPT2Model(nnx.Module):
    """Token + position embeddings, the scanned blocks and ``ln_f``: tokens -> final hidden states."""

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        self.config = config
        embed = dict(dtype=config.compute_jnp_dtype, param_dtype=config.param_jnp_dtype, embedding_init=_INIT,
                     rngs=rngs)
        self.wte = nnx.Embed(config.vocab_size, config.d_model, **embed)
        self.wpe = nnx.Embed(config.max_position_embeddings, config.d_model, **embed)

        @nnx.split_rngs(splits=config.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked_blocks(rngs: nnx.Rngs) -> GPT2Block:
            return GPT2Block(config, rngs=rngs)

        self.h = stacked_blocks(rngs)
        self.ln_f = _layer_norm(config, rngs=rngs)

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        *,
        positions: Int[Array, "B T"] | None = None,
        attention_mask: Array | None = None,
        segment_ids: Int[Array, "B T"] | None = None,
        cache: KVCache | None = None,
        branch_ids: Int[Array, "B T"] | None = None,
    ) -> tuple[Float[Array, "B T D"], KVCache | None]:
        """Final (normed) hidden states; arguments as :meth:`GPT2LMHeadModel.__call__`."""
        config = self.config
        inputs = attention_inputs(tokens, positions=positions, attention_mask=attention_mask,
                                  segment_ids=segment_ids, cache=cache, vocab_size=config.vocab_size,
                                  branch_ids=branch_ids)
        n_positions = config.max_position_embeddings
        check_in_range(inputs.positions, inputs.real, n_positions, "position", "n_positions")
        hidden = (self.wte(clip_index(tokens, config.vocab_size))
                  + self.wpe(clip_index(inputs.positions, n_positions)))
        hidden, kv = scan_layers(self.h, hidden, inputs.kv, n_layers=config.n_layers, remat=config.remat,
                                 remat_policy=config.remat_policy, mask=inputs.mask)
        hidden = self.ln_f(hidden)
        return hidden, None if cache is None else advance_cache(cache, inputs, kv)


class GPT2LMHeadModel(CausalLM):
    """:class:`GPT2Model` plus the vocabulary projection (tied to ``wte`` unless the config says otherwise).

    ``positions`` index the learned position table, so they must stay below ``max_position_embeddings``: a
    real token past it raises a ``ValueError`` on concrete inputs and reads the table's last row inside ``jit``.
    """

    def __init__(self, config: GPT2Config, *, rngs: nnx.Rngs):
        self.config = config
        self.transformer = GPT2Model(config, rngs=rngs)
        self.lm_head = (None if config.tie_word_embeddings
                        else _linear(config, config.d_model, config.vocab_size, bias=False, rngs=rngs))

    @property
    def model(self) -> GPT2Model:
        """The trunk, under the name :class:`jaxalign.models.RewardModel` users reach for on any LM."""
        return self.transformer

    @property
    def trunk(self) -> GPT2Model:
        return self.transformer

    def tied_embedding(self) -> Float[Array, "V D"]:
        return self.transformer.wte.embedding[...]
