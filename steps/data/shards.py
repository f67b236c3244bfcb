"""Token shards: the tokenized corpus as raw token files plus a ``meta.json`` sidecar (written here,
read as one memory-mapped sequence by ``steps.data.windows.load_token_shards``).

Each shard is a flat little-endian array (``uint16`` for GPT-2's 50,257 ids), read back as a
memory map; ``meta.json`` records the dtype, the vocabulary size, the tokenizer's digest and each
shard's token count and sha256, so a reader can check what it maps. Writing goes through a work
directory outside the stage's outputs (DVC deletes those before a run): a shard is committed only
at a corpus-file boundary, and a killed run resumes after the last committed file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from llmpipe.data import read_stage_json
from llmpipe.io import atomic_path, write_json, writing
from llmpipe.params import StrictModel

SHARD_FORMAT = "llmpipe-token-shards/1"
META_FILE = "meta.json"
STATE_FILE = "state.json"


class ShardFile(StrictModel):
    file: str  # the shard's name in the directory
    tokens: int = Field(ge=0)
    sha256: str


class TokenizerIdentity(StrictModel):
    name: str  # the encoding's name (``gpt2``, a trained one's)
    sha256: str  # the digest of its files: a reader checks it encodes with the same one


class ShardsMeta(StrictModel):
    """``meta.json`` of a token shard directory: what the tokenize stage writes and build_windows
    (through ``steps.data.windows.load_token_shards``) maps."""

    format: Literal["llmpipe-token-shards/1"]  # SHARD_FORMAT
    dtype: str  # numpy's name, little-endian: uint16 while the vocabulary fits, else uint32
    vocab_size: int = Field(ge=1)
    endoftext_id: int = Field(ge=0)
    tokenizer: TokenizerIdentity
    max_token_id: int = Field(ge=0)
    tokens: int = Field(ge=0)  # over every shard
    shards: list[ShardFile]


class ShardWriter:
    """Appends token arrays to numbered shards in ``work_dir``, resuming the state saved there.

    ``work_dir`` must be named by everything the tokens depend on (``llmpipe.io.resume_state_dir``),
    so a saved state is only ever continued with the same inputs and settings.
    """

    def __init__(self, work_dir: Path, dtype: np.dtype):
        self.work_dir, self.dtype = work_dir, np.dtype(dtype)
        try:
            self.state = json.loads((work_dir / STATE_FILE).read_text())
            if not all((work_dir / shard["file"]).is_file() for shard in self.state["shards"]):
                raise ValueError("a committed shard is gone")  # a run killed while cleaning up
        except (OSError, ValueError):
            shutil.rmtree(work_dir, ignore_errors=True)
            self.state = {"next_file": 0, "shards": [], "counts": {}, "max_token_id": -1}
        work_dir.mkdir(parents=True, exist_ok=True)
        for partial in work_dir.glob("*.partial"):  # the uncommitted tail of a killed run
            partial.unlink()
        self._handle = None
        self._digest = hashlib.sha256()
        self.open_tokens, self._open_max = 0, -1

    @property
    def next_file(self) -> int:
        return self.state["next_file"]

    def _shard_name(self) -> str:
        return f"tokens_{len(self.state['shards']):05d}.bin"

    def write(self, tokens: np.ndarray) -> None:
        if not len(tokens):
            return
        path = self.work_dir / (self._shard_name() + ".partial")
        data = np.ascontiguousarray(tokens, dtype=self.dtype.newbyteorder("<")).data
        with writing(path):  # disk full: an error naming the shard, not a bare errno
            if self._handle is None:
                self._handle = open(path, "wb")
            self._handle.write(data)
        self._digest.update(data)
        self.open_tokens += len(tokens)
        self._open_max = max(self._open_max, int(tokens.max()))

    def commit(self, next_file: int, counts: dict[str, int]) -> None:
        """Make everything written so far durable and resumable from corpus file ``next_file``."""
        if self._handle is not None:
            with writing(Path(self._handle.name)):
                self._handle.flush()
                os.fsync(self._handle.fileno())
                self._handle.close()
            name = self._shard_name()
            os.replace(self.work_dir / (name + ".partial"), self.work_dir / name)
            self.state["shards"].append({"file": name, "tokens": self.open_tokens, "sha256": self._digest.hexdigest()})
            self.state["max_token_id"] = max(self.state["max_token_id"], self._open_max)
            self._handle, self._digest, self.open_tokens, self._open_max = None, hashlib.sha256(), 0, -1
        self.state.update(next_file=next_file, counts=counts)
        write_json(self.work_dir / STATE_FILE, self.state)

    def finish(self, out_dir: Path, *, vocab_size: int, endoftext_id: int, tokenizer: TokenizerIdentity) -> ShardsMeta:
        """Move the committed shards and their ``meta.json`` into ``out_dir`` (replaced whole)."""
        shards = self.state["shards"]
        meta = ShardsMeta(
            format=SHARD_FORMAT,
            dtype=self.dtype.name,
            vocab_size=vocab_size,
            endoftext_id=endoftext_id,
            tokenizer=tokenizer,
            max_token_id=self.state["max_token_id"],
            tokens=sum(s["tokens"] for s in shards),
            shards=shards,
        )
        with atomic_path(out_dir, is_dir=True) as tmp:
            for shard in shards:  # linked, not moved: a run killed here can still finish from work_dir
                try:
                    os.link(self.work_dir / shard["file"], tmp / shard["file"])
                except OSError:  # another filesystem
                    shutil.copyfile(self.work_dir / shard["file"], tmp / shard["file"])
            (tmp / META_FILE).write_text(json.dumps(meta.model_dump(), indent=2, sort_keys=True) + "\n")
        shutil.rmtree(self.work_dir, ignore_errors=True)
        return meta


def read_shards_meta(directory: Path) -> ShardsMeta:
    """``directory``'s ``meta.json``, typed; a bad one is a DataError naming the file and field."""
    return read_stage_json(directory / META_FILE, ShardsMeta, "token shards", "tokenize")
