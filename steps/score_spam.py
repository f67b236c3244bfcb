"""Score the classifier on every split: accuracy, per-class precision/recall/F1, confusion matrix.

Writes every split's metrics (``reports/spam.json``), the headline test accuracy and F1 as DVC
metrics (``metrics/spam.json``), MLflow metrics in the training run, the test split's
confusion matrix as a PNG (scikit-learn's ``ConfusionMatrixDisplay``) and as a CSV of
actual/predicted labels for DVC's ``confusion`` plot template. With two classes the headline F1
is the positive class's (id 1: spam), as the book's; with more, the macro F1 (the unweighted mean
of the classes' F1). The data's labels are matched to the classifier's by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import pandas as pd
import torch
from pydantic import Field
from sklearn.metrics import ConfusionMatrixDisplay

from llmcore.checkpoint import CheckpointError
from llmcore.classifier import load_classifier, predict_proba
from llmcore.device import resolve_device
from llmcore.tokenizer import TokenizerFilesError, get_tokenizer
from llmpipe.cli import StageParams, run_stage
from llmpipe.data import DataError, TokenizerParams
from llmpipe.io import atomic_path, write_json
from llmpipe.params import ParamsError, StrictModel
from llmpipe.scoring import (
    classification_metrics,
    flat_metrics,
    selection_scoring,
    split_intervals,
    write_predictions,
)
from llmpipe.stats import ComparisonParams
from steps.data.datasets import read_splits

STAGE = "score_spam"
SPLITS = ("train", "validation", "test")


class ScoreSpamParams(StrictModel):
    batch_size: int = Field(ge=1)
    plot_split: Literal["train", "validation", "test"]  # the split drawn as the confusion-matrix plots
    seed: int  # inference draws no random numbers; seeded for the stage convention
    device: Literal["auto", "cpu", "cuda", "mps"]


def model_label_ids(frame: pd.DataFrame, data_labels: list[str], model_labels: list[str], path: Path) -> list[int]:
    """The rows' classes as the model's class ids; a label the model was not trained on is an error."""
    names = [data_labels[i] for i in frame["Label"]]
    unknown = [(row, name) for row, name in enumerate(names) if name not in model_labels]
    if unknown:
        row, name = unknown[0]
        raise DataError(
            f"{path} row {row + 1}: label {name!r} is not one the classifier knows ({model_labels}); "
            f"{len(unknown)} such row(s): retrain it on this data"
        )
    return [model_labels.index(name) for name in names]


def save_confusion_png(
    path: Path, actual: Sequence[int], predicted: Sequence[int], labels: Sequence[str], title: str
) -> None:
    display = ConfusionMatrixDisplay.from_predictions(
        actual, predicted, labels=list(range(len(labels))), display_labels=list(labels), cmap="Blues", colorbar=False
    )
    display.ax_.set_title(title)
    with atomic_path(path) as tmp:
        display.figure_.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(display.figure_)


def score_spam(
    params: ScoreSpamParams,
    *,
    model_dir: Path,
    data_dir: Path,
    metrics_out: Path,
    headline_out: Path,
    plots_dir: Path,
    predictions_out: Path,
    tokenizer_params: TokenizerParams,
    comparison: ComparisonParams,
) -> dict[str, dict]:
    """Metrics per split with intervals (``metrics_out``), the test accuracy and F1 with theirs
    (``headline_out``), every example's prediction (``predictions_out``: what ``llm compare`` pairs),
    and ``spam_confusion.{png,csv}`` under ``plots_dir``; the scores go to the run that trained the
    model, and the registry chooses on the validation split (llmpipe/registry.py)."""

    from llmpipe.registry import SPAM_CLASSIFIER
    from llmpipe.tracking import check_store, record_evaluation  # mlflow imports take seconds

    check_store(SPAM_CLASSIFIER)  # before any work or output: fail early if the store cannot be written
    torch.manual_seed(params.seed)
    data_labels, split_frames = read_splits(data_dir, SPLITS)
    frames = dict(zip(SPLITS, split_frames))
    try:
        device = resolve_device(params.device)
    except ValueError as exc:
        raise ParamsError(f"{STAGE}.device: {exc}") from exc
    model = load_classifier(model_dir, map_location=device)
    tokenizer = get_tokenizer(tokenizer_params.directory)
    actuals = {
        split: model_label_ids(frame, data_labels, model.labels, data_dir / f"{split}.csv")
        for split, frame in frames.items()
    }
    metrics, predictions, probabilities = {}, {}, {}
    for split, frame in frames.items():
        probs = predict_proba(model, tokenizer, frame["Text"].tolist(), params.batch_size)
        predictions[split] = probs.argmax(dim=1).tolist()
        probabilities[split] = probs.max(dim=1).values.tolist()
        metrics[split] = classification_metrics(actuals[split], predictions[split], model.labels)
        metrics[split].update(split_intervals(actuals[split], predictions[split], model.labels, comparison))
    write_predictions(predictions_out, frames, actuals, predictions, model.labels, probabilities)
    write_json(metrics_out, metrics)
    write_json(headline_out, headline(metrics, "test_"))

    actual, predicted = actuals[params.plot_split], predictions[params.plot_split]
    csv_path, png_path = plots_dir / "spam_confusion.csv", plots_dir / "spam_confusion.png"
    table = pd.DataFrame(
        {"actual": [model.labels[i] for i in actual], "predicted": [model.labels[i] for i in predicted]}
    )
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    accuracy = metrics[params.plot_split]["accuracy"]
    title = f"classifier, {params.plot_split} split (accuracy {accuracy:.2%})"
    save_confusion_png(png_path, actual, predicted, model.labels, title)
    selection = selection_scoring(
        frames["validation"], actuals["validation"], predictions["validation"], metrics["test"]
    )
    record_evaluation(
        STAGE,
        params,
        model_dir,
        flat_metrics(metrics),
        [png_path, csv_path, predictions_out],
        registered_model=SPAM_CLASSIFIER,
        selection=selection,
        comparison=comparison,
        outputs=[metrics_out, headline_out, png_path, csv_path, predictions_out],
    )
    return metrics


def headline(metrics: dict[str, dict], prefix: str) -> dict[str, float]:
    """The test accuracy and F1 with their intervals (``<prefix>accuracy_ci_low`` ...), and the
    validation accuracy the registry selects on."""
    test = metrics["test"]
    keys = ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "f1", "f1_ci_low", "f1_ci_high")
    return {
        **{f"{prefix}{k}": test[k] for k in keys if k in test},
        f"{prefix.replace('test_', 'validation_')}accuracy": metrics["validation"]["accuracy"],
    }


def main(argv: list[str] | None = None) -> None:
    def body(args, params: StageParams) -> str:
        metrics = score_spam(
            params.section(STAGE, ScoreSpamParams),
            model_dir=args.model,
            data_dir=args.data,
            metrics_out=args.metrics,
            headline_out=args.headline,
            plots_dir=args.plots,
            predictions_out=args.predictions,
            tokenizer_params=params.section("tokenizer", TokenizerParams),
            comparison=params.section("comparison", ComparisonParams),
        )
        return ", ".join(
            f"{split} accuracy {m['accuracy']:.4f} [{m['accuracy_ci_low']:.4f}, {m['accuracy_ci_high']:.4f}]"
            for split, m in metrics.items()
        )

    run_stage(
        STAGE,
        "Score the spam classifier on the train/validation/test splits.",
        body,
        argv=argv,
        errors=(CheckpointError, TokenizerFilesError),
        paths={
            "model": "the classifier",
            "data": "the labelled splits",
            "metrics": "every split's metrics",
            "headline": "test accuracy and F1",
            "plots": "where its plots go",
            "predictions": "every example's prediction",
        },
    )


if __name__ == "__main__":
    main()
