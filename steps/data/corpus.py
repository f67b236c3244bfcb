"""The pretraining corpus as documents, and those documents as pieces to tokenize in parallel.

A corpus is a file or a directory (every file under it, or those matching ``include`` globs). A
plain-text file is one document, read in blocks; each line of a JSONL file and each row of a
parquet file is one (its ``text_field``). Documents are joined with ``<|endoftext|>``.

Pieces are cut where GPT-2's pre-tokenizer splits anyway, so encoding the pieces one by one gives
exactly the ids of encoding the whole text at once: after a non-space character and before a space
or newline (no pre-token spans that point, see ``safe_cut``), or at ``<|endoftext|>``.
"""

from __future__ import annotations

import errno
import os
import stat
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import Field, field_validator

from llmcore.tokenizer import ENDOFTEXT
from llmpipe.data import DataError
from llmpipe.params import StrictModel
from steps.data.readers import file_format, jsonl_texts, parquet_columns, text_blocks

PIECE_CHARS = 1 << 20  # characters per encoding task


def check_pattern(pattern: str) -> str:
    """An ``include`` glob must stay under the corpus root."""
    path = PurePosixPath(pattern)
    if not pattern or path.is_absolute() or ".." in path.parts:
        raise ValueError(f"{pattern!r} must be a relative glob under corpus.root, without '..'")
    return pattern


class CorpusParams(StrictModel):
    """params.yaml's corpus section: the text the tokenize and train_tokenizer stages read."""

    root: str  # a file or a directory (DVC's dependency of this stage)
    include: list[str]  # globs under a directory root; empty: every file under it
    text_field: str = Field(min_length=1)  # JSONL key / parquet column of a document's text
    endoftext: Literal["between", "after_each"]  # where <|endoftext|> goes
    shard_tokens: int = Field(ge=1)  # tokens per shard file, closed at a file boundary
    workers: int | None = Field(ge=1)  # encoding threads; None: every available core

    @field_validator("include")
    @classmethod
    def _relative(cls, patterns: list[str]) -> list[str]:
        return [check_pattern(p) for p in patterns]


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def skip_reason(path: Path) -> str | None:
    """Why a corpus entry is not read (a symlink loop or a broken link, not a regular file,
    unreadable, binary text), or None for a file to read. Directories are not entries: ''."""
    try:
        mode = path.stat().st_mode  # follows symlinks
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop"
        return f"broken symlink (-> {os.readlink(path)})" if path.is_symlink() else f"cannot stat: {exc.strerror}"
    if stat.S_ISDIR(mode):
        return ""
    if not stat.S_ISREG(mode):
        return "not a regular file"
    try:
        with open(path, "rb") as handle:
            head = handle.read(8192)
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    kind, gzipped = file_format(path)  # an unsupported file type is an error, not a skip
    if kind != "parquet" and not gzipped and b"\0" in head:
        return "binary (NUL bytes in its first 8 KB), not text"
    return None


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


def corpus_files(root: Path, include: Iterable[str] = (), skipped: list[Skipped] | None = None) -> list[Path]:
    """The corpus's files in a fixed order: ``root`` itself, or the files under it (hidden ones
    ignored) matching ``include`` (every file when empty), each glob's matches sorted. An entry
    that cannot be read (``skip_reason``) is warned about, appended to ``skipped`` and left out."""
    include = list(include)
    skipped = [] if skipped is None else skipped
    if root.is_file():
        if include:
            raise DataError(f"corpus.include {include} needs a directory, but corpus.root {root} is a file")
        files = [root]
    elif root.is_dir():
        files = []
        for pattern in include or ["**/*"]:
            matches = []
            for path in sorted(p for p in root.glob(pattern) if not _hidden(p, root)):
                reason = skip_reason(path)
                if reason is None:
                    matches.append(path)
                elif reason and path.as_posix() not in {s.path for s in skipped}:
                    skipped.append(Skipped(path.as_posix(), reason))
                    warnings.warn(f"corpus: skipped {path}: {reason}", RuntimeWarning, stacklevel=2)
            if not matches:
                what = (
                    f"glob {pattern!r} matches no readable file under" if include else "no readable files in directory"
                )
                raise DataError(f"corpus: {what} {root}" + (f" ({len(skipped)} skipped)" if skipped else ""))
            files += [p for p in matches if p not in files]
    else:
        raise DataError(f"corpus {root} does not exist")
    for path in files:
        file_format(path)  # an unsupported file type fails before any work
    return files


def documents(path: Path, text_field: str, scratch: Path) -> Iterator[Iterable[str]]:
    """Each document of ``path`` as an iterable of text blocks."""
    kind, gzipped = file_format(path)
    if kind == "text":
        yield text_blocks(path, gzipped)
    elif kind == "jsonl":
        yield from jsonl_texts(path, gzipped, text_field)  # a record of any length, in bounded memory
    else:
        for batch in parquet_columns(path, [text_field], strings=(text_field,), scratch=scratch):
            yield from ((text or "",) for text in batch[text_field])


def safe_cut(text: str) -> int:
    """The last index ``i > 0`` with ``text[i - 1]`` not whitespace and ``text[i]`` a space or newline,
    or 0 when there is none.

    GPT-2's pre-tokens are runs of letters, digits or punctuation (optionally led by one space),
    contractions, or whitespace runs; none continues from a non-space character into whitespace, and
    the whitespace after it starts a new pre-token whether or not text precedes it.
    """
    best = 0
    for separator in ("\n", " "):
        i = text.rfind(separator)
        while i > best and text[i - 1].isspace():
            i = text.rfind(separator, 0, i)
        best = max(best, i)
    return best


@dataclass
class Counts:
    files: int = 0
    documents: int = 0
    empty_documents: int = 0
    bytes: int = 0
    characters: int = 0


class Pieces:
    """Joins documents into pieces of about ``PIECE_CHARS`` characters.

    ``between``: ``<|endoftext|>`` before every document but the first (a one-document corpus gets
    none: the book's ids); ``after_each``: after every document (nanoGPT's convention).
    """

    def __init__(self, endoftext: str, counts: Counts):
        self.endoftext, self.counts = endoftext, counts
        self.parts: list[str] = []
        self.size = 0

    def _add(self, text: str) -> None:
        self.parts.append(text)
        self.size += len(text)

    def take(self) -> str:
        piece, self.parts, self.size = "".join(self.parts), [], 0
        return piece

    def document(self, blocks: Iterable[str]) -> Iterator[str]:
        """Add one document; yields the pieces it fills."""
        pending, started = "", False
        for block in blocks:
            if not block:
                continue
            if not started:
                started = True
                if self.endoftext == "between" and self.counts.documents:
                    self._add(ENDOFTEXT)
                self.counts.documents += 1
            self.counts.characters += len(block)
            pending += block
            if self.size + len(pending) >= PIECE_CHARS and (cut := safe_cut(pending)):
                self._add(pending[:cut])
                pending = pending[cut:]
                yield self.take()
        if not started:
            self.counts.empty_documents += 1
            return
        self._add(pending)
        if self.endoftext == "after_each":
            self._add(ENDOFTEXT)
        if self.size >= PIECE_CHARS:
            yield self.take()
