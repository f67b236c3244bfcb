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
import shutil
import subprocess
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run
from pydantic import BaseModel

from llmcore.checkpoint import WEIGHTS_FILE
from llmcore.train import TrainCallback, TrainState
from steps.common.cli import StageError
from steps.common.io import file_digest
from steps.common.secrets import redact

PARENT_RUN_ENV = "LLMPIPE_MLFLOW_PARENT_RUN_ID"
EXPERIMENT_ENV = "LLMPIPE_MLFLOW_EXPERIMENT"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MODEL_DIGEST_TAG = "model_md5"  # md5 of the weights a training run wrote
LOGGED_MODEL_TAG = "logged_model_id"


def configure_tracking() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(uri)
    return uri


class TrackingError(StageError):
    """The MLflow tracking store cannot be used; the message names it and what to do."""


@contextlib.contextmanager
def tracking_errors() -> Iterator[None]:
    """MLflow's and its store's failures (locked or corrupt sqlite, unreachable server) as one
    ``TrackingError`` line that names the store, instead of a database traceback."""
    import sqlite3

    import requests
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, sqlalchemy.exc.SQLAlchemyError, sqlite3.Error, requests.RequestException) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise TrackingError(
            f"MLflow tracking store {redact(mlflow.get_tracking_uri())} (MLFLOW_TRACKING_URI) failed: {redact(first)}; "
            "check that it is reachable and no other process holds it locked, or point MLFLOW_TRACKING_URI elsewhere"
        ) from exc


def probe_server(uri: str, timeout_s: float = 10.0) -> None:
    """A tracking server (http/https URI) answers a read of its store, asked once without MLflow's
    client retries (they back off for minutes): connection refused, or a server whose database is
    down, is a TrackingError naming the server (and PostgreSQL when that is what failed)."""
    import requests

    if not uri.startswith(("http://", "https://")):
        return
    name = f"MLflow tracking server {redact(uri)} (MLFLOW_TRACKING_URI)"
    try:
        answer = requests.get(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name",
                              params={"experiment_name": "llmpipe-store-probe"}, timeout=timeout_s)
    except requests.Timeout:
        raise TrackingError(f"{name} did not answer within {timeout_s:.0f} s (still starting, or waiting for its "
                            "database): check its log, or point MLFLOW_TRACKING_URI elsewhere") from None
    except requests.RequestException as exc:
        raise TrackingError(f"{name} is not reachable: {type(exc).__name__}; start it (`llm stack up`) or point "
                            "MLFLOW_TRACKING_URI elsewhere") from None
    if answer.status_code >= 500:
        try:
            body = str(answer.json().get("message") or answer.text)
        except ValueError:
            body = answer.text
        store = "its backend store (PostgreSQL) failed" if "psycopg2" in body or "postgresql" in body.lower() \
            else f"it answered HTTP {answer.status_code}"
        detail = (body.strip().splitlines() or [""])[0]
        raise TrackingError(f"{name}: {store}: {redact(detail[:300])}")


def check_store(experiment: str) -> None:
    """Fail before any work or output when the store cannot take a write (a locked or corrupt
    sqlite file, a server or its database that is down): a stage either completes and is
    tracked, or fails early."""
    probe_server(configure_tracking())
    with tracking_errors():
        found = mlflow.set_experiment(os.environ.get(EXPERIMENT_ENV) or experiment)
        mlflow.MlflowClient().set_experiment_tag(found.experiment_id, "llmpipe.store_checked", "true")


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
            flat[name] = redact(value) if isinstance(value, str) else value  # no credentials in MLflow
    return flat


def dvc_experiment() -> str:
    """The DVC experiment this process runs in (``dvc exp run`` sets ``DVC_EXP_NAME``), or ""."""
    return os.environ.get("DVC_EXP_NAME", "")


def run_name(stage: str) -> str:
    """Runs are named after their DVC experiment, so the compare view says which is which;
    outside one, after the stage and the commit."""
    return dvc_experiment() or f"{stage}@{git_commit()[:7]}"


def run_tags(stage: str) -> dict[str, str]:
    return {"stage": stage, "git_commit": git_commit(), "dvc_experiment": dvc_experiment()}


@contextlib.contextmanager
def stage_run(stage: str, experiment: str, params: Mapping[str, Any] | BaseModel | None = None) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for ``stage`` with its params logged and standard tags set."""
    check_store(experiment)
    parent = os.environ.get(PARENT_RUN_ENV) or None
    with tracking_errors(), mlflow.start_run(run_name=run_name(stage), parent_run_id=parent, tags=run_tags(stage)) as run:
        if params is not None:
            mlflow.log_params(flatten(params))
        yield run


def log_data_files(files: Mapping[str, str | os.PathLike], context: str = "training") -> None:
    """Record what the active run was trained on: each split file as an MLflow dataset input whose
    digest is the file's DVC hash (so the Datasets column says exactly which data)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    for split, path in files.items():
        md5 = file_digest(path, "md5")
        with warnings.catch_warnings():  # MLflow registers its local-file source twice and warns about it
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(str(Path(path).resolve()))
        dataset = MetaDataset(source, name=f"{Path(path).parent.name}/{Path(path).name}", digest=md5)
        mlflow.log_input(dataset, context=context, tags={"split": split, "dvc_md5": md5})


def tag_trained_model(model_dir: str | os.PathLike, model_info: Any = None) -> None:
    """Tag the active run with the digest of the weights it wrote (and the LoggedModel's id), so
    the stage that scores those weights later finds this run and logs its metrics beside the params."""
    tags = {MODEL_DIGEST_TAG: file_digest(Path(model_dir) / WEIGHTS_FILE, "md5")}
    if model_info is not None:
        tags[LOGGED_MODEL_TAG] = model_info.model_id
    mlflow.set_tags(tags)


def training_run_of(model_dir: str | os.PathLike) -> Run | None:
    """The newest run that trained exactly the weights in ``model_dir``, or None."""
    client = mlflow.MlflowClient()
    digest = file_digest(Path(model_dir) / WEIGHTS_FILE, "md5")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.{MODEL_DIGEST_TAG} = '{digest}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def log_evaluation(run: Run, metrics: Mapping[str, float], artifacts: Iterator[Path] | list[Path] = ()) -> None:
    """Evaluation results into the run that trained the model (and onto its LoggedModel), so the
    compare view shows test metrics beside the training params."""
    model_id = run.data.tags.get(LOGGED_MODEL_TAG)
    mlflow.log_metrics(dict(metrics), run_id=run.info.run_id, model_id=model_id)
    client = mlflow.MlflowClient()
    for path in artifacts:
        client.log_artifact(run.info.run_id, str(path), "evaluation")


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


def record_evaluation(
    stage: str,
    params: BaseModel,
    model_dir: str | os.PathLike,
    metrics: Mapping[str, float],
    artifacts: list[Path],
    *,
    registered_model: str,
    champion_metric: str,
    higher_is_better: bool = True,
    outputs: Sequence[Path] = (),
) -> None:
    """A scoring stage's results go into the MLflow run that trained these weights (beside its
    lr, epochs, ...), and the registry's ``@champion`` moves if this version beats it on
    ``champion_metric``. Weights that no run of this store trained (trained elsewhere, or the
    store was reset) get a scoring run of their own in the model's experiment."""
    try:
        with tracking_errors():
            _record_evaluation(stage, params, model_dir, metrics, artifacts, registered_model, champion_metric,
                               higher_is_better)
    except TrackingError:
        remove_outputs(outputs)  # untracked results must not look complete
        raise


def remove_outputs(paths: Sequence[Path]) -> None:
    for path in map(Path, paths):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _record_evaluation(stage, params, model_dir, metrics, artifacts, registered_model, champion_metric,
                       higher_is_better) -> None:
    from steps.common.registry import promote_if_better, version_of_run

    configure_tracking()
    run = training_run_of(model_dir)
    if run is None:
        print(f"{stage}: no MLflow run trained {model_dir}: logging the scores in a run of their own")
        with stage_run(stage, registered_model, params):
            mlflow.log_metrics(dict(metrics))
            for path in artifacts:
                mlflow.log_artifact(str(path), "evaluation")
        return
    log_evaluation(run, metrics, artifacts)
    version = version_of_run(registered_model, run)
    if version is not None and metrics.get(champion_metric) is not None:
        decision = promote_if_better(registered_model, version.version, champion_metric, metrics[champion_metric],
                                     higher_is_better=higher_is_better)
        print(f"{stage}: {decision.describe(registered_model, champion_metric)}")
