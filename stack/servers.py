"""The MLflow tracking server, the Prefect server, its work pool and the workers: commands,
environments and health checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import requests

from stack import postgres
from stack.settings import HOST, Secrets, StackConfig, StackError, client_env

TIMEOUT_S = 5


def bin_path(name: str) -> str:
    """A console script of this environment (mlflow, prefect)."""
    return str(Path(sys.executable).parent / name)


def base_env() -> dict[str, str]:
    """Our environment with this interpreter's bin first on PATH, minus what would point a server
    at another store (a client's MLFLOW_TRACKING_URI, PREFECT_API_URL, ...)."""
    drop = {"MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL", "MLFLOW_BACKEND_STORE_URI"}
    env = {
        "MLFLOW_DISABLE_TELEMETRY": "true",  # see pipelines/stages.py: NO_TELEMETRY
        **{k: v for k, v in os.environ.items() if k not in drop and not k.startswith("LLM_STACK_")},
    }
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def s3_env(config: StackConfig, creds: Secrets) -> dict[str, str]:
    keep = (
        "AWS_ENDPOINT_URL",
        "MLFLOW_S3_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
    )
    return {k: v for k, v in client_env(config, creds).items() if k in keep}


def mlflow_command(config: StackConfig, creds: Secrets) -> tuple[list[str], dict[str, str]]:
    """``mlflow server`` on PostgreSQL, artifacts proxied to the object store (clients upload
    through the server and need no S3 credentials for MLflow). The database URL travels in the
    environment (MLFLOW_BACKEND_STORE_URI), not on the command line, so `ps` does not show it."""
    argv = [
        bin_path("mlflow"),
        "server",
        "--host",
        HOST,
        "--port",
        str(config.ports["mlflow"]),
        "--artifacts-destination",
        f"s3://{config.mlflow_bucket}",
        "--serve-artifacts",
        "--workers",
        "1",
    ]
    env = {
        **base_env(),
        **s3_env(config, creds),
        "MLFLOW_BACKEND_STORE_URI": postgres.url(config, creds, "mlflow"),
        # MLflow 3's job runner (GenAI scorers, prompt optimisation) is unused here and starts
        # half a dozen ~200 MB huey consumers.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    return argv, env


def prefect_home(config: StackConfig) -> Path:
    return config.dir / "prefect"


def prefect_server_command(config: StackConfig, creds: Secrets) -> tuple[list[str], dict[str, str]]:
    argv = [bin_path("prefect"), "server", "start", "--host", HOST, "--port", str(config.ports["prefect"])]
    env = {
        **base_env(),
        "PREFECT_HOME": str(prefect_home(config)),
        "PREFECT_API_DATABASE_CONNECTION_URL": postgres.url(config, creds, "prefect", "postgresql+asyncpg"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": config.prefect_api,
    }
    return argv, env


def worker_names(config: StackConfig) -> list[str]:
    return [f"{config.pool}-worker-{i}" for i in range(1, config.workers + 1)]


def worker_env(config: StackConfig, creds: Secrets) -> dict[str, str]:
    """What a flow run needs: the tracking server, the Prefect API, the object store's endpoint and
    keys (DVC pushes with them), and with --offline the input mirror."""
    env = {
        **base_env(),
        **client_env(config, creds),
        "PREFECT_HOME": str(prefect_home(config)),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    if config.mirror:
        env["LLMPIPE_MIRROR"] = config.mirror
    if config.gpt2_dir:
        env["LLMCORE_GPT2_ENCODING_DIR"] = config.gpt2_dir
    return env


def worker_command(config: StackConfig, name: str) -> list[str]:
    # --limit 1: one flow run at a time per worker, so N runs spread over N workers.
    return [
        bin_path("prefect"),
        "worker",
        "start",
        "--pool",
        config.pool,
        "--name",
        name,
        "--type",
        "process",
        "--limit",
        "1",
    ]


def mlflow_answers(config: StackConfig) -> bool:
    return requests.get(f"{config.mlflow_uri}/health", timeout=TIMEOUT_S).status_code == 200


def prefect_answers(config: StackConfig) -> bool:
    return requests.get(f"{config.prefect_api}/health", timeout=TIMEOUT_S).status_code == 200


def ensure_pool(config: StackConfig, creds: Secrets) -> bool:
    """The process work pool (``prefect work-pool create``, which knows the process worker's job
    template); True when it was created now."""
    found = requests.get(f"{config.prefect_api}/work_pools/{config.pool}", timeout=TIMEOUT_S)
    if found.status_code == 200:
        return False
    env = {**worker_env(config, creds)}
    done = subprocess.run(
        [bin_path("prefect"), "work-pool", "create", config.pool, "--type", "process"],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()
        raise StackError(f"prefect: work-pool create {config.pool} failed: {tail[-1] if tail else done.returncode}")
    return True


def online_workers(config: StackConfig, since: float = 0.0) -> set[str]:
    """Names of the pool's workers that Prefect lists as ONLINE with a heartbeat after ``since``
    (a Unix time: a stopped worker stays ONLINE on the server until its heartbeats are overdue)."""
    import datetime as dt

    answer = requests.post(f"{config.prefect_api}/work_pools/{config.pool}/workers/filter", json={}, timeout=TIMEOUT_S)
    answer.raise_for_status()
    online = set()
    for worker in answer.json():
        beat = worker.get("last_heartbeat_time")
        if worker.get("status") == "ONLINE" and beat and dt.datetime.fromisoformat(beat).timestamp() >= since:
            online.add(worker["name"])
    return online
