"""The book's Alpaca-style prompt format for instruction fine-tuning, and reading a response back.

Data preparation, fine-tuning and evaluation must agree on this text to the character, so it
lives in one place.
"""

from __future__ import annotations

from collections.abc import Mapping

PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
RESPONSE_MARKER = "### Response:"


def format_input(entry: Mapping[str, str]) -> str:
    """The prompt: preamble, instruction, and the input section only when the input is non-empty."""
    text = f"{PREAMBLE}\n\n### Instruction:\n{entry['instruction']}"
    if entry.get("input"):
        text += f"\n\n### Input:\n{entry['input']}"
    return text


def format_response(entry: Mapping[str, str]) -> str:
    """The target the model learns to continue the prompt with."""
    return f"\n\n{RESPONSE_MARKER}\n{entry['output']}"


def extract_response(generated_text: str, prompt: str) -> str:
    """The model's answer: what follows the prompt and the response marker, stripped."""
    answer = generated_text[len(prompt) :] if generated_text.startswith(prompt) else generated_text
    _, marker, after = answer.partition(RESPONSE_MARKER)
    return (after if marker else answer).strip()
