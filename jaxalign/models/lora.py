"""LoRA adapters for the stacked NNX models, selectable per projection, merged into the kernels for export.

``y = x·W + b + (α/r) · dropout(x)·A·B`` with ``A`` ``[in, r]`` and ``B`` ``[r, out]`` (Hu et al. 2021,
arXiv 2106.09685, Eq. 3). ``B`` starts at zero, so an adapted model starts as the base model; ``A``
starts uniform in ``±1/√in`` as PEFT's ``kaiming_uniform_(a=√5)``.

The adapters are ``nnx.LoRAParam`` Variables, a subclass of ``nnx.Param``. The frozen base is then
everything that is a Param but not a LoRAParam (:data:`BASE_PARAMS`). Differentiate or optimise only the
adapters with ``nnx.DiffState(0, nnx.LoRAParam)`` / ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``.

A :class:`LoRALinear` replaces an ``nnx.Linear`` in place and keeps its ``kernel``/``bias`` Variables under
the same names (``q_proj/kernel`` stays ``q_proj/kernel``; ``q_proj/lora_a`` is added). The checkpoint
mapping, the sharding table and the base-parameter state are therefore unchanged. Inside the stacked
``[L]`` layers, the adapters are stacked too, one per layer, and the scan slices them with the rest.

A quantised base (QLoRA: :func:`jaxalign.models.quantize_model`) works in either order: LoRA on a
:class:`~jaxalign.models.quantized.QuantizedLinear` keeps its :class:`~jaxalign.models.quantized.QuantizedKernel`
as ``kernel``, and quantising a :class:`LoRALinear` replaces its ``kernel`` Param by one. The adapters then train
in the replaced kernel's dtype on top of the dequantised product, and :func:`merge_lora` exports
``dequantised W + (α/r)·A·B``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.dtypes import promote_dtype
from jaxtyping import Array, Float

from jaxalign.models.quantized import QuantizedKernel, QuantizedLinear

#: An ``nnx`` filter: everything trainable in a LoRA model except the adapters, i.e. the frozen base.
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))

# PEFT initialises A with kaiming_uniform_(a=√5): uniform in ±1/√fan_in, i.e. variance 1/(3·fan_in).
_A_INIT = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Which projections get adapters, and their size.

    Attributes:
        rank: ``r``, the inner dimension of ``A·B``.
        alpha: the update is scaled by ``alpha / rank`` (PEFT's ``lora_alpha``).
        dropout: dropout rate on the adapter's input (training mode only; 0 disables it).
        targets: projections to adapt, by module name (``q_proj``, ``v_proj``, ``gate_proj``, GPT-2's
            ``c_attn``, ``c_fc``..., and ``lm_head`` when the head is not tied to the embedding) or by a
            dotted path suffix to tell same-named modules apart (GPT-2's ``attn.c_proj`` vs
            ``mlp.c_proj``; plain ``c_proj`` adapts both).
    """

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoRAConfig.rank must be a positive int, got {self.rank!r}")
        if self.alpha <= 0:
            raise ValueError(f"LoRAConfig.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets or isinstance(self.targets, str):
            raise ValueError(f"LoRAConfig.targets must be a non-empty tuple of names, got {self.targets!r}")

    @property
    def scaling(self) -> float:
        """The factor ``alpha / rank`` applied to the adapters' product ``x·A·B``."""
        return self.alpha / self.rank


class LoRALinear(nnx.Module):
    """An ``nnx.Linear`` (its own ``kernel``/``bias`` Variables) plus a low-rank update.

    ``kernel`` ``[..., in, out]``, ``lora_a`` ``[..., in, r]``, ``lora_b`` ``[..., r, out]``; a leading
    ``[L]`` axis when the projection lives in the stacked layers (each call then sees one layer's slice).
    ``kernel`` is a :class:`QuantizedKernel` on a quantised base.
    """

    def __init__(self, base: nnx.Linear | QuantizedLinear, lora_a: nnx.LoRAParam, lora_b: nnx.LoRAParam,
                 dropout: nnx.Dropout | None, scaling: float):
        self.kernel = base.kernel
        self.bias = base.bias
        self.dtype = base.dtype
        self.lora_a, self.lora_b = lora_a, lora_b
        self.lora_dropout = dropout
        self.scaling = scaling

    def __call__(self, x: Float[Array, "... in"]) -> Float[Array, "... out"]:
        # The base term is computed as nnx.Linear (or QuantizedLinear) computes it, so zero adapters give
        # bit-identical outputs.
        bias = None if self.bias is None else self.bias[...]
        if isinstance(self.kernel, QuantizedKernel):
            x, bias, lora_a, lora_b = promote_dtype((x, bias, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
            y = self.kernel.matmul(x)
        else:
            x, kernel, bias, lora_a, lora_b = promote_dtype(
                (x, self.kernel[...], bias, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
            y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        adapter_input = x if self.lora_dropout is None else self.lora_dropout(x)
        return y + self.scaling * (adapter_input @ lora_a @ lora_b)

    def low_rank(self, x: Float[Array, "... in"], *, preferred_element_type=None) -> Float[Array, "... out"]:
        """The adapter term alone, ``(α/r)·dropout(x)·A·B``, with ``A``/``B`` cast to ``x``'s dtype.

        ``preferred_element_type`` sets the matmuls' accumulation dtype (float32 for the LM head's logits).
        """
        adapter_input = x if self.lora_dropout is None else self.lora_dropout(x)
        xa = jnp.matmul(adapter_input, self.lora_a[...].astype(x.dtype), preferred_element_type=preferred_element_type)
        xab = jnp.matmul(xa.astype(x.dtype), self.lora_b[...].astype(x.dtype),
                         preferred_element_type=preferred_element_type)
        return self.scaling * xab

    def merged_kernel(self) -> Array:
        """``W + (α/r)·A·B`` in the kernel's dtype (per layer for stacked kernels); a quantised ``W`` is
        dequantised in float32 and the sum returned in the dtype of the kernel it replaced."""
        delta = jnp.matmul(self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32))
        if isinstance(self.kernel, QuantizedKernel):
            base, dtype = self.kernel.dequantize(jnp.float32), self.kernel.param_dtype
        else:
            base, dtype = self.kernel[...].astype(jnp.float32), self.kernel[...].dtype
        return (base + self.scaling * delta).astype(dtype)


class _Adapter(nnx.Module):
    """One layer's ``A``, ``B`` and dropout, built (vmapped for stacked projections) then moved into LoRALinear."""

    def __init__(self, n_in: int, n_out: int, config: LoRAConfig, param_dtype, *, rngs: nnx.Rngs):
        self.lora_a = nnx.LoRAParam(_A_INIT(rngs.params(), (n_in, config.rank), param_dtype))
        self.lora_b = nnx.LoRAParam(jnp.zeros((config.rank, n_out), param_dtype))
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs) if config.dropout > 0 else None


def _new_adapter(kernel_shape: tuple[int, ...], dtype, config: LoRAConfig, rngs: nnx.Rngs) -> _Adapter:
    """The adapter of a ``[in, out]`` kernel, or of a stacked ``[L, in, out]`` one (one draw per layer)."""
    n_in, n_out = kernel_shape[-2:]

    def build(rngs: nnx.Rngs) -> _Adapter:
        return _Adapter(n_in, n_out, config, dtype, rngs=rngs)

    if len(kernel_shape) == 3:  # built like the stacked layers themselves: split rngs, vmapped init
        build = nnx.split_rngs(splits=kernel_shape[0])(nnx.vmap(build, in_axes=(0,), out_axes=0))
    return build(rngs)


def _matches(path: tuple[str, ...], target: str) -> bool:
    parts = tuple(target.split("."))
    return path[-len(parts):] == parts


def apply_lora(model: nnx.Module, config: LoRAConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Replace the target ``nnx.Linear`` projections of ``model`` by :class:`LoRALinear`, in place.

    Quantised projections (:class:`QuantizedLinear`) are targets too: their adapters get the dtype of the
    kernel that was quantised.

    Args:
        model: a jaxalign LM (or any module holding ``nnx.Linear`` projections, stacked or not).
        config: rank, alpha, dropout and targets.
        rngs: ``params`` draws ``A``; ``dropout`` seeds the adapters' dropout streams (needed when
            ``config.dropout > 0``). Each stacked layer gets its own draws.

    Returns:
        ``model`` (modified in place). Its base parameters are unchanged; until training moves ``B``
        away from zero it computes exactly what it computed before.

    Raises:
        ValueError: a target that names no ``nnx.Linear`` of the model (the available names are listed),
            or ``lm_head`` on a model whose head is tied to the embedding.
    """
    tied_head = [t for t in config.targets if _matches(("lm_head",), t)]
    if tied_head and getattr(model, "lm_head", False) is None:
        raise ValueError(
            f"LoRA target {tied_head[0]!r}: this model's LM head is tied to its token embedding "
            "(tie_word_embeddings=True), so there is no separate head to adapt. An adapter on the shared "
            "matrix would change the input embeddings too, and the merged export could no longer be a "
            "tied checkpoint. Adapt the other projections, or untie the model first (build it with "
            "tie_word_embeddings=False and lm_head.kernel = embedding.T)."
        )
    linears = [(tuple(str(p) for p in path), module) for path, module in nnx.iter_modules(model)
               if type(module) in (nnx.Linear, QuantizedLinear)]
    unmatched = [t for t in config.targets if not any(_matches(path, t) for path, _ in linears)]
    if unmatched:
        available = sorted({".".join(path[-2:]) for path, _ in linears})
        raise ValueError(f"LoRA target(s) {unmatched} match no nnx.Linear of the model; available: {available}")
    for path, linear in linears:
        if not any(_matches(path, t) for t in config.targets):
            continue
        if isinstance(linear, QuantizedLinear):
            shape, dtype = linear.kernel.shape, linear.kernel.param_dtype
        else:
            shape, dtype = linear.kernel[...].shape, linear.kernel[...].dtype
        adapter = _new_adapter(shape, dtype, config, rngs)
        parent = model
        for name in path[:-1]:
            parent = getattr(parent, name)
        setattr(parent, path[-1], LoRALinear(linear, adapter.lora_a, adapter.lora_b, adapter.dropout,
                                             config.scaling))
    return model


def has_lora(model: nnx.Module) -> bool:
    """Whether any of ``model``'s projections carries a LoRA adapter."""
    return any(isinstance(module, LoRALinear) for _, module in nnx.iter_modules(model))


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` without adapters, each adapted kernel replaced by ``W + (α/r)·A·B``.

    Quantised kernels are dequantised (in float32, returned in the dtype of the kernel they replaced), with
    their adapters merged when they have some: the result is the plain float architecture.

    ``model`` must be built as ``type(model)(model.config, rngs=...)`` (the jaxalign LMs), so the
    plain architecture can be rebuilt; ``model`` itself is left untouched. ``save_hf`` calls this.
    """
    state = nnx.state(model, BASE_PARAMS)
    flat = dict(nnx.to_flat_state(state))
    for path, module in nnx.iter_modules(model):
        key = (*path, "kernel")
        if isinstance(module, LoRALinear) and isinstance(module.kernel, QuantizedKernel):
            flat[key] = nnx.Param(module.merged_kernel())
        elif isinstance(module, LoRALinear):
            flat[key] = flat[key].replace(module.merged_kernel())
        elif isinstance(module, QuantizedLinear):
            flat[key] = nnx.Param(module.kernel.dequantize(module.kernel.param_dtype))
    plain = nnx.eval_shape(lambda: type(model)(model.config, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(plain)
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
