"""Tiny random checkpoints (transformers models with large weights, so distributions are peaked) loaded into
jaxalign, the prompts the rollout tests share, and a counter of the engine's compilations.

Most tests sample ``PROMPTS`` with ``N`` new tokens through one session-wide sampler: the compiled loop
then exists once per session (the temperature, filters, stop tokens and keys are traced).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from jax import monitoring

from jaxalign.models import load_hf
from jaxalign.rollout import Sampler
from tests.models.conftest import make_hf_model

V = 97
N = 8
# Three prompts of different lengths (one batch bucket of 4 rows, one length bucket of 16 columns).
PROMPTS = [list(np.random.default_rng(seed).integers(0, V, size=length)) for seed, length in ((1, 3), (2, 7), (3, 5))]
LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


@contextlib.contextmanager
def count_engine_compilations(function: str = "_generate"):
    """Yields a list that collects one entry per compilation (lowering) of the jitted ``function`` (default: the
    engine's loop)."""
    compiled = []

    def on_event(event: str, seconds: float, **kwargs) -> None:
        if event == LOWERING_EVENT and function in str(kwargs.get("fun_name", "")):
            compiled.append(kwargs["fun_name"])

    monitoring.register_event_duration_secs_listener(on_event)
    try:
        yield compiled
    finally:
        monitoring.unregister_event_duration_listener(on_event)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """``checkpoints(arch, seed=0) -> (directory, transformers model)`` written once per session."""
    root = tmp_path_factory.mktemp("rollout_checkpoints")
    saved = {}

    def get(arch: str, seed: int = 0):
        if (arch, seed) not in saved:
            hf_model = make_hf_model(arch, seed=seed)
            directory = root / f"{arch}_{seed}"
            hf_model.save_pretrained(directory)
            saved[arch, seed] = (directory, hf_model)
        return saved[arch, seed]

    return get


@pytest.fixture(scope="session")
def llama(checkpoints):
    """``(jaxalign model, transformers model)``: a 2-layer Llama, V = 97."""
    directory, hf_model = checkpoints("llama")
    return load_hf(directory), hf_model


@pytest.fixture(scope="session")
def guide(checkpoints):
    """A differently sized guide sharing the vocabulary: 3 layers, tied embeddings, other weights."""
    directory, _ = checkpoints("llama_tied_3_layers", seed=1)
    return load_hf(directory)


@pytest.fixture(scope="session")
def sampler(llama):
    return Sampler(llama[0])
