"""One MLflow store and one experiment per model, whatever route ran the stage.

``dvc exp run --queue`` runs each experiment in a copy of the repository under ``.dvc/tmp/exps``
that DVC deletes afterwards (the flow's workspaces live under ``.dvc/tmp/runs``): the default
relative ``sqlite:///mlflow.db`` and MLflow's default ``./mlruns`` artifacts must land in the
real checkout, not in the copy. A real DVC queue on a one-stage repository checks it.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from llmpipe.tracking import project_root, resolve_tracking_uri
from tests.repo_copy import GIT, REPO


def test_relative_sqlite_uri_resolves_against_the_checkout_a_temporary_copy_was_made_from(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    queued = repo / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    workspace = repo / ".dvc" / "tmp" / "runs" / "crimson-fox-x1"
    for path in (queued, workspace):
        path.mkdir(parents=True)
        assert project_root(path) == repo.resolve()
        assert resolve_tracking_uri("sqlite:///mlflow.db", path) == f"sqlite:///{repo.resolve()}/mlflow.db"
    assert project_root(repo) == repo.resolve()
    assert resolve_tracking_uri("sqlite:///sub/m.db", repo) == f"sqlite:///{repo.resolve()}/sub/m.db"
    # Absolute paths, servers and in-memory stores are left as they are.
    for uri in ("sqlite:////srv/mlflow.db", "http://127.0.0.1:5000", "postgresql://db/mlflow", "sqlite:///:memory:"):
        assert resolve_tracking_uri(uri, queued) == uri


STAGE = textwrap.dedent("""\
    import os, sys
    import yaml
    from llmpipe.tracking import stage_run
    x = yaml.safe_load(open("params.yaml"))["x"]
    with stage_run("log_x", "queue-test", {"x": x}):
        import mlflow
        mlflow.log_metric("x", x)
        mlflow.log_text(f"x={x}", "x.txt")
    open("out.txt", "w").write(str(x))
    """)


@pytest.fixture
def queue_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "log_x.py").write_text(STAGE)
    (repo / "params.yaml").write_text("x: 1\n")
    stage = {"cmd": f"{sys.executable} log_x.py", "deps": ["log_x.py"], "params": ["x"], "outs": ["out.txt"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"log_x": stage}}))
    subprocess.run([*GIT, "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True)
    (repo / ".gitignore").write_text("/mlflow.db\n/mlruns\n")
    subprocess.run([*GIT, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "one stage"], cwd=repo, check=True)
    return repo


def test_queued_experiments_log_into_the_checkouts_store(queue_repo: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "LLMPIPE_", "DVC_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["MLFLOW_TRACKING_URI"] = "sqlite:///mlflow.db"  # the default, spelled out: relative to the checkout
    # DVC's queue worker runs `dvc` found on PATH (as an activated venv has it), not this interpreter's module.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "run", "--queue", "-n", "q-two", "-S", "x=2"],
        cwd=queue_repo,
        env=env,
        check=True,
        capture_output=True,
    )
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "run", "--run-all"],
        cwd=queue_repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    with sqlite3.connect(queue_repo / "mlflow.db") as db:
        rows = db.execute(
            "SELECT e.name, e.artifact_location, r.name, r.artifact_uri FROM runs r "
            "JOIN experiments e ON r.experiment_id = e.experiment_id"
        ).fetchall()
    by_run = {run: (experiment, location, artifacts) for experiment, location, run, artifacts in rows}
    assert set(by_run) == {"q-two"}  # named after its DVC experiment, in the real store
    for experiment, location, artifacts in by_run.values():
        assert experiment == "queue-test"  # the stage's experiment, as from `dvc repro` or the flow
        assert location == str(queue_repo.resolve() / "mlruns" / "queue-test")  # beside the db, not in the copy
        assert artifacts.startswith(location)
    logged = sorted(queue_repo.resolve().glob("mlruns/queue-test/*/artifacts/x.txt"))
    assert [path.read_text() for path in logged] == ["x=2"]
    assert not (queue_repo / ".dvc" / "tmp" / "exps").exists() or not any(
        (queue_repo / ".dvc" / "tmp" / "exps").rglob("mlflow.db")
    )
