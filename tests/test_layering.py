"""The import rules between the packages (CONTRIBUTING.md, "The layout"), read from the source with
``ast``: every ``import`` and ``from ... import``, deferred ones inside functions included.

    llmcore  <-  platform (llmpipe)  <-  data readers (steps.data)  <-  stages (steps.*), serving
             <-  pipelines, stack  <-  cli
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP = ("llmcore", "llmpipe", "steps", "pipelines", "serving", "stack", "cli", "scripts")
# What each layer may import of the project's own packages (itself always).
ALLOWED = {
    "llmcore": set(),
    "platform": {"llmcore"},
    "readers": {"llmcore", "platform"},
    "stages": {"llmcore", "platform", "readers"},
    "serving": {"llmcore", "platform"},
    "stack": {"llmcore", "platform"},
    "pipelines": {"llmcore", "platform", "readers", "stages", "serving", "stack"},
    "cli": {"llmcore", "platform", "readers", "stages", "serving", "pipelines", "stack"},
    "scripts": {"llmcore", "platform", "readers", "stages", "pipelines", "serving", "stack"},
}


def layer(module: str) -> str | None:
    """The layer of a dotted module name of this project (None: a third-party or standard module)."""
    top = module.split(".")[0]
    if top not in TOP:
        return None
    if top == "llmpipe":
        return "platform"
    if top == "steps":
        return "readers" if module == "steps.data" or module.startswith("steps.data.") else "stages"
    return top


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> list[Path]:
    return sorted(p for top in TOP for p in (ROOT / top).rglob("*.py"))


def imported(path: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of everything ``path`` imports, relative imports resolved."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join([*base, *([node.module] if node.module else [])])
            # `from steps import fetch` imports the module steps.fetch: name each imported item too.
            yield node.lineno, name
            yield from (
                (node.lineno, f"{name}.{alias.name}")
                for alias in node.names
                if (ROOT / Path(*f"{name}.{alias.name}".split("."))).with_suffix(".py").is_file()
            )


def edges() -> list[tuple[str, str, str, str]]:
    """(importer's layer, imported layer, where, what) for every import across layers."""
    found = []
    for path in project_modules():
        source = layer(module_name(path))
        for line, name in imported(path):
            target = layer(name)
            if target is not None and target != source:
                found.append((source, target, f"{path.relative_to(ROOT)}:{line}", name))
    return found


def test_every_package_imports_only_the_layers_below_it() -> None:
    wrong = [
        f"{where}: {source} imports {name} ({target})"
        for source, target, where, name in edges()
        if target not in ALLOWED[source]
    ]
    assert not wrong, "\n".join(wrong)


def test_a_stage_never_imports_another_stage() -> None:
    wrong = []
    for path in project_modules():
        me = module_name(path)
        if layer(me) != "stages":
            continue
        wrong += [
            f"{path.relative_to(ROOT)}:{line}: {name}"
            for line, name in imported(path)
            if layer(name) == "stages" and name.split(".")[:2] != me.split(".")[:2] and name != "steps"
        ]
    assert not wrong, "\n".join(wrong)


def test_there_is_no_import_cycle_between_packages() -> None:
    graph: dict[str, set[str]] = {}
    for source, target, _, _ in edges():
        graph.setdefault(source, set()).add(target)

    def cycle_from(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        for nxt in sorted(graph.get(node, ())):
            found = cycle_from(nxt, [*path, node])
            if found:
                return found
        return None

    cycles = [c for c in (cycle_from(n, []) for n in sorted(graph)) if c]
    assert not cycles, " -> ".join(cycles[0])


def test_llmcore_knows_nothing_of_the_pipeline() -> None:
    """The model package names neither dvc.yaml nor the pipeline's output folders."""
    wrong = [
        f"{p.relative_to(ROOT)}: {word}"
        for p in sorted((ROOT / "llmcore").rglob("*.py"))
        for word in ("dvc.yaml", '"models/', "'models/", '"data/', "'data/")
        if word in p.read_text()
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    ("source", "name", "allowed"),
    [
        ("llmcore", "serving.app", False),
        ("platform", "steps.fetch", False),
        ("serving", "pipelines.dag", False),
        ("stages", "llmpipe.io", True),
        ("cli", "serving.__main__", True),
        ("platform", "steps.data.windows", False),
        ("stages", "steps.data.windows", True),
        ("serving", "steps.data.datasets", False),
    ],
)
def test_the_rules_read_the_layers_right(source: str, name: str, allowed: bool) -> None:
    assert (layer(name) in ALLOWED[source]) is allowed


# The stages that only read and write files: torch's import alone costs seconds a run.
# (build_windows still does: it counts windows with llmcore.data's torch Datasets.)
DATA_STAGES = (
    "fetch",
    "check_params",
    "build_spam_dataset",
    "build_instruction_dataset",
    "build_preference_dataset",
    "tokenize",
    "baseline_spam",
)


def test_data_stages_do_not_import_torch() -> None:
    import subprocess
    import sys

    probe = (
        "import importlib, sys\n"
        f"for stage in {DATA_STAGES!r}:\n"
        "    importlib.import_module(f'steps.{stage}')\n"
        "    assert 'torch' not in sys.modules, f'steps.{stage} imports torch'\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1]


def test_project_code_imports_llmcores_classes_from_their_modules() -> None:
    """``from llmcore import GPTModel`` works (lazily), but scripts/dvc_deps.py cannot follow it to
    llmcore/model.py, so a stage importing it that way would miss a code dep."""
    wrong = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in project_modules()
        for line, name in imported(path)
        if name in ("llmcore.GPTConfig", "llmcore.GPTModel", "llmcore.PRESETS")
    ]
    assert not wrong, "\n".join(wrong)
