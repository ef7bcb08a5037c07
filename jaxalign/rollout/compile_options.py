"""How the Sampler's loop is compiled: on AVX2 CPUs, at 8 to 16 rows, its matrix products without YNNPACK.

A decode step multiplies a few rows (one per sequence) by every weight matrix. XLA:CPU hands its dot products
to YNNPACK by default; on some CPUs, at some row counts, XLA's own (Eigen) kernels run a decode step faster.
jax 0.10.2, SmolLM2-135M, 64 new tokens with top-p 0.9: both programs compiled in one process and called
alternately, the decode step's median over 5 calls (benchmarks/README.md)::

    rows                                   4         8         16        32
    2 AMD EPYC cores (AVX2)
      XLA's defaults                    70.5 ms  111.2 ms  120.7 ms  181.1 ms
      YNNPACK dots off                 110.7 ms   80.7 ms   92.7 ms  179.0 ms
    2 Intel Xeon cores (AVX-512, AMX)
      XLA's defaults                    47.9 ms   59.9 ms   78.5 ms  112.9 ms
      YNNPACK dots off                 180.6 ms   90.5 ms  108.2 ms  146.8 ms

so :data:`ROWS` takes the options on x86 CPUs with AVX2 and without AVX-512 (:func:`gains_on_this_cpu`), and
every other row count and CPU (AVX-512, including AMD's Zen 4; ARM; none of them measured to gain) keeps XLA's
defaults. On the EPYC the 30 layers' products alone (no attention, norms or sampling) gain from 3 to 40 rows
and lose at 2 and 48; the whole step at 4 rows loses anyway. Training's products (hundreds of rows) keep the
defaults: an SFT step measured 3.77 s with them and 3.95 s without YNNPACK's dots there.

:data:`CPU_DECODE_OPTIONS` keeps YNNPACK's reductions (its other default fusion; a product that feeds a
reduction goes along with it, e.g. a logsumexp's) and names the fusion kinds that stay rather than removing
one, because XLA's compile options replace the whole list. Without YNNPACK at all the EPYC's 16-row step
measured 99.9 ms against 89.3 (medians of 7, alternated). Where the installed jaxlib does not know the option,
or the backend is not the CPU, every row count compiles with the defaults.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

# YNNPACK keeps the fusions it runs by default apart from the dot products (individual and fused).
CPU_DECODE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
# Decoded rows (prompts × samples, after bucketing) whose loop compiles with CPU_DECODE_OPTIONS.
ROWS = range(8, 17)


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The instruction-set flags the kernel lists for the first CPU (empty where there is no such file)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def gains_on_this_cpu(flags: frozenset[str]) -> bool:
    """Whether a CPU with these flags is of the kind :data:`CPU_DECODE_OPTIONS` was measured to speed up: x86
    with AVX2 and without AVX-512 (the EPYC above; the AVX-512 Xeon lost at every row count)."""
    return "avx2" in flags and "avx512f" not in flags


@functools.cache
def accepted_decode_options() -> dict[str, str]:
    """:data:`CPU_DECODE_OPTIONS` when the default backend is the CPU and its compiler accepts them, else ``{}``
    (whatever the CPU: benchmarks time both option sets)."""
    if jax.default_backend() != "cpu":
        return {}
    try:
        jax.jit(lambda x: x + 1).lower(np.float32(0)).compile(CPU_DECODE_OPTIONS)
    except Exception:  # an older or newer jaxlib without this option or its value: keep XLA's defaults
        return {}
    return dict(CPU_DECODE_OPTIONS)


@functools.cache
def decode_compiler_options() -> dict[str, str]:
    """The options :data:`ROWS` compile with here: :func:`accepted_decode_options` on a CPU that
    :func:`gains_on_this_cpu`, else ``{}``."""
    return dict(accepted_decode_options()) if gains_on_this_cpu(cpu_flags()) else {}


class DecodeJit:
    """``jax.jit(fun, **jit_kwargs)``, and the same compiled with :func:`decode_compiler_options` for
    :data:`ROWS`; :meth:`for_rows` picks one.

    The options depend on the backend, which must not be started when jaxalign is imported, so both jitted
    functions are made when first asked for, and kept.
    """

    def __init__(self, fun: Callable, **jit_kwargs: Any):
        functools.update_wrapper(self, fun)  # sets __wrapped__ = fun
        self._jit_kwargs = jit_kwargs

    @functools.cached_property
    def default(self) -> Callable:
        return jax.jit(self.__wrapped__, **self._jit_kwargs)

    @functools.cached_property
    def tuned(self) -> Callable:
        options = decode_compiler_options()
        return jax.jit(self.__wrapped__, compiler_options=options, **self._jit_kwargs) if options else self.default

    def for_rows(self, rows: int) -> Callable:
        """The jitted function to run ``rows`` decoded rows with."""
        return self.tuned if rows in ROWS else self.default


def decode_jit(**jit_kwargs: Any) -> Callable[[Callable], DecodeJit]:
    """Decorator form of :class:`DecodeJit`: ``@decode_jit(static_argnames=(...))``."""
    return lambda fun: DecodeJit(fun, **jit_kwargs)
