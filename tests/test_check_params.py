"""The check_params stage: params.yaml validated before DVC runs (and so deletes the outputs of)
any other stage; fast (no torch); its schema is the stages' params models; stale resume states."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llmpipe.params import STATE_RECORD, ParamsError
from scripts.dvc_deps import stages
from scripts.params_schema import SCHEMA_FILE, render
from steps.check_params import check_params, load_schema, remove_finished_states

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def with_value(params: dict, dotted: str, value) -> dict:
    data = json.loads(json.dumps(params))
    node = data
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    return data


def test_the_schema_is_the_stages_params_models() -> None:
    assert SCHEMA_FILE.read_text() == render(), "run `python -m scripts.dvc_deps --write`"


def test_every_stage_depends_on_the_check_and_every_section_is_checked() -> None:
    sections = set(load_schema()["sections"])
    for name, stage in stages().items():
        if name == "check_params":
            assert stage["params"] == [{"params.yaml": None}]
            continue
        assert "reports/params_check.json" in stage["deps"], f"stage {name} does not wait for check_params"
        for entry in stage.get("params", []):
            section = entry if isinstance(entry, str) else next(iter(entry))
            covered = section in sections or f"{section.rsplit('.', 1)[0]}.*" in sections
            assert covered, f"stage {name} reads params {section!r} that check_params does not validate"


@pytest.mark.parametrize("name", ["params.yaml", "params-book.yaml", "params-qwen3.yaml"])
def test_the_shipped_params_files_pass(name: str, tmp_path: Path) -> None:
    from scripts.use_params import use_params

    target = tmp_path / "params.yaml"
    target.write_text((REPO / "params.yaml").read_text())
    if name != "params.yaml":  # a preset: params.yaml with its values
        use_params(REPO / name, target)
    data = yaml.safe_load(target.read_text())
    checked = check_params(data, load_schema(), name)
    assert {"pretrain", "finetune_classifier", "sources.corpus", "distributed", "tokenizer"} <= set(checked)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("pretrain.epochss", 3, "params.yaml: pretrain.epochss: unknown key (did you mean 'epochs'?)"),
        ("pretrain.epochs", "ten", "params.yaml: pretrain.epochs: 'ten' is not of type 'integer'"),
        ("pretrain.epochs", True, "params.yaml: pretrain.epochs: True is not of type 'integer'"),
        ("pretrain.batch_size", 8.0, "params.yaml: pretrain.batch_size: 8.0 is not of type 'integer'"),
        ("finetune_classifier.lr", "1e-3", "params.yaml: finetune_classifier.lr: '1e-3' is not of type 'number'"),
        ("pretrain.epochs", 0, "params.yaml: pretrain.epochs: 0 is less than the minimum of 1"),
        ("pretrain.precision", "fp8", "params.yaml: pretrain.precision: 'fp8' is not one of"),
        ("sources.corpus.sha256", "abc", "params.yaml: sources.corpus.sha256: "),
        ("training.precision", "fp8", "params.yaml: training.precision: 'fp8' is not one of"),  # once, not per trainer
        ("training.lrr", 1.0, "params.yaml: training.lrr: unknown key (did you mean 'lr'?)"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key(params: dict, key: str, value, expected: str) -> None:
    data = with_value(params, key, value)
    with pytest.raises(ParamsError) as caught:
        check_params(data, load_schema())
    assert str(caught.value).startswith(expected) and "\n" not in str(caught.value)


def test_judge_url_credentials_are_refused_without_showing_them(params: dict) -> None:
    data = with_value(params, "score_instructions.judge.url", "http://admin:hunter2@ollama.example:11434")
    with pytest.raises(
        ParamsError, match=r"score_instructions\.judge\.url: an http\(s\) URL with no user:password@"
    ) as caught:
        check_params(data, load_schema())
    assert "hunter2" not in str(caught.value)


def test_a_missing_section_is_named(params: dict) -> None:
    data = {k: v for k, v in params.items() if k != "evaluate"}
    with pytest.raises(ParamsError, match="missing section 'evaluate'"):
        check_params(data, load_schema())


def run_check(tmp_path: Path, params: dict, *extra: str) -> subprocess.CompletedProcess:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("LLMPIPE_DEBUG", None)
    code = (
        "import runpy, sys; runpy.run_module('steps.check_params', run_name='__main__'); "
        "print('torch imported' if 'torch' in sys.modules else 'no torch')"
    )
    return subprocess.run(
        [sys.executable, "-c", code, "--out", "reports/params_check.json", *extra],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_stage_fails_in_one_line_writes_nothing_and_never_imports_torch(tmp_path: Path, params: dict) -> None:
    bad = run_check(tmp_path, with_value(params, "pretrain.epochss", 3))
    assert bad.returncode == 1
    assert bad.stderr.strip() == (
        "check_params: error: params.yaml: pretrain.epochss: unknown key (did you mean 'epochs'?)"
    )
    assert not (tmp_path / "reports" / "params_check.json").exists()
    good = run_check(tmp_path, params)
    assert good.returncode == 0, good.stderr
    assert "params sections valid" in good.stdout and "no torch" in good.stdout
    assert json.loads((tmp_path / "reports" / "params_check.json").read_text()) == {
        "params": "params.yaml",
        "valid": True,
    }


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
    }
    env.pop("LLMPIPE_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )


def test_dvc_repro_stops_at_a_typo_before_removing_a_later_stages_outputs(tmp_path: Path, params: dict) -> None:
    """A real DVC repo: check_params then a stage that reads ``pretrain``; a typo leaves its output."""
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    assert dvc(repo, "init", "-q").returncode == 0
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    model = (
        "import yaml, pathlib; p = yaml.safe_load(open('params.yaml'))['pretrain']; "
        "pathlib.Path('model').mkdir(exist_ok=True); pathlib.Path('model/weights').write_text(str(p['epochs']))"
    )
    (repo / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "check_params": {
                        "cmd": "python -m steps.check_params --out reports/params_check.json",
                        "params": [{"params.yaml": None}],
                        "outs": ["reports/params_check.json"],
                    },
                    "pretrain": {
                        "cmd": f'python -c "{model}"',
                        "deps": ["reports/params_check.json"],
                        "params": ["pretrain"],
                        "outs": ["model"],
                    },
                }
            },
            sort_keys=False,
        )
    )
    first = dvc(repo, "repro", "pretrain")
    assert first.returncode == 0, first.stdout + first.stderr
    for bad in (3, "ten"):
        key = "epochss" if bad == 3 else "epochs"
        data = with_value(params, f"pretrain.{key}", bad)
        (repo / "params.yaml").write_text(yaml.safe_dump(data))
        failed = dvc(repo, "repro", "pretrain")
        assert failed.returncode != 0
        assert f"check_params: error: params.yaml: pretrain.{key}: " in failed.stdout + failed.stderr
        assert (repo / "model" / "weights").read_text() == str(params["pretrain"]["epochs"]), "the model was removed"
    (repo / "params.yaml").write_text(yaml.safe_dump(with_value(params, "pretrain.epochs", 7)))
    fixed = dvc(repo, "repro", "pretrain")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert (repo / "model" / "weights").read_text() == "7"


def test_a_state_whose_run_finished_is_removed_and_others_stay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    done = {"epochs": 2, "lr": 5e-05, "seed": 1}  # a trainer records its section read over `training`
    states = {}
    for key, section_params in (
        ("finished", done),
        ("other", {**done, "epochs": 3}),
        ("other_seed", {**done, "seed": 2}),
    ):
        states[key] = tmp_path / ".cache" / "pretrain" / key
        states[key].mkdir(parents=True)
        (states[key] / STATE_RECORD).write_text(
            json.dumps({"section": "pretrain", "params": section_params, "defaults": "training"})
        )
    time.sleep(0.05)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "pretrained").write_text("restored after the state was left")
    lock = {
        "stages": {
            "pretrain": {
                "params": {"params.yaml": {"pretrain": {"lr": 5.0e-05, "epochs": 2}, "training": {"seed": 1}}},
                "outs": [{"path": "models/pretrained", "md5": "x"}],
            }
        }
    }
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert remove_finished_states() == [Path(".cache/pretrain/finished")]
    assert not states["finished"].exists() and states["other"].is_dir() and states["other_seed"].is_dir()


def test_a_state_newer_than_the_outputs_stays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same params as the finished run, but made after it (new data, killed): it may still resume."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "pretrained").write_text("old")
    time.sleep(0.05)
    state = tmp_path / ".cache" / "pretrain" / "k"
    state.mkdir(parents=True)
    (state / STATE_RECORD).write_text(json.dumps({"section": "pretrain", "params": {"epochs": 2}}))
    lock = {
        "stages": {
            "pretrain": {
                "params": {"params.yaml": {"pretrain": {"epochs": 2}}},
                "outs": [{"path": "models/pretrained"}],
            }
        }
    }
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert remove_finished_states() == [] and state.is_dir()
