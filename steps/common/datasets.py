"""Reading the datasets the data stages write, for the stages that train on or score them.

Each reader checks what it reads again (an input may have been edited by hand) and reports a
problem as a ``DataError`` naming the file and the row, entry or field.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from llmcore.config import GPTConfig
from llmcore.data import WindowArrayDataset
from steps.common.data import DataError, read_text


def load_windows(path: Path, cfg: GPTConfig, *, exact: bool = True) -> WindowArrayDataset:
    """The windows in ``path`` as a dataset over a memory map (never read into RAM at once).

    Training needs windows exactly as long as the model's context; scoring (``exact=False``)
    accepts shorter ones.
    """
    try:
        windows = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot load windows {path}: {exc}") from exc
    if windows.ndim != 2 or windows.dtype != np.uint16 or len(windows) == 0:
        raise DataError(f"{path}: expected a non-empty 2-D uint16 array of windows, got {windows.dtype} {windows.shape}")
    width = windows.shape[1] - 1
    if width > cfg.context_length or (exact and width != cfg.context_length):
        raise DataError(
            f"{path} holds windows of context_length {width} but the model's "
            f"context_length is {cfg.context_length}: score the model on windows built with its "
            "context (windows.context_length in params.yaml)"
        )
    if int(windows.max()) >= cfg.vocab_size:
        raise DataError(f"{path}: token id {int(windows.max())} is outside the model's vocabulary ({cfg.vocab_size})")
    return WindowArrayDataset(windows)


def read_spam_split(path: Path) -> pd.DataFrame:
    """A split CSV from build_spam_dataset: ``Label`` 0 (ham) / 1 (spam) and ``Text``."""
    try:
        df = pd.read_csv(path, dtype={"Text": str}, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    missing = {"Label", "Text"} - set(df.columns)
    if missing:
        raise DataError(f"{path}: missing column(s) {sorted(missing)}")
    bad = ~df["Label"].isin([0, 1])
    if bad.any():
        raise DataError(f"{path} row {int(bad.idxmax()) + 1}: Label must be 0 or 1, got {df['Label'][bad.idxmax()]!r}")
    if df.empty:
        raise DataError(f"{path}: no rows")
    return df


class InstructionEntry(BaseModel):
    """One entry; strict, so a number is not silently taken for a string. Extra keys are kept."""

    model_config = ConfigDict(strict=True, extra="allow")

    instruction: str = Field(min_length=1)
    input: str
    output: str = Field(min_length=1)


_ENTRIES = TypeAdapter(list[InstructionEntry])


def load_entries(path: Path) -> list[dict]:
    """The raw entries of a JSON list, after checking each one's fields."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc
    try:
        _ENTRIES.validate_python(data)
    except ValidationError as exc:
        problems = [_describe(err) for err in exc.errors()]
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise DataError(f"{path}: " + "; ".join(problems[:3]) + more) from None
    return data


def _describe(err: dict) -> str:
    loc = err["loc"]
    if not loc:
        return f"top level: {err['msg']}"
    where = f"entry {loc[0]}" + (f" field {loc[1]!r}" if len(loc) > 1 else "")
    return f"{where}: {err['msg']}"
