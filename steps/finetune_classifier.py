"""Fine-tune a pretrained GPT as a spam classifier (book chapter 6) and register it in MLflow.

The base model (``classifier_base.dir``: the own pretrained model, the same adapted to the task's
text by adapt_pretrain, or GPT-2's weights) gets a head with one output per class of the data
(``labels.json``: ham/spam by default); ``llmcore.train.train`` — the one training loop — runs
with a cross-entropy loss on the chosen position's logits and logs train/val loss and accuracy to
MLflow. The state
under ``.cache/finetune_classifier/<settings key>/`` (outside DVC's outputs) lets an interrupted
run resume; it is deleted once the classifier is written. The classifier is logged as an MLflow pyfunc
(``llmpipe/mlflow_models/spam_classifier.py``) and registered as a new ``spam-classifier``
version with alias ``candidate`` (score_spam moves ``champion``), so
``mlflow models serve -m models:/spam-classifier@champion`` answers ``text`` → ``label``,
``spam_probability`` (``<label>_probability`` per class for more than two).
A Hugging Face base (load_base's ``models/base``) gets the same head on its hidden states
(``llmcore.classifier.DecoderClassifier``), its own tokenizer (params ``tokenizer.*`` do not
apply) padding with its eos id, and the classifier carries the tokenizer files.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from pydantic import Field

from llmcore.classifier import (
    TRAINABLE_MODES,
    GPTClassifier,
    SpamDataset,
    classification_accuracy,
    classification_loss,
    classifier_from_base,
    collate_for,
    probability_columns,
    save_classifier,
    set_trainable,
)
from llmcore.hf_checkpoint import copy_tokenizer_files
from llmcore.hf_tokenizer import TokenizerConfigError
from llmcore.lora import merge_lora
from llmcore.tokenizer import eot_id, get_tokenizer
from llmpipe.cli import StageParams, restart_option, run_stage
from llmpipe.data import LABELS_FILE, TokenizerParams
from llmpipe.distributed import setup_distributed
from llmpipe.io import sha256_file
from llmpipe.models import BaseModelParams, LoraParams, base_tokenizer, is_decoder_base, load_base_model
from llmpipe.registry import SPAM_CLASSIFIER
from llmpipe.training import (
    TRAINING_ERRORS,
    Pyfunc,
    TrainingJob,
    TrainingOutputs,
    TrainParams,
    run_training,
    stage_device,
)
from steps.data.datasets import read_splits

STAGE = "finetune_classifier"
EXPERIMENT = SPAM_CLASSIFIER  # the experiment is named after the model it registers
CACHE_DIR = Path(".cache/finetune_classifier")
STEP_LOG_EVERY = 5  # optimizer steps between MLflow step-loss points (each is a database write)


class FinetuneClassifierParams(TrainParams):
    trainable: Literal[TRAINABLE_MODES]  # llmcore.classifier.set_trainable's modes
    lora: LoraParams
    token_position: Literal["last", "flexible", "mean"]
    max_length: int | None = Field(ge=1)  # None: the longest training message (capped at the context)
    drop_rate: float | None = Field(ge=0, lt=1)  # None: the base model's


def save_trained_classifier(model: GPTClassifier, out_dir: Path, base_dir: Path | None = None) -> None:
    """LoRA merged, the classifier written; ``base_dir`` (a Hugging Face base): its tokenizer files too."""
    merge_lora(model)  # LoRA's adapters folded into the weights: the saved classifier is a plain one
    files = None if base_dir is None else (lambda tmp: copy_tokenizer_files(base_dir, tmp))
    save_classifier(model.cpu(), out_dir, files=files)


def classifier_signature(labels: list[str]):
    """Texts in; a label and the class probabilities (the spam probability for spam) out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    probabilities = [ColSpec("double", name) for name, _ in probability_columns(labels)]
    return ModelSignature(
        inputs=Schema([ColSpec("string", "text")]),
        outputs=Schema([ColSpec("string", "label"), *probabilities]),
    )


def classification_datasets(train_df, val_df, tokenizer, max_length: int | None, context_length: int):
    """The train and validation splits as token ids padded to one length: ``max_length``, or the longest
    training text's (capped at the model's context); validation is padded or cut to the same length."""
    train_data = SpamDataset(
        train_df["Text"].tolist(),
        train_df["Label"].tolist(),
        tokenizer,
        max_length=max_length,
        context_length=context_length,
        pad_id=eot_id(tokenizer),
    )
    val_data = SpamDataset(
        val_df["Text"].tolist(),
        val_df["Label"].tolist(),
        tokenizer,
        max_length=train_data.max_length,
        pad_id=eot_id(tokenizer),
    )
    return train_data, val_data


def finetune_classifier(
    params: FinetuneClassifierParams,
    *,
    base_dir: Path,
    data_dir: Path,
    out_dir: Path,
    metrics_out: Path,
    history_out: Path,
    plots_dir: Path,
    tokenizer_params: TokenizerParams,
    cache_dir: Path = CACHE_DIR,
    resume: bool = True,
) -> dict:
    """Train, write the classifier, metrics, history and plots, and log + register it in MLflow."""
    labels, (train_df, val_df) = read_splits(data_dir, ("train", "validation"))
    overrides = {} if params.drop_rate is None else {"drop_rate": params.drop_rate}
    hf_base = is_decoder_base(base_dir)  # a Hugging Face base: its own tokenizer, a head on its hidden states
    if hf_base:
        tokenizer = base_tokenizer(base_dir, tokenizer_params.source, STAGE, chat=False)
        base = load_base_model(base_dir, decoder_ok=True, **overrides)
    else:
        tokenizer = get_tokenizer(tokenizer_params.directory)
        base = load_base_model(base_dir, tokenizer, **overrides)
    train_data, val_data = classification_datasets(
        train_df, val_df, tokenizer, params.max_length, base.cfg.context_length
    )
    torch.manual_seed(params.seed)  # the new head's (and LoRA's) initialisation
    model = classifier_from_base(
        base,
        len(labels),
        labels=labels,
        token_position=params.token_position,
        max_length=train_data.max_length,
        pad_id=eot_id(tokenizer),
    )
    n_trainable = set_trainable(model, params.trainable, lora_rank=params.lora.rank, lora_alpha=params.lora.alpha)
    model.to(stage_device(STAGE, params))
    job = TrainingJob(
        stage=STAGE,
        experiment=EXPERIMENT,
        registered_model=SPAM_CLASSIFIER,
        params=params,
        model=model,
        train_data=train_data,
        val_data=val_data,
        data_files={split: data_dir / f"{split}.csv" for split in ("train", "validation")},
        save=functools.partial(save_trained_classifier, base_dir=base_dir if hf_base else None),
        pyfunc=Pyfunc(
            "spam_classifier",
            "spam_classifier.py",
            classifier_signature(labels),
            pd.DataFrame({"text": val_df["Text"].head(2).tolist()}),
        ),
        loss_fn=classification_loss,
        eval_fn=classification_accuracy,
        collate_fn=collate_for(model),
        resume_settings={
            "base": sha256_file(base_dir / "model.safetensors"),
            "labels": sha256_file(data_dir / LABELS_FILE),
        },
        run_params={
            "base_model": str(base_dir),
            "trainable_parameters": n_trainable,
            "max_length_tokens": train_data.max_length,
        },
        final_keys=("train_loss", "val_loss", "train_accuracy", "val_accuracy"),
        extra_metrics={"trainable_parameters": n_trainable, "max_length": train_data.max_length},
        step_log_every=STEP_LOG_EVERY,
    )
    plots = {metric: plots_dir / f"spam_training_{metric}.png" for metric in ("loss", "accuracy")}
    out = TrainingOutputs(out_dir, metrics_out, history_out, plots, cache_dir)
    return run_training(job, out, encoding_dir=tokenizer_params.directory, resume=resume)


def main(argv: list[str] | None = None) -> None:
    def body(args, params: StageParams) -> str | None:
        setup_distributed(
            "steps.finetune_classifier", args.params, argv
        )  # under torchrun when params ask for processes
        base_dir = args.base or Path(params.section("classifier_base", BaseModelParams).dir)
        metrics = finetune_classifier(
            params.section(STAGE, FinetuneClassifierParams),
            base_dir=base_dir,
            data_dir=args.data,
            out_dir=args.out,
            metrics_out=args.metrics,
            history_out=args.history,
            plots_dir=args.plots,
            tokenizer_params=params.section("tokenizer", TokenizerParams),
            cache_dir=args.cache,
            resume=not args.restart,
        )
        if not metrics:  # another rank of a torchrun
            return None
        return (
            f"val accuracy {metrics['val_accuracy']:.4f} (last eval), "
            f"{SPAM_CLASSIFIER} version {metrics['registered_version']} (@candidate) -> {args.out}"
        )

    run_stage(
        STAGE,
        "Fine-tune a pretrained GPT as a spam classifier (book chapter 6).",
        body,
        argv=argv,
        errors=(*TRAINING_ERRORS, TokenizerConfigError),
        options=restart_option,
        paths={
            "base": (None, "base llmcore checkpoint (default: params classifier_base.dir)"),
            "data": "the labelled splits",
            "out": "the classifier checkpoint",
            "metrics": "training figures",
            "history": "the loss/accuracy history (CSV)",
            "plots": "where the loss/accuracy PNGs go",
            "cache": (str(CACHE_DIR), "resumable training states"),
        },
    )


if __name__ == "__main__":
    main()
