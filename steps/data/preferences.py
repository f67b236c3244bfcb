"""Preference pairs for the stages that train on or score them (preference_tune, score_preference)."""

from __future__ import annotations

from pathlib import Path

from llmcore.dpo import PreferencePair, encode_pair, truncate_pair
from llmpipe.data import DataError
from steps.data.datasets import load_preference_entries


def load_pairs(path: Path, tokenizer, style: str, max_length: int) -> tuple[list[PreferencePair], list[dict], int]:
    """A split of build_preference_dataset encoded in ``style`` and fitted to ``max_length`` tokens
    (``truncate_pair``): the pairs, their entries, and how many lost the start of their prompt."""
    entries = load_preference_entries(path)
    if not entries:
        raise DataError(f"{path}: no preference entries")
    encoded = [encode_pair(tokenizer, entry, style) for entry in entries]
    pairs = [truncate_pair(pair, max_length) for pair in encoded]
    return pairs, entries, sum(a is not b for a, b in zip(pairs, encoded))
