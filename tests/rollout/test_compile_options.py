"""The decode loops' compile options: applied on the CPUs measured to gain, dropped where the compiler does not
know them."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.rollout import compile_options
from jaxalign.rollout.compile_options import (
    CPU_DECODE_OPTIONS,
    DecodeJit,
    accepted_decode_options,
    cpu_flags,
    decode_compiler_options,
    decode_jit,
    gains_on_this_cpu,
)

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the options are the CPU compiler's")


def skinny_product(x, w, *, scale):
    # No reduction after the product: YNNPACK's reduction fusions (kept) would take it along.
    return scale * jnp.tanh(x @ w)


def dot_fusions(compiled_text: str) -> list[str]:
    """The dot products XLA handed to YNNPACK (``__ynn_fusion`` fusions that contain a ``dot``)."""
    computations = dict(re.findall(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", compiled_text, re.M | re.S))
    fusions = [re.search(r"calls=%?([\w.\-]+)", line).group(1)
               for line in compiled_text.splitlines() if '"kind":"__ynn_fusion"' in line]
    return [name for name in fusions if " dot(" in computations.get(name, "")]


@pytest.fixture
def operands():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.normal(size=(16, 64)), jnp.float32), jnp.asarray(rng.normal(size=(64, 256)), jnp.float32)


@pytest.fixture
def avx2_cpu(monkeypatch):
    """This process as if on the AVX2 CPU the options were measured to gain on, whatever it runs on."""
    monkeypatch.setattr(compile_options, "cpu_flags", lambda: frozenset({"sse4_2", "avx", "avx2", "fma"}))
    decode_compiler_options.cache_clear()
    yield
    decode_compiler_options.cache_clear()


def test_options_accepted_by_the_installed_compiler():
    assert accepted_decode_options() == CPU_DECODE_OPTIONS


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma\n\n"
                       "processor\t: 1\nflags\t\t: fpu sse2 avx avx2 fma\n")
    assert cpu_flags(cpuinfo) == {"fpu", "sse2", "avx", "avx2", "fma"}
    assert cpu_flags(tmp_path / "absent") == frozenset()
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd\n")  # ARM lists "Features"
    assert cpu_flags(cpuinfo) == frozenset()


@pytest.fixture
def fresh_option_cache():
    """Whatever a test makes decode_compiler_options() cache is gone after it, passed or failed."""
    decode_compiler_options.cache_clear()
    yield
    decode_compiler_options.cache_clear()


def test_options_only_on_cpus_measured_to_gain(fresh_option_cache, monkeypatch):
    assert gains_on_this_cpu(frozenset({"avx", "avx2", "fma"}))
    assert not gains_on_this_cpu(frozenset({"avx", "avx2", "avx512f", "amx_tile"}))  # the Xeon: slower
    assert not gains_on_this_cpu(frozenset({"fp", "asimd"})) and not gains_on_this_cpu(frozenset())
    for flags, expected in ((frozenset({"avx2"}), CPU_DECODE_OPTIONS), (frozenset({"avx2", "avx512f"}), {})):
        monkeypatch.setattr(compile_options, "cpu_flags", lambda flags=flags: flags)
        decode_compiler_options.cache_clear()
        assert decode_compiler_options() == expected


def test_decode_jit_compiles_products_without_ynnpack_and_computes_the_same(avx2_cpu, operands):
    x, w = operands
    program = DecodeJit(skinny_product, static_argnames="scale")
    default, decode = program.for_rows(2), program.for_rows(16)
    assert default is program.for_rows(64) and decode is program.for_rows(8)
    assert dot_fusions(default.lower(x, w, scale=2.0).compile().as_text()), "the default should use YNNPACK's dot"
    assert not dot_fusions(decode.lower(x, w, scale=2.0).compile().as_text())
    np.testing.assert_allclose(decode(x, w, scale=2.0), default(x, w, scale=2.0), rtol=1e-5, atol=1e-5)
    # The wrapper keeps the function's identity (its name is what compile-count tests and traces show).
    assert program.__name__ == "skinny_product" and program.__wrapped__ is skinny_product
    assert decode_jit(static_argnames="scale")(skinny_product).for_rows(16)(x, w, scale=2.0).shape == (16, 256)


def test_unknown_option_falls_back_to_defaults(avx2_cpu, monkeypatch, operands):
    monkeypatch.setattr(compile_options, "CPU_DECODE_OPTIONS",
                        {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_NO_SUCH_KIND"})
    accepted_decode_options.cache_clear()
    try:
        assert accepted_decode_options() == {} and decode_compiler_options() == {}
        x, w = operands
        program = DecodeJit(skinny_product, static_argnames="scale")
        assert program.for_rows(16) is program.default
        assert program.for_rows(16)(x, w, scale=1.0).shape == (16, 256)
    finally:
        accepted_decode_options.cache_clear()


def test_sampler_picks_the_program_by_decoded_rows(sampler, avx2_cpu, monkeypatch):
    from jaxalign.rollout import SamplingParams, engine

    # `tuned` is a cached property of the module-level program: made afresh here for the AVX2 CPU, and the
    # real CPU's (or none) put back afterwards.
    cached = engine._generate.__dict__.pop("tuned", None)
    asked = []
    pick = engine._generate.for_rows
    monkeypatch.setattr(engine._generate, "for_rows", lambda rows: asked.append(rows) or pick(rows))
    prompts = [[1, 2, 3], [4, 5], [6]]  # 3 prompts: the batch bucket of 4 rows
    try:
        for n in (1, 4):
            sampler.generate(prompts, key=jax.random.key(0), params=SamplingParams(max_new_tokens=2, n=n))
        assert asked == [4, 16]
        assert pick(4) is engine._generate.default
        assert pick(16) is engine._generate.tuned is not engine._generate.default
    finally:
        engine._generate.__dict__.pop("tuned", None)
        if cached is not None:
            engine._generate.__dict__["tuned"] = cached
