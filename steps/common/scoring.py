"""The classification metrics every classifier of the pipeline is scored with (the GPT classifier in
score_spam, the TF-IDF baseline in baseline_spam): one function, so their figures compare."""

from __future__ import annotations

import re
from collections.abc import Sequence

from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support


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
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(labels)},
        "confusion": matrix.tolist(),
    }
    if len(labels) == 2:
        tn, fp, fn, tp = matrix.ravel()
        metrics.update(precision=float(precision[1]), recall=float(recall[1]), f1=float(f1[1]),
                       tn=int(tn), fp=int(fp), fn=int(fn), tp=int(tp))
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
