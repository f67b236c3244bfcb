"""Prefect flows over the DVC stages: each stage is a task running ``dvc repro --single-item``.

DVC decides what is up to date (unchanged stages are skipped, nothing is cached twice);
Prefect shows every stage's state, logs and duration and retries downloads; MLflow gets one
parent run per pipeline run, under which every stage that runs logs a child run (the id
reaches the stage process through ``LLMPIPE_MLFLOW_PARENT_RUN_ID``, see steps/tracking.py).
The flows are thin: the stage list comes from dvc.yaml's graph, the work happens in tasks.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Annotated

import mlflow
from mlflow.entities import Metric, Param
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import Field

from pipelines.dag import execution_order, read_dag
from pipelines.stages import StageResult, dvc_status, repro_stage
from pipelines.summary import PipelineReport, read_metrics, render_markdown
from steps.params import StrictModel, load_section, read_params
from steps.tracking import EXPERIMENT_ENV, PARENT_RUN_ENV, configure_tracking, flatten, git_commit

# Each sub-pipeline is its final stages plus everything upstream of them in dvc.yaml.
PIPELINES: dict[str, list[str] | None] = {
    "pretrain": ["evaluate"],
    "spam": ["score_spam"],
    "instructions": ["score_instructions"],
    "all": None,  # every stage in dvc.yaml
}
DOWNLOAD_PREFIX = "download_"  # stages that touch the network get task-level retries
UI_URL_ENV = "LLMPIPE_MLFLOW_UI_URL"


class OrchestrationParams(StrictModel):
    mlflow_experiment: str = "llm-pipeline"
    mlflow_ui_url: str = "http://127.0.0.1:5000"
    download_retry_delays_s: list[Annotated[float, Field(ge=0)]] = Field(default=[10.0, 30.0, 90.0], max_length=10)


@dataclass(frozen=True)
class ParentRun:
    run_id: str
    experiment: str
    tracking_uri: str
    url: str

    @property
    def stage_env(self) -> dict[str, str]:
        """What a stage process needs to log its child run under this one."""
        return {PARENT_RUN_ENV: self.run_id, EXPERIMENT_ENV: self.experiment, "MLFLOW_TRACKING_URI": self.tracking_uri}


@task(cache_policy=NO_CACHE)
def plan_stages(targets: list[str] | None) -> list[str]:
    """The stages to run, upstream first, from dvc.yaml's graph."""
    order = execution_order(read_dag("."), targets)
    get_run_logger().info("stages in order: %s", ", ".join(order))
    return order


@task(cache_policy=NO_CACHE)
def check_up_to_date(targets: list[str] | None) -> bool:
    """One ``dvc status`` for the whole selection: when DVC reports nothing changed, every
    ``dvc repro`` would skip, so the run is a no-op without starting one dvc process per stage."""
    changed = dvc_status(targets)
    logger = get_run_logger()
    if changed:
        logger.info("dvc status: changed: %s", ", ".join(changed))
    else:
        logger.info("dvc status: every stage is up to date; nothing to run")
    return not changed


@task(cache_policy=NO_CACHE)
def start_parent_run(pipeline: str, settings: OrchestrationParams) -> ParentRun:
    """The pipeline run's MLflow run: params.yaml flattened, tagged with commit and flow run."""
    tracking_uri = configure_tracking()
    experiment = mlflow.set_experiment(settings.mlflow_experiment)
    client = mlflow.MlflowClient()
    tags = {
        "pipeline": pipeline,
        "git_commit": git_commit(),
        "dvc_experiment": os.environ.get("DVC_EXP_NAME", ""),
        "prefect_flow_run_id": str(flow_run.id or ""),
        "prefect_flow_run_name": str(flow_run.name or ""),
    }
    run = client.create_run(experiment.experiment_id, run_name=f"{pipeline} {flow_run.name or ''}".strip(), tags=tags)
    params = [Param(key, str(value)) for key, value in flatten(read_params()).items()]
    client.log_batch(run.info.run_id, params=params)
    ui = os.environ.get(UI_URL_ENV) or settings.mlflow_ui_url
    url = f"{ui.rstrip('/')}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"
    get_run_logger().info("MLflow parent run %s: %s", run.info.run_id, url)
    return ParentRun(run.info.run_id, settings.mlflow_experiment, tracking_uri, url)


@task(cache_policy=NO_CACHE)
def run_stage(stage: str, extra_env: dict[str, str]) -> StageResult:
    """``dvc repro --single-item stage`` with its output in this task's log."""
    logger = get_run_logger()
    result = repro_stage(stage, extra_env, logger.info)
    logger.info("stage %s: %s in %.1f s", stage, result.status, result.seconds)
    return result


@task(cache_policy=NO_CACHE)
def publish_summary(report: PipelineReport) -> PipelineReport:
    """The run's Markdown summary as a Prefect artifact; metrics and summary on the parent run."""
    report.metrics = read_metrics("metrics")
    markdown = render_markdown(report)
    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    client.log_batch(report.mlflow_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in report.metrics.items()])
    client.log_text(report.mlflow_run_id, markdown, "pipeline_summary.md")
    client.set_terminated(report.mlflow_run_id, "FAILED" if report.failure else "FINISHED")
    create_markdown_artifact(markdown, key=f"pipeline-{report.flow}", description=f"DVC stages and metrics of pipeline {report.flow}")
    return report


def stage_task(stage: str, settings: OrchestrationParams):
    delays = settings.download_retry_delays_s if stage.startswith(DOWNLOAD_PREFIX) else []
    return run_stage.with_options(name=stage, task_run_name=stage, retries=len(delays), retry_delay_seconds=delays or 0)


def run_stages(order: list[str], settings: OrchestrationParams, parent: ParentRun) -> tuple[list[StageResult], Exception | None]:
    """One task per stage, in order, until the first failure."""
    results: list[StageResult] = []
    for stage in order:
        try:
            results.append(stage_task(stage, settings)(stage, parent.stage_env))
        except Exception as exc:  # reported in the summary and the parent run, then re-raised
            return results, exc
    return results, None


def run_pipeline(pipeline: str) -> PipelineReport:
    """Run the stages of ``pipeline`` in order; the first failure stops it and fails the flow."""
    start = time.perf_counter()
    settings = load_section("orchestration", OrchestrationParams)
    order = plan_stages(PIPELINES[pipeline])
    up_to_date = check_up_to_date(PIPELINES[pipeline])
    parent = start_parent_run(pipeline, settings)
    if up_to_date:
        results, failure = [StageResult(stage, "skipped", 0.0) for stage in order], None
    else:
        results, failure = run_stages(order, settings, parent)
    report = PipelineReport(
        flow=pipeline,
        results=results,
        not_run=order[len(results):],
        wall_s=time.perf_counter() - start,
        metrics={},
        mlflow_run_id=parent.run_id,
        mlflow_url=parent.url,
        failure=str(failure) if failure else None,
    )
    report = publish_summary(report)
    if failure:
        raise failure
    return report


@flow(name="llm-pipeline")
def full_pipeline() -> PipelineReport:
    """Every stage in dvc.yaml: data, pretraining, GPT-2, both fine-tunes, scoring."""
    return run_pipeline("all")


@flow(name="pretrain-pipeline")
def pretrain_pipeline() -> PipelineReport:
    """Data -> pretrain -> evaluate."""
    return run_pipeline("pretrain")


@flow(name="spam-pipeline")
def spam_pipeline() -> PipelineReport:
    """... -> finetune_classifier -> score_spam."""
    return run_pipeline("spam")


@flow(name="instructions-pipeline")
def instructions_pipeline() -> PipelineReport:
    """... -> finetune_instruct -> score_instructions."""
    return run_pipeline("instructions")


FLOWS = {"all": full_pipeline, "pretrain": pretrain_pipeline, "spam": spam_pipeline, "instructions": instructions_pipeline}
