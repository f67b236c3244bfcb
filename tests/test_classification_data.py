"""Your own classification data: CSV/TSV/JSONL/parquet with any labels, split policies, bad input,
and a three-class CSV fine-tuned, scored, served as a pyfunc and classified by `llm classify`."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from cli import llm as cli
from llmcore.checkpoint import save_checkpoint
from llmcore.classifier import load_classifier
from llmcore.config import GPTConfig
from llmcore.model import GPTModel
from llmpipe.data import DataError, TokenizerParams
from llmpipe.stats import ComparisonParams
from steps import build_spam_dataset as data_stage
from steps import finetune_classifier as ft
from steps import score_spam
from tests.params_values import params_for
from tests.trainer_params import trainer_params

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("LLMPIPE_MIRROR") or REPO.parent / "shared" / "data")
TOKENIZER = params_for(TokenizerParams, encoding_dir=str(MIRROR / "gpt2"))

pytestmark = pytest.mark.skipif(not MIRROR.is_dir(), reason=f"offline mirror {MIRROR} not found")

TOPICS = {
    "sport": [
        "the team won the match",
        "a late goal decided the final",
        "she ran the marathon in record time",
        "the coach praised his players",
        "fans cheered the home side",
        "the striker scored twice",
    ],
    "weather": [
        "heavy rain expected tomorrow",
        "a sunny and warm afternoon",
        "snow is falling in the hills",
        "strong winds across the coast",
        "fog will clear by noon",
        "a cold front moves in tonight",
    ],
    "food": [
        "bake the bread for forty minutes",
        "add salt to the boiling water",
        "a spicy noodle soup recipe",
        "the cake needs more sugar",
        "fresh basil makes the sauce",
        "grill the fish with lemon",
    ],
}


def rows(repeat: int = 2) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"review": f"{text} ({i})", "topic": topic}
            for i in range(repeat)
            for topic, texts in TOPICS.items()
            for text in texts
        ]
    )


def params(**changes) -> data_stage.SpamDataParams:
    base = {"format": "csv", "text_column": "review", "label_column": "topic", "labels": None, "split": "stratified"}
    return params_for(data_stage.SpamDataParams, **{**base, **changes})


def build(tmp_path: Path, source: Path, settings: data_stage.SpamDataParams) -> dict:
    return data_stage.build_spam_dataset(
        settings, source=source, out_dir=tmp_path / "out", metrics_out=tmp_path / "m.json"
    )


def test_stratified_split_keeps_every_row_and_each_class_share(tmp_path: Path) -> None:
    rows(repeat=5).to_csv(tmp_path / "topics.csv", index=False)
    metrics = build(tmp_path, tmp_path / "topics.csv", params())
    assert metrics["labels"] == ["food", "sport", "weather"]  # the data's labels, sorted
    assert metrics["source"] == {"food": 30, "sport": 30, "weather": 30, "malformed_skipped": 0}
    assert metrics["train"] == {"food": 21, "sport": 21, "weather": 21}
    assert metrics["validation"] == {"food": 3, "sport": 3, "weather": 3}
    assert metrics["test"] == {"food": 6, "sport": 6, "weather": 6}
    assert json.loads((tmp_path / "out" / "labels.json").read_text()) == {"labels": ["food", "sport", "weather"]}
    frames = [pd.read_csv(tmp_path / "out" / f"{s}.csv") for s in data_stage.SPLITS]
    assert sorted(pd.concat(frames)["Text"]) == sorted(rows(repeat=5)["review"])
    assert list(frames[0].columns) == ["Label", "Text"] and set(frames[0]["Label"]) == {0, 1, 2}
    build(tmp_path / "again", tmp_path / "topics.csv", params())
    assert (tmp_path / "again" / "out" / "train.csv").read_bytes() == (tmp_path / "out" / "train.csv").read_bytes()


def test_balanced_multiclass_undersamples_to_the_smallest_class(tmp_path: Path) -> None:
    df = rows(repeat=4)
    df = pd.concat([df, df[df["topic"] == "food"].assign(review=lambda d: d["review"] + "!")])  # 48 food
    df.to_csv(tmp_path / "t.tsv", sep="\t", index=False)
    metrics = build(
        tmp_path, tmp_path / "t.tsv", params(format="tsv", split="balanced", labels=["weather", "sport", "food"])
    )
    assert metrics["source"]["food"] == 48 and metrics["labels"] == ["weather", "sport", "food"]
    assert sum(sum(metrics[s].values()) for s in data_stage.SPLITS) == 72  # 24 per class


def test_jsonl_and_parquet_read_the_same_rows(tmp_path: Path) -> None:
    df = rows()
    (tmp_path / "t.jsonl.gz").write_bytes(
        gzip.compress(
            "".join(
                json.dumps({"review": r, "topic": t, "extra": 1}) + "\n" for r, t in zip(df["review"], df["topic"])
            ).encode()
        )
    )
    df.to_parquet(tmp_path / "t.parquet")
    from_jsonl = build(tmp_path / "j", tmp_path / "t.jsonl.gz", params(format="jsonl"))
    from_parquet = build(tmp_path / "p", tmp_path / "t.parquet", params(format="parquet"))
    assert from_jsonl == from_parquet and from_jsonl["source"]["sport"] == 12
    assert (tmp_path / "j" / "out" / "test.csv").read_bytes() == (tmp_path / "p" / "out" / "test.csv").read_bytes()


def test_numeric_labels_sort_as_numbers(tmp_path: Path) -> None:
    df = rows(repeat=5).assign(topic=lambda d: d["topic"].map({"food": "10", "sport": "2", "weather": "1"}))
    df.to_parquet(tmp_path / "t.parquet")
    assert build(tmp_path, tmp_path / "t.parquet", params(format="parquet"))["labels"] == ["1", "2", "10"]


@pytest.mark.parametrize(
    ("write", "settings", "pattern"),
    [
        (
            lambda p: rows().assign(topic="sport").to_csv(p / "d.csv", index=False),
            {},
            r"d\.csv: label column 'topic' has 1 class\(es\) \['sport'\]; a classifier needs at least two",
        ),
        (
            lambda p: rows().to_csv(p / "d.csv", index=False),
            {"text_column": "body"},
            r"d\.csv: no column 'body' \(columns: \['review', 'topic'\]\)",
        ),
        (
            lambda p: rows().rename(columns={"topic": "t"}).to_parquet(p / "d.parquet"),
            {"format": "parquet"},
            r"d\.parquet: no column 'topic' \(columns: \['review', 't'\]\)",
        ),
        (
            lambda p: (p / "d.jsonl").write_text('{"review": "a", "topic": "x"}\nnot json\n'),
            {"format": "jsonl"},
            r"d\.jsonl line 2: not valid JSON",
        ),
        (
            lambda p: (p / "d.jsonl").write_text('{"review": "a", "topic": "x"}\n{"topic": "y"}\n'),
            {"format": "jsonl"},
            r"d\.jsonl line 2: no 'review' value \(1 malformed row",
        ),
        (
            lambda p: rows().to_csv(p / "d.csv", index=False),
            {"labels": ["sport", "food"]},
            r"d\.csv row 7: unknown label 'weather' \(12 malformed row",
        ),
    ],
)
def test_bad_classification_data_is_named_and_nothing_written(
    tmp_path: Path, write, settings: dict, pattern: str
) -> None:
    write(tmp_path)
    (source,) = [p for p in tmp_path.iterdir() if p.name.startswith("d.")]
    with pytest.raises(DataError, match=pattern):
        build(tmp_path, source, params(**{"format": source.suffix[1:], **settings}))
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()


def many_classes(path: Path, classes: int, rows_per_class: int) -> Path:
    pd.DataFrame(
        [{"review": f"text {c} {i}", "topic": f"class{c}"} for c in range(classes) for i in range(rows_per_class)]
    ).to_csv(path, index=False)
    return path


def test_too_many_classes_for_the_rows_are_named_with_file_column_and_counts(tmp_path: Path) -> None:
    """500 classes over 2,000 rows: the 20% test split (401 rows, as scikit-learn rounds) cannot hold one of each."""
    source = many_classes(tmp_path / "d.csv", 500, 4)
    with pytest.raises(DataError) as caught:
        build(tmp_path, source, params())
    assert str(caught.value) == (
        f"{source} label column 'topic' has 500 classes over 2000 rows: the test split "
        "would get 401 rows, fewer than one per class (split: stratified); merge classes, "
        "add rows or change spam_data.train_frac + validation_frac"
    )
    with pytest.raises(DataError, match="has 300 classes over 3000 rows: the validation split would get 60 rows"):
        build(tmp_path, many_classes(tmp_path / "d.csv", 300, 10), params(train_frac=0.6, validation_frac=0.02))
    rare = many_classes(tmp_path / "d.csv", 5, 10)
    with rare.open("a") as handle:
        handle.write("one more,lonely\nand another,lonely\n")
    with pytest.raises(
        DataError,
        match=rf"^{rare} label column 'topic': 1 of 6 classes have fewer than 3 rows "
        r"\(e\.g\. 'lonely': 2\); a stratified split needs one per split$",
    ):
        build(tmp_path, rare, params(train_frac=0.4, validation_frac=0.3))
    three = many_classes(tmp_path / "d.csv", 3, 10)
    with pytest.raises(
        DataError,
        match=rf"^{three} label column 'topic': cannot balance: 1 of 4 classes have no rows "
        r"\(e\.g\. 'absent'\)$",
    ):
        build(tmp_path, three, params(split="balanced", labels=["class0", "class1", "class2", "absent"]))
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()


def test_unknown_labels_can_be_skipped_and_counted(tmp_path: Path) -> None:
    rows(repeat=5).to_csv(tmp_path / "d.csv", index=False)
    metrics = build(tmp_path, tmp_path / "d.csv", params(labels=["sport", "food"], on_malformed="skip"))
    assert metrics["source"] == {"sport": 30, "food": 30, "malformed_skipped": 30}


# ---- a three-class CSV through fine-tuning, scoring, the pyfunc and `llm classify`


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("topics")
    torch.manual_seed(0)
    save_checkpoint(GPTModel(GPTConfig.from_preset("cpu-tiny", context_length=32)), root / "base")
    rows(repeat=3).to_csv(root / "topics.csv", index=False)
    data_stage.build_spam_dataset(
        params(), source=root / "topics.csv", out_dir=root / "data", metrics_out=root / "data.json"
    )
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    for name in ("LLMPIPE_MLFLOW_PARENT_RUN_ID", "LLMPIPE_MLFLOW_EXPERIMENT"):
        mp.delenv(name, raising=False)
    mp.chdir(root)
    settings = trainer_params(
        ft.FinetuneClassifierParams,
        trainable="all",
        token_position="mean",
        epochs=3,
        batch_size=8,
        lr=3e-3,
        eval_every=0,
        eval_batches=None,
        device="cpu",
    )
    ft.finetune_classifier(
        settings,
        base_dir=root / "base",
        data_dir=root / "data",
        out_dir=root / "clf",
        metrics_out=root / "ft.json",
        history_out=root / "hist.csv",
        plots_dir=root / "plots",
        tokenizer_params=TOKENIZER,
        cache_dir=root / ".cache",
    )
    yield root
    mp.undo()


def test_a_three_class_model_follows_the_datas_labels(three_classes: Path) -> None:
    import mlflow

    model = load_classifier(three_classes / "clf")
    assert model.labels == ["food", "sport", "weather"] and model.num_classes == 3
    versions = mlflow.MlflowClient().search_model_versions("name = 'spam-classifier'")
    pyfunc = mlflow.pyfunc.load_model(f"models:/spam-classifier/{max(int(v.version) for v in versions)}")
    out = pyfunc.predict(pd.DataFrame({"text": ["the goal in the final", "rain and wind tonight"]}))
    assert list(out.columns) == ["label", "food_probability", "sport_probability", "weather_probability"]
    assert out[["food_probability", "sport_probability", "weather_probability"]].sum(axis=1).tolist() == pytest.approx(
        [1, 1]
    )
    assert set(out["label"]) <= set(model.labels)


def test_a_three_class_model_scores_per_class_with_macro_f1(three_classes: Path) -> None:
    metrics = score_spam.score_spam(
        params_for(score_spam.ScoreSpamParams, device="cpu"),
        model_dir=three_classes / "clf",
        data_dir=three_classes / "data",
        metrics_out=three_classes / "spam.json",
        headline_out=three_classes / "headline.json",
        plots_dir=three_classes / "plots",
        predictions_out=three_classes / "predictions.csv",
        tokenizer_params=TOKENIZER,
        comparison=params_for(ComparisonParams),
    )
    test = metrics["test"]
    assert set(test["per_class"]) == {"food", "sport", "weather"} and len(test["confusion"]) == 3
    n_test = len(pd.read_csv(three_classes / "data" / "test.csv"))
    assert sum(map(sum, test["confusion"])) == sum(c["support"] for c in test["per_class"].values()) == n_test
    assert test["f1"] == test["macro_f1"] == pytest.approx(sum(c["f1"] for c in test["per_class"].values()) / 3)
    headline = json.loads((three_classes / "headline.json").read_text())
    assert (headline["test_accuracy"], headline["test_f1"]) == (test["accuracy"], test["macro_f1"])
    for key in ("test_accuracy", "test_f1"):  # each with its interval (comparison params)
        assert headline[f"{key}_ci_low"] <= headline[key] <= headline[f"{key}_ci_high"]
    predictions = pd.read_csv(three_classes / "predictions.csv")
    assert (predictions["split"] == "test").sum() == n_test
    table = pd.read_csv(three_classes / "plots" / "spam_confusion.csv")
    assert set(table["actual"]) == {"food", "sport", "weather"}


def test_llm_classify_prints_the_label_and_its_probability(three_classes: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("LLMCORE_GPT2_ENCODING_DIR", TOKENIZER.encoding_dir)
    assert cli.main(["classify", "--model", str(three_classes / "clf"), "bake a cake"]) == 0
    label, rest = capsys.readouterr().out.strip().split(" ", 1)
    assert label in {"food", "sport", "weather"} and rest.startswith("(probability 0.")


def test_a_label_the_classifier_does_not_know_fails_scoring(three_classes: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for split in data_stage.SPLITS:
        (data / f"{split}.csv").write_bytes((three_classes / "data" / f"{split}.csv").read_bytes())
    (data / "labels.json").write_text(json.dumps({"labels": ["food", "sport", "travel"]}))
    with pytest.raises(DataError, match=r"train\.csv row \d+: label 'travel' is not one the classifier knows"):
        score_spam.score_spam(
            params_for(score_spam.ScoreSpamParams, device="cpu"),
            model_dir=three_classes / "clf",
            data_dir=data,
            metrics_out=tmp_path / "m.json",
            headline_out=tmp_path / "h.json",
            plots_dir=tmp_path,
            predictions_out=tmp_path / "p.csv",
            tokenizer_params=TOKENIZER,
            comparison=params_for(ComparisonParams),
        )
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "p.csv").exists()
