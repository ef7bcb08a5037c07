"""Length-controlled win rate: AlpacaEval 2's logistic regression on the length difference.

A judge that prefers longer answers rewards a policy for talking more. AlpacaEval 2 (Dubois et al. 2024,
arXiv 2404.04475, Sec. 3) fits, on the judged pairs, a GLM of the probability that the policy's answer is
preferred,

    logit P(policy ≻ reference | i) = θ·1 + φ·tanh(Δ_i / sd(Δ)) [+ ψ·difficulty_i],

with ``Δ_i = len(reference_i) − len(policy_i)`` in characters, and reports the mean prediction at ``Δ = 0``:
what the win rate would be if the two answers had the same length. The fit is AlpacaEval's: an L1-penalised
logistic regression without an intercept on continuous targets (each preference ``p_i`` in ``[0, 1]`` is a
row labelled 1 with weight ``p_i`` plus a row labelled 0 with weight ``1 − p_i``), its penalty ``C`` chosen
from ``logspace(−4, 4, 10)`` by 5-fold cross-validation over the pairs (the log loss of the continuous
targets), then refit on every pair. Several answers to one prompt are not independent: given each pair's
prompt (``groups``), the folds keep a prompt's pairs together (scikit-learn's ``GroupKFold``, as AlpacaEval
uses it with one pair per prompt) and the bootstrap resamples prompts, not pairs.

Without AlpacaEval's published per-instruction difficulties and its "gamed" baselines (which the model hubs
host), the model is ``length_controlled_minimal`` (θ and φ only, the win rate then ``σ(θ)``). With them
(``instruction_difficulty`` and ``gamed``) it is ``length_controlled_v1``, AlpacaEval 2's leaderboard model,
whose fit is regularised towards the gamed baselines' rows (weight ``λ/2`` each, ``λ = 0.2``).

Tests hold :func:`length_controlled_win_rate` equal to the ``alpaca-eval`` package's
``get_length_controlled_winrate`` on the same annotations.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence

import numpy as np
from jaxtyping import Float
from scipy import special

from jaxalign.eval.stats import _check_confidence

__all__ = ["GamedRows", "LengthControlled", "group_folds", "length_controlled_win_rate", "preference_from_verdicts"]

CS = np.logspace(-4, 4, 10)  # the penalty grid LogisticRegressionCV searches by default
N_SPLITS = 5
REGULARIZE_TO_BASELINE = 0.2


@dataclasses.dataclass(frozen=True)
class GamedRows:
    """AlpacaEval's annotations of its baseline against the baseline prompted to be verbose or concise
    (``df_gamed.csv``): rows that anchor the GLM's length term.

    Attributes:
        preference: ``[M]`` in ``[0, 1]``, P(the gamed answer wins).
        std_delta_len: ``[M]`` the standardised length difference as AlpacaEval stored it.
        instruction_difficulty: ``[M]`` the instruction's difficulty.
    """

    preference: Float[np.ndarray, " M"]
    std_delta_len: Float[np.ndarray, " M"]
    instruction_difficulty: Float[np.ndarray, " M"]


@dataclasses.dataclass(frozen=True)
class LengthControlled:
    """A length-controlled win rate.

    Attributes:
        rate: the mean predicted preference at equal lengths, in ``[0, 1]``.
        low, high: a percentile bootstrap interval over the prompts (the fit repeated at the selected ``C``),
            NaN when ``bootstrap`` was 0.
        standard_error: AlpacaEval's ``lc_standard_error`` (the standard error of the per-pair predictions; 0
            for the minimal model, whose prediction is the same for every pair), as a fraction.
        model: ``"length_controlled_minimal"`` or ``"length_controlled_v1"``.
        weights: the fitted coefficients by name.
        C: the penalty cross-validation chose.
        pairs: the pairs the fit used (those with a preference).
        confidence: the interval's level.
        prompts: the distinct prompts of those pairs (the folds' and the bootstrap's unit).
    """

    rate: float
    low: float
    high: float
    standard_error: float
    model: str
    weights: dict
    C: float
    pairs: int
    confidence: float
    prompts: int | None = None

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict (a non-finite float becomes None)."""
        values = {**dataclasses.asdict(self), "degenerate": self.degenerate}
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}

    @property
    def degenerate(self) -> bool:
        """Every coefficient shrunk to 0: cross-validation chose a penalty under which the verdicts carry no
        signal the fit keeps, so every prediction is ½ and the rate is 50 % by construction, not a measurement."""
        return all(value == 0 for value in self.weights.values())

    def __str__(self) -> str:
        shown = f"{self.rate:.3f}"
        if math.isfinite(self.low):
            shown += f" [{self.low:.3f}, {self.high:.3f}]"
        if self.degenerate:
            shown += (f" (degenerate: at C = {self.C:g} every coefficient is 0, so 50 % by construction; too few "
                      "or too noisy verdicts to fit)")
        return shown


def preference_from_verdicts(outcomes: Sequence[float | None]) -> np.ndarray:
    """Policy-side outcomes (1 win, ½ tie, 0 loss, None unknown) as preferences in ``[0, 1]``, NaN unknown."""
    return np.asarray([math.nan if o is None else float(o) for o in outcomes], np.float64)


def _penalised_loss(w: np.ndarray, x: np.ndarray, target: np.ndarray, weight: np.ndarray, c: float) -> float:
    """``‖w‖₁ + C·Σ_i s_i·[p_i·log(1 + e^{−x_i·w}) + (1 − p_i)·log(1 + e^{x_i·w})]``: liblinear's L1 logistic
    objective on the duplicated rows (label 1 weighted ``s_i·p_i``, label 0 weighted ``s_i·(1 − p_i)``)."""
    z = x @ w
    return float(c * np.sum(weight * (target * np.logaddexp(0.0, -z) + (1 - target) * np.logaddexp(0.0, z)))
                 + np.sum(np.abs(w)))


@functools.cache
def _patterns(k: int) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]:
    """Every sign pattern of ``k`` coefficients with its support's and the rest's indices."""
    out = []
    for pattern in itertools.product((-1.0, 0.0, 1.0), repeat=k):
        sigma = np.asarray(pattern)
        out.append((sigma, np.flatnonzero(sigma), np.flatnonzero(sigma == 0)))
    return tuple(out)


def _l1_quadratic_minimum(gradient: np.ndarray, hessian: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``argmin_u g·(u − w) + ½(u − w)ᵀH(u − w) + ‖u‖₁`` for a handful of coefficients, exactly.

    The minimiser has some sign pattern ``σ ∈ {−1, 0, 1}^k``; on its support ``S`` it solves the linear system
    ``H_SS (u_S − w_S) = −g_S − σ_S − H_S,¬S (0 − w_¬S)``. Every pattern's solution is a candidate point, the
    true minimiser among them, so the candidate with the lowest objective is the minimum (3^k ≤ 27 systems).
    """
    best, best_value = w, np.inf
    for sigma, support, rest in _patterns(w.size):
        u = np.zeros(w.size)
        if support.size:
            h = hessian[support[:, None], support]
            rhs = h @ w[support] + hessian[support[:, None], rest] @ w[rest] - gradient[support] - sigma[support]
            u[support] = np.linalg.solve(h, rhs)
        d = u - w
        value = gradient @ d + 0.5 * d @ hessian @ d + np.abs(u).sum()
        if value < best_value:
            best, best_value = u, value
    return best


def _fit(x: np.ndarray, target: np.ndarray, weight: np.ndarray, c: float, max_iter: int = 200) -> np.ndarray:
    """The L1-penalised logistic regression's coefficients (no intercept) at penalty ``c``.

    Proximal Newton (as glmnet and liblinear's newGLMNET): the smooth part's quadratic model plus the L1 term is
    minimised exactly (:func:`_l1_quadratic_minimum`), then a backtracking line search on the true objective;
    run to convergence, so the result is the optimum itself, not a tolerance away from it.
    """
    k = x.shape[1]
    w = np.zeros(k)
    current = _penalised_loss(w, x, target, weight, c)
    for _ in range(max_iter):
        p = special.expit(x @ w)
        gradient = c * (x.T @ (weight * (p - target)))
        hessian = c * (x.T * (weight * p * (1 - p))) @ x + 1e-12 * np.eye(k)
        u = _l1_quadratic_minimum(gradient, hessian, w)
        step = u - w
        if np.max(np.abs(step)) <= 1e-13 * (1 + np.max(np.abs(w))):
            break
        decrease = gradient @ step + np.sum(np.abs(u)) - np.sum(np.abs(w))
        alpha = 1.0
        while True:
            candidate = w + alpha * step
            value = _penalised_loss(candidate, x, target, weight, c)
            if value <= current + 1e-4 * alpha * decrease or alpha < 1e-10:
                break
            alpha /= 2
        if value > current:
            break
        w, current = candidate, value
    return w


def _log_loss(x: np.ndarray, target: np.ndarray, weight: np.ndarray | None, w: np.ndarray) -> float:
    """AlpacaEval's continuous log loss (predictions clipped to ``[1e-15, 1 − 1e-15]``; a plain mean of the
    weighted terms)."""
    p = np.clip(special.expit(x @ w), 1e-15, 1 - 1e-15)
    terms = target * np.log(p) + (1 - target) * np.log(1 - p)
    if weight is not None:
        terms = terms * weight
    return float(-np.mean(terms))


def group_folds(groups: Sequence, n_splits: int) -> np.ndarray:
    """``[N]`` the fold of each row: scikit-learn's ``GroupKFold`` (unshuffled) over ``groups``.

    The groups, largest first (equal sizes in the order ``np.unique`` sorts their labels, last first), each go
    to the fold holding the fewest rows so far (the first such fold on a tie). With one group per row, labelled
    in row order, row ``r`` of ``m`` is in fold ``(m − 1 − r) mod n_splits``: AlpacaEval's folds.

    Raises:
        ValueError: fewer groups than folds.
    """
    unique, index = np.unique(np.asarray(groups), return_inverse=True)
    if unique.size < n_splits:
        raise ValueError(f"{unique.size} prompts; the cross-validated fit needs at least {n_splits}")
    sizes = np.bincount(index)
    order = np.argsort(sizes, kind="stable")[::-1]
    filled = np.zeros(n_splits)
    fold_of_group = np.zeros(unique.size, np.int64)
    for group in order:
        lightest = int(np.argmin(filled))
        filled[lightest] += sizes[group]
        fold_of_group[group] = lightest
    return fold_of_group[index]


def _select_c(x: np.ndarray, target: np.ndarray, weight: np.ndarray, score_weight: np.ndarray | None,
              fold: np.ndarray, n_splits: int) -> float:
    """The ``C`` of :data:`CS` with the best summed held-out score over the ``n_splits`` folds ``fold`` gives
    the rows. A tie goes to the smaller ``C``, as ``argmax`` does."""
    totals = np.zeros(len(CS))
    for f in range(n_splits):
        test, train = fold == f, fold != f
        for j, c in enumerate(CS):
            w = _fit(x[train], target[train], weight[train], c)
            held_out = None if score_weight is None else score_weight[test]
            totals[j] -= _log_loss(x[test], target[test], held_out, w)
    return float(CS[int(np.argmax(totals))])


def _row_groups(groups: Sequence | None, rows: int) -> np.ndarray:
    """Integer labels numbering ``groups`` by first appearance (each row its own group when None), so that
    ``np.unique`` orders them as the rows and one group per row gives AlpacaEval's folds."""
    if groups is None:
        return np.arange(rows)
    if isinstance(groups, str) or len(groups) != rows:
        raise ValueError(f"length_controlled_win_rate: groups has {1 if isinstance(groups, str) else len(groups)} "
                         f"labels for {rows} pairs; give the prompt of each pair")
    numbers: dict = {}
    return np.asarray([numbers.setdefault(_hashable(g), len(numbers)) for g in groups], np.int64)


def _hashable(label):
    if isinstance(label, (list, tuple)):
        return tuple(_hashable(v) for v in label)
    if isinstance(label, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in label.items()))
    return label


def length_controlled_win_rate(
    preference: Float[np.ndarray, " N"] | Sequence[float],
    policy_lengths: Sequence[int] | np.ndarray,
    reference_lengths: Sequence[int] | np.ndarray,
    *,
    instruction_difficulty: Float[np.ndarray, " N"] | Sequence[float] | None = None,
    gamed: GamedRows | None = None,
    bootstrap: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
    n_splits: int = N_SPLITS,
    groups: Sequence | None = None,
) -> LengthControlled:
    """AlpacaEval 2's length-controlled win rate of the policy over the reference (formula in the module
    docstring).

    Args:
        preference: ``[N]`` P(the policy's answer is preferred) per pair: 1 win, 0 loss, ½ tie (or any
            probability); NaN where the judge gave no verdict (left out of the fit, kept in the prediction's
            mean, as AlpacaEval does).
        policy_lengths, reference_lengths: ``[N]`` answer lengths in characters.
        instruction_difficulty: ``[N]`` AlpacaEval's per-instruction difficulty (``length_controlled_v1``);
            needs ``gamed``.
        gamed: the gamed baselines' rows (``length_controlled_v1``).
        bootstrap: resamples of the prompts for the interval (the fit at the selected ``C``); 0 for none.
        confidence: the interval's level.
        seed: the bootstrap's random seed.
        n_splits: cross-validation folds.
        groups: ``[N]`` the prompt of each pair (any hashable label, or a conversation): pairs answering one
            prompt share a fold and are resampled together. Default: every pair its own prompt (AlpacaEval).

    Returns:
        A :class:`LengthControlled`.

    Raises:
        ValueError: arrays of different lengths, a preference outside ``[0, 1]``, fewer judged prompts than
            folds, every length difference equal, or ``instruction_difficulty`` without ``gamed``.
    """
    _check_confidence(confidence)
    target = np.asarray(preference, np.float64)
    ours, theirs = np.asarray(policy_lengths, np.float64), np.asarray(reference_lengths, np.float64)
    if target.ndim != 1 or ours.shape != target.shape or theirs.shape != target.shape:
        raise ValueError(f"length_controlled_win_rate: preference {target.shape}, policy_lengths {ours.shape} and "
                         f"reference_lengths {theirs.shape} must be the same 1-D length")
    known = ~np.isnan(target)
    labels = _row_groups(groups, target.size)
    if np.any((target[known] < 0) | (target[known] > 1)):
        raise ValueError("length_controlled_win_rate: preferences must be in [0, 1] (NaN for no verdict)")
    if np.unique(labels[known]).size < n_splits:
        raise ValueError(f"length_controlled_win_rate: {int(known.sum())} judged pairs of "
                         f"{np.unique(labels[known]).size} prompts; the cross-validated fit needs at least "
                         f"{n_splits} prompts")
    if (instruction_difficulty is None) != (gamed is None):
        raise ValueError("length_controlled_win_rate: length_controlled_v1 needs both instruction_difficulty and "
                         "gamed (AlpacaEval's published rows); give neither for the minimal model")
    delta = theirs - ours
    spread = float(np.std(delta, ddof=1)) if delta.size > 1 else 0.0
    if not spread > 0:
        raise ValueError("length_controlled_win_rate: every pair has the same length difference; the length "
                         "term cannot be fitted")
    length_term = np.tanh(delta / spread)
    if gamed is None:
        model, names = "length_controlled_minimal", ["np.tanh(std_delta_len)", "not_gamed_baseline.astype(float)"]
        x = np.stack([length_term, np.ones_like(length_term)], axis=1)
        x_test = np.stack([np.zeros_like(length_term), np.ones_like(length_term)], axis=1)
        x_anchor = np.zeros((0, 2))
        anchor_target = anchor_weight = np.zeros(0)
    else:
        difficulty = np.asarray(instruction_difficulty, np.float64)
        if difficulty.shape != target.shape:
            raise ValueError(f"length_controlled_win_rate: instruction_difficulty has shape {difficulty.shape}, "
                             f"the pairs {target.shape}")
        model = "length_controlled_v1"
        names = ["np.tanh(std_delta_len)", "instruction_difficulty", "not_gamed_baseline.astype(float)"]
        x = np.stack([length_term, difficulty, np.ones_like(length_term)], axis=1)
        x_test = np.stack([np.zeros_like(length_term), difficulty, np.ones_like(length_term)], axis=1)
        anchor_target = np.asarray(gamed.preference, np.float64)
        x_anchor = np.stack([np.tanh(np.asarray(gamed.std_delta_len, np.float64)),
                             np.asarray(gamed.instruction_difficulty, np.float64), np.zeros_like(anchor_target)],
                            axis=1)
        anchor_weight = np.full(anchor_target.shape, REGULARIZE_TO_BASELINE / 2)
    # Training rows: the gamed anchors first, then the judged pairs (AlpacaEval's concatenation order, which
    # decides the folds).
    anchor_known = ~np.isnan(anchor_target)
    train_x = np.concatenate([x_anchor[anchor_known], x[known]])
    train_target = np.concatenate([anchor_target[anchor_known], target[known]])
    train_weight = np.concatenate([anchor_weight[anchor_known], np.ones(int(known.sum()))])
    score_weight = None if gamed is None else train_weight
    anchors = int(anchor_known.sum())
    # Each anchor row is a group of its own, numbered before the prompts (they come first, as their rows do).
    train_groups = np.concatenate([np.arange(anchors), anchors + labels[known]])
    fold = group_folds(train_groups, n_splits)
    c = _select_c(train_x, train_target, train_weight, score_weight, fold, n_splits)
    w = _fit(train_x, train_target, train_weight, c)
    predictions = special.expit(x_test @ w)
    rate = float(np.mean(predictions))
    standard_error = float(np.std(predictions, ddof=1) / math.sqrt(predictions.size)) if predictions.size > 1 else 0.0

    low = high = math.nan
    if bootstrap:
        rng = np.random.default_rng(seed)
        pair_rows = np.flatnonzero(known)
        # Resample prompts (all their pairs together): pairs of one prompt are not independent draws.
        prompt_of_pair = labels[known]
        prompts = np.unique(prompt_of_pair)
        members = [np.flatnonzero(prompt_of_pair == p) for p in prompts]
        rates = np.empty(bootstrap)
        for b in range(bootstrap):
            picked = np.concatenate([members[i] for i in rng.choice(prompts.size, prompts.size)])
            rows = np.concatenate([np.arange(anchors), anchors + picked])
            wb = _fit(train_x[rows], train_target[rows], train_weight[rows], c)
            rates[b] = float(np.mean(special.expit(x_test[pair_rows[picked]] @ wb)))
        low, high = (float(v) for v in np.quantile(rates, [(1 - confidence) / 2, (1 + confidence) / 2]))
    return LengthControlled(rate=rate, low=low, high=high, standard_error=standard_error, model=model,
                            weights={name: float(v) for name, v in zip(names, w)}, C=c, pairs=int(known.sum()),
                            confidence=confidence, prompts=int(np.unique(labels[known]).size))
