"""The length-controlled win rate equals the ``alpaca-eval`` package's ``get_length_controlled_winrate`` on the
same annotations (the package is the oracle; its hub downloads are replaced by fixture files in the published
``df_gamed.csv`` layout, written here)."""

from __future__ import annotations

import math
import sys
import types
import warnings

import numpy as np
import pytest

from jaxalign.eval.length_control import GamedRows, length_controlled_win_rate

pd = pytest.importorskip("pandas")


@pytest.fixture(scope="module")
def alpaca_glm():
    # alpaca_eval.utils imports pkg_resources for version strings only; setuptools >= 81 no longer ships it. The
    # stand-in is removed once imported: left in sys.modules it breaks pytest's monkeypatch.syspath_prepend in
    # any later test of the same process (it imports pkg_resources.fixup_namespace_packages when one is loaded).
    stand_in = "pkg_resources" not in sys.modules
    if stand_in:
        sys.modules["pkg_resources"] = types.ModuleType("pkg_resources")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pytest.importorskip("alpaca_eval.metrics.glm_winrate")
    finally:
        if stand_in:
            del sys.modules["pkg_resources"]


def annotations(seed: int, n: int, length_effect: float, skill: float):
    """AlpacaEval annotations (output_1 the baseline, output_2 the model; preference 1 baseline, 2 model,
    0 or 1.5 a draw, None unannotated) from a judge that likes length."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 600, n)
    model = rng.integers(40, 1200, n)
    logit = skill + length_effect * np.tanh((model - base) / 300)
    pref = np.where(rng.random(n) < 1 / (1 + np.exp(-logit)), 2.0, 1.0)
    pref[rng.choice(n, 4, replace=False)] = 1.5
    pref[0] = 0.0
    rows = [dict(instruction=f"q{i}", output_1="a" * int(base[i]), output_2="b" * int(model[i]),
                 preference=float(pref[i]), index=i, generator_1="baseline", generator_2="model", annotator="judge")
            for i in range(n)]
    return rows, pref, model, base


def gamed_table(seed: int, n: int):
    """Rows in df_gamed.csv's layout: each gamed model's block in instruction order."""
    rng = np.random.default_rng(seed + 1000)
    difficulty = rng.normal(size=n)
    frames = []
    for name, sign in (("verbose", 1.0), ("concise", -1.0)):
        delta = sign * np.abs(rng.normal(1.0, 0.5, n))
        frames.append(pd.DataFrame(dict(model=name, index=np.arange(n), instruction_difficulty=difficulty,
                                        preference=np.clip(0.5 - 0.3 * delta + rng.normal(0, 0.1, n), 0, 1),
                                        std_delta_len=delta, not_gamed_baseline=False)))
    return pd.concat(frames, ignore_index=True), difficulty


def oracle(glm, rows, gamed, tmp_path, name):
    path = tmp_path / "df_gamed.csv"
    gamed.to_csv(path, index=False)
    original = glm.hf_hub_download
    glm.hf_hub_download = lambda **kwargs: str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return glm.get_length_controlled_winrate(rows, glm_name=name, save_weights_dir=None,
                                                     is_warn_extreme_changes=False)
    finally:
        glm.hf_hub_download = original


def ours_preference(pref):
    return np.where(pref == 0.0, 0.5, pref - 1.0)


@pytest.mark.parametrize("seed,n,length_effect,skill", [(0, 60, 2.0, 0.0), (1, 120, 3.0, -1.0), (2, 45, 0.5, 1.0)])
def test_minimal_model_equals_alpaca_eval(alpaca_glm, tmp_path, seed, n, length_effect, skill):
    rows, pref, model, base = annotations(seed, n, length_effect, skill)
    gamed, _ = gamed_table(seed, n)
    expected = oracle(alpaca_glm, rows, gamed, tmp_path, "length_controlled_minimal")
    ours = length_controlled_win_rate(ours_preference(pref), model, base, bootstrap=0)
    assert ours.model == "length_controlled_minimal"
    assert ours.rate * 100 == pytest.approx(expected["length_controlled_winrate"], abs=0.01)
    assert ours.standard_error * 100 == pytest.approx(expected["lc_standard_error"], abs=1e-6)
    # The length term was fitted, and it moved the rate away from the raw one.
    assert abs(ours.rate * 100 - expected["win_rate"]) > 1 or length_effect < 1


def test_v1_model_equals_alpaca_eval(alpaca_glm, tmp_path):
    n = 80
    rows, pref, model, base = annotations(3, n, 2.5, 0.3)
    gamed, difficulty = gamed_table(3, n)
    # Instruction difficulty that matters: harder instructions lower the model's odds.
    rng = np.random.default_rng(7)
    flip = (difficulty > 0.8) & (rng.random(n) < 0.7)
    pref = np.where(flip, 1.0, pref)
    for row, value in zip(rows, pref):
        row["preference"] = float(value)
    expected = oracle(alpaca_glm, rows, gamed, tmp_path, "length_controlled_v1")
    anchors = GamedRows(preference=gamed["preference"].to_numpy(), std_delta_len=gamed["std_delta_len"].to_numpy(),
                        instruction_difficulty=gamed["instruction_difficulty"].to_numpy())
    ours = length_controlled_win_rate(ours_preference(pref), model, base, instruction_difficulty=difficulty,
                                      gamed=anchors, bootstrap=0)
    assert ours.model == "length_controlled_v1"
    assert ours.rate * 100 == pytest.approx(expected["length_controlled_winrate"], abs=0.01)
    assert ours.standard_error * 100 == pytest.approx(expected["lc_standard_error"], abs=0.01)


def test_unjudged_pairs_are_left_out_of_the_fit(alpaca_glm, tmp_path):
    rows, pref, model, base = annotations(4, 50, 2.0, 0.0)
    for i in (5, 9, 17):
        rows[i]["preference"] = None
        pref[i] = math.nan
    gamed, _ = gamed_table(4, 50)
    expected = oracle(alpaca_glm, rows, gamed, tmp_path, "length_controlled_minimal")
    ours = length_controlled_win_rate(np.where(np.isnan(pref), np.nan, ours_preference(pref)), model, base,
                                      bootstrap=0)
    assert ours.pairs == 47
    assert ours.rate * 100 == pytest.approx(expected["length_controlled_winrate"], abs=0.01)


def test_bootstrap_interval_contains_the_rate_and_is_reproducible():
    _, pref, model, base = annotations(5, 60, 2.0, 0.0)
    first = length_controlled_win_rate(ours_preference(pref), model, base, bootstrap=50, seed=1)
    second = length_controlled_win_rate(ours_preference(pref), model, base, bootstrap=50, seed=1)
    assert first == second
    assert 0 <= first.low <= first.rate <= first.high <= 1
    assert first.high - first.low > 0.02


def test_a_fit_that_keeps_no_coefficient_says_it_is_degenerate():
    """Verdicts that carry nothing to fit (every pair a tie) shrink every coefficient to 0: the rate is 50 % by
    construction, and the result says so rather than read as a measurement; a real fit does not."""
    tied = length_controlled_win_rate(np.full(12, 0.5), list(range(1, 13)), list(range(12, 0, -1)), bootstrap=20)
    assert tied.degenerate and tied.rate == 0.5 and tied.to_dict()["degenerate"] is True
    assert "degenerate: at C = " in str(tied) and "50 % by construction" in str(tied)
    _, pref, model, base = annotations(5, 60, 2.0, 0.0)
    fitted = length_controlled_win_rate(ours_preference(pref), model, base, bootstrap=0)
    assert not fitted.degenerate and "degenerate" not in str(fitted)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="same 1-D length"):
        length_controlled_win_rate([1, 0, 1], [1, 2], [3, 4, 5])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        length_controlled_win_rate([2, 0, 1, 0, 1], [1, 2, 3, 4, 5], [5, 4, 3, 2, 1])
    with pytest.raises(ValueError, match="at least 5"):
        length_controlled_win_rate([1, 0, 1], [1, 2, 3], [3, 4, 5])
    with pytest.raises(ValueError, match="same length difference"):
        length_controlled_win_rate([1, 0, 1, 0, 1], [1, 2, 3, 4, 5], [2, 3, 4, 5, 6])
    with pytest.raises(ValueError, match="needs both"):
        length_controlled_win_rate([1, 0, 1, 0, 1], [1, 2, 3, 4, 5], [5, 4, 3, 2, 1], instruction_difficulty=[0] * 5)


def test_group_folds_are_scikit_learns_group_k_fold():
    from sklearn.model_selection import GroupKFold

    from jaxalign.eval.length_control import group_folds

    rng = np.random.default_rng(0)
    for groups in (rng.integers(0, 13, 60), np.arange(23), np.repeat(np.arange(9), 3)[::-1]):
        expected = np.empty(groups.size, np.int64)
        for fold, (_, test) in enumerate(GroupKFold(n_splits=5).split(groups, groups=groups)):
            expected[test] = fold
        np.testing.assert_array_equal(group_folds(groups, 5), expected)
    assert list(group_folds(np.arange(7), 5)) == [(6 - r) % 5 for r in range(7)]  # AlpacaEval's row folds


def prompts_with_two_answers(seed: int, prompts: int):
    """Two answers per prompt, correlated: a prompt's answers have similar lengths and mostly the same outcome
    (the policy's second sample of a prompt is much like its first)."""
    rng = np.random.default_rng(seed)
    base = np.repeat(rng.integers(40, 600, prompts), 2)
    model = np.repeat(rng.integers(40, 1200, prompts), 2) + rng.integers(-20, 20, 2 * prompts)
    outcome = np.repeat((rng.random(prompts) < 1 / (1 + np.exp(-2 * np.tanh((model[::2] - base[::2]) / 300))))
                        .astype(float), 2)
    flip = rng.random(2 * prompts) < 0.1
    outcome = np.where(flip, 1 - outcome, outcome)
    return outcome, model, base, np.repeat([f"q{i}" for i in range(prompts)], 2)


def grouped_oracle(glm, preference, model, base, groups):
    """AlpacaEval's own fit (``fit_LogisticRegressionCV``: liblinear, L1, its continuous log loss), with the
    folds grouped by prompt instead of by row."""
    import sklearn
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import make_scorer
    from sklearn.model_selection import GroupKFold

    delta = base - model
    x = np.stack([np.tanh(delta / np.std(delta, ddof=1)), np.ones(delta.size)], axis=1)
    numbers = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    labels = np.asarray([numbers[g] for g in groups])
    sklearn.set_config(enable_metadata_routing=True)
    try:
        scorer = make_scorer(glm.logloss_continuous, response_method="predict_proba", greater_is_better=False
                             ).set_score_request(true_sample_weight=True, true_prob=True)
        fit = LogisticRegressionCV(cv=GroupKFold(n_splits=5), scoring=scorer, random_state=123, penalty="l1",
                                   solver="liblinear", fit_intercept=False)
        fit.set_fit_request(sample_weight=True)
        true_prob = np.concatenate([preference, 1 - preference])
        fit.fit(np.concatenate([x, x]), np.concatenate([np.ones(x.shape[0]), np.zeros(x.shape[0])]),
                sample_weight=true_prob, groups=np.concatenate([labels, labels]), true_sample_weight=None,
                true_prob=true_prob)
    finally:
        sklearn.set_config(enable_metadata_routing=False)
    x_test = x.copy()
    x_test[:, 0] = 0
    return float(np.mean(fit.predict_proba(x_test)[:, 1])), float(fit.C_[0])


def test_two_answers_per_prompt_are_cross_validated_by_prompt(alpaca_glm):
    preference, model, base, prompts = prompts_with_two_answers(15, 40)
    expected_rate, expected_c = grouped_oracle(alpaca_glm, preference, model, base, prompts)
    ours = length_controlled_win_rate(preference, model, base, groups=list(prompts), bootstrap=0)
    assert ours.C == pytest.approx(expected_c)
    assert ours.rate == pytest.approx(expected_rate, abs=1e-4)
    assert (ours.pairs, ours.prompts) == (80, 40)
    # Folds by row put a prompt's twin answers on both sides of a fold: a different penalty is chosen.
    assert length_controlled_win_rate(preference, model, base, bootstrap=0).C != ours.C


def test_the_bootstrap_resamples_prompts():
    preference, model, base, prompts = prompts_with_two_answers(12, 30)
    by_prompt = length_controlled_win_rate(preference, model, base, groups=list(prompts), bootstrap=60, seed=2)
    assert 0 <= by_prompt.low <= by_prompt.rate <= by_prompt.high <= 1
    # One prompt per pair is the default and AlpacaEval's setting: labels in row order change nothing.
    rows = length_controlled_win_rate(preference, model, base, bootstrap=20, seed=2)
    assert rows == length_controlled_win_rate(preference, model, base, groups=list(range(60)), bootstrap=20,
                                              seed=2)
    with pytest.raises(ValueError, match="groups has 3 labels for 60 pairs"):
        length_controlled_win_rate(preference, model, base, groups=[1, 2, 3])
    with pytest.raises(ValueError, match="of 4 prompts; .* at least 5 prompts"):
        length_controlled_win_rate(preference[:8], model[:8], base[:8], groups=list(prompts[:8]))
