"""What the data steps share: their error type, the tokenizer params, file names and reading text."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ValidationError

from llmpipe.params import StrictModel

# The class names (in class-id order) beside a classification dataset's split CSVs.
LABELS_FILE = "labels.json"
DISCARDED = "discarded"  # build_spam_dataset's rows no split holds: discarded.csv (Text only)


class DataError(ValueError):
    """An input file is missing or malformed; the message says which file and where."""


class TokenizerParams(StrictModel):
    """Which BPE every stage encodes with: GPT-2's (its files in ``encoding_dir``; ``None`` falls back to
    ``$LLMCORE_GPT2_ENCODING_DIR``, then tiktoken) or the one train_tokenizer wrote to ``trained_dir``."""

    source: Literal["gpt2", "trained"]
    encoding_dir: str | None
    trained_dir: str

    @property
    def directory(self) -> str | None:
        """What ``llmcore.tokenizer.get_tokenizer`` and the model directories' bundling take."""
        return self.trained_dir if self.source == "trained" else self.encoding_dir


M = TypeVar("M", bound=BaseModel)


def read_stage_json(path: Path, model: type[M], what: str, stage: str) -> M:
    """A JSON file one stage writes and later ones read (a ``meta.json``), as its typed ``model``:
    unreadable, not JSON or not the model is a DataError naming the file (and the first bad field)
    and the stage that makes it."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise DataError(f"cannot read {what} {path}: {exc.strerror or exc} (run the {stage} stage)") from exc
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(the file)"
        raise DataError(f"{path}: {field}: {err['msg']} (rerun the {stage} stage)") from None


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 input file's text, with read and decoding failures reported as ``DataError``."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not valid UTF-8: {exc}") from exc
