"""Downstream helpers on a trained vocabulary (ids far below GPT-2's 50,256): every padding and
end-of-text id comes from the tokenizer, never GPT-2's constant, which would be out of range."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmcore.bpe import ENDOFTEXT, chunks, to_tiktoken, train_bpe
from llmcore.config import GPTConfig
from llmcore.instruct import (
    IGNORE_INDEX,
    answers_cut_off,
    collate_instructions,
    encode_example,
    response_loss,
    response_losses,
    response_prompt,
)
from llmcore.model import GPTModel
from llmcore.tokenizer import ENDOFTEXT_ID, eot_id

TEXT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. "
    "Name a primary color. Red. Convert 45 kilometers to meters. 45 kilometers is 45000 meters. "
) * 20
ENTRIES = [
    {"instruction": "Name a primary color.", "input": "", "output": "Red."},
    {"instruction": "Convert 45 kilometers to meters.", "input": "", "output": "45 kilometers is 45000 meters."},
]


def small_encoding():
    """A 320-token byte-level BPE (<|endoftext|> at 319), trained in milliseconds."""
    return to_tiktoken(train_bpe(chunks([TEXT], 256), 320, "gpt2", [ENDOFTEXT]), "gpt2")


def small_model(vocab_size: int) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(GPTConfig.from_preset("cpu-tiny", context_length=256, vocab_size=vocab_size)).eval()


def test_response_loss_scores_the_closing_endoftext_of_a_trained_vocabulary():
    encoding = small_encoding()
    eot = eot_id(encoding)
    assert eot == 319 < ENDOFTEXT_ID
    model = small_model(encoding.n_vocab)
    examples = [encode_example(encoding, response_prompt(e), e["output"]) for e in ENTRIES]
    losses = response_losses(model, examples, batch_size=2, pad_id=eot)
    assert [n for _, n in losses] == [len(e.token_ids) - e.prompt_length + 1 for e in examples]  # + <|endoftext|>
    ex = examples[0]
    ids = torch.tensor([ex.token_ids + [eot]])
    logits = model(ids[:, :-1])[0, ex.prompt_length - 1 :]
    by_hand = F.cross_entropy(logits, ids[0, ex.prompt_length :], reduction="sum")
    assert abs(losses[0][0] - by_hand.item()) < 1e-4
    loss, count = response_loss(model, examples, batch_size=1, pad_id=eot)
    assert count == sum(n for _, n in losses) and abs(loss - sum(s for s, _ in losses) / count) < 1e-5


def test_answers_cut_off_counts_examples_whose_prompt_fills_the_columns():
    encoding = small_encoding()
    examples = [encode_example(encoding, response_prompt(e), e["output"]) for e in ENTRIES]
    shortest = min(ex.prompt_length for ex in examples)
    longest = max(ex.prompt_length for ex in examples)
    assert shortest < longest
    assert answers_cut_off(examples, longest) == 0  # the first answer token is the last column's target
    assert answers_cut_off(examples, shortest) == 1
    assert answers_cut_off(examples, shortest - 1) == len(examples)
    # ... as collate_instructions sees it: no target left once every prompt fills max_length
    _, targets = collate_instructions(examples, pad_id=eot_id(encoding), max_length=shortest - 1, mask_prompt=True)
    assert bool((targets == IGNORE_INDEX).all())
    _, targets = collate_instructions(examples, pad_id=eot_id(encoding), max_length=longest, mask_prompt=True)
    assert bool((targets != IGNORE_INDEX).any(dim=1).all())
