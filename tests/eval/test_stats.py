"""Win rates (Wilson interval on wins + ties/2) and mean intervals against scipy and hand-computed values."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy import stats

from jaxalign.eval import MeanCI, WinRate, mean_ci, proportion_ci, wilson_interval, win_rate


@pytest.mark.parametrize(("wins", "n"), [(0, 1), (1, 1), (3, 7), (7, 7), (5, 11), (0, 13)])
@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_without_ties_equals_scipy_wilson(wins, n, confidence):
    scores = np.r_[np.ones(wins), np.zeros(n - wins)]
    result = win_rate(scores, np.full(n, 0.5), confidence=confidence)
    expected = stats.binomtest(wins, n).proportion_ci(confidence_level=confidence, method="wilson")
    assert (result.wins, result.ties, result.losses, result.n) == (wins, 0, n - wins, n)
    assert result.rate == pytest.approx(wins / n)
    assert result.low == pytest.approx(expected.low, abs=1e-12)
    assert result.high == pytest.approx(expected.high, abs=1e-12)


def test_ties_count_half_hand_computed():
    # 2 wins, 1 tie, 1 loss: s = 2.5 of 4. Bounds computed with mpmath at 30 digits from the Wilson formula.
    result = win_rate([3.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 5.0])
    assert (result.wins, result.ties, result.losses) == (2, 1, 1)
    assert result.rate == 0.625
    assert result.low == pytest.approx(0.219426520065362781, abs=1e-12)
    assert result.high == pytest.approx(0.908100770820987878, abs=1e-12)
    # 3 wins, 5 losses, 1 tie: s = 3.5 of 9
    result = win_rate([1, 1, 1, 0, 0, 0, 0, 0, 0.5], [0, 0, 0, 1, 1, 1, 1, 1, 0.5])
    assert result.rate == pytest.approx(3.5 / 9)
    assert (result.low, result.high) == pytest.approx((0.153430557508579538, 0.690823897695763595), abs=1e-12)


def test_one_comparison_and_all_wins_keep_an_interval():
    one = win_rate([1.0], [0.0])
    z = stats.norm.ppf(0.975)
    assert (one.rate, one.high) == (1.0, 1.0)
    assert one.low == pytest.approx(1 / (1 + z * z))  # Wilson at p̂ = 1, n = 1
    many = win_rate(np.arange(1, 21), np.zeros(20))
    assert many.rate == 1.0 and many.high == 1.0 and 0.8 < many.low < 1.0


def test_all_ties_centre_on_one_half():
    result = win_rate(np.zeros(6), np.zeros(6))
    assert (result.rate, result.wins, result.ties, result.losses) == (0.5, 0, 6, 0)
    assert result.low == pytest.approx(1 - result.high) and result.low < 0.5 < result.high
    # identical to 3 wins + 3 losses: the same effective count
    mixed = win_rate([1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1])
    assert (mixed.low, mixed.high) == pytest.approx((result.low, result.high))


def test_tie_tolerance():
    result = win_rate([1.0, 1.05, 0.0], [1.0, 1.0, 1.0], tie_tolerance=0.1)
    assert (result.wins, result.ties, result.losses) == (0, 2, 1)
    assert win_rate([1.0, 1.05, 0.0], [1.0, 1.0, 1.0]).wins == 1


@pytest.mark.parametrize(("scores", "baseline", "kwargs", "message"), [
    ([1.0, 2.0], [1.0], {}, "paired row by row"),
    ([[1.0, 2.0]], [[1.0, 2.0]], {}, "1-D"),
    ([], [], {}, "no comparisons"),
    ([1.0, math.nan], [1.0, 2.0], {}, r"scores\[1\] is nan"),
    ([1.0], [math.inf], {}, r"baseline_scores\[0\] is inf"),
    ([1.0], [0.0], {"confidence": 1.5}, "confidence"),
    ([1.0], [0.0], {"tie_tolerance": -1.0}, "tie_tolerance"),
])
def test_bad_input_is_a_clear_error(scores, baseline, kwargs, message):
    with pytest.raises(ValueError, match=message):
        win_rate(scores, baseline, **kwargs)


def test_wilson_interval_checks_its_arguments():
    with pytest.raises(ValueError, match="n must be"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(5, 4)


def test_win_rate_is_a_frozen_record():
    result = win_rate([1.0, 0.0], [0.0, 0.0])
    assert isinstance(result, WinRate)
    assert result.to_dict() == {"rate": 0.75, "low": result.low, "high": result.high, "wins": 1, "ties": 1,
                                "losses": 0, "n": 2, "confidence": 0.95, "effective_n": None,
                                "clusters": None}
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.rate = 0.0


@pytest.mark.parametrize("confidence", [0.95, 0.8])
def test_mean_ci_equals_scipy_t_interval(confidence):
    values = np.random.default_rng(3).normal(1.0, 2.0, size=7)
    result = mean_ci(values, confidence)
    low, high = stats.t.interval(confidence, df=6, loc=values.mean(), scale=stats.sem(values))
    assert isinstance(result, MeanCI) and result.n == 7
    assert result.mean == pytest.approx(values.mean())
    assert (result.low, result.high) == pytest.approx((low, high), rel=1e-12)
    assert result.std == pytest.approx(np.std(values, ddof=1))


def test_mean_ci_edge_cases():
    single = mean_ci([2.5])
    assert single.mean == 2.5 and math.isnan(single.low) and math.isnan(single.high)
    assert single.to_dict() == {"mean": 2.5, "low": None, "high": None, "std": None, "n": 1, "confidence": 0.95,
                               "clusters": None}
    constant = mean_ci([1.0, 1.0, 1.0])
    assert (constant.low, constant.mean, constant.high) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="no values"):
        mean_ci([])
    with pytest.raises(ValueError, match="finite"):
        mean_ci([1.0, math.nan])


def test_proportion_ci_is_the_wilson_interval_of_the_flags():
    flags = np.arange(16) == 3
    result = proportion_ci(flags)
    expected = stats.binomtest(1, 16).proportion_ci(confidence_level=0.95, method="wilson")
    assert result.mean == 1 / 16 and result.n == 16
    assert (result.low, result.high) == pytest.approx((expected.low, expected.high))
    assert proportion_ci([1.0]).low > 0.0 and proportion_ci([0, 0, 0]).high < 1.0
    with pytest.raises(ValueError, match="0 or 1"):
        proportion_ci([0.5, 1.0])


# ---- several samples per prompt: clusters of correlated rows


def test_clusters_of_one_row_change_nothing():
    rng = np.random.default_rng(5)
    values = rng.normal(size=11)
    plain, clustered = mean_ci(values), mean_ci(values, clusters=range(11))
    assert (clustered.low, clustered.high) == pytest.approx((plain.low, plain.high), rel=1e-12)
    scores, baseline = rng.integers(0, 3, 13).astype(float), np.ones(13)
    plain, clustered = win_rate(scores, baseline), win_rate(scores, baseline, clusters=[f"p{i}" for i in range(13)])
    assert clustered.effective_n == pytest.approx(13) and plain.effective_n is None
    assert (clustered.low, clustered.high) == pytest.approx((plain.low, plain.high), rel=1e-12)


def test_copies_of_each_row_add_no_information():
    # every row twice, as two samples of one prompt: the interval is that of the distinct rows
    rng = np.random.default_rng(7)
    values = rng.normal(size=9)
    doubled, prompts = np.repeat(values, 2), np.repeat(np.arange(9), 2)
    expected, naive = mean_ci(values), mean_ci(doubled)
    result = mean_ci(doubled, clusters=prompts)
    assert result.mean == pytest.approx(expected.mean) and result.n == 18
    assert (result.low, result.high) == pytest.approx((expected.low, expected.high), rel=1e-12)
    assert naive.high - naive.low < 0.75 * (result.high - result.low)  # what counting copies as data claims
    scores, baseline = np.array([2.0, 0, 1, 2, 2, 0, 1, 2]), np.ones(8)  # 4 wins, 2 ties, 2 losses
    result = win_rate(np.repeat(scores, 3), np.repeat(baseline, 3), clusters=np.repeat(np.arange(8), 3))
    expected = win_rate(scores, baseline)
    assert result.effective_n == pytest.approx(8) and result.n == 24 and result.rate == expected.rate
    assert result.clusters == 8 and mean_ci(doubled, clusters=prompts).clusters == 9 and expected.clusters is None
    assert (result.low, result.high) == pytest.approx((expected.low, expected.high), rel=1e-12)


def test_cluster_robust_error_by_hand():
    # clusters {a: 1, 3}, {b: 2}, {c: 6}: mean 3, deviations summed per cluster (-2, -1, 3), G = 3
    result = mean_ci([1.0, 3.0, 2.0, 6.0], 0.9, clusters=["a", "a", "b", "c"])
    error = math.sqrt(3 / 2 * (4 + 1 + 9)) / 4
    half = stats.t.ppf(0.95, df=2) * error
    assert (result.low, result.high) == pytest.approx((3 - half, 3 + half), rel=1e-12)
    # win rate: outcomes (1, 1 | 0 | 0.5), p = 0.625; deff = ((0.75)^2 + 0.625^2 + 0.125^2) / (2·0.375^2 + 0.625^2
    # + 0.125^2) = 0.9688 / 0.6875 -> n_eff = 4 / 1.409 = 2.839
    result = win_rate([1.0, 1.0, 0.0, 0.5], [0.0, 0.0, 1.0, 0.5], clusters=[0, 0, 1, 2])
    assert result.effective_n == pytest.approx(4 * 0.6875 / 0.96875)
    assert (result.low, result.high) == pytest.approx(wilson_interval(0.625 * result.effective_n,
                                                                      result.effective_n), rel=1e-12)
    # negatively correlated samples (one wins, one loses in every cluster) never narrow the interval
    result = win_rate([1.0, 0.0] * 5, [0.5] * 10, clusters=np.repeat(np.arange(5), 2))
    assert result.effective_n == 10 and (result.low, result.high) == pytest.approx(
        (win_rate([1.0, 0.0] * 5, [0.5] * 10).low, win_rate([1.0, 0.0] * 5, [0.5] * 10).high))


def test_undefined_design_effect_counts_one_row_per_cluster():
    # every comparison won: deff is 0/0, and the copies still add nothing (the 10 prompts' interval, not 20 rows')
    result = win_rate(np.ones(20), np.zeros(20), clusters=np.repeat(np.arange(10), 2))
    expected = win_rate(np.ones(10), np.zeros(10))
    assert result.effective_n == 10 and (result.low, result.high) == pytest.approx((expected.low, expected.high))
    assert result.low < win_rate(np.ones(20), np.zeros(20)).low
    # one prompt: its deviations sum to 0, so the rows are worth one comparison (mean_ci has no interval at all)
    result = win_rate([1.0, 0.0, 1.0, 1.0], [0.5] * 4, clusters=["p"] * 4)
    assert result.effective_n == 1 and (result.low, result.high) == pytest.approx(wilson_interval(0.75, 1))
    assert math.isnan(mean_ci([1.0, 0.0, 1.0, 1.0], clusters=["p"] * 4).low)


def test_proportion_ci_with_clusters_counts_prompts():
    flags = np.array([1.0, 0, 0, 1, 1, 0, 1, 1])
    result = proportion_ci(np.repeat(flags, 2), clusters=np.repeat(np.arange(8), 2))
    expected = proportion_ci(flags)
    assert result.mean == expected.mean and result.n == 16
    assert (result.low, result.high) == pytest.approx((expected.low, expected.high), rel=1e-12)
    with pytest.raises(ValueError, match="proportion_ci: clusters has 3 labels for 16"):
        proportion_ci(np.repeat(flags, 2), clusters=[0, 1, 2])


def test_clusters_need_one_label_per_row():
    with pytest.raises(ValueError, match="clusters has 2 labels for 3 values"):
        mean_ci([1.0, 2.0, 3.0], clusters=[0, 1])
    with pytest.raises(ValueError, match="win_rate: clusters has 1 labels for 2"):
        win_rate([1.0, 0.0], [0.0, 0.0], clusters=[0])
    single = mean_ci([1.0, 2.0], clusters=[0, 0])
    assert math.isnan(single.low) and single.mean == 1.5


def test_no_success_has_a_lower_bound_of_exactly_zero():
    from jaxalign.eval.stats import wilson_interval

    for n in (1, 7, 64, 128, 1000):
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0
