"""The classical baseline of the classification task (book chapter 1): TF-IDF features + a linear model.

Word and character n-grams (scikit-learn's ``TfidfVectorizer``, ``char_wb``: n-grams inside word
boundaries) are fitted on the training split; every classifier and ``C`` of the params' grid is
trained on the training split and scored on the validation split, and the best one (validation
accuracy, then validation F1, then the grid's order: list the simpler settings first) is the
baseline. Nothing is refit: like the GPT classifier, the baseline never trains on validation
text. The test split is scored once, with the metric function score_spam uses
(``llmpipe/scoring.py``), so ``metrics/baseline.json`` sits beside ``metrics/spam.json``.

Labels are the class ids of the split files, named by their ``labels.json`` (two classes or more: logistic regression is
multinomial, the linear SVM one-vs-rest). The fitted model is not saved: the metrics are the
product (nothing is pickled).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, field_validator

from llmpipe.cli import StageParams, run_stage
from llmpipe.data import DataError
from llmpipe.io import write_json
from llmpipe.params import StrictModel
from llmpipe.registry import SPAM_CLASSIFIER
from llmpipe.scoring import classification_metrics, flat_metrics, split_intervals, write_predictions
from llmpipe.stats import ComparisonParams
from steps.data.datasets import read_splits

STAGE = "baseline_spam"
EXPERIMENT = SPAM_CLASSIFIER  # beside the GPT classifier's runs, tagged model_family=baseline
SPLITS = ("train", "validation", "test")
Classifier = Literal["logistic_regression", "linear_svm"]


class BaselineGrid(StrictModel):
    """Tried on the validation split: every classifier with every C (inverse regularisation)."""

    classifier: list[Classifier] = Field(min_length=1)
    C: list[Annotated[float, Field(gt=0)]] = Field(min_length=1)


class BaselineParams(StrictModel):
    word_ngrams: list[int] = Field(min_length=2, max_length=2)  # [min n, max n] of word n-grams
    char_ngrams: list[int] = Field(min_length=2, max_length=2)  # [min n, max n] of char_wb n-grams
    min_df: int = Field(ge=1)  # a term must occur in this many training texts
    sublinear_tf: bool  # 1 + log(tf) instead of tf
    lowercase: bool
    grid: BaselineGrid
    max_iter: int = Field(ge=1)  # solver iterations
    seed: int  # the solvers' random_state (the linear SVM's coordinate order)

    @field_validator("word_ngrams", "char_ngrams")
    @classmethod
    def _ordered(cls, values: list[int]) -> list[int]:
        if not 1 <= values[0] <= values[1]:
            raise ValueError("must be [min n, max n] with 1 <= min n <= max n")
        return values


def make_features(params: BaselineParams):
    """Word and char_wb TF-IDF side by side (scikit-learn FeatureUnion)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import FeatureUnion

    common = {"min_df": params.min_df, "sublinear_tf": params.sublinear_tf, "lowercase": params.lowercase}
    return FeatureUnion(
        [
            ("word", TfidfVectorizer(analyzer="word", ngram_range=tuple(params.word_ngrams), **common)),
            ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=tuple(params.char_ngrams), **common)),
        ]
    )


def make_classifier(name: str, C: float, params: BaselineParams):
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    if name == "logistic_regression":
        return LogisticRegression(C=C, max_iter=params.max_iter, random_state=params.seed)
    return LinearSVC(C=C, max_iter=params.max_iter, random_state=params.seed)


def select_on_validation(params: BaselineParams, features: dict, labels: dict, names: list[str]):
    """Train every grid point on train, score it on validation; the best model and the table."""
    table, best, best_key = [], None, None
    for name in params.grid.classifier:
        for C in params.grid.C:
            model = make_classifier(name, C, params).fit(features["train"], labels["train"])
            scores = classification_metrics(labels["validation"], model.predict(features["validation"]), names)
            table.append(
                {"classifier": name, "C": C, "validation_accuracy": scores["accuracy"], "validation_f1": scores["f1"]}
            )
            key = (scores["accuracy"], scores["f1"])
            if best_key is None or key > best_key:  # strictly better: ties keep the earlier grid point
                best, best_key = (model, {"classifier": name, "C": C}), key
    return best[0], best[1], table


def fit_and_score(
    params: BaselineParams, texts: dict[str, list[str]], labels: dict[str, np.ndarray], names: list[str]
) -> tuple[dict, dict[str, list[int]]]:
    """Features fitted on train, the grid tried on validation, every split scored: the report and
    every example's prediction."""
    vectorizer = make_features(params)
    features = {"train": vectorizer.fit_transform(texts["train"])}
    features.update({split: vectorizer.transform(texts[split]) for split in SPLITS if split != "train"})
    model, selected, table = select_on_validation(params, features, labels, names)
    predicted = {split: model.predict(features[split]).tolist() for split in SPLITS}
    metrics = {split: classification_metrics(labels[split], predicted[split], names) for split in SPLITS}
    return {**metrics, "selected": selected, "grid": table, "features": int(features["train"].shape[1])}, predicted


def baseline_spam(
    params: BaselineParams,
    *,
    data_dir: Path,
    metrics_out: Path,
    headline_out: Path,
    predictions_out: Path,
    comparison: ComparisonParams,
) -> dict:
    """Select on validation, score every split (with intervals); write the report, the headline and
    every example's prediction (what ``llm compare`` pairs with the GPT classifier's), log an MLflow run."""
    from llmpipe.tracking import check_store  # mlflow imports take seconds: not at import

    check_store(EXPERIMENT)  # before any work or output: fail early if the store cannot be written
    names, frames = read_splits(data_dir, SPLITS)
    labels = {split: frame["Label"].to_numpy() for split, frame in zip(SPLITS, frames)}
    if len(np.unique(labels["train"])) < 2:
        raise DataError(f"{data_dir / 'train.csv'}: the training split has one class only")
    texts = {split: frame["Text"].tolist() for split, frame in zip(SPLITS, frames)}
    report, predicted = fit_and_score(params, texts, labels, names)
    for split in SPLITS:
        report[split].update(split_intervals(labels[split], predicted[split], names, comparison))
    write_predictions(predictions_out, dict(zip(SPLITS, frames)), labels, predicted, names)
    test = report["test"]
    keys = ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "f1", "f1_ci_low", "f1_ci_high")
    write_json(metrics_out, report)
    write_json(headline_out, {f"baseline_test_{k}": test[k] for k in keys if k in test})
    _log_run(
        params, data_dir, {split: report[split] for split in SPLITS}, report["selected"], [metrics_out, predictions_out]
    )
    return report


def _log_run(params: BaselineParams, data_dir: Path, metrics: dict, selected: dict, reports: list[Path]) -> None:
    import mlflow  # mlflow imports take seconds: not at import

    from llmpipe.tracking import log_data_files, stage_run

    with stage_run(STAGE, EXPERIMENT, params):
        mlflow.set_tags({"model_family": "baseline", "baseline": f"tfidf+{selected['classifier']}"})
        mlflow.log_params({f"selected.{key}": value for key, value in selected.items()})
        log_data_files({split: data_dir / f"{split}.csv" for split in SPLITS})
        mlflow.log_metrics(flat_metrics(metrics))
        for report in reports:
            mlflow.log_artifact(str(report), "evaluation")


def main(argv: list[str] | None = None) -> None:
    def body(args, params: StageParams) -> str:
        report = baseline_spam(
            params.section(STAGE, BaselineParams),
            data_dir=args.data,
            metrics_out=args.metrics,
            headline_out=args.headline,
            predictions_out=args.predictions,
            comparison=params.section("comparison", ComparisonParams),
        )
        chosen = report["selected"]
        return f"TF-IDF + {chosen['classifier']} (C={chosen['C']:g}, chosen on validation): " + ", ".join(
            f"{split} accuracy {report[split]['accuracy']:.4f}" for split in SPLITS
        )

    run_stage(
        STAGE,
        "TF-IDF + a linear classifier, tuned on validation: the baseline of the GPT classifier.",
        body,
        argv=argv,
        paths={
            "data": "the labelled splits",
            "metrics": "every split's metrics and the grid",
            "headline": "the baseline's test accuracy and F1",
            "predictions": "every example's prediction",
        },
    )


if __name__ == "__main__":
    main()
