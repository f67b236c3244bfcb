"""The TF-IDF baseline: chosen on validation only, scored with score_spam's metrics, any number of classes."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from llmpipe.stats import ComparisonParams
from steps import baseline_spam as bl
from tests.params_values import params_file, params_for

HAM = [
    "see you at lunch",
    "ok i will call you later",
    "are we still on for tonight?",
    "thanks, got it",
    "how was the exam?",
    "running late, sorry",
    "call me when you get home",
    "i am at the station",
]
SPAM = [
    "WINNER! claim your FREE prize now, call 09061701461",
    "Free entry to win cup final tickets, text WIN",
    "URGENT! your mobile won a 2000 cash award",
    "Txt STOP to end, claim ur 500 reward now",
    "You have been selected to receive a 2000 pound award, call 09061701461",
    "FREE ringtone, reply YES",
    "Claim your free cash prize, text CLAIM to 80082",
    "URGENT: call now to claim your award",
]
PARAMS = params_for(
    bl.BaselineParams,
    word_ngrams=[1, 1],
    char_ngrams=[2, 3],
    grid={"classifier": ["logistic_regression", "linear_svm"], "C": [0.01, 10.0]},
)


def write_splits(data_dir: Path, rows: dict[str, tuple[list[int], list[str]]]) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "labels.json").write_text(json.dumps({"labels": ["ham", "spam"]}))
    for split, (labels, texts) in rows.items():
        pd.DataFrame({"Label": labels, "Text": texts}).to_csv(data_dir / f"{split}.csv", index=False)
    return data_dir


def spam_rows(test_labels: list[int] | None = None) -> dict:
    test = ([0, 0, 1, 1] if test_labels is None else test_labels, [HAM[6], HAM[7], SPAM[6], SPAM[7]])
    return {"train": ([0] * 5 + [1] * 5, HAM[:5] + SPAM[:5]), "validation": ([0, 1], [HAM[5], SPAM[5]]), "test": test}


@pytest.fixture(autouse=True)
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("LLMPIPE_MLFLOW_PARENT_RUN_ID", raising=False)
    monkeypatch.delenv("LLMPIPE_MLFLOW_EXPERIMENT", raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts (./mlruns) land in tmp_path
    return uri


def run(tmp_path: Path, data_dir: Path, params: bl.BaselineParams = PARAMS, name: str = "out") -> tuple[dict, dict]:
    report = bl.baseline_spam(
        params,
        data_dir=data_dir,
        metrics_out=tmp_path / name / "baseline.json",
        headline_out=tmp_path / name / "headline.json",
        predictions_out=tmp_path / name / "predictions.csv",
        comparison=params_for(ComparisonParams),
    )
    return report, json.loads((tmp_path / name / "headline.json").read_text())


def test_the_baseline_is_chosen_on_validation_and_scored_like_score_spam(tmp_path: Path, mlflow_store: str) -> None:
    report, headline = run(tmp_path, write_splits(tmp_path / "data", spam_rows()))
    grid = report["grid"]
    assert [(row["classifier"], row["C"]) for row in grid] == [
        ("logistic_regression", 0.01),
        ("logistic_regression", 10.0),
        ("linear_svm", 0.01),
        ("linear_svm", 10.0),
    ]
    best = max(grid, key=lambda row: (row["validation_accuracy"], row["validation_f1"]))  # max keeps the first of ties
    assert report["selected"] == {"classifier": best["classifier"], "C": best["C"]}
    assert report["validation"]["accuracy"] == best["validation_accuracy"]
    test = report["test"]
    assert headline == {
        f"baseline_test_{k}": test[k]
        for k in ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "f1", "f1_ci_low", "f1_ci_high")
    }
    assert test["accuracy_ci_low"] <= test["accuracy"] <= test["accuracy_ci_high"]
    predictions = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert predictions[predictions["split"] == "test"]["correct"].mean() == pytest.approx(test["accuracy"])
    assert report["test"]["accuracy"] == 1.0 and report["train"]["accuracy"] == 1.0  # separable words
    assert set(report["test"]) >= {"precision", "recall", "tn", "fp", "fn", "tp", "per_class", "confusion"}
    assert json.loads((tmp_path / "out" / "baseline.json").read_text()) == report
    runs = mlflow.search_runs(experiment_names=[bl.EXPERIMENT], output_format="list")
    assert len(runs) == 1 and runs[0].data.tags["model_family"] == "baseline"
    assert runs[0].data.metrics["test_accuracy"] == report["test"]["accuracy"]
    assert runs[0].data.params["selected.classifier"] == report["selected"]["classifier"]


def test_test_labels_never_change_the_choice(tmp_path: Path) -> None:
    report, _ = run(tmp_path, write_splits(tmp_path / "data", spam_rows()))
    flipped, _ = run(tmp_path, write_splits(tmp_path / "flipped", spam_rows(test_labels=[1, 1, 0, 0])), name="flipped")
    assert flipped["grid"] == report["grid"] and flipped["selected"] == report["selected"]
    assert flipped["test"]["accuracy"] == 0.0 and report["test"]["accuracy"] == 1.0


def test_ties_keep_the_earlier_grid_point(tmp_path: Path) -> None:
    params = PARAMS.model_copy(
        update={"grid": params_for(bl.BaselineGrid, classifier=["linear_svm", "logistic_regression"], C=[10.0])}
    )
    report, _ = run(tmp_path, write_splits(tmp_path / "data", spam_rows()), params)
    assert [row["validation_accuracy"] for row in report["grid"]] == [1.0, 1.0]
    assert report["selected"] == {"classifier": "linear_svm", "C": 10.0}


def test_more_than_two_classes(tmp_path: Path) -> None:
    other = [
        "meeting moved to room four",
        "agenda for the board meeting",
        "board meeting minutes attached",
        "the meeting starts at nine",
    ]
    data_dir = write_splits(
        tmp_path / "data",
        {
            "train": ([0] * 3 + [1] * 3 + [2] * 3, HAM[:3] + SPAM[:3] + other[:3]),
            "validation": ([0, 1, 2], [HAM[3], SPAM[3], other[3]]),
            "test": ([0, 2], [HAM[4], other[0]]),
        },
    )
    (data_dir / "labels.json").write_text(json.dumps({"labels": ["ham", "spam", "work"]}))
    report, headline = run(tmp_path, data_dir)
    assert set(report["test"]["per_class"]) == {"ham", "spam", "work"} and "tp" not in report["test"]
    confusion = report["validation"]["confusion"]
    assert len(confusion) == 3 and all(len(row) == 3 for row in confusion) and sum(map(sum, confusion)) == 3
    assert report["train"]["accuracy"] == 1.0 and report["train"]["f1"] == report["train"]["macro_f1"]
    assert headline["baseline_test_f1"] == report["test"]["macro_f1"]


def test_a_bad_split_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    data_dir = write_splits(tmp_path / "data", spam_rows())
    (data_dir / "validation.csv").write_text("label,Text\n0,hello\n")
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(params_file({bl.STAGE: PARAMS.model_dump(), "comparison": {}}))
    )
    with pytest.raises(SystemExit, match=r"baseline_spam: error: .*validation.csv: missing column\(s\) \['Label'\]"):
        bl.main(
            [
                "--params",
                str(tmp_path / "params.yaml"),
                "--data",
                str(data_dir),
                "--metrics",
                str(tmp_path / "r.json"),
                "--headline",
                str(tmp_path / "h.json"),
                "--predictions",
                str(tmp_path / "p.csv"),
            ]
        )
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "h.json").exists()


def test_grid_params_are_checked() -> None:
    with pytest.raises(ValueError, match="greater than 0"):
        params_for(bl.BaselineGrid, C=[0.0])
    with pytest.raises(ValueError, match="min n <= max n"):
        params_for(bl.BaselineParams, char_ngrams=[5, 2])
