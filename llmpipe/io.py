"""File helpers for steps: outputs go through llmcore's atomic temp-then-rename; digests of inputs;
the directory of a resumable training state."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from llmcore.fileio import OutputWriteError, atomic_path, writing
from llmpipe.params import STATE_RECORD

__all__ = [
    "OutputWriteError",
    "atomic_path",
    "file_digest",
    "record_state_params",
    "resume_state_dir",
    "sha256_file",
    "write_json",
    "writing",
]


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks (md5: the hash DVC records for a file)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    return file_digest(path, "sha256")


def resume_state_dir(cache_dir: Path, *settings: Any, prune: bool = True) -> Path:
    """``cache_dir/<key>`` for a training state made with ``settings`` (anything JSON can hold:
    params, input digests), so a state is only ever resumed with the same settings and inputs.

    States under other keys can never be resumed: with ``prune`` (on the process that owns the
    files) they are deleted.
    """
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    if prune:
        for stale in cache_dir.glob("*"):
            if stale.name != key:
                shutil.rmtree(stale, ignore_errors=True)
    return cache_dir / key


def record_state_params(state_dir: Path, section: str, params: Any, defaults: str | None = None) -> None:
    """Write ``section``'s params (a JSON-able dict; read over the ``defaults`` section when given)
    beside a resumable state: once dvc.lock records a finished run with the same values (the outputs
    came from the run cache, or another run), the state can never be needed again and the
    check_params stage removes it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        state_dir / STATE_RECORD, {"section": section, "params": params, **({"defaults": defaults} if defaults else {})}
    )
