"""Sharing through the team stack, as two machines would: a tiny repo copy runs the spam data and
baseline stages, pushes outputs + run cache to the stack's S3 bucket and an experiment to the git
remote; a second clone with its own HOME and caches pulls them, `dvc repro` is a no-op, and
`dvc exp show` has the experiment's metrics. Then faults with the real servers: MLflow or
PostgreSQL down when a tracked stage starts, the object store down during `dvc push`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stack import postgres as pg
from stack import procs
from stack.settings import load_config
from tests.repo_copy import GIT, REPO, copy_repo
from tests.stack_helpers import Stack, llm_stack, running_stack

MIRROR = REPO.parent / "shared" / "data"
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not MIRROR.is_dir(), reason=f"offline mirror {MIRROR} not found")]
TARGET = "baseline_spam"  # download_spam -> build_spam_dataset -> baseline_spam: seconds, real outputs and metrics


@pytest.fixture(scope="module")
def stack():
    yield from running_stack(workers=0)


def machine_env(stack: Stack, home: Path) -> dict[str, str]:
    """A second "machine": its own HOME and caches (so DVC's default local remote, under
    ~/.cache, is empty there), the stack's exports, the offline mirror."""
    home.mkdir(parents=True, exist_ok=True)
    return stack.client_env(
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_CONFIG_HOME=str(home / ".config"),
        LLMPIPE_MIRROR=str(MIRROR),
        LLMCORE_GPT2_ENCODING_DIR=str(MIRROR / "gpt2"),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
    )


def sh(argv: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done


def dvc(*args: str, cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "dvc", *args], cwd, env, check)


@pytest.fixture(scope="module")
def shared(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Machine A: a repo copy whose git remote is a bare repository and whose DVC remote is the
    stack's bucket; it runs the target, commits dvc.lock, pushes outputs, run cache and git."""
    root = tmp_path_factory.mktemp("sharing")
    origin = root / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    env_a = machine_env(stack, root / "home-a")
    repo_a = copy_repo(root / "a", remote=root / "unused-local-remote")
    llm_stack(stack.dir, "remote", "--repo", str(repo_a), env=env_a)
    dvc("repro", TARGET, cwd=repo_a, env=env_a)
    sh([*GIT, "add", "dvc.lock", "metrics"], repo_a, env_a)
    sh([*GIT, "commit", "-q", "-m", "baseline run"], repo_a, env_a)
    sh([*GIT, "remote", "add", "origin", str(origin)], repo_a, env_a)
    sh([*GIT, "push", "-q", "origin", "HEAD:refs/heads/main"], repo_a, env_a)
    push = sh(
        [sys.executable, "-c", f"from pipelines.experiments import push_outputs; print(push_outputs([{TARGET!r}]))"],
        repo_a,
        env_a,
    )
    return {"root": root, "origin": origin, "a": repo_a, "env_a": env_a, "push": push.stdout}


def clone(shared: dict, stack: Stack, name: str) -> tuple[Path, dict[str, str]]:
    env = machine_env(stack, shared["root"] / f"home-{name}")
    repo = shared["root"] / name
    sh(["git", "clone", "-q", "-b", "main", str(shared["origin"]), str(repo)], shared["root"], env)
    llm_stack(stack.dir, "remote", "--repo", str(repo), env=env)
    return repo, env


def test_outputs_and_run_cache_go_to_the_stacks_bucket(stack: Stack, shared: dict) -> None:
    import boto3

    assert "pushed" in shared["push"], shared["push"]
    s3 = boto3.client(
        "s3",
        endpoint_url=stack.env["AWS_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id=stack.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=stack.env["AWS_SECRET_ACCESS_KEY"],
    )
    keys = [
        obj["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="dvc-store")
        for obj in page.get("Contents", [])
    ]
    assert any(key.startswith("llm-pipeline/files/md5/") for key in keys), keys[:5]
    assert any(key.startswith("llm-pipeline/runs/") for key in keys), keys[:5]  # DVC's run cache
    config_local = (shared["a"] / ".dvc" / "config.local").read_text()
    assert "endpointurl" in config_local and stack.env["AWS_SECRET_ACCESS_KEY"] not in config_local
    assert stack.env["AWS_SECRET_ACCESS_KEY"] not in (shared["a"] / ".dvc" / "config").read_text()


def test_a_fresh_clone_pulls_every_output_and_repro_is_a_no_op(stack: Stack, shared: dict) -> None:
    repo, env = clone(shared, stack, "b")
    # Machine A ran only TARGET and what it needs, so dvc.lock names those stages: pull them (a bare
    # `dvc pull` would also list the stages A never ran as missing, and exit 1).
    pulled = dvc("pull", "--with-deps", TARGET, cwd=repo, env=env)
    assert "fetched" in pulled.stdout, pulled.stdout
    lock = json.loads(json.dumps(__import__("yaml").safe_load((repo / "dvc.lock").read_text())))
    outs = [out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])]
    assert outs and all((repo / path).exists() for path in outs), (outs, pulled.stdout)
    status = dvc("status", TARGET, cwd=repo, env=env)
    assert "up to date" in status.stdout, status.stdout
    repro = dvc("repro", TARGET, cwd=repo, env=env)
    assert "Running stage" not in repro.stdout and "up to date" in repro.stdout, repro.stdout


def test_experiments_travel_through_the_git_remote(stack: Stack, shared: dict) -> None:
    repo_a, env_a = shared["a"], shared["env_a"]
    dvc("exp", "run", "-n", "c-quarter", "-S", "baseline_spam.grid.C=[0.25]", TARGET, cwd=repo_a, env=env_a)
    dvc("exp", "push", "origin", "c-quarter", cwd=repo_a, env=env_a)
    repo_c, env_c = clone(shared, stack, "c")
    dvc("exp", "pull", "origin", "c-quarter", cwd=repo_c, env=env_c)
    shown = json.loads(dvc("exp", "show", "--json", cwd=repo_c, env=env_c).stdout)
    experiments = {exp["name"]: exp for rev in shown for exp in rev.get("experiments") or [] if exp.get("name")}
    assert "c-quarter" in experiments, shown
    data = experiments["c-quarter"]["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["baseline_spam"]["grid"]["C"] == [0.25]
    assert "test_accuracy" in json.dumps(data["metrics"]), data["metrics"]


@pytest.fixture(scope="module")
def windows(shared: dict) -> Path:
    """Machine A's data stages up to the windows, so a tracked stage (pretrain) can start."""
    dvc("repro", "build_windows", cwd=shared["a"], env=shared["env_a"])
    return shared["a"]


def test_mlflow_server_down_when_a_stage_starts(stack: Stack, shared: dict, windows: Path) -> None:
    config = load_config(stack.dir)
    procs.terminate({"mlflow": procs.running_pid(config, "mlflow")})
    try:
        failed = dvc("repro", "pretrain", cwd=windows, env=shared["env_a"], check=False)
    finally:
        llm_stack(stack.dir, "up")
    assert failed.returncode != 0
    line = next(line for line in failed.stderr.splitlines() if line.startswith("pretrain: error:"))
    assert (
        f"MLflow tracking server {stack.env['MLFLOW_TRACKING_URI']} (MLFLOW_TRACKING_URI) is not reachable" in line
    ), line
    assert not (windows / "models" / "pretrained").exists()


def test_postgres_down_when_a_stage_starts(stack: Stack, shared: dict, windows: Path) -> None:
    """The database goes down under a running MLflow server (one that has served requests: a server
    started while its database is down waits for it, and the stage reports a server that did not answer)."""
    import mlflow

    config = load_config(stack.dir)
    mlflow.MlflowClient(tracking_uri=stack.env["MLFLOW_TRACKING_URI"]).search_experiments(max_results=1)
    assert pg.stop(config)
    try:
        failed = dvc("repro", "pretrain", cwd=windows, env=shared["env_a"], check=False)
    finally:
        llm_stack(stack.dir, "up")
    assert failed.returncode != 0
    line = next(line for line in failed.stderr.splitlines() if line.startswith("pretrain: error:"))
    assert (
        f"MLflow tracking server {stack.env['MLFLOW_TRACKING_URI']}" in line
        and "backend store (PostgreSQL) failed" in line
    ), line
    assert not (windows / "models" / "pretrained").exists()


def test_object_store_down_during_push_then_a_rerun_pushes(stack: Stack, shared: dict, windows: Path) -> None:
    config = load_config(stack.dir)
    push = [
        sys.executable,
        "-c",
        "from pipelines.experiments import push_outputs; print(push_outputs(['build_windows']))",
    ]
    procs.terminate({"s3": procs.running_pid(config, "s3")})
    try:
        failed = sh(push, windows, shared["env_a"], check=False)
    finally:
        llm_stack(stack.dir, "up")
    assert failed.returncode != 0
    assert stack.env["AWS_ENDPOINT_URL"] in failed.stderr, failed.stderr[-2000:]
    again = sh(push, windows, shared["env_a"])
    assert "pushed" in again.stdout, again.stdout
