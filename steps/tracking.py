"""MLflow tracking for steps: one run per stage, nested under the pipeline's parent run if any.

The pipeline flow (pipelines/) starts a parent run and passes its id to each stage process
through ``LLMPIPE_MLFLOW_PARENT_RUN_ID`` (and its experiment through
``LLMPIPE_MLFLOW_EXPERIMENT``, so the UI nests the children under it). Run alone (``dvc repro``
or ``python -m steps.x``), a stage logs to its own experiment, named after what it compares.
The tracking store defaults to an embedded sqlite file; ``MLFLOW_TRACKING_URI`` overrides it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
from collections.abc import Iterator, Mapping
from typing import Any

import mlflow
from pydantic import BaseModel

from llmcore.train import TrainCallback, TrainState

PARENT_RUN_ENV = "LLMPIPE_MLFLOW_PARENT_RUN_ID"
EXPERIMENT_ENV = "LLMPIPE_MLFLOW_EXPERIMENT"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def configure_tracking() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(uri)
    return uri


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flatten(params: Mapping[str, Any] | BaseModel, prefix: str = "") -> dict[str, Any]:
    """Nested params as MLflow's flat ``a.b.c`` keys."""
    if isinstance(params, BaseModel):
        params = params.model_dump(mode="json")
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def run_tags(stage: str) -> dict[str, str]:
    return {
        "stage": stage,
        "git_commit": git_commit(),
        "dvc_experiment": os.environ.get("DVC_EXP_NAME", ""),
    }


@contextlib.contextmanager
def stage_run(stage: str, experiment: str, params: Mapping[str, Any] | BaseModel | None = None) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for ``stage`` with its params logged and standard tags set."""
    configure_tracking()
    mlflow.set_experiment(os.environ.get(EXPERIMENT_ENV) or experiment)
    parent = os.environ.get(PARENT_RUN_ENV) or None
    with mlflow.start_run(run_name=stage, parent_run_id=parent, tags=run_tags(stage)) as run:
        if params is not None:
            mlflow.log_params(flatten(params))
        yield run


class MlflowCallback(TrainCallback):
    """Logs training progress: step loss, lr and throughput by optimizer step; evaluations (with the
    mean throughput since the previous one) by tokens seen."""

    THROUGHPUT = ("tokens_per_s", "mfu", "peak_memory_mb")

    def __init__(self, log_every: int = 1):
        self.log_every = log_every
        self.seconds = self.tokens = self.mfu_seconds = 0.0  # since the last evaluation

    def on_step_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        if metrics["step_time_s"] > 0:
            self.seconds += metrics["step_time_s"]
            self.tokens += metrics["tokens_per_s"] * metrics["step_time_s"]
            self.mfu_seconds += metrics["mfu"] * metrics["step_time_s"]
        if state.step % self.log_every == 0:
            throughput = {k: metrics[k] for k in self.THROUGHPUT if k in metrics}
            mlflow.log_metrics({"step_loss": metrics["loss"], "lr": metrics["lr"], **throughput}, step=state.step)

    def on_eval(self, state: TrainState, metrics: dict[str, float]) -> None:
        values = {k: v for k, v in metrics.items() if k not in ("step", "tokens_seen")}
        if self.seconds > 0:
            values.update(throughput_tokens_per_s=self.tokens / self.seconds, throughput_mfu=self.mfu_seconds / self.seconds)
        self.seconds = self.tokens = self.mfu_seconds = 0.0
        mlflow.log_metrics(values, step=state.tokens_seen)
