"""Model-level metrics: KL to the reference on the policy's samples, perplexity, reward-model accuracy.

Each runs a jitted forward pass over fixed-shape batches (:mod:`jaxalign.eval.forward`) and accumulates sums
and counts on the host, so a metric over many batches is exactly the metric over their union.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from jaxalign.data import BatchIterator
from jaxalign.eval.forward import padded_batches, rewards, split_model, target_logps
from jaxalign.losses import kl_estimate, masked_sum
from jaxalign.models.scoring import DEFAULT_CHUNK
from jaxalign.rollout import Rollout

__all__ = ["perplexity", "reference_logps", "reward_accuracy", "sequence_kl", "token_nll"]

SFT_KEYS = ("input_ids", "attention_mask", "positions", "loss_mask")


@functools.partial(jax.jit, static_argnames=("estimator",))
def sequence_kl(policy_logps: Float[Array, "R N"], reference_logps: Float[Array, "R N"], mask: Array, *,
                estimator: str = "k1") -> Float[Array, " R"]:
    """Per-sequence estimate of ``KL(π ‖ π_ref)`` from the log-probs of tokens sampled from π.

    Formula (k1): ``KL_r = Σ_t m_rt·(log π(y_t) − log π_ref(y_t))``, an unbiased estimate of
    ``KL(π(·|x) ‖ π_ref(·|x))`` over whole responses when ``y ~ π``; k3 sums
    ``(π_ref/π − 1) − log(π_ref/π)`` instead (unbiased as well, never negative, lower variance). The per-token
    terms are :func:`jaxalign.losses.kl_estimate`'s.

    Args:
        policy_logps: ``[R, N]`` log π of the sampled response tokens (a rollout's ``model_logps``).
        reference_logps: ``[R, N]`` log π_ref of the same tokens (:func:`reference_logps`).
        mask: ``[R, N]`` response tokens (a rollout's ``response_mask``).
        estimator: ``"k1"`` (default), ``"k2"``, ``"k3"`` or ``"abs"``.

    Returns:
        ``[R]`` float32 nats per response.

    Notes:
        Unbiased only when the samples come from π itself: temperature 1 and no top-k/top-p/min-p filter.
        Sampled at temperature ``T`` they come from ``π^{1/T}`` (renormalised), and k1 averages
        ``log π − log π_ref`` under that distribution instead. TRL's PPO divides both models' logits by the
        temperature and so measures the KL between the tempered distributions.
    """
    per_token = kl_estimate(policy_logps, reference_logps, mask, estimator=estimator)
    total, _ = masked_sum(per_token, mask, axis=-1)
    return total


def reference_logps(model: nnx.Module, rollout: Rollout, *, batch_size: int = 16,
                    chunk_size: int | None = DEFAULT_CHUNK) -> Float[Array, "R N"]:
    """log-probs under ``model`` of a rollout's response tokens, aligned with ``rollout.tokens``.

    The logits that predict response token ``t`` sit at column ``P − 1 + t`` of :meth:`Rollout.sequences`,
    so this is ``token_logps(logits[:, P−1:−1], rollout.tokens)``, 0 off the response mask; with the model
    that sampled the rollout it equals ``rollout.model_logps`` (up to float32 rounding of a full forward pass
    versus the cached decode).

    Args:
        model: a causal LM (``hidden_states`` and ``logits``), sharing the rollout's vocabulary.
        rollout: ``R`` rows of ``P`` prompt and ``N`` response tokens.
        batch_size: rows per compiled forward pass (the last batch is padded to it).
        chunk_size: positions of the LM head computed at once (None: all).

    Returns:
        ``[R, N]`` float32.

    Raises:
        ValueError: the rollout holds token ids outside the model's vocabulary.
    """
    tokens, mask = (np.asarray(a) for a in rollout.sequences())
    response_mask = np.asarray(rollout.response_mask)
    vocab = model.config.vocab_size
    if response_mask.any() and int(np.asarray(rollout.tokens)[response_mask].max()) >= vocab:
        raise ValueError(f"the rollout holds token ids >= {vocab}, the vocabulary of the model scoring it: the "
                         "policy and the reference must share one tokenizer")
    split = split_model(model)
    prompt_length = rollout.prompt_tokens.shape[1]
    outputs = []
    for rows, batch in padded_batches({"input_ids": tokens.astype(np.int32), "attention_mask": mask.astype(np.int32)},
                                      batch_size):
        logps = target_logps(split.graphdef, split.state, batch["input_ids"], batch["attention_mask"], None, None,
                             chunk_size=chunk_size)
        outputs.append(np.asarray(logps)[:rows, prompt_length - 1:])
    logps = np.concatenate(outputs) if outputs else np.zeros(np.shape(rollout.tokens), np.float32)
    return jnp.asarray(np.where(response_mask, logps, 0.0), jnp.float32)


def _check_finite(batches: Iterable[dict], what: str) -> None:
    """An endless iterator would never finish the metric: refuse it instead of hanging."""
    if isinstance(batches, BatchIterator) and batches.num_epochs is None:
        raise ValueError(f"{what}: the BatchIterator repeats forever (num_epochs=None); build it with num_epochs=1, "
                         "shuffle=False, drop_last=False to visit every example once")


def _check_keys(batch: dict, keys: Sequence[str], what: str, index: int) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"{what} batch {index} lacks {missing} (has {sorted(batch)}); expected jaxalign.data "
                         f"batches")


def token_nll(model: nnx.Module, batches: Iterable[dict], *, chunk_size: int | None = DEFAULT_CHUNK
              ) -> tuple[float, int]:
    """``(Σ NLL, token count)`` of the completion tokens of SFT batches (as ``jaxalign.data`` makes them).

    The targets are ``input_ids[:, 1:]`` where ``loss_mask[:, 1:]`` (and ``example_mask``) is 1; packed
    batches are run with their ``segment_ids``. ``batches`` must end: a ``BatchIterator`` with
    ``num_epochs=1`` (and ``shuffle=False, drop_last=False`` to see every example once).

    Raises:
        ValueError: a batch that is not an SFT batch ``[B, T]`` with input_ids, attention_mask, positions and
            loss_mask, or a ``BatchIterator`` that repeats forever.
    """
    _check_finite(batches, "perplexity")
    split = split_model(model)
    total, count = 0.0, 0
    for index, batch in enumerate(batches):
        _check_keys(batch, SFT_KEYS, "SFT", index)
        if np.ndim(batch["input_ids"]) != 2:
            raise ValueError(f"SFT batch {index}: input_ids must be [B, T], got shape {np.shape(batch['input_ids'])} "
                             "(pair batches measure reward accuracy, not perplexity)")
        logps = target_logps(split.graphdef, split.state, batch["input_ids"], batch["attention_mask"],
                             batch["positions"], batch.get("segment_ids"), chunk_size=chunk_size)
        mask = np.asarray(batch["loss_mask"])[:, 1:].astype(bool)
        if "example_mask" in batch:
            mask &= np.asarray(batch["example_mask"]).astype(bool)[:, None]
        total -= float(np.sum(np.asarray(logps, np.float64), where=mask))
        count += int(mask.sum())
    return total, count


def perplexity(model: nnx.Module, batches: Iterable[dict], *, chunk_size: int | None = DEFAULT_CHUNK) -> float:
    """Perplexity of ``model`` on SFT batches: ``exp(Σ NLL / Σ tokens)`` over every completion token.

    Token-weighted (every target token counts once, whatever batch it falls in), as transformers'
    ``ForCausalLMLoss`` averages; see :func:`token_nll`.

    Raises:
        ValueError: no completion tokens, or batches that are not SFT batches.
    """
    total, count = token_nll(model, batches, chunk_size=chunk_size)
    if count == 0:
        raise ValueError("perplexity: the batches hold no completion tokens (loss_mask is 0 everywhere)")
    return math.exp(total / count)


def _pair_rewards(split, batch: dict, index: int, num_objectives: int | None) -> np.ndarray:
    """Rewards ``[B, 2]`` of pair batches or ``[B, D, 2]`` of group batches (objective ``d`` for dimension
    ``d`` when the head has D outputs, as the reward objective trains it)."""
    layout = np.shape(batch["input_ids"])[:-1]
    if len(layout) not in (2, 3) or layout[-1] != 2:
        raise ValueError(f"pairs batch {index}: input_ids must be [B, 2, T] or [B, D, 2, T], got shape "
                         f"{np.shape(batch['input_ids'])}")
    flat = {k: np.asarray(batch[k]).reshape(-1, np.shape(batch[k])[-1]) for k in ("input_ids", "attention_mask",
                                                                                   "positions")}
    out = np.asarray(rewards(split.graphdef, split.state, flat["input_ids"], flat["attention_mask"],
                             flat["positions"]), np.float64)
    if num_objectives is None:
        return out.reshape(layout)
    if len(layout) != 3 or layout[1] != num_objectives:
        raise ValueError(f"pairs batch {index}: a reward head with {num_objectives} objectives scores group "
                         f"batches [B, {num_objectives}, 2, T], got input_ids of shape {np.shape(batch['input_ids'])}")
    return np.einsum("bdpd->bdp", out.reshape(*layout, num_objectives))


def _accuracy(correct: np.ndarray, valid: np.ndarray, ties: np.ndarray) -> dict:
    pairs = int(valid.sum())
    hits = int((correct & valid).sum())
    return {"accuracy": hits / pairs if pairs else math.nan, "correct": hits, "ties": int((ties & valid).sum()),
            "pairs": pairs}


def reward_accuracy(reward_model: nnx.Module, batches: Iterable[dict], *, min_margin: float | None = None,
                    dimensions: Sequence[str] | None = None) -> dict:
    """How often a reward model ranks the chosen response above the rejected one.

    Formula: ``accuracy = Σ m·1[r(x, y⁺) > r(x, y⁻)] / Σ m`` over valid pairs ``m`` (``example_mask``, and
    ``pair_mask`` for groups); a tie counts as wrong, as in :func:`jaxalign.losses.preference_accuracy`,
    TRL's ``RewardTrainer`` and RewardBench.

    Args:
        reward_model: a :class:`~jaxalign.models.RewardModel` (a D-objective head needs group batches with
            D dimensions and is read per dimension; a scalar head scores every dimension's pair).
        batches: ``jaxalign.data`` pair batches ``[B, 2, T]`` or group batches ``[B, D, 2, T]``.
        min_margin: also report the accuracy on the pairs whose gold ``margin`` exceeds it (the clear
            preferences; needs batches with ``margin``).
        dimensions: names of the D dimensions of group batches (``dataset.dimensions``) for the
            per-dimension report; None numbers them.

    Returns:
        ``{"accuracy", "correct", "ties", "pairs"}`` over every valid pair (accuracy NaN without pairs); with
        ``min_margin`` also ``"min_margin"`` and ``"above_margin": {accuracy, correct, ties, pairs}``; for group
        batches ``"dimensions": {name: {...}}`` with the same fields per dimension.

    Raises:
        ValueError: batches of another layout, ``min_margin`` without margins, or no valid pair at all.
    """
    head = getattr(reward_model, "reward_head", None)
    if head is None:
        raise TypeError(f"reward_accuracy needs a jaxalign.models.RewardModel, got {type(reward_model).__name__}")
    _check_finite(batches, "reward_accuracy")
    split = split_model(reward_model)
    correct, ties, valid, above = [], [], [], []
    for index, batch in enumerate(batches):
        _check_keys(batch, ("input_ids", "attention_mask", "positions"), "pairs", index)
        scores = _pair_rewards(split, batch, index, head.num_objectives)
        chosen, rejected = scores[..., 0], scores[..., 1]
        mask = np.ones(chosen.shape, bool)
        if "example_mask" in batch:
            mask &= np.asarray(batch["example_mask"]).astype(bool).reshape(-1, *([1] * (chosen.ndim - 1)))
        if chosen.ndim == 2:
            mask &= np.asarray(batch.get("pair_mask", np.ones(chosen.shape))).astype(bool)
        if min_margin is not None:
            if "margin" not in batch:
                raise ValueError(f"pairs batch {index} has no 'margin': min_margin filters on the data's gold "
                                 "margins, and these pairs carry none")
            margin = np.asarray(batch["margin"])
            if margin.ndim == 1 and chosen.ndim == 2:  # one margin per group: every dimension's pair
                margin = np.broadcast_to(margin[:, None], chosen.shape)
            if margin.shape != chosen.shape:
                raise ValueError(f"pairs batch {index}: margin has shape {margin.shape}, the pairs {chosen.shape}")
            above.append(margin > min_margin)
        correct.append(chosen > rejected)
        ties.append(chosen == rejected)
        valid.append(mask)
    if not valid:
        raise ValueError("reward_accuracy: no batches")
    correct, ties, valid = (np.concatenate(a) for a in (correct, ties, valid))
    if not valid.any():
        raise ValueError("reward_accuracy: no valid pairs (example_mask/pair_mask are 0 everywhere)")
    result = _accuracy(correct, valid, ties)
    if min_margin is not None:
        above = np.concatenate(above)
        result["min_margin"] = float(min_margin)
        result["above_margin"] = _accuracy(correct, valid & above, ties)
    if correct.ndim == 2:
        names = list(dimensions) if dimensions is not None else [str(d) for d in range(correct.shape[1])]
        if len(names) != correct.shape[1]:
            raise ValueError(f"reward_accuracy: {len(names)} dimension names for {correct.shape[1]} dimensions")
        result["dimensions"] = {}
        for d, name in enumerate(names):
            entry = _accuracy(correct[:, d], valid[:, d], ties[:, d])
            if min_margin is not None:
                entry["above_margin"] = _accuracy(correct[:, d], valid[:, d] & above[:, d], ties[:, d])
            result["dimensions"][name] = entry
    return result
