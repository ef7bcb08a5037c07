"""benchmarks/products_floor.py runs the weight products the training benchmark counts, and XLA keeps them all."""

from __future__ import annotations

import dataclasses
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
    # Query heads 4 x 24 wide: q and o are not d x d, so a mixed-up width fails (shape error or count).
    config = dataclasses.replace(model_shapes.SHAPES["tiny"], head_dim=24)
    assert config.n_heads * config.head_dim != config.d_model
    floor = products_floor.training_products_floor(config, trunk_rows=12, head_positions=5,
                                                   frozen_forwards=frozen_forwards, dtype=jnp.float32, repeats=1)
    # The benchmark's own count (N_mm: every projection of every layer plus the d x V head), without attention.
    head = config.d_model * config.vocab_size
    forward = 2 * (train_throughput.matmul_weights(config) - head) * 12 + 2 * head * 5
    assert floor["flops"] == (3 + frozen_forwards) * forward
    assert floor["products"] == (3 + frozen_forwards) * (7 * config.n_layers + 1)
    # XLA's count of the compiled program: the products plus about one FLOP an element for the max of every result
    # kept (XLA's cost model counts a few thousand more here). A product dropped, or two merged into one, would
    # move it by at least the smallest product's FLOPs.
    d, f, vocab, rows, head_rows = config.d_model, config.intermediate_size, config.vocab_size, 12, 5
    q_width, kv_width = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    outputs_per_forward = config.n_layers * rows * (q_width + 2 * kv_width + d + 2 * f + d) + head_rows * vocab
    weight_grads = d * q_width + 2 * d * kv_width + q_width * d + 3 * d * f
    backward = head_rows * d + vocab * d + config.n_layers * (weight_grads + 3 * rows * d) + rows * d
    maxima = (1 + frozen_forwards) * outputs_per_forward + backward
    smallest_product = 2 * rows * d * kv_width
    assert abs(floor["compiled_flops"] - floor["flops"] - maxima) < smallest_product / 2
