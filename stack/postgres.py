"""PostgreSQL for the stack: Debian's server binaries, a cluster under ``<dir>/postgres``, TCP on
127.0.0.1 only (no Unix socket: a stack directory's path can exceed the socket path limit), SCRAM
passwords, a role and the databases of MLflow and Prefect.

PostgreSQL refuses to run as root: when ``llm stack up`` runs as root (CI does), initdb and the
server run as an unprivileged user (``LLM_STACK_POSTGRES_RUN_AS``, default ``nobody``) through
``runuser``, and ``<dir>/postgres`` belongs to that user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
from pathlib import Path

from stack.settings import HOST, Secrets, StackConfig, StackError

DATABASES = ("mlflow", "prefect")
RUN_AS_ENV = "LLM_STACK_POSTGRES_RUN_AS"
ADMIN = "postgres"


def pg_bin(name: str) -> str:
    """A PostgreSQL program: from Debian's versioned directory (newest first), else PATH."""
    for directory in sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda d: int(Path(d).parent.name) if Path(d).parent.name.isdigit() else 0,
        reverse=True,
    ):
        if os.access(Path(directory) / name, os.X_OK):
            return str(Path(directory) / name)
    found = shutil.which(name)
    if not found:
        raise StackError(
            f"postgres: {name} not found (apt-get install postgresql; looked in /usr/lib/postgresql/*/bin and PATH)"
        )
    return found


def root_dir(config: StackConfig) -> Path:
    return config.dir / "postgres"


def data_dir(config: StackConfig) -> Path:
    return root_dir(config) / "data"


def log_path(config: StackConfig) -> Path:
    return root_dir(config) / "postgres.log"


def run_as() -> str | None:
    """The user the server runs as when we are root, else None (ourselves)."""
    return (os.environ.get(RUN_AS_ENV) or "nobody") if os.geteuid() == 0 else None


def as_user(argv: list[str]) -> list[str]:
    user = run_as()
    return ["runuser", "-u", user, "--", *argv] if user else argv


def run(argv: list[str], what: str, config: StackConfig) -> subprocess.CompletedProcess:
    done = subprocess.run(as_user(argv), capture_output=True, text=True)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise StackError(
            f"postgres: {what} failed (exit {done.returncode}): {detail[-1] if detail else ''} "
            f"(log: {log_path(config)})"
        )
    return done


def prepare_dir(config: StackConfig) -> None:
    """``<dir>/postgres`` owned by the run user; the directories above it traversable by that user."""
    root = root_dir(config)
    root.mkdir(parents=True, exist_ok=True)
    user = run_as()
    if not user:
        return
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise StackError(
            f"postgres: user {user!r} ({RUN_AS_ENV}) does not exist: PostgreSQL cannot run as root"
        ) from None
    os.chown(root, entry.pw_uid, entry.pw_gid)
    os.chmod(config.dir, 0o711)  # the run user may pass through, not list
    for path in root.rglob("*"):
        os.lchown(path, entry.pw_uid, entry.pw_gid)
    probe = subprocess.run(["runuser", "-u", user, "--", "test", "-w", str(root)], capture_output=True)
    if probe.returncode != 0:
        raise StackError(
            f"postgres: runs as {user!r} (PostgreSQL refuses root), who cannot write {root}: put the "
            "stack under a directory every user can traverse (--dir, LLM_STACK_DIR; e.g. /var/lib/llm-pipeline/stack)"
        )


def initdb(config: StackConfig, creds: Secrets) -> bool:
    """Create the cluster once (into a temporary directory, renamed when complete); True if created."""
    data = data_dir(config)
    if (data / "PG_VERSION").is_file():
        return False
    tmp = root_dir(config) / "data.initdb"
    shutil.rmtree(tmp, ignore_errors=True)
    pwfile = root_dir(config) / ".pwfile"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(creds.postgres_admin_password + "\n")
    try:
        if user := run_as():
            entry = pwd.getpwnam(user)
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        run(
            [
                pg_bin("initdb"),
                "-D",
                str(tmp),
                "-U",
                ADMIN,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
            ],
            "initdb",
            config,
        )
    except StackError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        pwfile.unlink(missing_ok=True)
    tmp.rename(data)
    return True


def is_running(config: StackConfig) -> bool:
    if not (data_dir(config) / "PG_VERSION").is_file():
        return False
    done = subprocess.run(as_user([pg_bin("pg_ctl"), "status", "-D", str(data_dir(config))]), capture_output=True)
    return done.returncode == 0


def start(config: StackConfig) -> None:
    options = f"-p {config.ports['postgres']} -c listen_addresses={HOST} -c unix_socket_directories=''"
    run(
        [
            pg_bin("pg_ctl"),
            "start",
            "-D",
            str(data_dir(config)),
            "-l",
            str(log_path(config)),
            "-w",
            "-t",
            "90",
            "-o",
            options,
        ],
        "pg_ctl start",
        config,
    )


def stop(config: StackConfig) -> bool:
    """``pg_ctl stop -m fast``; False when it was not running."""
    if not is_running(config):
        return False
    run([pg_bin("pg_ctl"), "stop", "-D", str(data_dir(config)), "-m", "fast", "-w", "-t", "60"], "pg_ctl stop", config)
    return True


def connect(config: StackConfig, user: str, password: str, dbname: str = "postgres"):
    import psycopg2

    return psycopg2.connect(
        host=HOST, port=config.ports["postgres"], user=user, password=password, dbname=dbname, connect_timeout=5
    )


def ensure_databases(config: StackConfig, creds: Secrets) -> None:
    """The role (its password set to the current secret, so a changed secret takes effect) and the
    databases it owns."""
    from psycopg2 import sql

    conn = connect(config, ADMIN, creds.postgres_admin_password)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            role = sql.Identifier(config.postgres_user)
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (config.postgres_user,))
            verb = "ALTER" if cur.fetchone() else "CREATE"
            cur.execute(sql.SQL(verb + " ROLE {} LOGIN PASSWORD %s").format(role), (creds.postgres_password,))
            for name in DATABASES:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if not cur.fetchone():
                    cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), role))
    finally:
        conn.close()


def answers(config: StackConfig, creds: Secrets) -> bool:
    conn = connect(config, config.postgres_user, creds.postgres_password, "mlflow")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            return cur.fetchone() == (1,)
    finally:
        conn.close()


def url(config: StackConfig, creds: Secrets, database: str, driver: str = "postgresql") -> str:
    from urllib.parse import quote

    return (
        f"{driver}://{quote(config.postgres_user, safe='')}:{quote(creds.postgres_password, safe='')}"
        f"@{HOST}:{config.ports['postgres']}/{database}"
    )
