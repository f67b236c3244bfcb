"""Split the corpus's token ids into train/validation and define next-token windows over them.

Windows are views, not copies: this stage checks the split and records it in ``meta.json``; the
training and scoring stages slice each window from the memory-mapped token shards when they use
it (``steps.data.datasets.load_windows``), so nothing here grows with the corpus.

The split is on token ids, at ``int(train_ratio * n_tokens)``: the corpus is tokenized once and the
boundary never cuts a token. (The book splits the text by characters and tokenizes each part; on
the-verdict both give 18 train and 2 validation windows of 256, and the same train windows, but
validation windows shifted by a few tokens.) ``fixed`` windows start at 0, stride, 2*stride, ...
of each split exactly as ``llmcore.data.SlidingWindowDataset`` (the book's windows); ``random``
training windows start at seeded random offsets (nanoGPT), validation windows stay fixed.
"""

from __future__ import annotations

from pathlib import Path

from llmpipe.cli import StageParams, run_stage
from llmpipe.io import atomic_path, sha256_file, write_json
from steps.data.shards import META_FILE
from steps.data.windows import WINDOWS_META, WindowParams, WindowsMeta, load_token_shards, split_windows


def build_windows(params: WindowParams, *, tokens_dir: Path, out_dir: Path, metrics_out: Path) -> dict:
    """Check the windows of each split and write their definition to ``out_dir/meta.json``."""
    tokens, tokens_meta = load_token_shards(tokens_dir)
    windows = split_windows(tokens, params)
    meta = WindowsMeta(
        **params.model_dump(),
        n_train_windows=len(windows["train"]),
        n_val_windows=len(windows["val"]),
        train_tokens=len(windows["train"].token_ids),
        val_tokens=len(windows["val"].token_ids),
        tokens=str(tokens_dir),
        tokens_sha256=sha256_file(tokens_dir / META_FILE),
        max_token_id=tokens_meta.max_token_id,
    ).model_dump()
    with atomic_path(out_dir, is_dir=True) as tmp:
        write_json(tmp / WINDOWS_META, meta)
    write_json(metrics_out, meta)
    return meta


def main(argv: list[str] | None = None) -> None:
    def body(args, params: StageParams) -> str:
        meta = build_windows(
            params.section("windows", WindowParams), tokens_dir=args.tokens, out_dir=args.out, metrics_out=args.metrics
        )
        return (
            f"{meta['n_train_windows']} train, {meta['n_val_windows']} val windows ({meta['sampling']}) in {args.out}"
        )

    run_stage(
        "build_windows",
        "Split the token ids into train/val and define next-token windows over them.",
        body,
        paths={"tokens": "the token shards", "out": "the windows' meta.json", "metrics": "window counts"},
        argv=argv,
    )


if __name__ == "__main__":
    main()
