"""What the data steps share: their error type, the tokenizer params, file names and reading text."""

from __future__ import annotations

import os
from pathlib import Path

from steps.common.params import StrictModel

# The class names (in class-id order) beside a classification dataset's split CSVs.
LABELS_FILE = "labels.json"
DISCARDED = "discarded"  # build_spam_dataset's rows no split holds: discarded.csv (Text only)


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
