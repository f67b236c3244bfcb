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
from pathlib import Path

import pandas as pd
from pydantic import Field
from torch import nn

from llmcore.checkpoint import save_checkpoint
from llmcore.instruct import InstructionDataset, answers_cut_off, collate_instructions, generate_responses
from llmcore.prompts import as_instruction, prompt_text, reference
from llmcore.tokenizer import eot_id, get_tokenizer
from llmcore.train import TrainCallback, TrainState
from steps.common.cli import StageParams, restart_option, run_stage
from steps.common.data import DataError, TokenizerParams
from steps.common.datasets import load_entries, read_prompt_style
from steps.common.distributed import setup_distributed
from steps.common.io import sha256_file
from steps.common.mlflow_models import instruct_signature
from steps.common.models import BaseModelSectionParams, load_base_model
from steps.common.params import ParamsError
from steps.common.registry import INSTRUCT_MODEL
from steps.common.training import TRAINING_ERRORS, Pyfunc, TrainingJob, TrainingOutputs, TrainParams, run_training, \
    stage_device

STAGE = "finetune_instruct"
EXPERIMENT = "instruction-sft"
CACHE_DIR = Path(".cache/finetune_instruct")


class FinetuneInstructParams(TrainParams):
    mask_prompt: bool = False  # true: no loss on instruction/input tokens (book exercise 7.2)
    max_length: int | None = Field(None, ge=2)  # tokens per example; null: the model's context
    sample_entries: int = Field(1, ge=0)  # validation prompts answered after each epoch (book: 1)
    sample_max_new_tokens: int = Field(50, ge=1)


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
    """Fine-tune ``base_model`` on ``data_dir/train.json``; write the model, metrics and loss curve."""
    train_entries = load_split(data_dir / "train.json")
    val_entries = load_split(data_dir / "validation.json")
    style = read_prompt_style(data_dir)
    tokenizer = get_tokenizer(tokenizer_params.directory)
    model = load_base_model(base_model, tokenizer).to(stage_device(STAGE, params))
    max_length = min(params.max_length or model.cfg.context_length, model.cfg.context_length)
    train_data = InstructionDataset(train_entries, tokenizer, style)
    if params.mask_prompt and answers_cut_off(train_data.examples, max_length) == len(train_data) > 0:
        raise ParamsError(f"{STAGE}.max_length: every training prompt fills the {max_length} tokens (max_length or the "
                          "base's context), no answer token is left to learn; raise them (a trained tokenizer's prompts "
                          "take more tokens than GPT-2's)")
    job = TrainingJob(
        stage=STAGE, experiment=EXPERIMENT, registered_model=INSTRUCT_MODEL, params=params, model=model,
        train_data=train_data, val_data=InstructionDataset(val_entries, tokenizer, style),
        data_files={split: data_dir / f"{split}.json" for split in ("train", "validation")},
        save=lambda trained, out: save_checkpoint(trained, out, extra={"stage": STAGE, "base_model": str(base_model),
                                                                        "prompt_style": style}),
        pyfunc=Pyfunc("instruct_model", "instruct.py", instruct_signature(),
                      pd.DataFrame([as_instruction(e) for e in val_entries[:2]])),
        collate_fn=functools.partial(collate_instructions, max_length=max_length, mask_prompt=params.mask_prompt,
                                     pad_id=eot_id(tokenizer)),
        callbacks=[SampleResponses(tokenizer, val_entries[: params.sample_entries], params.sample_max_new_tokens,
                                   style)],
        resume_settings={"base": sha256_file(base_model / "model.safetensors"), "max_length": max_length,
                         "prompt_style": style},
        run_params={"base_model": str(base_model), "max_length_effective": max_length},
    )
    out = TrainingOutputs(out_dir, metrics_out, history_out, {"loss": plot_out}, cache_dir)
    return run_training(job, out, encoding_dir=tokenizer_params.directory, resume=resume)


def main(argv: list[str] | None = None) -> None:
    def body(args, params: StageParams) -> str | None:
        setup_distributed("steps.finetune_instruct", args.params, argv)  # under torchrun when params ask for processes
        base = args.base or Path(params.section("base_model", BaseModelSectionParams).dir)
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
