"""Tokenize the pretraining corpus with GPT-2's BPE into a uint16 token array, plus its counts."""

from __future__ import annotations

import sys
from pathlib import Path

from llmcore.tokenizer import TokenizerFilesError, encode, get_tokenizer
from steps.common.data import DataError, TokenizerParams, read_text, save_npy, to_token_array
from steps.common.io import write_json
from steps.common.params import ParamsError, cli_parser, load_section


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
    parser = cli_parser("Tokenize the corpus into a uint16 .npy of GPT-2 token ids.")
    parser.add_argument("--corpus", type=Path, default=Path("data/raw/corpus.txt"))
    parser.add_argument("--tokens", type=Path, default=Path("data/tokens/corpus.npy"))
    parser.add_argument("--metrics", type=Path, default=Path("reports/tokenize.json"))
    args = parser.parse_args(argv)
    try:
        params = load_section("tokenizer", TokenizerParams, args.params)
        metrics = tokenize_corpus(args.corpus, args.tokens, args.metrics, params)
    except (ParamsError, DataError, TokenizerFilesError) as exc:
        sys.exit(f"tokenize: error: {exc}")
    print(f"tokenize: {metrics['characters']} characters -> {metrics['tokens']} tokens in {args.tokens}")


if __name__ == "__main__":
    main()
