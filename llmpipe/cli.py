"""The one entry point of every stage: ``python -m steps.<name>`` parses its paths, reads its params
sections on demand, runs, and turns an expected failure into one line naming the problem.

Expected failures are bad params and bad data, plus the error types a stage names (a missing or
mismatched model, unusable tokenizer files, a diverged run: ``llmpipe.training``'s
``TRAINING_ERRORS``, ...); they end with ``<stage>: error: <message>`` and exit status 1.
An ``OSError`` (disk full, a read-only or missing directory) is reported the same way, with the
path it concerns. Anything else is a bug and keeps its traceback; ``LLMPIPE_DEBUG=1`` shows the
traceback of the expected failures too. This module imports no model code, so a data stage's DVC
deps stay free of it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from llmpipe.data import DataError
from llmpipe.params import PARAMS_FILE, ParamsError, read_params, validate_section

DEBUG_ENV = "LLMPIPE_DEBUG"


class StageError(RuntimeError):
    """An expected failure of a service a stage needs (its message names the service and the fix)."""


EXPECTED_ERRORS: tuple[type[Exception], ...] = (ParamsError, DataError, StageError)
M = TypeVar("M", bound=BaseModel)
# A path option: its help text alone for a path DVC tracks (its default is the value dvc.yaml's
# command for this stage gives: paths live only in dvc.yaml; required where none does), or
# (default, help) for one whose default is not a pipeline path (None: optional, falling back to
# params or a sibling file; a string: a working directory such as a resumable state's).
PathOption = str | tuple[str | None, str]
PIPELINE_FILE = "dvc.yaml"


class StageParams:
    """The params file of one stage run; each section is validated when the stage asks for it."""

    def __init__(self, path: str):
        self.path = path
        self._data: dict | None = None

    def section(self, name: str, model: type[M]) -> M:
        if self._data is None:
            self._data = read_params(self.path)
        return validate_section(self._data, name, model, self.path)


def run_stage(
    stage: str,
    description: str,
    body: Callable[[argparse.Namespace, StageParams], str | None],
    *,
    paths: Mapping[str, PathOption],
    options: Callable[[argparse.ArgumentParser], None] | None = None,
    errors: tuple[type[Exception], ...] = (),
    argv: Sequence[str] | None = None,
) -> None:
    """Parse ``--params`` and the ``paths`` options (plus ``options``), run ``body``, print the summary
    line it returns; ``errors``: the stage's own expected failures."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=str(PARAMS_FILE), help="params file (default: %(default)s)")
    pipeline = pipeline_paths(stage)
    for name, spec in paths.items():
        default, help_text = spec if isinstance(spec, tuple) else (pipeline.get(name), spec)
        required = default is None and not isinstance(spec, tuple)
        where = f"required: dvc.yaml's {stage} stage gives none" if required else "default: %(default)s"
        parser.add_argument(
            f"--{name}",
            type=Path,
            default=None if default is None else Path(default),
            required=required,
            help=f"{help_text} ({where})",
        )
    if options is not None:
        options(parser)
    args = parser.parse_args(argv)
    if not os.environ.get(DEBUG_ENV):  # a warning is one line naming the stage, not the code that warned
        warnings.formatwarning = lambda message, category, *_, **__: f"{stage}: warning: {message}\n"
    try:
        summary = body(args, StageParams(args.params))
    except (*EXPECTED_ERRORS, *errors, OSError) as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        sys.exit(f"{stage}: error: {describe_os_error(exc) if isinstance(exc, OSError) else exc}")
    if summary:
        print(f"{stage}: {summary}")


def pipeline_stages() -> dict:
    """dvc.yaml's ``stages`` (the current directory's file, else the one of the checkout this package
    runs from); {} when there is none or it cannot be read."""
    import yaml  # PyYAML's C loader: ~20 ms for dvc.yaml

    found = [f for f in (Path(PIPELINE_FILE), Path(__file__).resolve().parents[1] / PIPELINE_FILE) if f.is_file()]
    try:
        stages = yaml.load(found[0].read_text(), Loader=yaml.CSafeLoader).get("stages", {}) if found else {}
    except (OSError, yaml.YAMLError, AttributeError):
        return {}
    return stages if isinstance(stages, dict) else {}


def pipeline_paths(stage: str) -> dict[str, str]:
    """The ``--option value`` pairs of ``stage``'s command in dvc.yaml (``pipeline_stages``): the
    defaults of the paths DVC tracks, which are written there only. Values DVC interpolates from
    params (``${...}``) are left out."""
    try:
        words = shlex.split(pipeline_stages().get(stage, {}).get("cmd", ""))
    except (AttributeError, TypeError, ValueError):
        return {}
    return {
        word[2:]: value
        for word, value in zip(words, words[1:])
        if word.startswith("--") and not value.startswith("-") and "${" not in value
    }


def restart_option(parser: argparse.ArgumentParser) -> None:
    """``--restart`` of the training stages: start over instead of resuming a saved state."""
    parser.add_argument("--restart", action="store_true", help="ignore a saved training state")


def describe_os_error(exc: OSError) -> str:
    """``<path>: <what the OS said>`` (both paths of a failed rename), or the error itself."""
    if exc.filename is None:
        return str(exc)
    paths = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else str(exc.filename)
    return f"{paths}: {exc.strerror or exc}"
