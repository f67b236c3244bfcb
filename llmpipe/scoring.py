"""The classification metrics every classifier of the pipeline is scored with (the GPT classifier in
score_spam, the TF-IDF baseline in baseline_spam): one function, so their figures compare."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from llmpipe.io import atomic_path
from llmpipe.registry import Scoring
from llmpipe.stats import ComparisonParams, classification_intervals, examples_digest


def classification_metrics(actual: Sequence[int], predicted: Sequence[int], labels: Sequence[str]) -> dict:
    """Accuracy, macro F1, per-class precision/recall/F1/support and the confusion matrix (rows:
    actual, columns: predicted). ``precision``/``recall``/``f1``: of the positive class (id 1, spam)
    for two classes, with its counts (tn, fp, fn, tp); macro averages for more."""
    ids = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(actual, predicted, labels=ids, zero_division=0)
    matrix = confusion_matrix(actual, predicted, labels=ids)
    metrics: dict = {
        "accuracy": float(accuracy_score(actual, predicted)),
        "macro_f1": float(f1.mean()),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(labels)
        },
        "confusion": matrix.tolist(),
    }
    if len(labels) == 2:
        tn, fp, fn, tp = matrix.ravel()
        metrics.update(
            precision=float(precision[1]),
            recall=float(recall[1]),
            f1=float(f1[1]),
            tn=int(tn),
            fp=int(fp),
            fn=int(fn),
            tp=int(tp),
        )
    else:
        metrics.update(precision=float(precision.mean()), recall=float(recall.mean()), f1=float(f1.mean()))
    return metrics


def flat_metrics(metrics: dict[str, dict]) -> dict[str, float]:
    """``<split>_<name>`` and ``<split>_<label>_<name>`` numbers for MLflow."""
    flat = {}
    for split, values in metrics.items():
        flat.update({f"{split}_{k}": v for k, v in values.items() if isinstance(v, (int, float))})
        for label, scores in values["per_class"].items():
            name = re.sub(r"[^\w\-. /]", "_", label)  # the characters MLflow allows in a metric name
            flat.update({f"{split}_{name}_{k}": v for k, v in scores.items()})
    return flat


PREDICTION_COLUMNS = ("split", "row", "label", "predicted", "correct")


def split_intervals(
    actual: Sequence[int], predicted: Sequence[int], labels: Sequence[str], params: ComparisonParams
) -> dict[str, float]:
    """``accuracy_ci_low/high`` (Wilson) and ``f1_ci_low/high`` (bootstrap over examples: the positive
    class's F1 with two classes, the macro F1 with more) at ``params.confidence``."""
    return classification_intervals(actual, predicted, params, num_classes=len(labels))


def write_predictions(
    path: Path,
    frames: Mapping[str, pd.DataFrame],
    actuals: Mapping[str, Sequence[int]],
    predictions: Mapping[str, Sequence[int]],
    labels: Sequence[str],
    probabilities: Mapping[str, Sequence[float]] | None = None,
) -> None:
    """Every example's label and prediction, one row per (split, row of the split file): the
    per-example results a paired comparison (``llm compare``) reads."""
    rows = []
    for split, frame in frames.items():
        table = pd.DataFrame(
            {
                "split": split,
                "row": range(1, len(frame) + 1),
                "label": [labels[i] for i in actuals[split]],
                "predicted": [labels[i] for i in predictions[split]],
            }
        )
        table["correct"] = (table["label"] == table["predicted"]).astype(int)
        if probabilities is not None:
            table["probability"] = [round(p, 6) for p in probabilities[split]]
        table["text_sha1"] = [hashlib.sha1(t.encode("utf-8", "surrogatepass")).hexdigest()[:12] for t in frame["Text"]]
        rows.append(table)
    with atomic_path(path) as tmp:
        pd.concat(rows, ignore_index=True).to_csv(tmp, index=False)


def selection_scoring(
    validation: pd.DataFrame, actual: Sequence[int], predicted: Sequence[int], test_metrics: Mapping[str, float]
) -> Scoring:
    """The registry's selection scoring: validation accuracy, right/wrong per example (McNemar), the
    examples' digest; the test accuracy and F1 recorded beside, never used to choose."""
    correct = [int(a == p) for a, p in zip(actual, predicted)]
    value = sum(correct) / len(correct) if correct else math.nan
    beside = {f"test_{k}": test_metrics[k] for k in ("accuracy", "f1") if k in test_metrics}
    return Scoring(
        "validation",
        "accuracy",
        value,
        correct,
        examples_digest(validation["Text"].tolist()),
        binary=True,
        others=beside,
    )
