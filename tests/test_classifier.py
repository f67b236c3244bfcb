"""The GPT classifier: head, trainable layers, token positions, padding, loss/accuracy, checkpoints."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from llmcore.checkpoint import CheckpointError, save_checkpoint
from llmcore.classifier import (
    CLASSIFIER_FORMAT,
    GPTClassifier,
    PadCollate,
    SpamDataset,
    classification_accuracy,
    classification_loss,
    classify_texts,
    collate_for,
    load_classifier,
    predict_proba,
    save_classifier,
    set_trainable,
)
from llmcore.config import GPTConfig
from llmcore.model import GPTModel
from llmcore.tokenizer import ENDOFTEXT_ID, encode, get_tokenizer

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("LLMPIPE_MIRROR") or REPO.parent / "shared" / "data")
PAD = ENDOFTEXT_ID


@pytest.fixture(scope="module")
def tokenizer():
    if not (MIRROR / "gpt2").is_dir():
        pytest.skip(f"offline mirror {MIRROR} not found")
    return get_tokenizer(MIRROR / "gpt2")


@pytest.fixture
def gpt() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(GPTConfig.from_preset("cpu-tiny", context_length=32, n_layers=3)).eval()


def test_head_replaced_and_backbone_kept(gpt: GPTModel) -> None:
    model = GPTClassifier.from_gpt(gpt, token_position="last").eval()
    assert isinstance(model.out_head, nn.Linear) and model.out_head.weight.shape == (2, 64)
    assert model.out_head.bias is not None and model.out_head.weight is not model.tok_emb.weight
    torch.testing.assert_close(model.tok_emb.weight, gpt.tok_emb.weight)
    torch.testing.assert_close(model.hidden_states(torch.arange(5)[None]), gpt.hidden_states(torch.arange(5)[None]))
    assert model(torch.randint(0, 1000, (4, 9))).shape == (4, 2)


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def block_params(model: GPTClassifier, i: int) -> set[str]:
    return {f"trf_blocks.{i}.{name}" for name, _ in model.trf_blocks[i].named_parameters()}


def test_set_trainable_selects_exact_parameters(gpt: GPTModel) -> None:
    head = {"out_head.weight", "out_head.bias"}
    norm = {"final_norm.weight", "final_norm.bias"}
    model = GPTClassifier.from_gpt(gpt)
    assert set_trainable(model, "last_layer") == 2 * 64 + 2
    assert trainable_names(model) == head
    set_trainable(model, "last_block")
    assert trainable_names(model) == head | norm | block_params(model, 2)
    set_trainable(model, "last_two_blocks")
    assert trainable_names(model) == head | norm | block_params(model, 1) | block_params(model, 2)
    set_trainable(model, "all_but_embeddings")
    assert trainable_names(model) == head | norm | set().union(*(block_params(model, i) for i in range(3)))
    assert set_trainable(model, "all") == sum(p.numel() for p in model.parameters())
    assert trainable_names(model) == {name for name, _ in model.named_parameters()}

    lora_model = GPTClassifier.from_gpt(gpt)
    set_trainable(lora_model, "lora", lora_rank=2, lora_alpha=4)
    layers = [f"trf_blocks.{i}.{name}" for i in range(3) for name in ("att.qkv", "att.out_proj", "ff.fc", "ff.proj")]
    assert trainable_names(lora_model) == head | {f"{layer}.lora.{ab}" for layer in layers for ab in "AB"}
    with pytest.raises(ValueError, match="trainable must be one of"):
        set_trainable(model, "first_block")


ROWS = [[11, 12, 13], [21, 22, 23, 24, 25, 26], [31]]


def classify_padded_rows(gpt: GPTModel, token_position: str):
    """A classifier reading ``token_position``, ROWS padded to 8 tokens, their logits and hidden states."""
    model = GPTClassifier.from_gpt(gpt, token_position=token_position).eval()
    inputs, _, lengths = PadCollate(PAD, length=8)([(r, 0) for r in ROWS])
    return model, ROWS, inputs, lengths, model(inputs, lengths), model.hidden_states(inputs)


def test_flexible_position_reads_last_real_token(gpt: GPTModel) -> None:
    model, rows, inputs, lengths, logits, hidden = classify_padded_rows(gpt, "flexible")
    for i, row in enumerate(rows):
        torch.testing.assert_close(logits[i], model.out_head(hidden[i, len(row) - 1]))
        # Causal attention: the padded row's logits are the unpadded row's own.
        torch.testing.assert_close(logits[i], model(torch.tensor([row]))[0], rtol=1e-4, atol=1e-5)
    assert model.positions(inputs).tolist() == [2, 5, 0]  # from the padding when lengths are unknown
    torch.testing.assert_close(model(inputs), logits)

    last = GPTClassifier.from_gpt(gpt, token_position="last").eval()
    torch.testing.assert_close(last(inputs, lengths), last.out_head(last.hidden_states(inputs)[:, -1]))


def test_mean_position_averages_real_tokens_and_ignores_padding(gpt: GPTModel) -> None:
    model, rows, inputs, lengths, logits, hidden = classify_padded_rows(gpt, "mean")
    for i, row in enumerate(rows):
        torch.testing.assert_close(logits[i], model.out_head(hidden[i, : len(row)].mean(dim=0)))
        torch.testing.assert_close(logits[i], model(torch.tensor([row]))[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model(inputs), logits)  # the mask from the padding id when lengths are unknown
    assert collate_for(model) == PadCollate(PAD, None)  # per-batch padding, like "flexible"


def test_dataset_and_collate_pad_to_longest_training_text(tokenizer) -> None:
    texts = ["Hi there", "Free entry in a weekly competition to win cup final tickets", "ok"]
    encoded = [encode(tokenizer, t) for t in texts]
    train = SpamDataset(texts, [0, 1, 0], tokenizer)
    assert train.max_length == max(len(e) for e in encoded) == 11
    longer = "WINNER!! As a valued network customer you have been selected to receive a prize reward"
    val = SpamDataset([longer, ""], [1, 0], tokenizer, max_length=train.max_length)
    assert val[0] == (encode(tokenizer, longer)[:11], 1)  # truncated to the training length
    assert val[1] == ([PAD], 0)  # an empty message is one pad token
    assert SpamDataset(texts, [0, 1, 0], tokenizer, context_length=5).max_length == 5

    inputs, labels, lengths = PadCollate(PAD, length=train.max_length)([train[0], train[2]])
    assert inputs.shape == (2, 11) and inputs.dtype == torch.long
    assert inputs[0].tolist() == encoded[0] + [PAD] * (11 - len(encoded[0]))
    assert inputs[1].tolist() == encoded[2] + [PAD] * (11 - len(encoded[2]))
    assert labels.tolist() == [0, 0] and lengths.tolist() == [len(encoded[0]), len(encoded[2])]
    inputs, _, _ = PadCollate(PAD)([train[0], train[2]])  # flexible: to the batch's longest
    assert inputs.shape == (2, max(len(encoded[0]), len(encoded[2])))


def test_collate_for_model_padding(gpt: GPTModel) -> None:
    assert collate_for(GPTClassifier.from_gpt(gpt, token_position="last", max_length=20)) == PadCollate(PAD, 20)
    assert collate_for(GPTClassifier.from_gpt(gpt, token_position="flexible", max_length=20)) == PadCollate(PAD, None)
    with pytest.raises(ValueError, match="needs the classifier's max_length"):
        collate_for(GPTClassifier.from_gpt(gpt, token_position="last"))
    with pytest.raises(ValueError, match="max_length must be in"):
        GPTClassifier.from_gpt(gpt, max_length=33)


class FixedLogits(nn.Module):
    """Stands in for a classifier: class-1 logit = the first token id, class-0 logit = 0."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))  # gives the model a device

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        first = inputs[:, 0].float()
        return torch.stack([torch.zeros_like(first), first], dim=1)


def test_classification_loss_and_accuracy_on_hand_made_batches() -> None:
    batch = [torch.tensor([[2, 9], [-2, 9], [0, 9]]), torch.tensor([1, 1, 0]), torch.tensor([2, 2, 2])]
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2)) + math.log(2)) / 3
    assert classification_loss(FixedLogits(), batch).item() == pytest.approx(expected)

    # Predictions: 1 where the first id is > 0. Rows 0, 1, 3, 4 are right, row 2 and 5 wrong.
    items = [([3], 1), ([-1], 0), ([5], 0), ([-4], 0), ([1], 1), ([-2], 1)]
    loader = DataLoader(items, batch_size=2, collate_fn=PadCollate(0))
    assert classification_accuracy(FixedLogits(), loader)["accuracy"] == pytest.approx(4 / 6)
    assert classification_accuracy(FixedLogits(), loader, max_batches=1)["accuracy"] == 1.0
    assert classification_accuracy(FixedLogits(), loader, max_batches=2)["accuracy"] == 0.75


def test_checkpoint_round_trip(gpt: GPTModel, tokenizer, tmp_path: Path) -> None:
    model = GPTClassifier.from_gpt(gpt, token_position="flexible", max_length=24).eval()
    save_classifier(model, tmp_path / "clf")
    meta = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert meta["format"] == CLASSIFIER_FORMAT == "llmcore-gpt-classifier"
    assert {k: meta[k] for k in ("num_classes", "labels", "token_position", "pad_id", "max_length")} == {
        "num_classes": 2,
        "labels": ["ham", "spam"],
        "token_position": "flexible",
        "pad_id": PAD,
        "max_length": 24,
    }
    loaded = load_classifier(tmp_path / "clf")
    texts = ["Call now to claim your FREE prize", "see you at lunch?", ""]
    torch.testing.assert_close(predict_proba(loaded, tokenizer, texts), predict_proba(model, tokenizer, texts))

    set_trainable(model, "lora", lora_rank=2, lora_alpha=2)
    with pytest.raises(ValueError, match="merge_lora"):
        save_classifier(model, tmp_path / "lora")
    save_checkpoint(gpt, tmp_path / "plain")
    with pytest.raises(CheckpointError, match="format 'llmcore-gpt', expected 'llmcore-gpt-classifier'"):
        load_classifier(tmp_path / "plain")


def test_classify_texts_keeps_input_order(gpt: GPTModel, tokenizer) -> None:
    model = GPTClassifier.from_gpt(gpt, token_position="flexible", max_length=32)
    texts = ["a much longer message about a prize you have won, call now", "hi", "are we meeting today?"]
    results = classify_texts(model, tokenizer, texts, batch_size=2)
    singles = [classify_texts(model, tokenizer, [t])[0] for t in texts]
    assert [label for label, _ in results] == [label for label, _ in singles]
    assert [p for _, p in results] == pytest.approx([p for _, p in singles], abs=1e-5)
    for label, p in results:
        assert label == ("spam" if p > 0.5 else "ham") and 0 <= p <= 1
    probs = predict_proba(model, tokenizer, texts)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(3))
    assert F.softmax(model(torch.tensor([encode(tokenizer, texts[1])])), -1)[0, 1].item() == pytest.approx(
        results[1][1], abs=1e-5
    )
