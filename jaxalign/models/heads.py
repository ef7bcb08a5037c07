"""Scalar heads on a decoder's final hidden states: per-token values and per-sequence rewards.

- :class:`ValueHead`: ``v_t = w·h_t + b`` at every token (PPO critics, the TFPO doctor's flow values).
- :class:`RewardHead`: ``r = W·h + b`` on each sequence's pooled hidden state — its last real token (as
  transformers' ``*ForSequenceClassification``) or the mean over its real tokens — a scalar (Bradley–Terry
  reward models) or ``N`` scalars (multi-dimensional preferences, e.g. helpfulness and harmlessness).
- :class:`CausalLMWithValueHead` / :class:`RewardModel`: the compositions trainers use.

The heads compute in float32 whatever the backbone's compute dtype: they are tiny, and a bf16 value or
reward would quantise the advantages and the Bradley–Terry margins. Weights start as
``N(0, 1/(D+1))`` as in Ziegler et al. 2019 (arXiv 1909.08593, Sec. 2), biases at 0.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from jaxalign.models.cache import KVCache
from jaxalign.models.gpt2 import GPT2LMHeadModel, GPT2Model
from jaxalign.models.llama import LlamaForCausalLM, LlamaModel

_LMS = (LlamaForCausalLM, GPT2LMHeadModel)
_TRUNKS = (LlamaModel, GPT2Model)


def _check_d_model(head: str, d_model) -> None:
    if not isinstance(d_model, int) or isinstance(d_model, bool) or d_model <= 0:
        raise TypeError(f"{head}(d_model, ...): d_model must be a positive int (the model's config.d_model), "
                        f"got {type(d_model).__name__}")


def _head_params(d_model: int, n_outputs: int, rngs: nnx.Rngs) -> tuple[nnx.Param, nnx.Param]:
    init = nnx.initializers.normal(stddev=(d_model + 1) ** -0.5)
    return (nnx.Param(init(rngs.params(), (d_model, n_outputs), jnp.float32)),
            nnx.Param(jnp.zeros((n_outputs,), jnp.float32)))


class ValueHead(nnx.Module):
    """Scalar per token: ``[B, T, D] -> [B, T]`` float32."""

    def __init__(self, d_model: int, *, rngs: nnx.Rngs):
        _check_d_model("ValueHead", d_model)
        self.kernel, self.bias = _head_params(d_model, 1, rngs)

    def __call__(self, hidden: Float[Array, "B T D"]) -> Float[Array, "B T"]:
        return (hidden.astype(jnp.float32) @ self.kernel[...] + self.bias[...])[..., 0]


def last_token_index(attention_mask: Array) -> Int[Array, " B"]:
    """Index of each row's last real token (right or left padding alike; 0 for an all-pad row)."""
    mask = jnp.asarray(attention_mask).astype(bool)
    return jnp.max(jnp.where(mask, jnp.arange(mask.shape[1]), 0), axis=1)


POOLINGS = ("last", "mean")


class RewardHead(nnx.Module):
    """Reward of each sequence from its pooled hidden state: ``W·pool(h) + b``.

    ``pooling="last"`` reads the last real token (transformers' ``*ForSequenceClassification``, TRL's reward
    models); ``"mean"`` averages the hidden states of every real token (prompt and response). A causal LM's
    last position summarises the sequence only as far as the next-token objective needs, and a response cut
    at a length limit ends mid-sentence; the mean keeps what every position saw (on the embedded default's
    sentiment pairs the mean-pooled probe is the more accurate one by about 15 points: docs/offline-trainers.md).

    ``num_objectives=None`` gives one scalar per sequence ``[B]``; an int ``N`` gives ``[B, N]``.
    """

    def __init__(self, d_model: int, *, num_objectives: int | None = None, pooling: str = "last",
                 rngs: nnx.Rngs):
        _check_d_model("RewardHead", d_model)
        if num_objectives is not None and num_objectives < 1:
            raise ValueError(f"RewardHead: num_objectives must be None or >= 1, got {num_objectives}")
        if pooling not in POOLINGS:
            raise ValueError(f"RewardHead: pooling must be one of {POOLINGS}, got {pooling!r}")
        self.num_objectives = num_objectives
        self.pooling = pooling
        self.kernel, self.bias = _head_params(d_model, num_objectives or 1, rngs)

    def pool(self, hidden: Float[Array, "B T D"], attention_mask: Array) -> Float[Array, "B D"]:
        """Each sequence's feature ``[B, D]`` float32: its last real token's hidden state, or the mean."""
        if self.pooling == "mean":
            mask = jnp.asarray(attention_mask).astype(jnp.float32)
            total = jnp.einsum("btd,bt->bd", hidden.astype(jnp.float32), mask)
            return total / jnp.maximum(jnp.sum(mask, axis=1), 1.0)[:, None]
        last = last_token_index(attention_mask)
        return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)

    def project(self, features: Float[Array, "... D"]) -> Float[Array, "..."]:
        """``W·features + b`` float32 from pooled features (:meth:`pool`): ``[...]``, or ``[..., N]`` for an
        ``N``-objective head."""
        rewards = features.astype(jnp.float32) @ self.kernel[...] + self.bias[...]
        return rewards[..., 0] if self.num_objectives is None else rewards

    def __call__(self, hidden: Float[Array, "B T D"], attention_mask: Array) -> Float[Array, "B ..."]:
        return self.project(self.pool(hidden, attention_mask))


class CausalLMWithValueHead(nnx.Module):
    """A causal LM sharing its trunk with a value head (PPO policy+critic, the TFPO doctor).

    Raises:
        TypeError: ``lm`` is a bare trunk (``lm.model``, which has no LM head) or not a causal LM.
    """

    def __init__(self, lm: LlamaForCausalLM | GPT2LMHeadModel, *, rngs: nnx.Rngs):
        if isinstance(lm, _TRUNKS):
            raise TypeError(f"CausalLMWithValueHead needs the causal LM (with its LM head), got the trunk "
                            f"{type(lm).__name__}: pass the LM itself, not lm.model")
        if not all(hasattr(lm, name) for name in ("hidden_states", "logits", "config")):
            raise TypeError(f"CausalLMWithValueHead needs a causal LM with hidden_states() and logits() "
                            f"(LlamaForCausalLM, GPT2LMHeadModel), got {type(lm).__name__}")
        self.lm = lm
        self.value_head = ValueHead(lm.config.d_model, rngs=rngs)

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        *,
        positions: Int[Array, "B T"] | None = None,
        attention_mask: Array | None = None,
        segment_ids: Int[Array, "B T"] | None = None,
        cache: KVCache | None = None,
    ) -> tuple[Float[Array, "B T V"], Float[Array, "B T"], KVCache | None]:
        """``(logits [B, T, V], values [B, T], new_cache)``, both float32; arguments as the LM's."""
        hidden, cache = self.lm.hidden_states(tokens, positions=positions, attention_mask=attention_mask,
                                              segment_ids=segment_ids, cache=cache)
        return self.lm.logits(hidden), self.value_head(hidden), cache


class RewardModel(nnx.Module):
    """A decoder trunk (no LM head) with a :class:`RewardHead`: tokens -> reward per sequence.

    ``backbone`` is the trunk (``lm.model``); a causal LM is accepted too and unwrapped to its trunk,
    whose modules it then shares (the LM head is not part of the reward model). ``pooling`` (``last`` or
    ``mean``) is the head's, see :class:`RewardHead`.

    Raises:
        TypeError: ``backbone`` is neither a jaxalign trunk nor a causal LM.
    """

    def __init__(self, backbone: LlamaModel | GPT2Model | LlamaForCausalLM | GPT2LMHeadModel, *,
                 num_objectives: int | None = None, pooling: str = "last", rngs: nnx.Rngs):
        if isinstance(backbone, _LMS):
            backbone = backbone.model
        if not isinstance(backbone, _TRUNKS):
            raise TypeError(f"RewardModel needs a decoder trunk (LlamaModel, GPT2Model: lm.model) or a causal LM, "
                            f"got {type(backbone).__name__}")
        self.backbone = backbone
        self.reward_head = RewardHead(backbone.config.d_model, num_objectives=num_objectives, pooling=pooling,
                                      rngs=rngs)

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        *,
        attention_mask: Array | None = None,
        positions: Int[Array, "B T"] | None = None,
    ) -> Float[Array, "B ..."]:
        """Rewards ``[B]`` (or ``[B, N]``) of the rows' real tokens (``attention_mask`` = 1), pooled by the head."""
        if attention_mask is None:
            attention_mask = jnp.ones(tokens.shape, bool)
        hidden, _ = self.backbone(tokens, positions=positions, attention_mask=attention_mask)
        return self.reward_head(hidden, attention_mask)

    def branch_rewards(
        self,
        tokens: Int[Array, "B T"],
        *,
        attention_mask: Array,
        positions: Int[Array, "B T"],
        branch_ids: Int[Array, "B T"],
        branches: int,
    ) -> Float[Array, "B C ..."]:
        """Rewards ``[B, C]`` (or ``[B, C, N]``) of the ``C = branches`` continuations of rows holding a shared
        prefix (``branch_ids`` 0) and continuations ``1..C`` (:mod:`jaxalign.models.masks`).

        Continuation ``c`` is pooled over the prefix and its own tokens, so its reward is the reward of
        ``prefix + continuation`` on its own (its last token for ``last`` pooling), with the prefix computed once.
        """
        real = jnp.asarray(attention_mask).astype(bool)
        hidden, _ = self.backbone(tokens, positions=positions, attention_mask=real, branch_ids=branch_ids)
        sides = [self.reward_head(hidden, real & ((branch_ids == 0) | (branch_ids == c)))
                 for c in range(1, branches + 1)]
        return jnp.stack(sides, axis=1)
