"""Output writing for steps: everything goes through llmcore's atomic temp-then-rename."""

from __future__ import annotations

import json
import os
from typing import Any

from llmcore.fileio import atomic_path

__all__ = ["atomic_path", "write_json", "write_text"]


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
