"""The registry policy on a real MLflow store: @candidate for every version, @champion only on improvement."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from steps.common.registry import CANDIDATE, CHAMPION, promote_if_better, register_candidate, version_of_run


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> mlflow.MlflowClient:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("registry-test")
    return mlflow.MlflowClient(uri)


def new_version(name: str) -> tuple[str, str]:
    """A run's (empty) LoggedModel, registered through the policy; returns (version, run id)."""
    with mlflow.start_run() as run:
        model = mlflow.initialize_logged_model(name="model")
        mlflow.finalize_logged_model(model.model_id, "READY")
    version = register_candidate(f"models:/{model.model_id}", name)
    return str(version.version), run.info.run_id


def alias(client: mlflow.MlflowClient, name: str, which: str) -> str:
    return str(client.get_model_version_by_alias(name, which).version)


def test_champion_moves_only_when_a_candidate_beats_it(store: mlflow.MlflowClient, tmp_path: Path) -> None:
    v1, run1 = new_version("clf")
    assert alias(store, "clf", CANDIDATE) == v1
    first = promote_if_better("clf", v1, "test_accuracy", 0.90)
    assert first.promoted and alias(store, "clf", CHAMPION) == v1

    v2, _ = new_version("clf")
    assert alias(store, "clf", CANDIDATE) == v2 and alias(store, "clf", CHAMPION) == v1
    worse = promote_if_better("clf", v2, "test_accuracy", 0.85)
    assert not worse.promoted and alias(store, "clf", CHAMPION) == v1
    assert "does not beat champion v1 (0.9000)" in worse.describe("clf", "test_accuracy")

    v3, _ = new_version("clf")
    equal = promote_if_better("clf", v3, "test_accuracy", 0.90)
    assert not equal.promoted and alias(store, "clf", CHAMPION) == v1  # a tie is no improvement
    v4, _ = new_version("clf")
    better = promote_if_better("clf", v4, "test_accuracy", 0.95)
    assert better.promoted and alias(store, "clf", CHAMPION) == v4 and better.champion_value == 0.90
    assert store.get_model_version("clf", v2).tags["test_accuracy"] == "0.85"
    assert str(version_of_run("clf", store.get_run(run1)).version) == v1


def test_lower_is_better_metrics_and_rescoring_the_champion(store: mlflow.MlflowClient, tmp_path: Path) -> None:
    v1, _ = new_version("lm")
    promote_if_better("lm", v1, "val_loss", 5.0, higher_is_better=False)
    v2, _ = new_version("lm")
    assert promote_if_better("lm", v2, "val_loss", 4.0, higher_is_better=False).promoted
    assert alias(store, "lm", CHAMPION) == v2
    again = promote_if_better("lm", v2, "val_loss", 4.0, higher_is_better=False)  # the champion scored again
    assert not again.promoted and alias(store, "lm", CHAMPION) == v2
