"""Validate the instruction data (book chapter 7), split it, and measure its prompt lengths.

The input is a JSON list or a JSONL file of entries, each Alpaca-style (``instruction``, ``input``,
``output``) or a chat (``messages`` with ``system``/``user``/``assistant`` turns), checked entry by
entry (errors name the entry or line and the field). The book slices the entries in file order
(85% train, 10% test, the rest validation); that stays the default, with an optional seeded
shuffle. The splits keep the entries as they are; ``meta.json`` records the prompt style
(``prompt_style``, ``llmcore.prompts``) that fine-tuning and scoring render them in. Token
lengths are of the full training text in that style, which bounds the context length
fine-tuning needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from llmcore.prompts import segments
from llmcore.tokenizer import TokenizerFilesError, encode, get_tokenizer
from llmpipe.cli import StageParams, run_stage
from llmpipe.data import TokenizerParams
from llmpipe.io import write_json
from steps.data.datasets import SPLITS, SplitParams, length_stats, load_entries, split_entries, write_splits


class InstructionDataParams(SplitParams):
    input: str  # .json list or .jsonl (DVC's dependency of this stage)
    prompt_style: Literal["alpaca", "phi3"]  # how entries become text (llmcore.prompts)


def build_instruction_dataset(
    params: InstructionDataParams, *, source: Path, out_dir: Path, metrics_out: Path, tokenizer: TokenizerParams
) -> dict:
    """Write ``train.json``, ``test.json``, ``validation.json`` and per-split token-length stats."""
    splits = split_entries(load_entries(source), params)
    tok = get_tokenizer(tokenizer.directory)
    style = params.prompt_style
    metrics = {
        name: length_stats([len(encode(tok, "".join(text for text, _ in segments(e, style)))) for e in part])
        for name, part in splits.items()
    }
    write_splits(out_dir, splits, {"prompt_style": style})
    write_json(metrics_out, metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    def body(args, params: StageParams) -> str:
        settings = params.section("instruction_data", InstructionDataParams)
        metrics = build_instruction_dataset(
            settings,
            source=args.input or Path(settings.input),
            out_dir=args.out,
            metrics_out=args.metrics,
            tokenizer=params.section("tokenizer", TokenizerParams),
        )
        return ", ".join(f"{name} {metrics[name]['entries']}" for name in SPLITS) + f" in {args.out}"

    run_stage(
        "build_instruction_dataset",
        "Validate and split the instruction data; report prompt token lengths.",
        body,
        errors=(TokenizerFilesError,),
        argv=argv,
        paths={
            "input": (None, "entries (default: params instruction_data.input)"),
            "out": "the splits",
            "metrics": "entry counts and prompt token lengths",
        },
    )


if __name__ == "__main__":
    main()
