"""Tokenize the pretraining corpus with GPT-2's BPE into token shards, streaming and in parallel.

The corpus (``corpus`` in params.yaml: a file or a directory, optionally narrowed by globs; text,
markdown, JSONL, parquet, each optionally gzipped) is read document by document and cut into
pieces of about a million characters where BPE splits anyway (``steps.data.corpus``). Worker
threads encode the pieces with tiktoken, which releases the GIL, while the main thread reads
ahead; the tokens are written in corpus order, so the shards do not depend on the thread count
and equal the ids of encoding the whole corpus at once. Memory holds a few pieces, whatever the
corpus's size. The work directory ``.cache/tokenize/<key>`` (outside DVC's outputs) holds the
committed shards: a killed run resumes after the last committed file.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

import numpy as np

from llmcore.tokenizer import ENDOFTEXT, TokenizerFilesError, eot_id, get_tokenizer, tokenizer_digest
from llmpipe.cli import StageParams, run_stage
from llmpipe.data import DataError, TokenizerParams
from llmpipe.io import record_state_params, resume_state_dir, write_json
from steps.data.corpus import CorpusParams, Counts, Pieces, Skipped, corpus_files, documents
from steps.data.shards import ShardWriter, TokenizerIdentity

STATE_DIR = Path(".cache/tokenize")
T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``map(fn, items)`` on ``workers`` threads, in order, with at most ``2 * workers`` items in flight."""
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def work_items(
    files: list[Path], start: int, params: CorpusParams, counts: Counts, scratch: Path
) -> Iterator[tuple[str, tuple[int, dict] | None]]:
    """Pieces of text from file ``start`` on; each file's last piece carries (file index, counts so far)."""
    pieces = Pieces(params.endoftext, counts)
    for index in range(start, len(files)):
        for document in documents(files[index], params.text_field, scratch):
            yield from ((piece, None) for piece in pieces.document(document))
        counts.files += 1
        counts.bytes += files[index].stat().st_size
        yield pieces.take(), (index, asdict(counts))


def tokenize_corpus(
    params: CorpusParams,
    *,
    root: Path,
    out_dir: Path,
    metrics_out: Path,
    tokenizer_params: TokenizerParams,
    state_dir: Path = STATE_DIR,
) -> dict:
    """Write the corpus's token shards to ``out_dir`` and its counts to ``metrics_out``."""
    skipped: list[Skipped] = []
    files = corpus_files(root, params.include, skipped)  # warns about each entry it skips
    tokenizer = get_tokenizer(tokenizer_params.directory)
    dtype = np.uint16 if tokenizer.n_vocab <= 1 << 16 else np.uint32
    digest = tokenizer_digest(tokenizer)
    inputs = [
        (str(p.relative_to(root)) if p != root else p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files
    ]
    work_dir = resume_state_dir(state_dir, str(root), params.model_dump(exclude={"workers"}), digest, inputs)
    writer = ShardWriter(work_dir, dtype)
    record_state_params(work_dir, "corpus", params.model_dump(mode="json"))
    counts = Counts(**writer.state["counts"])
    allowed = {ENDOFTEXT}

    def encode(item: tuple[str, tuple[int, dict] | None]) -> tuple[np.ndarray, tuple[int, dict] | None]:
        text, marker = item
        return tokenizer.encode_to_numpy(text, allowed_special=allowed, disallowed_special=()).astype(dtype), marker

    workers = params.workers or len(os.sched_getaffinity(0))
    for tokens, marker in ordered_map(encode, work_items(files, writer.next_file, params, counts, work_dir), workers):
        writer.write(tokens)
        if marker is not None and writer.open_tokens >= params.shard_tokens:
            writer.commit(marker[0] + 1, marker[1])
    writer.commit(len(files), asdict(counts))
    if not writer.state["shards"]:
        raise DataError(f"corpus {root} has no text ({counts.empty_documents} empty document(s))")
    meta = writer.finish(
        out_dir,
        vocab_size=tokenizer.n_vocab,
        endoftext_id=eot_id(tokenizer),
        tokenizer=TokenizerIdentity(name=tokenizer.name, sha256=digest),
    )
    metrics = {
        **asdict(counts),
        "tokens": meta.tokens,
        "shards": len(meta.shards),
        "skipped_entries": len(skipped),
        "skipped": [asdict(s) for s in skipped[:100]],
    }
    write_json(metrics_out, metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    def body(args, params: StageParams) -> str:
        corpus = params.section("corpus", CorpusParams)
        started = time.perf_counter()
        metrics = tokenize_corpus(
            corpus,
            root=args.corpus or Path(corpus.root),
            out_dir=args.tokens,
            metrics_out=args.metrics,
            tokenizer_params=params.section("tokenizer", TokenizerParams),
            state_dir=args.state_dir,
        )
        seconds = time.perf_counter() - started
        return (
            f"{metrics['files']} file(s), {metrics['documents']} document(s), {metrics['bytes'] / 1e6:.1f} MB -> "
            f"{metrics['tokens']} tokens in {metrics['shards']} shard(s) in {args.tokens} "
            f"({metrics['bytes'] / 1e6 / max(seconds, 1e-9):.1f} MB/s)"
            + (
                f"; {metrics['skipped_entries']} corpus entr(y/ies) skipped (warned above)"
                if metrics["skipped_entries"]
                else ""
            )
        )

    run_stage(
        "tokenize",
        "Tokenize the corpus into GPT-2 token shards (streaming, parallel, resumable).",
        body,
        argv=argv,
        errors=(TokenizerFilesError,),
        paths={
            "corpus": (None, "corpus file or directory (default: params corpus.root)"),
            "tokens": "token shards + meta.json",
            "metrics": "token counts and skipped entries",
            "state-dir": (str(STATE_DIR), "resumable work directory"),
        },
    )


if __name__ == "__main__":
    main()
