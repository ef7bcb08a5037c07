"""Win rates and means with confidence intervals.

Win rate: each row is one paired comparison (the policy's and the reference's response to the same prompt,
drawn with the same random key): win 1, tie ½, loss 0. The interval is the **Wilson score interval** on the
effective count of wins ``s = wins + ½·ties`` out of ``n``::

    p̂ = s / n,  z = Φ⁻¹(1 − (1 − c)/2)
    centre = (p̂ + z²/2n) / (1 + z²/n)
    half   = z / (1 + z²/n) · √(p̂(1 − p̂)/n + z²/4n²)

Why Wilson rather than the normal (Wald) interval ``p̂ ± z·σ̂/√n``: it stays inside ``[0, 1]`` and does not
collapse to a point when every comparison is a win (or every one a tie, or ``n = 1``), where the Wald
interval claims certainty from a single sample. Ties make it conservative: an outcome ``X ∈ {0, ½, 1}`` with
mean ``p`` has ``Var X = E[X²] − p² ≤ E[X] − p² = p(1 − p)``, the Bernoulli variance Wilson assumes. Without
ties it is exactly the Wilson interval of a binomial proportion (``scipy.stats.binomtest(...)
.proportion_ci(method="wilson")``, Wilson 1927; Agresti & Coull 1998 compare it with Wald).

Means: :func:`mean_ci` gives Student's t interval ``x̄ ± t_{n−1}·s/√n`` (``s`` the sample standard deviation).
Fractions (a mean of 0/1 flags, e.g. how many responses stopped): :func:`proportion_ci` gives the Wilson
interval, for the same reasons, so it never leaves ``[0, 1]``.

Several samples per prompt (``clusters``: the prompt of each row). Samples of one prompt are correlated (an
easy prompt gives two good answers), so counting them as independent comparisons understates the uncertainty.
Both intervals then take the prompts, not the rows, as the independent units:

- :func:`mean_ci`: the cluster-robust standard error (Liang & Zeger 1986, with the ``G/(G−1)`` small-sample
  factor) and Student's t with ``G − 1`` degrees of freedom, ``G`` clusters::

      SE² = G/(G−1) · Σ_g (Σ_{i∈g} (x_i − x̄))² / n²

  With one row per cluster it is exactly the plain interval; with every row repeated ``m`` times it is exactly
  the plain interval of the distinct rows (copies add no information).
- :func:`win_rate`: the Wilson interval on Kish's effective sample size ``n / deff``, where the design effect
  ``deff = Σ_g (Σ_{i∈g} (x_i − p̂))² / Σ_i (x_i − p̂)²`` is the ratio of the cluster-robust to the independent
  variance of ``p̂`` (no small-sample factors: one row per cluster gives ``deff = 1``, every comparison repeated
  ``m`` times gives ``deff = m``). It is floored at 1: clustering never narrows an interval. Where ``deff`` is
  undefined (every outcome equal, e.g. all wins: 0/0) or says nothing (a single cluster, whose deviations sum to
  0), the effective size is ``G``, one per cluster: the most conservative value, as if every row repeated its
  cluster's first.
- :func:`proportion_ci`: the same effective size for the Wilson interval of a fraction.

The two differ on purpose where samples of one prompt are negatively correlated: the cluster-robust mean interval
is then narrower than the plain one (Liang–Zeger as published), while the Wilson intervals keep ``deff >= 1``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from jaxtyping import Float
from scipy import special

__all__ = ["MeanCI", "WinRate", "mean_ci", "proportion_ci", "win_rate", "wilson_interval"]


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity: an undefined bound is written as null."""
    return float(value) if math.isfinite(value) else None


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence!r}")


def _vector(name: str, values) -> np.ndarray:
    array = np.asarray(values, np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of scores, one per comparison; got shape {array.shape}")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(f"{name}[{int(bad[0])}] is {array[bad[0]]}: scores must be finite")
    return array


@dataclasses.dataclass(frozen=True)
class WinRate:
    """A paired win rate with its confidence interval.

    Attributes:
        rate: ``(wins + ½·ties) / n``.
        low, high: the Wilson score interval at ``confidence``.
        wins, ties, losses: counts (``wins + ties + losses = n``).
        n: comparisons.
        confidence: the interval's level.
        effective_n: the comparisons' worth in independent ones when they came in clusters (``n / deff``, see the
            module docstring); None without clusters.
        clusters: how many clusters (``G``, e.g. prompts) the comparisons came in; None without clusters.
    """

    rate: float
    low: float
    high: float
    wins: int
    ties: int
    losses: int
    n: int
    confidence: float = 0.95
    effective_n: float | None = None
    clusters: int | None = None

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return (f"{self.rate:.3f} [{self.low:.3f}, {self.high:.3f}] "
                f"({self.wins}W/{self.ties}T/{self.losses}L of {self.n})")


@dataclasses.dataclass(frozen=True)
class MeanCI:
    """A sample mean with Student's t confidence interval.

    Attributes:
        mean: the sample mean.
        low, high: ``mean ∓ t·std/√n``; NaN when ``n = 1`` (no spread to estimate).
        std: the sample standard deviation (``ddof = 1``; NaN when ``n = 1``).
        n: values.
        confidence: the interval's level.
        clusters: how many clusters (``G``, the interval's independent units) the values came in; None without.
    """

    mean: float
    low: float
    high: float
    std: float
    n: int
    confidence: float = 0.95
    clusters: int | None = None

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict (a non-finite float becomes None)."""
        return {name: _finite_or_none(value) if isinstance(value, float) else value
                for name, value in dataclasses.asdict(self).items()}

    def __str__(self) -> str:
        if not math.isfinite(self.low):
            return f"{self.mean:.4g}"
        return f"{self.mean:.4g} [{self.low:.4g}, {self.high:.4g}]"


def wilson_interval(successes: float, n: float, *, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion with ``successes`` (may be fractional) out of ``n`` (formula above).

    Raises:
        ValueError: ``n < 1``, ``successes`` outside ``[0, n]`` or ``confidence`` outside ``(0, 1)``.
    """
    _check_confidence(confidence)
    if n < 1:
        raise ValueError(f"wilson_interval: n must be >= 1, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: successes must be in [0, {n}], got {successes}")
    z = float(special.ndtri(0.5 + confidence / 2))
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At p = 0 or 1 one bound is exactly 0 or 1 in exact arithmetic; rounding leaves it a few ulps off.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def _cluster_ids(clusters, n: int, function: str) -> np.ndarray:
    """``clusters`` as ``[n]`` integer codes (any hashable labels)."""
    labels = list(clusters)
    if len(labels) != n:
        raise ValueError(f"{function}: clusters has {len(labels)} labels for {n} values (one label per value)")
    codes: dict = {}
    return np.asarray([codes.setdefault(label, len(codes)) for label in labels], np.int64)


def _effective_size(outcomes: np.ndarray, codes: np.ndarray) -> tuple[float, int]:
    """``(n / deff, G)``: Kish's effective size of ``outcomes`` clustered by ``codes`` (module docstring; ``G``
    where ``deff`` is undefined) and the number of clusters."""
    n, groups = outcomes.size, int(codes.max()) + 1
    deviations = outcomes - outcomes.mean()
    independent = float(np.sum(deviations ** 2))
    if independent == 0 or groups == 1:
        return float(groups), groups
    clustered = float(np.sum(np.bincount(codes, weights=deviations) ** 2))
    return n / max(1.0, clustered / independent), groups


def win_rate(scores: Float[np.ndarray, " N"] | Sequence[float],
             baseline_scores: Float[np.ndarray, " N"] | Sequence[float], *, confidence: float = 0.95,
             tie_tolerance: float = 0.0, clusters: Sequence | None = None) -> WinRate:
    """How often ``scores[i]`` beats ``baseline_scores[i]``, ties counting half, with a Wilson interval.

    Args:
        scores: ``[N]`` the policy's scores.
        baseline_scores: ``[N]`` the reference's scores of the paired responses (row ``i`` with row ``i``).
        confidence: the interval's level.
        tie_tolerance: ``|scores[i] − baseline_scores[i]| <= tie_tolerance`` is a tie (0: exact equality).
        clusters: ``[N]`` labels of correlated comparisons (e.g. each row's prompt, for several samples per
            prompt): the interval is Wilson's on the effective sample size (module docstring). None: independent.

    Returns:
        A :class:`WinRate`.

    Raises:
        ValueError: not 1-D, different lengths, no comparisons, a non-finite score, a bad level, or not one
            cluster label per comparison.
    """
    _check_confidence(confidence)
    if tie_tolerance < 0:
        raise ValueError(f"win_rate: tie_tolerance must be >= 0, got {tie_tolerance}")
    ours, theirs = _vector("scores", scores), _vector("baseline_scores", baseline_scores)
    if ours.shape != theirs.shape:
        raise ValueError(f"win_rate: scores has {ours.size} entries but baseline_scores has {theirs.size}; "
                         "the comparisons are paired row by row")
    if ours.size == 0:
        raise ValueError("win_rate: no comparisons (empty scores)")
    difference = ours - theirs
    tied, won = np.abs(difference) <= tie_tolerance, difference > tie_tolerance
    ties, wins = int(np.sum(tied)), int(np.sum(won))
    n = int(ours.size)
    rate = (wins + 0.5 * ties) / n
    effective_n = groups = None
    if clusters is not None:
        outcomes = np.where(won, 1.0, np.where(tied, 0.5, 0.0))
        effective_n, groups = _effective_size(outcomes, _cluster_ids(clusters, n, "win_rate"))
    size = n if effective_n is None else effective_n
    low, high = wilson_interval(rate * size, size, confidence=confidence)
    return WinRate(rate=rate, low=low, high=high, wins=wins, ties=ties, losses=n - wins - ties, n=n,
                   confidence=confidence, effective_n=effective_n, clusters=groups)


def mean_ci(values: Float[np.ndarray, " N"] | Sequence[float], confidence: float = 0.95, *,
            clusters: Sequence | None = None) -> MeanCI:
    """Mean of ``values`` with Student's t interval ``x̄ ± t_{n−1, (1+c)/2}·s/√n``.

    With ``clusters`` (``[N]`` labels of correlated values, e.g. each sample's prompt): the cluster-robust
    interval ``x̄ ± t_{G−1, (1+c)/2}·SE`` over the ``G`` clusters (module docstring).

    Raises:
        ValueError: not 1-D, empty, a non-finite value, a bad level, or not one cluster label per value.
    """
    _check_confidence(confidence)
    array = _vector("values", values)
    n = int(array.size)
    if n == 0:
        raise ValueError("mean_ci: no values")
    codes = None if clusters is None else _cluster_ids(clusters, n, "mean_ci")
    mean = float(array.mean())
    std = float(array.std(ddof=1)) if n > 1 else math.nan
    units = n if codes is None else int(codes.max()) + 1
    groups = None if codes is None else units
    if units == 1:  # one independent unit: no spread to estimate
        return MeanCI(mean=mean, low=math.nan, high=math.nan, std=std, n=n, confidence=confidence, clusters=groups)
    if codes is None:
        error = std / math.sqrt(n)
    else:
        sums = np.bincount(codes, weights=array - mean)
        error = math.sqrt(units / (units - 1) * float(np.sum(sums ** 2))) / n
    half = float(special.stdtrit(units - 1, 0.5 + confidence / 2)) * error
    return MeanCI(mean=mean, low=mean - half, high=mean + half, std=std, n=n, confidence=confidence, clusters=groups)


def proportion_ci(flags: Float[np.ndarray, " N"] | Sequence[float], confidence: float = 0.95, *,
                  clusters: Sequence | None = None) -> MeanCI:
    """The fraction of true ``flags`` (0/1 values) with its Wilson interval, as a :class:`MeanCI`.

    With ``clusters`` (``[N]`` labels of correlated flags, e.g. each sample's prompt) the interval is Wilson's on
    the effective sample size, as :func:`win_rate`'s (module docstring).

    Raises:
        ValueError: not 1-D, empty, a value other than 0 or 1, a bad level, or not one cluster label per flag.
    """
    array = _vector("flags", flags)
    if array.size == 0:
        raise ValueError("proportion_ci: no values")
    if not np.isin(array, (0.0, 1.0)).all():
        raise ValueError("proportion_ci: flags must be 0 or 1")
    n, successes = int(array.size), float(array.sum())
    size, groups = n, None
    if clusters is not None:
        size, groups = _effective_size(array, _cluster_ids(clusters, n, "proportion_ci"))
    low, high = wilson_interval(successes / n * size, size, confidence=confidence)
    std = float(array.std(ddof=1)) if n > 1 else math.nan
    return MeanCI(mean=successes / n, low=low, high=high, std=std, n=n, confidence=confidence, clusters=groups)
