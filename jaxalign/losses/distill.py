"""Knowledge distillation: the generalized Jensen-Shannon divergence between a student's and a teacher's
next-token distributions (GKD)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxalign.losses.core import F32, as_mask, masked_mean

__all__ = ["generalized_jsd_loss"]


def _kl(log_p: Float[Array, "... V"], log_q: Float[Array, "... V"]) -> Float[Array, "..."]:
    """``KL(p || q) = Σ_v p_v (log p_v − log q_v)``, a ``p_v = 0`` entry adding 0 (not ``0·(−inf) = NaN``)."""
    p = jnp.exp(log_p)
    # Replace both logs where p = 0 (not just the product), so the backward pass never forms 0·inf either.
    support = p > 0
    safe_log_p, safe_log_q = jnp.where(support, log_p, 0.0), jnp.where(support, log_q, 0.0)
    return jnp.sum(jnp.where(support, p * (safe_log_p - safe_log_q), 0.0), axis=-1)


def _log_mixture(a: Float[Array, "... V"], b: Float[Array, "... V"]) -> Float[Array, "... V"]:
    """``log(exp(a) + exp(b))``; −inf where both are −inf, with a finite (zero) gradient there."""
    empty = (a == -jnp.inf) & (b == -jnp.inf)
    both = jnp.logaddexp(jnp.where(empty, 0.0, a), jnp.where(empty, 0.0, b))
    return jnp.where(empty, -jnp.inf, both)


def generalized_jsd_loss(
    student_logits: Float[Array, "B T V"],
    teacher_logits: Float[Array, "B T V"],
    mask: Array | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> tuple[Float[Array, "B T"], dict[str, Float[Array, ""]]]:
    """Per-position generalized Jensen-Shannon divergence between the student's and the teacher's distributions.

    Formula (``s = log_softmax(z_s / τ)``, ``t = log_softmax(z_t / τ)`` in float32, ``τ = temperature``,
    ``m = (1 − β)·exp(s) + β·exp(t)`` the mixture)::

        β = 0:      ℓ = KL(t ‖ s) = Σ_v p_t (log p_t − log p_s)          (forward KL, "supervised KD")
        β = 1:      ℓ = KL(s ‖ t) = Σ_v p_s (log p_s − log p_t)          (reverse KL)
        otherwise:  ℓ = β·KL(t ‖ m) + (1 − β)·KL(s ‖ m)

    with ``log m = logaddexp(s + log(1 − β), t + log β)``. At ``β = 0.5`` this is the Jensen-Shannon divergence;
    as ``β → 0`` it tends to ``β·KL(t ‖ s)``, which is why ``β = 0`` and ``β = 1`` are special-cased (TRL does the
    same). The teacher's logits are held constant (``stop_gradient``).

    Reduce with :func:`jaxalign.losses.core.aggregate` (``mode="token_mean"``): that is TRL's
    ``reduction="batchmean"`` over the unmasked tokens, exact under gradient accumulation.

    Args:
        student_logits: ``[B, T, V]`` the student's next-token logits, aligned with ``teacher_logits`` (for a
            causal LM pass ``logits[:, :-1]`` of both). Any float dtype; computed in float32.
        teacher_logits: ``[B, T, V]`` the teacher's, same vocabulary.
        mask: ``[B, T]`` positions that count (the completion tokens); None: every position. Masked positions
            may hold non-finite logits: they are zeroed before the log-softmax and give 0.
        beta: β in ``[0, 1]`` (TRL ``GKDConfig.beta``, default 0.5).
        temperature: τ > 0 dividing both logits before the log-softmax.

    Returns:
        ``(loss, metrics)``: ``loss`` is ``[B, T]`` float32 (summed over the vocabulary, 0 where masked);
        metrics (means over the masked positions): ``jsd`` (the loss), ``top1_agreement`` (the student's and
        the teacher's arg-max tokens agree), ``student_entropy`` and ``teacher_entropy`` (at temperature τ).

    Raises:
        ValueError: ``beta`` outside ``[0, 1]``, ``temperature`` not > 0, or the two vocabularies differ.

    References:
        Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated
        Mistakes" (GKD), arXiv 2306.13649, Eq. (1) and Sec. 3; TRL ``GKDTrainer.generalized_jsd_loss``.
        Temperature: Hinton et al. 2015, arXiv 1503.02531.

    Notes:
        Matches TRL's static ``GKDTrainer.generalized_jsd_loss`` element for element (before its reduction). A
        vocabulary entry with probability exactly 0 (a ``-inf`` logit) adds 0 here where TRL's ``F.kl_div``
        gives NaN. Like TRL, no ``τ²`` factor (Hinton's gradient rescaling) is applied.
    """
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise ValueError(f"generalized_jsd_loss: beta must be a number in [0, 1] (0: KL(teacher || student), "
                         f"1: KL(student || teacher)), got {beta!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"generalized_jsd_loss: temperature must be a finite number > 0, got {temperature!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"generalized_jsd_loss: student logits {student_logits.shape} and teacher logits "
                         f"{teacher_logits.shape} differ in shape (a shared vocabulary is needed)")
    valid = as_mask(mask, student_logits[..., 0])
    teacher_logits = jax.lax.stop_gradient(teacher_logits)

    def log_probs(logits):
        # Padded positions may hold non-finite logits: zeroed before any nonlinearity, so their (zero)
        # cotangent stays finite through the log-softmax.
        logits = jnp.where(valid[..., None], logits.astype(F32), 0.0)
        return jax.nn.log_softmax(logits / temperature if temperature != 1.0 else logits, axis=-1)

    student, teacher = log_probs(student_logits), log_probs(teacher_logits)
    if beta == 0:
        per_token = _kl(teacher, student)
    elif beta == 1:
        per_token = _kl(student, teacher)
    else:
        mixture = _log_mixture(student + math.log1p(-beta), teacher + math.log(beta))
        per_token = beta * _kl(teacher, mixture) + (1.0 - beta) * _kl(student, mixture)
    per_token = jnp.where(valid, per_token, 0.0)
    metrics = {
        "jsd": masked_mean(per_token, valid),
        "top1_agreement": masked_mean(jnp.argmax(student, -1) == jnp.argmax(teacher, -1), valid),
        "student_entropy": masked_mean(-_kl(student, jnp.zeros_like(student)), valid),
        "teacher_entropy": masked_mean(-_kl(teacher, jnp.zeros_like(teacher)), valid),
    }
    return per_token, jax.tree.map(jax.lax.stop_gradient, metrics)
