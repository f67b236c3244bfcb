"""Domain-adaptive pretraining: continue pretraining the base model on the task's unlabeled text.

A base pretrained on a novel knows nothing of SMS. This stage continues its next-token training
on the classification task's own text, before the fine-tune: the training split's messages and,
with ``corpus.discarded``, the texts of the source that no split holds (build_spam_dataset's
``discarded.csv``: for the SMS data the 4,080 ham messages the balanced split drops). No
validation or test text reaches the corpus: a message is left out when it equals one of them
after whitespace and case are normalised, even if the training split holds it too. The corpus
(``data/adapt/{train,val}.json``: unique messages, seeded shuffle, ``corpus.val_frac`` held out
for the language model's own validation loss) is an output, so what the model read can be checked.

Messages are tokenised, each ended by ``<|endoftext|>``, concatenated and cut into windows of the
base model's context. With ``loss_vocab: corpus`` the softmax runs over the token ids the corpus
uses (about 9k of GPT-2's 50,257 for the SMS data): the vocabulary head dominates a small
model's cost, so this trains several times faster on a CPU, and ids the corpus never uses (never
a target) only lose their share of the normaliser. The losses reported are then over that
vocabulary. ``full``: the whole vocabulary, as pretrain. The training itself is
``llmpipe.training.run_training`` (resumable, MLflow run, ``adapted-gpt`` @candidate); the
weights go to ``models/adapted``, a plain llmcore checkpoint that ``classifier_base.dir`` selects.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from llmcore.checkpoint import read_checkpoint_meta, save_checkpoint
from llmcore.data import SlidingWindowDataset
from llmcore.model import IGNORE_INDEX, GPTModel, head_cross_entropy
from llmcore.prompts import checkpoint_prompt_style
from llmcore.tokenizer import encode, eot_id, get_tokenizer
from llmpipe.cli import StageParams, restart_option, run_stage
from llmpipe.data import DataError, TokenizerParams
from llmpipe.distributed import setup_distributed
from llmpipe.io import atomic_path, sha256_file, write_json
from llmpipe.mlflow_models import generator_signature
from llmpipe.models import BaseModelSectionParams, load_base_model
from llmpipe.params import ParamsError, StrictModel
from llmpipe.registry import ADAPT_EXPERIMENT, ADAPTED_MODEL
from llmpipe.training import (
    TRAINING_ERRORS,
    Pyfunc,
    TrainingJob,
    TrainingOutputs,
    TrainParams,
    run_training,
    stage_device,
)
from steps.data.datasets import read_discarded, read_splits

STAGE = "adapt_pretrain"
EXPERIMENT = ADAPT_EXPERIMENT
CACHE_DIR = Path(".cache/adapt_pretrain")
HELD_OUT = ("validation", "test")
STEP_LOG_EVERY = 10  # optimizer steps between MLflow step-loss points: ~1,600 steps, each point a database write


class CorpusParams(StrictModel):
    discarded: bool  # add the texts no split holds (build_spam_dataset's discarded.csv)
    val_frac: float = Field(gt=0, lt=1)  # messages held out for the language model's val loss
    seed: int  # the shuffle of the messages before the cut


class AdaptPretrainParams(TrainParams):
    corpus: CorpusParams
    window_length: int | None = Field(ge=1)  # tokens per window (at most the base's context); null: the context
    stride: int | None = Field(ge=1)  # tokens between window starts; null: the window length (no overlap)
    loss_vocab: Literal["corpus", "full"]  # softmax over the corpus's token ids, or all of them


def text_key(text: str) -> str:
    """What two messages must share to count as the same text: whitespace and case normalised."""
    return " ".join(text.split()).casefold()


def build_corpus(data_dir: Path, params: CorpusParams) -> tuple[dict[str, list[str]], dict]:
    """The unlabeled corpus split for the language model ({"train", "val"}) and its counts.

    Validation and test texts (``data_dir/{validation,test}.csv``) are excluded wherever they occur.
    """
    _, (train, *held_out_splits) = read_splits(data_dir, ("train", *HELD_OUT))
    held_out = {text_key(text) for split in held_out_splits for text in split["Text"]}
    candidates = {
        "train_split": train["Text"].tolist(),
        "discarded": read_discarded(data_dir) if params.discarded else [],
    }
    seen: set[str] = set()
    messages: list[str] = []
    counts = {"held_out_texts": len(held_out)}
    for origin, texts in candidates.items():
        kept = excluded = 0
        for text in texts:
            key = text_key(text)
            if key in held_out:
                excluded += 1
            elif key and key not in seen:
                seen.add(key)
                messages.append(text)
                kept += 1
        counts[f"{origin}_messages"], counts[f"{origin}_excluded_held_out"] = kept, excluded
    random.Random(params.seed).shuffle(messages)
    n_val = max(1, round(len(messages) * params.val_frac))
    if len(messages) - n_val < 1:
        raise DataError(f"the corpus has {len(messages)} message(s): too few to hold out a validation part")
    corpus = {"train": messages[n_val:], "val": messages[:n_val]}
    counts.update({f"{split}_messages": len(texts) for split, texts in corpus.items()})
    return corpus, counts


def tokenize_corpus(texts: list[str], tokenizer) -> np.ndarray:
    """Every message's tokens followed by ``<|endoftext|>``, concatenated."""
    ids = [token for text in texts for token in (*encode(tokenizer, text), eot_id(tokenizer))]
    return np.asarray(ids, dtype=np.int64)


class CorpusVocabLoss:
    """Next-token cross-entropy with the softmax over ``vocab`` (sorted token ids) only: the head's
    rows of those ids, the targets renumbered into them (a ``loss_fn`` for llmcore.train)."""

    def __init__(self, vocab: np.ndarray, vocab_size: int):
        self.vocab = torch.as_tensor(np.unique(vocab), dtype=torch.long)
        self.position = torch.full((vocab_size,), IGNORE_INDEX, dtype=torch.long)
        self.position[self.vocab] = torch.arange(len(self.vocab))

    def __call__(self, model: GPTModel, batch) -> torch.Tensor:
        inputs, targets = batch[0], batch[1]
        hidden = model.hidden_states(inputs)
        device = hidden.device
        if self.vocab.device != device:
            self.vocab, self.position = self.vocab.to(device), self.position.to(device)
        renumbered = torch.where(targets == IGNORE_INDEX, IGNORE_INDEX, self.position[targets.clamp(min=0)])
        if bool((renumbered[targets != IGNORE_INDEX] == IGNORE_INDEX).any()):
            raise ValueError("a target token is outside the corpus vocabulary")
        return head_cross_entropy(hidden, model.out_head.weight[self.vocab], renumbered)


def windows(ids: np.ndarray, context: int, stride: int, split: str) -> SlidingWindowDataset:
    if len(ids) < context + 1:
        raise DataError(
            f"the corpus's {split} part has {len(ids)} tokens: one window of the base model's "
            f"context ({context}) needs {context + 1}; lower corpus.val_frac or add text"
        )
    return SlidingWindowDataset(ids, context, stride)


def write_corpus(corpus_dir: Path, corpus: dict[str, list[str]]) -> dict[str, Path]:
    with atomic_path(corpus_dir, is_dir=True) as tmp:
        for split, texts in corpus.items():
            write_json(tmp / f"{split}.json", texts)
    return {split: corpus_dir / f"{split}.json" for split in corpus}


def adapt_pretrain(
    params: AdaptPretrainParams,
    *,
    base_dir: Path,
    data_dir: Path,
    corpus_dir: Path,
    out: TrainingOutputs,
    tokenizer_params: TokenizerParams,
    resume: bool = True,
) -> dict:
    """Build the corpus, continue pretraining ``base_dir`` on it, write ``out`` and log the run."""
    corpus, counts = build_corpus(data_dir, params.corpus)
    files = write_corpus(corpus_dir, corpus)
    tokenizer = get_tokenizer(tokenizer_params.directory)
    ids = {split: tokenize_corpus(texts, tokenizer) for split, texts in corpus.items()}
    base = load_base_model(base_dir, tokenizer)
    # Still prompted as its base is: the text continued, or a Hugging Face base's chat template.
    extra = {
        "stage": STAGE,
        "base_model": str(base_dir),
        "prompt_style": checkpoint_prompt_style(read_checkpoint_meta(base_dir)),
    }
    context = params.window_length or base.cfg.context_length
    if context > base.cfg.context_length:
        raise ParamsError(
            f"{STAGE}.window_length: {context} is longer than the base model's context ({base.cfg.context_length})"
        )
    data = {split: windows(split_ids, context, params.stride or context, split) for split, split_ids in ids.items()}
    loss_fn = (
        CorpusVocabLoss(np.concatenate(list(ids.values())), base.cfg.padded_vocab_size)
        if params.loss_vocab == "corpus"
        else None
    )
    counts.update({f"{split}_tokens": int(len(split_ids)) for split, split_ids in ids.items()})
    counts["loss_vocab_size"] = len(loss_fn.vocab) if loss_fn is not None else base.cfg.vocab_size
    base.to(stage_device(STAGE, params))
    job = TrainingJob(
        stage=STAGE,
        experiment=EXPERIMENT,
        registered_model=ADAPTED_MODEL,
        params=params,
        model=base,
        train_data=data["train"],
        val_data=data["val"],
        data_files=files,
        save=lambda trained, path: save_checkpoint(trained, path, extra=extra),
        pyfunc=Pyfunc("generator", "generator.py", generator_signature()),
        **({"loss_fn": loss_fn} if loss_fn is not None else {}),
        resume_settings={"base": sha256_file(base_dir / "model.safetensors")},
        run_params={"base_model": str(base_dir), **{f"corpus_{k}": v for k, v in counts.items()}},
        extra_metrics={"corpus": counts},
        step_log_every=STEP_LOG_EVERY,
    )
    return run_training(job, out, encoding_dir=tokenizer_params.directory, resume=resume)


def main(argv: list[str] | None = None) -> None:
    def body(args, params: StageParams) -> str | None:
        setup_distributed("steps.adapt_pretrain", args.params, argv)  # under torchrun when params ask for processes
        base_dir = args.base or Path(params.section("base_model", BaseModelSectionParams).dir)
        out = TrainingOutputs(args.out, args.metrics, args.history, {"loss": args.plot}, args.cache)
        metrics = adapt_pretrain(
            params.section(STAGE, AdaptPretrainParams),
            base_dir=base_dir,
            data_dir=args.data,
            corpus_dir=args.corpus,
            out=out,
            tokenizer_params=params.section("tokenizer", TokenizerParams),
            resume=not args.restart,
        )
        if not metrics:  # another rank of a torchrun
            return None
        corpus = metrics["corpus"]
        return (
            f"{corpus['train_messages']} messages ({corpus['train_tokens']} tokens), val loss "
            f"{metrics['val_loss']:.3f} over {corpus['loss_vocab_size']} token ids -> {args.out}"
        )

    run_stage(
        STAGE,
        "Continue pretraining the base model on the task's unlabeled text.",
        body,
        argv=argv,
        errors=TRAINING_ERRORS,
        options=restart_option,
        paths={
            "base": (None, "base llmcore checkpoint (default: params base_model.dir)"),
            "data": "the task's splits: train.csv's texts in, validation/test texts out",
            "corpus": "where the corpus is written",
            "out": "the adapted checkpoint",
            "metrics": "training figures",
            "history": "the loss history (CSV)",
            "plot": "the loss plot",
            "cache": (str(CACHE_DIR), "resumable training states"),
        },
    )


if __name__ == "__main__":
    main()
