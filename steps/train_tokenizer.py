"""Train your own byte-level BPE on the pretraining corpus, and report its compression against GPT-2's.

Reads what the tokenize stage reads (``corpus.*``), document by document in blocks, cut into
chunks of about 1 KB at newlines: every ``heldout_every``-th chunk is held out (up to
``heldout_bytes``) for the report and never trained on; the others feed Hugging Face's BPE trainer
(``llmcore.bpe.train_bpe``) until ``sample_bytes``. Memory holds the trainer's word counts and the
held-out slice, whatever the corpus's size. The merges are exported as a tiktoken encoding
(``bpe.tiktoken`` + ``encoding.json``) into ``tokenizer.trained_dir``, which every later stage
encodes with when ``tokenizer.source: trained``.

With ``tokenizer.source: gpt2`` (the default) nothing is trained: the directory holds only
``source.json`` (so the later stages, which depend on it, are not re-run by a change of this
stage's params) and the report gives GPT-2's compression of the held-out slice.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from llmcore.bpe import ENDOFTEXT, chunks, save_encoding, to_tiktoken, train_bpe
from llmcore.tokenizer import TokenizerFilesError, get_tokenizer
from llmpipe.cli import StageParams, run_stage
from llmpipe.data import DataError, TokenizerParams
from llmpipe.io import atomic_path, write_json
from llmpipe.params import StrictModel
from steps.data.corpus import CorpusParams, corpus_files, documents

STAGE = "train_tokenizer"
EXPERIMENT = "tokenizer"
CHUNK_CHARS = 1 << 10
LONGEST = 20


class TrainTokenizerParams(StrictModel):
    vocab_size: int = Field(ge=257, le=1 << 20)  # every token: 256 bytes + merges + special tokens
    pattern: Literal["gpt2", "gpt4"]  # pre-tokenization regex (tiktoken's r50k / cl100k)
    special_tokens: list[str]  # ids after the merges, in this order
    sample_bytes: int = Field(ge=1)  # training text read (streamed), held-out chunks excluded
    heldout_every: int = Field(ge=2)  # every n-th 1 KB chunk is held out for the report
    heldout_bytes: int = Field(ge=1)  # at most this much held-out text is kept
    min_frequency: int = Field(ge=1)  # a pair merges only when it occurs this often

    @field_validator("special_tokens")
    @classmethod
    def _specials(cls, tokens: list[str]) -> list[str]:
        if ENDOFTEXT not in tokens:
            raise ValueError(f"must include {ENDOFTEXT} (the end of a document and the padding id)")
        if len(set(tokens)) != len(tokens) or not all(tokens):
            raise ValueError("must be distinct, non-empty strings")
        return tokens


class CorpusSplit:
    """The corpus as training chunks (an iterator) and a held-out slice (filled as it is read)."""

    def __init__(self, root: Path, corpus: CorpusParams, params: TrainTokenizerParams, scratch: Path):
        self.files = corpus_files(root, corpus.include)
        if not self.files:
            raise DataError(f"corpus {root} has no files to train a tokenizer on")
        self.corpus, self.params, self.scratch = corpus, params, scratch
        self.heldout: list[str] = []
        self.train_bytes = self.heldout_size = 0

    def training(self) -> Iterator[str]:
        index = 0
        for path in self.files:
            for blocks in documents(path, self.corpus.text_field, self.scratch):
                for chunk in chunks(blocks, CHUNK_CHARS):
                    index += 1
                    size = len(chunk.encode())
                    if index % self.params.heldout_every == 0:
                        if self.heldout_size < self.params.heldout_bytes:
                            self.heldout.append(chunk)
                            self.heldout_size += size
                        continue
                    if self.train_bytes >= self.params.sample_bytes:
                        if self.heldout_size >= self.params.heldout_bytes:
                            return
                        continue  # still filling the held-out slice
                    self.train_bytes += size
                    yield chunk


def compression(encoding, texts: list[str]) -> dict:
    """Bytes per token and tokens per (whitespace-separated) word of ``texts``; the ids used."""
    ids = [token for text in texts for token in encoding.encode_ordinary(text)]
    n_bytes = sum(len(text.encode()) for text in texts)
    words = sum(len(text.split()) for text in texts)
    return {
        "tokens": len(ids),
        "bytes": n_bytes,
        "words": words,
        "bytes_per_token": round(n_bytes / max(len(ids), 1), 4),
        "tokens_per_word": round(len(ids) / max(words, 1), 4),
        "distinct_ids": len(set(ids)),
    }


def longest_tokens(encoding, n: int = LONGEST) -> list[str]:
    pieces = [
        encoding.decode_single_token_bytes(i)
        for i in range(encoding.max_token_value + 1)
        if i not in encoding._special_tokens.values()
    ]
    return [p.decode("utf-8", errors="replace") for p in sorted(pieces, key=len, reverse=True)[:n]]


def gpt2_or_none(encoding_dir: str | None):
    try:
        return get_tokenizer(encoding_dir)
    except (TokenizerFilesError, OSError, ValueError) as exc:  # offline without GPT-2's files
        print(f"{STAGE}: warning: GPT-2's BPE unavailable for the comparison ({exc})")
        return None


def train_tokenizer(
    params: TrainTokenizerParams,
    *,
    root: Path,
    out_dir: Path,
    report_out: Path,
    metrics_out: Path,
    corpus: CorpusParams,
    tokenizer_params: TokenizerParams,
) -> dict:
    """Train (when ``tokenizer.source: trained``) and write ``out_dir``; write the report and metrics."""
    trained = tokenizer_params.source == "trained"
    with tempfile.TemporaryDirectory(prefix="train_tokenizer-") as scratch:
        split = CorpusSplit(root, corpus, params, Path(scratch))
        started = time.perf_counter()
        if trained:
            hf = train_bpe(
                split.training(), params.vocab_size, params.pattern, params.special_tokens, params.min_frequency
            )
            encoding = to_tiktoken(hf, params.pattern, name=f"trained-{params.vocab_size}")
        else:
            for _ in split.training():  # only the held-out slice is needed
                pass
        seconds = time.perf_counter() - started
    if not split.heldout:
        raise DataError(
            f"corpus {root} is too small for a held-out slice: fewer than {params.heldout_every} "
            f"chunks of {CHUNK_CHARS} characters; lower train_tokenizer.heldout_every"
        )
    gpt2 = gpt2_or_none(tokenizer_params.encoding_dir)
    report = {
        "source": tokenizer_params.source,
        "train_bytes": split.train_bytes,
        "heldout_bytes": split.heldout_size,
        "gpt2": compression(gpt2, split.heldout) if gpt2 else None,
    }
    with atomic_path(out_dir, is_dir=True) as tmp:
        (tmp / "source.json").write_text(json.dumps({"source": tokenizer_params.source}) + "\n")
        if trained:
            save_encoding(encoding, tmp, {"pattern_name": params.pattern, "train_bytes": split.train_bytes})
            report["trained"] = {
                **compression(encoding, split.heldout),
                "vocab_size": encoding.n_vocab,
                "train_seconds": round(seconds, 3),
                "train_mb_per_s": round(split.train_bytes / 1e6 / max(seconds, 1e-9), 3),
                "longest_tokens": longest_tokens(encoding),
            }
            report["trained"]["vocab_used"] = round(report["trained"]["distinct_ids"] / encoding.n_vocab, 4)
    write_json(report_out, report)
    metrics = headline(report)
    write_json(metrics_out, metrics)
    log_report(params, tokenizer_params, report, metrics)
    return report


def headline(report: dict) -> dict:
    """metrics/tokenizer.json: the used tokenizer's compression beside GPT-2's (``dvc exp show``)."""
    used = report.get("trained") or report["gpt2"] or {}
    metrics = {
        "vocab_size": used.get("vocab_size", 50257),
        "bytes_per_token": used.get("bytes_per_token"),
        "tokens_per_word": used.get("tokens_per_word"),
    }
    if report.get("trained"):
        metrics["vocab_used"] = report["trained"]["vocab_used"]
    if report["gpt2"]:
        metrics |= {
            "gpt2_bytes_per_token": report["gpt2"]["bytes_per_token"],
            "gpt2_tokens_per_word": report["gpt2"]["tokens_per_word"],
        }
    return metrics


def log_report(params: TrainTokenizerParams, tokenizer_params: TokenizerParams, report: dict, metrics: dict) -> None:
    from llmpipe.tracking import stage_run  # mlflow imports take seconds: not at import

    with stage_run(STAGE, EXPERIMENT, {**params.model_dump(), "source": tokenizer_params.source}):
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        mlflow.log_dict(report, "tokenizer_report.json")


def main(argv: list[str] | None = None) -> None:
    def body(args, params: StageParams) -> str:
        corpus = params.section("corpus", CorpusParams)
        tokenizer_params = params.section("tokenizer", TokenizerParams)
        out = args.out or Path(tokenizer_params.trained_dir)
        report = train_tokenizer(
            params.section(STAGE, TrainTokenizerParams),
            root=args.corpus or Path(corpus.root),
            out_dir=out,
            report_out=args.report,
            metrics_out=args.metrics,
            corpus=corpus,
            tokenizer_params=tokenizer_params,
        )
        line = ", ".join(
            f"{name}: {report[name]['bytes_per_token']} bytes/token, {report[name]['tokens_per_word']} tokens/word"
            for name in ("trained", "gpt2")
            if report.get(name)
        )
        return f"{report['source']} -> {out}; held-out {report['heldout_bytes'] / 1e6:.2f} MB: {line}"

    run_stage(
        STAGE,
        "Train a byte-level BPE on the corpus (tiktoken encoding) and report its compression.",
        body,
        argv=argv,
        errors=(DataError, TokenizerFilesError),
        paths={
            "corpus": (None, "the corpus (default: corpus.root)"),
            "out": (None, "default: tokenizer.trained_dir"),
            "report": "compression, vocabulary use, the longest tokens",
            "metrics": "the compression figures dvc exp show compares",
        },
    )


if __name__ == "__main__":
    main()
