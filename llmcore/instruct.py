"""Instruction fine-tuning data (book chapter 7): encoded examples, their collate, and the two
measurements scoring needs (answers to prompts, loss on reference responses).

Each example is an entry's whole training text in a prompt style (``llmcore.prompts``: the book's
``format_input(entry) + format_response(entry)`` for an Alpaca entry in the default style),
encoded once, together with which of its tokens are answers; ``collate_instructions`` pads a batch
the way the book's ``custom_collate_fn`` does, optionally hiding everything but the answers (the
prompt; in a chat, the system and user turns) from the loss.

A Hugging Face base (style ``template``) is trained in its tokenizer's own chat template
(``render_template_entry``): the prompt is the template over the turns before the answer with the
generation prompt on (what ``apply_chat_template(..., add_generation_prompt=True)`` gives and what
serving sends); the completion is what the full chat's rendering adds after it, through the
answer, whose end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``) is the
target after the last token: ``collate_instructions`` appends its ``pad_id``, so a template
example is collated with ``pad_id=template_end_id(tokenizer)``. Only the last answer is trained
(earlier assistant turns are prompt).
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
from llmcore.prompts import extract_response, reference, response_prompt, segments, turns
from llmcore.tokenizer import ENDOFTEXT_ID, encode, eot_id

TEMPLATE = "template"  # the prompt style of a Hugging Face base: its tokenizer's chat template
_ANSWER_SLOT = {"role": "assistant", "content": "\u2063answer\u2063"}  # finds what precedes an answer
_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


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


class ChatTemplateError(ValueError):
    """A chat template that does not render an entry as prompt + answer + end-of-turn token."""


def template_messages(entry: Mapping) -> list[dict[str, str]]:
    """An entry's turns as chat messages (an Alpaca entry: one user turn, then the answer)."""
    return [{"role": role, "content": content} for role, content in turns(entry)]


def _end_of_turn(tokenizer, rest: str, after: int) -> int:
    """Where the first special token at or after ``after`` in ``rest`` starts (else the first added
    token: a tokenizer that does not mark its turn tokens special); -1: none."""
    for tokens in (tokenizer.special_ids, tokenizer.added_ids):
        hits = [i for text in tokens if (i := rest.find(text, after)) >= 0]
        if hits:
            return min(hits)
    return -1


def render_template_entry(tokenizer, entry: Mapping) -> tuple[str, str, str]:
    """(prompt, completion, lead) of an entry in the tokenizer's chat template: the prompt is the
    turns before the answer with the generation prompt; the completion what the full chat adds
    after it up to the answer's end-of-turn token (excluded: it is the collate's end target);
    ``lead`` its part before the answer (Qwen3's empty think block; usually "")."""
    messages = template_messages(entry)
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ChatTemplateError(
            f"tokenizer {tokenizer.name}: the chat template's generation prompt is not the start "
            "of the answer's turn in the full chat, so it cannot be trained as a prompt"
        )
    rest, answer = full[len(prompt) :], messages[-1]["content"]
    text = answer if answer in rest else answer.strip()  # templates may trim the content
    start = rest.rfind(text) if text else 0  # the last occurrence: the answer, not a lead that contains it
    end = _end_of_turn(tokenizer, rest, start + len(text)) if start >= 0 else -1
    if end < 0:
        raise ChatTemplateError(
            f"tokenizer {tokenizer.name}: the chat template does not render the answer verbatim "
            "followed by an end-of-turn special token"
        )
    return prompt, rest[:end], rest[:start]


def template_end_id(tokenizer) -> int:
    """The id of the special token that ends an assistant turn in the tokenizer's chat template."""
    prompt, completion, _ = render_template_entry(tokenizer, {"messages": _PROBE})
    full = tokenizer.apply_chat_template(_PROBE, add_generation_prompt=False)
    rest = full[len(prompt) + len(completion) :]
    return tokenizer.added_ids[max((t for t in tokenizer.added_ids if rest.startswith(t)), key=len)]


def encode_template_entry(tokenizer, entry: Mapping) -> InstructionExample:
    """The entry in the chat template: prompt + completion encoded as one text (the end-of-turn
    token follows as the collate's end target), the prompt length counted as ``encode_example``."""
    return scored_example(tokenizer, entry, TEMPLATE)[1]


def scored_example(tokenizer, entry: Mapping, style: str = "alpaca") -> tuple[str, InstructionExample]:
    """(prompt, example) of an entry for the response loss: its prompt in ``style`` and the
    reference answer (in a template: through the end of the answer)."""
    if style == TEMPLATE:
        prompt, completion, _ = render_template_entry(tokenizer, entry)
        return prompt, encode_example(tokenizer, prompt, completion)
    prompt = response_prompt(entry, style)
    return prompt, encode_example(tokenizer, prompt, reference(entry))


def end_id(tokenizer, style: str = "alpaca") -> int:
    """The token an answer ends with: the template's end-of-turn token, else <|endoftext|>."""
    return template_end_id(tokenizer) if style == TEMPLATE else eot_id(tokenizer)


def encode_entry(tokenizer, entry: Mapping, style: str = "alpaca") -> InstructionExample:
    """Encode an entry's whole text once; each answer (a run of answer pieces) is the tokens past the
    prefix shared with the text before it, up to the prefix shared with the text through it (as
    ``encode_example`` counts the prompt). Style ``template``: ``encode_template_entry``."""
    if style == TEMPLATE:
        return encode_template_entry(tokenizer, entry)
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
        self.examples = []
        for i, entry in enumerate(self.entries):
            try:
                self.examples.append(encode_entry(tokenizer, entry, style))
            except ChatTemplateError as exc:
                raise ChatTemplateError(f"entry {i}: {exc}") from exc

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> InstructionExample:
        return self.examples[index]


def answers_cut_off(examples: Sequence[InstructionExample], max_length: int) -> int:
    """How many ``examples`` keep no answer token within ``max_length`` columns of
    ``collate_instructions``: their prompt alone fills them, so with ``mask_prompt`` they teach nothing
    (a batch of only those has no target, and its loss is NaN)."""
    return sum(
        1 for ex in examples if min((start for start, _ in ex.response_spans), default=ex.prompt_length) > max_length
    )


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
    """The model's answer to each entry: greedy (by default) KV-cache decoding until <|endoftext|>
    (style ``template``: the chat template's prompt, until its end-of-turn token).

    Prompts are batched by length (less left padding) and the answers returned in entry order.
    """
    if style == TEMPLATE:
        rendered = [
            render_template_entry(tokenizer, {"messages": [*template_messages(e)[:-1], _ANSWER_SLOT]}) for e in entries
        ]
        prompts, leads = [p for p, _, _ in rendered], [lead for _, _, lead in rendered]
    else:
        prompts = [response_prompt(e, style) for e in entries]
    encoded = [encode(tokenizer, p) for p in prompts]
    stop = end_id(tokenizer, style)
    order = sorted(range(len(entries)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(entries)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        new_tokens = generate(model, [encoded[i] for i in rows], max_new_tokens, eos_id=stop, **generate_kwargs)
        for i, tokens in zip(rows, new_tokens):
            if style == TEMPLATE:
                text = tokenizer.decode(tokens)
                answers[i] = text.removeprefix(leads[i]).strip()
            else:
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
    closing target every response is scored on: the tokenizer's <|endoftext|>, or a chat
    template's end of turn (``end_id``)."""
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
