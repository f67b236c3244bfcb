"""What the data steps share: their error type, the tokenizer params, file names and reading text."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from llmpipe.params import StrictModel

# The class names (in class-id order) beside a classification dataset's split CSVs.
LABELS_FILE = "labels.json"
DISCARDED = "discarded"  # build_spam_dataset's rows no split holds: discarded.csv (Text only)


class DataError(ValueError):
    """An input file is missing or malformed; the message says which file and where."""


class TokenizerParams(StrictModel):
    """Which BPE every stage encodes with: GPT-2's (its files in ``encoding_dir``; ``None`` falls back to
    ``$LLMCORE_GPT2_ENCODING_DIR``, then tiktoken) or the one train_tokenizer wrote to ``trained_dir``."""

    source: Literal["gpt2", "trained"] = "gpt2"
    encoding_dir: str | None = None
    trained_dir: str = "models/tokenizer"

    @property
    def directory(self) -> str | None:
        """What ``llmcore.tokenizer.get_tokenizer`` and the model directories' bundling take."""
        return self.trained_dir if self.source == "trained" else self.encoding_dir


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 input file's text, with read and decoding failures reported as ``DataError``."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not valid UTF-8: {exc}") from exc
