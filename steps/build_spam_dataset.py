"""Build the classification splits: the book's balanced SMS spam data (chapter 6), or your own labels.

The input is the UCI SMS file (``format: sms``, ``label<TAB>text`` per line, read with quoting
disabled: messages contain unbalanced ``"``, and default CSV quoting would merge lines; the book's
reading keeps 4,825 of the 4,827 ham messages, so its sampled rows differ slightly from these), or
a CSV/TSV with a header, JSONL or parquet file (optionally compressed: ``.gz``), whose
``text_column`` and ``label_column`` are read. ``labels`` fixes the classes and their ids (a row
with another label is malformed); null takes the labels the data has.

Splits (``split``): ``balanced`` undersamples every class to the smallest one's count with a seed,
shuffles with the same seed and cuts train/validation/test, as the book does for spam;
``stratified`` keeps every row and each class's share in each split (scikit-learn, seeded).
Outputs: ``{train,validation,test}.csv`` with ``Label`` (the class id) and ``Text``,
``labels.json`` (the class names in id order), and ``discarded.csv``: the ``Text`` of the rows no
split holds (for the SMS data, the 4,080 ham messages balancing drops), which adapt_pretrain may
read as unlabeled text.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import Field, model_validator

from llmpipe.cli import StageParams, run_stage
from llmpipe.data import DISCARDED, LABELS_FILE, DataError
from llmpipe.io import atomic_path, write_json
from llmpipe.params import StrictModel
from steps.data.readers import jsonl_records, parquet_columns

SPLITS = ("train", "validation", "test")


class SpamDataParams(StrictModel):
    input: str  # the file (DVC's dependency of this stage)
    format: Literal["sms", "csv", "tsv", "jsonl", "parquet"]
    text_column: str  # csv/tsv/jsonl/parquet: the column (JSON key) of the text
    label_column: str  # ... and of the label
    labels: list[str] | None = Field(min_length=2)  # class names in id order; None: the data's
    split: Literal["balanced", "stratified"]
    seed: int
    train_frac: float = Field(gt=0, lt=1)
    validation_frac: float = Field(gt=0, lt=1)
    # "error": stop at the first malformed row; "skip": drop malformed rows and count them.
    on_malformed: Literal["error", "skip"]

    @model_validator(mode="after")
    def _leaves_test(self) -> SpamDataParams:
        if self.train_frac + self.validation_frac >= 1:
            raise ValueError("train_frac + validation_frac must be < 1 to leave a test split")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct, got {self.labels}")
        return self


def _sms(path: Path) -> pd.DataFrame:
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
    return df.assign(Where=[f"line {i + 1}" for i in range(len(df))])


def _delimited(path: Path, params: SpamDataParams) -> pd.DataFrame:
    sep = "\t" if params.format == "tsv" else ","
    columns = list(pd.read_csv(path, sep=sep, nrows=0, encoding="utf-8").columns)
    for column in (params.text_column, params.label_column):
        if column not in columns:
            raise DataError(f"{path}: no column {column!r} (columns: {columns[:20]})")
    df = pd.read_csv(
        path,
        sep=sep,
        usecols=[params.text_column, params.label_column],
        dtype=str,
        keep_default_na=False,
        encoding="utf-8",
    )
    df = df.rename(columns={params.text_column: "Text", params.label_column: "Label"})
    return df.assign(Where=[f"row {i + 1}" for i in range(len(df))])


def _records(path: Path, params: SpamDataParams) -> pd.DataFrame:
    gzipped = path.name.lower().endswith(".gz")
    rows = [
        (record.get(params.label_column), record.get(params.text_column), f"line {line_no}")
        for line_no, record in jsonl_records(path, gzipped)
    ]
    return pd.DataFrame(rows, columns=["Label", "Text", "Where"])


def _parquet(path: Path, params: SpamDataParams) -> pd.DataFrame:
    columns = [params.text_column, params.label_column]
    frames = [
        pd.DataFrame({"Text": b[params.text_column], "Label": b[params.label_column]})
        for b in parquet_columns(path, columns, strings=(params.text_column,))
    ]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["Text", "Label"])
    return df.assign(Where=[f"row {i + 1}" for i in range(len(df))])


def read_rows(path: Path, params: SpamDataParams) -> pd.DataFrame:
    """Columns ``Label`` and ``Text`` (strings, None where absent) and ``Where`` (the row's line or number)."""
    readers = {
        "sms": lambda p, _: _sms(p),
        "csv": _delimited,
        "tsv": _delimited,
        "jsonl": _records,
        "parquet": _parquet,
    }
    try:
        df = readers[params.format](path, params)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    for column in ("Label", "Text"):
        df[column] = df[column].map(lambda v: None if v is None or v != v else (v if isinstance(v, str) else str(v)))
    return df


def sorted_labels(labels: set[str]) -> list[str]:
    """Numbers in numeric order (``2`` before ``10``), anything else alphabetically."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def check_rows(path: Path, df: pd.DataFrame, params: SpamDataParams) -> tuple[pd.DataFrame, list[str], int]:
    """The well-formed rows, the class names in id order, and how many rows were skipped as malformed."""
    problems = pd.Series("", index=df.index)
    problems[df["Text"] == ""] = "empty text"
    problems[df["Text"].isna()] = f"no {params.text_column!r} value"
    if params.labels is not None:
        problems[~df["Label"].isin(params.labels)] = "unknown label " + df["Label"].map(repr)
    problems[df["Label"] == ""] = "empty label"
    problems[df["Label"].isna()] = f"no {params.label_column!r} value"
    if params.format == "sms":
        problems[df["Text"].isna()] = "no tab between label and text"
    malformed = problems != ""
    if malformed.any() and params.on_malformed == "error":
        row = int(malformed.idxmax())
        raise DataError(
            f"{path} {df['Where'][row]}: {problems[row]} "
            f"({int(malformed.sum())} malformed row(s); spam_data.on_malformed: skip drops them)"
        )
    df = df[~malformed].reset_index(drop=True)
    labels = params.labels or sorted_labels(set(df["Label"]))
    if len(set(df["Label"])) < 2:
        found = sorted(set(df["Label"]))
        raise DataError(
            f"{path}: label column {params.label_column!r} has {len(found)} class(es) {found}; "
            "a classifier needs at least two"
        )
    return df, labels, int(malformed.sum())


def _cut(rows: pd.DataFrame, params: SpamDataParams) -> dict[str, pd.DataFrame]:
    train_end = int(len(rows) * params.train_frac)
    validation_end = train_end + int(len(rows) * params.validation_frac)
    return dict(zip(SPLITS, (rows[:train_end], rows[train_end:validation_end], rows[validation_end:])))


def check_stratifiable(df: pd.DataFrame, labels: list[str], params: SpamDataParams, where: str) -> None:
    """A stratified split gives every split at least one row of each class: scikit-learn's own
    refusal names neither the file nor the column, so the counts are checked here first."""
    counts = df["Label"].value_counts()
    n, k = len(df), len(labels)
    rest_frac = params.train_frac + params.validation_frac
    test_rows = n - int(n * rest_frac)
    validation_rows = (n - test_rows) - int((n - test_rows) * params.train_frac / rest_frac)
    for split, rows, knob in (
        ("test", test_rows, "train_frac + validation_frac"),
        ("validation", validation_rows, "validation_frac"),
    ):
        if rows < k:
            raise DataError(
                f"{where} has {k} classes over {n} rows: the {split} split would get {rows} rows, "
                f"fewer than one per class (split: stratified); merge classes, add rows or change "
                f"spam_data.{knob}"
            )
    rare = counts[counts < 3]
    if len(rare):
        raise DataError(
            f"{where}: {len(rare)} of {k} classes have fewer than 3 rows (e.g. {rare.index[0]!r}: "
            f"{int(rare.iloc[0])}); a stratified split needs one per split"
        )


def split_rows(
    df: pd.DataFrame, labels: list[str], params: SpamDataParams, source: Path | str = "the data"
) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Label names become ids; then the ``split`` policy cuts train/validation/test. Also returns
    the rows no split holds (what ``balanced`` undersampled away)."""
    where = f"{source} label column {params.label_column!r}"
    by_class = {label: df[df["Label"] == label] for label in labels}
    if params.split == "balanced":
        smallest = min(len(part) for part in by_class.values())
        if smallest == 0:
            empty = [label for label, part in by_class.items() if part.empty]
            raise DataError(
                f"{where}: cannot balance: {len(empty)} of {len(labels)} classes have no rows (e.g. {empty[0]!r})"
            )
        balanced = pd.concat(
            [
                part if len(part) == smallest else part.sample(smallest, random_state=params.seed)
                for part in by_class.values()
            ]
        )
        discarded = df.drop(index=balanced.index)
        balanced["Label"] = balanced["Label"].map({label: i for i, label in enumerate(labels)})
        splits = _cut(balanced.sample(frac=1, random_state=params.seed).reset_index(drop=True), params)
    else:
        from sklearn.model_selection import train_test_split

        check_stratifiable(df, labels, params, where)
        discarded = df.iloc[:0]
        rows = df.assign(Label=df["Label"].map({label: i for i, label in enumerate(labels)}))
        rest_frac = params.train_frac + params.validation_frac
        try:
            rest, test = train_test_split(rows, train_size=rest_frac, stratify=rows["Label"], random_state=params.seed)
            train, validation = train_test_split(
                rest, train_size=params.train_frac / rest_frac, stratify=rest["Label"], random_state=params.seed
            )
        except ValueError as exc:
            raise DataError(
                f"{where}: cannot stratify {len(rows)} rows of {len(labels)} classes into train/validation/test: {exc}"
            ) from None
        splits = {name: part.reset_index(drop=True) for name, part in zip(SPLITS, (train, validation, test))}
    empty = [name for name, part in splits.items() if part.empty]
    if empty:
        raise DataError(
            f"{where}: {sum(map(len, splits.values()))} rows of {len(labels)} classes leave the "
            f"{', '.join(empty)} split(s) empty (split: {params.split})"
        )
    return splits, discarded


def build_spam_dataset(params: SpamDataParams, *, source: Path, out_dir: Path, metrics_out: Path) -> dict:
    """Write ``train.csv``, ``validation.csv``, ``test.csv`` (Label id, Text), ``labels.json``,
    ``discarded.csv`` (Text) and class counts."""
    df, labels, skipped = check_rows(source, read_rows(source, params), params)
    splits, discarded = split_rows(df, labels, params, source)
    metrics: dict = {"labels": labels, "source": {label: int((df["Label"] == label).sum()) for label in labels}}
    metrics["source"]["malformed_skipped"] = skipped
    for name, part in splits.items():
        metrics[name] = {label: int((part["Label"] == code).sum()) for code, label in enumerate(labels)}
    metrics[DISCARDED] = {label: int((discarded["Label"] == label).sum()) for label in labels}
    with atomic_path(out_dir, is_dir=True) as tmp:
        for name, part in splits.items():
            part[["Label", "Text"]].to_csv(tmp / f"{name}.csv", index=False)
        discarded[["Text"]].to_csv(tmp / f"{DISCARDED}.csv", index=False)
        write_json(tmp / LABELS_FILE, {"labels": labels})
    write_json(metrics_out, metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    def body(args, params: StageParams) -> str:
        settings = params.section("spam_data", SpamDataParams)
        metrics = build_spam_dataset(
            settings, source=args.input or Path(settings.input), out_dir=args.out, metrics_out=args.metrics
        )
        return (
            ", ".join(f"{name} {sum(metrics[name].values())}" for name in SPLITS)
            + f" rows of {len(metrics['labels'])} classes in {args.out}"
        )

    run_stage(
        "build_spam_dataset",
        "Build train/validation/test CSVs of labelled texts (default: SMS spam).",
        body,
        paths={
            "input": (None, "labelled data (default: params spam_data.input)"),
            "out": "the splits",
            "metrics": "rows per class and split",
        },
        argv=argv,
    )


if __name__ == "__main__":
    main()
