"""benchmarks/products_floor.py times exactly the weight products the training benchmark counts."""

from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def benchmark_modules():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import model_shapes
        import products_floor
        import train_throughput
    finally:
        sys.path.remove(str(BENCHMARKS))
    return model_shapes, products_floor, train_throughput


@pytest.mark.parametrize("frozen_forwards", [0, 1])
def test_floor_counts_the_steps_weight_products(benchmark_modules, frozen_forwards):
    model_shapes, products_floor, train_throughput = benchmark_modules
    config = model_shapes.SHAPES["tiny"]
    floor = products_floor.training_products_floor(config, trunk_rows=12, head_positions=5,
                                                   frozen_forwards=frozen_forwards, dtype=jnp.float32, repeats=1)
    # The benchmark's own count (N_mm: every projection of every layer plus the d x V head), without attention.
    head = config.d_model * config.vocab_size
    forward = 2 * (train_throughput.matmul_weights(config) - head) * 12 + 2 * head * 5
    assert floor["flops"] == (3 + frozen_forwards) * forward
    assert floor["products"] == (3 + frozen_forwards) * (7 * config.n_layers + 1)
    assert floor["seconds"] > 0 and floor["flop_per_s"] == floor["flops"] / floor["seconds"]
