"""Instruction fine-tuning (book chapter 7): the base model learns to answer prompts in a style.

The entries (Alpaca-style or chats) are rendered in the prompt style of ``data/instructions``
(``meta.json``: ``alpaca`` by default), which the checkpoint records for scoring and serving.
A Hugging Face base (load_base's ``models/base``: Llama 3.2 / Qwen3 / Gemma 3) is fine-tuned with
its own tokenizer in its own chat template instead (style ``template``; params ``tokenizer.*`` do
not apply), and its tokenizer files travel with the model, the template's end-of-turn token as
their eos token. ``lora: {rank, alpha}`` trains LoRA adapters on the blocks' Linear layers only
(book appendix E), merged into the weights before saving.

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
import torch
from pydantic import Field
from torch import nn

from llmcore.checkpoint import save_checkpoint
from llmcore.hf_tokenizer import TokenizerConfigError
from llmcore.instruct import (
    TEMPLATE,
    ChatTemplateError,
    InstructionDataset,
    answers_cut_off,
    collate_instructions,
    end_id,
    generate_responses,
    render_template_entry,
)
from llmcore.lora import apply_lora, merge_lora
from llmcore.prompts import as_instruction, prompt_text, reference
from llmcore.tokenizer import get_tokenizer
from llmcore.train import TrainCallback, TrainState
from llmpipe.cli import StageParams, restart_option, run_stage
from llmpipe.data import DataError, TokenizerParams
from llmpipe.distributed import setup_distributed
from llmpipe.io import sha256_file
from llmpipe.mlflow_models import instruct_signature
from llmpipe.models import (
    BaseModelSectionParams,
    LoraParams,
    base_tokenizer,
    bundle_base_tokenizer,
    is_decoder_base,
    load_base_model,
)
from llmpipe.params import ParamsError
from llmpipe.registry import INSTRUCT_EXPERIMENT, INSTRUCT_MODEL
from llmpipe.training import (
    TRAINING_ERRORS,
    Pyfunc,
    TrainingJob,
    TrainingOutputs,
    TrainParams,
    run_training,
    stage_device,
)
from steps.data.datasets import load_entries, read_prompt_style

STAGE = "finetune_instruct"
EXPERIMENT = INSTRUCT_EXPERIMENT
CACHE_DIR = Path(".cache/finetune_instruct")


class FinetuneInstructParams(TrainParams):
    mask_prompt: bool  # true: no loss on instruction/input tokens (book exercise 7.2)
    max_length: int | None = Field(ge=2)  # tokens per example; null: the model's context
    sample_entries: int = Field(ge=0)  # validation prompts answered after each epoch (book: 1)
    sample_max_new_tokens: int = Field(ge=1)
    lora: LoraParams | None  # null: every weight trains; {rank, alpha}: LoRA adapters only, merged when saved


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

    def shown(self, entry: dict) -> str:
        """The prompt as the model saw it in a chat template, else as a person reads it."""
        return render_template_entry(self.tokenizer, entry)[0] if self.style == TEMPLATE else prompt_text(entry)

    def on_epoch_end(self, state: TrainState, model: nn.Module) -> None:
        if not self.entries:
            return
        import mlflow

        answers = generate_responses(
            model, self.tokenizer, self.entries, max_new_tokens=self.max_new_tokens, style=self.style
        )
        text = "\n\n".join(
            f"### Prompt:\n{self.shown(e)}\n\n### Reference:\n{reference(e)}\n\n### Model:\n{answer}"
            for e, answer in zip(self.entries, answers)
        )
        print(f"\n--- sample responses after epoch {state.epoch + 1} ---\n{text}\n")
        mlflow.log_text(text, f"samples/epoch_{state.epoch + 1:02d}.md")


def with_lora(model: nn.Module, params: FinetuneInstructParams) -> int:
    """LoRA adapters on the blocks' Linear layers when params ask (seeded); the trainable parameter count."""
    if params.lora is not None:
        torch.manual_seed(params.seed)  # the adapters' initialisation
        apply_lora(model, params.lora.rank, params.lora.alpha)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_instruct_model(model: nn.Module, out: Path, *, base_model: Path, style: str, end_token: str | None) -> None:
    """LoRA merged into the weights, the checkpoint written with its prompt style; a Hugging Face
    base's tokenizer files travel with it (the end-of-turn token as eos: ``bundle_base_tokenizer``)."""
    merge_lora(model)
    files = None if end_token is None else (lambda tmp: bundle_base_tokenizer(base_model, tmp, end_token))
    save_checkpoint(
        model, out, extra={"stage": STAGE, "base_model": str(base_model), "prompt_style": style}, files=files
    )


def finetune_instruct(
    params: FinetuneInstructParams,
    *,
    tokenizer_params: TokenizerParams,
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
    if is_decoder_base(base_model):  # a Hugging Face base: its own tokenizer and chat template
        tokenizer, style = base_tokenizer(base_model, tokenizer_params.source, STAGE), TEMPLATE
        model = load_base_model(base_model, decoder_ok=True)
    else:
        tokenizer, style = get_tokenizer(tokenizer_params.directory), read_prompt_style(data_dir)
        model = load_base_model(base_model, tokenizer)
    n_trainable = with_lora(model, params)
    model.to(stage_device(STAGE, params))
    max_length = min(params.max_length or model.cfg.context_length, model.cfg.context_length)
    end = end_id(tokenizer, style)  # the answer's last target: <|endoftext|>, or the template's end of turn
    train_data = InstructionDataset(train_entries, tokenizer, style)
    if params.mask_prompt and answers_cut_off(train_data.examples, max_length) == len(train_data) > 0:
        raise ParamsError(
            f"{STAGE}.max_length: every training prompt fills the {max_length} tokens (max_length or the "
            "base's context), no answer token is left to learn; raise them (a trained tokenizer's prompts "
            "take more tokens than GPT-2's)"
        )
    job = TrainingJob(
        stage=STAGE,
        experiment=EXPERIMENT,
        registered_model=INSTRUCT_MODEL,
        params=params,
        model=model,
        train_data=train_data,
        val_data=InstructionDataset(val_entries, tokenizer, style),
        data_files={split: data_dir / f"{split}.json" for split in ("train", "validation")},
        save=functools.partial(
            save_instruct_model,
            base_model=base_model,
            style=style,
            end_token=tokenizer.decode([end], skip_special_tokens=False) if style == TEMPLATE else None,
        ),
        pyfunc=Pyfunc(
            "instruct_model",
            "instruct.py",
            instruct_signature(),
            pd.DataFrame([as_instruction(e) for e in val_entries[:2]]),
        ),
        collate_fn=functools.partial(
            collate_instructions, max_length=max_length, mask_prompt=params.mask_prompt, pad_id=end
        ),
        callbacks=[
            SampleResponses(tokenizer, val_entries[: params.sample_entries], params.sample_max_new_tokens, style)
        ],
        resume_settings={
            "base": sha256_file(base_model / "model.safetensors"),
            "max_length": max_length,
            "prompt_style": style,
        },
        run_params={
            "base_model": str(base_model),
            "max_length_effective": max_length,
            "prompt_style": style,
            "trainable_parameters": n_trainable,
        },
        extra_metrics={"trainable_parameters": n_trainable},
    )
    out = TrainingOutputs(out_dir, metrics_out, history_out, {"loss": plot_out}, cache_dir)
    return run_training(job, out, encoding_dir=tokenizer_params.directory, resume=resume)


def main(argv: list[str] | None = None) -> None:
    def body(args, params: StageParams) -> str | None:
        setup_distributed("steps.finetune_instruct", args.params, argv)  # under torchrun when params ask for processes
        base = args.base or Path(params.section("base_model", BaseModelSectionParams).dir)
        metrics = finetune_instruct(
            params.section(STAGE, FinetuneInstructParams),
            tokenizer_params=params.section("tokenizer", TokenizerParams),
            base_model=base,
            data_dir=args.data,
            out_dir=args.out,
            metrics_out=args.metrics,
            history_out=args.history,
            plot_out=args.plot,
            cache_dir=args.cache,
            resume=not args.restart,
        )
        if not metrics:  # another rank of a torchrun
            return None
        return (
            f"{metrics['steps']} steps in {metrics['wall_time_s']:.0f} s, train loss "
            f"{metrics['train_loss']:.3f}, val loss {metrics['val_loss']:.3f} -> {args.out}"
        )

    run_stage(
        STAGE,
        "Fine-tune the base model to follow instructions (book chapter 7).",
        body,
        argv=argv,
        errors=(*TRAINING_ERRORS, TokenizerConfigError, ChatTemplateError),
        options=restart_option,
        paths={
            "base": (None, "base llmcore checkpoint (default: params base_model.dir)"),
            "data": "the instruction splits",
            "out": "the instruction model",
            "metrics": "training figures",
            "history": "the loss history (CSV)",
            "plot": "the loss plot",
            "cache": (str(CACHE_DIR), "resumable training states"),
        },
    )


if __name__ == "__main__":
    main()
