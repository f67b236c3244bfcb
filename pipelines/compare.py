"""``llm compare A B``: two models on the same examples, the difference, its interval and a paired test.

A and B are each a DVC experiment name or a git revision (its kept per-example results are read
with ``dvc.api`` at that revision), a per-example results file, a model directory, or a registry
URI (``models:/spam-classifier@champion``; the last two are scored here on the workspace's split).
Classifiers are compared by McNemar's exact test on who got which example right; ROUGE-L, the
judge's score and the pretrained model's window losses by a paired bootstrap. The verdict says
plainly "not significant at 5%" when the test's p-value is not below 1 − confidence.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from llmpipe.stats import ComparisonParams, PairedResult, compare_correct, compare_scores

# What each task's stage keeps per example (a DVC output), and the metric compared.
RESULTS = {
    "spam": "reports/spam_predictions.csv",
    "baseline": "reports/baseline_predictions.csv",
    "instruct": "data/scores/instruction_responses.json",
    "pretrain": "reports/evaluate_windows.csv",
}
METRICS = {"spam": "accuracy", "baseline": "accuracy", "instruct": "rouge_l_f1", "pretrain": "loss"}
LOWER_IS_BETTER = {"loss"}


class CompareError(Exception):
    """A or B cannot be resolved or paired; printed as one line."""


@dataclass(frozen=True)
class Examples:
    """One model's per-example results: keys (which example) and values (right/wrong or a score)."""

    label: str
    keys: list[str]
    values: np.ndarray
    binary: bool


def _run_git(*args: str) -> str | None:
    out = subprocess.run(["git", *args], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def resolve_revision(name: str) -> str | None:
    """A git revision's commit, or a DVC experiment's (``refs/exps/...`` named ``name``), or None."""
    sha = _run_git("rev-parse", "--verify", "--quiet", f"{name}^{{commit}}")
    if sha:
        return sha
    refs = _run_git("for-each-ref", "--format=%(objectname) %(refname)", "refs/exps")
    matches = [line.split()[0] for line in (refs or "").splitlines() if line.endswith(f"/{name}")]
    if len(matches) > 1:
        raise CompareError(f"{name}: {len(matches)} DVC experiments have this name; pass a commit instead")
    return matches[0] if matches else None


def read_at_revision(path: str, rev: str) -> str:
    """The text of the DVC-tracked (or git-tracked) ``path`` at ``rev`` (from the local cache or remote)."""
    import dvc.api
    from dvc.exceptions import DvcException

    try:
        return dvc.api.read(path, rev=rev, repo=".")
    except (DvcException, FileNotFoundError, OSError) as exc:
        raise CompareError(
            f"{path} at {rev[:10]}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__} "
            "(an experiment run before per-example results were kept: re-run it, or compare model "
            "directories)"
        ) from exc


def parse_results(text: str, task: str, split: str, label: str, metric: str) -> Examples:
    """Per-example results of ``task`` on ``split`` from a results file's text."""
    if task == "instruct":
        records = json.loads(text)
        keys = [json.dumps([r.get("instruction"), r.get("input"), r.get("messages"), r.get("output")]) for r in records]
        values = np.array([np.nan if r.get(metric) is None else float(r[metric]) for r in records])
        return Examples(label, keys, values, binary=False)
    table = pd.read_csv(io.StringIO(text), keep_default_na=False)
    rows = table[table["split"] == ("val" if task == "pretrain" and split == "validation" else split)]
    if rows.empty:
        raise CompareError(f"{label}: no {split} rows in its results")
    if task == "pretrain":
        return Examples(label, [str(w) for w in rows["window"]], rows["loss"].to_numpy(float), binary=False)
    keys = [f"{r}:{h}" for r, h in zip(rows["row"], rows.get("text_sha1", rows["row"]))]
    return Examples(label, keys, rows["correct"].to_numpy(float), binary=True)


def score_classifier(
    model_dir: Path, data_dir: Path, split: str, label: str, tokenizer_dir: Path | None = None
) -> Examples:
    """Score a classifier directory on ``data_dir``'s split (what score_spam does, for one split)."""
    from llmcore.classifier import load_classifier, predict_proba
    from llmcore.tokenizer import get_tokenizer
    from llmpipe.model_dirs import tokenizer_for
    from steps.data.datasets import read_splits
    from steps.score_spam import model_label_ids

    names, (frame,) = read_splits(data_dir, (split,))
    model = load_classifier(model_dir)
    actual = model_label_ids(frame, names, model.labels, data_dir / f"{split}.csv")
    tokenizer = get_tokenizer(tokenizer_dir) if tokenizer_dir else tokenizer_for(model_dir)
    predicted = predict_proba(model, tokenizer, frame["Text"].tolist()).argmax(dim=1).tolist()
    from llmpipe.scoring import write_predictions  # the same table the stage keeps

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "predictions.csv"
        write_predictions(path, {split: frame}, {split: actual}, {split: predicted}, model.labels)
        return parse_results(path.read_text(), "spam", split, label, "accuracy")


def load_examples(spec: str, task: str, split: str, metric: str, data_dir: Path) -> Examples:
    """Resolve one side of the comparison to its per-example results."""
    path = Path(spec)
    if spec.startswith("models:/"):
        from serving.models import download_registered

        if task not in ("spam", "baseline"):
            raise CompareError(f"{spec}: registry models are scored here for the spam task only")
        directory, tokenizer_dir = download_registered(spec)
        return score_classifier(directory, data_dir, split, spec, tokenizer_dir)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CompareError(f"{spec}: a directory without config.json is no model")
        if task not in ("spam", "baseline"):
            raise CompareError(
                f"{spec}: model directories are scored here for the spam task only; "
                "compare experiments or results files for the others"
            )
        return score_classifier(path, data_dir, split, spec)
    if path.is_file():
        return parse_results(path.read_text(), task, split, spec, metric)
    rev = resolve_revision(spec)
    if rev is None:
        raise CompareError(f"{spec}: not a DVC experiment, git revision, results file, model directory or models:/ URI")
    return parse_results(read_at_revision(RESULTS[task], rev), task, split, spec, metric)


def paired(a: Examples, b: Examples, metric: str, params: ComparisonParams) -> PairedResult:
    """A − B on the same examples (McNemar for right/wrong, a paired bootstrap for scores)."""
    if a.keys != b.keys:
        common = len(set(a.keys) & set(b.keys))
        raise CompareError(
            f"{a.label} and {b.label} were scored on different examples ({len(a.keys)} and "
            f"{len(b.keys)}, {common} shared): the data differs; score both model directories "
            "on one split instead"
        )
    compare = compare_correct if a.binary else compare_scores
    return compare(b.values, a.values, params, metric=metric)  # (B, A): the difference is A − B


def verdict(result: PairedResult, alpha: float) -> str:
    if not math.isfinite(result.p_value):
        return "no test (fewer than two paired examples)"
    level = f"{alpha:.0%}"
    return f"significant at {level}" if result.p_value < alpha else f"not significant at {level}"


def _scale(metric: str) -> tuple[float, str]:
    return (100.0, " points") if metric == "accuracy" else (1.0, "")


def format_difference(result: PairedResult, *, short: bool = False) -> str:
    """``+1.0 points, 95% CI [−1.3, +3.3], McNemar p = 0.45 (not significant at 5%)``."""
    scale, unit = _scale(result.metric)
    digits = 1 if scale == 100 else 4
    alpha = 1 - result.confidence
    test = "McNemar" if result.test.startswith("McNemar") else "paired bootstrap"
    text = (
        f"{scale * result.difference:+.{digits}f}{unit}, {result.confidence:.0%} CI "
        f"[{scale * result.interval.low:+.{digits}f}, {scale * result.interval.high:+.{digits}f}], "
        f"{test} p = {result.p_value:.2g}"
    )
    text += (
        f" ({'significant' if result.p_value < alpha else 'not significant'})"
        if short
        else f": {verdict(result, alpha)}"
    )
    return text.replace("-", "−")


def side_line(side: Examples, value: float, metric: str, params: ComparisonParams) -> str:
    """``A lr-2e-3: 96.00% (95% CI 93.19–97.70%)``: one model's value and its own interval."""
    from llmpipe.stats import bootstrap_interval, wilson_interval

    kept = side.values[~np.isnan(side.values)]
    if side.binary:
        ci = wilson_interval(int(kept.sum()), len(kept), params.confidence)
        return f"{side.label}: {value:.2%} ({params.confidence:.0%} CI {ci.low:.2%}–{ci.high:.2%})"
    ci = bootstrap_interval(kept, np.mean, params)
    return f"{side.label}: {value:.4f} ({params.confidence:.0%} CI {ci.low:.4f}–{ci.high:.4f})"


def report(a: Examples, b: Examples, result: PairedResult, split: str, params: ComparisonParams) -> list[str]:
    """What ``llm compare`` prints. ``result`` came from paired(): its "a" side is B, its "b" side A."""
    better = "lower" if result.metric in LOWER_IS_BETTER else "higher"
    lines = [
        f"{result.metric} on the {split} split, {result.n} paired examples ({better} is better):",
        f"  A {side_line(a, result.value_b, result.metric, params)}",
        f"  B {side_line(b, result.value_a, result.metric, params)}",
        f"  A − B: {format_difference(result)}",
    ]
    if result.table is not None:
        both, only_b, only_a, neither = result.table
        lines.append(
            f"  messages only A gets right: {only_a}, only B: {only_b} (both right {both}, both wrong {neither})"
        )
    return lines


def compare(
    a_spec: str,
    b_spec: str,
    *,
    task: str = "spam",
    split: str = "test",
    metric: str | None = None,
    data_dir: Path = Path("data/spam"),
    params: ComparisonParams,
) -> tuple[PairedResult, list[str]]:
    metric = metric or METRICS[task]
    if task == "pretrain" and split == "test":
        split = "validation"  # the pretraining corpus has no test split
    a = load_examples(a_spec, task, split, metric, data_dir)
    b = load_examples(b_spec, task if task != "baseline" else "spam", split, metric, data_dir)
    result = paired(a, b, metric, params)
    return result, report(a, b, result, split, params)


def comparison_params() -> ComparisonParams:
    """The workspace's ``comparison`` params, else (no params.yaml here) those of the checkout this
    package runs from."""
    from llmpipe.params import read_params, validate_section

    here, checkout = Path("params.yaml"), Path(__file__).resolve().parents[1] / "params.yaml"
    path = here if here.is_file() or not checkout.is_file() else checkout
    return validate_section(read_params(path), "comparison", ComparisonParams, str(path))


def main(argv: Sequence[str] | None = None, prog: str = "llm compare") -> int:
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="DVC experiment, git revision, results file, model dir or models:/ URI")
    parser.add_argument("b", help="the same kinds as A")
    parser.add_argument("--task", choices=["spam", "instruct", "pretrain"], default="spam")
    parser.add_argument("--split", choices=["test", "validation"], default="test")
    parser.add_argument("--metric", help="instruct: rouge_l_f1 (default) | judge_score")
    parser.add_argument("--data", type=Path, default=Path("data/spam"), help="split files to score model dirs on")
    args = parser.parse_args(argv)
    try:
        _, lines = compare(
            args.a,
            args.b,
            task=args.task,
            split=args.split,
            metric=args.metric,
            data_dir=args.data,
            params=comparison_params(),
        )
    except Exception as exc:  # noqa: BLE001 - sorted below: expected ones are one line
        from llmcore.checkpoint import CheckpointError
        from llmpipe.cli import EXPECTED_ERRORS
        from llmpipe.model_dirs import UsageError

        if not isinstance(exc, (CompareError, UsageError, CheckpointError, *EXPECTED_ERRORS, ValueError, OSError)):
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0
