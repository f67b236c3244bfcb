"""Where the stack lives, its ports and its credentials.

Settings come from ``llm stack up``'s flags, whose defaults are environment variables
(``LLM_STACK_DIR``, ``LLM_STACK_POSTGRES_PORT``, ...). The first ``up`` writes them (never a secret)
to ``<dir>/stack.json``; later commands read them from there, so ``env``, ``status`` and ``down``
need only the directory. A port given as 0 is chosen free by the OS at the first ``up`` and kept.

Secrets come from the environment (``LLM_STACK_POSTGRES_PASSWORD``, ``LLM_STACK_POSTGRES_ADMIN_PASSWORD``,
``LLM_STACK_S3_ACCESS_KEY``, ``LLM_STACK_S3_SECRET_KEY``); one that is not set is generated once
into ``<dir>/secrets.env`` (mode 0600) and read from there afterwards. They are printed only by
``llm stack env`` (as the exports a client needs) and never written to stack.json or a log.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from pathlib import Path

from pydantic import BaseModel, Field

ENV_PREFIX = "LLM_STACK_"
CONFIG_FILE = "stack.json"
SECRETS_FILE = "secrets.env"
HOST = "127.0.0.1"
# Ports a user talks to: flag --<name>-port, env LLM_STACK_<NAME>_PORT.
DEFAULT_PORTS = {"postgres": 15432, "s3": 8333, "mlflow": 5000, "prefect": 4200}
# SeaweedFS's internal servers (master, volume, filer and their gRPC ports, the S3 gateway's gRPC):
# chosen free at the first `up` and kept, since the master's state directory is named after its port.
WEED_INTERNAL = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3_grpc")
SECRET_NAMES = ("POSTGRES_ADMIN_PASSWORD", "POSTGRES_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY")


class StackError(Exception):
    """A problem the user can fix (a service that did not come up, a port in use); one line."""


def default_dir() -> Path:
    """``$LLM_STACK_DIR``; as root /var/lib/llm-pipeline/stack (PostgreSQL runs as an unprivileged
    user, which cannot reach /root); else ``$XDG_DATA_HOME/llm-pipeline/stack``."""
    if os.environ.get(f"{ENV_PREFIX}DIR"):
        return Path(os.environ[f"{ENV_PREFIX}DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/llm-pipeline/stack")
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "llm-pipeline" / "stack"


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(f"{ENV_PREFIX}{name}")
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise StackError(f"{ENV_PREFIX}{name}={raw!r}: expected an integer") from None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class StackConfig(BaseModel):
    """What ``up`` decided, kept in ``<dir>/stack.json`` (no secrets)."""

    dir: Path
    ports: dict[str, int]
    weed_ports: dict[str, int] = Field(default_factory=dict)
    workers: int = Field(default=2, ge=0, le=32)
    pool: str = "llm-process"
    workdir: Path  # where the workers start (a checkout of the project)
    mirror: str | None = None  # --offline: LLMPIPE_MIRROR for the workers
    gpt2_dir: str | None = None  # --offline: LLMCORE_GPT2_ENCODING_DIR for the workers
    mlflow_bucket: str = "mlflow-artifacts"
    dvc_bucket: str = "dvc-store"
    postgres_user: str = "llm"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def run(self) -> Path:
        return self.dir / "run"

    def url(self, service: str) -> str:
        return f"http://{HOST}:{self.ports[service]}"

    @property
    def mlflow_uri(self) -> str:
        return self.url("mlflow")

    @property
    def prefect_api(self) -> str:
        return f"{self.url('prefect')}/api"

    @property
    def dvc_remote_url(self) -> str:
        return f"s3://{self.dvc_bucket}/llm-pipeline"

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / CONFIG_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n")
        tmp.replace(path)

    def assign_free_ports(self) -> None:
        """Ports given as 0 (and SeaweedFS's internal ones, the first time) get a free port."""
        for name, port in self.ports.items():
            if port == 0:
                self.ports[name] = free_port()
        for name in WEED_INTERNAL:
            self.weed_ports.setdefault(name, free_port())


def load_config(directory: Path) -> StackConfig:
    path = directory / CONFIG_FILE
    try:
        return StackConfig.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise StackError(
            f"no stack at {directory} ({path} is missing): start one with `llm stack up`"
            f" (or set {ENV_PREFIX}DIR / --dir)"
        ) from None
    except ValueError as exc:
        first = str(exc).splitlines()[0]
        raise StackError(f"{path}: not a stack configuration ({first})") from None


class Secrets(BaseModel):
    postgres_admin_password: str
    postgres_password: str
    s3_access_key: str
    s3_secret_key: str


def read_secrets_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if not path.exists():
        return values
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise StackError(f"{path}, line {number}: expected NAME=value")
        values[key.strip()] = value.strip()
    return values


def load_secrets(directory: Path, create: bool = False) -> Secrets:
    """Each secret from ``LLM_STACK_<NAME>``, else from ``<dir>/secrets.env``; with ``create``, the
    missing ones are generated and added to that file (0600, created without group/other access)."""
    path = directory / SECRETS_FILE
    stored = read_secrets_file(path)
    values, generated = {}, {}
    for name in SECRET_NAMES:
        env_name = f"{ENV_PREFIX}{name}"
        value = os.environ.get(env_name) or stored.get(env_name)
        if not value:
            if not create:
                raise StackError(f"{env_name} is not set and {path} does not hold it: run `llm stack up` first")
            value = generated[env_name] = (
                secrets.token_hex(10) if name == "S3_ACCESS_KEY" else secrets.token_urlsafe(24)
            )
        values[name.lower()] = value
    if generated:
        directory.mkdir(parents=True, exist_ok=True)
        lines = [f"{key}={value}" for key, value in {**stored, **generated}.items()]
        fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write("# llm stack secrets: generated once, read by `llm stack up`/`env`; never commit\n")
            handle.write("\n".join(lines) + "\n")
        path.with_suffix(".tmp").replace(path)
    return Secrets(**values)


def client_env(config: StackConfig, creds: Secrets) -> dict[str, str]:
    """What a client (a shell, a flow run, a worker) exports to use the stack."""
    s3 = config.url("s3")
    return {
        "MLFLOW_TRACKING_URI": config.mlflow_uri,
        "LLMPIPE_MLFLOW_UI_URL": config.mlflow_uri,
        "PREFECT_API_URL": config.prefect_api,
        "AWS_ENDPOINT_URL": s3,
        "MLFLOW_S3_ENDPOINT_URL": s3,
        "AWS_ACCESS_KEY_ID": creds.s3_access_key,
        "AWS_SECRET_ACCESS_KEY": creds.s3_secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def describe(config: StackConfig) -> str:
    return json.dumps({"dir": str(config.dir), **config.ports}, sort_keys=True)
