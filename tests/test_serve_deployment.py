"""Runs launched as the Prefect UI launches them, against a real Prefect server.

One ``prefect server start`` for the module (its own PREFECT_HOME, a free port), the tiny repo
copy, ``python -m pipelines.serve`` serving its deployment from a subprocess (a flow run is then
loaded by path in a new process, as for any user), and runs created through the API as the UI's
*Quick run* (no parameters: the deployment's) and *Custom run* (a params override and an
experiment name) create them. Each run works in a workspace of its own: two runs at once both
complete, their experiments reach the source repository, a failed run changes nothing there.
Then the work-pool route: ``python -m pipelines.deploy`` and a real ``prefect worker start``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.repo_copy import REPO, closed_port, copy_repo

MIRROR = REPO.parent / "shared" / "data"
DEPLOYMENT = "llm-pipeline/spam-scheduled"
RUN_TIMEOUT_S = 900

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not MIRROR.is_dir(), reason=f"offline mirror {MIRROR} not found"),
]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without what a previous test or the user's shell set for the pipeline."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("LLMPIPE_", "PREFECT_", "MLFLOW_", "DVC_")) and key != "LLMCORE_GPT2_ENCODING_DIR"
    }
    bin_dir = str(Path(sys.executable).parent)
    return {
        **env,
        "PATH": os.pathsep.join([bin_dir, env.get("PATH", "")]),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **extra,
    }


def wait_for(check, timeout_s: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (found := check()) is not None:
            return found
        time.sleep(1)
    tail = log.read_text()[-4000:] if log and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


@pytest.fixture(scope="module")
def api_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prefect server (sqlite in its own PREFECT_HOME, no UI) for the module."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = closed_port()
    log = home / "server.log"
    env = clean_env(PREFECT_HOME=str(home), PREFECT_UI_ENABLED="false")
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/api"

    def healthy():
        assert server.poll() is None, f"prefect server exited {server.returncode}:\n{log.read_text()[-4000:]}"
        try:
            return True if httpx.get(f"{url}/health", timeout=2).status_code == 200 else None
        except httpx.HTTPError:
            return None

    try:
        wait_for(healthy, 240, "the Prefect server", log)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture(scope="module")
def prefect_client(api_url: str):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        yield client


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkout runs are launched from: the tiny repo copy, MLflow at its default sqlite:///mlflow.db."""
    return copy_repo(tmp_path_factory.mktemp("source") / "repo")


def run_env(api_url: str, home: Path, mirror: bool = True) -> dict[str, str]:
    extra = {"LLMPIPE_MIRROR": str(MIRROR), "LLMCORE_GPT2_ENCODING_DIR": str(MIRROR / "gpt2")} if mirror else {}
    return clean_env(PREFECT_API_URL=api_url, PREFECT_HOME=str(home), **extra)


@dataclass(frozen=True)
class Served:
    log: Path
    process: subprocess.Popen


@pytest.fixture(scope="module")
def served(api_url: str, source: Path, prefect_client, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``python -m pipelines.serve`` as the README runs it (a schedule that does not fire during
    the test)."""
    home = tmp_path_factory.mktemp("serve-home")
    log = home / "serve.log"
    with log.open("w") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "pipelines.serve", "--flow", "spam", "--cron", "0 3 1 1 *"],
            cwd=source,
            env=run_env(api_url, home),
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def deployed():
        assert serve.poll() is None, f"pipelines.serve exited {serve.returncode}:\n{log.read_text()[-4000:]}"
        from prefect.exceptions import ObjectNotFound

        try:
            return prefect_client.read_deployment_by_name(DEPLOYMENT)
        except ObjectNotFound:
            return None

    try:
        wait_for(deployed, 120, f"deployment {DEPLOYMENT}", log)
        yield Served(log, serve)
    finally:
        serve.terminate()
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            serve.kill()


def create_run(client, deployment: str, parameters: dict | None = None):
    """What the UI's Run button does: POST /deployments/{id}/create_flow_run, with the form's
    parameters (Custom run) or none (Quick run: the deployment's defaults)."""
    found = client.read_deployment_by_name(deployment)
    return client.create_flow_run_from_deployment(found.id, parameters=parameters or {}).id


def wait_final(client, run_ids: list, log: Path) -> list:
    def final():
        runs = [client.read_flow_run(run_id) for run_id in run_ids]
        return runs if all(run.state and run.state.is_final() for run in runs) else None

    return wait_for(final, RUN_TIMEOUT_S, f"flow runs {run_ids}", log)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def experiment_refs(repo: Path) -> set[str]:
    return set(git(repo, "for-each-ref", "--format=%(refname)", "refs/exps").split())


STORE = {"mlflow.db", "mlruns"}  # the checkout's MLflow store (git-ignored): where every run must log


def snapshot(repo: Path) -> tuple:
    """What a run must never change in the checkout it was launched from: HEAD, git status (none
    of its outputs: models/, data/, metrics/ ...), params.yaml, the files at its top."""
    return (
        git(repo, "rev-parse", "HEAD"),
        git(repo, "status", "--porcelain"),
        (repo / "params.yaml").read_text(),
        sorted(p.name for p in repo.iterdir() if p.name not in STORE),
    )


def shown_experiments(repo: Path) -> dict[str, dict]:
    shown = json.loads(
        subprocess.run(
            [sys.executable, "-m", "dvc", "exp", "show", "--json"],
            cwd=repo,
            env=clean_env(),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    return {exp["name"]: exp["revs"][0]["data"] for commit in shown for exp in (commit.get("experiments") or [])}


def mlflow_runs(repo: Path, experiment: str) -> dict[str, str]:
    """Run name -> artifact URI of the runs of ``experiment`` in the checkout's own mlflow.db."""
    with sqlite3.connect(repo / "mlflow.db") as db:
        rows = db.execute(
            "SELECT r.name, r.artifact_uri FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id "
            "WHERE e.name = ?",
            (experiment,),
        ).fetchall()
    return dict(rows)


def runs_left(repo: Path) -> list[str]:
    runs = repo / ".dvc" / "tmp" / "runs"
    return sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []


def test_quick_run_completes_in_a_workspace_and_saves_an_experiment(
    served: Served, source: Path, prefect_client
) -> None:
    before, refs = snapshot(source), experiment_refs(source)
    (run,) = wait_final(prefect_client, [create_run(prefect_client, DEPLOYMENT)], served.log)
    assert run.state.is_completed(), f"{run.state.type}: {run.state.message}\n{served.log.read_text()[-4000:]}"
    (new_ref,) = experiment_refs(source) - refs  # the experiment's ref is in the source repository
    name = new_ref.rsplit("/", 1)[1]
    assert new_ref.startswith(f"refs/exps/{before[0][:2]}/{before[0][2:]}/")  # based on the deployment's commit
    saved = shown_experiments(source)[name]
    assert isinstance(saved["metrics"]["metrics/spam.json"]["data"]["test_accuracy"], float)
    assert snapshot(source) == before and runs_left(source) == []  # nothing changed here; workspace removed
    # The relative default store resolved against the source checkout: the stage's run is in
    # ./mlflow.db, in the model's experiment, named after the DVC experiment, artifacts beside the db.
    runs = mlflow_runs(source, "spam-classifier")
    assert name in runs and runs[name].startswith(str(source / "mlruns"))


def test_two_custom_runs_at_once_both_complete_without_touching_the_checkout(
    served: Served, source: Path, prefect_client
) -> None:
    before = snapshot(source)
    lrs = {"lr-5e-4": 5e-4, "lr-2e-3": 2e-3}
    ids = [
        create_run(prefect_client, DEPLOYMENT, {"params": {"finetune_classifier.lr": lr}, "experiment": name})
        for name, lr in lrs.items()
    ]
    runs = wait_final(prefect_client, ids, served.log)
    assert all(run.state.is_completed() for run in runs), "\n\n".join(
        f"{run.name}: {run.state.type.value}: {run.state.message}" for run in runs
    )
    first, second = runs
    assert first.start_time < second.end_time and second.start_time < first.end_time  # they ran at the same time
    shown = shown_experiments(source)
    for name, lr in lrs.items():
        assert shown[name]["params"]["params.yaml"]["data"]["finetune_classifier"]["lr"] == lr
        assert isinstance(shown[name]["metrics"]["metrics/spam.json"]["data"]["test_accuracy"], float)
    assert set(lrs) <= set(mlflow_runs(source, "spam-classifier"))
    assert snapshot(source) == before and runs_left(source) == []


def test_a_failed_run_changes_nothing_in_the_checkout(served: Served, source: Path, prefect_client) -> None:
    before, refs = snapshot(source), experiment_refs(source)
    bad_key = create_run(prefect_client, DEPLOYMENT, {"params": {"finetune_classifier.no_such_knob": 1}})
    bad_value = create_run(
        prefect_client, DEPLOYMENT, {"params": {"finetune_classifier.lr": -1.0}, "experiment": "bad-lr"}
    )
    key_run, value_run = wait_final(prefect_client, [bad_key, bad_value], served.log)
    assert key_run.state.is_failed() and "no parameter 'finetune_classifier.no_such_knob'" in key_run.state.message
    # check_params stops the bad value before DVC touches any output
    assert value_run.state.is_failed() and "stage 'check_params' failed" in value_run.state.message
    assert snapshot(source) == before and experiment_refs(source) == refs and runs_left(source) == []


def test_a_process_worker_runs_the_work_pool_deployment(
    api_url: str, source: Path, prefect_client, tmp_path_factory: pytest.TempPathFactory
) -> None:
    home = tmp_path_factory.mktemp("worker-home")
    deployed = subprocess.run(
        [sys.executable, "-m", "pipelines.deploy", "--pool", "test-pool", "--flow", "spam"],
        cwd=source,
        env=run_env(api_url, home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    (home / "deploy.log").write_text(deployed.stdout + deployed.stderr)
    assert deployed.returncode == 0, deployed.stderr[-4000:]
    assert "worker env: LLMCORE_GPT2_ENCODING_DIR, LLMPIPE_MIRROR, MLFLOW_TRACKING_URI" in deployed.stdout
    log = home / "worker.log"
    # The worker starts elsewhere, without the mirror variables: the deployment carries them.
    with log.open("w") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "test-pool"],
            cwd=home,
            env={**run_env(api_url, home, mirror=False), "PREFECT_WORKER_QUERY_SECONDS": "2"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        before = snapshot(source)
        run_id = create_run(
            prefect_client,
            "llm-pipeline/spam-test-pool",
            {"params": {"finetune_classifier.lr": 1e-4}, "experiment": "from-worker"},
        )
        (run,) = wait_final(prefect_client, [run_id], log)
        assert run.state.is_completed(), f"{run.state.type}: {run.state.message}\n{log.read_text()[-4000:]}"
        assert (
            shown_experiments(source)["from-worker"]["params"]["params.yaml"]["data"]["finetune_classifier"]["lr"]
            == 1e-4
        )
        assert "from-worker" in mlflow_runs(source, "spam-classifier")
        assert snapshot(source) == before and runs_left(source) == []
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()


def parents() -> dict[int, int]:
    """pid -> parent pid of every process (from /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            found[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return found


def lineage(pid: int, tree: dict[int, int]) -> list[int]:
    """``pid`` and its ancestors, nearest first."""
    chain = [pid]
    while tree.get(chain[-1], 0) > 1:
        chain.append(tree[chain[-1]])
    return chain


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_a_run_killed_mid_training_shows_crashed_and_a_rerun_completes(
    served: Served, source: Path, prefect_client
) -> None:
    remote = source.parent / f"{source.name}-dvc-remote"
    pushed = {p for p in remote.rglob("*") if p.is_file()}
    assert pushed  # the earlier runs pushed their outputs and run cache
    params = {"params": {"finetune_classifier.lr": 3e-4}, "experiment": "killed"}
    run_id = create_run(prefect_client, DEPLOYMENT, params)

    def training() -> list[int] | None:
        tree = parents()
        for pid in tree:
            chain = lineage(pid, tree)
            if served.process.pid in chain and "steps.finetune_classifier" in command_line(pid):
                return chain[: chain.index(served.process.pid)]  # the stage up to the flow run's process
        return None

    chain = wait_for(training, RUN_TIMEOUT_S, "finetune_classifier to start", served.log)
    flow_process = chain[-1]
    tree = parents()
    for pid in [pid for pid in tree if flow_process in lineage(pid, tree)]:  # the flow run and all below it
        os.kill(pid, signal.SIGKILL)
    (run,) = wait_final(prefect_client, [run_id], served.log)
    assert run.state.is_crashed() or run.state.is_failed(), run.state
    assert pushed <= {p for p in remote.rglob("*") if p.is_file()}  # nothing already pushed is lost
    assert "killed" not in shown_experiments(source)
    (left,) = runs_left(source)  # the killed run's workspace: it never got to clean up
    shutil.rmtree(source / ".dvc" / "tmp" / "runs" / left)

    (rerun,) = wait_final(
        prefect_client, [create_run(prefect_client, DEPLOYMENT, {**params, "experiment": "killed-rerun"})], served.log
    )
    assert rerun.state.is_completed(), rerun.state.message
    assert (
        shown_experiments(source)["killed-rerun"]["params"]["params.yaml"]["data"]["finetune_classifier"]["lr"] == 3e-4
    )
