"""Fine-tune a pretrained GPT as a spam classifier (book chapter 6) and register it in MLflow.

The base model (``base_model.dir``: the project's own pretrained model or GPT-2's weights) gets
a head with one output per class of the data (``labels.json``: ham/spam by default);
``llmcore.train.train`` — the one training loop — runs with a cross-entropy loss on the chosen
position's logits and logs train/val loss and accuracy to MLflow. The state
under ``.cache/finetune_classifier/<settings key>/`` (outside DVC's outputs) lets an interrupted
run resume; it is deleted once the classifier is written. The classifier is logged as an MLflow pyfunc
(``steps/common/mlflow_models/spam_classifier.py``) and registered as a new ``spam-classifier`` version with alias ``candidate`` (score_spam
moves ``champion``), so
``mlflow models serve -m models:/spam-classifier@champion`` answers ``text`` → ``label``,
``spam_probability`` (``<label>_probability`` per class for more than two).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from pydantic import Field

from llmcore.classifier import (
    GPTClassifier,
    SpamDataset,
    classification_accuracy,
    classification_loss,
    collate_for,
    probability_columns,
    save_classifier,
    set_trainable,
)
from llmcore.device import resolve_device
from llmcore.lora import merge_lora
from llmcore.tokenizer import ENCODING_DIR_ENV, get_tokenizer
from llmcore.train import train
from steps.common.cli import StageParams, restart_option, run_stage
from steps.common.data import LABELS_FILE, TokenizerParams
from steps.common.datasets import read_splits
from steps.common.distributed import is_main_process, setup_distributed, stage_run_on_main
from steps.common.io import resume_state_dir, sha256_file, write_json
from steps.common.models import BaseModelParams, load_base_model
from steps.common.params import ParamsError, StrictModel
from steps.common.plotting import plot_history, write_history_csv
from steps.common.registry import SPAM_CLASSIFIER
from steps.common.training import TRAINING_ERRORS, train_config_from

STAGE = "finetune_classifier"
EXPERIMENT = SPAM_CLASSIFIER  # the experiment is named after the model it registers
CACHE_DIR = Path(".cache/finetune_classifier")
SPLIT_FILES = ("train.csv", "validation.csv", LABELS_FILE)  # the data a saved state was trained on
STEP_LOG_EVERY = 5  # optimizer steps between MLflow step-loss points (each is a database write)


class LoraParams(StrictModel):
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)


class FinetuneClassifierParams(StrictModel):
    trainable: Literal["last_layer", "last_block", "last_two_blocks", "all", "lora"] = "last_block"
    lora: LoraParams = LoraParams()
    token_position: Literal["last", "flexible", "mean"] = "last"
    max_length: int | None = Field(None, ge=1)  # None: the longest training message (capped at the context)
    drop_rate: float | None = Field(None, ge=0, lt=1)  # None: the base model's
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    eval_every: int = Field(50, ge=0)  # optimizer steps; 0: at epoch ends only
    eval_batches: int | None = Field(5, ge=1)  # None: whole splits
    seed: int = 123
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"


def classifier_signature(labels: list[str]):
    """Texts in; a label and the class probabilities (the spam probability for spam) out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    probabilities = [ColSpec("double", name) for name, _ in probability_columns(labels)]
    return ModelSignature(
        inputs=Schema([ColSpec("string", "text")]),
        outputs=Schema([ColSpec("string", "label"), *probabilities]),
    )


def finetune_classifier(
    params: FinetuneClassifierParams,
    *,
    base_dir: Path,
    data_dir: Path,
    out_dir: Path,
    metrics_out: Path,
    history_out: Path,
    plots_dir: Path,
    tokenizer_params: TokenizerParams = TokenizerParams(),
    cache_dir: Path = CACHE_DIR,
    resume: bool = True,
) -> dict:
    """Train, write the classifier, metrics, history and plots, and log + register it in MLflow.

    Under torchrun every rank trains; only rank 0 logs and writes (the others return {}).
    """
    from steps.common.mlflow_models import log_code_model  # mlflow imports take seconds: not at import
    from steps.common.registry import register_candidate
    from steps.common.tracking import MlflowCallback, log_data_files, tag_trained_model

    started = time.perf_counter()
    labels, (train_df, val_df) = read_splits(data_dir, ("train", "validation"))
    tokenizer = get_tokenizer(tokenizer_params.encoding_dir)
    base = load_base_model(base_dir, **({} if params.drop_rate is None else {"drop_rate": params.drop_rate}))
    cfg = base.cfg
    train_data = SpamDataset(train_df["Text"].tolist(), train_df["Label"].tolist(), tokenizer,
                             max_length=params.max_length, context_length=cfg.context_length)
    val_data = SpamDataset(val_df["Text"].tolist(), val_df["Label"].tolist(), tokenizer,
                           max_length=train_data.max_length)

    torch.manual_seed(params.seed)  # the new head's (and LoRA's) initialisation
    model = GPTClassifier.from_gpt(base, len(labels), labels=labels, token_position=params.token_position,
                                   max_length=train_data.max_length)
    n_trainable = set_trainable(model, params.trainable, lora_rank=params.lora.rank, lora_alpha=params.lora.alpha)
    try:
        model.to(resolve_device(params.device))
    except ValueError as exc:
        raise ParamsError(f"{STAGE}.device: {exc}") from exc

    config = train_config_from(params)
    # A saved state resumes only for the same base weights, data and settings; others are stale.
    inputs = [sha256_file(p) for p in (base_dir / "model.safetensors", *(data_dir / f for f in SPLIT_FILES))]
    # Under torchrun only rank 0 touches files and MLflow.
    state_dir = resume_state_dir(cache_dir, params.model_dump(mode="json"), inputs, prune=is_main_process())
    with stage_run_on_main(STAGE, EXPERIMENT, params) as run:
        if run is not None:
            import mlflow

            mlflow.log_params({"base_model": str(base_dir), "trainable_parameters": n_trainable,
                               "max_length_tokens": train_data.max_length})
            log_data_files({split: data_dir / f"{split}.csv" for split in ("train", "validation")})
        state = train(model, train_data, val_data, config, loss_fn=classification_loss,
                      eval_fn=classification_accuracy, collate_fn=collate_for(model),
                      callbacks=[MlflowCallback(STEP_LOG_EVERY)], state_dir=state_dir, resume=resume,
                      fingerprint_extra=state_dir.name)
        if run is None:  # another rank of a torchrun: rank 0 writes and logs
            return {}
        merge_lora(model)
        save_classifier(model.cpu(), out_dir)
        final = state.history[-1]
        metrics = {key: final[key] for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy")}
        metrics.update(steps=state.step, trainable_parameters=n_trainable, max_length=train_data.max_length)
        write_json(metrics_out, metrics)
        write_history_csv(history_out, state.history)
        steps_per_epoch = len(train_data) // params.batch_size
        for metric in ("loss", "accuracy"):
            plot = plots_dir / f"spam_training_{metric}.png"
            plot_history(plot, state.history, steps_per_epoch, metric=metric)
            mlflow.log_artifact(str(plot), "plots")
        info = log_code_model(
            "spam_classifier", "spam_classifier.py", out_dir,
            encoding_dir=tokenizer_params.encoding_dir or os.environ.get(ENCODING_DIR_ENV),
            signature=classifier_signature(labels), input_example=pd.DataFrame({"text": val_df["Text"].head(2).tolist()}),
        )
        tag_trained_model(out_dir, info)
        version = register_candidate(info.model_uri, SPAM_CLASSIFIER)
        mlflow.log_params({"steps": state.step, "wall_time_s": round(time.perf_counter() - started, 1)})
        metrics["run_id"] = run.info.run_id
        metrics["registered_version"] = version.version
    shutil.rmtree(cache_dir, ignore_errors=True)  # the classifier is written: nothing left to resume
    return metrics


def main(argv: list[str] | None = None) -> None:
    def body(args, params: StageParams) -> str | None:
        setup_distributed("steps.finetune_classifier", args.params, argv)  # under torchrun when params ask for processes
        base_dir = args.base or Path(params.section("base_model", BaseModelParams).dir)
        metrics = finetune_classifier(params.section(STAGE, FinetuneClassifierParams), base_dir=base_dir,
                                      data_dir=args.data, out_dir=args.out, metrics_out=args.metrics,
                                      history_out=args.history, plots_dir=args.plots,
                                      tokenizer_params=params.section("tokenizer", TokenizerParams),
                                      cache_dir=args.cache, resume=not args.restart)
        if not metrics:  # another rank of a torchrun
            return None
        return (f"val accuracy {metrics['val_accuracy']:.4f} (last eval), "
                f"{SPAM_CLASSIFIER} version {metrics['registered_version']} (@candidate) -> {args.out}")

    run_stage(STAGE, "Fine-tune a pretrained GPT as a spam classifier (book chapter 6).", body, argv=argv,
              errors=TRAINING_ERRORS, options=restart_option, paths={
                  "base": (None, "base llmcore checkpoint (default: params base_model.dir)"),
                  "data": "data/spam", "out": "models/spam_classifier",
                  "metrics": "reports/finetune_classifier.json", "history": "plots/spam_training.csv",
                  "plots": ("plots", "where the loss/accuracy PNGs go"),
                  "cache": (str(CACHE_DIR), "resumable training states"),
              })


if __name__ == "__main__":
    main()
