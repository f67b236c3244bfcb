"""A flow run's own workspace: a clean git checkout at one commit that shares the source's DVC cache.

Runs launched from a deployment (the Prefect UI, the API, a schedule, a worker) never touch the
checkout they were launched from. Each one clones the source repository (``git clone --shared``:
no object is copied) into ``.dvc/tmp/runs/<run>-XXXX`` (``LLMPIPE_RUNS_DIR`` moves it), checks out
the deployment's commit, and points its DVC cache at the source's (``cache.dir`` in the clone's
``.dvc/config.local``, beside the source's local config: remotes and their credentials), so
outputs computed by any run are reused by every other and nothing is stored twice. Two runs at
once have two params.yaml, two dvc.lock and two DVC repository locks: they cannot collide. After
the run the experiment's git ref (``refs/exps/...``, what ``dvc exp save`` wrote) is fetched into
the source repository, where ``dvc exp show`` lists it, and the workspace is removed, whether the
run succeeded or not. No Prefect here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipelines.dag import PipelineError
from pipelines.stages import stage_env

RUNS_DIR_ENV = "LLMPIPE_RUNS_DIR"
DEFAULT_RUNS_DIR = Path(".dvc") / "tmp" / "runs"  # beside DVC's own temporary experiment copies (.dvc/tmp/exps)


class WorkspaceError(PipelineError):
    """The run's workspace could not be made or its experiment published; the message says which step."""


@dataclass(frozen=True)
class Workspace:
    source: Path  # the repository the run was launched from
    path: Path  # the run's own checkout
    commit: str  # what it checked out


def git(args: list[str], cwd: str | os.PathLike, what: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, env=stage_env({}), capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise WorkspaceError(f"{what}: git {' '.join(args[:2])} failed: {last}")
    return done.stdout.strip()


def source_repository(start: str | os.PathLike = ".") -> Path:
    """The git repository the run was launched from (its top level)."""
    return Path(git(["rev-parse", "--show-toplevel"], start, f"{Path(start).resolve()} is not a git checkout"))


def resolve_revision(source: Path, revision: str | None) -> str:
    """``revision`` (a commit, branch or tag; HEAD when empty) as a full commit id of ``source``."""
    wanted = revision or "HEAD"
    return git(
        ["rev-parse", "--verify", "--quiet", f"{wanted}^{{commit}}"],
        source,
        f"git revision {wanted!r} not found in {source}",
    )


def runs_dir(source: Path) -> Path:
    return Path(os.environ.get(RUNS_DIR_ENV) or source / DEFAULT_RUNS_DIR)


def create_workspace(source: Path, commit: str, name: str) -> Workspace:
    """A fresh checkout of ``commit`` whose DVC uses the source's cache and local config."""
    parent = runs_dir(source)
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=parent))  # unique, even for two runs of one name
    try:
        git(["clone", "--quiet", "--shared", "--no-checkout", str(source), str(path)], parent, "workspace")
        git(["-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", commit], path, "workspace")
        share_dvc_config(source, path)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return Workspace(source.resolve(), path.resolve(), commit)


def share_dvc_config(source: Path, workspace: Path) -> None:
    """The source's untracked DVC config (remotes, credentials; paths made absolute by DVC on
    reading) into the workspace, with the source's cache as the workspace's cache."""
    from dvc.repo import Repo

    with Repo(str(source)) as repo:
        local = repo.config.read("local")
        cache_dir = repo.cache.local_cache_dir
    with Repo(str(workspace)) as repo, repo.config.edit("local") as config:
        config.update(local)
        config["cache"] = {**local.get("cache", {}), "dir": cache_dir}


def checkout_outputs(workspace: Workspace) -> str:
    """``dvc checkout`` of what the commit's dvc.lock names and the shared cache holds, so stages
    that are up to date are not run again; missing outputs are left for the stages to make."""
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "checkout", "--allow-missing", "--quiet"],
        cwd=workspace.path,
        env=stage_env({}),
        capture_output=True,
        text=True,
    )
    last_line = (done.stderr.strip().splitlines() or [""])[-1]
    return (
        "outputs checked out from the shared cache"
        if done.returncode == 0
        else f"some outputs are not in the cache, the stages will make them ({last_line})"
    )


def experiment_ref(workspace: Workspace, name: str) -> str:
    """DVC's ref for experiment ``name`` on baseline ``workspace.commit``."""
    return f"refs/exps/{workspace.commit[:2]}/{workspace.commit[2:]}/{name}"


def publish_experiment(workspace: Workspace, name: str) -> str:
    """Fetch the experiment ``dvc exp save`` made in the workspace into the source repository
    (its ref and commit), where ``dvc exp show``, ``dvc exp apply`` and ``dvc exp push`` find it."""
    ref = experiment_ref(workspace, name)
    git(
        ["rev-parse", "--verify", "--quiet", ref],
        workspace.path,
        f"experiment {name} was not saved in {workspace.path}",
    )
    git(
        ["fetch", "--quiet", "--no-write-fetch-head", "--no-tags", str(workspace.path), f"{ref}:{ref}"],
        workspace.source,
        f"experiment {name} could not be copied into {workspace.source} (an experiment of that name exists already?)",
    )
    return ref


def remove_workspace(workspace: Workspace) -> None:
    shutil.rmtree(workspace.path, ignore_errors=True)
