"""``up``, ``down``, ``status``: start each service unless it runs already, wait until it answers,
stop them all; data stays in the stack directory between ``down`` and ``up``."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable

from stack import objectstore, postgres, procs, servers
from stack.settings import Secrets, StackConfig, StackError, load_secrets

# Seconds each service gets to answer after it starts (a loaded 2-core box: MLflow's first start
# migrates its database, Prefect's too).
TIMEOUTS = {"postgres": 90, "s3": 90, "mlflow": 180, "prefect": 180, "workers": 120}
SERVICES = ("s3", "mlflow", "prefect")  # pid-file servers; PostgreSQL is pg_ctl's


def start_postgres(config: StackConfig, creds: Secrets) -> str:
    postgres.prepare_dir(config)
    created = postgres.initdb(config, creds)
    if postgres.is_running(config):
        state = "running"
    else:
        postgres.start(config)
        state = "started"
    log = postgres.log_path(config)
    procs.wait_until(
        "postgres",
        lambda: postgres.connect(config, "postgres", creds.postgres_admin_password).close() is None,
        TIMEOUTS["postgres"],
        log,
    )
    postgres.ensure_databases(config, creds)
    procs.wait_until("postgres", lambda: postgres.answers(config, creds), TIMEOUTS["postgres"], log)
    return f"{state}{' (new cluster)' if created else ''}"


def start_server(
    config: StackConfig, name: str, command: Callable[[], tuple[list[str], dict[str, str]]], ready: Callable[[], bool]
) -> str:
    """Spawn ``name`` unless its pid file names a live process; then wait for ``ready``."""
    pid = procs.running_pid(config, name)
    state = "running"
    if pid is None:
        argv, env = command()
        pid = procs.spawn(config, name, argv, env, cwd=config.dir)
        state = "started"
    procs.wait_until(name, ready, TIMEOUTS[name], procs.log_file(config, name), pid)
    return state


def start_workers(config: StackConfig, creds: Secrets, since: float) -> str:
    """N ``prefect worker start`` processes; up when each has sent a heartbeat since ``since``."""
    started = 0
    pids = {}
    for name in servers.worker_names(config):
        pid = procs.running_pid(config, name)
        if pid is None:
            pid = procs.spawn(
                config,
                name,
                servers.worker_command(config, name),
                servers.worker_env(config, creds),
                cwd=config.workdir,
            )
            started += 1
        pids[name] = pid
    expected = set(pids)

    def all_online() -> bool:
        for name, pid in pids.items():
            if not procs.is_running(pid):
                raise StackError(f"prefect worker {name} exited (log: {procs.log_file(config, name)})")
        return expected <= servers.online_workers(config, since)

    procs.wait_until(
        f"prefect workers of pool {config.pool}",
        all_online,
        TIMEOUTS["workers"],
        config.logs / f"{config.pool}-worker-*.log",
    )
    return f"{len(expected)} online ({started} started)"


def up(config: StackConfig) -> str:
    """Start what is not running, wait until everything answers; a summary with the start time."""
    start = time.monotonic()
    since = time.time() - 5  # heartbeats from before this `up` (a previous stack's workers) do not count
    config.assign_free_ports()
    config.save()
    creds = load_secrets(config.dir, create=True)
    lines: list[str] = []

    def step(label: str, address: str, action: Callable[[], str]) -> None:
        began = time.monotonic()
        state = action()
        lines.append(f"{label:<9} {address}  {state} ({time.monotonic() - began:.1f} s)")

    step("postgres", f"127.0.0.1:{config.ports['postgres']}", lambda: start_postgres(config, creds))
    identity = objectstore.write_identity(config, creds)
    step(
        "s3",
        config.url("s3"),
        lambda: (
            start_server(
                config,
                "s3",
                lambda: (objectstore.argv(config, identity), servers.base_env()),
                lambda: objectstore.ensure_buckets(config, creds),
            )
            + f"; buckets {config.mlflow_bucket}, {config.dvc_bucket}"
        ),
    )
    step(
        "mlflow",
        config.mlflow_uri,
        lambda: start_server(
            config, "mlflow", lambda: servers.mlflow_command(config, creds), lambda: servers.mlflow_answers(config)
        ),
    )
    step(
        "prefect",
        config.url("prefect"),
        lambda: start_server(
            config,
            "prefect",
            lambda: servers.prefect_server_command(config, creds),
            lambda: servers.prefect_answers(config),
        ),
    )
    step(
        "pool",
        config.pool,
        lambda: (
            ("created" if servers.ensure_pool(config, creds) else "exists")
            + ": workers "
            + (start_workers(config, creds, since) if config.workers else "none (--workers 0)")
        ),
    )
    seconds = time.monotonic() - start
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%H:%M:%S UTC")
    return "\n".join(
        [*lines, f"stack up in {seconds:.1f} s ({stamp}), data in {config.dir}; `llm stack env` prints the exports"]
    )


def down(config: StackConfig) -> str:
    """Stop the workers and servers (SIGTERM, then SIGKILL after a grace period), then PostgreSQL."""
    start = time.monotonic()
    names = [*servers.worker_names(config), *reversed(SERVICES)]
    pids = {name: pid for name in names if (pid := procs.running_pid(config, name)) is not None}
    killed = procs.terminate(pids)
    for name in pids:
        procs.pid_file(config, name).unlink(missing_ok=True)
    stopped_pg = postgres.stop(config)
    parts = [f"stopped {', '.join(pids) or 'no server'}", "postgres" if stopped_pg else "postgres was not running"]
    if killed:
        parts.append(f"killed after the grace period: {', '.join(killed)}")
    return f"stack down in {time.monotonic() - start:.1f} s: {'; '.join(parts)}; data kept in {config.dir}"


def status(config: StackConfig) -> tuple[str, bool]:
    """One line per service: running or stopped, and whether it answers; True when all do."""
    creds = load_secrets(config.dir)
    checks = {
        "postgres": (postgres.is_running(config), lambda: postgres.answers(config, creds)),
        "s3": (procs.running_pid(config, "s3") is not None, lambda: objectstore.ensure_buckets(config, creds)),
        "mlflow": (procs.running_pid(config, "mlflow") is not None, lambda: servers.mlflow_answers(config)),
        "prefect": (procs.running_pid(config, "prefect") is not None, lambda: servers.prefect_answers(config)),
    }
    lines, healthy = [], True
    for name, (running, probe) in checks.items():
        answer = answers(probe) if running else False
        healthy &= answer
        lines.append(f"{name:<9} {'running' if running else 'stopped'}{', answers' if answer else ''}")
    alive = [n for n in servers.worker_names(config) if procs.running_pid(config, n) is not None]
    healthy &= len(alive) == config.workers
    lines.append(f"workers   {len(alive)} of {config.workers} running (pool {config.pool})")
    return "\n".join(lines), healthy


def answers(probe: Callable[[], bool]) -> bool:
    try:
        return bool(probe())
    except Exception:  # a service that does not answer is what status reports
        return False
