"""Intervals and paired tests for the pipeline's metrics: the glue around scipy and statsmodels.

Every headline metric gets an interval at ``comparison.confidence`` (95% by default): a proportion
(accuracy) the Wilson interval, F1 / ROUGE-L / judge scores a percentile bootstrap over examples,
a mean loss a t interval over its per-window (per-example) values. Two models scored on the same
examples are compared in pairs: McNemar's exact test on who got which example right (classifiers),
a paired bootstrap on per-example scores (ROUGE-L, judge, loss). The bootstrap is seeded
(``comparison.seed``), so the same inputs give the same interval every time.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import Field

from llmpipe.params import StrictModel


class ComparisonParams(StrictModel):
    """The ``comparison`` section: intervals, paired tests and the registry's promotion rule."""

    confidence: float = Field(gt=0, lt=1)  # of every interval
    bootstrap_samples: int = Field(ge=100)  # B: resamples of every bootstrap
    seed: int  # the bootstrap's random generator: the same interval every run
    promote_alpha: float = Field(gt=0, lt=1)  # @champion moves only when the paired test's p < this


@dataclass(frozen=True)
class Interval:
    low: float
    high: float

    def fields(self, name: str) -> dict[str, float]:
        return {f"{name}_ci_low": self.low, f"{name}_ci_high": self.high}


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """The Wilson score interval of a proportion (statsmodels), e.g. an accuracy over n examples."""
    from statsmodels.stats.proportion import proportion_confint

    if n <= 0:
        return Interval(math.nan, math.nan)
    low, high = proportion_confint(successes, n, alpha=1 - confidence, method="wilson")
    return Interval(float(low), float(high))


def bootstrap_interval(
    data: Sequence[Sequence[float]] | Sequence[float],
    statistic: Callable,
    params: ComparisonParams,
    *,
    paired: bool = False,
) -> Interval:
    """Percentile bootstrap interval of ``statistic`` over examples (scipy.stats.bootstrap, seeded).
    ``data``: one array, or several arrays resampled together (``paired``: the same rows)."""
    from scipy.stats import bootstrap

    arrays = tuple(np.asarray(a, dtype=float) for a in data) if paired else (np.asarray(data, dtype=float),)
    if len(arrays[0]) < 2:
        return Interval(math.nan, math.nan)
    result = bootstrap(
        arrays,
        statistic,
        n_resamples=params.bootstrap_samples,
        confidence_level=params.confidence,
        method="percentile",
        paired=paired,
        vectorized=True,
        rng=np.random.default_rng(params.seed),
    )
    return Interval(float(result.confidence_interval.low), float(result.confidence_interval.high))


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """The t interval of a mean (scipy), e.g. of a loss over its evaluation windows."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return Interval(math.nan, math.nan)
    sem = float(stats.sem(x))
    if sem == 0:
        return Interval(float(x.mean()), float(x.mean()))
    low, high = stats.t.interval(confidence, len(x) - 1, loc=float(x.mean()), scale=sem)
    return Interval(float(low), float(high))


def f1_statistic(actual: np.ndarray, predicted: np.ndarray, axis: int = -1) -> np.ndarray:
    """The positive class's (id 1) F1 of each resample, vectorized for scipy.stats.bootstrap."""
    tp = np.sum((actual == 1) & (predicted == 1), axis=axis)
    fp = np.sum((actual != 1) & (predicted == 1), axis=axis)
    fn = np.sum((actual == 1) & (predicted != 1), axis=axis)
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)


def macro_f1_statistic(num_classes: int):
    """The unweighted mean of every class's F1 (scikit-learn's ``average="macro"``, a class never
    seen nor predicted counting 0), vectorized like ``f1_statistic``."""

    def statistic(actual: np.ndarray, predicted: np.ndarray, axis: int = -1) -> np.ndarray:
        scores = []
        for c in range(num_classes):
            tp = np.sum((actual == c) & (predicted == c), axis=axis)
            wrong = np.sum((actual == c) != (predicted == c), axis=axis)  # false positives + negatives
            scores.append(np.where(tp > 0, 2 * tp / np.maximum(2 * tp + wrong, 1), 0.0))
        return np.mean(scores, axis=0)

    return statistic


def classification_intervals(
    actual: Sequence[int], predicted: Sequence[int], params: ComparisonParams, *, num_classes: int
) -> dict[str, float]:
    """``accuracy_ci_low/high`` (Wilson) and ``f1_ci_low/high`` (bootstrap over examples): the positive
    class's F1 with two classes, the macro F1 with more."""
    a, p = np.asarray(actual), np.asarray(predicted)
    fields = wilson_interval(int((a == p).sum()), len(a), params.confidence).fields("accuracy")
    statistic = f1_statistic if num_classes == 2 else macro_f1_statistic(num_classes)
    fields.update(bootstrap_interval((a, p), statistic, params, paired=True).fields("f1"))
    return fields


@dataclass(frozen=True)
class PairedResult:
    """B − A on the same examples: the difference of the metric, its interval and the test's p-value."""

    metric: str
    n: int
    value_a: float
    value_b: float
    difference: float
    interval: Interval
    p_value: float
    test: str  # "McNemar exact" | "paired bootstrap"
    confidence: float = 0.95
    table: tuple[int, int, int, int] | None = None  # McNemar: both right, only A, only B, both wrong

    def significant(self, alpha: float | None = None) -> bool:
        return bool(self.p_value < (1 - self.confidence if alpha is None else alpha))


def mcnemar_exact(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> tuple[float, tuple[int, int, int, int]]:
    """McNemar's exact test (statsmodels) on two classifiers' right/wrong answers on the same
    examples: the p-value and the table (both right, only A right, only B right, both wrong)."""
    from statsmodels.stats.contingency_tables import mcnemar

    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired results differ in length: {len(a)} vs {len(b)}")
    table = (int((a & b).sum()), int((a & ~b).sum()), int((~a & b).sum()), int((~a & ~b).sum()))
    if table[1] + table[2] == 0:
        return 1.0, table  # no discordant pair: no evidence either way
    result = mcnemar([[table[0], table[1]], [table[2], table[3]]], exact=True)
    return float(result.pvalue), table


def compare_correct(
    correct_a: Sequence[bool], correct_b: Sequence[bool], params: ComparisonParams, metric: str = "accuracy"
) -> PairedResult:
    """Accuracy of B − A: a paired bootstrap interval of the difference, McNemar's exact p."""
    a, b = np.asarray(correct_a, dtype=float), np.asarray(correct_b, dtype=float)
    p_value, table = mcnemar_exact(a.astype(bool), b.astype(bool))
    interval = bootstrap_interval(b - a, np.mean, params)
    return PairedResult(
        metric,
        len(a),
        float(a.mean()),
        float(b.mean()),
        float(b.mean() - a.mean()),
        interval,
        p_value,
        "McNemar exact",
        params.confidence,
        table,
    )


def compare_scores(
    scores_a: Sequence[float], scores_b: Sequence[float], params: ComparisonParams, metric: str
) -> PairedResult:
    """Mean of B − A per example (ROUGE-L, judge score, loss): a paired bootstrap interval, and its
    two-sided p-value: how often the resampled difference, centred on 0, is as far from 0."""
    a, b = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired results differ in length: {len(a)} vs {len(b)}")
    keep = ~(np.isnan(a) | np.isnan(b))  # an example one of them has no score for (an unscored judge answer)
    d = b[keep] - a[keep]
    if len(d) < 2:
        return PairedResult(
            metric,
            len(d),
            math.nan,
            math.nan,
            math.nan,
            Interval(math.nan, math.nan),
            math.nan,
            "paired bootstrap",
            params.confidence,
        )
    rng = np.random.default_rng(params.seed)
    means = d[rng.integers(0, len(d), size=(params.bootstrap_samples, len(d)))].mean(axis=1)
    observed = float(d.mean())
    alpha = 1 - params.confidence
    interval = Interval(float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2)))
    extreme = np.abs(means - observed) >= abs(observed) if observed != 0 else np.ones_like(means, dtype=bool)
    p_value = float((extreme.sum() + 1) / (len(means) + 1))
    return PairedResult(
        metric,
        len(d),
        float(a[keep].mean()),
        float(b[keep].mean()),
        observed,
        interval,
        p_value,
        "paired bootstrap",
        params.confidence,
    )


def examples_digest(keys: Iterable[str]) -> str:
    """A short digest of which examples (in order) were scored: two scorings pair only when equal."""
    digest = hashlib.sha256()
    for key in keys:
        digest.update(key.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()[:12]


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; nan for one value)."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else math.nan
