"""Reading your own data files, streamed: text (plain or gzip), JSON Lines and parquet.

The data stages read files the user brings, of any size, so nothing here loads a whole file:
text comes in blocks, JSONL line by line, parquet in record batches of the columns asked for.
Every problem is a ``DataError`` naming the file and the line, row or column.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from llmpipe.data import DataError
from llmpipe.io import OutputWriteError, writing

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
        raise DataError(
            f"{path}: unsupported file type {''.join(path.suffixes) or '(no suffix)'!r}; "
            f"supported: {', '.join(FORMATS)}, each optionally .gz"
        )
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


def jsonl_texts(path: Path, gzipped: bool, field: str) -> Iterator[Iterable[str]]:
    """Each record's ``field`` as an iterable of text blocks, in bounded memory whatever a record's
    length: a line of up to ``BLOCK_CHARS`` characters is parsed whole; a longer one is read in
    blocks, its text field streamed out of them (``_LongLine``), so memory holds about two blocks
    of it. Every other value of a long record must fit in ``4 * BLOCK_CHARS`` characters. Each
    iterable must be consumed before the next is asked for (they read the same file)."""
    with _reading(path), open_text(path, gzipped) as handle:
        line_no = 0
        while line := handle.readline(BLOCK_CHARS):
            line_no += 1
            where = f"{path} line {line_no}"
            if line.endswith("\n") or len(line) < BLOCK_CHARS:
                if line.strip():
                    yield (record_text(_parse_record(line, where), field, where),)
                continue
            yield _LongLine(handle, line, where).field_text(field)


def _parse_record(line: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


# The longest run of complete pieces of a JSON string's body: plain characters, \uXXXX or \x escapes.
_STRING_BODY = re.compile(r'(?:[^"\\\x00-\x1f]+|\\u[0-9a-fA-F]{4}|\\[^u])*')
_SPACE = re.compile(r"\s*")
_HIGH_SURROGATE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}")


def _escapes_here(text: str, i: int) -> bool:
    """The backslash at ``text[i]`` starts an escape (an even run of backslashes precedes it)."""
    run = 0
    while i - run - 1 >= 0 and text[i - run - 1] == "\\":
        run += 1
    return run % 2 == 0


class _LongLine:
    """One JSONL line too long to hold, read in blocks: a JSON object whose ``field`` string is
    streamed out in pieces (its escapes decoded), every other value parsed whole."""

    def __init__(self, handle: IO[str], first: str, where: str):
        self.handle, self.buf, self.pos, self.where = handle, first, 0, where
        self.ended = first.endswith("\n")

    def more(self) -> bool:
        """Drop what was parsed, read the next block of this line; False at its end."""
        if self.ended:
            return False
        block = self.handle.readline(BLOCK_CHARS)
        self.ended = not block or block.endswith("\n")
        self.buf, self.pos = self.buf[self.pos :] + block, 0
        return bool(block)

    def error(self, what: str) -> DataError:
        return DataError(f"{self.where}: {what}")

    def skip_space(self) -> str:
        """The next non-space character (reading on as needed), '' at the end of the line."""
        while True:
            self.pos = _SPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or not self.more():
                return self.buf[self.pos : self.pos + 1]

    def value(self) -> Any:
        """One whole JSON value (a key, or a field other than the text)."""
        self.skip_space()
        while True:
            try:
                value, end = json.JSONDecoder().raw_decode(self.buf, self.pos)
                if end < len(self.buf) or self.ended:  # else a number may go on in the next block
                    self.pos = end
                    return value
                raise json.JSONDecodeError("value at the end of a block", self.buf, end)
            except json.JSONDecodeError as exc:
                if len(self.buf) - self.pos > 4 * BLOCK_CHARS or not self.more():
                    raise self.error(
                        f"not valid JSON, or a value other than the text over {4 * BLOCK_CHARS:,} "
                        f"characters ({exc.msg})"
                    ) from None

    def string(self) -> Iterator[str]:
        """The string value starting at ``pos``, decoded, a block at a time."""
        self.pos += 1  # the opening quote
        while True:
            end = _STRING_BODY.match(self.buf, self.pos).end()
            closed = end < len(self.buf) and self.buf[end] == '"'
            if end < len(self.buf) and self.buf[end] < " ":
                what = "the line ends" if self.buf[end] in "\r\n" else "a control character is"
                raise self.error(f"{what} inside a string (not valid JSON)")
            if (
                not closed
                and end - self.pos >= 6
                and _HIGH_SURROGATE.fullmatch(self.buf, end - 6, end)
                and _escapes_here(self.buf, end - 6)
            ):
                end -= 6  # a surrogate pair's first half waits for its second
            if end > self.pos:
                try:
                    yield json.loads(f'"{self.buf[self.pos : end]}"')
                except json.JSONDecodeError as exc:
                    raise self.error(f"not valid JSON in field text ({exc.msg})") from None
                self.pos = end
            if closed:
                self.pos += 1
                return
            if not self.more():
                raise self.error("the line ends inside a string (not valid JSON)")

    def field_text(self, field: str) -> Iterator[str]:
        found = False
        if self.skip_space() != "{":
            raise self.error("expected a JSON object")
        self.pos += 1
        while (char := self.skip_space()) != "}":
            if char == ",":
                self.pos += 1
                continue
            key = self.value()
            if not isinstance(key, str) or self.skip_space() != ":":
                raise self.error("not valid JSON (expected a key and ':')")
            self.pos += 1
            if key == field and not found:
                if self.skip_space() != '"':
                    raise self.error(f"field {field!r} is {type(self.value()).__name__}, expected a string")
                found = True
                yield from self.string()
            else:
                self.value()
        self.pos += 1
        if self.skip_space():
            raise self.error("not valid JSON (text after the object)")
        if not found:
            raise self.error(f"no field {field!r}")


def record_text(record: dict[str, Any], field: str, where: str) -> str:
    """``record[field]`` as a string; a missing or non-string field is an error naming it."""
    if field not in record:
        raise DataError(f"{where}: no field {field!r} (fields: {sorted(record)[:10]})")
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is {type(value).__name__}, expected a string")
    return value


def parquet_columns(
    path: Path, columns: list[str], *, strings: tuple[str, ...] = (), scratch: Path | None = None
) -> Iterator[dict[str, list]]:
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
