"""Instruction fine-tuning data (book chapter 7): encoded Alpaca-style examples, their collate,
and the two measurements scoring needs (answers to prompts, loss on reference responses).

Each example is the whole training text, ``format_input(entry) + format_response(entry)``,
encoded once, together with how many of its leading tokens are the prompt; ``collate_instructions``
pads a batch the way the book's ``custom_collate_fn`` does, optionally hiding the prompt from
the loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from llmcore.generate import generate
from llmcore.model import IGNORE_INDEX
from llmcore.prompts import extract_response, format_input, format_response
from llmcore.tokenizer import ENDOFTEXT_ID, encode



class InstructionExample(NamedTuple):
    token_ids: list[int]
    prompt_length: int  # leading tokens that are prompt only (masked when mask_prompt is set)


def response_prompt(entry: Mapping[str, str]) -> str:
    """The prompt up to and including the response marker line, so the model answers right away.

    Same text as the training example minus the output, so generation and the response-only loss
    see exactly the tokens the model was trained on.
    """
    return format_input(entry) + format_response({**entry, "output": ""})


def encode_example(tokenizer, prompt: str, completion: str) -> InstructionExample:
    """Encode ``prompt + completion`` as one text (as the book does) and count its prompt tokens.

    BPE may merge across the boundary; the prompt length is the tokens the whole text shares with
    the prompt alone, so a masked prompt never hides a completion token.
    """
    token_ids = encode(tokenizer, prompt + completion)
    prompt_ids = encode(tokenizer, prompt)
    shared = 0
    for a, b in zip(token_ids, prompt_ids):
        if a != b:
            break
        shared += 1
    return InstructionExample(token_ids, shared)


class InstructionDataset(Dataset):
    """The book's InstructionDataset: entries pre-encoded as prompt (instruction + input) + response."""

    def __init__(self, entries: Sequence[Mapping[str, str]], tokenizer):
        self.entries = list(entries)
        self.examples = [encode_example(tokenizer, format_input(e), format_response(e)) for e in self.entries]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> InstructionExample:
        return self.examples[index]


def collate_instructions(
    batch: Sequence[InstructionExample | Sequence[int]],
    pad_id: int = ENDOFTEXT_ID,
    ignore_index: int = IGNORE_INDEX,
    max_length: int | None = None,
    mask_prompt: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) as the book's ``custom_collate_fn``; items are examples or plain id lists.

    Every item gets one ``pad_id`` (<|endoftext|>) appended and is padded with it to the longest
    item + 1; inputs are ``seq[:-1]``, targets ``seq[1:]``. In the targets, padding after the first
    <|endoftext|> becomes ``ignore_index``: the first one stays, so the model learns to stop. With
    ``mask_prompt`` the targets that are prompt tokens are ignored too (the book's exercise 7.2).
    Both tensors are then cut to ``max_length`` columns.
    """
    if not batch:
        raise ValueError("cannot collate an empty batch")
    examples = [item if isinstance(item, InstructionExample) else InstructionExample(list(item), 0) for item in batch]
    if any(not ex.token_ids for ex in examples):
        raise ValueError("cannot collate an item with no tokens")
    width = max(len(ex.token_ids) for ex in examples) + 1
    inputs = torch.full((len(examples), width - 1), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width - 1), ignore_index, dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.token_ids)
        ids = torch.as_tensor(ex.token_ids, dtype=torch.long)
        inputs[row, :n] = ids
        targets[row, : n - 1] = ids[1:]
        targets[row, n - 1] = pad_id  # the end-of-text target; later padding stays ignored
        if mask_prompt:
            targets[row, : max(0, ex.prompt_length - 1)] = ignore_index
    if max_length is not None:
        inputs, targets = inputs[:, :max_length], targets[:, :max_length]
    return inputs.to(device), targets.to(device)


def generate_responses(
    model: nn.Module,
    tokenizer,
    entries: Sequence[Mapping[str, str]],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    **generate_kwargs,
) -> list[str]:
    """The model's answer to each entry: greedy (by default) KV-cache decoding until <|endoftext|>.

    Prompts are batched by length (less left padding) and the answers returned in entry order.
    """
    prompts = [response_prompt(e) for e in entries]
    encoded = [encode(tokenizer, p) for p in prompts]
    order = sorted(range(len(entries)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(entries)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        new_tokens = generate(
            model, [encoded[i] for i in rows], max_new_tokens, eos_id=ENDOFTEXT_ID, **generate_kwargs
        )
        for i, tokens in zip(rows, new_tokens):
            answers[i] = extract_response(prompts[i] + tokenizer.decode(tokens), prompts[i])
    return answers


@torch.no_grad()
def response_loss(
    model: nn.Module, examples: Sequence[InstructionExample], *, batch_size: int = 8
) -> tuple[float, int]:
    """Mean cross-entropy per response token (the prompt masked) and how many tokens it covers.

    Token-weighted over the whole set, so batching does not change it; examples are cut to the
    model's context length.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            inputs, targets = collate_instructions(
                examples[start : start + batch_size],
                max_length=model.cfg.context_length,
                mask_prompt=True,
                device=device,
            )
            logits = model(inputs)
            total += F.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
            count += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return (total / count if count else float("nan")), count
