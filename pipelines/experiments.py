"""What makes a flow run a DVC experiment, and sharing its outputs: no Prefect here.

A flow run with params overrides does what ``dvc exp run -n NAME -S key=value`` does, in three
steps the flow can show one by one: change params.yaml (with DVC's own round-trip YAML writer,
so comments stay), run the stages (each its own task), then ``dvc exp save -n NAME``, which
commits the workspace (params, dvc.lock, the headline metrics) as experiment NAME: it is listed
by ``dvc exp show`` and compared by ``dvc metrics diff`` like any other.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from pipelines.dag import PipelineError
from pipelines.stages import stage_env

PARAMS_FILE = "params.yaml"
METRICS_DIR = "metrics"


def apply_overrides(overrides: Mapping[str, Any], name: str | None = None, params_file: str = PARAMS_FILE) -> str:
    """Set each dotted ``section.key`` of ``overrides`` in params.yaml; returns the experiment's
    name (``name``, or one DVC generates). A key params.yaml lacks is an error naming it, before
    anything runs; so is a name an experiment already has."""
    from dvc.repo import Repo
    from dvc.repo.experiments.utils import exp_refs_by_names, get_random_exp_name
    from dvc.utils.serialize import modify_yaml

    with Repo(".") as repo:
        baseline = repo.scm.get_rev()
        if name and exp_refs_by_names(repo.scm, {name}).get(name):
            raise PipelineError(f"DVC experiment {name!r} exists already: choose another name (dvc exp show lists them)")
        name = name or get_random_exp_name(repo.scm, baseline)
    with modify_yaml(params_file) as params:
        for dotted, value in overrides.items():
            *parents, key = dotted.split(".")
            node = params
            for part in parents:
                node = node.get(part) if isinstance(node, Mapping) else None
            if not isinstance(node, Mapping) or key not in node:
                raise PipelineError(f"{params_file}: no parameter {dotted!r} to override")
            node[key] = value
    return name


def save_experiment(name: str) -> str:
    """``dvc exp save -n name``: the workspace as DVC experiment ``name``; returns DVC's message."""
    done = subprocess.run([sys.executable, "-m", "dvc", "exp", "save", "-n", name, "-I", METRICS_DIR],
                          env=stage_env({}), capture_output=True, text=True)
    if done.returncode != 0:
        raise PipelineError(f"dvc exp save -n {name} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return done.stdout.strip()


def push_outputs(targets: list[str] | None) -> str:
    """``dvc push`` of the targets' outputs (and their upstream) to the default remote, so a teammate
    gets the models with ``dvc pull`` instead of retraining. Without a remote: a message, no error."""
    command = [sys.executable, "-m", "dvc", "push", "--run-cache"]
    if targets:
        command += ["--with-deps", *targets]
    done = subprocess.run(command, env=stage_env({}), capture_output=True, text=True)
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        if "no remote" in output.lower():
            return f"not pushed: no DVC remote configured ({output.splitlines()[-1]})"
        raise PipelineError(f"dvc push failed (exit {done.returncode}): {output[-2000:]}")
    return output.splitlines()[-1] if output else "pushed"
