"""Scalar heads on a decoder's final hidden states: per-token values and per-sequence rewards.

- :class:`ValueHead`: ``v_t = w·h_t + b`` at every token (PPO critics, the TFPO doctor's flow values).
- :class:`RewardHead`: ``r = W·h + b`` on each sequence's pooled hidden state — its last real token (as
  transformers' ``*ForSequenceClassification``) or the mean over its real tokens — a scalar (Bradley–Terry
  reward models) or ``N`` scalars (multi-dimensional preferences, e.g. helpfulness and harmlessness);
  optionally with a hidden layer and dropout in front (``hidden``, ``dropout``), and a log-variance output
  (``log_variance``) for reward models regressed on scores with a Gaussian likelihood.
- :class:`CausalLMWithValueHead` / :class:`RewardModel`: the compositions trainers use.

The heads compute in float32 whatever the backbone's compute dtype: they are tiny, and a bf16 value or
reward would quantise the advantages and the Bradley–Terry margins. Weights start as
``N(0, 1/(D+1))`` as in Ziegler et al. 2019 (arXiv 1909.08593, Sec. 2), biases at 0.
"""

from __future__ import annotations

import jax
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
HEAD_ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu, "gelu": jax.nn.gelu}


def _dropout(x: Array, rate: float, key: Array | None) -> Array:
    """Inverted dropout with an explicit key; the identity without one (evaluation, export, serving)."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


class HiddenLayer(nnx.Module):
    """The hidden layer of a reward head: ``h·W + b`` ``[..., D] -> [..., H]`` (an MLP's ``up_proj``, sharded as
    one: column-parallel)."""

    def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs):
        self.kernel, self.bias = _head_params(d_model, hidden, rngs)

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... H"]:
        return x @ self.kernel[...] + self.bias[...]


class RewardHead(nnx.Module):
    """Reward of each sequence from its pooled hidden state: ``W·pool(h) + b``.

    ``pooling="last"`` reads the last real token (transformers' ``*ForSequenceClassification``, TRL's reward
    models); ``"mean"`` averages the hidden states of every real token (prompt and response). A causal LM's
    last position summarises the sequence only as far as the next-token objective needs, and a response cut
    at a length limit ends mid-sentence; the mean keeps what every position saw (on the embedded default's
    sentiment pairs the mean-pooled probe is the more accurate one by about 15 points: docs/offline-trainers.md).

    ``num_objectives=None`` gives one scalar per sequence ``[B]``; an int ``N`` gives ``[B, N]``.

    ``hidden=H`` puts a hidden layer in front: ``W·act(dropout(pool(h))·W₁ + b₁)`` with dropout again before
    ``W`` (transformers' ``RobertaClassificationHead``: dropout, dense, tanh, dropout, projection). ``dropout``
    applies only when a call passes a ``key`` (training) to a head that is not ``deterministic``; evaluation,
    export and serving call without one, or on ``nnx.view(model, deterministic=True)``.

    ``log_variance=True`` (a scalar head) adds a second output, the log-variance of the reward, which
    :meth:`project_with_log_variance` returns and :meth:`project` leaves out (the Gaussian likelihood of
    :func:`jaxalign.losses.regression_loss`).
    """

    def __init__(self, d_model: int, *, num_objectives: int | None = None, pooling: str = "last",
                 hidden: int | None = None, dropout: float = 0.0, activation: str = "tanh",
                 log_variance: bool = False, rngs: nnx.Rngs):
        _check_d_model("RewardHead", d_model)
        if num_objectives is not None and num_objectives < 1:
            raise ValueError(f"RewardHead: num_objectives must be None or >= 1, got {num_objectives}")
        if pooling not in POOLINGS:
            raise ValueError(f"RewardHead: pooling must be one of {POOLINGS}, got {pooling!r}")
        if hidden is not None and (not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1):
            raise ValueError(f"RewardHead: hidden must be a positive int or None, got {hidden!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"RewardHead: dropout must be in [0, 1), got {dropout!r}")
        if activation not in HEAD_ACTIVATIONS:
            raise ValueError(f"RewardHead: activation must be one of {tuple(HEAD_ACTIVATIONS)}, got {activation!r}")
        if log_variance and num_objectives is not None:
            raise ValueError("RewardHead: log_variance is for a scalar head (num_objectives=None)")
        self.num_objectives = num_objectives
        self.pooling = pooling
        self.hidden, self.dropout, self.activation = hidden, float(dropout), activation
        self.log_variance = bool(log_variance)
        self.deterministic = False
        self.up_proj = None if hidden is None else HiddenLayer(d_model, hidden, rngs=rngs)
        self.kernel, self.bias = _head_params(hidden or d_model, (num_objectives or 1) + self.log_variance, rngs)

    def set_view(self, deterministic: bool | None = None):
        """``nnx.view(model, deterministic=True)`` turns dropout off, as it does ``nnx.Dropout``'s."""
        if deterministic is not None:
            self.deterministic = deterministic

    def settings(self) -> dict:
        """The head's shape beyond its weights (what a saved reward model records to build it again)."""
        return {"hidden": self.hidden, "dropout": self.dropout, "activation": self.activation,
                "log_variance": self.log_variance}

    def pool(self, hidden: Float[Array, "B T D"], attention_mask: Array) -> Float[Array, "B D"]:
        """Each sequence's feature ``[B, D]`` float32: its last real token's hidden state, or the mean."""
        if self.pooling == "mean":
            mask = jnp.asarray(attention_mask).astype(jnp.float32)
            total = jnp.einsum("btd,bt->bd", hidden.astype(jnp.float32), mask)
            return total / jnp.maximum(jnp.sum(mask, axis=1), 1.0)[:, None]
        last = last_token_index(attention_mask)
        return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)

    def _outputs(self, features: Float[Array, "... D"], key: Array | None) -> Float[Array, "... O"]:
        first, second = (None, None) if key is None or self.deterministic else jax.random.split(key)
        x = _dropout(features.astype(jnp.float32), self.dropout, first)
        if self.up_proj is not None:
            x = _dropout(HEAD_ACTIVATIONS[self.activation](self.up_proj(x)), self.dropout, second)
        return x @ self.kernel[...] + self.bias[...]

    def project(self, features: Float[Array, "... D"], *, key: Array | None = None) -> Float[Array, "..."]:
        """The rewards float32 from pooled features (:meth:`pool`): ``[...]``, or ``[..., N]`` for an
        ``N``-objective head. ``key`` draws the dropout (training only)."""
        outputs = self._outputs(features, key)
        return outputs[..., 0] if self.num_objectives is None else outputs[..., :self.num_objectives]

    def project_with_log_variance(self, features: Float[Array, "... D"], *, key: Array | None = None,
                                  ) -> tuple[Float[Array, "..."], Float[Array, "..."]]:
        """``(reward, log-variance)`` of a ``log_variance`` head, each ``[...]`` float32."""
        if not self.log_variance:
            raise ValueError("RewardHead.project_with_log_variance: this head has no log-variance output "
                             "(build it with log_variance=True)")
        outputs = self._outputs(features, key)
        return outputs[..., 0], outputs[..., 1]

    def __call__(self, hidden: Float[Array, "B T D"], attention_mask: Array, *,
                 key: Array | None = None) -> Float[Array, "B ..."]:
        return self.project(self.pool(hidden, attention_mask), key=key)


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
    ``mean``), ``hidden``, ``dropout``, ``activation`` and ``log_variance`` are the head's, see
    :class:`RewardHead`; a call draws dropout only from the ``key`` it is given.

    Raises:
        TypeError: ``backbone`` is neither a jaxalign trunk nor a causal LM.
    """

    def __init__(self, backbone: LlamaModel | GPT2Model | LlamaForCausalLM | GPT2LMHeadModel, *,
                 num_objectives: int | None = None, pooling: str = "last", hidden: int | None = None,
                 dropout: float = 0.0, activation: str = "tanh", log_variance: bool = False, rngs: nnx.Rngs):
        if isinstance(backbone, _LMS):
            backbone = backbone.model
        if not isinstance(backbone, _TRUNKS):
            raise TypeError(f"RewardModel needs a decoder trunk (LlamaModel, GPT2Model: lm.model) or a causal LM, "
                            f"got {type(backbone).__name__}")
        self.backbone = backbone
        self.reward_head = RewardHead(backbone.config.d_model, num_objectives=num_objectives, pooling=pooling,
                                      hidden=hidden, dropout=dropout, activation=activation,
                                      log_variance=log_variance, rngs=rngs)

    def _pooled(self, tokens, attention_mask, positions) -> Float[Array, "B D"]:
        if attention_mask is None:
            attention_mask = jnp.ones(tokens.shape, bool)
        hidden, _ = self.backbone(tokens, positions=positions, attention_mask=attention_mask)
        return self.reward_head.pool(hidden, attention_mask)

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        *,
        attention_mask: Array | None = None,
        positions: Int[Array, "B T"] | None = None,
        key: Array | None = None,
    ) -> Float[Array, "B ..."]:
        """Rewards ``[B]`` (or ``[B, N]``) of the rows' real tokens (``attention_mask`` = 1), pooled by the head;
        ``key`` draws the head's dropout (training only)."""
        return self.reward_head.project(self._pooled(tokens, attention_mask, positions), key=key)

    def mean_and_log_variance(
        self,
        tokens: Int[Array, "B T"],
        *,
        attention_mask: Array | None = None,
        positions: Int[Array, "B T"] | None = None,
        key: Array | None = None,
    ) -> tuple[Float[Array, " B"], Float[Array, " B"]]:
        """``(reward [B], log-variance [B])`` of a head built with ``log_variance=True``."""
        return self.reward_head.project_with_log_variance(self._pooled(tokens, attention_mask, positions), key=key)

    def branch_rewards(
        self,
        tokens: Int[Array, "B T"],
        *,
        attention_mask: Array,
        positions: Int[Array, "B T"],
        branch_ids: Int[Array, "B T"],
        branches: int,
        key: Array | None = None,
    ) -> Float[Array, "B C ..."]:
        """Rewards ``[B, C]`` (or ``[B, C, N]``) of the ``C = branches`` continuations of rows holding a shared
        prefix (``branch_ids`` 0) and continuations ``1..C`` (:mod:`jaxalign.models.masks`).

        Continuation ``c`` is pooled over the prefix and its own tokens, so its reward is the reward of
        ``prefix + continuation`` on its own (its last token for ``last`` pooling), with the prefix computed once.
        ``key`` draws the head's dropout, independently for each continuation (training only).
        """
        real = jnp.asarray(attention_mask).astype(bool)
        hidden, _ = self.backbone(tokens, positions=positions, attention_mask=real, branch_ids=branch_ids)
        sides = [self.reward_head(hidden, real & ((branch_ids == 0) | (branch_ids == c)),
                                  key=None if key is None else jax.random.fold_in(key, c))
                 for c in range(1, branches + 1)]
        return jnp.stack(sides, axis=1)
