"""Sampling parameters: what a caller chooses per call, validated on the host, traced inside the loop.

Only ``max_new_tokens`` and ``n`` fix array shapes, so only they (with the prompt bucket) select a compiled
program; the temperature, the filters and the stop tokens travel as arrays, and changing them does not
recompile.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How each next token is chosen (the semantics of transformers' ``generate`` and vLLM).

    The scores (logits, or the guided combination) are divided by ``temperature``, then filtered by
    top-k, top-p and min-p in that order (transformers' order), and the next token is drawn from the
    softmax of what is kept.

    Attributes:
        max_new_tokens: response length ``N`` (a static shape: each value compiles once).
        temperature: ``> 0`` samples from ``softmax(scores / temperature)``; ``0`` is greedy decoding
            (the first maximum), whatever the filters say.
        top_k: keep the ``k`` highest scores (ties with the k-th are kept, as transformers does); 0 = off.
        top_p: nucleus: keep the fewest top tokens whose probability (after top-k) reaches ``top_p``;
            1 = off.
        min_p: keep tokens whose probability is at least ``min_p`` times the top token's; 0 = off.
        n: samples per prompt (GRPO groups, preference pairs); prompt ``b``'s samples are output rows
            ``b·n .. b·n + n − 1``. A static shape.
        stop_token_ids: a row ends after emitting any of these (the stop token is part of the response).
            None: the model's EOS ids (``config.eos_token_ids``); ``()`` never stops early.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    n: int = 1
    stop_token_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        for name in ("max_new_tokens", "n"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SamplingParams.{name} must be a positive int, got {value!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"SamplingParams.temperature must be finite and >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"SamplingParams.min_p must be in [0, 1] (0 = off), got {self.min_p!r}")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, tuple) or not all(
                    isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
                raise ValueError(f"SamplingParams.stop_token_ids must be a tuple of token ids >= 0 or None, "
                                 f"got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        """Whether sampling is greedy (temperature 0: the highest score, no draw)."""
        return self.temperature == 0

    def filters(self) -> Filters:
        """The traced part: temperature and filter settings as float32/int32 scalars."""
        return Filters(temperature=jnp.float32(self.temperature), top_k=jnp.int32(self.top_k),
                       top_p=jnp.float32(self.top_p), min_p=jnp.float32(self.min_p))

    def stop_mask(self, vocab_size: int, default: tuple[int, ...]) -> np.ndarray:
        """``[V]`` bool: which tokens end a row (``default`` when ``stop_token_ids`` is None).

        Raises:
            ValueError: a stop id outside the vocabulary.
        """
        ids = default if self.stop_token_ids is None else self.stop_token_ids
        outside = [t for t in ids if not 0 <= t < vocab_size]
        if outside:
            raise ValueError(f"stop token id(s) {outside} are outside the vocabulary of {vocab_size}")
        mask = np.zeros((vocab_size,), bool)
        mask[list(ids)] = True
        return mask


class Filters(NamedTuple):
    """Temperature and filters as arrays: scalars, or ``[B]`` for one setting per row.

    ``top_k = 0``, ``top_p = 1`` and ``min_p = 0`` switch a filter off; ``temperature = 0`` is greedy.
    """

    temperature: Float[Array, "*B"]
    top_k: Int[Array, "*B"]
    top_p: Float[Array, "*B"]
    min_p: Float[Array, "*B"]

