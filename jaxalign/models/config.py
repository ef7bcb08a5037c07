"""Model configuration for the Llama family, read from and written back to a Hugging Face ``config.json``.

``ModelConfig.from_hf`` accepts Llama 2/3 (incl. ``llama3`` and ``linear`` RoPE scaling), SmolLM2,
Mistral (uniform sliding window) and Qwen2 (q/k/v bias). Every key of the JSON is either understood and
used, or listed in :data:`IGNORED_HF_KEYS` because it cannot change the forward pass (dtype hints,
generation defaults, bookkeeping). Anything else raises a ``ValueError`` naming the key: a config we only
half understand would load a different model than transformers does, silently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

# model_type -> the transformers class whose numerics we reproduce.
HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

DTYPES = ("float32", "bfloat16", "float16")

# Names of jax.checkpoint policies for the per-layer remat of the scanned decoder stack.
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
# How a Llama-family model attends over more than one new token (training, scoring, prefill); a decode step's
# one query always runs ``llama.grouped_attention``. "cudnn" is cuDNN's fused (flash) attention on NVIDIA GPUs,
# for bfloat16/float16 compute; "auto" picks it for training and scoring rows on such GPUs
# (``llama.Attention.attend``).
ATTENTION_IMPLEMENTATIONS = ("auto", "grouped", "cudnn")

# Keys that never change the forward pass: dtype/version hints, generation defaults written by older
# transformers versions, classification-head labels, nanotron bookkeeping (SmolLM2's ``is_llama_config``).
IGNORED_HF_KEYS = frozenset(
    {
        "_name_or_path", "_commit_hash", "_attn_implementation_autoset", "torch_dtype", "dtype",
        "transformers_version", "use_cache", "initializer_range", "pretraining_tp", "is_llama_config",
        "id2label", "label2id", "problem_type", "finetuning_task", "tokenizer_class", "prefix",
        "task_specific_params", "return_dict", "output_attentions", "output_hidden_states", "torchscript",
        "use_bfloat16", "tf_legacy_loss", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
        "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder",
        "decoder_start_token_id", "sep_token_id", "max_length", "min_length", "do_sample",
        "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k",
        "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
        "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
        "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    }
)

_COMMON_KEYS = frozenset(
    {
        "model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size",
        "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
        "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
        "partial_rotary_factor", "rope_interleaved", "tie_word_embeddings", "attention_dropout",
        "bos_token_id", "eos_token_id", "pad_token_id",
    }
)
_ARCHITECTURE_KEYS = {
    "llama": _COMMON_KEYS | {"attention_bias", "mlp_bias"},
    "mistral": _COMMON_KEYS | {"sliding_window", "layer_types"},
    "qwen2": _COMMON_KEYS | {"sliding_window", "use_sliding_window", "max_window_layers", "layer_types"},
}

_ROPE_SCALING_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}

# transformers' MistralConfig and Qwen2Config default ``sliding_window`` to 4096 (5.x, as 4.x): a config.json
# without the key gets that window, one with ``"sliding_window": null`` gets none.
TRANSFORMERS_DEFAULT_SLIDING_WINDOW = 4096

_REQUIRED = object()
_KINDS = {int: "an int", float: "a number", bool: "a boolean (true/false)", str: "a string", list: "a list",
          Mapping: "a JSON object"}


def hf_field(hf: Mapping[str, Any], key: str, kind: type, default: Any = _REQUIRED, *,
             positive: bool = False, file: str = "config.json") -> Any:
    """``hf[key]`` checked to be of JSON type ``kind``; ``default`` when absent or null (required without one).

    ``int`` rejects booleans and floats; ``float`` accepts ints (JSON ``1`` for ``1.0``) and returns a float;
    ``positive`` also requires ``> 0``. Every error is a ``ValueError`` naming ``file``, the key, the
    expected type and the value found, so a hand-edited or truncated config.json never ends in a bare
    ``KeyError``/``TypeError``.
    """
    found = hf.get(key)
    expected = ("a positive " + _KINDS[kind].removeprefix("an ").removeprefix("a ")) if positive else _KINDS[kind]
    if found is None:
        if default is _REQUIRED:
            state = "is missing" if key not in hf else "is null"
            raise ValueError(f"{file}: required key {key!r} ({expected}) {state}")
        return default
    if kind is float:
        ok = isinstance(found, (int, float)) and not isinstance(found, bool)
    elif kind is int:
        ok = isinstance(found, int) and not isinstance(found, bool)
    elif kind is list:  # a tuple too, for dicts built in Python rather than parsed from JSON
        ok = isinstance(found, (list, tuple))
    else:
        ok = isinstance(found, kind)
    if ok and positive and not found > 0:
        ok = False
    if not ok:
        raise ValueError(f"{file}: {key} must be {expected}, got {found!r} ({type(found).__name__})")
    return float(found) if kind is float else found


def hf_token_ids(hf: Mapping[str, Any], key: str, *, file: str = "config.json") -> tuple[int, ...]:
    """A token-id key that may hold one id, a list of ids or null (``eos_token_id``), as a tuple."""
    found = hf.get(key)
    ids = [] if found is None else found if isinstance(found, (list, tuple)) else [found]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{file}: {key} must be a token id, a list of token ids or null, got {found!r}")
    return tuple(ids)


def check_hf_mapping(hf: Any, *, file: str = "config.json") -> None:
    if not isinstance(hf, Mapping):
        raise ValueError(f"{file}: expected a JSON object of settings, got {type(hf).__name__}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling (transformers' ``rope_parameters`` / legacy ``rope_scaling``).

    ``kind="linear"`` divides every inverse frequency by ``factor`` (position interpolation).
    ``kind="llama3"`` divides the low frequencies by ``factor``, keeps the high ones, and interpolates in
    between (Llama 3.1); it needs the three remaining fields.
    """

    kind: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self):
        if self.kind not in ("linear", "llama3"):
            raise ValueError(f"RopeScaling.kind must be 'linear' or 'llama3', got {self.kind!r}")
        if self.factor <= 0:
            raise ValueError(f"RopeScaling.factor must be > 0, got {self.factor}")
        if self.kind == "llama3":
            if None in (self.low_freq_factor, self.high_freq_factor, self.original_max_position_embeddings):
                raise ValueError(
                    "llama3 RoPE scaling needs low_freq_factor, high_freq_factor and "
                    "original_max_position_embeddings"
                )
            if not self.high_freq_factor > self.low_freq_factor:
                raise ValueError(
                    f"llama3 RoPE scaling needs high_freq_factor > low_freq_factor, got "
                    f"{self.high_freq_factor} <= {self.low_freq_factor}"
                )

    def to_hf(self) -> dict[str, Any]:
        """The ``rope_scaling`` dict of a transformers ``config.json``."""
        out: dict[str, Any] = {"rope_type": self.kind, "factor": self.factor}
        if self.kind == "llama3":
            out |= {
                "low_freq_factor": self.low_freq_factor,
                "high_freq_factor": self.high_freq_factor,
                "original_max_position_embeddings": self.original_max_position_embeddings,
            }
        return out


class ExecutionPolicy:
    """The execution-policy fields shared by every model config (``param_dtype``, ``compute_dtype``,
    ``remat``): how to run a checkpoint, not what it is. Mixed into the frozen config dataclasses."""

    param_dtype: str
    compute_dtype: str
    remat: str

    def _validate_policy(self) -> None:
        name = type(self).__name__
        for field in ("param_dtype", "compute_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(f"{name}.{field} must be one of {DTYPES}, got {getattr(self, field)!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"{name}.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")

    @property
    def param_jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @property
    def compute_jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.compute_dtype)

    @property
    def remat_policy(self):
        """The ``jax.checkpoint`` policy for ``remat`` (None for ``"full"``: save nothing)."""
        return {
            "none": None,
            "full": None,
            "dots": jax.checkpoint_policies.checkpoint_dots,
            "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        }[self.remat]

    def with_policy(self, *, param_dtype: str | None = None, compute_dtype: str | None = None,
                    remat: str | None = None, **more: str | None):
        """Copy with a different dtype/remat policy (the architecture is unchanged); ``more``: a config's own
        policy fields (``attention`` of :class:`ModelConfig`)."""
        changes = {"param_dtype": param_dtype, "compute_dtype": compute_dtype, "remat": remat, **more}
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def same_architecture(self, other) -> bool:
        """True when both configs describe the same weights (dtype, remat and attention policy aside)."""
        policy = {"param_dtype": "float32", "compute_dtype": "float32", "remat": "none"}
        if hasattr(self, "attention"):
            policy["attention"] = "auto"
        return type(self) is type(other) and (
            dataclasses.replace(self, **policy) == dataclasses.replace(other, **policy))


@dataclasses.dataclass(frozen=True)
class ModelConfig(ExecutionPolicy):
    """Architecture and dtype policy of a Llama-family causal LM (frozen, hashable, validated).

    The architecture fields mirror transformers' names in short form (``d_model`` = ``hidden_size``,
    ``n_kv_heads`` = ``num_key_value_heads``...). The last four fields are jaxalign's execution policy,
    not part of the checkpoint:

    - ``param_dtype``: storage dtype of the parameters.
    - ``compute_dtype``: dtype of activations and matmul inputs (``"bfloat16"`` on GPU/TPU; keep
      ``"float32"`` on CPU, where bf16 is slower). RMSNorm statistics, the attention softmax and the
      logits are float32 whatever this is.
    - ``remat``: per-layer rematerialisation of the scanned decoder stack, one of :data:`REMAT_POLICIES`
      (``"full"`` recomputes the whole layer in the backward pass, ``"dots"`` saves matmul outputs,
      ``"dots_no_batch"`` saves only matmuls without batch dimensions, i.e. the weight projections).
    - ``attention``: one of :data:`ATTENTION_IMPLEMENTATIONS`, how more than one new token attends
      (``"grouped"``: :func:`jaxalign.models.llama.grouped_attention`, for rows without a cache on CPUs in causal
      blocks, :func:`jaxalign.models.llama.causal_block_attention`; ``"cudnn"``: cuDNN's fused attention,
      NVIDIA GPUs with bfloat16/float16 compute only; ``"auto"``: cuDNN for training and scoring rows on such a
      GPU, grouped elsewhere; see :meth:`jaxalign.models.llama.Attention.attend`).
    """

    architecture: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"
    attention: str = "auto"

    def __post_init__(self):
        if self.architecture not in HF_ARCHITECTURES:
            raise ValueError(
                f"ModelConfig.architecture {self.architecture!r} is not supported; "
                f"expected one of {sorted(HF_ARCHITECTURES)}"
            )
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("rms_norm_eps and rope_theta must be > 0")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be a positive int or None, got {self.sliding_window}")
        if not isinstance(self.eos_token_ids, tuple):
            raise ValueError(f"eos_token_ids must be a tuple, got {type(self.eos_token_ids).__name__}")
        self._validate_policy()
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"ModelConfig.attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {self.attention!r}")
        if self.attention == "cudnn" and self.compute_dtype == "float32":
            raise ValueError("ModelConfig.attention 'cudnn' needs compute_dtype bfloat16 or float16 (cuDNN's fused "
                             "attention has no float32 kernel)")
        # Each architecture has a fixed bias pattern in transformers; another pattern has no config.json.
        biases = (self.qkv_bias, self.o_bias, self.mlp_bias)
        allowed = {
            "llama": self.qkv_bias == self.o_bias,
            "mistral": biases == (False, False, False),
            "qwen2": biases == (True, False, False),
        }[self.architecture]
        if not allowed:
            raise ValueError(
                f"{self.architecture} cannot express biases (qkv={self.qkv_bias}, o={self.o_bias}, "
                f"mlp={self.mlp_bias})"
            )
        if self.architecture == "llama" and self.sliding_window is not None:
            raise ValueError("the llama architecture has no sliding window; use architecture='mistral'")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], *, param_dtype: str = "float32",
                compute_dtype: str = "float32", remat: str = "none", attention: str = "auto") -> ModelConfig:
        """Build from a parsed Hugging Face ``config.json``.

        Raises:
            ValueError: unsupported ``model_type``/``architectures``, a key that is neither understood
                nor known to be irrelevant to the forward pass, or a value we do not implement
                (another activation, RoPE type, dropout, per-layer sliding windows...). The message
                names the key.
        """
        check_hf_mapping(hf)
        model_type = hf.get("model_type")
        if model_type not in HF_ARCHITECTURES:
            raise ValueError(
                f"config.json: model_type {model_type!r} is not supported; expected one of "
                f"{sorted(HF_ARCHITECTURES)} (GPT-2 and others are separate model classes)"
            )
        architectures = hf_field(hf, "architectures", list, None)
        if architectures is not None and list(architectures) != [HF_ARCHITECTURES[model_type]]:
            raise ValueError(
                f"config.json: architectures {architectures!r} is not a causal LM we implement; "
                f"expected [{HF_ARCHITECTURES[model_type]!r}]"
            )
        unknown = sorted(set(hf) - _ARCHITECTURE_KEYS[model_type] - IGNORED_HF_KEYS)
        if unknown:
            raise ValueError(
                f"config.json: key(s) {unknown} are not understood for model_type {model_type!r}; they may "
                "change the model, so loading stops instead of ignoring them"
            )

        hidden_act = hf_field(hf, "hidden_act", str, "silu")
        if hidden_act not in ("silu", "swish"):
            raise ValueError(f"config.json: hidden_act {hidden_act!r} is not supported (only silu)")
        attention_dropout = hf_field(hf, "attention_dropout", float, 0.0)
        if attention_dropout != 0.0:
            raise ValueError(
                f"config.json: attention_dropout={attention_dropout} is not implemented "
                "(jaxalign models have no dropout); set it to 0.0"
            )
        if hf_field(hf, "rope_interleaved", bool, False):
            raise ValueError("config.json: rope_interleaved=true (GPT-J style RoPE) is not supported")
        if hf_field(hf, "partial_rotary_factor", float, 1.0) != 1.0:
            raise ValueError("config.json: partial_rotary_factor != 1.0 is not supported")

        d_model = hf_field(hf, "hidden_size", int, positive=True)
        n_heads = hf_field(hf, "num_attention_heads", int, positive=True)
        n_layers = hf_field(hf, "num_hidden_layers", int, positive=True)
        rope_theta, rope_scaling = _parse_rope(hf)
        if model_type == "qwen2":
            biases = {"qkv_bias": True, "o_bias": False, "mlp_bias": False}
        else:
            attention_bias = hf_field(hf, "attention_bias", bool, False)
            biases = {"qkv_bias": attention_bias, "o_bias": attention_bias,
                      "mlp_bias": hf_field(hf, "mlp_bias", bool, False)}
        return cls(
            architecture=model_type,
            vocab_size=hf_field(hf, "vocab_size", int, positive=True),
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=hf_field(hf, "num_key_value_heads", int, n_heads, positive=True),
            head_dim=hf_field(hf, "head_dim", int, d_model // n_heads, positive=True),
            intermediate_size=hf_field(hf, "intermediate_size", int, positive=True),
            rms_norm_eps=hf_field(hf, "rms_norm_eps", float, 1e-6, positive=True),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=hf_field(hf, "tie_word_embeddings", bool, False),
            sliding_window=_parse_sliding_window(hf, model_type, n_layers),
            max_position_embeddings=hf_field(hf, "max_position_embeddings", int, 2048, positive=True),
            bos_token_id=hf_field(hf, "bos_token_id", int, None),
            eos_token_ids=hf_token_ids(hf, "eos_token_id"),
            pad_token_id=hf_field(hf, "pad_token_id", int, None),
            param_dtype=param_dtype,
            compute_dtype=compute_dtype,
            remat=remat,
            attention=attention,
            **biases,
        )

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` dict transformers (5.x, and 4.x via the legacy rope keys) loads."""
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope_parameters |= self.rope_scaling.to_hf()
        eos: Any = list(self.eos_token_ids)
        out: dict[str, Any] = {
            "architectures": [HF_ARCHITECTURES[self.architecture]],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope_parameters,
            # Legacy spelling for transformers 4.x and vLLM versions that predate rope_parameters.
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else self.rope_scaling.to_hf(),
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": self.pad_token_id,
            "dtype": self.param_dtype,
        }
        if self.architecture == "llama":
            out |= {"attention_bias": self.qkv_bias, "mlp_bias": self.mlp_bias}
        elif self.architecture == "mistral":
            out |= {"sliding_window": self.sliding_window}
        else:  # qwen2: max_window_layers=0 makes every layer use the window when there is one.
            out |= {"use_sliding_window": self.sliding_window is not None,
                    "sliding_window": self.sliding_window, "max_window_layers": 0}
        return out


def _parse_rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """``(rope_theta, scaling)`` from transformers 5's ``rope_parameters`` or 4.x ``rope_theta``/``rope_scaling``."""
    legacy = _rope_dict(hf, "rope_scaling")
    current = _rope_dict(hf, "rope_parameters")
    if legacy and current and legacy != current:
        raise ValueError(f"config.json: rope_scaling {legacy!r} and rope_parameters {current!r} disagree")
    key = "rope_parameters" if current else "rope_scaling"
    params = current or legacy or {"rope_type": "default"}
    kind = params.pop("rope_type")
    if params.pop("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"config.json: {key}.partial_rotary_factor != 1.0 is not supported")
    if kind not in _ROPE_SCALING_KEYS:
        raise ValueError(
            f"config.json: {key}.rope_type {kind!r} is not supported; expected one of "
            f"{sorted(_ROPE_SCALING_KEYS)}"
        )
    unknown = sorted(set(params) - _ROPE_SCALING_KEYS[kind])
    if unknown:
        raise ValueError(f"config.json: {key} key(s) {unknown} are not understood for rope_type {kind!r}")
    thetas = {t for t in (hf_field(hf, "rope_theta", float, None, positive=True),
                          hf_field(hf.get("rope_parameters") or {}, "rope_theta", float, None, positive=True,
                                   file="config.json: rope_parameters"))
              if t is not None}
    if len(thetas) > 1:
        raise ValueError(f"config.json: rope_theta values {sorted(thetas)} disagree")
    theta = thetas.pop() if thetas else 10_000.0
    if kind == "default":
        return theta, None
    try:
        return theta, RopeScaling(kind=kind, **params)
    except (TypeError, ValueError) as error:
        raise ValueError(f"config.json: {key}: {error}") from None


def _rope_dict(hf: Mapping[str, Any], key: str) -> dict[str, Any]:
    """``hf[key]`` with the spellings transformers accepts unified (``type`` -> ``rope_type``, defaults filled)."""
    params = dict(hf_field(hf, key, Mapping, {}))
    if not params:
        return {}
    if any(isinstance(v, Mapping) for v in params.values()):
        raise ValueError(f"config.json: per-layer-type {key} are not supported")
    params.pop("rope_theta", None)  # compared separately: the legacy spelling keeps it at top level
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    params["rope_type"] = kind
    if kind == "llama3":
        params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return params


def _parse_sliding_window(hf: Mapping[str, Any], model_type: str, n_layers: int) -> int | None:
    """The attention window shared by every layer, or None; per-layer mixes raise."""
    if model_type == "llama":
        return None
    # Absent means transformers' default window; an explicit null means none.
    window = (hf_field(hf, "sliding_window", int, None, positive=True) if "sliding_window" in hf
              else TRANSFORMERS_DEFAULT_SLIDING_WINDOW)
    if model_type == "qwen2":
        if not hf_field(hf, "use_sliding_window", bool, False):
            window = None
        else:
            # transformers' Qwen2 uses the window on layers i >= max_window_layers.
            first_windowed = hf_field(hf, "max_window_layers", int, 28)
            if 0 < first_windowed < n_layers:
                raise ValueError(
                    f"config.json: use_sliding_window with max_window_layers={first_windowed} < "
                    f"num_hidden_layers={n_layers} mixes windowed and full layers, which is not supported"
                )
            if first_windowed >= n_layers:
                window = None
    layer_types = hf_field(hf, "layer_types", list, None)
    if layer_types is not None:
        expected = "sliding_attention" if window is not None else "full_attention"
        if len(layer_types) != n_layers or set(layer_types) != {expected}:
            raise ValueError(
                f"config.json: layer_types {sorted(set(layer_types))} do not match a uniform "
                f"{expected!r} stack of {n_layers} layers (mixed attention types are not supported)"
            )
    return window
