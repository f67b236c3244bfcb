"""Starting and stopping a real team stack (``llm stack``) for a test module, and the clients' env."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.repo_copy import REPO

# A client's variables that would point a test's commands at another store or server.
CLIENT_VARS = (
    "MLFLOW_TRACKING_URI",
    "PREFECT_API_URL",
    "AWS_ENDPOINT_URL",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_PROFILE",
    "LLMPIPE_MLFLOW_PARENT_RUN_ID",
    "LLMPIPE_MLFLOW_EXPERIMENT",
    "DVC_EXP_NAME",
)


@dataclass
class Stack:
    dir: Path
    up_output: str
    env: dict[str, str]  # what `llm stack env` exports

    def client_env(self, **extra: str) -> dict[str, str]:
        """os.environ with the stack's exports (and ``extra``), as a user's shell after eval."""
        base = {k: v for k, v in os.environ.items() if k not in CLIENT_VARS and not k.startswith("LLM_STACK_")}
        return {**base, "LLM_STACK_DIR": str(self.dir), **self.env, **extra}


def llm_stack(
    directory: Path, *args: str, check: bool = True, env: Mapping[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``llm stack --dir directory args...`` as a user runs it (a subprocess of this venv)."""
    base = {k: v for k, v in (env or os.environ).items() if k not in CLIENT_VARS}
    done = subprocess.run(
        [sys.executable, "-m", "cli.llm", "stack", "--dir", str(directory), *args],
        cwd=REPO,
        env=base,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"llm stack {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def parse_exports(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            values[key] = shlex.split(value)[0] if value else ""
    return values


def running_stack(workers: int) -> Iterator[Stack]:
    """A stack on free ports in a new directory directly under /tmp (when we are root, PostgreSQL
    runs as `nobody`, who must be able to traverse it), with ``workers`` Prefect workers started
    in this checkout with the offline mirror; stopped and removed afterwards, even if `up` failed."""
    directory = Path(tempfile.mkdtemp(prefix="llm-stack-", dir="/tmp"))
    try:
        up = llm_stack(
            directory,
            "up",
            "--postgres-port",
            "0",
            "--s3-port",
            "0",
            "--mlflow-port",
            "0",
            "--prefect-port",
            "0",
            "--workers",
            str(workers),
            "--workdir",
            str(REPO),
            "--offline",
        )
        env = parse_exports(llm_stack(directory, "env").stdout)
        yield Stack(directory, up.stdout, env)
    finally:
        if (directory / "stack.json").exists():
            llm_stack(directory, "down", check=False)
        shutil.rmtree(directory, ignore_errors=True)
