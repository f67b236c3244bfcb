"""Preference pairs for the stages that train on or score them (preference_tune, score_preference)."""

from __future__ import annotations

from pathlib import Path

from llmcore.dpo import PreferencePair, encode_pair, fits
from steps.common.data import DataError
from steps.common.datasets import load_preference_entries


def load_pairs(path: Path, tokenizer, style: str, max_length: int) -> tuple[list[PreferencePair], list[dict], int]:
    """A split of build_preference_dataset encoded in ``style``: the pairs that keep a scored token of
    both answers within ``max_length``, their entries, and how many were left out."""
    entries = load_preference_entries(path)
    if not entries:
        raise DataError(f"{path}: no preference entries")
    pairs = [encode_pair(tokenizer, entry, style) for entry in entries]
    kept = [i for i, pair in enumerate(pairs) if fits(pair, max_length)]
    if not kept:
        raise DataError(f"{path}: no pair's answer starts within max_length {max_length} tokens")
    return [pairs[i] for i in kept], [entries[i] for i in kept], len(pairs) - len(kept)
