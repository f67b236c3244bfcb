"""Preference tuning with DPO (the book's chapter 7 bonus, ``dpo-from-scratch``): the instruction
model learns to prefer the ``chosen`` answers of ``data/preferences`` over the ``rejected`` ones.

The policy starts from ``models/instruct``; a second, frozen copy of it is the reference. The loss
is ``llmcore.dpo``'s (beta in params) on the answers' tokens only (prompt and padding masked),
rendered in the prompt style the instruction model was trained in (its checkpoint's
``prompt_style``). The reference's log-probabilities of every pair are computed once, before
training (it never changes), and travel with the pairs. ``trainable: lora`` trains LoRA adapters
only (merged into the saved weights). The one training loop (``llmcore.train.train``) runs it, with
the precision/compile switches and the resumable state of the other trainers in
``.cache/preference_tune/<settings key>/``; every evaluation logs the DPO loss, the reward margin
and the reward and preference accuracies of the train and validation pairs to MLflow and the
history CSV. The model is saved like the instruction model (servable by ``llm serve --model
models/preference``) and registered as ``preference-gpt`` ``@candidate``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from pydantic import Field

from llmcore import precision as amp
from llmcore.checkpoint import read_checkpoint_meta, save_checkpoint
from llmcore.dpo import PreferencePair, collate_pairs, dpo_batch_loss, pair_logprobs, preference_metrics, with_reference
from llmcore.lora import apply_lora, merge_lora
from llmcore.model import GPTModel
from llmcore.prompts import as_instruction, checkpoint_prompt_style, preference_parts
from llmcore.tokenizer import eot_id, get_tokenizer
from llmpipe.cli import StageParams, restart_option, run_stage
from llmpipe.data import TokenizerParams
from llmpipe.distributed import setup_distributed
from llmpipe.io import sha256_file
from llmpipe.mlflow_models import instruct_signature
from llmpipe.models import LoraParams, load_base_model
from llmpipe.registry import PREFERENCE_EXPERIMENT, PREFERENCE_MODEL
from llmpipe.training import (
    TRAINING_ERRORS,
    Pyfunc,
    TrainingJob,
    TrainingOutputs,
    TrainParams,
    run_training,
    stage_device,
)
from steps.data.preferences import load_pairs

STAGE = "preference_tune"
EXPERIMENT = PREFERENCE_EXPERIMENT
CACHE_DIR = Path(".cache/preference_tune")
CURVES = ("loss", "reward_margin", "preference_accuracy")  # plotted from the history (train and val)
FINAL = ("loss", "reward_margin", "reward_accuracy", "preference_accuracy")


class PreferenceTuneParams(TrainParams):
    beta: float = Field(gt=0)  # DPO's beta: how far the policy may move from the reference
    max_length: int | None = Field(ge=2)  # tokens per completion with its prompt; null: the model's context
    trainable: Literal["all", "lora"]  # lora: adapters on the blocks' Linear layers only
    lora: LoraParams


def add_reference(
    pairs: list[PreferencePair], reference: GPTModel, params: PreferenceTuneParams, max_length: int, pad_id: int
) -> list[PreferencePair]:
    """The pairs carrying the frozen reference's log-probabilities (under the run's precision)."""
    device = next(reference.parameters()).device
    with amp.autocast(amp.resolve_precision(params.precision, device), device):
        chosen, rejected = pair_logprobs(
            reference, pairs, batch_size=params.batch_size, max_length=max_length, pad_id=pad_id
        )
    return with_reference(pairs, chosen, rejected)


def save_policy(model: GPTModel, out: Path, extra: dict) -> None:
    merge_lora(model)  # LoRA's adapters folded into the weights: the saved model is a plain GPT
    save_checkpoint(model, out, extra=extra)


def build_policy(instruct_dir: Path, params: PreferenceTuneParams, device: torch.device) -> tuple[GPTModel, int]:
    """The policy (all weights trainable, or LoRA adapters only) and its trainable parameter count."""
    model = load_base_model(instruct_dir)
    if params.trainable == "lora":
        torch.manual_seed(params.seed)  # the adapters' initialisation
        apply_lora(model, params.lora.rank, params.lora.alpha)
    model.to(device)
    return model, sum(p.numel() for p in model.parameters() if p.requires_grad)


def preference_tune(
    params: PreferenceTuneParams,
    *,
    tokenizer_params: TokenizerParams,
    instruct_dir: Path,
    data_dir: Path,
    out_dir: Path,
    metrics_out: Path,
    history_out: Path,
    plots_dir: Path,
    cache_dir: Path = CACHE_DIR,
    resume: bool = True,
) -> dict:
    """DPO of ``instruct_dir`` on ``data_dir``'s train split; writes the model, metrics, curves."""
    device = stage_device(STAGE, params)
    reference = load_base_model(instruct_dir).to(device).eval().requires_grad_(False)
    style = checkpoint_prompt_style(read_checkpoint_meta(instruct_dir))
    max_length = min(params.max_length or reference.cfg.context_length, reference.cfg.context_length)
    tokenizer = get_tokenizer(tokenizer_params.directory)
    (train_pairs, _, train_cut), (val_pairs, val_entries, val_cut) = (
        load_pairs(data_dir / f"{split}.json", tokenizer, style, max_length) for split in ("train", "validation")
    )
    train_pairs, val_pairs = (
        add_reference(p, reference, params, max_length, eot_id(tokenizer)) for p in (train_pairs, val_pairs)
    )
    del reference  # its log-probs are all it was needed for
    model, n_trainable = build_policy(instruct_dir, params, device)
    extra = {"stage": STAGE, "base_model": str(instruct_dir), "prompt_style": style, "beta": params.beta}
    job = TrainingJob(
        stage=STAGE,
        experiment=EXPERIMENT,
        registered_model=PREFERENCE_MODEL,
        params=params,
        model=model,
        train_data=train_pairs,
        val_data=val_pairs,
        data_files={split: data_dir / f"{split}.json" for split in ("train", "validation")},
        save=functools.partial(save_policy, extra=extra),
        pyfunc=Pyfunc(
            "instruct_model",
            "instruct.py",
            instruct_signature(),
            pd.DataFrame([as_instruction(preference_parts(e)[0]) for e in val_entries[:2]]),
        ),
        loss_fn=functools.partial(dpo_batch_loss, beta=params.beta),
        eval_fn=preference_metrics,
        collate_fn=functools.partial(collate_pairs, max_length=max_length, pad_id=eot_id(tokenizer)),
        resume_settings={
            "base": sha256_file(instruct_dir / "model.safetensors"),
            "max_length": max_length,
            "prompt_style": style,
        },
        run_params={
            "instruct_model": str(instruct_dir),
            "max_length_effective": max_length,
            "trainable_parameters": n_trainable,
            "prompt_style": style,
        },
        final_keys=tuple(f"{split}_{key}" for key in FINAL for split in ("train", "val")),
        extra_metrics={
            "train_pairs": len(train_pairs),
            "val_pairs": len(val_pairs),
            "pairs_prompt_cut": train_cut + val_cut,
            "trainable_parameters": n_trainable,
        },
    )
    plots = {curve: plots_dir / f"preference_training_{curve}.png" for curve in CURVES}
    out = TrainingOutputs(out_dir, metrics_out, history_out, plots, cache_dir)
    return run_training(job, out, encoding_dir=tokenizer_params.directory, resume=resume)


def main(argv: list[str] | None = None) -> None:
    def body(args, params: StageParams) -> str | None:
        setup_distributed("steps.preference_tune", args.params, argv)  # under torchrun when params ask for processes
        metrics = preference_tune(
            params.section(STAGE, PreferenceTuneParams),
            tokenizer_params=params.section("tokenizer", TokenizerParams),
            instruct_dir=args.instruct,
            data_dir=args.data,
            out_dir=args.out,
            metrics_out=args.metrics,
            history_out=args.history,
            plots_dir=args.plots,
            cache_dir=args.cache,
            resume=not args.restart,
        )
        if not metrics:  # another rank of a torchrun
            return None
        return (
            f"{metrics['steps']} steps, val DPO loss {metrics['val_loss']:.4f}, val reward margin "
            f"{metrics['val_reward_margin']:.4f}, val preference accuracy {metrics['val_preference_accuracy']:.3f}, "
            f"{PREFERENCE_MODEL} version {metrics['registered_version']} (@candidate) -> {args.out}"
        )

    run_stage(
        STAGE,
        "Preference-tune the instruction model with DPO (book chapter 7 bonus).",
        body,
        argv=argv,
        errors=TRAINING_ERRORS,
        options=restart_option,
        paths={
            "instruct": "the instruction model: policy start and frozen reference",
            "data": "the preference pairs",
            "out": "the DPO model",
            "metrics": "training figures",
            "history": "the loss/reward history (CSV)",
            "plots": "where the loss/reward-margin/accuracy PNGs go",
            "cache": (str(CACHE_DIR), "resumable training states"),
        },
    )


if __name__ == "__main__":
    main()
