"""What makes a flow run a DVC experiment, and sharing its outputs: no Prefect here.

A flow run with params overrides does what ``dvc exp run -n NAME -S key=value`` does, in three
steps the flow can show one by one: change params.yaml (with DVC's own round-trip YAML writer,
so comments stay), run the stages (each its own task), then ``dvc exp save -n NAME``, which
commits the workspace (params, dvc.lock, the headline metrics) as experiment NAME: it is listed
by ``dvc exp show`` and compared by ``dvc metrics diff`` like any other.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipelines.dag import PipelineError
from pipelines.stages import stage_env

PARAMS_FILE = "params.yaml"
METRICS_DIR = "metrics"


def experiment_name(name: str | None = None, repo_dir: str | os.PathLike = ".") -> str:
    """``name``, or one DVC generates, checked against the experiments of ``repo_dir``: a name an
    experiment already has is an error naming it, before anything runs."""
    from dvc.repo import Repo
    from dvc.repo.experiments.utils import exp_refs_by_names, get_random_exp_name

    with Repo(os.fspath(repo_dir)) as repo:
        if name and exp_refs_by_names(repo.scm, {name}).get(name):
            raise PipelineError(
                f"DVC experiment {name!r} exists already: choose another name (dvc exp show lists them)"
            )
        return name or get_random_exp_name(repo.scm, repo.scm.get_rev())


def set_params(overrides: Mapping[str, Any], params_file: str | os.PathLike = PARAMS_FILE) -> None:
    """Set each dotted ``section.key`` of ``overrides`` in params.yaml (DVC's round-trip writer:
    comments stay). A key params.yaml lacks is an error naming it, and the file is left as it was;
    a trainer's section also takes any key of the section it is read over (``training``), as
    ``dvc exp run -S ++pretrain.precision=auto`` does."""
    from dvc.utils.serialize import modify_yaml

    from steps.check_params import load_schema

    read_over = {
        name: section["x-defaults"] for name, section in load_schema()["sections"].items() if "x-defaults" in section
    }
    with modify_yaml(os.fspath(params_file)) as params:
        for dotted, value in overrides.items():
            *parents, key = dotted.split(".")
            node = params
            for part in parents:
                node = node.get(part) if isinstance(node, Mapping) else None
            shared = params.get(read_over.get(".".join(parents), ""))
            if not isinstance(node, Mapping) or (
                key not in node and not (isinstance(shared, Mapping) and key in shared)
            ):
                raise PipelineError(f"{params_file}: no parameter {dotted!r} to override")
            node[key] = value


def apply_overrides(overrides: Mapping[str, Any], name: str | None = None, params_file: str = PARAMS_FILE) -> str:
    """``set_params`` in this checkout; returns the experiment's name (``name``, or generated)."""
    name = experiment_name(name)
    set_params(overrides, params_file)
    return name


def save_experiment(name: str, cwd: str | os.PathLike = ".", targets: list[str] | None = None) -> str:
    """``dvc exp save -n name [targets]``: the workspace as DVC experiment ``name``; returns DVC's
    message. ``targets``: the stages the run ran to (a sub-pipeline), so that the outputs of
    stages it did not need, absent from a fresh workspace, are not required (``dvc repro``
    committed what ran already)."""
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "save", "-n", name, "-I", METRICS_DIR, *(targets or [])],
        cwd=cwd,
        env=stage_env({}),
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise PipelineError(f"dvc exp save -n {name} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout.strip()


def push_outputs(targets: list[str] | None, cwd: str | os.PathLike = ".") -> str:
    """``dvc push`` of the targets' outputs (and their upstream) to the default remote, so a teammate
    gets the models with ``dvc pull`` instead of retraining. Without a remote: a message, no error."""
    command = [sys.executable, "-m", "dvc", "push", "--run-cache"]
    if targets:
        command += ["--with-deps", *targets]
    done = subprocess.run(command, cwd=cwd, env=stage_env({}), capture_output=True, text=True)
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        if "no remote" in output.lower():
            return f"not pushed: no DVC remote configured ({output.splitlines()[-1]})"
        raise PipelineError(f"dvc push failed (exit {done.returncode}): {output[-2000:]}")
    return output.splitlines()[-1] if output else "pushed"


def auto_push(name: str, cwd: str | os.PathLike = ".") -> str | None:
    """What ``dvc exp run`` does when ``DVC_EXP_AUTO_PUSH`` (or ``exp.auto_push`` in DVC's config)
    is set: ``dvc exp push <DVC_EXP_GIT_REMOTE or exp.git_remote, default origin> name``, the
    experiment's ref to the team's git remote (the outputs go with ``push_outputs``). None when off."""
    from dvc.repo import Repo
    from dvc.utils import env2bool

    with Repo(os.fspath(cwd)) as repo:
        config = repo.config.get("exp", {})
    if not env2bool("DVC_EXP_AUTO_PUSH", config.get("auto_push", False)):
        return None
    remote = os.getenv("DVC_EXP_GIT_REMOTE", config.get("git_remote", "origin"))
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "push", "--no-cache", remote, name],
        cwd=cwd,
        env=stage_env({}),
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        last = ((done.stderr or done.stdout).strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise PipelineError(f"dvc exp push {remote} {name} failed: {last}")
    return f"pushed experiment {name} to git remote {remote}"


def snapshot_files(root: str | os.PathLike = ".") -> dict[Path, bytes]:
    """The small git-tracked files an in-place run rewrites: params.yaml, dvc.lock, metrics/*.json."""
    root = Path(root)
    paths = [root / PARAMS_FILE, root / "dvc.lock", *sorted((root / METRICS_DIR).glob("*.json"))]
    return {path: path.read_bytes() for path in paths if path.is_file()}


def restore_files(saved: dict[Path, bytes], root: str | os.PathLike = ".") -> str:
    """Put back what ``snapshot_files`` saw (and remove what did not exist then), then
    ``dvc checkout`` the outputs that dvc.lock names from the cache: a failed in-place experiment
    leaves the checkout as it was, models included."""
    root = Path(root)
    for path in [root / "dvc.lock", *(root / METRICS_DIR).glob("*.json")]:
        if path not in saved:
            path.unlink(missing_ok=True)
    for path, content in saved.items():
        path.write_bytes(content)
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "checkout", "--allow-missing", "--quiet"],
        cwd=root,
        env=stage_env({}),
        capture_output=True,
        text=True,
    )
    return (
        "checkout restored"
        if done.returncode == 0
        else f"checkout restored, but dvc checkout said: {done.stderr.strip()[-500:]}"
    )
