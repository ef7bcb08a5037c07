"""Direct preference optimisation and its relatives that keep a reference model: DPO (all of TRL's pairwise
loss types, f-divergences, multi-loss mixtures, RPO, WPO weighting, LD-DPO) and the unpaired KTO loss.

Inputs are *sequence* log-probabilities (already summed over the completion with
:func:`jaxalign.losses.core.sequence_logps`), so every function here is O(B) and model-agnostic.
The reference-free objectives (SimPO, ORPO) live in :mod:`jaxalign.losses.reference_free`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, Real

from jaxalign.losses.core import F32, as_mask, masked_mean, masked_sum, token_logps

__all__ = [
    "DPO_LOSS_TYPES",
    "F_DIVERGENCES",
    "KTO_LOSS_TYPES",
    "dpo_loss",
    "kto_loss",
    "ld_sequence_logps",
    "wpo_weights",
]

#: The ``loss_type`` values of :func:`dpo_loss` (TRL's names; docs/losses.md has each formula).
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)
#: The ``f_divergence`` values of :func:`dpo_loss` (f-DPO's divergences).
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
#: The ``loss_type`` values of :func:`kto_loss`.
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")

# The f-DPO reparameterisation leaves a β·log Z(x) term that only cancels in the chosen − rejected score
# difference, so only the losses built on that difference generalise to other f-divergences.
_F_DIVERGENCE_LOSS_TYPES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop"})
_LENGTH_NORMALISED = frozenset({"ipo", "sigmoid_norm"})
_SMOOTHED = frozenset({"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired"})
_SORTED = frozenset({"aot", "aot_unpaired"})
# TRL clamps (α−1)·log-ratio before exp so that exp stays finite in float32.
_ALPHA_DIVERGENCE_CLAMP = 80.0

Metrics = dict[str, Float[Array, ""]]


def _f_scores(logratios: Array, f_divergence: str, alpha: float) -> Array:
    """f'(u) at u = π/π_ref, from log u (f-DPO, arXiv 2309.16240, Table 1)."""
    if f_divergence == "reverse_kl" or (f_divergence == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return logratios
    if f_divergence == "forward_kl":
        # 1 − 1/u; expm1 keeps precision when u ≈ 1.
        return -jnp.expm1(-logratios)
    if f_divergence == "js_divergence":
        # log(2u / (1 + u))
        return math.log(2.0) + jax.nn.log_sigmoid(logratios)
    # (u^(α−1) − 1)/(α − 1)
    exponent = jnp.minimum((alpha - 1.0) * logratios, _ALPHA_DIVERGENCE_CLAMP)
    return jnp.expm1(exponent) / (alpha - 1.0)


def _smoothed_sigmoid(z: Array, epsilon: float) -> Array:
    """−(1−ε)·log σ(z) − ε·log σ(−z), the conservative (cDPO) Bradley–Terry loss."""
    return -(1.0 - epsilon) * jax.nn.log_sigmoid(z) - epsilon * jax.nn.log_sigmoid(-z)


def _per_length(scores: Array, lengths: Array | None) -> Array:
    return scores / jnp.maximum(jnp.asarray(lengths, F32), 1.0)


def _sort_valid(values: Array, valid: Array) -> Array:
    """Sort the valid entries among themselves: the k-th valid slot receives the k-th smallest valid value.

    Without masked slots this is ``jnp.sort``. Masked slots sort last (+inf) and are then set to 0, so the
    sentinel never reaches any arithmetic (or its gradient).
    """
    ordered = jnp.sort(jnp.where(valid, values, jnp.inf))
    rank = jnp.maximum(jnp.cumsum(valid) - 1, 0)
    return jnp.where(valid, ordered[rank], 0.0)


def _validate_dpo(
    loss_types: tuple[str, ...],
    loss_weights: tuple[float, ...],
    *,
    beta: float,
    label_smoothing: float,
    discopop_tau: float,
    f_divergence: str,
    has_lengths: bool,
    has_weights: bool,
    rpo_alpha: float | None,
    has_nll: bool,
) -> None:
    for loss_type in loss_types:
        if loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    if not loss_types:
        raise ValueError(f"dpo_loss: loss_type is empty; expected one or more of {DPO_LOSS_TYPES}")
    if len(loss_weights) != len(loss_types):
        raise ValueError(
            f"dpo_loss: loss_weights has {len(loss_weights)} entries for {len(loss_types)} loss types {loss_types}"
        )
    if f_divergence not in F_DIVERGENCES:
        raise ValueError(f"dpo_loss: unknown f_divergence {f_divergence!r}; expected one of {F_DIVERGENCES}")
    if f_divergence != "reverse_kl" and not set(loss_types) <= _F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(
            f"dpo_loss: f_divergence={f_divergence!r} is only defined for loss types "
            f"{sorted(_F_DIVERGENCE_LOSS_TYPES)}; got {loss_types}"
        )
    if beta <= 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5], got {label_smoothing}")
    if label_smoothing and not set(loss_types) & _SMOOTHED:
        raise ValueError(
            f"dpo_loss: label_smoothing={label_smoothing} has no effect on {loss_types}; "
            f"it is used by {sorted(_SMOOTHED)}"
        )
    if "robust" in loss_types and label_smoothing >= 0.5:
        raise ValueError("dpo_loss: 'robust' divides by 1 − 2·label_smoothing; label_smoothing must be < 0.5")
    if "exo_pair" in loss_types and label_smoothing == 0.0:
        raise ValueError("dpo_loss: 'exo_pair' needs label_smoothing > 0 (log ε); the EXO paper uses 1e-3")
    if "discopop" in loss_types and discopop_tau <= 0:
        raise ValueError(f"dpo_loss: discopop_tau must be > 0, got {discopop_tau}")
    needs_lengths = sorted(set(loss_types) & _LENGTH_NORMALISED)
    if needs_lengths and not has_lengths:
        raise ValueError(
            f"dpo_loss: loss types {needs_lengths} normalise by completion length; "
            "pass chosen_lengths and rejected_lengths ([B] completion token counts)"
        )
    if has_weights and set(loss_types) & _SORTED:
        raise ValueError("dpo_loss: pair weights cannot be combined with 'aot'/'aot_unpaired', which sort the batch")
    if (rpo_alpha is None) != (not has_nll):
        raise ValueError("dpo_loss: RPO needs both rpo_alpha and chosen_nll (or neither)")


class _Pair(NamedTuple):
    """What every pairwise loss type reads: the margins, log-ratios and scores of a batch of pairs ``[B]``."""

    z: Array  # β·(score_w − score_l): the DPO margin (scores are log-ratios, or f-divergence scores)
    beta_c: Array  # β·log(π/π_ref)(y_w)
    beta_r: Array  # β·log(π/π_ref)(y_l)
    chosen_logratios: Array
    rejected_logratios: Array
    chosen_logps: Array
    rejected_logps: Array
    ref_chosen_logps: Array
    ref_rejected_logps: Array
    chosen_scores: Array
    rejected_scores: Array
    chosen_lengths: Array | None
    rejected_lengths: Array | None
    valid: Array
    beta: float
    eps: float  # label_smoothing
    discopop_tau: float


def _length_normalised(p: _Pair, *, squared: bool) -> Array:
    delta = _per_length(p.chosen_scores, p.chosen_lengths) - _per_length(p.rejected_scores, p.rejected_lengths)
    return (delta - 1.0 / (2.0 * p.beta)) ** 2 if squared else -jax.nn.log_sigmoid(p.beta * delta)


def _exo_pair(p: _Pair) -> Array:
    log_q_w, log_q_l = jax.nn.log_sigmoid(p.z), jax.nn.log_sigmoid(-p.z)
    return jnp.exp(log_q_w) * (log_q_w - math.log1p(-p.eps)) + jnp.exp(log_q_l) * (log_q_l - math.log(p.eps))


def _robust(p: _Pair) -> Array:
    clean = -(1.0 - p.eps) * jax.nn.log_sigmoid(p.z)
    flipped = -p.eps * jax.nn.log_sigmoid(-p.z)
    return (clean - flipped) / (1.0 - 2.0 * p.eps)


def _aot(p: _Pair) -> Array:
    policy = _sort_valid(p.chosen_logps - p.rejected_logps, p.valid)
    reference = _sort_valid(p.ref_chosen_logps - p.ref_rejected_logps, p.valid)
    return _smoothed_sigmoid(p.beta * (policy - reference), p.eps)


def _aot_unpaired(p: _Pair) -> Array:
    sorted_chosen = _sort_valid(p.chosen_logratios, p.valid)
    return _smoothed_sigmoid(p.beta * (sorted_chosen - _sort_valid(p.rejected_logratios, p.valid)), p.eps)


def _discopop(p: _Pair) -> Array:
    # e^(−z)·σ(z/τ) in log space so a large negative z gives 0, not inf·0.
    log_mix = jax.nn.log_sigmoid(p.z / p.discopop_tau)
    return -jax.nn.log_sigmoid(p.z) * jax.nn.sigmoid(-p.z / p.discopop_tau) + jnp.exp(log_mix - p.z)


# Each loss type's per-pair loss (TRL 1.16's DPOTrainer formulas; see dpo_loss's docstring).
_PAIR_LOSSES: dict[str, Callable[[_Pair], Array]] = {
    "sigmoid": lambda p: _smoothed_sigmoid(p.z, p.eps),
    "hinge": lambda p: jax.nn.relu(1.0 - p.z),
    "ipo": lambda p: _length_normalised(p, squared=True),
    "sigmoid_norm": lambda p: _length_normalised(p, squared=False),
    "exo_pair": _exo_pair,
    "nca_pair": lambda p: (-jax.nn.log_sigmoid(p.beta_c) - 0.5 * jax.nn.log_sigmoid(-p.beta_c)
                           - 0.5 * jax.nn.log_sigmoid(-p.beta_r)),
    "robust": _robust,
    "bco_pair": lambda p: -jax.nn.log_sigmoid(p.beta_c) - jax.nn.log_sigmoid(-p.beta_r),
    "sppo_hard": lambda p: (p.chosen_logratios - 0.5 / p.beta) ** 2 + (p.rejected_logratios + 0.5 / p.beta) ** 2,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": lambda p: 1.0 - jax.nn.sigmoid(p.beta_c) + jax.nn.sigmoid(p.beta_r),
    "apo_down": lambda p: jax.nn.sigmoid(p.beta_c) + 1.0 - jax.nn.sigmoid(p.beta_c - p.beta_r),
    "discopop": _discopop,
}


def dpo_loss(
    chosen_logps: Float[Array, " B"],
    rejected_logps: Float[Array, " B"],
    ref_chosen_logps: Float[Array, " B"],
    ref_rejected_logps: Float[Array, " B"],
    chosen_lengths: Real[Array, " B"] | None = None,
    rejected_lengths: Real[Array, " B"] | None = None,
    chosen_nll: Float[Array, " B"] | None = None,
    weights: Float[Array, " B"] | None = None,
    mask: Bool[Array, " B"] | None = None,
    *,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
    rpo_alpha: float | None = None,
) -> tuple[Float[Array, " B"], Metrics]:
    """Per-pair DPO loss (any of TRL's pairwise loss types, alone or as a weighted mixture).

    With log-ratios ``c = log π(y_w) − log π_ref(y_w)``, ``r = log π(y_l) − log π_ref(y_l)``, f-divergence
    scores ``s_w = f'(e^c)``, ``s_l = f'(e^r)`` (``f'(u) = log u`` for the default reverse KL),
    ``Δ = s_w − s_l``, ``z = β·Δ``, σ the logistic function, ε = ``label_smoothing``::

        sigmoid       −(1−ε)·log σ(z) − ε·log σ(−z)                         (ε > 0: cDPO)
        hinge         max(0, 1 − z)
        ipo           (s_w/|y_w| − s_l/|y_l| − 1/(2β))²
        exo_pair      σ(z)·(log σ(z) − log(1−ε)) + σ(−z)·(log σ(−z) − log ε)
        nca_pair      −log σ(βc) − ½·log σ(−βc) − ½·log σ(−βr)
        robust        (−(1−ε)·log σ(z) + ε·log σ(−z)) / (1 − 2ε)
        bco_pair      −log σ(βc) − log σ(−βr)
        sppo_hard     (c − 1/(2β))² + (r + 1/(2β))²
        aot           smoothed sigmoid of β·(sort_B(log π(y_w) − log π(y_l)) − sort_B(ref. same))
        aot_unpaired  smoothed sigmoid of β·(sort_B(c) − sort_B(r))
        apo_zero      1 − σ(βc) + σ(βr)
        apo_down      σ(βc) + 1 − σ(β(c − r))
        discopop      (1 − m)·(−log σ(z)) + m·e^(−z),   m = σ(z/τ)
        sigmoid_norm  −log σ(β·(s_w/|y_w| − s_l/|y_l|))

    A mixture is ``ℓ = Σ_k w_k·ℓ_k`` (``loss_weights``, MPO-style). Then, optionally,
    ``ℓ ← (ℓ + α_RPO·nll_w)·ω`` with the RPO term and the pair weight ω (WPO).

    Args:
        chosen_logps: ``[B]`` policy log π(y_w|x), summed over completion tokens.
        rejected_logps: ``[B]`` policy log π(y_l|x).
        ref_chosen_logps: ``[B]`` reference log π_ref(y_w|x); treated as a constant (``stop_gradient``).
        ref_rejected_logps: ``[B]`` reference log π_ref(y_l|x).
        chosen_lengths: ``[B]`` completion token counts ``|y_w|`` (the mask sum); required by ``ipo`` and
            ``sigmoid_norm``, clamped to ≥ 1.
        rejected_lengths: ``[B]`` completion token counts ``|y_l|``.
        chosen_nll: ``[B]`` per-sequence NLL of the chosen completion for RPO (e.g. the per-sequence token
            mean of :func:`jaxalign.losses.sft.sft_loss`); used with ``rpo_alpha``.
        weights: ``[B]`` per-pair weights ω, e.g. ``wpo_weights(chosen) * wpo_weights(rejected)`` for WPO.
        mask: ``[B]`` validity of the pairs, so a jitted step can pad the batch to a static size; None = all
            valid. A masked pair gets loss 0 and is left out of every metric (and of the sort of ``aot*``);
            its entries in every input may hold any value, even NaN/inf, which reaches neither the values
            nor the gradients.
        loss_type: one of :data:`DPO_LOSS_TYPES`, or a sequence of them for a mixture (static).
        loss_weights: one weight per loss type (default all 1).
        beta: β > 0 (τ, the regulariser, for IPO).
        label_smoothing: ε in [0, 0.5]; the flip rate of ``sigmoid`` (cDPO), ``robust`` (< 0.5), ``aot*``,
            and the smoothing of ``exo_pair`` (> 0).
        discopop_tau: τ of ``discopop``.
        f_divergence: one of :data:`F_DIVERGENCES`; only for losses built on Δ (sigmoid, sigmoid_norm, hinge,
            ipo, exo_pair, robust, discopop).
        f_alpha: α of ``alpha_divergence`` in TRL's convention ``f'(u) = (u^(α−1) − 1)/(α − 1)``.
        rpo_alpha: weight of the chosen NLL (RPO); requires ``chosen_nll``.

    Returns:
        ``(loss, metrics)``: ``loss`` is ``[B]`` float32, 0 for masked pairs; its mean over the valid pairs
        (``masked_mean(loss, mask)``) is TRL's batch loss. For ``aot`` and ``aot_unpaired`` the k-th valid
        entry is the k-th *sorted* valid pair, not pair k. Metrics (means over the valid pairs, 0 when there
        is none): ``rewards/chosen`` (β·c), ``rewards/rejected`` (β·r), ``rewards/margins``,
        ``rewards/accuracies`` (fraction with β·c > β·r), ``logps/chosen``, ``logps/rejected`` and, with
        RPO, ``nll_loss``.

    Examples:
        Sequence log-probs of two pairs; the second pair's policy still equals the reference, so its loss
        is ln 2 and its margin 0 (not counted as accurate):

        >>> import jax.numpy as jnp
        >>> from jaxalign import losses
        >>> chosen, rejected = jnp.array([-12.0, -7.5]), jnp.array([-15.0, -9.0])
        >>> ref_chosen, ref_rejected = jnp.array([-13.0, -7.5]), jnp.array([-14.0, -9.0])
        >>> values, metrics = losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)
        >>> [round(float(v), 4) for v in values]
        [0.5981, 0.6931]
        >>> float(metrics["rewards/accuracies"])
        0.5

    References:
        DPO: Rafailov et al. 2023, arXiv 2305.18290, Eq. 7. cDPO: Mitchell 2023, "A note on DPO with noisy
        preferences". IPO: Azar et al. 2023, arXiv 2310.12036, Eq. 17. Hinge (SLiC/RSO): Zhao et al. 2023,
        arXiv 2305.10425; Liu et al. 2023, arXiv 2309.06657. EXO: Ji et al. 2024, arXiv 2402.00856, Eq. 16.
        NCA: Chen et al. 2024, arXiv 2402.05369. Robust DPO: Chowdhury et al. 2024, arXiv 2403.00409.
        BCO: Jung et al. 2024, arXiv 2404.04656. SPPO: Wu et al. 2024, arXiv 2405.00675, Eq. 4.7 (hard
        labels). AOT: Melnyk et al. 2024, arXiv 2406.05882. APO: D'Oosterlinck et al. 2024, arXiv
        2408.06266, Eqs. 7–8. DiscoPOP: Lu et al. 2024, arXiv 2406.08414, Eq. 5. f-DPO: Wang et al. 2023,
        arXiv 2309.16240, Table 1. RPO: Pang et al. 2024, arXiv 2404.19733. WPO: Zhou et al. 2024, arXiv
        2406.11827, Eq. 2. MPO mixtures: Wang et al. 2024, arXiv 2411.10442.

    Notes:
        - Parity target: TRL 1.16 ``DPOTrainer._compute_loss`` (mean of ``loss`` = TRL's loss, metrics equal).
        - ``sigmoid`` applies ε (cDPO, as TRL ≤ 0.11 did); TRL 1.16 silently ignores ``label_smoothing`` for
          ``sigmoid``. With ε = 0 both agree. A non-zero ε that no selected loss type uses raises ValueError
          (TRL ignores it); so does ε > 0.5 (a flip rate above ½ inverts the labels) and, for ``robust``,
          ε = ½ (TRL only warns).
        - ``ipo``/``sigmoid_norm`` divide each score by its completion length (clamped ≥ 1) as TRL does; the
          IPO paper states the loss on whole-sequence log-ratios (TRL's comment: the authors confirmed the
          normalised form produced the paper's results).
        - ``bco_pair`` follows TRL 1.16 (no running reward-mean shift δ, which the BCO paper and TRL ≤ 0.11
          subtract).
        - ``discopop`` computes ``m·e^(−z)`` as ``exp(log σ(z/τ) − z)``: equal where TRL is finite, and finite
          (→ 0) where TRL's ``e^(−z)`` overflows to ``inf·0 = NaN`` for large negative z.
        - ``forward_kl``/``alpha_divergence`` use ``expm1`` where TRL writes ``exp(·) − 1`` (same value, no
          cancellation). ``f_alpha`` is TRL 1.16's α, i.e. the f-DPO paper's α-divergence with
          α_paper = 1 − α (identical at the default ½).
        - RPO: TRL 1.16 spells it ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, α]`` with a token mean
          over the whole batch; TRL 0.11's ``rpo_alpha`` used the same batch token mean. Here the NLL is per
          sequence and the caller chooses its normalisation: ``nll_b = B·Σ_t nll_bt / Σ_bt m_bt`` reproduces
          TRL exactly, the per-sequence token mean is the RPO paper's ``−log π(y_w|x)/|y_w|``.
        - Weights multiply the whole per-pair loss including the RPO term, as TRL's ``use_weighting`` multiplies
          every loss type including ``"sft"``.
        - TRL's ``loss_type="sft"`` (a batch token mean, not a per-pair quantity) is not a loss type here; use
          ``rpo_alpha`` or add :func:`jaxalign.losses.sft.sft_loss` to the reduced loss.
        - ``mask`` has no TRL counterpart (TRL batches are never padded with whole pairs). An empty batch
          (B = 0 or every pair masked) gives metrics of 0 where TRL's means are NaN.
    """
    loss_types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    loss_weights = (1.0,) * len(loss_types) if loss_weights is None else tuple(loss_weights)
    _validate_dpo(
        loss_types,
        loss_weights,
        beta=beta,
        label_smoothing=label_smoothing,
        discopop_tau=discopop_tau,
        f_divergence=f_divergence,
        has_lengths=chosen_lengths is not None and rejected_lengths is not None,
        has_weights=weights is not None,
        rpo_alpha=rpo_alpha,
        has_nll=chosen_nll is not None,
    )
    valid = as_mask(mask, jnp.asarray(chosen_logps))

    def select(values: Array | None, fill: float = 0.0) -> Array | None:
        # Masked slots are replaced before any arithmetic, so NaN/inf padding cannot reach a value or gradient.
        return None if values is None else jnp.where(valid, jnp.asarray(values).astype(F32), fill)

    chosen_logps, rejected_logps = select(chosen_logps), select(rejected_logps)
    # The reference is a constant of the objective (TRL scores it under no_grad), even if it shares parameters.
    ref_chosen_logps, ref_rejected_logps = jax.lax.stop_gradient(
        (select(ref_chosen_logps), select(ref_rejected_logps))
    )
    chosen_lengths, rejected_lengths = select(chosen_lengths, 1.0), select(rejected_lengths, 1.0)
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    chosen_scores = _f_scores(chosen_logratios, f_divergence, f_alpha)
    rejected_scores = _f_scores(rejected_logratios, f_divergence, f_alpha)
    beta_c, beta_r = beta * chosen_logratios, beta * rejected_logratios
    pair = _Pair(z=beta * (chosen_scores - rejected_scores), beta_c=beta_c, beta_r=beta_r,
                 chosen_logratios=chosen_logratios, rejected_logratios=rejected_logratios,
                 chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
                 ref_rejected_logps=ref_rejected_logps, chosen_scores=chosen_scores, rejected_scores=rejected_scores,
                 chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, valid=valid, beta=beta,
                 eps=label_smoothing, discopop_tau=discopop_tau)
    loss = sum(weight * _PAIR_LOSSES[kind](pair) for kind, weight in zip(loss_types, loss_weights, strict=True))
    metrics = _reward_metrics(beta_c, beta_r, chosen_logps, rejected_logps, valid, valid)
    metrics["rewards/accuracies"] = masked_mean(beta_c > beta_r, valid)
    if rpo_alpha is not None:
        nll = select(chosen_nll)
        loss = loss + rpo_alpha * nll
        metrics["nll_loss"] = masked_mean(jax.lax.stop_gradient(nll), valid)
    if weights is not None:
        loss = loss * select(weights)
    return jnp.where(valid, loss, 0.0), metrics


def _reward_metrics(
    chosen_rewards: Array,
    rejected_rewards: Array,
    chosen_logps: Array,
    rejected_logps: Array,
    chosen_mask: Array | None = None,
    rejected_mask: Array | None = None,
) -> Metrics:
    """TRL's reward and log-prob means over the valid entries (stop-gradient: metrics carry no gradient)."""
    chosen_rewards, rejected_rewards, chosen_logps, rejected_logps = jax.lax.stop_gradient(
        (chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)
    )
    reward_chosen = masked_mean(chosen_rewards, chosen_mask)
    reward_rejected = masked_mean(rejected_rewards, rejected_mask)
    return {
        "rewards/chosen": reward_chosen,
        "rewards/rejected": reward_rejected,
        "rewards/margins": reward_chosen - reward_rejected,
        "logps/chosen": masked_mean(chosen_logps, chosen_mask),
        "logps/rejected": masked_mean(rejected_logps, rejected_mask),
    }


def ld_sequence_logps(
    chosen_token_logps: Float[Array, "B Tw"],
    rejected_token_logps: Float[Array, "B Tl"],
    chosen_mask: Array,
    rejected_mask: Array,
    *,
    alpha: float,
) -> tuple[Float[Array, " B"], Float[Array, " B"]]:
    """Length-desensitised sequence log-probs of a pair (LD-DPO): tokens past the shorter response weigh α.

    Formula, with ``ℓ_p = min(|y_w|, |y_l|)`` the pair's shared ("public") length and ``k`` the position of a
    token inside its completion (1-based)::

        log π̃(y|x) = Σ_{k ≤ ℓ_p} log π(y_k|·) + α·Σ_{k > ℓ_p} log π(y_k|·)

    Apply it to both the policy and the reference token log-probs, then call :func:`dpo_loss`.

    Args:
        chosen_token_logps: ``[B, Tw]`` per-token log-probs of the chosen completions.
        rejected_token_logps: ``[B, Tl]`` per-token log-probs of the rejected completions.
        chosen_mask: ``[B, Tw]`` completion mask (prompt and padding 0; may hold gaps).
        rejected_mask: ``[B, Tl]`` completion mask.
        alpha: weight in [0, 1] of the excess tokens (1 = plain DPO, 0 = truncate to the shared length).

    Returns:
        ``(chosen_logps, rejected_logps)``, each ``[B]`` float32.

    References:
        Liu et al. 2024, "Length Desensitization in Direct Preference Optimization", arXiv 2409.06411
        (the decomposition of the likelihood into public-length and excess parts).

    Notes:
        Matches TRL 1.16's ``ld_alpha`` (positions counted by the cumulative completion mask). Masked slots are
        excluded by selection, so garbage there never leaks (TRL relies on its LM head writing 0 there).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"ld_sequence_logps: alpha must be in [0, 1], got {alpha}")
    chosen_mask = as_mask(chosen_mask, chosen_token_logps)
    rejected_mask = as_mask(rejected_mask, rejected_token_logps)
    shared = jnp.minimum(jnp.sum(chosen_mask, -1), jnp.sum(rejected_mask, -1))[:, None]

    def weighted(token_values: Array, mask: Array) -> Array:
        position = jnp.cumsum(mask, axis=-1)
        token_values = jnp.asarray(token_values, F32)
        return masked_sum(jnp.where(position <= shared, token_values, alpha * token_values), mask, axis=-1)[0]

    return weighted(chosen_token_logps, chosen_mask), weighted(rejected_token_logps, rejected_mask)


def wpo_weights(
    logits: Float[Array, "B T V"], targets: Int[Array, "B T"], mask: Array | None = None
) -> Float[Array, " B"]:
    """WPO weight of each sequence: its length-normalised probability under the current policy, aligned.

    Formula: ``w(y) = exp( (1/|y|)·Σ_t [log π(y_t|·) − log Σ_v π(v|·)²] )`` (no gradient). The pair weight
    is ``w(y_w)·w(y_l)``; pass it as ``weights`` to :func:`dpo_loss`.

    Args:
        logits: ``[B, T, V]`` policy logits aligned with ``targets`` (``logits[:, :-1]`` / ``tokens[:, 1:]``).
        targets: ``[B, T]`` token ids.
        mask: ``[B, T]`` completion mask; the mean is over its tokens (count clamped to ≥ 1).

    Returns:
        ``[B]`` float32 weights in ``(0, (1 + √V)/2]``, wrapped in ``stop_gradient`` (so a pair weight lies in
        ``(0, ((1 + √V)/2)²]``). They are *not* bounded by 1: each is the geometric mean over tokens of
        ``ρ_t = π(y_t|·)/Σ_v π(v|·)²``, and since ``Σ_v π_v² ≥ p² + (1 − p)²/(V − 1)`` for ``p = π(y_t|·)``
        (Cauchy–Schwarz), ``ρ_t ≤ max_p p/(p² + (1 − p)²/(V − 1)) = (1 + √V)/2``, reached at ``p = 1/√V``
        with the rest of the mass spread evenly. ``ρ_t = 1`` for a uniform or a one-hot π, and
        ``E_{y_t∼π}[ρ_t] = 1``: on-policy tokens weigh 1 on average, which is the point of the alignment.
        An empty row has weight 1.

    References:
        Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization", arXiv 2406.11827, Eq. 2
        and the "aligned" sampling-probability correction of Sec. 3.

    Notes:
        - Matches TRL 1.16's ``use_weighting=True`` (``log_probs − log_sum_sq_probs`` averaged over completion
          tokens, exponentiated, batch-unnormalised, no clamp).
        - The WPO authors' released trainer (github.com/wzhouad/WPO, ``scripts/run_wpo.py``) computes the same
          per-sequence quantity but clamps the *pair* weight at 1; TRL does not, and we follow TRL (the parity
          target). Reproduce the authors' code with ``jnp.minimum(w_w * w_l, 1.0)``.
    """
    logits32 = jax.lax.stop_gradient(logits).astype(F32)
    # log Σ_v p_v² = logsumexp(2z) − 2·logsumexp(z): no full-vocabulary probabilities are materialised.
    log_sum_sq = jax.nn.logsumexp(2.0 * logits32, axis=-1) - 2.0 * jax.nn.logsumexp(logits32, axis=-1)
    aligned = token_logps(logits32, targets) - log_sum_sq
    return jnp.exp(masked_mean(aligned, mask, axis=-1))


def kto_loss(
    chosen_logps: Float[Array, " Bw"],
    rejected_logps: Float[Array, " Bl"],
    ref_chosen_logps: Float[Array, " Bw"],
    ref_rejected_logps: Float[Array, " Bl"],
    kl_logps: Float[Array, " M"] | None = None,
    ref_kl_logps: Float[Array, " M"] | None = None,
    chosen_mask: Bool[Array, " Bw"] | None = None,
    rejected_mask: Bool[Array, " Bl"] | None = None,
    kl_mask: Bool[Array, " M"] | None = None,
    *,
    loss_type: str = "kto",
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Float[Array, " N"], Metrics]:
    """Kahneman–Tversky optimisation on unpaired desirable / undesirable completions.

    Formula, with log-ratios ``c = log π(y|x) − log π_ref(y|x)`` and the reference point
    ``z₀ = sg(max(0, mean_j [log π(y'_j|x'_j) − log π_ref(y'_j|x'_j)]))`` estimated on mismatched
    (prompt, completion) pairs::

        kto                desirable: λ_D·(1 − σ(β·(c − z₀)))    undesirable: λ_U·(1 − σ(β·(z₀ − c)))
        apo_zero_unpaired  desirable: λ_D·(1 − σ(β·c))           undesirable: λ_U·σ(β·c)

    The batch loss is the mean over all valid entries of the returned vector (``masked_mean(loss,
    concatenate([chosen_mask, rejected_mask]))``).

    Args:
        chosen_logps: ``[Bw]`` policy sequence log-probs of the desirable completions.
        rejected_logps: ``[Bl]`` policy sequence log-probs of the undesirable completions (Bl may differ from
            Bw, and either may be 0).
        ref_chosen_logps: ``[Bw]`` reference log-probs of the desirable completions (``stop_gradient``).
        ref_rejected_logps: ``[Bl]`` reference log-probs of the undesirable completions.
        kl_logps: ``[M]`` policy log-probs of the KL completions (each prompt with another example's
            completion); required by ``kto``.
        ref_kl_logps: ``[M]`` reference log-probs of the KL completions.
        chosen_mask: ``[Bw]`` validity of the desirable slots, so a jitted step can pad both lists to a fixed
            size; None = all valid. Invalid slots may hold any value, even NaN.
        rejected_mask: ``[Bl]`` validity of the undesirable slots.
        kl_mask: ``[M]`` validity of the KL completions.
        loss_type: one of :data:`KTO_LOSS_TYPES` (static).
        beta: β > 0.
        desirable_weight: λ_D.
        undesirable_weight: λ_U.

    Returns:
        ``(loss, metrics)``: ``loss`` is ``[N]`` = ``[Bw + Bl]`` float32 (desirable first, as TRL concatenates), 0 in
        invalid slots. Metrics: ``kl`` (z₀), ``rewards/chosen`` and ``rewards/rejected`` (mean β·c over the
        valid slots of each side, 0 when a side is empty), ``rewards/margins`` (their difference),
        ``logps/chosen``, ``logps/rejected``.

    References:
        Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", arXiv 2402.01306,
        Eq. 7 (as cited by TRL); APO-zero (unpaired): D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 7.

    Notes:
        - Parity target: TRL 1.16 ``KTOTrainer._compute_loss`` (loss, kl and reward/log-prob metrics).
        - z₀ is the mean over all valid KL completions given. TRL averages per device and then averages the
          device means; the two agree when every device holds the same number of KL completions.
        - The paper uses λ_D·(1 − σ(·)) with a *per-step* reference point from the same batch; like TRL, the
          reference point here is detached and clamped at 0.
        - When a side is empty TRL omits its metric; here it is 0 (and so is its part of the margin).
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"kto_loss: unknown loss_type {loss_type!r}; expected one of {KTO_LOSS_TYPES}")
    if beta <= 0:
        raise ValueError(f"kto_loss: beta must be > 0, got {beta}")
    chosen_logps, rejected_logps = jnp.asarray(chosen_logps, F32), jnp.asarray(rejected_logps, F32)
    # The reference is a constant of the objective (TRL scores it under no_grad).
    ref_chosen_logps, ref_rejected_logps = jax.lax.stop_gradient(
        (jnp.asarray(ref_chosen_logps, F32), jnp.asarray(ref_rejected_logps, F32))
    )
    chosen_mask = as_mask(chosen_mask, chosen_logps)
    rejected_mask = as_mask(rejected_mask, rejected_logps)
    # Invalid slots are replaced before any arithmetic so that NaN padding cannot reach a gradient.
    chosen_logratios = jnp.where(chosen_mask, chosen_logps - ref_chosen_logps, 0.0)
    rejected_logratios = jnp.where(rejected_mask, rejected_logps - ref_rejected_logps, 0.0)
    if loss_type == "kto":
        if kl_logps is None or ref_kl_logps is None:
            raise ValueError("kto_loss: loss_type='kto' needs kl_logps and ref_kl_logps for the reference point")
        kl_terms = jnp.asarray(kl_logps, F32) - jnp.asarray(ref_kl_logps, F32)
        kl = jax.lax.stop_gradient(jnp.maximum(masked_mean(kl_terms, kl_mask), 0.0))
        chosen_losses = 1.0 - jax.nn.sigmoid(beta * (chosen_logratios - kl))
        rejected_losses = 1.0 - jax.nn.sigmoid(beta * (kl - rejected_logratios))
    else:
        kl = jnp.zeros((), F32)
        chosen_losses = 1.0 - jax.nn.sigmoid(beta * chosen_logratios)
        rejected_losses = jax.nn.sigmoid(beta * rejected_logratios)
    loss = jnp.concatenate(
        [
            jnp.where(chosen_mask, desirable_weight * chosen_losses, 0.0),
            jnp.where(rejected_mask, undesirable_weight * rejected_losses, 0.0),
        ]
    )
    metrics = _reward_metrics(
        beta * chosen_logratios, beta * rejected_logratios, chosen_logps, rejected_logps, chosen_mask, rejected_mask
    )
    metrics["kl"] = kl
    return loss, metrics
