"""Pretrain the GPT on the corpus windows (book chapter 5) and log it to MLflow.

``llmcore.train.train`` — the one training loop — runs next-token prediction over the windows
of ``data/windows`` (views over the token shards). Its resumable state lives in
``.cache/pretrain/<key>/``, outside DVC's outputs (DVC deletes a stage's outputs before running
it), keyed by everything that must match to resume (training and model settings, the digests of
the windows and token shards): after ``kill -9``,
running the stage again continues from the last checkpoint and ends with the same weights and
metrics as an uninterrupted run. The state is deleted once the outputs are written.

Outputs: the checkpoint (``models/pretrained``: safetensors + config.json), ``reports/pretrain.json``,
the evaluation history ``plots/pretrain_loss.csv`` (for ``dvc plots``) and the book's loss plot
``plots/pretrain_loss.png``. MLflow gets the params, losses against tokens seen, learning rate,
tokens/s, a sample continuation of ``sample.prompt`` after each epoch, the plot, and the model as
a "models from code" pyfunc text generator (``steps/common/mlflow_models/generator.py``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from tqdm.auto import tqdm

from llmcore.checkpoint import save_checkpoint
from llmcore.config import PRESETS, GPTConfig
from llmcore.device import resolve_device
from llmcore.distributed import is_main_process
from llmcore.generate import generate_text
from llmcore.model import GPTModel
from llmcore.tokenizer import ENCODING_DIR_ENV, get_tokenizer
from llmcore.train import STATE_DIR, TrainCallback, TrainConfig, TrainState, has_train_state, train
from steps.common.cli import StageParams, run_stage
from steps.common.data import TokenizerParams
from steps.common.windows import load_windows, window_files
from steps.common.distributed import setup_distributed, stage_run_on_main
from steps.common.io import resume_state_dir, sha256_file, write_json
from steps.common.params import ParamsError, StrictModel
from steps.common.plotting import plot_history, write_history_csv
from steps.common.registry import PRETRAINED_MODEL
from steps.common.training import TRAINING_ERRORS

STAGE = "pretrain"
EXPERIMENT = "pretrain"


class ModelParams(StrictModel):
    """A preset from llmcore.config.PRESETS; every other field overrides it unless null."""

    preset: str = "cpu-small"
    context_length: int | None = Field(None, gt=0)  # must equal the windows' context_length
    emb_dim: int | None = Field(None, gt=0)
    n_heads: int | None = Field(None, gt=0)
    n_layers: int | None = Field(None, gt=0)
    drop_rate: float | None = Field(None, ge=0, lt=1)
    qkv_bias: bool | None = None
    tie_embeddings: bool | None = None
    init: Literal["gpt2", "torch"] | None = None  # weight initialisation (llmcore.config.GPTConfig.init)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, name: str) -> str:
        if name not in PRESETS:
            raise ValueError(f"unknown preset; choose one of {sorted(PRESETS)}")
        return name

    def gpt_config(self) -> GPTConfig:
        overrides = {k: v for k, v in self.model_dump().items() if k != "preset" and v is not None}
        return GPTConfig.from_preset(self.preset, **overrides)


class OptimizerParams(StrictModel):
    lr: float = Field(4e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    grad_clip: float | None = Field(1.0, gt=0)  # max gradient norm; null: no clipping


class SampleParams(StrictModel):
    """The continuation logged after every epoch (greedy, as the book's generate_and_print_sample)."""

    prompt: str = Field("Every effort moves you", min_length=1)
    max_new_tokens: int = Field(50, ge=1)


class PretrainParams(StrictModel):
    model: ModelParams = ModelParams()
    optimizer: OptimizerParams = OptimizerParams()
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(2, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    eval_every: int = Field(5, ge=0)  # optimizer steps; 0: at epoch ends only
    eval_batches: int | None = Field(5, ge=1)  # batches per evaluation; null: the whole splits
    checkpoint_every: int = Field(0, ge=0)  # optimizer steps; 0: at epoch ends only
    seed: int = 123
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    sample: SampleParams = SampleParams()

    def train_config(self, progress: bool = True) -> TrainConfig:
        opt = self.optimizer
        return TrainConfig(
            epochs=self.epochs, batch_size=self.batch_size, grad_accum_steps=self.grad_accum_steps,
            lr=opt.lr, weight_decay=opt.weight_decay, warmup_steps=opt.warmup_steps, schedule=opt.schedule,
            min_lr_ratio=opt.min_lr_ratio, grad_clip=opt.grad_clip, eval_every=self.eval_every,
            eval_batches=self.eval_batches, checkpoint_every=self.checkpoint_every, seed=self.seed,
            progress=progress,
        )


@dataclass(frozen=True)
class PretrainPaths:
    windows: Path = Path("data/windows")
    model_out: Path = Path("models/pretrained")
    metrics: Path = Path("reports/pretrain.json")
    history_csv: Path = Path("plots/pretrain_loss.csv")
    loss_plot: Path = Path("plots/pretrain_loss.png")
    state_dir: Path = Path(".cache/pretrain")  # not a DVC output: survives an interrupted run


class EpochSampleCallback(TrainCallback):
    """After each epoch, continue the fixed prompt greedily and log it (MLflow text + console)."""

    def __init__(self, tokenizer, sample: SampleParams):
        self.tokenizer, self.sample = tokenizer, sample

    def on_epoch_end(self, state: TrainState, model: nn.Module) -> None:
        import mlflow

        completion = generate_text(model, self.tokenizer, self.sample.prompt, self.sample.max_new_tokens)
        text = self.sample.prompt + completion
        mlflow.log_text(text + "\n", f"samples/epoch_{state.epoch + 1:03d}.txt")
        tqdm.write(f"epoch {state.epoch + 1}: {text!r}")


def generator_signature():
    """Prompts in, completions out; generation options as optional per-call params."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string", "completion")]),
        params=ParamSchema([
            ParamSpec("max_new_tokens", "long", 50),
            ParamSpec("temperature", "double", 0.0),
            ParamSpec("top_k", "long", 0),
            ParamSpec("seed", "long", 123),
        ]),
    )


def _log_restored_history(state_dir: Path) -> dict:
    """Re-log the evaluations of an interrupted run into this one; returns the saved progress."""
    import mlflow

    saved = json.loads((state_dir / STATE_DIR / "state.json").read_text())
    for entry in saved["history"]:
        mlflow.log_metrics({k: v for k, v in entry.items() if k not in ("step", "tokens_seen")},
                           step=entry["tokens_seen"])
    mlflow.set_tag("resumed_from_step", saved["step"])
    return saved


def pretrain(
    params: PretrainParams,
    paths: PretrainPaths = PretrainPaths(),
    tokenizer_params: TokenizerParams = TokenizerParams(),
    *,
    callbacks: tuple[TrainCallback, ...] = (),
    progress: bool = True,
) -> dict[str, float]:
    """Train from scratch (or resume), write the outputs and log the run; returns the metrics."""
    from steps.common.tracking import MlflowCallback, log_data_files  # mlflow imports take seconds: not at import

    cfg = params.model.gpt_config()
    windows = load_windows(paths.windows, cfg)
    train_data, val_data = windows["train"], windows["val"]
    tokenizer = get_tokenizer(tokenizer_params.encoding_dir)
    config = params.train_config(progress=progress)
    # What a saved state must have been made with to be resumed: settings, model shape, data.
    state_dir = resume_state_dir(paths.state_dir, config.fingerprint(), cfg.to_dict(),
                                 [sha256_file(path) for path in window_files(paths.windows).values()],
                                 prune=False)
    try:
        device = resolve_device(params.device)
    except ValueError as exc:
        raise ParamsError(f"pretrain.device: {exc}") from exc

    torch.manual_seed(params.seed)
    model = GPTModel(cfg).to(device)
    with stage_run_on_main(STAGE, EXPERIMENT, params) as run:
        resumed = {"tokens_seen": 0}
        if run is not None:
            import mlflow

            mlflow.log_params({"n_parameters": model.num_parameters(), "train_windows": len(train_data),
                               "val_windows": len(val_data), "resolved_device": str(device)})
            log_data_files(window_files(paths.windows))
            if has_train_state(state_dir):
                resumed = _log_restored_history(state_dir)
        sample_cb = EpochSampleCallback(tokenizer, params.sample)
        started = time.perf_counter()
        state = train(model, train_data, val_data, config, state_dir=state_dir, fingerprint_extra=state_dir.name,
                      callbacks=[MlflowCallback(), sample_cb, *callbacks])
        wall_time = time.perf_counter() - started
        if not is_main_process():
            return {}
        tokens_this_run = state.tokens_seen - resumed["tokens_seen"]
        final = state.history[-1]
        metrics = {
            "train_loss": final["train_loss"],
            "val_loss": final["val_loss"],
            "steps": state.step,
            "tokens_seen": state.tokens_seen,
            "parameters": model.num_parameters(),
            "tokens_per_s": tokens_this_run / wall_time if wall_time > 0 else float("nan"),
            "wall_time_s": wall_time,
        }
        steps_per_epoch = math.ceil(len(train_data) // params.batch_size / params.grad_accum_steps)
        save_checkpoint(model, paths.model_out, extra={"stage": STAGE, "tokens_seen": state.tokens_seen})
        write_json(paths.metrics, metrics)
        write_history_csv(paths.history_csv, state.history)
        plot_history(paths.loss_plot, state.history, steps_per_epoch)

        mlflow.log_params({k: metrics[k] for k in ("steps", "tokens_seen", "wall_time_s")})
        mlflow.log_artifact(str(paths.loss_plot), "plots")
        mlflow.log_artifact(str(paths.history_csv), "plots")
        from steps.common.mlflow_models import log_code_model
        from steps.common.registry import register_candidate
        from steps.common.tracking import tag_trained_model

        info = log_code_model("generator", "generator.py", paths.model_out,
                              encoding_dir=tokenizer_params.encoding_dir or os.environ.get(ENCODING_DIR_ENV),
                              signature=generator_signature())
        tag_trained_model(paths.model_out, info)
        register_candidate(info.model_uri, PRETRAINED_MODEL)
    shutil.rmtree(paths.state_dir, ignore_errors=True)
    return metrics


def main(argv: list[str] | None = None) -> None:
    def body(args, params: StageParams) -> str | None:
        setup_distributed("steps.pretrain", args.params, argv)  # under torchrun when params ask for processes
        paths = PretrainPaths(args.windows, args.out, args.metrics, args.history, args.plot, args.state_dir)
        metrics = pretrain(params.section(STAGE, PretrainParams), paths, params.section("tokenizer", TokenizerParams))
        if not metrics:  # another rank of a torchrun
            return None
        return (f"train loss {metrics['train_loss']:.3f}, val loss {metrics['val_loss']:.3f} after "
                f"{metrics['tokens_seen']} tokens ({metrics['tokens_per_s']:.0f} tokens/s) -> {paths.model_out}")

    defaults = PretrainPaths()
    run_stage(STAGE, "Pretrain the GPT on the corpus windows (book chapter 5).", body, argv=argv,
              errors=TRAINING_ERRORS, paths={
                  "windows": (str(defaults.windows), "windows' meta.json (over the token shards)"),
                  "out": (str(defaults.model_out), "checkpoint directory"),
                  "metrics": str(defaults.metrics), "history": str(defaults.history_csv),
                  "plot": str(defaults.loss_plot), "state-dir": (str(defaults.state_dir), "resumable training state"),
              })


if __name__ == "__main__":
    main()
