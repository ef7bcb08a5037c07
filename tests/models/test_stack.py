"""``per_token``: a layer on the flattened token matrix computes what the layer computes on the activations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxalign.models.stack import per_token


@pytest.mark.parametrize("shape", [(8,), (5, 8), (3, 4, 8), (2, 3, 4, 8)])
def test_per_token_matches_the_layer_on_any_leading_shape(shape):
    layer = nnx.Linear(8, 6, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    out = per_token(layer, x)
    assert out.shape == (*shape[:-1], 6)
    np.testing.assert_allclose(out, layer(x), rtol=1e-6, atol=1e-6)


def test_per_token_gives_the_same_gradients():
    layer = nnx.Linear(8, 6, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 8))
    weights = jax.random.normal(jax.random.PRNGKey(2), (3, 4, 6))

    def loss(layer, x, apply):
        return jnp.sum(apply(layer, x) * weights)

    direct = nnx.grad(loss, argnums=(0, 1))(layer, x, lambda m, v: m(v))
    flat = nnx.grad(loss, argnums=(0, 1))(layer, x, per_token)
    for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(flat), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
