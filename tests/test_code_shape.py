"""The code stays readable: no function over 80 lines, no module over 420 (the style guide's ~80/~400)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FILES = sorted(
    p
    for pkg in ("llmcore", "llmpipe", "steps", "pipelines", "serving", "stack", "cli", "scripts")
    for p in (REPO / pkg).rglob("*.py")
)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_functions_and_modules_stay_short(path: Path) -> None:
    source = path.read_text()
    assert len(source.splitlines()) <= 420, f"{path.name}: {len(source.splitlines())} lines"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80
    ]
    assert not long, f"{path.name}: {long}"
