"""The stage around ``llmcore.train.train``, written once for pretraining and both fine-tunes.

A training stage builds what is its own (the data, the model, its loss/eval/collate, how to save
it, the MLflow pyfunc that serves it) into a ``TrainingJob``; ``run_training`` does the rest the
same way for all of them: the resume key and state directory, the MLflow run (params, the split
files as datasets, curves through ``MlflowCallback``, the evaluations of an interrupted run
logged again), the run itself, and on rank 0 the model, the metrics, the history CSV, the plots,
the logged model registered as ``@candidate``, and the removal of the finished state.

``TrainParams`` holds the fields every training section shares; ``train_config`` maps them to
``llmcore.train.TrainConfig`` explicitly, one field at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, create_model
from pydantic.fields import FieldInfo
from torch import nn
from torch.utils.data import Dataset

from llmcore.checkpoint import CheckpointError
from llmcore.config import ConfigError
from llmcore.device import resolve_device
from llmcore.distributed import is_main_process, world_size
from llmcore.throughput import run_summary
from llmcore.tokenizer import ENCODING_DIR_ENV, TokenizerFilesError
from llmcore.train import (
    STATE_DIR,
    TrainCallback,
    TrainConfig,
    TrainingDivergedError,
    TrainState,
    has_train_state,
    next_token_loss,
    train,
)
from llmpipe.distributed import stage_run_on_main
from llmpipe.io import record_state_params, resume_state_dir, sha256_file, write_json
from llmpipe.models import BaseModelError, bundle_tokenizer
from llmpipe.params import ParamsError, StrictModel
from llmpipe.plotting import plot_history, write_history_csv

# What a training stage's CLI reports in one line (llmpipe.cli.run_stage's ``errors``).
TRAINING_ERRORS = (ConfigError, CheckpointError, TokenizerFilesError, TrainingDivergedError, BaseModelError)


class TrainParams(StrictModel):
    """The knobs of ``llmcore.train.TrainConfig`` that every training section has. No defaults here:
    params.yaml's ``training`` section states the shared ones once and each stage's section what
    is its own (or overrides); a key in neither is an error naming it."""

    DEFAULTS_SECTION: ClassVar[str] = "training"
    DEFAULTS_MODEL: ClassVar[type[StrictModel]]  # that section's model (below)

    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)  # the global batch: under DDP each rank takes its share
    grad_accum_steps: int = Field(ge=1)
    lr: float = Field(gt=0)
    min_lr_ratio: float = Field(ge=0, le=1)  # the cosine schedule ends at lr * min_lr_ratio
    weight_decay: float = Field(ge=0)  # AdamW; not on biases and norms
    betas: list[float] = Field(min_length=2, max_length=2)  # AdamW
    schedule: Literal["cosine", "constant"]
    warmup_steps: int = Field(ge=0)  # linear warmup, in optimizer steps
    grad_clip: float | None = Field(gt=0)  # max gradient norm; null: no clipping
    eval_every: int = Field(ge=0)  # optimizer steps; 0: at epoch ends only
    eval_batches: int | None = Field(ge=1)  # batches per evaluation; null: the whole splits
    checkpoint_every: int = Field(ge=0)  # optimizer steps between resumable states; 0: epoch ends
    seed: int
    device: Literal["auto", "cpu", "cuda", "mps"]
    precision: Literal["auto", "fp32", "bf16-mixed", "fp16-mixed"]  # llmcore.precision
    compile: bool  # torch.compile the training and evaluation loss

    def train_config(self, progress: bool = True) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            grad_accum_steps=self.grad_accum_steps,
            lr=self.lr,
            min_lr_ratio=self.min_lr_ratio,
            weight_decay=self.weight_decay,
            betas=(self.betas[0], self.betas[1]),
            schedule=self.schedule,
            warmup_steps=self.warmup_steps,
            grad_clip=self.grad_clip,
            eval_every=self.eval_every,
            eval_batches=self.eval_batches,
            checkpoint_every=self.checkpoint_every,
            seed=self.seed,
            progress=progress,
            precision=self.precision,
            compile=self.compile,
        )


# params.yaml's `training`: any of TrainParams' keys (same types and ranges), none required.
TrainParams.DEFAULTS_MODEL = create_model(
    "TrainingDefaults",
    __base__=StrictModel,
    __doc__="The trainers' shared settings (params.yaml `training`).",
    **{
        name: (info.annotation, FieldInfo.merge_field_infos(info, default=None))
        for name, info in TrainParams.model_fields.items()
    },
)


def stage_device(stage: str, params: TrainParams) -> torch.device:
    """The device ``params.device`` names, or a ParamsError naming ``<stage>.device``."""
    try:
        return resolve_device(params.device)
    except ValueError as exc:
        raise ParamsError(f"{stage}.device: {exc}") from exc


@dataclass(frozen=True)
class Pyfunc:
    """How the trained model is logged to MLflow: a "models from code" file of
    llmpipe/mlflow_models and its signature (and an input example)."""

    name: str
    code_file: str
    signature: Any
    input_example: Any = None


@dataclass
class TrainingJob:
    """What differs between the training stages; ``run_training`` does the rest."""

    stage: str
    experiment: str
    registered_model: str
    params: TrainParams  # the stage's whole section (logged as MLflow params)
    model: nn.Module  # built and on its device
    train_data: Dataset
    val_data: Dataset
    data_files: Mapping[str, Path]  # split -> file: MLflow dataset inputs; their digests key the resume state
    save: Callable[[nn.Module, Path], None]  # writes the trained model's directory
    pyfunc: Pyfunc
    loss_fn: Callable = next_token_loss
    eval_fn: Callable | None = None
    collate_fn: Callable | None = None
    callbacks: Sequence[TrainCallback] = ()
    resume_settings: Mapping[str, Any] = field(default_factory=dict)  # what else a saved state depends on
    # (besides the params section and the data files: the base model's digest, the model config, ...)
    run_params: Mapping[str, Any] = field(default_factory=dict)  # more MLflow params
    final_keys: Sequence[str] = ("train_loss", "val_loss")  # from the last evaluation into the metrics
    extra_metrics: Mapping[str, Any] = field(default_factory=dict)
    step_log_every: int = 1  # optimizer steps between MLflow step-loss points


@dataclass(frozen=True)
class TrainingOutputs:
    model_dir: Path
    metrics: Path  # reports/<stage>.json
    history: Path  # the evaluations as CSV, for dvc plots
    plots: Mapping[str, Path]  # metric ("loss", "accuracy") -> its PNG
    state_dir: Path  # resumable states, outside DVC's outputs (DVC deletes outputs before a run)


def run_training(
    job: TrainingJob,
    out: TrainingOutputs,
    *,
    encoding_dir: str | None = None,
    resume: bool = True,
    progress: bool = True,
) -> dict:
    """Train ``job`` (resuming a saved state made with the same settings and data), write and log
    everything; returns the metrics. Under torchrun every rank trains and only rank 0 writes and
    logs (the others return {})."""
    from llmpipe.tracking import MlflowCallback, check_store  # mlflow imports take seconds: not at import

    if is_main_process():
        check_store(job.experiment)  # a store that cannot be written fails the stage before training
    config = job.params.train_config(progress=progress)
    digests = {split: sha256_file(path) for split, path in job.data_files.items()}
    # A saved state is resumed only when made with the same section, settings and data.
    state_dir = resume_state_dir(
        out.state_dir,
        config.fingerprint(),
        job.params.model_dump(mode="json"),
        dict(job.resume_settings),
        digests,
        prune=is_main_process(),
    )
    if is_main_process():
        record_state_params(state_dir, job.stage, job.params.model_dump(mode="json"), TrainParams.DEFAULTS_SECTION)
    with stage_run_on_main(job.stage, job.experiment, job.params) as run:
        resumed_tokens = _start_run(job, state_dir) if run is not None else 0
        started = time.perf_counter()
        state = train(
            job.model,
            job.train_data,
            job.val_data,
            config,
            loss_fn=job.loss_fn,
            eval_fn=job.eval_fn,
            collate_fn=job.collate_fn,
            callbacks=[MlflowCallback(job.step_log_every), *job.callbacks],
            state_dir=state_dir,
            resume=resume,
            fingerprint_extra=state_dir.name,
        )
        wall_time = time.perf_counter() - started
        if run is None:  # another rank of a torchrun: rank 0 writes and logs
            return {}
        metrics = _final_metrics(job, state)
        if state.skipped_steps:  # fp16: steps whose gradients overflowed did not update the weights
            print(
                f"{job.stage}: fp16's GradScaler skipped {state.skipped_steps} of {state.step} optimizer steps "
                "(inf/NaN gradients; see scaler_skipped_steps in the report)",
                flush=True,
            )
        speed = _throughput(job.model, config, (state.tokens_seen - resumed_tokens) / wall_time, wall_time)
        job.save(job.model, out.model_dir)
        bundle_tokenizer(out.model_dir, encoding_dir)  # so `llm` and serving work offline with it
        write_json(out.metrics, metrics)
        write_history_csv(out.history, state.history)
        for metric, path in out.plots.items():
            plot_history(path, state.history, state.steps_per_epoch, metric=metric)
        version = _log_model_or_remove_outputs(job, out, encoding_dir, {**metrics, **speed})
        metrics.update(speed, run_id=run.info.run_id, registered_version=str(version.version))
    shutil.rmtree(out.state_dir, ignore_errors=True)  # the model is written: nothing left to resume
    return metrics


def _start_run(job: TrainingJob, state_dir: Path) -> int:
    """Params and datasets of the new MLflow run, and the evaluations an interrupted run of the same
    settings already made (re-logged, so the curves are whole); returns the tokens already seen."""
    import mlflow

    from llmpipe.tracking import log_data_files

    device = next(job.model.parameters()).device
    mlflow.log_params({**job.run_params, "resolved_device": str(device)})
    log_data_files(job.data_files)
    if not has_train_state(state_dir):
        return 0
    saved = json.loads((state_dir / STATE_DIR / "state.json").read_text())
    for entry in saved["history"]:
        mlflow.log_metrics(
            {k: v for k, v in entry.items() if k not in ("step", "tokens_seen")}, step=entry["tokens_seen"]
        )
    mlflow.set_tag("resumed_from_step", saved["step"])
    return saved["tokens_seen"]


def _final_metrics(job: TrainingJob, state: TrainState) -> dict:
    """What the run reached: the same figures for the same params and seed (no timings)."""
    final = state.history[-1]
    return {
        **{key: final[key] for key in job.final_keys},
        "steps": state.step,
        "tokens_seen": state.tokens_seen,
        "scaler_skipped_steps": state.skipped_steps,
        **job.extra_metrics,
    }


def _throughput(model: nn.Module, config: TrainConfig, tokens_per_s: float, wall_time: float) -> dict:
    """This run's speed (tokens/s, MFU, peak memory, wall time): MLflow and the console, not the
    metrics file, since it differs from run to run."""
    sequence = getattr(getattr(model, "cfg", None), "context_length", 1)
    speed = {"tokens_per_s": tokens_per_s, "wall_time_s": wall_time}
    speed.update(
        run_summary(model, tokens_per_s, sequence, next(model.parameters()).device, config.precision, world_size())
    )
    return speed


def _log_model_or_remove_outputs(job: TrainingJob, out: TrainingOutputs, encoding_dir: str | None, metrics: dict):
    """``_log_model``; when tracking fails, the outputs just written go (they must not look complete)
    and the error names the store. The training state stays, so a re-run only logs again."""
    from llmpipe.tracking import TrackingError, remove_outputs, tracking_errors

    try:
        with tracking_errors():
            return _log_model(job, out, encoding_dir, metrics)
    except TrackingError:
        remove_outputs([out.model_dir, out.metrics, out.history, *out.plots.values()])
        raise


def _log_model(job: TrainingJob, out: TrainingOutputs, encoding_dir: str | None, metrics: dict):
    """Plots, curves and the pyfunc into the active run; the pyfunc registered as ``@candidate``."""
    import mlflow

    from llmpipe.mlflow_models import log_code_model
    from llmpipe.registry import register_candidate
    from llmpipe.tracking import tag_trained_model

    for path in (*out.plots.values(), out.history):
        mlflow.log_artifact(str(path), "plots")
    info = log_code_model(
        job.pyfunc.name,
        job.pyfunc.code_file,
        out.model_dir,
        encoding_dir=encoding_dir or os.environ.get(ENCODING_DIR_ENV),
        signature=job.pyfunc.signature,
        input_example=job.pyfunc.input_example,
    )
    tag_trained_model(out.model_dir, info)
    mlflow.log_params(
        {
            "steps": metrics["steps"],
            "tokens_seen": metrics["tokens_seen"],
            "wall_time_s": round(metrics["wall_time_s"], 1),
        }
    )
    mlflow.log_metrics(
        {f"run_{key}": metrics[key] for key in ("tokens_per_s", "mfu", "peak_memory_mb") if key in metrics}
    )
    return register_candidate(info.model_uri, job.registered_model)
