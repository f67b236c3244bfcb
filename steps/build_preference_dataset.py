"""Validate the preference data (the book's chapter 7 DPO bonus), split it, and measure it.

The input is a JSON list or a JSONL file of preference entries: Alpaca-style (``instruction``,
``input``, ``chosen``, ``rejected``; the book's ``instruction-data-with-preference.json`` also has
``output``, kept) or chats (``prompt``: messages ending with the user's turn; ``chosen`` and
``rejected``: a string or one assistant message), checked entry by entry (errors name the file,
the entry or line and the field). The book slices the entries in file order, 85% train, 10% test,
the rest validation, as the instruction data (for the book's file the same instructions land in
the same splits as ``build_instruction_dataset``'s, so DPO never trains on an instruction test
prompt); an optional seeded shuffle. The splits keep the entries as they are; the prompt style
they are rendered in is the instruction model's (its checkpoint records it). Pairs whose two
completions are identical are kept (the book keeps its 6) and counted: they carry no preference.
"""

from __future__ import annotations

from pathlib import Path

from llmcore.prompts import preference_parts
from llmcore.tokenizer import TokenizerFilesError, encode, get_tokenizer
from llmpipe.cli import StageParams, run_stage
from llmpipe.data import TokenizerParams
from llmpipe.io import write_json
from steps.data.datasets import (
    SPLITS,
    SplitParams,
    length_stats,
    load_preference_entries,
    split_entries,
    write_splits,
)

STAGE = "build_preference_dataset"


class PreferenceDataParams(SplitParams):
    input: str  # .json list or .jsonl (DVC's dependency)


def build_preference_dataset(
    params: PreferenceDataParams, *, source: Path, out_dir: Path, metrics_out: Path, tokenizer: TokenizerParams
) -> dict:
    """Write ``train.json``, ``test.json``, ``validation.json`` and per-split completion statistics."""
    splits = split_entries(load_preference_entries(source), params)
    tok = get_tokenizer(tokenizer.directory)
    metrics = {}
    for name, part in splits.items():
        parts = [preference_parts(entry) for entry in part]
        metrics[name] = {
            "chosen": length_stats([len(encode(tok, chosen)) for _, chosen, _ in parts]),
            "rejected": length_stats([len(encode(tok, rejected)) for _, _, rejected in parts]),
            "identical_pairs": sum(chosen == rejected for _, chosen, rejected in parts),
        }
    write_splits(out_dir, splits)
    write_json(metrics_out, metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    def body(args, params: StageParams) -> str:
        settings = params.section("preference_data", PreferenceDataParams)
        metrics = build_preference_dataset(
            settings,
            source=args.input or Path(settings.input),
            out_dir=args.out,
            metrics_out=args.metrics,
            tokenizer=params.section("tokenizer", TokenizerParams),
        )
        return ", ".join(f"{name} {metrics[name]['chosen']['entries']}" for name in SPLITS) + f" pairs in {args.out}"

    run_stage(
        STAGE,
        "Validate and split the preference data (chosen/rejected answers).",
        body,
        errors=(TokenizerFilesError,),
        argv=argv,
        paths={
            "input": (None, "entries (default: params preference_data.input)"),
            "out": "the splits",
            "metrics": "pair counts and token lengths",
        },
    )


if __name__ == "__main__":
    main()
