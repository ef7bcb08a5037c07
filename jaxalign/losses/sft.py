"""Supervised fine-tuning: masked next-token cross-entropy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jaxalign.losses.core import F32, as_mask, entropy, masked_mean, token_logps

__all__ = ["sft_loss"]


def sft_loss(
    logits: Float[Array, "B T V"],
    targets: Int[Array, "B T"],
    mask: Array | None = None,
    *,
    label_smoothing: float = 0.0,
) -> tuple[Float[Array, "B T"], dict[str, Float[Array, ""]]]:
    """Per-token negative log-likelihood of the targets, for SFT and for NLL terms of other losses.

    Formula (ε = ``label_smoothing``, V = vocabulary size)::

        ℓ_t = −(1 − ε)·log p(y_t) − ε·(1/V)·Σ_v log p(v)

    Reduce with :func:`jaxalign.losses.core.aggregate`: ``mode="token_mean"`` gives the usual mean over all
    completion tokens of the batch (transformers' ``ForCausalLMLoss``, TRL's SFTTrainer);
    ``mode="sequence_mean"`` averages each sequence's token mean, so short and long examples weigh the same.

    Args:
        logits: ``[B, T, V]``, already aligned with ``targets`` (for a causal LM pass ``logits[:, :-1]`` and
            ``tokens[:, 1:]``). Any float dtype; computed in float32.
        targets: ``[B, T]`` token ids; ids outside ``[0, V)`` (e.g. ``-100``) must be masked.
        mask: ``[B, T]`` loss mask, 1 on tokens that are trained on. For completion-only SFT it is 1 on the
            completion (and its EOS) and 0 on the prompt and padding. None trains on every position.
        label_smoothing: ε in ``[0, 1)``; matches ``torch.nn.functional.cross_entropy(label_smoothing=ε)``.

    Returns:
        ``(nll, metrics)``: ``nll`` is ``[B, T]`` float32 and 0 where masked; metrics (means over the
        masked tokens) are ``nll`` (without smoothing), ``token_accuracy`` (arg-max equals target) and
        ``entropy`` of the predicted distribution.

    Examples:
        One sequence of two tokens over a 3-token vocabulary, then the token mean of the batch:

        >>> import jax.numpy as jnp
        >>> from jaxalign import losses
        >>> logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.125, 0.75, 0.125]]]))   # [B=1, T=2, V=3]
        >>> nll, metrics = losses.sft_loss(logits, jnp.array([[0, 1]]), jnp.array([[1, 1]]))
        >>> [round(float(x), 4) for x in nll[0]]     # −log 0.5, −log 0.75
        [0.6931, 0.2877]
        >>> total, count = losses.aggregate(nll, jnp.array([[1, 1]]), mode="token_mean")
        >>> round(float(total / count), 4)
        0.4904

    References:
        Standard maximum-likelihood fine-tuning; label smoothing: Szegedy et al. 2016 (arXiv 1512.00567, Sec. 7).

    Notes:
        TRL's SFTTrainer (with transformers' loss) normalises by the number of completion tokens in the whole
        (accumulated) batch; ``aggregate(..., mode="token_mean")`` with summed ``(sum, count)`` over
        micro-batches reproduces that exactly.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"sft_loss: label_smoothing must be in [0, 1), got {label_smoothing}")
    valid = as_mask(mask, targets)
    # Padded positions may hold non-finite logits; neutralise them before any nonlinearity so that their
    # (zero) cotangent is not turned into NaN by the log-softmax backward pass.
    logits = jnp.where(valid[..., None], logits, jnp.zeros((), logits.dtype))
    logps = token_logps(logits, targets, valid)
    nll = -logps
    if label_smoothing:
        # mean_v log p(v) = mean_v z_v − logsumexp(z): no full-vocabulary log-softmax is stored.
        logits32 = logits.astype(F32)
        mean_logp = jnp.mean(logits32, axis=-1) - jax.nn.logsumexp(logits32, axis=-1)
        per_token = (1.0 - label_smoothing) * nll - label_smoothing * mean_logp
    else:
        per_token = nll
    per_token = jnp.where(valid, per_token, 0.0)
    predicted = jnp.argmax(logits, axis=-1)
    metrics = {
        "nll": masked_mean(nll, valid),
        "token_accuracy": masked_mean(predicted == targets, valid),
        "entropy": masked_mean(entropy(logits), valid),
    }
    return per_token, jax.tree.map(jax.lax.stop_gradient, metrics)
