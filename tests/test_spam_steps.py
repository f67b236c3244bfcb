"""The spam stages end to end on a tiny model: fine-tune, MLflow registration, pyfunc, scoring."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from llmcore.checkpoint import save_checkpoint
from llmcore.classifier import classify_texts, load_classifier
from llmcore.config import GPTConfig
from llmcore.model import GPTModel
from llmcore.tokenizer import get_tokenizer
from llmpipe import models
from llmpipe.data import DataError, TokenizerParams
from llmpipe.scoring import classification_metrics
from llmpipe.stats import ComparisonParams
from steps import finetune_classifier as ft
from steps import score_spam
from steps.data import datasets
from tests.params_values import params_file, params_for
from tests.trainer_params import TEST_TRAINING, trainer_params

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("LLMPIPE_MIRROR") or REPO.parent / "shared" / "data")
TOKENIZER = params_for(TokenizerParams, encoding_dir=str(MIRROR / "gpt2"))

pytestmark = pytest.mark.skipif(not MIRROR.is_dir(), reason=f"offline mirror {MIRROR} not found")

HAM = [
    "see you at lunch",
    "ok i will call you later",
    "are we still on for tonight?",
    "thanks, got it",
    "how was the exam?",
    "running late, sorry",
]
SPAM = [
    "WINNER! claim your FREE prize now, call 09061701461",
    "Free entry to win cup final tickets, text WIN",
    "URGENT! your mobile won a 2000 cash award",
    "Txt STOP to end, claim ur 500 reward now",
    "Congratulations! You have been selected to receive a 2000 pound award, call 09061701461 now to claim",
    "FREE ringtone, reply YES",
]


def write_split(path: Path, ham: list[str], spam: list[str]) -> None:
    pd.DataFrame({"Label": [0] * len(ham) + [1] * len(spam), "Text": ham + spam}).to_csv(path, index=False)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("spam")
    torch.manual_seed(0)
    save_checkpoint(GPTModel(GPTConfig.from_preset("cpu-tiny", context_length=16)), root / "base")
    (root / "data").mkdir()
    write_split(root / "data" / "train.csv", HAM, SPAM)
    write_split(root / "data" / "validation.csv", HAM[:2], SPAM[:2])
    write_split(root / "data" / "test.csv", HAM[2:5], SPAM[2:5])
    (root / "data" / "labels.json").write_text(json.dumps({"labels": ["ham", "spam"]}))
    return root


@pytest.fixture
def mlflow_uri(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("LLMPIPE_MLFLOW_PARENT_RUN_ID", raising=False)
    monkeypatch.delenv("LLMPIPE_MLFLOW_EXPERIMENT", raising=False)
    monkeypatch.chdir(workspace)  # MLflow's artifact store (./mlruns) lands in the workspace
    return uri


PARAMS = trainer_params(
    ft.FinetuneClassifierParams,
    trainable="lora",
    lora={"rank": 2, "alpha": 4},
    token_position="flexible",
    epochs=2,
    batch_size=4,
    lr=1e-3,
    eval_every=2,
    eval_batches=2,
    device="cpu",
)


@pytest.fixture(scope="module")
def finetuned(workspace: Path) -> dict:
    """One fine-tune run shared by the tests below (MLflow store in the workspace)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow.db'}")
    mp.delenv("LLMPIPE_MLFLOW_PARENT_RUN_ID", raising=False)
    mp.delenv("LLMPIPE_MLFLOW_EXPERIMENT", raising=False)
    mp.chdir(workspace)
    try:
        (workspace / ".cache" / "finetune_classifier" / "stale").mkdir(parents=True)
        metrics = ft.finetune_classifier(
            PARAMS,
            base_dir=workspace / "base",
            data_dir=workspace / "data",
            out_dir=workspace / "clf",
            metrics_out=workspace / "reports" / "ft.json",
            history_out=workspace / "plots" / "hist.csv",
            plots_dir=workspace / "plots",
            tokenizer_params=TOKENIZER,
            cache_dir=workspace / ".cache" / "finetune_classifier",
        )
    finally:
        mp.undo()
    return metrics


def test_finetune_writes_checkpoint_metrics_and_history(workspace: Path, finetuned: dict) -> None:
    model = load_classifier(workspace / "clf")
    assert model.token_position == "flexible" and model.labels == ["ham", "spam"]
    assert model.max_length == 16  # the longest training message (> 16 tokens) capped at the context
    assert type(model.trf_blocks[0].att.qkv) is torch.nn.Linear  # LoRA merged into plain layers
    on_disk = json.loads((workspace / "reports" / "ft.json").read_text())
    assert on_disk["steps"] == 6 and set(on_disk) >= {"train_loss", "val_loss", "train_accuracy", "val_accuracy"}
    assert 0 <= on_disk["val_accuracy"] <= 1
    history = pd.read_csv(workspace / "plots" / "hist.csv")
    assert history["step"].tolist() == [2, 3, 4, 6]  # every 2 steps and at each epoch end (3 steps each)
    assert not (workspace / ".cache" / "finetune_classifier").exists()  # state (and the stale one) removed
    for metric in ("loss", "accuracy"):
        assert (workspace / "plots" / f"spam_training_{metric}.png").read_bytes()[:4] == b"\x89PNG"


def test_interrupted_finetune_resumes_to_the_same_weights(
    workspace: Path, finetuned: dict, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    from llmpipe.tracking import MlflowCallback

    def interrupt(self, state, path):
        raise KeyboardInterrupt  # as if killed right after the first epoch's state was saved

    out, cache = workspace / "resumed", workspace / ".cache" / "resumed"
    paths = dict(
        base_dir=workspace / "base",
        data_dir=workspace / "data",
        out_dir=out / "clf",
        metrics_out=out / "ft.json",
        history_out=out / "hist.csv",
        plots_dir=out,
        tokenizer_params=TOKENIZER,
        cache_dir=cache,
    )
    monkeypatch.setattr(MlflowCallback, "on_checkpoint", interrupt)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune_classifier(PARAMS, **paths)
    assert not (out / "clf").exists()
    (saved,) = cache.glob("*/train_state/state.json")
    assert json.loads(saved.read_text())["step"] == 3
    monkeypatch.setattr(MlflowCallback, "on_checkpoint", lambda self, state, path: None)
    steps_run = []
    monkeypatch.setattr(MlflowCallback, "on_step_end", lambda self, state, metrics: steps_run.append(state.step))
    ft.finetune_classifier(PARAMS, **paths)
    assert steps_run == [4, 5, 6]  # only the second epoch ran again
    resumed, uninterrupted = (
        load_file(out / "clf" / "model.safetensors"),
        load_file(workspace / "clf" / "model.safetensors"),
    )
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)
    assert json.loads((out / "ft.json").read_text()) == json.loads((workspace / "reports" / "ft.json").read_text())


def test_the_same_params_and_seed_give_identical_weights_and_metrics(
    workspace: Path, finetuned: dict, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Determinism on one machine: the fine-tune run again from scratch gives the same bytes and
    metrics; another seed gives other ones (so the check can fail)."""
    from safetensors.torch import load_file

    def run(name: str, params: ft.FinetuneClassifierParams) -> tuple[dict, dict]:
        out = workspace / name
        ft.finetune_classifier(
            params,
            base_dir=workspace / "base",
            data_dir=workspace / "data",
            out_dir=out / "clf",
            metrics_out=out / "ft.json",
            history_out=out / "hist.csv",
            plots_dir=out,
            tokenizer_params=TOKENIZER,
            cache_dir=workspace / ".cache" / name,
        )
        return json.loads((out / "ft.json").read_text()), load_file(out / "clf" / "model.safetensors")

    first, weights = (
        json.loads((workspace / "reports" / "ft.json").read_text()),
        load_file(workspace / "clf" / "model.safetensors"),
    )
    again, again_weights = run("again", PARAMS)
    volatile = {"run_id", "registered_version", "train_s", "tokens_per_s", "mfu"}
    assert {k: v for k, v in again.items() if k not in volatile} == {
        k: v for k, v in first.items() if k not in volatile
    }
    for name, tensor in weights.items():
        torch.testing.assert_close(again_weights[name], tensor, rtol=0, atol=0, msg=name)
    other, other_weights = run("other_seed", PARAMS.model_copy(update={"seed": PARAMS.seed + 1}))
    assert any(not torch.equal(other_weights[name], tensor) for name, tensor in weights.items())
    # `llm compare` on two model directories scores both on the same split: identical models, no gap.
    from pipelines.compare import compare

    monkeypatch.setenv("LLMCORE_GPT2_ENCODING_DIR", TOKENIZER.encoding_dir)
    same, lines = compare(
        str(workspace / "clf"),
        str(workspace / "again" / "clf"),
        data_dir=workspace / "data",
        params=params_for(ComparisonParams),
    )
    assert same.n == 6 and same.difference == 0 and same.p_value == 1.0 and "not significant at 5%" in lines[3]


def test_finetune_logs_and_registers_a_servable_pyfunc(workspace: Path, finetuned: dict, mlflow_uri: str) -> None:
    import mlflow

    client = mlflow.MlflowClient(mlflow_uri)
    run = client.get_run(finetuned["run_id"])
    assert run.data.params["trainable"] == "lora" and run.data.tags["stage"] == "finetune_classifier"
    val_accuracy = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert len(val_accuracy) == 4 and len(client.get_metric_history(run.info.run_id, "val_loss")) == 4
    version = client.get_model_version("spam-classifier", finetuned["registered_version"])
    assert version.run_id == run.info.run_id
    newest = max(int(v.version) for v in client.search_model_versions("name = 'spam-classifier'"))
    assert (
        int(client.get_model_version_by_alias("spam-classifier", "candidate").version) == newest
    )  # the last registered
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"data/train.csv", "data/validation.csv"}

    pyfunc = mlflow.pyfunc.load_model(f"models:/spam-classifier/{finetuned['registered_version']}")
    texts = ["FREE prize! call now", "see you soon"]
    out = pyfunc.predict(pd.DataFrame({"text": texts}))
    assert list(out.columns) == ["label", "spam_probability"] and len(out) == 2
    expected = classify_texts(load_classifier(workspace / "clf"), get_tokenizer(TOKENIZER.encoding_dir), texts)
    assert out["label"].tolist() == [label for label, _ in expected]
    assert out["spam_probability"].tolist() == pytest.approx([p for _, p in expected], abs=1e-6)
    with pytest.raises(Exception, match="text"):
        pyfunc.predict(pd.DataFrame({"message": texts}))


def test_score_spam_writes_metrics_and_confusion_plots(workspace: Path, finetuned: dict, mlflow_uri: str) -> None:
    import mlflow

    metrics = score_spam.score_spam(
        params_for(score_spam.ScoreSpamParams, device="cpu"),
        model_dir=workspace / "clf",
        data_dir=workspace / "data",
        metrics_out=workspace / "reports" / "spam.json",
        headline_out=workspace / "metrics" / "spam.json",
        plots_dir=workspace / "plots",
        predictions_out=workspace / "reports" / "predictions.csv",
        tokenizer_params=TOKENIZER,
        comparison=params_for(ComparisonParams),
    )
    assert json.loads((workspace / "reports" / "spam.json").read_text()) == metrics
    headline = json.loads((workspace / "metrics" / "spam.json").read_text())
    test = metrics["test"]
    assert headline == {
        "test_accuracy": test["accuracy"],
        "test_f1": test["f1"],
        "test_accuracy_ci_low": test["accuracy_ci_low"],
        "test_accuracy_ci_high": test["accuracy_ci_high"],
        "test_f1_ci_low": test["f1_ci_low"],
        "test_f1_ci_high": test["f1_ci_high"],
        "validation_accuracy": metrics["validation"]["accuracy"],
    }
    # 6 test messages: the Wilson interval is wide and holds the accuracy.
    assert test["accuracy_ci_low"] <= test["accuracy"] <= test["accuracy_ci_high"]
    assert test["accuracy_ci_high"] - test["accuracy_ci_low"] > 0.4
    predictions = pd.read_csv(workspace / "reports" / "predictions.csv")
    assert predictions.groupby("split").size().to_dict() == {"test": 6, "train": 12, "validation": 4}
    assert predictions[predictions["split"] == "test"]["correct"].mean() == pytest.approx(test["accuracy"])
    # Scores sit in the run that trained these weights (the newest: the resume test wrote the same
    # bytes again), beside its lr; that run's version, the first scored, becomes @champion.
    client = mlflow.MlflowClient(mlflow_uri)
    champion = client.get_model_version_by_alias("spam-classifier", "champion")
    training = client.get_run(champion.run_id)
    assert training.data.tags["stage"] == "finetune_classifier" and training.data.params["lr"] == str(PARAMS.lr)
    assert training.data.metrics["test_accuracy"] == metrics["test"]["accuracy"]
    assert training.data.metrics["test_accuracy_ci_low"] == metrics["test"]["accuracy_ci_low"]
    # The registry chose on validation (4 messages); the test accuracy is recorded beside.
    (key,) = [k for k in champion.tags if k.startswith("eval.validation.n4.") and k.endswith(".accuracy")]
    assert float(champion.tags[key]) == pytest.approx(metrics["validation"]["accuracy"])
    assert float(champion.tags[key.replace(".accuracy", ".test_accuracy")]) == pytest.approx(
        metrics["test"]["accuracy"]
    )
    test = pd.read_csv(workspace / "data" / "test.csv")
    predicted = classify_texts(
        load_classifier(workspace / "clf"), get_tokenizer(TOKENIZER.encoding_dir), test["Text"].tolist()
    )
    intervals = {k: v for k, v in metrics["test"].items() if "_ci_" in k}
    assert set(intervals) == {"accuracy_ci_low", "accuracy_ci_high", "f1_ci_low", "f1_ci_high"}
    assert {k: v for k, v in metrics["test"].items() if k not in intervals} == classification_metrics(
        test["Label"].tolist(), [int(label == "spam") for label, _ in predicted], ["ham", "spam"]
    )
    assert sum(metrics["train"][k] for k in ("tn", "fp", "fn", "tp")) == 12
    table = pd.read_csv(workspace / "plots" / "spam_confusion.csv")
    assert table["actual"].tolist() == ["ham"] * 3 + ["spam"] * 3
    assert set(table["predicted"]) <= {"ham", "spam"}
    assert (workspace / "plots" / "spam_confusion.png").read_bytes()[:4] == b"\x89PNG"


BINARY = ["ham", "spam"]


def test_classification_metrics_match_hand_counts() -> None:
    metrics = classification_metrics([0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 1, 0], BINARY)
    headline = {k: metrics[k] for k in ("accuracy", "precision", "recall", "f1", "tn", "fp", "fn", "tp")}
    assert headline == {
        "accuracy": pytest.approx(4 / 6),
        "precision": pytest.approx(2 / 3),
        "recall": pytest.approx(2 / 3),
        "f1": pytest.approx(2 / 3),
        "tn": 2,
        "fp": 1,
        "fn": 1,
        "tp": 2,
    }
    assert metrics["confusion"] == [[2, 1], [1, 2]] and metrics["per_class"]["spam"]["support"] == 3
    none_flagged = classification_metrics([1, 0, 1, 0], [0, 0, 0, 0], BINARY)
    assert {k: none_flagged[k] for k in headline} == {
        "accuracy": 0.5,
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "tn": 2,
        "fp": 0,
        "fn": 2,
        "tp": 0,
    }
    assert none_flagged["per_class"]["ham"] == {
        "precision": 0.5,
        "recall": 1.0,
        "f1": pytest.approx(2 / 3),
        "support": 2,
    }
    assert none_flagged["macro_f1"] == pytest.approx(1 / 3)
    precise = classification_metrics([1, 1, 1, 0], [1, 0, 0, 0], BINARY)
    assert (precise["precision"], precise["recall"], precise["f1"]) == (1.0, pytest.approx(1 / 3), pytest.approx(0.5))


def test_multiclass_metrics_are_per_class_and_macro() -> None:
    metrics = classification_metrics([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0], ["a", "b", "c"])
    assert metrics["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert metrics["per_class"]["b"] == {
        "precision": pytest.approx(2 / 3),
        "recall": 1.0,
        "f1": pytest.approx(0.8),
        "support": 2,
    }
    assert metrics["f1"] == metrics["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert metrics["accuracy"] == pytest.approx(4 / 6) and "tp" not in metrics


def test_base_without_gpt2_weights_fails_clearly(workspace: Path, tmp_path: Path, capsys) -> None:
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "status.json").write_text(json.dumps({"loaded": False, "reason": "no network"}))
    with pytest.raises(models.BaseModelError, match=r"has no weights .*loaded=false.*no network"):
        models.load_base_model(gpt2)
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            params_file(
                {
                    "training": TEST_TRAINING,
                    "finetune_classifier": {},
                    "tokenizer": TOKENIZER.model_dump(),
                    "classifier_base": {"dir": str(gpt2)},
                }
            )
        )
    )
    with pytest.raises(SystemExit, match=r"finetune_classifier: error: base model .*gpt2 has no weights"):
        ft.main(["--params", str(params), "--data", str(workspace / "data"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    with pytest.raises(models.BaseModelError, match="not found .*run its stage first"):
        models.load_base_model(tmp_path / "missing")


def test_bad_spam_csv_is_named(tmp_path: Path) -> None:
    pd.DataFrame({"Label": [0, 2], "Text": ["a", "b"]}).to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(DataError, match=r"train.csv row 2: Label must be a class id in \[0, 2\), got 2"):
        datasets.read_spam_split(tmp_path / "train.csv")
    pd.DataFrame({"label": [0], "Text": ["a"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=r"missing column\(s\) \['Label'\]"):
        datasets.read_spam_split(tmp_path / "bad.csv")


def test_an_unusable_tracking_store_fails_in_one_line_before_any_output(
    workspace: Path, finetuned: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corrupt = tmp_path / "mlflow.db"
    corrupt.write_bytes(b"this is not a database" * 100)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{corrupt}")
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            params_file(
                {
                    "score_spam": {"batch_size": 32, "plot_split": "test", "seed": 123, "device": "cpu"},
                    "tokenizer": TOKENIZER.model_dump(),
                    "comparison": {},
                }
            )
        )
    )
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        score_spam.main(
            [
                "--params",
                str(params),
                "--model",
                str(workspace / "clf"),
                "--data",
                str(workspace / "data"),
                "--metrics",
                str(out / "spam.json"),
                "--headline",
                str(out / "headline.json"),
                "--plots",
                str(out),
                "--predictions",
                str(out / "predictions.csv"),
            ]
        )
    message = str(exc.value.code)
    assert message.startswith(
        f"score_spam: error: MLflow tracking store sqlite:///{corrupt} (MLFLOW_TRACKING_URI) failed"
    )
    assert "\n" not in message and "Traceback" not in message
    assert not out.exists()  # nothing written, nothing complete-looking
