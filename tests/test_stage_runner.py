"""The stage runner (llmpipe.cli.run_stage): the paths DVC tracks are written only in dvc.yaml, and
``python -m steps.<name>`` takes their defaults from its stage's command there."""

from __future__ import annotations

import importlib
import pkgutil
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import steps
from llmpipe.cli import pipeline_paths, run_stage

REPO = Path(__file__).resolve().parents[1]
STAGE_MODULES = sorted(m.name for m in pkgutil.iter_modules(steps.__path__) if not m.ispkg)


def dvc_commands() -> dict[str, list[str]]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: shlex.split(stage["cmd"]) for name, stage in stages.items()}


@pytest.mark.parametrize("module", STAGE_MODULES)
def test_every_stage_path_has_its_default_in_dvc_yaml(
    module: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--help`` lists no required path: every path option without a default of its own is given by
    its dvc.yaml stage's command, and the default shown is that command's value."""
    stage = importlib.import_module(f"steps.{module}")
    with pytest.raises(SystemExit) as exit_:
        stage.main(["--help"])
    assert exit_.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "required:" not in shown, shown
    declared = {}
    monkeypatch.setattr(stage, "run_stage", lambda name, *a, paths, **k: declared.update(name=name, paths=paths))
    stage.main([])
    given = pipeline_paths(declared["name"])
    for option, spec in declared["paths"].items():
        if isinstance(spec, str):  # a pipeline path: its one home is dvc.yaml
            assert option in given, f"dvc.yaml's {declared['name']} command does not give --{option}"
            assert f"--{option}" in shown and f"default: {given[option]})" in shown, (option, given[option])


def test_the_defaults_are_the_commands_own_values() -> None:
    commands = dvc_commands()
    assert pipeline_paths("evaluate")["position-loss"] == "plots/evaluate_position_loss.csv"
    words = commands["build_windows"]
    assert pipeline_paths("build_windows") == {w[2:]: v for w, v in zip(words, words[1:]) if w.startswith("--")}
    assert "base" not in pipeline_paths("finetune_classifier")  # ${classifier_base.dir}: read from params
    assert pipeline_paths("no_such_stage") == {}


def test_a_path_no_dvc_yaml_gives_is_required(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "dvc.yaml").write_text("stages:\n  demo:\n    cmd: python -m steps.demo --out here\n")
    monkeypatch.chdir(tmp_path)  # the current directory's dvc.yaml comes first
    seen = {}

    def body(args, params) -> str:
        seen.update(out=args.out, cache=args.cache)
        return "ok"

    paths = {"out": "where it goes", "cache": ("work/cache", "a working directory")}
    run_stage("demo", "A demo stage.", body, paths=paths, argv=[])
    assert seen == {"out": Path("here"), "cache": Path("work/cache")}
    with pytest.raises(SystemExit) as exit_:
        run_stage("other", "A stage dvc.yaml lacks.", body, paths=paths, argv=[])
    assert exit_.value.code == 2  # argparse: --out is required


def test_a_stage_runs_from_the_repository_with_dvc_yamls_paths_alone(tmp_path: Path) -> None:
    """The README's way to run one stage by hand: ``python -m steps.<name>`` and nothing else."""
    done = subprocess.run(
        [sys.executable, "-m", "steps.check_params", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0 and "(default: reports/params_check.json)" in " ".join(done.stdout.split())
