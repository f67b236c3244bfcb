"""The pretraining windows: views over the memory-mapped token shards, defined by build_windows.

``data/windows/meta.json`` records the split, the windowing and the digest of the token shards'
index; the stages that train on or score the windows build them here, so a window is sliced from
the shards when it is used and nothing is ever copied per window.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field
from torch.utils.data import Dataset

from llmcore.config import GPTConfig
from llmcore.data import RandomWindowDataset, SlidingWindowDataset, TokenShards
from llmpipe.data import DataError, read_stage_json
from llmpipe.io import sha256_file
from llmpipe.params import StrictModel
from steps.data.shards import META_FILE, ShardsMeta, read_shards_meta

WINDOWS_META = "meta.json"


class WindowParams(StrictModel):
    """params.yaml ``windows``: how build_windows splits the token ids and windows them."""

    context_length: int = Field(gt=0)
    stride: int = Field(gt=0)
    train_ratio: float = Field(gt=0, lt=1)
    sampling: Literal["fixed", "random"]  # training windows: every stride tokens, or random offsets
    random_windows: int | None = Field(ge=1)  # random training windows per epoch; None: n_tokens / context
    seed: int  # the random offsets


class WindowsMeta(WindowParams):
    """``data/windows/meta.json``, what build_windows hands to the stages that train on or score the
    windows: its params, the windows they give, and the token shards they are views over."""

    n_train_windows: int = Field(ge=1)
    n_val_windows: int = Field(ge=1)
    train_tokens: int = Field(ge=2)
    val_tokens: int = Field(ge=2)
    tokens: str  # the token shards' directory
    tokens_sha256: str  # of its meta.json: the windows are stale once it changes
    max_token_id: int = Field(ge=0)


def load_token_shards(directory: Path) -> tuple[TokenShards, ShardsMeta]:
    """The shards in ``directory`` as one memory-mapped token sequence, and their ``meta.json``."""
    meta = read_shards_meta(directory)
    dtype = np.dtype(meta.dtype).newbyteorder("<")
    arrays = []
    for shard in meta.shards:
        path = directory / shard.file
        size = path.stat().st_size if path.is_file() else None
        if size != shard.tokens * dtype.itemsize:
            raise DataError(
                f"{path}: expected {shard.tokens} {dtype.name} tokens, "
                f"found {'no file' if size is None else f'{size} bytes'}"
            )
        arrays.append(np.memmap(path, dtype=dtype, mode="r"))
    if not arrays:
        raise DataError(f"{directory}: the corpus has no tokens")
    return TokenShards(arrays), meta


def split_windows(tokens: TokenShards, spec: WindowParams, *, sampled: bool = True) -> dict[str, Dataset]:
    """The train and val windows that ``spec`` (build_windows' params) defines over ``tokens``.

    ``sampled=False`` gives fixed-stride training windows even when ``spec`` samples at random
    offsets (scoring wants the same windows every time).
    """
    context, split_at = spec.context_length, int(len(tokens) * spec.train_ratio)
    parts = {"train": tokens.view(0, split_at), "val": tokens.view(split_at, len(tokens))}
    for name, part in parts.items():
        if len(part) < context + 1:
            raise DataError(
                f"{name} split has {len(part)} tokens; one window of context_length={context} "
                f"needs at least {context + 1}"
            )
    windows: dict[str, Dataset] = {
        name: SlidingWindowDataset(part, context, spec.stride) for name, part in parts.items()
    }
    if sampled and spec.sampling == "random":
        n_samples = spec.random_windows or math.ceil((split_at - context) / context)
        windows["train"] = RandomWindowDataset(parts["train"], context, n_samples, spec.seed)
    return windows


def read_windows_meta(windows_dir: Path) -> WindowsMeta:
    return read_stage_json(windows_dir / WINDOWS_META, WindowsMeta, "windows", "build_windows")


def window_files(windows_dir: Path) -> dict[str, Path]:
    """The files that pin down the windows: their definition and the index of the token shards."""
    return {"windows": windows_dir / WINDOWS_META, "tokens": Path(read_windows_meta(windows_dir).tokens) / META_FILE}


def load_windows(windows_dir: Path, cfg: GPTConfig, *, exact: bool = True, sampled: bool = True) -> dict[str, Dataset]:
    """The train and val windows of ``windows_dir``: views over the memory-mapped token shards.

    Training needs windows exactly as long as the model's context; scoring (``exact=False``)
    accepts shorter ones.
    """
    meta = read_windows_meta(windows_dir)
    tokens_dir = Path(meta.tokens)
    tokens, _ = load_token_shards(tokens_dir)
    if sha256_file(tokens_dir / META_FILE) != meta.tokens_sha256:
        raise DataError(f"{windows_dir} was built from other tokens than {tokens_dir} holds now: rerun build_windows")
    width = meta.context_length
    if width > cfg.context_length or (exact and width != cfg.context_length):
        raise DataError(
            f"{windows_dir} holds windows of context_length {width} but the model's "
            f"context_length is {cfg.context_length}: score the model on windows built with its "
            "context (windows.context_length in params.yaml)"
        )
    if meta.max_token_id >= cfg.vocab_size:
        raise DataError(
            f"{tokens_dir}: token id {meta.max_token_id} is outside the model's vocabulary ({cfg.vocab_size})"
        )
    return split_windows(tokens, meta, sampled=sampled)
