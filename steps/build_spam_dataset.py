"""Build the balanced SMS spam classification splits (book chapter 6) from the UCI TSV file.

The file is ``label<TAB>text`` per line. It is read with quoting disabled: messages contain
unbalanced ``"``, and default CSV quoting would merge lines (the book's reading keeps 4,825 of
the 4,827 ham messages, so its sampled rows differ slightly from these). Ham is undersampled to
the spam count with a seed, the rows shuffled with the same seed and cut into
train/validation/test, as the book does.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import Field, model_validator

from steps.common.cli import StageParams, run_stage
from steps.common.data import DataError
from steps.common.io import atomic_path, write_json
from steps.common.params import StrictModel

LABELS = {"ham": 0, "spam": 1}
SPLITS = ("train", "validation", "test")


class SpamDataParams(StrictModel):
    seed: int = 123
    train_frac: float = Field(0.7, gt=0, lt=1)
    validation_frac: float = Field(0.1, gt=0, lt=1)
    # "error": stop at the first malformed line; "skip": drop malformed lines and count them.
    on_malformed: Literal["error", "skip"] = "error"

    @model_validator(mode="after")
    def _leaves_test(self) -> SpamDataParams:
        if self.train_frac + self.validation_frac >= 1:
            raise ValueError("train_frac + validation_frac must be < 1 to leave a test split")
        return self


def read_messages(path: Path, on_malformed: str) -> tuple[pd.DataFrame, int]:
    """The messages with labels as strings, and how many malformed lines were skipped.

    A line is malformed without a tab, with a label other than ham/spam, or with empty text;
    a tab inside the text is kept as text.
    """
    try:
        df = pd.read_csv(
            path,
            sep="\t",
            header=None,
            names=["Label", "Text"],
            quoting=csv.QUOTE_NONE,
            dtype=str,
            keep_default_na=False,
            skip_blank_lines=False,  # keeps row i on line i + 1, for error messages
            engine="python",
            on_bad_lines=lambda fields: [fields[0], "\t".join(fields[1:])],
            encoding="utf-8",
        )
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    problems = pd.Series("", index=df.index)
    problems[df["Text"] == ""] = "empty text"
    problems[~df["Label"].isin(list(LABELS))] = "unknown label " + df["Label"].map(repr)
    problems[df["Text"].isna()] = "no tab between label and text"
    malformed = problems != ""
    if malformed.any() and on_malformed == "error":
        row = int(malformed.idxmax())
        raise DataError(
            f"{path} line {row + 1}: {problems[row]} "
            f"({int(malformed.sum())} malformed line(s); spam_data.on_malformed: skip drops them)"
        )
    return df[~malformed].reset_index(drop=True), int(malformed.sum())


def balance_and_split(df: pd.DataFrame, params: SpamDataParams) -> dict[str, pd.DataFrame]:
    """Undersample ham to the spam count, map labels to ints, shuffle, and cut the splits."""
    spam = df[df["Label"] == "spam"]
    ham = df[df["Label"] == "ham"]
    if len(spam) == 0 or len(ham) < len(spam):
        raise DataError(f"cannot balance {len(ham)} ham against {len(spam)} spam messages")
    balanced = pd.concat([ham.sample(len(spam), random_state=params.seed), spam])
    balanced["Label"] = balanced["Label"].map(LABELS)
    shuffled = balanced.sample(frac=1, random_state=params.seed).reset_index(drop=True)
    train_end = int(len(shuffled) * params.train_frac)
    validation_end = train_end + int(len(shuffled) * params.validation_frac)
    splits = dict(zip(SPLITS, (shuffled[:train_end], shuffled[train_end:validation_end], shuffled[validation_end:])))
    empty = [name for name, part in splits.items() if part.empty]
    if empty:
        raise DataError(f"{len(shuffled)} balanced messages leave the {', '.join(empty)} split(s) empty")
    return splits


def build_spam_dataset(tsv: Path, out_dir: Path, metrics_out: Path, params: SpamDataParams) -> dict:
    """Write ``train.csv``, ``validation.csv``, ``test.csv`` (Label 0/1, Text) and class counts."""
    df, skipped = read_messages(tsv, params.on_malformed)
    splits = balance_and_split(df, params)
    metrics: dict = {"source": {label: int((df["Label"] == label).sum()) for label in LABELS}}
    metrics["source"]["malformed_skipped"] = skipped
    for name, part in splits.items():
        metrics[name] = {label: int((part["Label"] == code).sum()) for label, code in LABELS.items()}
    with atomic_path(out_dir, is_dir=True) as tmp:
        for name, part in splits.items():
            part.to_csv(tmp / f"{name}.csv", index=False)
    write_json(metrics_out, metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    def body(args, params: StageParams) -> str:
        metrics = build_spam_dataset(args.input, args.out, args.metrics, params.section("spam_data", SpamDataParams))
        return ", ".join(f"{name} {sum(metrics[name].values())}" for name in SPLITS) + f" in {args.out}"

    run_stage("build_spam_dataset", "Build balanced train/validation/test CSVs from the SMS Spam Collection.", body,
              paths={"input": "data/raw/SMSSpamCollection", "out": "data/spam", "metrics": "reports/spam_data.json"},
              argv=argv)


if __name__ == "__main__":
    main()
