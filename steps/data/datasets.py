"""Reading the fine-tuning datasets the data stages write, for the stages that train on or score them
(and the instruction entries build_instruction_dataset reads).

Each reader checks what it reads again (an input may have been edited by hand) and reports a
problem as a ``DataError`` naming the file and the row, entry or field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from llmcore.prompts import chat_roles_error, check_style
from llmpipe.data import DISCARDED, LABELS_FILE, DataError, read_text
from llmpipe.io import atomic_path, write_json
from llmpipe.params import StrictModel
from steps.data.readers import jsonl_records

SPLITS = ("train", "test", "validation")  # the book's order of the instruction and preference splits


def read_labels(data_dir: Path) -> list[str]:
    """The class names, in class-id order, of the splits build_spam_dataset wrote to ``data_dir``."""
    path = data_dir / LABELS_FILE
    try:
        labels = json.loads(read_text(path))["labels"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f'{path}: expected {{"labels": [names...]}}: {exc}') from exc
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise DataError(f"{path}: labels must be a list of at least two names, got {labels!r}")
    return labels


def read_splits(data_dir: Path, splits: tuple[str, ...]) -> tuple[list[str], list[pd.DataFrame]]:
    """The class names and the named split CSVs of a classification dataset."""
    labels = read_labels(data_dir)
    return labels, [read_spam_split(data_dir / f"{split}.csv", len(labels)) for split in splits]


def read_text_csv(path: Path) -> pd.DataFrame:
    """A CSV that build_spam_dataset wrote, its ``Text`` column as strings ("NA" is a message)."""
    try:
        return pd.read_csv(path, dtype={"Text": str}, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def read_spam_split(path: Path, n_classes: int = 2) -> pd.DataFrame:
    """A split CSV from build_spam_dataset: ``Label`` (a class id below ``n_classes``) and ``Text``."""
    df = read_text_csv(path)
    missing = {"Label", "Text"} - set(df.columns)
    if missing:
        raise DataError(f"{path}: missing column(s) {sorted(missing)}")
    bad = ~df["Label"].isin(list(range(n_classes)))
    if bad.any():
        row = int(bad.idxmax())
        raise DataError(
            f"{path} row {row + 1}: Label must be a class id in [0, {n_classes}), got {df['Label'].tolist()[row]!r}"
        )
    if df.empty:
        raise DataError(f"{path}: no rows")
    return df


def read_discarded(data_dir: Path) -> list[str]:
    """The texts of build_spam_dataset's ``discarded.csv``: source rows that no split holds."""
    path = data_dir / f"{DISCARDED}.csv"
    df = read_text_csv(path)
    if "Text" not in df.columns:
        raise DataError(f"{path}: missing column 'Text'")
    return df["Text"].tolist()


class InstructionEntry(BaseModel):
    """An Alpaca-style entry; strict, so a number is not silently taken for a string. Extra keys are kept."""

    model_config = ConfigDict(strict=True, extra="allow")

    instruction: str = Field(min_length=1)
    input: str
    output: str = Field(min_length=1)


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(min_length=1)


class ChatEntry(BaseModel):
    """A chat: an optional system turn, user and assistant turns in turn, ending with the answer."""

    model_config = ConfigDict(strict=True, extra="allow")

    messages: list[Message] = Field(min_length=2)

    @field_validator("messages")
    @classmethod
    def _in_order(cls, messages: list[Message]) -> list[Message]:
        if problem := chat_roles_error([m.role for m in messages]):
            raise ValueError(problem)
        return messages


def _one_completion(value: object) -> object:
    """A chat completion given as ``[{"role": "assistant", "content": ...}]`` becomes its text."""
    if not isinstance(value, list):
        return value
    if (
        len(value) == 1
        and isinstance(value[0], dict)
        and set(value[0]) == {"role", "content"}
        and value[0]["role"] == "assistant"
    ):
        return value[0]["content"]
    raise ValueError('a completion is a string or one message [{"role": "assistant", "content": ...}]')


Completion = Annotated[str, Field(min_length=1), BeforeValidator(_one_completion)]


class PreferenceEntry(BaseModel):
    """An Alpaca-style preference entry (the book's DPO data: ``output`` and other keys are kept)."""

    model_config = ConfigDict(strict=True, extra="allow")

    instruction: str = Field(min_length=1)
    input: str
    chosen: Completion
    rejected: Completion


class ChatPreferenceEntry(BaseModel):
    """A chat preference entry: ``prompt`` messages (an optional system turn, then user and
    assistant turns in turn, ending with the user's) and the two answers to it."""

    model_config = ConfigDict(strict=True, extra="allow")

    prompt: list[Message] = Field(min_length=1)
    chosen: Completion
    rejected: Completion

    @field_validator("prompt")
    @classmethod
    def _in_order(cls, messages: list[Message]) -> list[Message]:
        roles = [m.role for m in messages]
        if roles[-1] != "user":
            raise ValueError(f"the prompt must end with the user's turn, not {roles[-1]!r}")
        if problem := chat_roles_error(roles + ["assistant"]):
            raise ValueError(problem)
        return messages


INSTRUCTIONS_META = "meta.json"


def read_prompt_style(data_dir: Path) -> str:
    """The prompt style build_instruction_dataset wrote its splits for (``meta.json``)."""
    path = data_dir / INSTRUCTIONS_META
    try:
        style = json.loads(read_text(path))["prompt_style"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f'{path}: expected {{"prompt_style": ...}}: {exc}') from exc
    try:
        return check_style(style)
    except ValueError as exc:
        raise DataError(f"{path}: {exc}") from None


def _read_items(path: Path) -> list[tuple[str, object]]:
    """(``entry N`` | ``line N``, entry) of a JSON list or a JSONL file (optionally gzipped)."""
    if path.name.lower().endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return [(f"line {n}", record) for n, record in jsonl_records(path, path.name.lower().endswith(".gz"))]
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise DataError(f"{path}: top level: Input should be a valid list of entries")
    return [(f"entry {i}", entry) for i, entry in enumerate(data)]


def _validated(path: Path, model_of: Callable[[object], type[BaseModel]]) -> list[dict]:
    """The entries of ``path``, each checked by the model ``model_of`` picks for it; every problem
    (the first three) in one error naming the file, the entry or line, and the field."""
    items = _read_items(path)
    problems = []
    for where, entry in items:
        try:
            model_of(entry).model_validate(entry)
        except ValidationError as exc:
            problems += [_describe(where, err) for err in exc.errors()]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise DataError(f"{path}: " + "; ".join(problems[:3]) + more)
    return [entry for _, entry in items]


def load_entries(path: Path) -> list[dict]:
    """The raw entries of a JSON list or a JSONL file (one entry per line, optionally gzipped),
    Alpaca-style or chats, after checking each one's fields."""
    return _validated(path, lambda e: ChatEntry if isinstance(e, dict) and "messages" in e else InstructionEntry)


def load_preference_entries(path: Path) -> list[dict]:
    """The raw preference entries of a JSON list or JSONL file, Alpaca-style (``instruction``,
    ``input``, ``chosen``, ``rejected``) or chats (``prompt`` messages, ``chosen``/``rejected``),
    after checking each one's fields."""
    return _validated(path, lambda e: ChatPreferenceEntry if isinstance(e, dict) and "prompt" in e else PreferenceEntry)


def _describe(where: str, err: dict) -> str:
    """``entry 3 field 'messages[1].role': ...``"""
    loc = err["loc"]
    if not loc:
        return f"{where}: {err['msg']}"
    field = str(loc[0]) + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc[1:])
    return f"{where} field {field!r}: {err['msg']}"


class SplitParams(StrictModel):
    """How the instruction and preference data are split (the book: 85% train, 10% test, the rest
    validation, in file order)."""

    train_frac: float = Field(gt=0, lt=1)
    test_frac: float = Field(gt=0, lt=1)
    shuffle: bool
    seed: int

    @model_validator(mode="after")
    def _leaves_validation(self) -> SplitParams:
        if self.train_frac + self.test_frac >= 1:
            raise ValueError("train_frac + test_frac must be < 1 to leave a validation split")
        return self


def split_entries(entries: list[dict], params: SplitParams) -> dict[str, list[dict]]:
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


def write_splits(out_dir: Path, splits: dict[str, list[dict]], meta: dict | None = None) -> None:
    """Each split as ``<name>.json`` (and ``meta.json``) in a directory that appears whole or not at all."""
    with atomic_path(out_dir, is_dir=True) as tmp:
        for name, part in splits.items():
            (tmp / f"{name}.json").write_text(json.dumps(part, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if meta is not None:
            write_json(tmp / INSTRUCTIONS_META, meta)
