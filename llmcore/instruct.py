"""Instruction fine-tuning data (book chapter 7): encoded examples, their collate, and the two
measurements scoring needs (answers to prompts, loss on reference responses).

Each example is an entry's whole training text in a prompt style (``llmcore.prompts``: the book's
``format_input(entry) + format_response(entry)`` for an Alpaca entry in the default style),
encoded once, together with which of its tokens are answers; ``collate_instructions`` pads a batch
the way the book's ``custom_collate_fn`` does, optionally hiding everything but the answers (the
prompt; in a chat, the system and user turns) from the loss.
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
from llmcore.prompts import extract_response, response_prompt, segments
from llmcore.tokenizer import ENDOFTEXT_ID, encode, eot_id



class InstructionExample(NamedTuple):
    token_ids: list[int]
    prompt_length: int  # leading tokens that are prompt only (masked when mask_prompt is set)
    # Token ranges [start, end) that are answers; () means one answer, from prompt_length to the end.
    response_spans: tuple[tuple[int, int], ...] = ()


def _shared(ids: list[int], prefix_ids: list[int]) -> int:
    shared = 0
    for a, b in zip(ids, prefix_ids):
        if a != b:
            break
        shared += 1
    return shared


def encode_example(tokenizer, prompt: str, completion: str) -> InstructionExample:
    """Encode ``prompt + completion`` as one text (as the book does) and count its prompt tokens.

    BPE may merge across the boundary; the prompt length is the tokens the whole text shares with
    the prompt alone, so a masked prompt never hides a completion token.
    """
    token_ids = encode(tokenizer, prompt + completion)
    return InstructionExample(token_ids, _shared(token_ids, encode(tokenizer, prompt)))


def encode_entry(tokenizer, entry: Mapping, style: str = "alpaca") -> InstructionExample:
    """Encode an entry's whole text once; each answer (a run of answer pieces) is the tokens past the
    prefix shared with the text before it, up to the prefix shared with the text through it (as
    ``encode_example`` counts the prompt)."""
    parts = segments(entry, style)
    token_ids = encode(tokenizer, "".join(piece for piece, _ in parts))
    spans, done, start = [], "", None
    for i, (piece, is_answer) in enumerate(parts):
        if is_answer and start is None:
            start = _shared(token_ids, encode(tokenizer, done))
        done += piece
        if start is not None and (i + 1 == len(parts) or not parts[i + 1][1]):
            spans.append((start, _shared(token_ids, encode(tokenizer, done))))
            start = None
    if len(spans) == 1 and spans[0][1] == len(token_ids):  # one answer at the end: encode_example's example
        return InstructionExample(token_ids, spans[0][0])
    return InstructionExample(token_ids, spans[0][0], tuple(spans))


class InstructionDataset(Dataset):
    """The book's InstructionDataset: entries pre-encoded in a prompt style (the book's: ``alpaca``)."""

    def __init__(self, entries: Sequence[Mapping], tokenizer, style: str = "alpaca"):
        self.entries = list(entries)
        self.examples = [encode_entry(tokenizer, e, style) for e in self.entries]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> InstructionExample:
        return self.examples[index]


def answers_cut_off(examples: Sequence[InstructionExample], max_length: int) -> int:
    """How many ``examples`` keep no answer token within ``max_length`` columns of
    ``collate_instructions``: their prompt alone fills them, so with ``mask_prompt`` they teach nothing
    (a batch of only those has no target, and its loss is NaN)."""
    return sum(1 for ex in examples if min((start for start, _ in ex.response_spans), default=ex.prompt_length) > max_length)


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
    ``mask_prompt`` the targets that are not answer tokens are ignored too (the book's exercise 7.2).
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
            answer = torch.zeros(n, dtype=torch.bool)
            for start, end in ex.response_spans or ((ex.prompt_length, n),):
                answer[start:end] = True
            targets[row, : n - 1][~answer[1:]] = ignore_index
    if max_length is not None:
        inputs, targets = inputs[:, :max_length], targets[:, :max_length]
    return inputs.to(device), targets.to(device)


def generate_responses(
    model: nn.Module,
    tokenizer,
    entries: Sequence[Mapping],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    style: str = "alpaca",
    **generate_kwargs,
) -> list[str]:
    """The model's answer to each entry: greedy (by default) KV-cache decoding until <|endoftext|>.

    Prompts are batched by length (less left padding) and the answers returned in entry order.
    """
    prompts = [response_prompt(e, style) for e in entries]
    encoded = [encode(tokenizer, p) for p in prompts]
    order = sorted(range(len(entries)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(entries)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        new_tokens = generate(
            model, [encoded[i] for i in rows], max_new_tokens, eos_id=eot_id(tokenizer), **generate_kwargs
        )
        for i, tokens in zip(rows, new_tokens):
            answers[i] = extract_response(prompts[i] + tokenizer.decode(tokens), prompts[i], style)
    return answers


@torch.no_grad()
def response_loss(
    model: nn.Module, examples: Sequence[InstructionExample], *, pad_id: int, batch_size: int = 8
) -> tuple[float, int]:
    """Mean cross-entropy per response token (the prompt masked) and how many tokens it covers.

    Token-weighted over the whole set, so batching does not change it; examples are cut to the
    model's context length.
    """
    per_example = response_losses(model, examples, batch_size=batch_size, pad_id=pad_id)
    total, count = sum(s for s, _ in per_example), sum(n for _, n in per_example)
    return (total / count if count else float("nan")), count


@torch.no_grad()
def response_losses(
    model: nn.Module, examples: Sequence[InstructionExample], *, pad_id: int, batch_size: int = 8
) -> list[tuple[float, int]]:
    """Per example: the summed cross-entropy of its response tokens (prompt masked) and their count
    (0 when the context cuts the response off). ``pad_id`` (required: no GPT-2 default) is the
    tokenizer's <|endoftext|> (``eot_id``), the closing target every response is scored on."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[tuple[float, int]] = []
    try:
        for start in range(0, len(examples), batch_size):
            inputs, targets = collate_instructions(
                examples[start : start + batch_size],
                pad_id=pad_id,
                max_length=model.cfg.context_length,
                mask_prompt=True,
                device=device,
            )
            logits = model(inputs)
            losses = F.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
            ).view(targets.shape)
            counts = (targets != IGNORE_INDEX).sum(dim=1)
            out += [(float(s), int(n)) for s, n in zip(losses.double().sum(dim=1).tolist(), counts.tolist())]
    finally:
        model.train(was_training)
    return out
