"""What a pipeline run did, as a Markdown report for the Prefect UI (and the parent MLflow run)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from llmpipe.params import flatten
from llmpipe.stats import PairedResult
from pipelines.stages import StageResult

STATUS_TEXT = {"ran": "ran", "cached": "restored from DVC run cache", "skipped": "up to date, skipped"}


@dataclass
class PipelineReport:
    flow: str
    results: list[StageResult]
    not_run: list[str]
    wall_s: float  # from the first stage's start to the last stage's end, as the flow saw it
    metrics: dict[str, float]
    mlflow_run_id: str
    mlflow_url: str  # both "" when nothing ran (no MLflow run is made)
    failure: str | None = None
    experiment: str | None = None  # the DVC experiment the run was saved as
    baseline: PairedResult | None = None  # LLM − baseline on the test messages, paired (baseline_comparison)
    stages_by_status: dict[str, list[str]] = field(init=False)

    def __post_init__(self) -> None:
        self.stages_by_status = {
            status: [r.stage for r in self.results if r.status == status] for status in STATUS_TEXT
        }

    @property
    def stage_s(self) -> float:
        return sum(r.seconds for r in self.results)

    @property
    def overhead_s(self) -> float:
        return self.wall_s - self.stage_s


def read_metrics(metrics_dir: str | Path = "metrics") -> dict[str, float]:
    """Every number in ``metrics_dir/*.json`` (the headline metrics), keyed ``<file stem>.<key>[.<subkey>...]``."""
    metrics: dict[str, float] = {}
    for path in sorted(Path(metrics_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            continue
        for key, value in flatten(data, prefix=f"{path.stem}.").items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[key] = value
    return metrics


# The headline test accuracies of the GPT classifier (score_spam) and of the TF-IDF baseline
# (baseline_spam), as read_metrics keys them.
LLM_ACCURACY = "spam.test_accuracy"
BASELINE_ACCURACY = "baseline.baseline_test_accuracy"
DIFFERENCE_METRIC = "llm_minus_baseline_test_accuracy_points"


def baseline_difference(metrics: dict[str, float]) -> float | None:
    """The GPT classifier's test accuracy minus the baseline's, in percentage points (None unless
    both headline files are there)."""
    if LLM_ACCURACY not in metrics or BASELINE_ACCURACY not in metrics:
        return None
    return round(100 * (metrics[LLM_ACCURACY] - metrics[BASELINE_ACCURACY]), 2)


def baseline_comparison(root: str | Path = ".") -> PairedResult | None:
    """LLM − baseline on the same test messages, paired (McNemar), from both stages' per-example
    predictions under ``root/reports``; None when either is missing or they are not on the same messages."""
    from pipelines.compare import RESULTS, CompareError, compare, comparison_params

    llm, baseline = Path(root) / RESULTS["spam"], Path(root) / RESULTS["baseline"]
    if not (llm.is_file() and baseline.is_file()):
        return None
    try:
        result, _ = compare(str(llm), str(baseline), params=comparison_params())
    except (CompareError, ValueError, KeyError):
        return None
    return result


def baseline_metrics(metrics: dict[str, float], paired: PairedResult | None) -> dict[str, float]:
    """The difference (points) and, when paired, its interval and McNemar's p, as MLflow metrics."""
    difference = baseline_difference(metrics)
    if difference is None:
        return {}
    extra = (
        {}
        if paired is None
        else {
            f"{DIFFERENCE_METRIC}_ci_low": 100 * paired.interval.low,
            f"{DIFFERENCE_METRIC}_ci_high": 100 * paired.interval.high,
            "llm_minus_baseline_mcnemar_p": paired.p_value,
        }
    )
    return {DIFFERENCE_METRIC: difference, **extra}


def baseline_line(metrics: dict[str, float], paired: PairedResult | None = None) -> str | None:
    """``LLM − baseline: −1.7 points, 95% CI [−3.9, +0.5], McNemar p = 0.15 (not significant)
    (test accuracy: ...)``; without the paired predictions, the difference alone. None without both."""
    from pipelines.compare import format_difference

    difference = baseline_difference(metrics)
    if difference is None:
        return None
    head = (
        format_difference(paired, short=True)
        if paired is not None
        else f"{difference:+.1f} points".replace("-", "−") + " (no per-example predictions: no interval)"
    )
    return (
        f"LLM − baseline: {head} (test accuracy: GPT classifier "
        f"{metrics[LLM_ACCURACY]:.2%}, TF-IDF baseline {metrics[BASELINE_ACCURACY]:.2%})"
    )


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def metric_rows(metrics: dict[str, float]) -> list[str]:
    """One row per metric, its ``<key>_ci_low``/``<key>_ci_high`` (if any) in the interval column."""
    rows = []
    for key, value in metrics.items():
        if key.endswith(("_ci_low", "_ci_high")):
            continue
        low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
        interval = f"[{_number(low)}, {_number(high)}]" if low is not None and high is not None else ""
        rows.append(f"| {key} | {_number(value)} | {interval} |".replace("|  |", "| |"))
    return rows


def render_markdown(report: PipelineReport) -> str:
    outcome = f"failed: {report.failure.splitlines()[0]}" if report.failure else "completed"
    tracking = (
        f"MLflow parent run: [{report.mlflow_run_id}]({report.mlflow_url}) (one child run per stage that ran)."
        if report.mlflow_run_id
        else "Every stage was up to date: nothing ran, so no MLflow run was made."
    )
    lines = [f"# Pipeline `{report.flow}`: {outcome}", "", tracking, ""]
    if report.experiment:
        lines += [f"Saved as DVC experiment `{report.experiment}` (`dvc exp show`).", ""]
    lines += [
        "| stage | DVC | seconds |",
        "| --- | --- | ---: |",
    ]
    lines += [f"| {r.stage} | {STATUS_TEXT[r.status]} | {r.seconds:.1f} |" for r in report.results]
    lines += [f"| {stage} | not run | |" for stage in report.not_run]
    ran = ", ".join(report.stages_by_status["ran"]) or "none"
    share = report.overhead_s / report.wall_s if report.wall_s > 0 else 0.0
    lines += [
        "",
        f"Ran: {ran}. Up to date: {len(report.stages_by_status['skipped'])}, "
        f"restored from run cache: {len(report.stages_by_status['cached'])}.",
        "",
        f"Wall time {report.wall_s:.1f} s, inside `dvc repro` {report.stage_s:.1f} s, "
        f"orchestration overhead {report.overhead_s:.1f} s ({share:.1%}).",
    ]
    if report.failure:
        lines += ["", "## Failure", "", "```", report.failure, "```"]
    if report.metrics:
        lines += ["", "## Metrics", ""]
        comparison = baseline_line(report.metrics, report.baseline)
        lines += [f"**{comparison}**", ""] if comparison else []
        lines += ["| metric | value | interval (comparison.confidence) |", "| --- | ---: | ---: |"]
        lines += metric_rows(report.metrics)
    return "\n".join(lines) + "\n"
