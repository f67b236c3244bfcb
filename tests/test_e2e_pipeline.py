"""The whole pipeline through Prefect, DVC and MLflow, on a copy of the repo with tiny params.

One run of every stage (offline, from the mirror), then a second run that DVC must skip
entirely (and that logs no MLflow run), then a flow run with one fine-tuning parameter
overridden, as a user launches an experiment from the Prefect UI: only that fine-tune and what
follows it run, and the result is a named DVC experiment. Seconds-scale models; the judge points
at a closed port, so scoring falls back to what it can do offline.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from pipelines.flows import OrchestrationParams
from tests.params_values import values_for
from tests.repo_copy import GIT, REPO, closed_port, copy_repo

MIRROR = REPO.parent / "shared" / "data"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not MIRROR.is_dir(), reason=f"offline mirror {MIRROR} not found"),
]


@pytest.fixture(scope="module")
def environment(tmp_path_factory: pytest.TempPathFactory):
    """Offline inputs, one MLflow store and one temporary Prefect server for the module."""
    from prefect.testing.utilities import prefect_test_harness

    previous_uri = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMPIPE_MIRROR", str(MIRROR))
        patch.setenv("LLMCORE_GPT2_ENCODING_DIR", str(MIRROR / "gpt2"))
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")
        patch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry calls offline
        for name in ("LLMPIPE_MLFLOW_PARENT_RUN_ID", "LLMPIPE_MLFLOW_EXPERIMENT", "LLMPIPE_PARAMS", "DVC_EXP_NAME"):
            patch.delenv(name, raising=False)
        with prefect_test_harness(server_startup_timeout=180):
            yield
    mlflow.set_tracking_uri(previous_uri)


@pytest.fixture
def pipeline_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, environment) -> Path:
    repo = copy_repo(tmp_path / "repo")
    monkeypatch.chdir(repo)
    return repo


@pytest.fixture
def flaky_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, environment) -> Path:
    """Shell-only stages: a download that fails once, a stage that fails, one after it."""
    stages = {
        "download_flaky": {
            "cmd": (
                "if [ ! -f ../attempted ]; then touch ../attempted; echo 'network down' >&2; exit 1; fi; "
                "echo data > raw.txt"
            ),
            "outs": ["raw.txt"],
        },
        "broken": {
            "cmd": "echo checking raw.txt && echo 'broken: error: bad input raw.txt' >&2 && exit 3",
            "deps": ["raw.txt"],
            "outs": ["clean.txt"],
        },
        "after": {"cmd": "cat clean.txt > final.txt", "deps": ["clean.txt"], "outs": ["final.txt"]},
    }
    repo = tmp_path / "flaky"
    repo.mkdir()
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=repo, check=True)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    orchestration = values_for(
        OrchestrationParams,
        mlflow_experiment="e2e-flaky",
        mlflow_ui_url="http://mlflow.test",
        download_retry_delays_s=[0],
    )
    (repo / "params.yaml").write_text(yaml.safe_dump({"orchestration": orchestration}))
    monkeypatch.chdir(repo)
    return repo


def child_runs(client: mlflow.MlflowClient, parent_run_id: str) -> dict[str, mlflow.entities.Run]:
    """The stage runs of a pipeline run, by stage: each in its model's experiment (one naming rule
    for every route), linked to the pipeline's run by tag ``pipeline_run_id``."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.pipeline_run_id = '{parent_run_id}'")
    return {run.data.tags["stage"]: run for run in runs}


def summary_artifact(flow_run_id, key: str) -> str:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    (summary,) = [artifact.data for artifact in artifacts if artifact.key == key]
    return summary


def test_a_failed_stage_fails_the_flow_with_its_output_after_download_retries(flaky_repo: Path) -> None:
    from pipelines.flows import llm_pipeline

    state = llm_pipeline(return_state=True)
    assert state.is_failed()
    assert "stage 'broken' failed" in state.message and "broken: error: bad input raw.txt" in state.message
    assert (flaky_repo / "raw.txt").is_file()  # the download failed once, then its retry ran
    assert not (flaky_repo / "final.txt").exists()

    summary = summary_artifact(state.state_details.flow_run_id, "pipeline-all")
    assert summary.startswith("# Pipeline `all`: failed: stage 'broken' failed")
    assert "| download_flaky | ran |" in summary and "| after | not run | |" in summary
    client = mlflow.MlflowClient()
    (parent,) = client.search_runs([client.get_experiment_by_name("e2e-flaky").experiment_id])
    assert parent.info.status == "FAILED"
    assert f"(http://mlflow.test/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id})" in summary


TRAIN = (
    "python -c \"import sys, yaml; x = yaml.safe_load(open('params.yaml'))['train']['x']; "
    "sys.exit('train: error: x must be positive') if x <= 0 else open('model.txt', 'w').write(str(x))\""
)


def test_a_failed_in_place_experiment_leaves_the_checkout_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, environment
) -> None:
    from pipelines.flows import llm_pipeline

    repo = tmp_path / "inplace"
    repo.mkdir()
    monkeypatch.chdir(repo)
    subprocess.run([*GIT, "init", "-q"], check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], check=True)
    stage = {"cmd": TRAIN, "params": ["train.x"], "outs": ["model.txt"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}}))
    orchestration = yaml.safe_dump({"orchestration": values_for(OrchestrationParams, push=False)})
    (repo / "params.yaml").write_text("train:\n  x: 1  # a comment DVC's writer keeps\n" + orchestration)
    assert llm_pipeline(where="in-place").stages_by_status["ran"] == ["train"]
    subprocess.run([*GIT, "add", "-A"], check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "trained"], check=True)
    before = {name: (repo / name).read_text() for name in ("params.yaml", "dvc.lock", "model.txt")}

    state = llm_pipeline(params={"train.x": -1}, experiment="negative", return_state=True)
    assert state.is_failed() and "train: error: x must be positive" in state.message
    assert {name: (repo / name).read_text() for name in before} == before  # params, lock and model as they were
    assert subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout == ""


def test_an_unreachable_mlflow_server_fails_the_flow_in_one_line_before_any_stage(
    flaky_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.flows import llm_pipeline

    url = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a closed port, no backoff to wait through
    state = llm_pipeline(return_state=True)
    assert state.is_failed()
    assert f"MLflow tracking store {url} (MLFLOW_TRACKING_URI) failed" in state.message
    assert "Traceback" not in state.message and not (flaky_repo / "raw.txt").exists()  # no stage ran


# The stages that train or load a model (and the baseline, and train_tokenizer's report) log a run;
# evaluate and the scorers log into those runs.
TRAINING_STAGES = {
    "pretrain",
    "load_gpt2",
    "load_base",
    "adapt_pretrain",
    "finetune_classifier",
    "finetune_instruct",
    "baseline_spam",
    "preference_tune",
    "train_tokenizer",
}


def test_pipeline_runs_every_stage_then_skips_then_reruns_only_downstream(pipeline_repo: Path) -> None:
    from pipelines.dag import read_dag
    from pipelines.flows import llm_pipeline

    stages = list(read_dag(pipeline_repo))  # dvc.yaml order

    # 1. Everything runs, in an order DVC accepts, and produces its outputs and metrics.
    state = llm_pipeline(return_state=True)
    assert state.is_completed(), state.message
    report = state.result()
    order = report.stages_by_status["ran"]
    assert sorted(order) == sorted(stages)
    dag = read_dag(pipeline_repo)
    assert all(order.index(upstream) < order.index(downstream) for upstream, downstream in dag.edges)

    from dvc.repo import Repo

    with Repo(str(pipeline_repo)) as repo:
        outs = [out.fs_path for stage in repo.index.stages for out in stage.outs]
    missing = [path for path in outs if not Path(path).exists()]
    assert outs and missing == []

    shown = json.loads(
        subprocess.run(
            [sys.executable, "-m", "dvc", "metrics", "show", "--json"], capture_output=True, text=True, check=True
        ).stdout
    )
    (workspace,) = shown.values()  # keyed "workspace" or "" depending on DVC's version
    headline = {path: entry["data"] for path, entry in workspace["data"].items()}
    ci = ("", "_ci_low", "_ci_high")
    assert set(headline["metrics/spam.json"]) == {f"test_{m}{c}" for m in ("accuracy", "f1") for c in ci} | {
        "validation_accuracy"
    }
    assert set(headline["metrics/baseline.json"]) == {f"baseline_test_{m}{c}" for m in ("accuracy", "f1") for c in ci}
    assert set(headline["metrics/pretrain.json"]) == {f"val_{m}{c}" for m in ("loss", "perplexity") for c in ci}
    assert "rouge_l_f1" in headline["metrics/instructions.json"]
    assert "rouge_l_f1" in headline["metrics/instructions_dpo.json"]
    assert set(headline["metrics/preference.json"]) == {"sft", "dpo", "dpo_minus_sft"}  # before and after DPO, paired
    assert report.metrics and all(isinstance(v, (int, float)) for v in report.metrics.values())

    client = mlflow.MlflowClient()
    parent = client.get_run(report.mlflow_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["windows.context_length"] == "32"
    assert parent.data.tags["prefect_flow_run_id"] == str(state.state_details.flow_run_id)
    children = child_runs(client, report.mlflow_run_id)
    assert set(children) == TRAINING_STAGES
    # The spam fine-tune's run holds its lr and, logged by score_spam, its test accuracy.
    spam_run = children["finetune_classifier"]
    assert client.get_experiment(spam_run.info.experiment_id).name == "spam-classifier"  # as from `dvc exp run`
    assert spam_run.data.metrics["test_accuracy"] == headline["metrics/spam.json"]["test_accuracy"]
    summary = summary_artifact(state.state_details.flow_run_id, "pipeline-all")
    assert report.mlflow_url in summary and "LLM − baseline: " in summary
    difference = 100 * (
        headline["metrics/spam.json"]["test_accuracy"] - headline["metrics/baseline.json"]["baseline_test_accuracy"]
    )
    assert parent.data.metrics["llm_minus_baseline_test_accuracy_points"] == pytest.approx(difference, abs=0.01)
    assert 0 < parent.data.metrics["llm_minus_baseline_mcnemar_p"] <= 1  # paired on the same test messages
    assert "McNemar p = " in summary and "% CI [" in summary
    assert parent.data.tags["mlflow.note.content"] == summary  # the MLflow run page's Description

    # 2. Nothing changed: DVC skips every stage, and no MLflow run is made.
    runs_before = len(client.search_runs([parent.info.experiment_id]))
    again = llm_pipeline()
    assert sorted(again.stages_by_status["skipped"]) == sorted(stages)
    assert again.mlflow_run_id == "" and len(client.search_runs([parent.info.experiment_id])) == runs_before

    # 3. One fine-tuning parameter overridden, as from the Prefect UI's Run form: only that
    # fine-tune and its scoring run again, and the run is saved as a named DVC experiment.
    lr = yaml.safe_load(Path("params.yaml").read_text())["finetune_classifier"]["lr"] * 2
    rerun = llm_pipeline(pipeline="spam", params={"finetune_classifier.lr": lr}, experiment="lr-double")
    # check_params reads all of params.yaml, so it runs again; its report is unchanged, so nothing
    # but the fine-tune and its scoring follows.
    assert rerun.stages_by_status["ran"] == ["check_params", "finetune_classifier", "score_spam"]
    assert set(child_runs(client, rerun.mlflow_run_id)) == {"finetune_classifier"}
    assert child_runs(client, rerun.mlflow_run_id)["finetune_classifier"].info.run_name == "lr-double"
    shown = json.loads(
        subprocess.run(
            [sys.executable, "-m", "dvc", "exp", "show", "--json"], capture_output=True, text=True, check=True
        ).stdout
    )
    experiments = {exp["name"]: exp for commit in shown for exp in (commit.get("experiments") or [])}
    saved = experiments["lr-double"]["revs"][0]["data"]
    assert saved["params"]["params.yaml"]["data"]["finetune_classifier"]["lr"] == lr
    assert isinstance(saved["metrics"]["metrics/spam.json"]["data"]["test_accuracy"], float)
