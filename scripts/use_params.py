"""``python -m scripts.use_params params-book.yaml``: set a preset's values in params.yaml.

A preset (params-book.yaml: the book's settings; params-qwen3.yaml: Qwen3-0.6B with LoRA on one
GPU) holds only the keys whose values differ from params.yaml's; this writes each of them into
params.yaml (DVC's round-trip YAML writer: params.yaml's comments stay, a preset key's own comment
replaces the default's), so `dvc repro` / `python -m pipelines.run` then run the preset and
`git checkout params.yaml` goes back. A key params.yaml does not have is an error naming it (a
trainer's section also takes any key of `training`, which it is read over), and nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from llmpipe.params import PARAMS_FILE, ParamsError


def overlay(target, preset, shared: Mapping | None, where: str = "") -> None:
    """Write ``preset``'s leaves into ``target`` (both ruamel round-trip mappings)."""
    for key, value in preset.items():
        name = f"{where}{key}"
        known = key in target or (shared is not None and key in shared)
        if not known:
            raise ParamsError(f"{name}: not a key of params.yaml (a preset only sets keys params.yaml has)")
        if isinstance(value, Mapping) and isinstance(target.get(key), Mapping):
            overlay(target[key], value, None, f"{name}.")
            continue
        target[key] = value
        comment = getattr(preset, "ca", None) and preset.ca.items.get(key)
        if comment and getattr(target, "ca", None) is not None:
            target.ca.items[key] = comment


def use_params(preset_file: Path, params_file: Path = PARAMS_FILE) -> list[str]:
    """Apply ``preset_file`` to ``params_file``; returns the sections it changed."""
    from dvc.utils.serialize import modify_yaml

    from steps.check_params import load_schema

    try:
        preset = YAML().load(preset_file.read_text())
    except (OSError, YAMLError) as exc:
        raise ParamsError(f"{preset_file}: cannot read it: {exc}") from None
    if not isinstance(preset, Mapping):
        raise ParamsError(f"{preset_file}: top level must be a mapping")
    read_over = {name: s["x-defaults"] for name, s in load_schema()["sections"].items() if "x-defaults" in s}
    with modify_yaml(str(params_file)) as params:
        for section, values in preset.items():
            if section not in params:
                raise ParamsError(f"{preset_file}: {section}: not a section of {params_file}")
            if isinstance(values, Mapping) and isinstance(params[section], Mapping):
                try:
                    overlay(params[section], values, params.get(read_over.get(section, "")), f"{section}.")
                except ParamsError as exc:
                    raise ParamsError(f"{preset_file}: {exc}") from None
            else:
                params[section] = values
    return list(preset)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", type=Path, help="a preset file (params-book.yaml, params-qwen3.yaml)")
    parser.add_argument(
        "--params", type=Path, default=PARAMS_FILE, help="the params file to write (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    try:
        sections = use_params(args.preset, args.params)
    except ParamsError as exc:
        sys.exit(f"use_params: error: {exc}")
    print(
        f"use_params: {args.params} now has {args.preset}'s values ({', '.join(sections)}); "
        f"`git checkout {args.params}` goes back"
    )


if __name__ == "__main__":
    main()
