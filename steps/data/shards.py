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
from typing import Any

import numpy as np

from llmpipe.data import DataError
from llmpipe.io import atomic_path, write_json, writing

SHARD_FORMAT = "llmpipe-token-shards/1"
META_FILE = "meta.json"
STATE_FILE = "state.json"


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

    def finish(self, out_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
        """Move the committed shards and their ``meta.json`` into ``out_dir`` (replaced whole)."""
        shards = self.state["shards"]
        meta = {
            "format": SHARD_FORMAT,
            "dtype": self.dtype.name,
            **meta,
            "max_token_id": self.state["max_token_id"],
            "tokens": sum(s["tokens"] for s in shards),
            "shards": shards,
        }
        with atomic_path(out_dir, is_dir=True) as tmp:
            for shard in shards:  # linked, not moved: a run killed here can still finish from work_dir
                try:
                    os.link(self.work_dir / shard["file"], tmp / shard["file"])
                except OSError:  # another filesystem
                    shutil.copyfile(self.work_dir / shard["file"], tmp / shard["file"])
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(self.work_dir, ignore_errors=True)
        return meta


def read_shards_meta(directory: Path) -> dict[str, Any]:
    path = directory / META_FILE
    try:
        meta = json.loads(path.read_text())
    except OSError as exc:
        raise DataError(f"cannot read token shards {path}: {exc.strerror or exc} (run the tokenize stage)") from exc
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != SHARD_FORMAT:
        raise DataError(f"{path}: not a token shard index (format {SHARD_FORMAT!r})")
    return meta
