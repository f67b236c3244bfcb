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
a "models from code" pyfunc text generator (``llmpipe/mlflow_models/generator.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from tqdm.auto import tqdm

from llmcore.checkpoint import save_checkpoint
from llmcore.config import PRESETS, GPTConfig
from llmcore.generate import generate_text
from llmcore.model import GPTModel
from llmcore.tokenizer import get_tokenizer, is_gpt2
from llmcore.train import TrainCallback, TrainState
from llmpipe.cli import StageParams, run_stage
from llmpipe.data import TokenizerParams
from llmpipe.distributed import setup_distributed
from llmpipe.mlflow_models import generator_signature
from llmpipe.params import StrictModel
from llmpipe.registry import PRETRAIN_EXPERIMENT, PRETRAINED_MODEL
from llmpipe.training import (
    TRAINING_ERRORS,
    Pyfunc,
    TrainingJob,
    TrainingOutputs,
    TrainParams,
    run_training,
    stage_device,
)
from steps.data.windows import load_windows, read_windows_meta, window_files

STAGE = "pretrain"
EXPERIMENT = PRETRAIN_EXPERIMENT


class ModelParams(StrictModel):
    """A preset from llmcore.config.PRESETS; every other field overrides it unless null."""

    preset: str
    emb_dim: int | None = Field(gt=0)
    n_heads: int | None = Field(gt=0)
    n_layers: int | None = Field(gt=0)
    drop_rate: float | None = Field(ge=0, lt=1)
    qkv_bias: bool | None
    tie_embeddings: bool | None
    init: Literal["gpt2", "torch"] | None  # weight initialisation (llmcore.config.GPTConfig.init)
    pad_vocab_to_multiple: int | None = Field(ge=1)  # 64: a 50,304-row head (faster matmuls)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, name: str) -> str:
        if name not in PRESETS:
            raise ValueError(f"unknown preset; choose one of {sorted(PRESETS)}")
        return name

    def gpt_config(self, context_length: int) -> GPTConfig:
        """The preset with these overrides, at the context length of the windows it trains on
        (``windows.context_length``: the one place it is stated)."""
        overrides = {k: v for k, v in self.model_dump().items() if k != "preset" and v is not None}
        return GPTConfig.from_preset(self.preset, context_length=context_length, **overrides)


class SampleParams(StrictModel):
    """The continuation logged after every epoch (greedy, as the book's generate_and_print_sample)."""

    prompt: str = Field(min_length=1)
    max_new_tokens: int = Field(ge=1)


class PretrainParams(TrainParams):
    model: ModelParams
    sample: SampleParams


# Not a DVC output (dvc.yaml holds those): a resumable state survives an interrupted run.
STATE_DIR = Path(".cache/pretrain")


@dataclass(frozen=True)
class PretrainPaths:
    windows: Path
    model_out: Path
    metrics: Path
    history_csv: Path
    loss_plot: Path
    state_dir: Path = STATE_DIR


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


def vocab_for(cfg: GPTConfig, tokenizer, pad_to: int | None) -> GPTConfig:
    """GPT-2's BPE keeps the preset's vocabulary (50,257: the book's model); a trained one sets
    ``vocab_size`` to its own, the embedding and head padded to ``pad_to`` rows (64 when null)."""
    if is_gpt2(tokenizer):
        return cfg
    return replace(cfg, vocab_size=tokenizer.n_vocab, pad_vocab_to_multiple=pad_to or 64)


def pretrain(
    params: PretrainParams,
    *,
    paths: PretrainPaths,
    tokenizer_params: TokenizerParams,
    callbacks: tuple[TrainCallback, ...] = (),
    progress: bool = True,
) -> dict[str, float]:
    """Train from scratch (or resume), write the outputs and log the run; returns the metrics."""
    tokenizer = get_tokenizer(tokenizer_params.directory)
    cfg = vocab_for(
        params.model.gpt_config(read_windows_meta(paths.windows).context_length),
        tokenizer,
        params.model.pad_vocab_to_multiple,
    )
    windows = load_windows(paths.windows, cfg)
    train_data, val_data = windows["train"], windows["val"]
    device = stage_device(STAGE, params)
    torch.manual_seed(params.seed)
    model = GPTModel(cfg).to(device)
    job = TrainingJob(
        stage=STAGE,
        experiment=EXPERIMENT,
        registered_model=PRETRAINED_MODEL,
        params=params,
        model=model,
        train_data=train_data,
        val_data=val_data,
        data_files=window_files(paths.windows),
        save=lambda trained, out: save_checkpoint(trained, out, extra={"stage": STAGE, "prompt_style": "plain"}),
        pyfunc=Pyfunc("generator", "generator.py", generator_signature()),
        callbacks=[EpochSampleCallback(tokenizer, params.sample), *callbacks],
        resume_settings={"model": cfg.to_dict()},
        run_params={
            "n_parameters": model.num_parameters(),
            "train_windows": len(train_data),
            "val_windows": len(val_data),
        },
        extra_metrics={"parameters": model.num_parameters()},
    )
    out = TrainingOutputs(paths.model_out, paths.metrics, paths.history_csv, {"loss": paths.loss_plot}, paths.state_dir)
    return run_training(job, out, encoding_dir=tokenizer_params.directory, progress=progress)


def main(argv: list[str] | None = None) -> None:
    def body(args, params: StageParams) -> str | None:
        setup_distributed("steps.pretrain", args.params, argv)  # under torchrun when params ask for processes
        paths = PretrainPaths(args.windows, args.out, args.metrics, args.history, args.plot, args.state_dir)
        metrics = pretrain(
            params.section(STAGE, PretrainParams),
            paths=paths,
            tokenizer_params=params.section("tokenizer", TokenizerParams),
        )
        if not metrics:  # another rank of a torchrun
            return None
        return (
            f"train loss {metrics['train_loss']:.3f}, val loss {metrics['val_loss']:.3f} after "
            f"{metrics['tokens_seen']} tokens ({metrics['tokens_per_s']:.0f} tokens/s) -> {paths.model_out}"
        )

    run_stage(
        STAGE,
        "Pretrain the GPT on the corpus windows (book chapter 5).",
        body,
        argv=argv,
        errors=TRAINING_ERRORS,
        paths={
            "windows": "windows' meta.json (over the token shards)",
            "out": "checkpoint directory",
            "metrics": "training figures",
            "history": "the loss history (CSV)",
            "plot": "the loss plot",
            "state-dir": (str(STATE_DIR), "resumable training state"),
        },
    )


if __name__ == "__main__":
    main()
