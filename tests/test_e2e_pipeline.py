"""The whole pipeline through Prefect, DVC and MLflow, on a copy of the repo with tiny params.

One run of every stage (offline, from the mirror), then a second run that DVC must skip
entirely, then one fine-tuning parameter changed: only that fine-tune and what follows it
may run again. Seconds-scale models; the judge points at a closed port, so scoring falls back
to what it can do offline.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MIRROR = REPO.parent / "shared" / "data"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not MIRROR.is_dir(), reason=f"offline mirror {MIRROR} not found"),
]


def closed_port() -> int:
    """A localhost port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Only keys that exist in params.yaml are overridden (a renamed key fails loudly below).
TINY_PARAMS = {
    # Few windows and examples: a handful of optimizer steps per training stage.
    "windows": {"context_length": 32, "stride": 128},
    "spam_data": {"train_frac": 0.1, "validation_frac": 0.05},
    "instruction_data": {"train_frac": 0.05, "test_frac": 0.05},
    "pretrain": {
        "model": {"preset": "cpu-tiny", "context_length": 32, "emb_dim": None, "n_heads": None, "n_layers": None},
        "epochs": 1, "batch_size": 16, "eval_every": 0, "eval_batches": 1, "checkpoint_every": 0,
        "sample": {"max_new_tokens": 4},
    },
    "evaluate": {"batch_size": 32, "generation": {"max_new_tokens": 4}},
    "finetune_classifier": {"epochs": 1, "batch_size": 16, "max_length": 32, "eval_every": 0, "eval_batches": 1},
    "finetune_instruct": {"epochs": 1, "batch_size": 16, "max_length": 32, "eval_every": 0, "eval_batches": 1,
                          "checkpoint_every": 0, "sample_entries": 1, "sample_max_new_tokens": 4},
    "score_instructions": {"max_new_tokens": 4, "max_entries": 4,
                           "judge": {"url": f"http://127.0.0.1:{closed_port()}", "required": False, "connect_retries": 0,
                                     "connect_timeout_s": 1}},
    "orchestration": {"mlflow_experiment": "e2e", "download_retry_delays_s": [1]},
}


MODEL_STAGES = {"pretrain", "evaluate", "load_gpt2", "finetune_classifier", "score_spam", "finetune_instruct", "score_instructions"}


def override(params: dict, tiny: dict, where: str = "") -> None:
    for key, value in tiny.items():
        if key not in params:
            if where:  # a nested key the stage does not know: the test is out of date
                raise KeyError(f"params.yaml has no {where}{key}; update TINY_PARAMS")
            continue  # a stage not in this checkout yet
        if isinstance(value, dict) and isinstance(params[key], dict):
            override(params[key], value, f"{where}{key}.")
        else:
            params[key] = value


def copy_repo(dest: Path) -> Path:
    """The project's files (tracked or not ignored), as a fresh git repo: no data, no dvc.lock."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if name == "dvc.lock" or not source.is_file():
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest / name)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    override(params, TINY_PARAMS)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=e2e", "-c", "user.email=e2e@example.invalid"]
    subprocess.run([*git, "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "e2e"], cwd=dest, check=True)
    return dest


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
            "cmd": "if [ ! -f ../attempted ]; then touch ../attempted; echo 'network down' >&2; exit 1; fi; echo data > raw.txt",
            "outs": ["raw.txt"],
        },
        "broken": {"cmd": "echo checking raw.txt && echo 'broken: error: bad input raw.txt' >&2 && exit 3", "deps": ["raw.txt"],
                   "outs": ["clean.txt"]},
        "after": {"cmd": "cat clean.txt > final.txt", "deps": ["clean.txt"], "outs": ["final.txt"]},
    }
    repo = tmp_path / "flaky"
    repo.mkdir()
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=repo, check=True)
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    orchestration = {"mlflow_experiment": "e2e-flaky", "mlflow_ui_url": "http://mlflow.test", "download_retry_delays_s": [0]}
    (repo / "params.yaml").write_text(yaml.safe_dump({"orchestration": orchestration}))
    monkeypatch.chdir(repo)
    return repo


def child_stages(client: mlflow.MlflowClient, parent_run_id: str) -> set[str]:
    experiment = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {run.data.tags["stage"] for run in runs}


def summary_artifact(flow_run_id, key: str) -> str:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    (summary,) = [artifact.data for artifact in artifacts if artifact.key == key]
    return summary


def test_a_failed_stage_fails_the_flow_with_its_output_after_download_retries(flaky_repo: Path) -> None:
    from pipelines.flows import full_pipeline

    state = full_pipeline(return_state=True)
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


def test_pipeline_runs_every_stage_then_skips_then_reruns_only_downstream(pipeline_repo: Path) -> None:
    from pipelines.dag import read_dag
    from pipelines.flows import full_pipeline, spam_pipeline

    stages = list(read_dag(pipeline_repo))  # dvc.yaml order

    # 1. Everything runs, in an order DVC accepts, and produces its outputs and metrics.
    state = full_pipeline(return_state=True)
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

    shown = json.loads(subprocess.run([sys.executable, "-m", "dvc", "metrics", "show", "--json"],
                                      capture_output=True, text=True, check=True).stdout)
    (workspace,) = shown.values()  # keyed "workspace" or "" depending on DVC's version
    metric_files = workspace["data"]
    assert metric_files and all("error" not in entry and entry["data"] for entry in metric_files.values()), metric_files
    assert report.metrics and all(isinstance(v, (int, float)) for v in report.metrics.values())

    client = mlflow.MlflowClient()
    parent = client.get_run(report.mlflow_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["windows.context_length"] == "32"
    assert parent.data.tags["prefect_flow_run_id"] == str(state.state_details.flow_run_id)
    children = child_stages(client, report.mlflow_run_id)
    assert children and children <= set(report.stages_by_status["ran"])
    assert MODEL_STAGES <= children  # every stage that trains, loads or scores a model logs a run

    assert report.mlflow_url in summary_artifact(state.state_details.flow_run_id, "pipeline-all")

    # 2. Nothing changed: DVC skips every stage, and no stage logs a child run.
    again = full_pipeline()
    assert sorted(again.stages_by_status["skipped"]) == sorted(stages)
    assert child_stages(client, again.mlflow_run_id) == set()

    # 3. One fine-tuning parameter changed: only that fine-tune and its scoring run again.
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["finetune_classifier"]["lr"] *= 2
    Path("params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    rerun = spam_pipeline()
    assert rerun.stages_by_status["ran"] == ["finetune_classifier", "score_spam"]
    assert child_stages(client, rerun.mlflow_run_id) == {"finetune_classifier", "score_spam"}
