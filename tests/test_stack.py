"""`llm stack`: real PostgreSQL, SeaweedFS S3, MLflow and Prefect servers and two workers, started
once for the module; then down and up again (the data stays). CI runs as root: PostgreSQL then
runs as `nobody`, which the tests check. Sharing across clones and faults: tests/test_stack_sharing.py."""

from __future__ import annotations

import os
import pwd
import re
import stat
import uuid
from pathlib import Path

import pytest
import requests

from stack import postgres as pg
from stack import procs, servers
from stack.settings import load_config, load_secrets
from tests.stack_helpers import Stack, llm_stack, running_stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack():
    yield from running_stack(workers=2)


@pytest.fixture(scope="module")
def logged_run(stack: Stack) -> dict:
    """One MLflow run with a metric and an artifact, logged through the tracking server."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=stack.env["MLFLOW_TRACKING_URI"])
    experiment_id = client.create_experiment(f"stack-test-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment_id, run_name="stack-test")
    client.log_metric(run.info.run_id, "test_accuracy", 0.875)
    artifact = Path(os.environ.get("TMPDIR", "/tmp")) / f"report-{run.info.run_id}.txt"
    artifact.write_text("the stack keeps this\n")
    try:
        client.log_artifact(run.info.run_id, str(artifact), "reports")
    finally:
        artifact.unlink()
    client.set_terminated(run.info.run_id)
    return {"run_id": run.info.run_id, "experiment_id": experiment_id}


def s3_client(stack: Stack, secret: str | None = None):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=stack.env["AWS_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id=stack.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=secret or stack.env["AWS_SECRET_ACCESS_KEY"],
    )


def test_up_starts_every_service_and_reports_how_long_it_took(stack: Stack) -> None:
    for service in ("postgres", "s3", "mlflow", "prefect"):
        assert re.search(rf"^{service}\s+\S+\s+started", stack.up_output, re.M), stack.up_output
    assert re.search(r"^pool\s+llm-process  created: workers 2 online \(2 started\)", stack.up_output, re.M), (
        stack.up_output
    )
    assert re.search(r"stack up in \d+\.\d s \(\d\d:\d\d:\d\d UTC\)", stack.up_output), stack.up_output


def test_env_prints_what_a_client_needs(stack: Stack) -> None:
    config = load_config(stack.dir)
    assert stack.env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{config.ports['mlflow']}"
    assert stack.env["PREFECT_API_URL"] == f"http://127.0.0.1:{config.ports['prefect']}/api"
    assert (
        stack.env["AWS_ENDPOINT_URL"] == stack.env["MLFLOW_S3_ENDPOINT_URL"] == f"http://127.0.0.1:{config.ports['s3']}"
    )
    assert stack.env["AWS_ACCESS_KEY_ID"] and stack.env["AWS_SECRET_ACCESS_KEY"]
    text = llm_stack(stack.dir, "env").stdout
    assert f"dvc remote modify --local stack endpointurl {stack.env['AWS_ENDPOINT_URL']}" in text


def test_postgres_holds_the_databases_under_the_stack_role(stack: Stack) -> None:
    import psycopg2

    config, creds = load_config(stack.dir), load_secrets(stack.dir)
    for database in ("mlflow", "prefect"):
        conn = pg.connect(config, "llm", creds.postgres_password, database)
        with conn, conn.cursor() as cur:
            cur.execute("SELECT current_user, current_database()")
            assert cur.fetchone() == ("llm", database)
        conn.close()
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        pg.connect(config, "llm", "not-the-password", "mlflow")
    postmaster = int((pg.data_dir(config) / "postmaster.pid").read_text().split()[0])
    uid = int(
        next(
            line for line in Path(f"/proc/{postmaster}/status").read_text().splitlines() if line.startswith("Uid:")
        ).split()[1]
    )
    # As root (CI), PostgreSQL runs as the unprivileged `nobody`; otherwise as the user who ran `up`.
    assert uid == (pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.geteuid())


def test_the_object_store_has_both_buckets_and_checks_the_keys(stack: Stack) -> None:
    from botocore.exceptions import ClientError

    names = {bucket["Name"] for bucket in s3_client(stack).list_buckets()["Buckets"]}
    assert {"mlflow-artifacts", "dvc-store"} <= names
    with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
        s3_client(stack, secret="wrong-secret").list_buckets()


def test_mlflow_keeps_runs_in_postgres_and_artifacts_in_the_object_store(stack: Stack, logged_run: dict) -> None:
    config, creds = load_config(stack.dir), load_secrets(stack.dir)
    conn = pg.connect(config, "llm", creds.postgres_password, "mlflow")
    with conn, conn.cursor() as cur:
        cur.execute("SELECT name FROM runs WHERE run_uuid = %s", (logged_run["run_id"],))
        assert cur.fetchone() == ("stack-test",)
    conn.close()
    keys = [item["Key"] for item in s3_client(stack).list_objects_v2(Bucket="mlflow-artifacts").get("Contents", [])]
    mine = [key for key in keys if logged_run["run_id"] in key]
    assert len(mine) == 1 and mine[0].endswith(f"reports/report-{logged_run['run_id']}.txt"), keys
    body = s3_client(stack).get_object(Bucket="mlflow-artifacts", Key=mine[0])["Body"].read()
    assert body == b"the stack keeps this\n"


def first_tag_writes_at_once(uri: str, write, writers: int = 8, experiments: int = 4) -> list[str]:
    """``writers`` threads write one tag on each of ``experiments`` new experiments at the same
    instant (what stages starting together do to the store); the errors they met."""
    import threading

    import mlflow

    client, errors = mlflow.MlflowClient(tracking_uri=uri), []
    for _ in range(experiments):
        experiment_id = client.create_experiment(f"tag-race-{uuid.uuid4().hex[:8]}")
        barrier = threading.Barrier(writers)

        def one() -> None:
            barrier.wait()
            try:
                write(experiment_id)
            except Exception as exc:  # noqa: BLE001 - collected and asserted on below
                errors.append(str(exc).splitlines()[0])

        threads = [threading.Thread(target=one) for _ in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return errors


def test_stages_starting_together_all_pass_the_store_check(stack: Stack, monkeypatch) -> None:
    """Two flow runs' stages starting at once both write the store-check tag on a new experiment:
    PostgreSQL's primary key lets one insert win and the other fail (seen in CI as a stage failing
    with UniqueViolation); the store check writes again and passes."""
    import mlflow

    from llmpipe.tracking import set_experiment_tag_once

    uri = stack.env["MLFLOW_TRACKING_URI"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    raw = first_tag_writes_at_once(uri, lambda e: mlflow.MlflowClient().set_experiment_tag(e, "checked", "true"))
    print(f"plain set_experiment_tag: {len(raw)} of 32 writes collided: {raw[:1]}")
    assert first_tag_writes_at_once(uri, lambda e: set_experiment_tag_once(e, "checked", "true")) == []


def test_prefect_answers_and_the_pool_has_two_workers_online(stack: Stack) -> None:
    config = load_config(stack.dir)
    assert requests.get(f"{stack.env['PREFECT_API_URL']}/health", timeout=10).json() is True
    pool = requests.get(f"{stack.env['PREFECT_API_URL']}/work_pools/{config.pool}", timeout=10).json()
    assert pool["type"] == "process"
    assert servers.online_workers(config) == {"llm-process-worker-1", "llm-process-worker-2"}
    # Each worker carries what a flow run needs: the servers, the S3 keys and the input mirror.
    pid = procs.running_pid(config, "llm-process-worker-1")
    environ = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "LLMPIPE_MIRROR"):
        assert environ[key] == {**stack.env, "LLMPIPE_MIRROR": config.mirror}[key]


def test_secrets_stay_out_of_the_config_the_logs_and_command_lines(stack: Stack) -> None:
    creds = load_secrets(stack.dir)
    secret_values = [creds.postgres_password, creds.postgres_admin_password, creds.s3_secret_key]
    assert stat.S_IMODE((stack.dir / "secrets.env").stat().st_mode) == 0o600
    config = load_config(stack.dir)
    texts = {"stack.json": (stack.dir / "stack.json").read_text(), "postgres.log": pg.log_path(config).read_text()}
    texts.update({p.name: p.read_text(errors="replace") for p in config.logs.glob("*.log")})
    for name in ("s3", "mlflow", "prefect", "llm-process-worker-1"):
        texts[f"{name} command line"] = Path(f"/proc/{procs.running_pid(config, name)}/cmdline").read_text()
    leaks = [name for name, text in texts.items() for secret in secret_values if secret in text]
    assert not leaks and len(texts) >= 8


def test_up_again_changes_nothing_and_status_says_all_answer(stack: Stack) -> None:
    config = load_config(stack.dir)
    before = {name: procs.running_pid(config, name) for name in ("s3", "mlflow", "prefect", "llm-process-worker-1")}
    again = llm_stack(stack.dir, "up").stdout
    for service in ("postgres", "s3", "mlflow", "prefect"):
        assert re.search(rf"^{service}\s+\S+\s+running", again, re.M), again
    assert "workers 2 online (0 started)" in again, again
    assert {name: procs.running_pid(config, name) for name in before} == before
    status = llm_stack(stack.dir, "status")
    assert status.stdout.count(", answers") == 4 and "2 of 2 running" in status.stdout


def test_down_then_up_keeps_the_runs_and_artifacts(stack: Stack, logged_run: dict) -> None:
    import mlflow

    down = llm_stack(stack.dir, "down").stdout
    assert "postgres" in down and "data kept" in down
    status = llm_stack(stack.dir, "status", check=False)
    assert status.returncode == 1 and "mlflow    stopped" in status.stdout
    up = llm_stack(stack.dir, "up").stdout
    assert re.search(r"^mlflow\s+\S+\s+started", up, re.M), up
    client = mlflow.MlflowClient(tracking_uri=stack.env["MLFLOW_TRACKING_URI"])
    run = client.get_run(logged_run["run_id"])
    assert run.data.metrics["test_accuracy"] == 0.875
    local = client.download_artifacts(
        logged_run["run_id"], "reports", str(Path(os.environ.get("TMPDIR", "/tmp")) / f"dl-{logged_run['run_id']}")
    )
    assert (Path(local) / f"report-{logged_run['run_id']}.txt").read_text() == "the stack keeps this\n"


def test_a_stack_that_was_never_started_is_reported_in_one_line(tmp_path: Path) -> None:
    done = llm_stack(tmp_path / "none", "env", check=False)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("llm stack env: error: no stack at") and len(done.stderr.splitlines()) == 1
