"""Instruction fine-tuning (book chapter 7): the base model learns to answer prompts in a style.

The entries (Alpaca-style or chats) are rendered in the prompt style of ``data/instructions``
(``meta.json``: ``alpaca`` by default), which the checkpoint records for scoring and serving.

Runs the one training loop (``llmcore.train.train``) with ``collate_instructions`` as its
collate function and the plain next-token loss (which skips the -100 targets). The training state
lives in ``.cache/finetune_instruct/<settings key>/`` (outside DVC's outputs), so an interrupted
run resumes where it stopped; it is deleted once ``models/instruct`` is written. After each epoch
a few validation prompts are answered and logged to MLflow, as the book prints them.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import Field
from torch import nn

from llmcore.checkpoint import save_checkpoint
from llmcore.device import resolve_device
from llmcore.instruct import InstructionDataset, collate_instructions, generate_responses
from llmcore.prompts import as_instruction, prompt_text, reference
from llmcore.tokenizer import ENCODING_DIR_ENV, get_tokenizer
from llmcore.train import TrainCallback, TrainState, train
from steps.common.cli import StageParams, restart_option, run_stage
from steps.common.data import DataError, TokenizerParams
from steps.common.datasets import load_entries, read_prompt_style
from steps.common.distributed import is_main_process, setup_distributed, stage_run_on_main
from steps.common.io import resume_state_dir, sha256_file, write_json
from steps.common.models import BaseModelParams, load_base_model
from steps.common.params import ParamsError, StrictModel
from steps.common.plotting import plot_history, write_history_csv
from steps.common.registry import INSTRUCT_MODEL
from steps.common.training import TRAINING_ERRORS, train_config_from

STAGE = "finetune_instruct"
EXPERIMENT = "instruction-sft"
CACHE_DIR = Path(".cache/finetune_instruct")


class FinetuneInstructParams(StrictModel):
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"  # the book: plain AdamW, no schedule
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = None  # the book does not clip
    mask_prompt: bool = False  # true: no loss on instruction/input tokens (book exercise 7.2)
    max_length: int | None = Field(None, ge=2)  # tokens per example; null: the model's context
    eval_every: int = Field(5, ge=0)
    eval_batches: int | None = Field(5, ge=1)
    checkpoint_every: int = Field(0, ge=0)  # optimizer steps between resumable states; 0: epochs
    sample_entries: int = Field(1, ge=0)  # validation prompts answered after each epoch (book: 1)
    sample_max_new_tokens: int = Field(50, ge=1)
    seed: int = 123
    device: str = "auto"


def load_split(path: Path) -> list[dict]:
    """A split written by build_instruction_dataset, its entries checked again (it is a dep)."""
    entries = load_entries(path)
    if not entries:
        raise DataError(f"{path}: no instruction entries")
    return entries


class SampleResponses(TrainCallback):
    """Answers a few validation prompts after each epoch and logs them to MLflow (and stdout)."""

    def __init__(self, tokenizer, entries: list[dict], max_new_tokens: int, style: str = "alpaca"):
        self.tokenizer, self.entries, self.max_new_tokens, self.style = tokenizer, entries, max_new_tokens, style

    def on_epoch_end(self, state: TrainState, model: nn.Module) -> None:
        if not self.entries:
            return
        import mlflow

        answers = generate_responses(model, self.tokenizer, self.entries, max_new_tokens=self.max_new_tokens,
                                     style=self.style)
        text = "\n\n".join(
            f"### Prompt:\n{prompt_text(e)}\n\n### Reference:\n{reference(e)}\n\n### Model:\n{answer}"
            for e, answer in zip(self.entries, answers)
        )
        print(f"\n--- sample responses after epoch {state.epoch + 1} ---\n{text}\n")
        mlflow.log_text(text, f"samples/epoch_{state.epoch + 1:02d}.md")


def instruct_signature():
    """An instruction (and optional input) in; the response out; generation options per call."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "instruction"), ColSpec("string", "input", required=False)]),
        outputs=Schema([ColSpec("string", "response")]),
        params=ParamSchema([
            ParamSpec("max_new_tokens", "long", 128),
            ParamSpec("temperature", "double", 0.0),
            ParamSpec("top_k", "long", 0),
            ParamSpec("seed", "long", 123),
        ]),
    )


def finetune_instruct(
    params: FinetuneInstructParams,
    tokenizer_params: TokenizerParams,
    *,
    base_model: Path,
    data_dir: Path,
    out_dir: Path,
    metrics_out: Path,
    history_out: Path,
    plot_out: Path,
    cache_dir: Path,
    resume: bool = True,
) -> dict:
    """Fine-tune ``base_model`` on ``data_dir/train.json``; write the model, metrics and loss curve.

    Under torchrun every rank trains; only rank 0 logs and writes (the others return {}).
    """
    from steps.common.mlflow_models import log_code_model  # mlflow imports take seconds: not at import
    from steps.common.registry import register_candidate
    from steps.common.tracking import MlflowCallback, log_data_files, tag_trained_model

    train_entries = load_split(data_dir / "train.json")
    val_entries = load_split(data_dir / "validation.json")
    style = read_prompt_style(data_dir)
    tokenizer = get_tokenizer(tokenizer_params.encoding_dir)
    try:
        device = resolve_device(params.device)
    except ValueError as exc:
        raise ParamsError(f"{STAGE}.device: {exc}") from exc
    model = load_base_model(base_model).to(device)
    context = model.cfg.context_length
    max_length = min(params.max_length or context, context)
    collate = functools.partial(collate_instructions, max_length=max_length, mask_prompt=params.mask_prompt)
    config = train_config_from(params)
    # Everything a saved state depends on besides the TrainConfig: base weights, data, collation.
    state_dir = resume_state_dir(cache_dir, config.fingerprint(), {
        "base": sha256_file(base_model / "model.safetensors"),
        "train": sha256_file(data_dir / "train.json"),
        "val": sha256_file(data_dir / "validation.json"),
        "max_length": max_length, "mask_prompt": params.mask_prompt, "prompt_style": style,
    }, prune=is_main_process())
    samples = SampleResponses(tokenizer, val_entries[: params.sample_entries], params.sample_max_new_tokens, style)
    with stage_run_on_main(STAGE, EXPERIMENT, params) as run:
        if run is not None:
            import mlflow

            mlflow.log_params({"base_model": str(base_model), "max_length_effective": max_length,
                               "resolved_device": str(device)})
            log_data_files({split: data_dir / f"{split}.json" for split in ("train", "validation")})
        started = time.perf_counter()
        state = train(
            model, InstructionDataset(train_entries, tokenizer, style),
            InstructionDataset(val_entries, tokenizer, style),
            config, collate_fn=collate, callbacks=[MlflowCallback(), samples], state_dir=state_dir,
            resume=resume, fingerprint_extra=state_dir.name,
        )
        wall_time = time.perf_counter() - started
        if run is None:
            return {}
        save_checkpoint(model, out_dir, extra={"stage": STAGE, "base_model": str(base_model), "prompt_style": style})
        final = state.history[-1]
        metrics = {"train_loss": final["train_loss"], "val_loss": final["val_loss"],
                   "steps": state.step, "tokens_seen": state.tokens_seen}
        write_json(metrics_out, metrics)
        write_history_csv(history_out, state.history)
        plot_history(plot_out, state.history, steps_per_epoch=max(1, len(train_entries) // params.batch_size))
        mlflow.log_params({"steps": state.step, "tokens_seen": state.tokens_seen, "wall_time_s": round(wall_time, 1)})
        mlflow.log_artifact(str(plot_out), "plots")
        info = log_code_model(
            "instruct_model", "instruct.py", out_dir,
            encoding_dir=tokenizer_params.encoding_dir or os.environ.get(ENCODING_DIR_ENV),
            signature=instruct_signature(),
            input_example=pd.DataFrame([as_instruction(e) for e in val_entries[:2]]),
        )
        tag_trained_model(out_dir, info)
        register_candidate(info.model_uri, INSTRUCT_MODEL)
    shutil.rmtree(cache_dir, ignore_errors=True)  # the model is written: nothing left to resume
    return {**metrics, "wall_time_s": wall_time}


def main(argv: list[str] | None = None) -> None:
    def body(args, params: StageParams) -> str | None:
        setup_distributed("steps.finetune_instruct", args.params, argv)  # under torchrun when params ask for processes
        base = args.base or Path(params.section("base_model", BaseModelParams).dir)
        metrics = finetune_instruct(
            params.section(STAGE, FinetuneInstructParams), params.section("tokenizer", TokenizerParams),
            base_model=base, data_dir=args.data, out_dir=args.out, metrics_out=args.metrics,
            history_out=args.history, plot_out=args.plot, cache_dir=args.cache, resume=not args.restart,
        )
        if not metrics:  # another rank of a torchrun
            return None
        return (f"{metrics['steps']} steps in {metrics['wall_time_s']:.0f} s, train loss "
                f"{metrics['train_loss']:.3f}, val loss {metrics['val_loss']:.3f} -> {args.out}")

    run_stage(STAGE, "Fine-tune the base model to follow instructions (book chapter 7).", body, argv=argv,
              errors=TRAINING_ERRORS, options=restart_option, paths={
                  "base": (None, "base llmcore checkpoint (default: params base_model.dir)"),
                  "data": "data/instructions", "out": "models/instruct",
                  "metrics": "reports/finetune_instruct.json", "history": "plots/instruct_training.csv",
                  "plot": "plots/instruct_training_loss.png",
                  "cache": (str(CACHE_DIR), "resumable training states"),
              })


if __name__ == "__main__":
    main()
