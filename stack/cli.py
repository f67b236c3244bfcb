"""``llm stack up | down | env | status | remote``: the team stack on this machine.

llm stack up --workers 2 --offline    # PostgreSQL, S3 (SeaweedFS), MLflow, Prefect + workers
eval "$(llm stack env)"               # MLFLOW_TRACKING_URI, PREFECT_API_URL, S3 endpoint and keys
llm stack remote                      # this checkout's DVC remote -> the stack's S3 bucket
llm stack status
llm stack down                        # data stays in the stack directory
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from stack.settings import (
    DEFAULT_PORTS,
    ENV_PREFIX,
    StackConfig,
    StackError,
    client_env,
    default_dir,
    env_int,
    load_config,
    load_secrets,
)

DVC_REMOTE = "stack"
OFFLINE_MIRROR = Path("..") / "shared" / "data"


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="The team stack: PostgreSQL, S3, MLflow and Prefect servers."
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help=f"the stack directory (env {ENV_PREFIX}DIR; default: {default_dir()})"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start every service that is not running and wait until each answers")
    for name, port in DEFAULT_PORTS.items():
        env = f"{name.upper()}_PORT"
        up.add_argument(
            f"--{name}-port",
            type=int,
            default=None,
            help=f"0 = a free port, chosen once (env {ENV_PREFIX}{env}; default {port}, or the stack's)",
        )
    up.add_argument("--workers", type=int, default=None, help=f"Prefect workers (env {ENV_PREFIX}WORKERS; default 2)")
    up.add_argument("--pool", default=None, help=f"the process work pool (env {ENV_PREFIX}POOL; default llm-process)")
    up.add_argument("--workdir", type=Path, default=None, help="where workers start (default: the current directory)")
    up.add_argument("--offline", action="store_true", help=f"workers read inputs from the mirror {OFFLINE_MIRROR}")
    commands.add_parser("down", help="stop every service (data stays)")
    commands.add_parser("status", help="which services run and answer (exit 1 if one does not)")
    commands.add_parser("env", help='the exports a client needs: eval "$(llm stack env)"')
    remote = commands.add_parser(
        "remote", help=f"point this checkout's DVC remote at the stack (.dvc/config.local, remote {DVC_REMOTE!r})"
    )
    remote.add_argument("--repo", type=Path, default=Path("."))
    return parser


def config_for_up(args: argparse.Namespace, directory: Path) -> StackConfig:
    """The saved configuration, with what this command's flags or environment change; a new one
    from flags, environment and defaults the first time."""
    try:
        config = load_config(directory)
    except StackError:
        if (directory / "stack.json").exists():
            raise
        config = StackConfig(dir=directory, ports=dict(DEFAULT_PORTS), workdir=Path.cwd().resolve())
        config.ports = {}  # not chosen yet: flag, environment, else the default
    for name, default in DEFAULT_PORTS.items():
        flag = getattr(args, f"{name}_port")
        value = flag if flag is not None else env_int(f"{name.upper()}_PORT", -1)
        if value > 0 or (value == 0 and name not in config.ports):
            config.ports[name] = value  # 0: a free port, chosen below and kept
        config.ports.setdefault(name, default)
    workers = args.workers if args.workers is not None else env_int("WORKERS", -1)
    if workers >= 0:
        config.workers = workers
    config.pool = args.pool or os.environ.get(f"{ENV_PREFIX}POOL") or config.pool
    if args.workdir:
        config.workdir = args.workdir.resolve()
    if args.offline:
        # LLMPIPE_MIRROR first (a workdir not beside ../shared, e.g. a clone elsewhere), as pipelines.run does.
        mirror = Path(os.environ.get("LLMPIPE_MIRROR") or config.workdir / OFFLINE_MIRROR).resolve()
        if not mirror.is_dir():
            raise StackError(f"--offline: no mirror at {mirror} (set LLMPIPE_MIRROR)")
        config.mirror = str(mirror)
        config.gpt2_dir = str(mirror / "gpt2") if (mirror / "gpt2").is_dir() else None
    return StackConfig.model_validate(config.model_dump())


def env_lines(config: StackConfig) -> list[str]:
    values = client_env(config, load_secrets(config.dir))
    lines = [f"export {key}={shlex.quote(value)}" for key, value in values.items()]
    lines += [
        "# DVC remote (credentials come from the AWS_* variables above, never from .dvc/config):"
        " `llm stack remote` runs",
        f"#   dvc remote add --local -f -d {DVC_REMOTE} {config.dvc_remote_url}",
        f"#   dvc remote modify --local {DVC_REMOTE} endpointurl {config.url('s3')}",
    ]
    return lines


def configure_remote(config: StackConfig, repo: Path) -> str:
    """This checkout's default DVC remote -> the stack's bucket, in .dvc/config.local (untracked)."""
    commands = [
        ["remote", "add", "--local", "-f", "-d", DVC_REMOTE, config.dvc_remote_url],
        ["remote", "modify", "--local", DVC_REMOTE, "endpointurl", config.url("s3")],
        ["remote", "modify", "--local", DVC_REMOTE, "region", "us-east-1"],
    ]
    for command in commands:
        done = subprocess.run([sys.executable, "-m", "dvc", *command], cwd=repo, capture_output=True, text=True)
        if done.returncode != 0:
            raise StackError(f"dvc {' '.join(command)} in {repo} failed: {(done.stderr or done.stdout).strip()}")
    return (
        f"DVC remote {DVC_REMOTE!r} ({config.dvc_remote_url} at {config.url('s3')}) is the default of {repo.resolve()}"
        ' (.dvc/config.local); export the stack\'s AWS_* variables (`eval "$(llm stack env)"`) for dvc push/pull'
    )


def run(args: argparse.Namespace) -> int:
    from stack import control

    directory = (args.dir or default_dir()).expanduser().resolve()
    if args.command == "up":
        print(control.up(config_for_up(args, directory)))
        return 0
    config = load_config(directory)
    if args.command == "down":
        print(control.down(config))
    elif args.command == "env":
        print("\n".join(env_lines(config)))
    elif args.command == "remote":
        print(configure_remote(config, args.repo))
    else:
        text, healthy = control.status(config)
        print(text)
        return 0 if healthy else 1
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "llm stack") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        return run(args)
    except StackError as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
