"""The Prefect flow over the DVC stages: each stage is a task running ``dvc repro --single-item``.

DVC decides what is up to date (unchanged stages are skipped, restored from its run cache, or
run); Prefect shows every stage's state, logs and duration, retries downloads and draws the
stages as dvc.yaml's graph (each task waits for its upstream stages). MLflow gets one parent run
per pipeline run that runs anything, under which every stage that runs logs a child run (the id
reaches the stage process through ``LLMPIPE_MLFLOW_PARENT_RUN_ID``, see llmpipe/tracking.py).

The flow's parameters make it the control panel: which pipeline, and params overrides
(``{"finetune_classifier.lr": 5e-4}``) that make the run a named DVC experiment, as
``dvc exp run -n NAME -S finetune_classifier.lr=5e-4`` would (see ``pipelines/experiments.py``).

A run from a deployment (Prefect UI, API, schedule, worker) works in a workspace of its own: a
clean checkout of the deployment's commit sharing the source's DVC cache (``pipelines/workspace.py``),
saved as a DVC experiment whose ref is fetched into the source repository; the checkout it was
launched from is never changed. ``python -m pipelines.run`` works in place unless ``--isolated``.

No ``from __future__ import annotations`` here: Prefect validates a flow's parameters against
its signature in whatever process runs it (a served or worker run loads this file by path), so
the annotations must be real types, not strings naming module globals.
"""

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import mlflow
from mlflow.entities import Metric, Param
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.runtime import deployment, flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote
from pydantic import Field

from llmpipe.params import StrictModel, load_section, read_params
from llmpipe.tracking import (
    PARENT_RUN_ENV,
    configure_tracking,
    flatten,
    git_commit,
    tracking_errors,
    use_experiment,
)
from pipelines import experiments, workspace
from pipelines.dag import PIPELINES, PipelineError, execution_order, read_dag
from pipelines.stages import StageResult, dvc_status, repro_stage
from pipelines.summary import (
    PipelineReport,
    baseline_comparison,
    baseline_line,
    baseline_metrics,
    read_metrics,
    render_markdown,
)
from pipelines.workspace import Workspace

PipelineName = Literal["all", "pretrain", "spam", "instructions"]
Where = Literal["auto", "workspace", "in-place"]
DOWNLOAD_PREFIX = "download_"  # stages that touch the network get task-level retries
UI_URL_ENV = "LLMPIPE_MLFLOW_UI_URL"
DVC_EXP_ENV = "DVC_EXP_NAME"  # what `dvc exp run` tells its stages; llmpipe/tracking.py names runs after it


class OrchestrationParams(StrictModel):
    mlflow_experiment: str
    mlflow_ui_url: str
    download_retry_delays_s: list[Annotated[float, Field(ge=0)]] = Field(max_length=10)
    push: bool  # `dvc push` to the default remote after a run that changed outputs


@dataclass(frozen=True)
class ParentRun:
    run_id: str
    experiment: str
    tracking_uri: str
    url: str

    @property
    def stage_env(self) -> dict[str, str]:
        """What a stage process needs to log its child run under this one."""
        return {PARENT_RUN_ENV: self.run_id, "MLFLOW_TRACKING_URI": self.tracking_uri}


@dataclass(frozen=True)
class Checkout:
    """Where a run's stages run: ``root`` (the launching checkout, or a workspace of the run's own)."""

    root: Path
    commit: str
    workspace: Workspace | None = None


@task(cache_policy=NO_CACHE)
def open_workspace(revision: str) -> Workspace:
    """A clean checkout of ``revision`` for this run alone, sharing the source's DVC cache."""
    source = workspace.source_repository()
    commit = workspace.resolve_revision(source, revision)
    opened = workspace.create_workspace(source, commit, str(flow_run.name or "run"))
    logger = get_run_logger()
    logger.info("workspace %s at commit %s (source %s)", opened.path, commit[:10], source)
    logger.info("%s", workspace.checkout_outputs(opened))
    return opened


@task(cache_policy=NO_CACHE)
def publish_experiment(opened: Workspace, name: str) -> None:
    """The experiment's ref into the source repository, where ``dvc exp show`` lists it."""
    ref = workspace.publish_experiment(opened, name)
    get_run_logger().info("DVC experiment %s is in %s as %s", name, opened.source, ref)


@task(cache_policy=NO_CACHE)
def plan_stages(targets: list[str] | None, root: Path) -> list[str]:
    """The stages to run, upstream first, from dvc.yaml's graph."""
    order = execution_order(read_dag(root), targets)
    get_run_logger().info("stages in order: %s", ", ".join(order))
    return order


@task(cache_policy=NO_CACHE)
def check_up_to_date(targets: list[str] | None, root: Path) -> bool:
    """One ``dvc status`` for the whole selection: when DVC reports nothing changed, every
    ``dvc repro`` would skip, so the run is a no-op without starting one dvc process per stage."""
    changed = dvc_status(targets, root)
    logger = get_run_logger()
    if changed:
        logger.info("dvc status: changed: %s", ", ".join(changed))
    else:
        logger.info("dvc status: every stage is up to date; nothing to run")
    return not changed


def open_parent_run(pipeline: str, settings: OrchestrationParams, experiment: str, where: Checkout):
    mlflow_experiment = use_experiment(settings.mlflow_experiment)
    client = mlflow.MlflowClient()
    tags = {
        "pipeline": pipeline,
        "git_commit": where.commit,
        "dvc_experiment": experiment,
        "prefect_flow_run_id": str(flow_run.id or ""),
        "prefect_flow_run_name": str(flow_run.name or ""),
    }
    name = experiment or f"{pipeline} {flow_run.name or ''}".strip()
    run = client.create_run(mlflow_experiment.experiment_id, run_name=name, tags=tags)
    params = [Param(key, str(value)) for key, value in flatten(read_params(where.root / "params.yaml")).items()]
    client.log_batch(run.info.run_id, params=params)
    return mlflow_experiment, run


@task(cache_policy=NO_CACHE)
def start_parent_run(pipeline: str, settings: OrchestrationParams, experiment: str, where: Checkout) -> ParentRun:
    """The pipeline run's MLflow run: params.yaml flattened, tagged with commit, flow run and DVC experiment."""
    tracking_uri = configure_tracking()  # a relative sqlite URI is made absolute here, in the launching checkout
    with tracking_errors():  # an unreachable or locked store: one line naming it, before any stage runs
        mlflow_experiment, run = open_parent_run(pipeline, settings, experiment, where)
    ui = os.environ.get(UI_URL_ENV) or settings.mlflow_ui_url
    url = f"{ui.rstrip('/')}/#/experiments/{mlflow_experiment.experiment_id}/runs/{run.info.run_id}"
    get_run_logger().info("MLflow parent run %s: %s", run.info.run_id, url)
    return ParentRun(run.info.run_id, settings.mlflow_experiment, tracking_uri, url)


@task(cache_policy=NO_CACHE)
def run_stage(stage: str, extra_env: dict[str, str], root: Path) -> StageResult:
    """``dvc repro --single-item stage`` with its output in this task's log."""
    logger = get_run_logger()
    result = repro_stage(stage, extra_env, logger.info, cwd=root)
    logger.info("stage %s: %s in %.1f s", stage, result.status, result.seconds)
    return result


@task(cache_policy=NO_CACHE)
def publish_summary(report: PipelineReport, root: Path) -> PipelineReport:
    """The run's Markdown summary as a Prefect artifact; metrics and summary on the parent run."""
    report.metrics = read_metrics(root / "metrics")
    report.baseline = baseline_comparison(root)  # paired, from both stages' per-example predictions
    markdown = render_markdown(report)
    if report.mlflow_run_id:
        client = mlflow.MlflowClient()
        now = int(time.time() * 1000)
        difference = baseline_metrics(report.metrics, report.baseline)  # LLM − baseline: points, CI, McNemar p
        metrics = {**report.metrics, **difference}
        client.log_batch(report.mlflow_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
        if difference:
            client.set_tag(report.mlflow_run_id, "llm_vs_baseline", baseline_line(report.metrics, report.baseline))
        client.log_text(report.mlflow_run_id, markdown, "pipeline_summary.md")
        client.set_tag(report.mlflow_run_id, "mlflow.note.content", markdown)  # the run page's Description
        client.set_terminated(report.mlflow_run_id, "FAILED" if report.failure else "FINISHED")
    create_markdown_artifact(
        markdown, key=f"pipeline-{report.flow}", description=f"DVC stages and metrics of pipeline {report.flow}"
    )
    return report


@task(cache_policy=NO_CACHE)
def save_experiment(name: str, root: Path, targets: list[str] | None) -> None:
    """``dvc exp save -n name``: this run's params, dvc.lock and metrics as a DVC experiment."""
    get_run_logger().info("%s", experiments.save_experiment(name, root, targets) or f"saved DVC experiment {name}")


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[10, 30])
def push_experiment(name: str, repo: Path) -> None:
    """``dvc exp push`` of the experiment to the git remote, when DVC's auto push is on (retried)."""
    message = experiments.auto_push(name, repo)
    get_run_logger().info("%s", message or "experiment not pushed to a git remote (DVC_EXP_AUTO_PUSH is off)")


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[10, 30])
def push_outputs(targets: list[str] | None, root: Path) -> None:
    """``dvc push`` of what the run produced to the default remote (retried: remotes are I/O)."""
    get_run_logger().info("dvc push: %s", experiments.push_outputs(targets, root))


def stage_task(stage: str, settings: OrchestrationParams):
    delays = settings.download_retry_delays_s if stage.startswith(DOWNLOAD_PREFIX) else []
    return run_stage.with_options(name=stage, task_run_name=stage, retries=len(delays), retry_delay_seconds=delays or 0)


def run_stages(
    order: list[str], settings: OrchestrationParams, env: dict[str, str], root: Path
) -> tuple[list[StageResult], Exception | None]:
    """One task per stage, each waiting for its upstream stages (the flow-run graph is dvc.yaml's
    DAG). The flow's task runner has one worker, since DVC locks the repository: stages run one at
    a time, in ``order``. A failure stops the run; the stages after it are not started."""
    dag = read_dag(root)
    futures: dict[str, PrefectFuture] = {}
    results: list[StageResult] = []
    for stage in order:
        upstream = [futures[name] for name in dag.predecessors(stage) if name in futures]
        # quote(): the stage name and env are plain values, not data flowing from the planning and
        # parent-run tasks; only wait_for draws edges, so the graph is dvc.yaml's.
        futures[stage] = stage_task(stage, settings).submit(quote(stage), quote(env), quote(root), wait_for=upstream)
        try:
            results.append(futures[stage].result())
        except Exception as exc:  # reported in the summary and the parent run, then re-raised
            return results, exc
    return results, None


def in_workspace(where: Where) -> bool:
    """auto: a workspace for runs from a deployment (UI, API, schedule, worker), in place otherwise."""
    return where == "workspace" or (where == "auto" and deployment.id is not None)


def run_pipeline(
    pipeline: PipelineName,
    params: dict[str, Any],
    experiment: str | None,
    where: Where = "in-place",
    revision: str = "",
) -> PipelineReport:
    """Run the stages of ``pipeline`` in order; the first failure stops it and fails the flow.

    With ``params`` overrides the run is a DVC experiment: params.yaml is changed as
    ``dvc exp run -S`` changes it, and the result is saved as experiment ``experiment``. In a
    workspace (``where``), every run that runs a stage is saved as an experiment (named, or
    generated), published to the launching repository, and the workspace is removed.
    """
    if not in_workspace(where):
        if revision:
            raise PipelineError(f"revision {revision!r}: only a run in a workspace checks out another commit")
        return run_checkout(pipeline, params, experiment, Checkout(Path("."), git_commit()))
    opened = open_workspace(revision)
    try:
        return run_checkout(pipeline, params, experiment, Checkout(opened.path, opened.commit, opened))
    finally:
        workspace.remove_workspace(opened)
        get_run_logger().info("workspace %s removed", opened.path)


def run_checkout(
    pipeline: PipelineName, params: dict[str, Any], experiment: str | None, where: Checkout
) -> PipelineReport:
    start = time.perf_counter()
    root = where.root
    settings = load_section("orchestration", OrchestrationParams, root / "params.yaml")
    if params or where.workspace:
        experiment = experiments.experiment_name(experiment, where.workspace.source if where.workspace else root)
    # An in-place experiment that fails puts this checkout back as it was (a workspace is dropped).
    saved = experiments.snapshot_files(root) if params and not where.workspace else None
    if params:
        experiments.set_params(params, root / "params.yaml")
        get_run_logger().info("DVC experiment %s: %s", experiment, params)
    try:
        return run_stages_and_publish(pipeline, experiment, where, settings, start)
    except BaseException:
        if saved is not None:
            get_run_logger().info("the failed experiment is undone: %s", experiments.restore_files(saved, root))
        raise


def run_stages_and_publish(
    pipeline: PipelineName, experiment: str | None, where: Checkout, settings: OrchestrationParams, start: float
) -> PipelineReport:
    root = where.root
    order = plan_stages(PIPELINES[pipeline], root)
    if check_up_to_date(PIPELINES[pipeline], root):
        # Nothing to run: no MLflow run (an empty one per scheduled no-op would bury the real runs).
        report = PipelineReport(
            flow=pipeline,
            results=[StageResult(stage, "skipped", 0.0) for stage in order],
            not_run=[],
            wall_s=time.perf_counter() - start,
            metrics={},
            mlflow_run_id="",
            mlflow_url="",
        )
        return publish_summary(quote(report), root)
    parent = start_parent_run(pipeline, settings, experiment or os.environ.get(DVC_EXP_ENV, ""), where)
    env = {**parent.stage_env, **({DVC_EXP_ENV: experiment} if experiment else {})}
    results, failure = run_stages(order, settings, env, root)
    if not failure and experiment:
        save_experiment(experiment, root, PIPELINES[pipeline])
        if where.workspace:
            publish_experiment(where.workspace, experiment)
        push_experiment(experiment, where.workspace.source if where.workspace else root)
    if not failure and settings.push:
        push_outputs(PIPELINES[pipeline], root)
    report = PipelineReport(
        flow=pipeline,
        results=results,
        not_run=order[len(results) :],
        wall_s=time.perf_counter() - start,
        metrics={},
        mlflow_run_id=parent.run_id,
        mlflow_url=parent.url,
        failure=str(failure) if failure else None,
        experiment=experiment,
    )
    report = publish_summary(quote(report), root)
    if failure:
        raise failure
    return report


@flow(name="llm-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=1))
def llm_pipeline(
    pipeline: PipelineName = "all",
    params: dict[str, Any] | None = None,
    experiment: str | None = None,
    where: Where = "auto",
    revision: str = "",
) -> PipelineReport:
    """The DVC stages of ``pipeline`` (all: every stage in dvc.yaml; pretrain, spam, instructions:
    that part and what it needs). ``params``: overrides such as {"finetune_classifier.lr": 5e-4},
    run as DVC experiment ``experiment`` (a generated name when empty). ``where``: workspace (a
    clean checkout of ``revision`` for this run alone, default for runs from a deployment),
    in-place (the current checkout, default from the command line). ``revision``: the git commit
    a workspace checks out (default: the one the deployment was made at, else HEAD)."""
    return run_pipeline(pipeline, params or {}, experiment, where, revision)
