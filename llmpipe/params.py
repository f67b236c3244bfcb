"""Loading and validating params.yaml sections (pydantic models that forbid unknown keys)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from llmpipe.secrets import redact

PARAMS_FILE = Path(os.environ.get("LLMPIPE_PARAMS", "params.yaml"))

M = TypeVar("M", bound=BaseModel)
# Beside a resumable state (.cache/<stage>/<key>/): the params section it was made with, so the
# check_params stage can remove a state whose outputs DVC already has (steps.check_params).
STATE_RECORD = "params_record.json"


class ParamsError(ValueError):
    """params.yaml is missing, unparsable or fails validation; the message names the key."""


class StrictModel(BaseModel):
    """Base for params sections: unknown keys and wrong types are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def load_yaml(text: str):
    """YAML 1.2, as DVC reads and writes params.yaml: ``2e-3`` is a number (YAML 1.1 loaders such as
    PyYAML's read it as a string, so ``dvc exp run -S lr=2e-3`` would fail strict validation)."""
    return YAML(typ="safe", pure=True).load(text)


def read_params(path: str | os.PathLike = PARAMS_FILE) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {path} not found (run from the repository root)")
    try:
        data = load_yaml(path.read_text()) or {}
    except YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _node(data: dict, section: str, source: str) -> object:
    node: object = data
    for part in section.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ParamsError(f"{source}: missing section {section!r}")
        node = node[part]
    return node


def validate_section(data: dict, section: str, model: type[M], source: str = "params.yaml") -> M:
    """Validate ``data[section]`` (dotted for nesting) against ``model``; errors name ``section.key``.
    A model with ``DEFAULTS_SECTION`` (the trainers' ``training``) takes that section's keys first,
    the stage's own keys over them; an error names the section the bad value is written in."""
    own = node = _node(data, section, source)
    defaults_section = getattr(model, "DEFAULTS_SECTION", None)
    if defaults_section:  # absent: the stage's section states every key
        defaults = _node(data, defaults_section, source) if defaults_section in data else {}
        if not isinstance(defaults, dict) or not isinstance(own, dict):
            raise ParamsError(f"{source}: sections {defaults_section!r} and {section!r} must be mappings")
        node = {**defaults, **own}
    try:
        return model.model_validate(node)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            inherited = defaults_section and loc and isinstance(own, dict) and loc[0] not in own and loc[0] in node
            home = defaults_section if inherited else section
            problems.append(f"{'.'.join([home, *loc])}: {err['msg']} (got {_shown(err.get('input'))})")
        raise ParamsError(f"{source}: invalid params:\n  " + "\n  ".join(problems)) from None


def _shown(value: object) -> str:
    """A bad value as an error shows it: URLs with their credentials and secret query values as ***."""
    from llmpipe.secrets import redact

    return redact(repr(value))


def load_section(section: str, model: type[M], path: str | os.PathLike = PARAMS_FILE) -> M:
    return validate_section(read_params(path), section, model, source=str(path))


def flatten(params: Mapping[str, Any] | BaseModel, prefix: str = "") -> dict[str, Any]:
    """Nested params as MLflow's flat ``a.b.c`` keys."""
    if isinstance(params, BaseModel):
        params = params.model_dump(mode="json")
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = redact(value) if isinstance(value, str) else value  # no credentials in MLflow
    return flat
