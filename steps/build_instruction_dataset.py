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

import json
from pathlib import Path

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from llmcore.prompts import segments
from llmcore.tokenizer import TokenizerFilesError, encode, get_tokenizer
from steps.common.cli import StageParams, run_stage
from steps.common.data import DataError, TokenizerParams
from steps.common.datasets import INSTRUCTIONS_META, load_entries
from steps.common.io import atomic_path, write_json
from steps.common.params import StrictModel

SPLITS = ("train", "test", "validation")


class InstructionDataParams(StrictModel):
    input: str = "data/raw/instruction-data.json"  # .json list or .jsonl (DVC's dependency of this stage)
    prompt_style: Literal["alpaca", "phi3"] = "alpaca"  # how entries become text (llmcore.prompts)
    train_frac: float = Field(0.85, gt=0, lt=1)
    test_frac: float = Field(0.10, gt=0, lt=1)
    shuffle: bool = False
    seed: int = 123

    @model_validator(mode="after")
    def _leaves_validation(self) -> InstructionDataParams:
        if self.train_frac + self.test_frac >= 1:
            raise ValueError("train_frac + test_frac must be < 1 to leave a validation split")
        return self


def split_entries(entries: list[dict], params: InstructionDataParams) -> dict[str, list[dict]]:
    """Train, test and validation slices, in file order unless ``shuffle`` is set."""
    if params.shuffle:
        order = np.random.default_rng(params.seed).permutation(len(entries))
        entries = [entries[i] for i in order]
    train_end = int(len(entries) * params.train_frac)
    test_end = train_end + int(len(entries) * params.test_frac)
    splits = dict(zip(SPLITS, (entries[:train_end], entries[train_end:test_end], entries[test_end:])))
    empty = [name for name, part in splits.items() if not part]
    if empty:
        raise DataError(f"{len(entries)} entries leave the {', '.join(empty)} split(s) empty")
    return splits


def length_stats(lengths: list[int]) -> dict[str, int | float]:
    values = np.asarray(lengths)
    return {
        "entries": len(values),
        "tokens_min": int(values.min()),
        "tokens_mean": round(float(values.mean()), 2),
        "tokens_max": int(values.max()),
        "tokens_p95": round(float(np.percentile(values, 95)), 2),
    }


def build_instruction_dataset(
    source: Path, out_dir: Path, metrics_out: Path, params: InstructionDataParams, tokenizer: TokenizerParams
) -> dict:
    """Write ``train.json``, ``test.json``, ``validation.json`` and per-split token-length stats."""
    splits = split_entries(load_entries(source), params)
    tok = get_tokenizer(tokenizer.encoding_dir)
    style = params.prompt_style
    metrics = {
        name: length_stats([len(encode(tok, "".join(text for text, _ in segments(e, style)))) for e in part])
        for name, part in splits.items()
    }
    with atomic_path(out_dir, is_dir=True) as tmp:
        for name, part in splits.items():
            (tmp / f"{name}.json").write_text(json.dumps(part, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        write_json(tmp / INSTRUCTIONS_META, {"prompt_style": style})
    write_json(metrics_out, metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    def body(args, params: StageParams) -> str:
        settings = params.section("instruction_data", InstructionDataParams)
        metrics = build_instruction_dataset(args.input or Path(settings.input), args.out, args.metrics, settings,
                                            params.section("tokenizer", TokenizerParams))
        return ", ".join(f"{name} {metrics[name]['entries']}" for name in SPLITS) + f" in {args.out}"

    run_stage("build_instruction_dataset", "Validate and split the instruction data; report prompt token lengths.",
              body, errors=(TokenizerFilesError,), argv=argv, paths={
                  "input": (None, "entries (default: params instruction_data.input)"), "out": "data/instructions",
                  "metrics": "reports/instruction_data.json"})


if __name__ == "__main__":
    main()
