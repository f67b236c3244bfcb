"""Keep dvc.yaml's code deps equal to what each stage's command imports: ``python -m scripts.dvc_deps``.

A stage whose code changed but is missing from its deps is skipped by DVC: a reproducibility bug.
The import closure is read from the source (every ``import``/``from ... import`` of ``steps``,
``llmpipe``, ``llmcore`` or ``serving``, at module level or inside functions, followed file by file). Package
``__init__.py`` files without code and the MLflow "models from code" files (logged by path, never
imported: list them by hand) are not required. ``--write`` rewrites the ``.py`` deps of every
stage in place (comments kept); without it, the differences are printed and the exit code is 1.
tests/test_dvc_deps.py fails while they differ. ``--write`` also regenerates steps/params_schema.json
(scripts/params_schema.py), the params models as the ``check_params`` stage reads them.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DVC_YAML = REPO / "dvc.yaml"
OWN_PACKAGES = ("steps", "llmpipe", "llmcore", "serving")
CODE_FILES_BY_PATH = "llmpipe/mlflow_models/"  # read by MLflow from their path, not imported


def module_file(module: str) -> Path | None:
    """The repository file of a dotted module name, or None when it is not one of ours."""
    if module.split(".")[0] not in OWN_PACKAGES:
        return None
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file (deferred imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return found


def has_code(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) for node in body)


def import_closure(module: str) -> set[str]:
    """The repository files that ``python -m module`` runs, as paths relative to the repo."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            path = module_file(".".join(parts[:depth]))
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(imported_modules(path))
    return {p.relative_to(REPO).as_posix() for p in seen if p.name != "__init__.py" or has_code(p)}


def stages() -> dict[str, dict]:
    return yaml.safe_load(DVC_YAML.read_text())["stages"]


def stage_module(stage: dict) -> str | None:
    match = re.match(r"\s*python -m ([\w.]+)", stage["cmd"])
    return match.group(1) if match else None


def sections_read(module: str) -> dict[str, type]:
    """The params sections a stage module reads through ``params.section(NAME, Model)`` (NAME a
    string or the module's ``STAGE``), as {section: model}; a model's ``DEFAULTS_SECTION`` (the
    trainers' shared ``training``) with its ``DEFAULTS_MODEL``."""
    import importlib

    path = module_file(module)
    tree = ast.parse(path.read_text(), str(path))
    constants = {
        t.id: n.value.value
        for n in tree.body
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    imported = importlib.import_module(module)
    found: dict[str, type] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "section":
            name, model = node.args[0], node.args[1]
            section = name.value if isinstance(name, ast.Constant) else constants[name.id]
            found[section] = getattr(imported, model.id)
    for model in list(found.values()):
        if getattr(model, "DEFAULTS_SECTION", None):
            found.setdefault(model.DEFAULTS_SECTION, model.DEFAULTS_MODEL)
    return found


def code_deps_drift(name: str, stage: dict) -> tuple[list[str], list[str]]:
    """(missing, stale): imported files the stage does not list, listed files it never imports."""
    module = stage_module(stage)
    if module is None:
        raise ValueError(f"dvc.yaml stage {name}: command is not `python -m <module>`")
    listed = {dep for dep in stage.get("deps", []) if dep.endswith(".py")}
    needed = import_closure(module)
    stale = sorted(dep for dep in listed - needed if not dep.startswith(CODE_FILES_BY_PATH))
    return sorted(needed - listed), stale


def write_code_deps() -> None:
    """Rewrite each stage's ``.py`` deps as its import closure (plus its by-path code files)."""
    from dvc.utils.serialize import modify_yaml  # DVC's round-trip YAML: comments stay

    with modify_yaml(DVC_YAML) as data:
        for stage in data["stages"].values():
            deps = list(stage.get("deps", []))
            keep = [d for d in deps if not d.endswith(".py") or d.startswith(CODE_FILES_BY_PATH)]
            code = sorted(import_closure(stage_module(stage)) - set(keep))
            stage["deps"] = [d for d in keep if not d.endswith(".py")] + code + [d for d in keep if d.endswith(".py")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps in place")
    if parser.parse_args().write:
        from scripts.params_schema import write_schema  # check_params's copy of the params models

        write_code_deps()
        write_schema()
    drift = {name: code_deps_drift(name, stage) for name, stage in stages().items()}
    drift = {name: d for name, d in drift.items() if d[0] or d[1]}
    for name, (missing, stale) in drift.items():
        print(f"{name}: missing {missing}, stale {stale}")
    sys.exit(1 if drift else 0)


if __name__ == "__main__":
    main()
