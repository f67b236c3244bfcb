"""Experiment comparison with plain DVC, as the README's walkthrough does it, on tiny params.

A baseline ``dvc repro`` of the spam pipeline, two ``dvc exp run -S`` experiments, then what a
user compares: ``dvc exp show`` has numeric headline metrics for every experiment,
``dvc metrics diff`` names the changed metric, the registry's ``@champion`` is the better model;
switching back to params that already ran restores from DVC's run cache without training; and
``dvc push`` then ``dvc pull`` into a fresh clone leaves ``dvc repro`` nothing to do.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.repo_copy import GIT, REPO, copy_repo, use_remote

MIRROR = REPO.parent / "shared" / "data"
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not MIRROR.is_dir(), reason=f"offline mirror {MIRROR} not found"),
]


def dvc(repo: Path, *args: str) -> str:
    """A DVC command in ``repo`` as a user runs it (the venv's python first on PATH); its output."""
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The spam pipeline run once and committed (dvc.lock and headline metrics), offline."""
    root = tmp_path_factory.mktemp("experiments")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMPIPE_MIRROR", str(MIRROR))
        patch.setenv("LLMCORE_GPT2_ENCODING_DIR", str(MIRROR / "gpt2"))
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        for name in ("LLMPIPE_MLFLOW_PARENT_RUN_ID", "LLMPIPE_MLFLOW_EXPERIMENT", "LLMPIPE_PARAMS", "DVC_EXP_NAME"):
            patch.delenv(name, raising=False)
        repo = copy_repo(root / "repo", remote=root / "remote")
        dvc(repo, "repro", "score_spam")
        subprocess.run([*GIT, "add", "-A"], cwd=repo, check=True)
        subprocess.run([*GIT, "commit", "-q", "-m", "baseline"], cwd=repo, check=True)
        mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
        yield repo


def experiment_metrics(repo: Path) -> dict[str, dict]:
    """``dvc exp show --json`` as {experiment name: its headline spam metrics}."""
    shown = json.loads(dvc(repo, "exp", "show", "--json").strip().splitlines()[-1])
    found = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            data = exp["revs"][0]["data"]
            found[exp["name"]] = data["metrics"]["metrics/spam.json"]["data"]
    return found


def test_two_experiments_compare_in_dvc_and_the_registry_keeps_the_better(baseline: Path) -> None:
    logs = [
        dvc(baseline, "exp", "run", "-n", "lr-fast", "-S", "finetune_classifier.lr=3e-3", "score_spam"),
        dvc(baseline, "exp", "run", "-n", "lr-slow", "-S", "finetune_classifier.lr=1e-4", "score_spam"),
    ]
    shown = experiment_metrics(baseline)
    fast, slow = shown["lr-fast"], shown["lr-slow"]
    keys = ("test_accuracy", "test_f1", "test_accuracy_ci_low", "test_accuracy_ci_high", "validation_accuracy")
    assert all(isinstance(m[k], float) for m in (fast, slow) for k in keys)  # dvc exp show carries the intervals
    assert fast["test_accuracy"] != slow["test_accuracy"]
    assert fast["test_accuracy_ci_low"] <= fast["test_accuracy"] <= fast["test_accuracy_ci_high"]

    # llm compare reads both experiments' per-example predictions at their revisions (dvc.api).
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    compared = subprocess.run(
        [sys.executable, "-m", "cli.llm", "compare", "lr-fast", "lr-slow"],
        cwd=baseline,
        env=env,
        capture_output=True,
        text=True,
    )
    assert compared.returncode == 0, compared.stderr
    points = 100 * (fast["test_accuracy"] - slow["test_accuracy"])
    assert f"A − B: {points:+.1f} points".replace("-", "−") in compared.stdout and "McNemar p = " in compared.stdout
    assert "significant at 5%" in compared.stdout

    diff = dvc(baseline, "metrics", "diff", "lr-fast", "lr-slow")
    assert "metrics/spam.json" in diff and "test_accuracy" in diff
    plots = dvc(baseline, "plots", "diff", "lr-fast", "lr-slow", "-o", str(baseline.parent / "plots"))
    assert "index.html" in plots

    # MLflow: each experiment's fine-tune run is named after it and holds its lr and test accuracy;
    # @champion is the version of whichever scored better.
    client = mlflow.MlflowClient()
    runs = {
        run.info.run_name: run
        for run in client.search_runs(
            [client.get_experiment_by_name("spam-classifier").experiment_id],
            filter_string="tags.stage = 'finetune_classifier'",
        )
    }
    assert runs["lr-fast"].data.params["lr"] == "0.003" and runs["lr-slow"].data.params["lr"] == "0.0001"
    assert runs["lr-fast"].data.metrics["test_accuracy"] == pytest.approx(fast["test_accuracy"])
    # @champion moved only on validation and beyond noise: every promotion the stages printed names
    # McNemar's p below 0.05 (or there was no champion before); the test accuracy never decided.
    for promoted in re.findall(r"is now @champion: validation accuracy [0-9.]+ \(([^)]*)\)", "\n".join(logs)):
        p_value = re.search(r"McNemar exact p = ([0-9.e-]+)", promoted)
        assert p_value and float(p_value.group(1)) < 0.05, promoted
    champion = client.get_model_version_by_alias("spam-classifier", "champion")
    assert any(k.startswith("eval.validation.") for k in champion.tags)


def test_back_to_params_that_ran_restores_from_the_run_cache(baseline: Path) -> None:
    subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=baseline, check=True)  # the baseline's lr
    client = mlflow.MlflowClient()
    before = len(client.search_runs([client.get_experiment_by_name("spam-classifier").experiment_id]))
    output = dvc(baseline, "repro", "score_spam")
    assert "Stage 'finetune_classifier' is cached - skipping run" in output
    assert "Running stage" not in output  # the training command did not run
    assert len(client.search_runs([client.get_experiment_by_name("spam-classifier").experiment_id])) == before
    assert dvc(baseline, "status", "--with-deps", "score_spam").strip().endswith("Data and pipelines are up to date.")


def test_a_fresh_clone_pulls_the_models_and_has_nothing_to_reproduce(baseline: Path, tmp_path: Path) -> None:
    # The workspace is the committed baseline again (the run cache restored it above).
    assert subprocess.run(["git", "status", "--porcelain"], cwd=baseline, capture_output=True, text=True).stdout == ""
    dvc(baseline, "push", "--with-deps", "score_spam")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(baseline), str(clone)], check=True)
    use_remote(clone, baseline.parent / "remote")
    dvc(clone, "pull", "--with-deps", "score_spam")
    assert (clone / "models" / "spam_classifier" / "model.safetensors").is_file()
    assert dvc(clone, "status", "--with-deps", "score_spam").strip().endswith("Data and pipelines are up to date.")
    assert "Running stage" not in dvc(clone, "repro", "score_spam")
