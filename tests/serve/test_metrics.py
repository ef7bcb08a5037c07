"""The server's compilation counters: every XLA compilation in the process, by jitted function."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from prometheus_client.parser import text_string_to_metric_families

from jaxalign.serve.metrics import Metrics


def compiled(metrics: Metrics, function: str) -> tuple[float, float]:
    """``(programs, seconds)`` the metrics counted for ``function``."""
    samples = [s for family in text_string_to_metric_families(metrics.render().decode()) for s in family.samples
               if s.labels.get("function") == function]
    count = sum(s.value for s in samples if s.name == "jaxalign_xla_compilations_total")
    seconds = sum(s.value for s in samples if s.name == "jaxalign_xla_compile_seconds_total")
    return count, seconds


def test_each_new_shape_counts_one_compilation():
    metrics = Metrics("m")

    def doubled_for_the_metrics_test(x):
        return 2 * x

    function = jax.jit(doubled_for_the_metrics_test)
    assert compiled(metrics, "doubled_for_the_metrics_test") == (0, 0)
    function(jnp.ones(3)).block_until_ready()
    count, seconds = compiled(metrics, "doubled_for_the_metrics_test")
    assert count == 1 and seconds > 0
    function(jnp.zeros(3)).block_until_ready()  # the same shape: the compiled program runs again
    assert compiled(metrics, "doubled_for_the_metrics_test")[0] == 1
    function(jnp.ones(5)).block_until_ready()
    assert compiled(metrics, "doubled_for_the_metrics_test")[0] == 2


def test_a_dropped_server_stops_listening():
    import gc

    from jaxalign.serve import metrics as module

    metrics = Metrics("gone")
    assert metrics in module._listening
    del metrics
    gc.collect()
    assert not [m for m in module._listening if m.model == "gone"]
