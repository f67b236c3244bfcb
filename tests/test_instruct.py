"""Instruction data: the book's collate (padding, -100 targets), prompt masking, truncation, and
the generation / response-loss helpers the scoring stage uses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmcore.config import GPTConfig
from llmcore.generate import generate
from llmcore.instruct import (
    IGNORE_INDEX,
    InstructionDataset,
    InstructionExample,
    collate_instructions,
    encode_example,
    generate_responses,
    response_loss,
    response_prompt,
)
from llmcore.model import GPTModel
from llmcore.prompts import format_input, format_response
from llmcore.tokenizer import ENDOFTEXT_ID, encode
from llmcore.train import next_token_loss

PAD = ENDOFTEXT_ID
ENTRIES = [
    {"instruction": "Convert 45 kilometers to meters.", "input": "", "output": "45 kilometers is 45000 meters."},
    {
        "instruction": "Edit the following sentence for grammar.",
        "input": "He go to the park every day.",
        "output": "He goes to the park every day.",
    },
    {"instruction": "Name a primary color.", "input": "", "output": "Red."},
]


def tiny_model(seed: int = 0) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(GPTConfig.from_preset("cpu-tiny", context_length=128)).eval()


def test_collate_matches_the_books_example() -> None:
    inputs, targets = collate_instructions([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert inputs.tolist() == [
        [0, 1, 2, 3, 4],
        [5, 6, PAD, PAD, PAD],
        [7, 8, 9, PAD, PAD],
    ]
    # The first <|endoftext|> stays a target (the model learns to stop); later padding is ignored.
    assert targets.tolist() == [
        [1, 2, 3, 4, PAD],
        [6, PAD, -100, -100, -100],
        [8, 9, PAD, -100, -100],
    ]
    assert inputs.dtype == targets.dtype == torch.long


def test_collate_custom_pad_and_ignore_index() -> None:
    inputs, targets = collate_instructions([[1, 2, 3], [4]], pad_id=0, ignore_index=-1)
    assert inputs.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert targets.tolist() == [[2, 3, 0], [0, -1, -1]]


def test_collate_masks_the_prompt_targets() -> None:
    batch = [InstructionExample([10, 11, 12, 13, 14], prompt_length=3), InstructionExample([20, 21, 22], 2)]
    _, plain = collate_instructions(batch)
    inputs, targets = collate_instructions(batch, mask_prompt=True)
    assert inputs.tolist() == [[10, 11, 12, 13, 14], [20, 21, 22, PAD, PAD]]
    # Targets 11 and 12 are prompt tokens; 13 (the first response token) is still learned.
    assert targets.tolist() == [[-100, -100, 13, 14, PAD], [-100, 22, PAD, -100, -100]]
    assert plain.tolist() == [[11, 12, 13, 14, PAD], [21, 22, PAD, -100, -100]]


def test_collate_truncates_inputs_and_targets_to_max_length() -> None:
    inputs, targets = collate_instructions([[0, 1, 2, 3, 4], [5, 6]], max_length=3)
    assert inputs.tolist() == [[0, 1, 2], [5, 6, PAD]]
    assert targets.tolist() == [[1, 2, 3], [6, PAD, -100]]


def test_dataset_encodes_prompt_and_response_and_counts_prompt_tokens(tokenizer) -> None:
    data = InstructionDataset(ENTRIES, tokenizer)
    assert len(data) == 3
    for entry, example in zip(ENTRIES, data):
        assert example.token_ids == encode(tokenizer, format_input(entry) + format_response(entry))
        assert tokenizer.decode(example.token_ids[: example.prompt_length]) == format_input(entry)
    # The input section appears only when the entry has an input.
    assert "### Input:" in tokenizer.decode(data[1].token_ids) and "### Input:" not in tokenizer.decode(
        data[0].token_ids
    )


def test_prompt_length_stops_where_bpe_merges_across_the_boundary(tokenizer) -> None:
    # "hello wor" + "ld" encodes as "hello", " world": " wor" is not a token of the whole text.
    example = encode_example(tokenizer, "hello wor", "ld")
    assert tokenizer.decode(example.token_ids) == "hello world"
    assert example.prompt_length == 1


def test_masked_prompt_changes_the_loss_only_through_ignored_targets(tokenizer) -> None:
    model = tiny_model()
    batch = list(InstructionDataset(ENTRIES, tokenizer))
    inputs, targets = collate_instructions(batch, mask_prompt=True)
    logits = model(inputs)
    kept = targets != IGNORE_INDEX
    expected = F.cross_entropy(logits[kept], targets[kept])
    assert torch.allclose(next_token_loss(model, (inputs, targets)), expected)
    assert kept.sum() < (collate_instructions(batch)[1] != IGNORE_INDEX).sum()


def test_generate_responses_equals_one_prompt_at_a_time(tokenizer) -> None:
    model = tiny_model()
    batched = generate_responses(model, tokenizer, ENTRIES, max_new_tokens=6, batch_size=3)
    for entry, answer in zip(ENTRIES, batched):
        ids = generate(model, [encode(tokenizer, response_prompt(entry))], 6, eos_id=ENDOFTEXT_ID)[0]
        assert answer == tokenizer.decode(ids).strip()
    assert response_prompt(ENTRIES[0]) == format_input(ENTRIES[0]) + "\n\n### Response:\n"


def test_response_loss_is_per_response_token_and_independent_of_batching(tokenizer) -> None:
    model = tiny_model()
    examples = [encode_example(tokenizer, response_prompt(e), e["output"]) for e in ENTRIES]
    loss, count = response_loss(model, examples, batch_size=3, pad_id=PAD)
    loss_1, count_1 = response_loss(model, examples, batch_size=1, pad_id=PAD)
    assert count == count_1 == sum(len(e.token_ids) - e.prompt_length + 1 for e in examples)  # + <|endoftext|>
    assert abs(loss - loss_1) < 1e-5
    # One example by hand: the answer's tokens and the closing <|endoftext|>.
    ex = examples[2]
    ids = torch.tensor([ex.token_ids + [PAD]])
    logits = model(ids[:, :-1])[0, ex.prompt_length - 1 :]
    by_hand = F.cross_entropy(logits, ids[0, ex.prompt_length :])
    assert abs(response_loss(model, [ex], pad_id=PAD)[0] - by_hand.item()) < 1e-5
