"""Reading your own data files, streamed: text (plain or gzip), JSON Lines and parquet.

The data stages read files the user brings, of any size, so nothing here loads a whole file:
text comes in blocks, JSONL line by line, parquet in record batches of the columns asked for.
Every problem is a ``DataError`` naming the file and the line, row or column.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from steps.common.data import DataError
from steps.common.io import OutputWriteError, writing

BLOCK_CHARS = 1 << 20  # characters per read of a text file
PARQUET_BATCH_ROWS = 1024
TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
FORMATS = {**dict.fromkeys(TEXT_SUFFIXES, "text"), **dict.fromkeys(JSONL_SUFFIXES, "jsonl"), ".parquet": "parquet"}


def file_format(path: Path) -> tuple[str, bool]:
    """(``text`` | ``jsonl`` | ``parquet``, gzipped) from the file name, e.g. ``a.jsonl.gz``."""
    suffixes = [s.lower() for s in path.suffixes]
    gzipped = bool(suffixes) and suffixes[-1] == ".gz"
    inner = suffixes[-2] if gzipped and len(suffixes) > 1 else (suffixes[-1] if suffixes and not gzipped else "")
    if inner not in FORMATS:
        raise DataError(f"{path}: unsupported file type {''.join(path.suffixes) or '(no suffix)'!r}; "
                        f"supported: {', '.join(FORMATS)}, each optionally .gz")
    return FORMATS[inner], gzipped


def open_text(path: Path, gzipped: bool) -> IO[str]:
    """UTF-8 text with universal newlines (as ``Path.read_text``), decompressing a gzip file."""
    try:
        return gzip.open(path, "rt", encoding="utf-8") if gzipped else open(path, encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn the errors of reading ``path`` into one-line ``DataError``s."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not valid UTF-8: {exc}") from exc
    except OutputWriteError:
        raise  # a scratch copy could not be written: not this file's fault
    except (OSError, EOFError) as exc:  # gzip's BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {exc}") from exc


def text_blocks(path: Path, gzipped: bool) -> Iterator[str]:
    """The file's text in blocks of at most ``BLOCK_CHARS`` characters."""
    with _reading(path), open_text(path, gzipped) as handle:
        while block := handle.read(BLOCK_CHARS):
            yield block


def jsonl_records(path: Path, gzipped: bool) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; a line that is not a JSON object is an error."""
    with _reading(path), open_text(path, gzipped) as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {line_no}: not valid JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path} line {line_no}: expected a JSON object, got {type(record).__name__}")
            yield line_no, record


def record_text(record: dict[str, Any], field: str, where: str) -> str:
    """``record[field]`` as a string; a missing or non-string field is an error naming it."""
    if field not in record:
        raise DataError(f"{where}: no field {field!r} (fields: {sorted(record)[:10]})")
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is {type(value).__name__}, expected a string")
    return value


def parquet_columns(path: Path, columns: list[str], *, strings: tuple[str, ...] = (),
                    scratch: Path | None = None) -> Iterator[dict[str, list]]:
    """The named columns in record batches, as lists; ``strings`` must be string columns. A gzipped
    file is unpacked first (parquet needs random access), into ``scratch`` or a temp directory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.name.lower().endswith(".gz"):
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            unpacked = Path(tmp) / path.name[:-3]
            with _reading(path), writing(unpacked), gzip.open(path, "rb") as src, open(unpacked, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            yield from parquet_columns(unpacked, columns, strings=strings)
        return
    try:
        table = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"cannot read parquet file {path}: {exc}") from exc
    schema = table.schema_arrow
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r} (columns: {schema.names[:20]})")
    for name in strings:
        kind = schema.field(name).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise DataError(f"{path}: column {name!r} holds {kind}, expected strings")
    for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
        yield {name: batch.column(name).to_pylist() for name in columns}
