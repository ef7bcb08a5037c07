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
    """

    rate: float
    low: float
    high: float
    wins: int
    ties: int
    losses: int
    n: int
    confidence: float = 0.95

    def to_dict(self) -> dict:
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
    """

    mean: float
    low: float
    high: float
    std: float
    n: int
    confidence: float = 0.95

    def to_dict(self) -> dict:
        return {name: _finite_or_none(value) if isinstance(value, float) else value
                for name, value in dataclasses.asdict(self).items()}

    def __str__(self) -> str:
        if not math.isfinite(self.low):
            return f"{self.mean:.4g}"
        return f"{self.mean:.4g} [{self.low:.4g}, {self.high:.4g}]"


def wilson_interval(successes: float, n: int, *, confidence: float = 0.95) -> tuple[float, float]:
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
    # Clip rounding: at p = 0 or 1 one bound is exactly 0 or 1 in exact arithmetic.
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(scores: Float[np.ndarray, " N"] | Sequence[float],
             baseline_scores: Float[np.ndarray, " N"] | Sequence[float], *, confidence: float = 0.95,
             tie_tolerance: float = 0.0) -> WinRate:
    """How often ``scores[i]`` beats ``baseline_scores[i]``, ties counting half, with a Wilson interval.

    Args:
        scores: ``[N]`` the policy's scores.
        baseline_scores: ``[N]`` the reference's scores of the paired responses (row ``i`` with row ``i``).
        confidence: the interval's level.
        tie_tolerance: ``|scores[i] − baseline_scores[i]| <= tie_tolerance`` is a tie (0: exact equality).

    Returns:
        A :class:`WinRate`.

    Raises:
        ValueError: not 1-D, different lengths, no comparisons, a non-finite score, or a bad level.
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
    ties = int(np.sum(np.abs(difference) <= tie_tolerance))
    wins = int(np.sum(difference > tie_tolerance))
    n = int(ours.size)
    effective = wins + 0.5 * ties
    low, high = wilson_interval(effective, n, confidence=confidence)
    return WinRate(rate=effective / n, low=low, high=high, wins=wins, ties=ties, losses=n - wins - ties, n=n,
                   confidence=confidence)


def mean_ci(values: Float[np.ndarray, " N"] | Sequence[float], confidence: float = 0.95) -> MeanCI:
    """Mean of ``values`` with Student's t interval ``x̄ ± t_{n−1, (1+c)/2}·s/√n``.

    Raises:
        ValueError: not 1-D, empty, a non-finite value, or a bad level.
    """
    _check_confidence(confidence)
    array = _vector("values", values)
    n = int(array.size)
    if n == 0:
        raise ValueError("mean_ci: no values")
    mean = float(array.mean())
    if n == 1:
        return MeanCI(mean=mean, low=math.nan, high=math.nan, std=math.nan, n=1, confidence=confidence)
    std = float(array.std(ddof=1))
    half = float(special.stdtrit(n - 1, 0.5 + confidence / 2)) * std / math.sqrt(n)
    return MeanCI(mean=mean, low=mean - half, high=mean + half, std=std, n=n, confidence=confidence)


def proportion_ci(flags: Float[np.ndarray, " N"] | Sequence[float], confidence: float = 0.95) -> MeanCI:
    """The fraction of true ``flags`` (0/1 values) with its Wilson interval, as a :class:`MeanCI`.

    Raises:
        ValueError: not 1-D, empty, a value other than 0 or 1, or a bad level.
    """
    array = _vector("flags", flags)
    if array.size == 0:
        raise ValueError("proportion_ci: no values")
    if not np.isin(array, (0.0, 1.0)).all():
        raise ValueError("proportion_ci: flags must be 0 or 1")
    n, successes = int(array.size), float(array.sum())
    low, high = wilson_interval(successes, n, confidence=confidence)
    std = float(array.std(ddof=1)) if n > 1 else math.nan
    return MeanCI(mean=successes / n, low=low, high=high, std=std, n=n, confidence=confidence)
