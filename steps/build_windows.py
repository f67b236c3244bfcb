"""Split the corpus's token ids into train/validation and cut each into next-token windows.

The split is on token ids, at ``int(train_ratio * n_tokens)``: the corpus is tokenized once,
the boundary never cuts a token, and a corpus too large for RAM can be memory-mapped. (The book
splits the text by characters and tokenizes each part; on the-verdict both give 18 train and 2
validation windows of 256, and the same train windows, but validation windows shifted by a few
tokens.)

Output contract, read by the pretraining step: ``train.npy`` and ``val.npy`` hold uint16 arrays
of shape (n_windows, context_length + 1), inputs ``row[:-1]`` and targets ``row[1:]``; windows
start at 0, stride, 2*stride, ... exactly as ``llmcore.data.SlidingWindowDataset``. ``meta.json``
records the parameters and counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydantic import Field

from steps.common.cli import StageParams, run_stage
from steps.common.data import DataError, load_tokens
from steps.common.io import atomic_path, write_json
from steps.common.params import StrictModel


class WindowParams(StrictModel):
    context_length: int = Field(256, gt=0)
    stride: int = Field(256, gt=0)
    train_ratio: float = Field(0.9, gt=0, lt=1)


def make_windows(tokens: np.ndarray, context_length: int, stride: int, split: str) -> np.ndarray:
    """Rows of ``context_length + 1`` tokens starting every ``stride`` tokens (book's windowing)."""
    needed = context_length + 1
    if len(tokens) < needed:
        raise DataError(
            f"{split} split has {len(tokens)} tokens; one window of context_length={context_length} "
            f"needs at least {needed}"
        )
    return np.ascontiguousarray(np.lib.stride_tricks.sliding_window_view(tokens, needed)[::stride])


def build_windows(tokens_path: Path, out_dir: Path, metrics_out: Path, params: WindowParams) -> dict:
    """Write ``train.npy``, ``val.npy`` and ``meta.json`` to ``out_dir``; return the metadata."""
    tokens = load_tokens(tokens_path)
    split_at = int(len(tokens) * params.train_ratio)
    splits = {"train": tokens[:split_at], "val": tokens[split_at:]}
    windows = {name: make_windows(part, params.context_length, params.stride, name) for name, part in splits.items()}
    meta = {
        **params.model_dump(),
        "n_train_windows": len(windows["train"]),
        "n_val_windows": len(windows["val"]),
        "train_tokens": len(splits["train"]),
        "val_tokens": len(splits["val"]),
    }
    with atomic_path(out_dir, is_dir=True) as tmp:
        for name, rows in windows.items():
            np.save(tmp / f"{name}.npy", rows)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    write_json(metrics_out, meta)
    return meta


def main(argv: list[str] | None = None) -> None:
    def body(args, params: StageParams) -> str:
        meta = build_windows(args.tokens, args.out, args.metrics, params.section("windows", WindowParams))
        return f"{meta['n_train_windows']} train, {meta['n_val_windows']} val windows in {args.out}"

    run_stage("build_windows", "Split the token ids into train/val and cut them into sliding windows.", body,
              paths={"tokens": "data/tokens/corpus.npy", "out": "data/windows", "metrics": "reports/windows.json"},
              argv=argv)


if __name__ == "__main__":
    main()
