"""What the data steps share: their error type, the tokenizer params and uint16 token arrays."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from steps.common.io import atomic_path
from steps.common.params import StrictModel

# GPT-2's ids (< 50,257) fit in uint16, which halves the size of every token array on disk.
TOKEN_DTYPE = np.uint16


class DataError(ValueError):
    """An input file is missing or malformed; the message says which file and where."""


class TokenizerParams(StrictModel):
    """Where the GPT-2 BPE files are; ``None`` falls back to ``$LLMCORE_GPT2_ENCODING_DIR``, then tiktoken."""

    encoding_dir: str | None = None


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 input file's text, with read and decoding failures reported as ``DataError``."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not valid UTF-8: {exc}") from exc


def to_token_array(ids: list[int] | np.ndarray) -> np.ndarray:
    """Token ids as uint16, refusing any id that uint16 would silently wrap."""
    array = np.asarray(ids, dtype=np.int64)
    if array.size and (array.min() < 0 or array.max() > np.iinfo(TOKEN_DTYPE).max):
        raise DataError(
            f"token ids span [{array.min()}, {array.max()}], outside uint16; "
            "a vocabulary this large needs a wider dtype"
        )
    return array.astype(TOKEN_DTYPE)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` through a temp file, so a crash never leaves a partial array at ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


def load_tokens(path: str | os.PathLike) -> np.ndarray:
    """A 1-D uint16 token array written by the tokenize step, memory-mapped (corpora may be large)."""
    try:
        tokens = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot load token array {path}: {exc}") from exc
    if tokens.ndim != 1 or tokens.dtype != TOKEN_DTYPE:
        raise DataError(f"{path}: expected a 1-D uint16 token array, got {tokens.dtype} {tokens.shape}")
    return tokens
