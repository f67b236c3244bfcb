"""MLflow tracking for steps: one run per stage, in the experiment of the model it trains.

One naming rule, whatever launched the stage (the flow from the CLI, the Prefect UI or a worker,
``dvc repro``, ``dvc exp run``, ``dvc queue``): a stage's run goes to its model's experiment
(``pretrain``, ``load-gpt2``, ``adapt-pretrain``, ``spam-classifier``, ``instruction-sft``) and is
named after its DVC experiment. The pipeline flow keeps one run per pipeline run in its own
experiment (``orchestration.mlflow_experiment``) and hands its id to each stage process through
``LLMPIPE_MLFLOW_PARENT_RUN_ID``: the stage's run carries it as tag ``pipeline_run_id``.

The tracking store defaults to an embedded sqlite file, ``sqlite:///mlflow.db``;
``MLFLOW_TRACKING_URI`` overrides it. A relative sqlite path is resolved against the project's
checkout, not the current directory: DVC runs queued experiments (and the flow runs its
workspaces) in copies under ``<repo>/.dvc/tmp/``, which are deleted afterwards, and their runs
must land in ``<repo>/mlflow.db``. New experiments of a sqlite store keep their artifacts beside
the database (``<db dir>/mlruns/<experiment>``), never in such a copy.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.entities import Run
from pydantic import BaseModel

from llmcore.checkpoint import WEIGHTS_FILE
from llmcore.train import TrainCallback, TrainState
from llmpipe.cli import DEBUG_ENV, StageError
from llmpipe.io import file_digest
from llmpipe.params import flatten
from llmpipe.secrets import redact

if TYPE_CHECKING:
    from llmpipe.registry import Scoring
    from llmpipe.stats import ComparisonParams

PARENT_RUN_ENV = "LLMPIPE_MLFLOW_PARENT_RUN_ID"
PIPELINE_RUN_TAG = "pipeline_run_id"  # a stage run's link to the flow's run (another experiment)
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
SQLITE_PREFIX = "sqlite:///"
TEMPORARY_COPIES = (".dvc", "tmp")  # DVC's queued experiments and the flow's workspaces live under here
MODEL_DIGEST_TAG = "model_md5"  # md5 of the weights a training run wrote
LOGGED_MODEL_TAG = "logged_model_id"


# Loggers that print a store's failure as tracebacks with SQL (a locked sqlite file: one per retry);
# tracking_errors reports it in one line instead. LLMPIPE_DEBUG=1 keeps them.
STORE_LOGGERS = ("mlflow.store", "sqlalchemy", "alembic")


def project_root(cwd: str | os.PathLike | None = None) -> Path:
    """The checkout a relative store path belongs to: ``cwd``, or the repository a temporary copy
    under ``<repo>/.dvc/tmp/`` (a queued DVC experiment, a flow run's workspace) was made from."""
    here = Path(cwd or os.getcwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 1):
        if parts[i : i + 2] == TEMPORARY_COPIES:
            return Path(*parts[:i])
    return here


def resolve_tracking_uri(uri: str, cwd: str | os.PathLike | None = None) -> str:
    """``sqlite:///relative.db`` made absolute against ``project_root``; other URIs unchanged."""
    if uri.startswith(SQLITE_PREFIX) and not uri.startswith(SQLITE_PREFIX + "/"):
        relative = uri[len(SQLITE_PREFIX) :]
        if relative and not relative.startswith(":memory:"):
            return SQLITE_PREFIX + str(project_root(cwd) / relative)
    return uri


def configure_tracking() -> str:
    uri = resolve_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)
    mlflow.set_tracking_uri(uri)
    if not os.environ.get(DEBUG_ENV):
        for name in STORE_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)
    return uri


def use_experiment(name: str):
    """``mlflow.set_experiment(name)``; a new experiment of a sqlite store gets its artifacts beside
    the database instead of MLflow's default ``./mlruns`` of the current (perhaps temporary) directory."""
    from mlflow.exceptions import MlflowException

    uri = mlflow.get_tracking_uri()
    client = mlflow.MlflowClient()
    if uri.startswith(SQLITE_PREFIX) and client.get_experiment_by_name(name) is None:
        artifacts = Path(uri[len(SQLITE_PREFIX) :]).parent / "mlruns" / name
        try:
            client.create_experiment(name, artifact_location=str(artifacts))
        except MlflowException as exc:  # created meanwhile by a concurrent stage: use it
            if client.get_experiment_by_name(name) is None:
                raise exc
    return mlflow.set_experiment(name)


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
        answer = requests.get(
            f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name",
            params={"experiment_name": "llmpipe-store-probe"},
            timeout=timeout_s,
        )
    except requests.Timeout:
        raise TrackingError(
            f"{name} did not answer within {timeout_s:.0f} s (still starting, or waiting for its "
            "database): check its log, or point MLFLOW_TRACKING_URI elsewhere"
        ) from None
    except requests.RequestException as exc:
        raise TrackingError(
            f"{name} is not reachable: {type(exc).__name__}; start it (`llm stack up`) or point "
            "MLFLOW_TRACKING_URI elsewhere"
        ) from None
    if answer.status_code >= 500:
        try:
            body = str(answer.json().get("message") or answer.text)
        except ValueError:
            body = answer.text
        store = (
            "its backend store (PostgreSQL) failed"
            if "psycopg2" in body or "postgresql" in body.lower()
            else f"it answered HTTP {answer.status_code}"
        )
        detail = (body.strip().splitlines() or [""])[0]
        raise TrackingError(f"{name}: {store}: {redact(detail[:300])}")


def check_store(experiment: str) -> None:
    """Fail before any work or output when the store cannot take a write (a locked or corrupt
    sqlite file, a server or its database that is down): a stage either completes and is
    tracked, or fails early."""
    probe_server(configure_tracking())
    with tracking_errors():
        found = use_experiment(experiment)
        set_experiment_tag_once(found.experiment_id, "llmpipe.store_checked", "true")


# What a store answers when two writers insert the same key at once (PostgreSQL, sqlite, MySQL).
DUPLICATE_KEY = ("duplicate key value", "UNIQUE constraint failed", "Duplicate entry")


def set_experiment_tag_once(experiment_id: str, key: str, value: str, attempts: int = 3) -> None:
    """``MlflowClient.set_experiment_tag``, safe when several stages start at once: the store's
    select-then-insert lets two concurrent first writers of one key collide on its primary key
    (``UniqueViolation`` on PostgreSQL); the loser writes again, now as an update."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            mlflow.MlflowClient().set_experiment_tag(experiment_id, key, value)
            return
        except MlflowException as exc:
            if attempt == attempts - 1 or not any(text in str(exc) for text in DUPLICATE_KEY):
                raise
            time.sleep(0.1 * (attempt + 1))


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dvc_experiment() -> str:
    """The DVC experiment this process runs in (``dvc exp run`` sets ``DVC_EXP_NAME``), or ""."""
    return os.environ.get("DVC_EXP_NAME", "")


def run_name(stage: str) -> str:
    """Runs are named after their DVC experiment, so the compare view says which is which;
    outside one, after the stage and the commit."""
    return dvc_experiment() or f"{stage}@{git_commit()[:7]}"


SWEEP_ENV = "LLMPIPE_SWEEP"  # set by `llm sweep` (pipelines/sweep.py): the seeds of one configuration


def run_tags(stage: str) -> dict[str, str]:
    sweep = {"sweep": os.environ[SWEEP_ENV]} if os.environ.get(SWEEP_ENV) else {}
    pipeline_run = os.environ.get(PARENT_RUN_ENV)
    return {
        "stage": stage,
        "git_commit": git_commit(),
        "dvc_experiment": dvc_experiment(),
        **sweep,
        **({PIPELINE_RUN_TAG: pipeline_run} if pipeline_run else {}),
    }


@contextlib.contextmanager
def stage_run(
    stage: str, experiment: str, params: Mapping[str, Any] | BaseModel | None = None
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for ``stage`` with its params logged and standard tags set."""
    check_store(experiment)
    with tracking_errors(), mlflow.start_run(run_name=run_name(stage), tags=run_tags(stage)) as run:
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
    runs = client.search_runs(
        experiments,
        filter_string=f"tags.{MODEL_DIGEST_TAG} = '{digest}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
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
        values["scaler_skipped_steps"] = state.skipped_steps  # fp16: steps whose gradients overflowed
        if self.seconds > 0:
            values.update(
                throughput_tokens_per_s=self.tokens / self.seconds, throughput_mfu=self.mfu_seconds / self.seconds
            )
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
    selection: Scoring | None = None,
    comparison: ComparisonParams,
    outputs: Sequence[Path] = (),
) -> None:
    """A scoring stage's results go into the MLflow run that trained these weights (beside its
    lr, epochs, ...), and the registry's ``@champion`` moves if this version beats it on the
    ``selection`` scoring (validation, paired, beyond noise: llmpipe/registry.py). Weights that
    no run of this store trained (trained elsewhere, or the store was reset) get a scoring run of
    their own in the model's experiment."""
    try:
        with tracking_errors():
            _record_evaluation(stage, params, model_dir, metrics, artifacts, registered_model, selection, comparison)
    except TrackingError:
        remove_outputs(outputs)  # untracked results must not look complete
        raise


def remove_outputs(paths: Sequence[Path]) -> None:
    for path in map(Path, paths):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _record_evaluation(stage, params, model_dir, metrics, artifacts, registered_model, selection, comparison) -> None:
    from llmpipe.registry import promote_if_better, version_of_run

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
    if version is not None and selection is not None:
        decision = promote_if_better(registered_model, version.version, run.info.run_id, selection, comparison)
        print(f"{stage}: {decision.describe(registered_model, selection.metric)}")
