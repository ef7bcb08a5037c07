"""A frozen linear kernel stored quantised (NF4 or int8) and dequantised inside the product.

:class:`QuantizedKernel` holds the storage of :mod:`jaxalign.models.quant_numerics` as :class:`QuantizedWeight`
Variables; :class:`QuantizedLinear` is an ``nnx.Linear`` whose kernel is one. A LoRA adapter goes on top of
either (:class:`jaxalign.models.LoRALinear` keeps the quantised kernel as its ``kernel``).
:func:`jaxalign.models.quantize_model` builds them; this module only defines what they hold and compute.

The storage is not an ``nnx.Param``: ``nnx.Optimizer(model, tx, wrt=nnx.Param)``, ``nnx.grad`` over ``nnx.Param``
and the train core's trainable filters never select it, and :data:`WEIGHTS` (Params and quantised storage) is what
the sharding rules and the frozen side of a training step take.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from jaxalign.models import quant_numerics
from jaxalign.models.quant_numerics import STORAGE


class QuantizedWeight(nnx.Variable):
    """One array of a quantised kernel's storage (codes, block scales): frozen, never an optimizer's parameter."""


WEIGHTS = nnx.Any(nnx.Param, QuantizedWeight)
"""Every weight of a model: its ``nnx.Param`` variables and its quantised storage (the filter the sharding rules,
the layer scan and a training step's frozen side take)."""


class QuantizedKernel(nnx.Module):
    """A kernel ``[..., in, out]`` held as its NF4 or int8 storage (a leading ``[L]`` in the stacked layers).

    Attributes:
        quant_type: ``"nf4"`` or ``"int8"``.
        block_size: inputs per NF4 block (None for int8).
        double_quant: whether the NF4 block scales are quantised again (always False for int8).
        dtype: the dtype of the dequantised kernel in the product (the compute dtype).
        param_dtype: the dtype of the kernel it replaced; what :meth:`dequantize` returns for export.
    """

    def __init__(self, stored: dict[str, Array], *, quant_type: str, block_size: int | None, double_quant: bool,
                 dtype, param_dtype):
        names = STORAGE[(quant_type, double_quant)]
        if set(stored) != set(names):
            raise ValueError(f"{quant_type} storage (double_quant={double_quant}) holds {list(names)}, "
                             f"got {sorted(stored)}")
        for name in names:
            setattr(self, name, QuantizedWeight(stored[name]))
        self.quant_type, self.block_size, self.double_quant = quant_type, block_size, double_quant
        self.dtype, self.param_dtype = jnp.dtype(dtype), jnp.dtype(param_dtype)

    def stored(self) -> dict[str, Array]:
        """The storage arrays by name."""
        return {name: getattr(self, name)[...] for name in STORAGE[(self.quant_type, self.double_quant)]}

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical kernel shape ``(..., in, out)``."""
        shape = self.codes.get_value().shape  # an abstract value too (under nnx.eval_shape)
        n_in = 2 * shape[-2] if self.quant_type == "nf4" else shape[-2]
        return (*shape[:-2], n_in, shape[-1])

    def dequantize(self, dtype=None) -> Float[Array, "*lead in out"]:
        """The kernel in ``dtype`` (default: the compute dtype), computed in float32."""
        return quant_numerics.dequantize(self.stored(), quant_type=self.quant_type, block_size=self.block_size,
                                         dtype=self.dtype if dtype is None else dtype)

    def __getitem__(self, index):
        """``kernel[...]`` reads the dequantised kernel, as it reads an ``nnx.Param``'s value."""
        if index is not Ellipsis:
            raise TypeError("a quantised kernel is read whole: kernel[...]")
        return self.dequantize()

    def matmul(self, x: Float[Array, "... in"]) -> Float[Array, "... out"]:
        """``x · W`` in the compute dtype, returned in ``x``'s dtype; ``W`` dequantised inside the product.

        The backward pass dequantises again instead of keeping ``W`` from the forward (bitsandbytes'
        ``MatMul4Bit`` does the same): between the two only the quantised storage stays alive. The storage gets no
        gradient.
        """
        spec = (self.quant_type, self.block_size, self.dtype)
        return _product(spec, x.astype(self.dtype), self.stored()).astype(x.dtype)


def _dequantized(spec, stored):
    quant_type, block_size, dtype = spec
    return quant_numerics.dequantize(stored, quant_type=quant_type, block_size=block_size, dtype=dtype)


def _dot(x, kernel):
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _product(spec, x, stored):
    return _dot(x, _dequantized(spec, stored))


def _product_forward(spec, x, stored):
    return _dot(x, _dequantized(spec, stored)), stored


def _product_backward(spec, stored, grad_out):
    kernel = _dequantized(spec, stored)
    grad_x = jax.lax.dot_general(grad_out, kernel, (((grad_out.ndim - 1,), (1,)), ((), ())))
    return grad_x, None


_product.defvjp(_product_forward, _product_backward)


class QuantizedLinear(nnx.Module):
    """``y = x·W + b`` with ``W`` a :class:`QuantizedKernel` and ``b`` a (float, frozen) ``nnx.Param`` or None.

    The same computation as the ``nnx.Linear`` it replaces with ``W`` dequantised: inputs cast to ``dtype``,
    the product in the kernel's compute dtype, the bias added in ``dtype``.
    """

    def __init__(self, kernel: QuantizedKernel, bias: nnx.Param | None, *, dtype):
        self.kernel, self.bias, self.dtype = kernel, bias, jnp.dtype(dtype)

    def __call__(self, x: Float[Array, "... in"]) -> Float[Array, "... out"]:
        x = x.astype(self.dtype)
        y = self.kernel.matmul(x)
        if self.bias is not None:
            y += jnp.reshape(self.bias[...].astype(self.dtype), (1,) * (y.ndim - 1) + (-1,))
        return y
