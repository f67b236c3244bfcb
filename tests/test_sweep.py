"""`llm sweep`: the dvc exp run commands it issues, the table of mean ± sd, the MLflow grouping and
the workspace left as it was. DVC is a stand-in script here (the real sweep's figures are in the
README); it records its arguments and writes the metrics a seed would."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import mlflow
import pytest

from cli import llm as cli
from pipelines import sweep

FAKE_DVC = """#!{python}
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
with open("dvc_calls.jsonl", "a") as log:
    log.write(json.dumps({{"args": args, "sweep": os.environ.get("LLMPIPE_SWEEP")}}) + "\\n")
if args[:2] == ["exp", "run"]:
    seed = int([a for a in args if a.startswith("finetune_classifier.seed=")][0].split("=")[1])
    if seed == 999:
        sys.exit(3)
    Path("params.yaml").write_text(f"finetune_classifier:\\n  seed: {{seed}}\\n")
    accuracy = {{123: 0.96, 124: 0.95, 125: 0.94}}[seed]
    Path("metrics").mkdir(exist_ok=True)
    Path("metrics/spam.json").write_text(json.dumps({{"test_accuracy": accuracy, "test_accuracy_ci_low": 0.9}}))
    import mlflow
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("spam-classifier")
    with mlflow.start_run(tags={{"sweep": os.environ["LLMPIPE_SWEEP"]}}):
        mlflow.log_metric("test_accuracy", accuracy)
"""


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    dvc = bin_dir / "dvc"
    dvc.write_text(FAKE_DVC.format(python=sys.executable))
    dvc.chmod(dvc.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("finetune_classifier:\n  seed: 123\n  lr: 0.001\n")
    return tmp_path


def test_a_sweep_runs_each_seed_as_an_experiment_and_reports_mean_and_sd(workspace: Path, capsys) -> None:
    assert cli.main(["sweep", "-S", "finetune_classifier.lr=2e-3", "--seeds", "123,124,125"]) == 0
    calls = [json.loads(line) for line in (workspace / "dvc_calls.jsonl").read_text().splitlines()]
    runs = [c for c in calls if c["args"][:2] == ["exp", "run"]]
    assert [c["args"] for c in runs] == [
        [
            "exp",
            "run",
            "-n",
            f"lr-2e-3-s{seed}",
            "-S",
            "finetune_classifier.lr=2e-3",
            "-S",
            f"finetune_classifier.seed={seed}",
        ]
        for seed in (123, 124, 125)
    ]
    assert {c["sweep"] for c in runs} == {"lr-2e-3"}
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("spam.test_accuracy "))
    assert "0.9600" in row and "0.9500" in row and "0.9400" in row and row.endswith("0.9500 ± 0.0100")
    assert "_ci_" not in out  # intervals stay in each experiment's metrics, the table shows the headline
    # params.yaml is back as it was (not the last seed's), and DVC was asked to restore the outputs.
    assert (workspace / "params.yaml").read_text() == "finetune_classifier:\n  seed: 123\n  lr: 0.001\n"
    assert calls[-1]["args"] == ["checkout", "--quiet"]
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    summary = client.search_runs(
        [client.get_experiment_by_name("spam-classifier").experiment_id], "tags.stage = 'sweep'"
    )
    assert len(summary) == 1 and summary[0].data.tags["sweep"] == "lr-2e-3"
    assert summary[0].data.metrics["spam.test_accuracy_mean"] == pytest.approx(0.95)
    assert summary[0].data.metrics["spam.test_accuracy_sd"] == pytest.approx(0.01)


def test_bad_options_and_a_failed_seed_are_one_line(workspace: Path, capsys) -> None:
    assert cli.main(["sweep", "--seeds", "123"]) == 1
    assert "give at least two different seeds" in capsys.readouterr().err
    assert cli.main(["sweep", "-S", "lr", "--seeds", "1,2"]) == 1
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert cli.main(["sweep", "--seeds", "123,999", "-n", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llm sweep: error: experiment x-s999 failed (dvc exp run exit 3)") and err.count("\n") == 1


def test_sweep_names() -> None:
    assert sweep.sweep_name([]) == "default"
    assert sweep.sweep_name(["finetune_classifier.lr=2e-3", "finetune_classifier.epochs=3"]) == "lr-2e-3_epochs-3"
