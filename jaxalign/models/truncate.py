"""A smaller model cut from a larger one: its first ``n`` decoder layers, with its embeddings, final norm and LM
head (the layer-dropping of DistilBERT-style student initialisation, Sanh et al. 2019, and of "shallow" drafts
in speculative decoding).

LLMDoctor's weak-to-strong setting guides a large patient with a doctor several times smaller that shares its
tokenizer; when no smaller pretrained model of the family is at hand, the patient's first layers are the
closest start: the same embeddings and head, so the same vocabulary and an output distribution already near the
patient's after brief training.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from jaxalign.models.hf_io import is_stacked


def first_layers(lm: nnx.Module, n_layers: int) -> nnx.Module:
    """A new causal LM of the same class holding ``lm``'s first ``n_layers`` layers (copies; ``lm`` is untouched).

    Raises:
        ValueError: ``n_layers`` is not in ``1 .. lm.config.n_layers``.
    """
    total = lm.config.n_layers
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 1 <= n_layers <= total:
        raise ValueError(f"first_layers: n_layers must be an int in 1..{total} (the model's layers), got {n_layers!r}")
    config = dataclasses.replace(lm.config, n_layers=n_layers)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: type(lm)(config, rngs=nnx.Rngs(0))))
    flat = [(path, jnp.copy(value[:n_layers] if is_stacked(tuple(map(str, path))) else value))
            for path, value in nnx.to_flat_state(nnx.state(lm))]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
