"""Intervals cover the true value at their stated rate; the paired tests equal scipy/statsmodels."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom, binomtest
from statsmodels.stats.contingency_tables import mcnemar

from llmpipe.stats import (
    ComparisonParams,
    bootstrap_interval,
    compare_correct,
    compare_scores,
    f1_statistic,
    macro_f1_statistic,
    mcnemar_exact,
    mean_interval,
    mean_sd,
    wilson_interval,
)
from tests.params_values import params_for

TRIALS = 2000
CONFIDENCE = 0.95


def coverage_bounds(trials: int, confidence: float) -> tuple[int, int]:
    """The range a correct interval's hit count falls in 99.9% of the time (binomial)."""
    return int(binom.ppf(0.0005, trials, confidence)), int(binom.ppf(0.9995, trials, confidence))


def test_wilson_interval_covers_the_true_accuracy_at_its_stated_rate() -> None:
    rng = np.random.default_rng(0)
    true_p, n = 0.95, 300  # the spam test split's size and an accuracy like the classifier's
    hits = 0
    for successes in rng.binomial(n, true_p, size=TRIALS):
        interval = wilson_interval(int(successes), n, CONFIDENCE)
        hits += interval.low <= true_p <= interval.high
    low, high = coverage_bounds(TRIALS, CONFIDENCE)
    assert low <= hits <= high, f"Wilson covered {hits}/{TRIALS}, expected {low}..{high}"


def test_t_interval_of_a_mean_loss_covers_the_true_mean_at_its_stated_rate() -> None:
    rng = np.random.default_rng(1)
    hits = sum(
        (lambda ci: ci.low <= 5.0 <= ci.high)(mean_interval(rng.normal(5.0, 0.3, size=40), CONFIDENCE))
        for _ in range(TRIALS)
    )
    low, high = coverage_bounds(TRIALS, CONFIDENCE)
    assert low <= hits <= high, f"t interval covered {hits}/{TRIALS}, expected {low}..{high}"


def test_bootstrap_interval_of_a_mean_score_covers_the_true_mean() -> None:
    """ROUGE-L-like scores in [0, 1] (a Beta distribution, mean 0.3), 200 examples per draw. The
    percentile bootstrap is approximate: its coverage must be within 2.5 points of 95%."""
    rng = np.random.default_rng(2)
    params = params_for(ComparisonParams, bootstrap_samples=400)
    trials, hits = 400, 0
    for trial in range(trials):
        params = params_for(ComparisonParams, bootstrap_samples=400, seed=trial)
        interval = bootstrap_interval(rng.beta(3, 7, size=200), np.mean, params)
        hits += interval.low <= 0.3 <= interval.high
    assert abs(hits / trials - CONFIDENCE) <= 0.025 + 3 * math.sqrt(CONFIDENCE * (1 - CONFIDENCE) / trials), hits


def test_bootstrap_is_deterministic_for_a_seed_and_f1_matches_sklearn() -> None:
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(3)
    actual = rng.integers(0, 2, size=300)
    predicted = np.where(rng.random(300) < 0.9, actual, 1 - actual)
    params = params_for(ComparisonParams)
    first = bootstrap_interval((actual, predicted), f1_statistic, params, paired=True)
    assert first == bootstrap_interval((actual, predicted), f1_statistic, params, paired=True)
    assert first != bootstrap_interval(
        (actual, predicted), f1_statistic, params_for(ComparisonParams, seed=7), paired=True
    )
    f1 = f1_score(actual, predicted)
    assert float(f1_statistic(actual, predicted)) == pytest.approx(f1)
    assert first.low < f1 < first.high and first.high - first.low < 0.15


def test_macro_f1_statistic_matches_sklearn_and_its_interval_covers_it() -> None:
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(5)
    actual = rng.integers(0, 4, size=400)  # class 3 also predicted where it never occurs below
    predicted = np.where(rng.random(400) < 0.8, actual, rng.integers(0, 4, size=400))
    for a, p in ((actual, predicted), (np.minimum(actual, 2), predicted)):
        macro = f1_score(a, p, labels=[0, 1, 2, 3], average="macro", zero_division=0)
        statistic = macro_f1_statistic(4)
        assert float(statistic(a, p)) == pytest.approx(macro)
        interval = bootstrap_interval((a, p), statistic, params_for(ComparisonParams), paired=True)
        assert interval.low < macro < interval.high


@pytest.mark.parametrize("table", [[[280, 3], [9, 8]], [[250, 0], [12, 38]], [[100, 20], [21, 5]], [[290, 1], [0, 9]]])
def test_mcnemar_equals_statsmodels_and_the_binomial_test(table: list[list[int]]) -> None:
    (both, only_a), (only_b, neither) = table
    a = [1] * both + [1] * only_a + [0] * only_b + [0] * neither
    b = [1] * both + [0] * only_a + [1] * only_b + [0] * neither
    p_value, counts = mcnemar_exact(a, b)
    assert counts == (both, only_a, only_b, neither)
    assert p_value == pytest.approx(mcnemar(table, exact=True).pvalue)
    assert p_value == pytest.approx(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def test_mcnemar_without_discordant_pairs_is_no_evidence() -> None:
    assert mcnemar_exact([1, 0, 1], [1, 0, 1]) == (1.0, (2, 0, 0, 1))


def test_paired_accuracy_difference_flags_a_clear_gap_and_not_noise() -> None:
    rng = np.random.default_rng(4)
    easy = rng.beta(20, 1, size=300)  # each message's chance of being classified right (mean 0.95)
    good, other_seed = rng.random(300) < easy, rng.random(300) < easy  # one configuration, two seeds
    broken = rng.random(300) < 0.5  # a model at chance
    params = params_for(ComparisonParams)
    noise = compare_correct(good, other_seed, params)
    assert not noise.significant() and noise.interval.low < 0 < noise.interval.high
    gap = compare_correct(good, broken, params)
    assert gap.significant() and gap.difference < -0.3 and gap.interval.high < 0
    assert gap.test == "McNemar exact" and gap.table is not None


def test_paired_bootstrap_of_scores() -> None:
    rng = np.random.default_rng(5)
    a = rng.beta(3, 7, size=110)
    params = params_for(ComparisonParams)
    same = compare_scores(a, np.clip(a + rng.normal(0, 0.05, size=110), 0, 1), params, "rouge_l_f1")
    assert not same.significant()
    better = compare_scores(a, np.clip(a + 0.05 + rng.normal(0, 0.05, size=110), 0, 1), params, "rouge_l_f1")
    assert better.significant() and better.difference > 0 and better.interval.low > 0
    with_missing = compare_scores([1.0, np.nan, 3.0], [2.0, 5.0, np.nan], params, "judge_score")
    assert with_missing.n == 1 and math.isnan(with_missing.p_value)  # one pair left: no test


def test_mean_sd() -> None:
    assert mean_sd([0.96, 0.95, 0.97]) == pytest.approx((0.96, 0.01))
    mean, sd = mean_sd([0.9])
    assert mean == 0.9 and math.isnan(sd)
