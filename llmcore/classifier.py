"""A GPT text classifier (book chapter 6): the vocabulary head replaced by a small class head.

The model reads one position's final hidden state: ``"last"`` (the book) takes the last
position of the padded row, so every text is padded to the same length, the longest training
example; ``"flexible"`` takes each row's last real token, which has seen the whole message. With
causal attention that token never sees the padding after it, so a flexible batch may be padded
just to its own longest row and computes the same logits as fixed-length padding, much faster.
``"mean"`` averages the final hidden states of all real tokens: a bag of contextual token
features, which a small model trained from little data classifies better than any one position
(padded per batch like ``"flexible"``, for the same reason).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tiktoken
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from llmcore.checkpoint import (
    DECODER_FORMAT,
    CheckpointError,
    load_state_strict,
    read_checkpoint_meta,
    read_weights,
    save_checkpoint,
    unique_state_dict,
)
from llmcore.config import ConfigError, GPTConfig
from llmcore.decoder import DecoderModel
from llmcore.decoder_config import DecoderConfig
from llmcore.lora import apply_lora, has_lora
from llmcore.model import GPTModel
from llmcore.tokenizer import ENDOFTEXT_ID, encode

CLASSIFIER_FORMAT = "llmcore-gpt-classifier"
SPAM_LABELS = ("ham", "spam")  # class index 0, 1: the data's Label column
TOKEN_POSITIONS = ("last", "flexible", "mean")
TRAINABLE_MODES = ("last_layer", "last_block", "last_two_blocks", "all_but_embeddings", "all", "lora")


class ClassHead:
    """What a classifier adds to its model (GPTModel or DecoderModel): a head with one output per
    class that reads one position's final hidden state (or their mean)."""

    def _init_head(
        self, cfg, num_classes: int, labels: Sequence[str], token_position: str, pad_id: int, max_length: int | None
    ) -> None:
        if token_position not in TOKEN_POSITIONS:
            raise ValueError(f"token_position must be one of {TOKEN_POSITIONS}, got {token_position!r}")
        if len(labels) != num_classes:
            raise ValueError(f"{num_classes} classes need {num_classes} labels, got {list(labels)}")
        if max_length is not None and not 0 < max_length <= cfg.context_length:
            raise ValueError(f"max_length must be in [1, {cfg.context_length}] (the context), got {max_length}")
        self.out_head = nn.Linear(cfg.emb_dim, num_classes)  # replaces (unties) the vocabulary head
        self.num_classes, self.labels = num_classes, list(labels)
        self.token_position, self.pad_id, self.max_length = token_position, pad_id, max_length

    @classmethod
    def from_gpt(cls, gpt: nn.Module, num_classes: int = 2, **kwargs: Any):
        """A classifier with ``gpt``'s weights everywhere but the new, randomly initialised head."""
        model = cls(gpt.cfg, num_classes, **kwargs)
        state = {k: v for k, v in unique_state_dict(gpt).items() if not k.startswith("out_head.")}
        state.update({f"out_head.{k}": v for k, v in model.out_head.state_dict().items()})
        load_state_strict(model, state, "base model")
        return model.to(next(gpt.parameters()).device)

    def positions(self, idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Index of the position each row is classified by."""
        if self.token_position == "last":
            return torch.full((idx.shape[0],), idx.shape[1] - 1, dtype=torch.long, device=idx.device)
        if lengths is None:  # the last non-padding token; an all-padding row uses position 0
            steps = torch.arange(idx.shape[1], device=idx.device).expand_as(idx)
            return torch.where(idx != self.pad_id, steps, 0).amax(dim=1)
        return (lengths.to(idx.device) - 1).clamp(min=0)

    def real_tokens(self, idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, tokens) mask of the non-padding positions; without ``lengths``, ids != pad_id."""
        if lengths is None:
            return idx != self.pad_id
        return torch.arange(idx.shape[1], device=idx.device)[None, :] < lengths.to(idx.device)[:, None]

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (batch, num_classes); ``lengths`` (unpadded row lengths) serve ``"flexible"``
        and ``"mean"``."""
        hidden = self.hidden_states(idx)
        if self.token_position == "mean":
            mask = self.real_tokens(idx, lengths).unsqueeze(-1).to(hidden.dtype)
            return self.out_head((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0))
        chosen = hidden[torch.arange(idx.shape[0], device=idx.device), self.positions(idx, lengths)]
        return self.out_head(chosen)

    def classifier_meta(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "labels": self.labels,
            "token_position": self.token_position,
            "pad_id": self.pad_id,
            "max_length": self.max_length,
        }


class GPTClassifier(ClassHead, GPTModel):
    """GPTModel whose output head maps one position's hidden state to ``num_classes`` logits."""

    def __init__(
        self,
        cfg: GPTConfig,
        num_classes: int = 2,
        *,
        labels: Sequence[str] = SPAM_LABELS,
        token_position: str = "last",
        pad_id: int = ENDOFTEXT_ID,
        max_length: int | None = None,
    ):
        GPTModel.__init__(self, cfg)
        self._init_head(cfg, num_classes, labels, token_position, pad_id, max_length)


class DecoderClassifier(ClassHead, DecoderModel):
    """A Llama / Qwen3 / Gemma 3 decoder (``llmcore.decoder``) with the class head: the same
    positions as GPTClassifier (``"last"``, ``"flexible"``: each row's last real token, ``"mean"``)."""

    def __init__(
        self,
        cfg: DecoderConfig,
        num_classes: int = 2,
        *,
        labels: Sequence[str] = SPAM_LABELS,
        token_position: str = "last",
        pad_id: int = ENDOFTEXT_ID,
        max_length: int | None = None,
    ):
        DecoderModel.__init__(self, cfg)
        self._init_head(cfg, num_classes, labels, token_position, pad_id, max_length)


def classifier_from_base(base: nn.Module, num_classes: int = 2, **kwargs: Any) -> GPTClassifier | DecoderClassifier:
    """``from_gpt`` of the classifier class that fits ``base`` (a GPTModel or a DecoderModel)."""
    cls = DecoderClassifier if isinstance(base.cfg, DecoderConfig) else GPTClassifier
    return cls.from_gpt(base, num_classes, **kwargs)


def set_trainable(
    model: GPTClassifier, mode: str = "last_block", *, lora_rank: int = 8, lora_alpha: float = 16.0
) -> int:
    """Choose what fine-tuning updates; returns the number of trainable parameters.

    ``last_layer``: the head; ``last_block`` (the book): the last transformer block, the final
    norm and the head; ``last_two_blocks``: one block more; ``all_but_embeddings``: every block,
    the norm and the head, the token and position embeddings kept as pretraining left them (so
    tokens the fine-tuning data lacks keep their place among the rest); ``all``: everything;
    ``lora``: LoRA adapters on every Linear of the blocks, plus the (new) head.
    """
    if mode not in TRAINABLE_MODES:
        raise ValueError(f"trainable must be one of {TRAINABLE_MODES}, got {mode!r}")
    if mode == "lora":
        apply_lora(model, lora_rank, lora_alpha)  # freezes everything but the adapters
        unfrozen: list[nn.Module] = [model.out_head]
    else:
        model.requires_grad_(mode == "all")
        blocks = {
            "last_layer": 0,
            "last_block": 1,
            "last_two_blocks": 2,
            "all_but_embeddings": len(model.trf_blocks),
            "all": 0,
        }[mode]
        unfrozen = [model.out_head] if mode == "last_layer" else [model.out_head, model.final_norm]
        unfrozen += list(model.trf_blocks)[len(model.trf_blocks) - blocks :] if blocks else []
    for module in unfrozen:
        module.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- checkpoints


def save_classifier(model: GPTClassifier | DecoderClassifier, directory: str | os.PathLike, *, files=None) -> Path:
    """Write the classifier as an llmcore checkpoint (LoRA must be merged: plain layout only); a
    DecoderClassifier's config records ``base_format: llmcore-decoder``. ``files(tmp_dir)`` as
    ``save_checkpoint``'s (a Hugging Face base's tokenizer)."""
    if has_lora(model):
        raise ValueError("the model still has LoRA adapters: call llmcore.lora.merge_lora(model) before saving")
    extra = model.classifier_meta()
    if isinstance(model, DecoderClassifier):
        extra["base_format"] = DECODER_FORMAT
    return save_checkpoint(model, directory, kind=CLASSIFIER_FORMAT, extra=extra, files=files)


def load_classifier(
    directory: str | os.PathLike, *, map_location: str | torch.device = "cpu"
) -> GPTClassifier | DecoderClassifier:
    meta = read_checkpoint_meta(directory)
    if meta.get("format") != CLASSIFIER_FORMAT:
        raise CheckpointError(f"checkpoint {directory}: format {meta.get('format')!r}, expected {CLASSIFIER_FORMAT!r}")
    missing = sorted({"num_classes", "labels", "token_position", "pad_id", "max_length"} - set(meta))
    if missing:
        raise CheckpointError(f"checkpoint {directory}: config.json lacks classifier field(s) {missing}")
    try:
        decoder = meta.get("base_format") == DECODER_FORMAT
        model = (DecoderClassifier if decoder else GPTClassifier)(
            (DecoderConfig if decoder else GPTConfig).from_dict(meta["config"]),
            meta["num_classes"],
            labels=meta["labels"],
            token_position=meta["token_position"],
            pad_id=meta["pad_id"],
            max_length=meta["max_length"],
        )
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {directory}: invalid config.json: {exc}") from exc
    load_state_strict(model, read_weights(directory), str(Path(directory) / "model.safetensors"))
    return model.to(map_location)


# ---- data


class SpamDataset(Dataset):
    """Encoded texts with their labels, truncated to ``max_length`` tokens (as the book's dataset).

    ``max_length=None`` takes the longest text; ``context_length`` caps it either way. Validation
    and test sets pass the training set's ``max_length``. An empty text becomes one pad token.
    """

    def __init__(
        self,
        texts: Sequence[str],
        labels: Sequence[int],
        tokenizer: tiktoken.Encoding,
        *,
        max_length: int | None = None,
        context_length: int | None = None,
        pad_id: int = ENDOFTEXT_ID,
    ):
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
        encoded = [encode(tokenizer, text) or [pad_id] for text in texts]
        if max_length is None:
            max_length = max((len(ids) for ids in encoded), default=1)
        if context_length is not None:
            max_length = min(max_length, context_length)
        self.max_length = max_length
        self.encoded = [ids[:max_length] for ids in encoded]
        self.labels = [int(label) for label in labels]

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.encoded[index], self.labels[index]


@dataclass(frozen=True)
class PadCollate:
    """Batch (ids, label) items as (inputs, labels, lengths), padded with ``pad_id`` on the right.

    ``length`` pads every batch to that many tokens; None pads to the batch's longest row.
    """

    pad_id: int = ENDOFTEXT_ID
    length: int | None = None

    def __call__(self, items: Sequence[tuple[list[int], int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = self.length or max(len(ids) for ids, _ in items)
        inputs = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        for row, (ids, _) in enumerate(items):
            inputs[row, : len(ids)] = torch.tensor(ids[:width], dtype=torch.long)
        labels = torch.tensor([label for _, label in items], dtype=torch.long)
        lengths = torch.tensor([min(len(ids), width) for ids, _ in items], dtype=torch.long)
        return inputs, labels, lengths


def collate_for(model: GPTClassifier) -> PadCollate:
    """The padding ``model`` was trained with: to ``max_length`` for "last", per batch for "flexible"."""
    fixed = model.token_position == "last"
    if fixed and model.max_length is None:
        raise ValueError("token_position 'last' needs the classifier's max_length (the padded length)")
    return PadCollate(model.pad_id, model.max_length if fixed else None)


# ---- training and evaluation


def classification_loss(model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the chosen position's class logits (a ``loss_fn`` for llmcore.train)."""
    inputs, labels, lengths = batch
    return F.cross_entropy(model(inputs, lengths), labels)


@torch.no_grad()
def classification_accuracy(model: nn.Module, loader: DataLoader, max_batches: int | None = None) -> dict[str, float]:
    """Accuracy over the first ``max_batches`` batches (an ``eval_fn`` for llmcore.train)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, total = 0, 0
    try:
        for i, (inputs, labels, lengths) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            predicted = model(inputs.to(device), lengths.to(device)).argmax(dim=-1)
            correct += (predicted == labels.to(device)).sum().item()
            total += len(labels)
    finally:
        model.train(was_training)
    return {"accuracy": correct / total if total else math.nan}


@torch.no_grad()
def predict_proba(
    model: GPTClassifier, tokenizer: tiktoken.Encoding, texts: Sequence[str], batch_size: int = 32
) -> torch.Tensor:
    """Class probabilities (len(texts), num_classes), texts truncated and padded as in training."""
    cfg = model.cfg
    data = SpamDataset(
        texts,
        [0] * len(texts),
        tokenizer,
        max_length=model.max_length or cfg.context_length,
        context_length=cfg.context_length,
        pad_id=model.pad_id,
    )
    # Similar lengths together: less padding per batch for "flexible" (results are the same).
    order = sorted(range(len(data)), key=lambda i: len(data.encoded[i]))
    loader = DataLoader([data[i] for i in order], batch_size=batch_size, collate_fn=collate_for(model))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        probs = [F.softmax(model(x.to(device), n.to(device)), dim=-1).cpu() for x, _, n in loader]
    finally:
        model.train(was_training)
    out = torch.empty(len(texts), model.num_classes)
    if probs:
        out[torch.tensor(order)] = torch.cat(probs)
    return out


def classify_texts(
    model: GPTClassifier, tokenizer: tiktoken.Encoding, texts: Sequence[str], batch_size: int = 32
) -> list[tuple[str, float]]:
    """(label, probability) for each text: of class 1 (the positive class, "spam") for a two-class
    model, of the predicted label for more classes."""
    probs = predict_proba(model, tokenizer, texts, batch_size)
    binary = model.num_classes == 2
    return [(model.labels[int(p.argmax())], float(p[1] if binary else p.max())) for p in probs]


def probability_columns(labels: Sequence[str]) -> list[tuple[str, int]]:
    """(column name, class id) of the probabilities a prediction reports: the positive class's
    (id 1, ``spam_probability`` for spam) for two classes, every class's for more."""
    ids = [1] if len(labels) == 2 else range(len(labels))
    return [(f"{labels[i]}_probability", i) for i in ids]
