"""The first stage: every params section a stage reads, validated before DVC runs (or deletes) anything.

DVC removes a stage's outputs before it runs its command, so a typo found by the stage itself
(``pretrain.epochss: 3``) would cost the user ``models/pretrained/``. Every other stage depends on
this stage's output, so ``dvc repro``, ``dvc exp run`` and the flow run it first and stop on a bad
value with the outputs of every later stage still in place.

It must start in a fraction of a second: it imports no stage module (they import torch). It
validates against ``steps/params_schema.json``, the JSON Schema of each stage's strict pydantic
params model (unknown keys, types, ranges, choices), which ``python -m scripts.dvc_deps --write``
regenerates from the models (tests/test_check_params.py fails while it drifts). Checks a model does
in Python (a field validator: a preset name, a glob) still run in the stage. The output holds no
params values, so a valid change of one section re-runs only the stages that read it.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jsonschema

from llmpipe.cli import StageParams, run_stage
from llmpipe.params import STATE_RECORD, ParamsError, load_yaml, read_params
from llmpipe.secrets import redact

SCHEMA_FILE = Path(__file__).with_name("params_schema.json")
# As pydantic's strict mode: 8.0 is no integer (JSON Schema's "integer" takes it).
_STRICT = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool)
    ),
)


def _section(data: dict, dotted: str) -> tuple[bool, object]:
    node: object = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _targets(data: dict, section: str) -> Iterator[tuple[str, object]]:
    """(dotted name, value) of a section; ``sources.*`` stands for every entry under ``sources``."""
    if section.endswith(".*"):
        found, node = _section(data, section[:-2])
        if found and isinstance(node, dict):
            yield from ((f"{section[:-2]}.{name}", value) for name, value in node.items())
        elif found:
            yield section[:-2], node  # not a mapping: reported by the schema of an entry
        return
    found, node = _section(data, section)
    yield section, node if found else _MISSING


_MISSING = object()


def _problem(section: str, error: jsonschema.ValidationError) -> str:
    """One line: the dotted key and what is wrong with it, in words a params.yaml editor can act on."""
    key = ".".join([section, *(str(p) for p in error.absolute_path)])
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        hints = []
        for name in extra:
            close = difflib.get_close_matches(name, allowed, n=1)
            hints.append(
                f"{key}.{name}: unknown key"
                + (f" (did you mean {close[0]!r}?)" if close else f" ({key or 'it'} takes {', '.join(allowed)})")
            )
        return "; ".join(hints)
    if error.validator == "pattern":  # the value may be a URL with a secret: never shown
        return f"{key}: {error.schema.get('description') or 'does not match ' + error.validator_value}"
    if error.validator in ("anyOf", "oneOf"):
        expected = [s.get("type") or s.get("const") or s.get("enum") for s in error.validator_value]
        return f"{key}: {error.instance!r} is not one of the expected kinds {expected}"
    return f"{key}: {error.message}"


def check_params(data: dict, schema: dict, source: str = "params.yaml") -> list[str]:
    """Every section the schema names, validated; returns the sections checked, raises ParamsError
    naming each bad key (one line)."""
    problems, checked = [], []
    for section, section_schema in schema["sections"].items():
        for name, value in _targets(data, section):
            if value is _MISSING:
                problems.append(f"missing section {name!r}")
                continue
            checked.append(name)
            inherited: set[str] = set()
            defaults = section_schema.get("x-defaults")
            if defaults and isinstance(value, dict) and isinstance(data.get(defaults), dict):
                known = section_schema.get("properties", {})  # unknown shared keys: reported under `defaults`
                shared = {key: item for key, item in data[defaults].items() if key in known}
                inherited = set(shared) - set(value)  # their errors too
                value = {**shared, **value}
            validator = _STRICT({**section_schema, "$defs": schema["$defs"]})
            errors = sorted(validator.iter_errors(value), key=lambda e: [str(p) for p in e.absolute_path])
            problems += [
                _problem(name, error)
                for error in errors
                if not (error.absolute_path and str(error.absolute_path[0]) in inherited)
            ]
    if problems:
        raise ParamsError(redact(f"{source}: " + "; ".join(problems)))
    return checked


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True)


def remove_finished_states(lock_file: Path = Path("dvc.lock"), cache: Path = Path(".cache")) -> list[Path]:
    """Remove the resumable states (``.cache/<stage>/<key>``) that can never be resumed again: dvc.lock
    records a finished run of that stage with the params the state was made with, and the stage's
    outputs are newer than the state (they came from that run or from DVC's run cache after the
    state was left behind). A state of other params or of newer data stays: it may still resume."""
    if not lock_file.is_file() or not cache.is_dir():
        return []
    stages = (load_yaml(lock_file.read_text(encoding="utf-8")) or {}).get("stages") or {}
    removed = []
    for record in sorted(cache.glob(f"*/*/{STATE_RECORD}")):
        entry = stages.get(record.parent.parent.name) or {}
        try:
            made = json.loads(record.read_text(encoding="utf-8"))
            recorded = (entry.get("params") or {}).get("params.yaml") or {}
            done = recorded.get(made["section"])
            if done is not None and made.get("defaults"):  # a trainer: its section over `training`
                done = {**(recorded.get(made["defaults"]) or {}), **done}
            outputs = [Path(out["path"]) for out in entry.get("outs") or []]
            newer = bool(outputs) and all(p.exists() and p.stat().st_mtime > record.stat().st_mtime for p in outputs)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable record: the stage's own next run prunes it
        if done is not None and newer and _canonical(done) == _canonical(made["params"]):
            shutil.rmtree(record.parent, ignore_errors=True)
            removed.append(record.parent)
    return removed


def load_schema(path: Path = SCHEMA_FILE) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def write_marker(path: Path, data: dict) -> None:
    """Temp file then rename (llmpipe.io's writer imports llmcore, hence torch: too slow here)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv: list[str] | None = None) -> None:
    def body(args, params: StageParams) -> str:
        checked = check_params(read_params(args.params), load_schema(), args.params)
        write_marker(args.out, {"params": args.params, "valid": True})  # no values: see the module's docstring
        removed = remove_finished_states()
        for state in removed:
            print(f"check_params: removed {state}: a resumable state of a run whose outputs DVC already has")
        return f"{len(checked)} params sections valid"

    run_stage(
        "check_params",
        "Validate params.yaml against every stage's params model (before DVC runs a stage).",
        body,
        paths={"out": "the file every stage depends on"},
        argv=argv,
    )


if __name__ == "__main__":
    main()
