"""Tokenize the pretraining corpus with GPT-2's BPE into a uint16 token array, plus its counts."""

from __future__ import annotations

from pathlib import Path

from llmcore.tokenizer import TokenizerFilesError, encode, get_tokenizer
from steps.common.cli import StageParams, run_stage
from steps.common.data import DataError, TokenizerParams, read_text, save_npy, to_token_array
from steps.common.io import write_json


def tokenize_corpus(corpus: Path, tokens_out: Path, metrics_out: Path, params: TokenizerParams) -> dict[str, int]:
    """Write the corpus's token ids to ``tokens_out`` and its character/token counts to ``metrics_out``."""
    text = read_text(corpus)
    if not text:
        raise DataError(f"corpus {corpus} is empty")
    tokens = to_token_array(encode(get_tokenizer(params.encoding_dir), text))
    save_npy(tokens_out, tokens)
    metrics = {"characters": len(text), "tokens": int(tokens.size)}
    write_json(metrics_out, metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    def body(args, params: StageParams) -> str:
        metrics = tokenize_corpus(args.corpus, args.tokens, args.metrics, params.section("tokenizer", TokenizerParams))
        return f"{metrics['characters']} characters -> {metrics['tokens']} tokens in {args.tokens}"

    run_stage("tokenize", "Tokenize the corpus into a uint16 .npy of GPT-2 token ids.", body, argv=argv,
              errors=(TokenizerFilesError,),
              paths={"corpus": "data/raw/corpus.txt", "tokens": "data/tokens/corpus.npy", "metrics": "reports/tokenize.json"})


if __name__ == "__main__":
    main()
