"""params.yaml, params-book.yaml and params-qwen3.yaml must stay interchangeable: same sections and
keys (a trainer's section read over the shared `training` section, as the stages read it), all valid."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmpipe.params import validate_section
from scripts.dvc_deps import sections_read, stage_module, stages

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("params.yaml", "params-book.yaml", "params-qwen3.yaml")


def stage_sections() -> dict[str, type]:
    """Every params section a dvc.yaml stage reads, with the model that validates it (found in the
    stage modules themselves, so a new stage is covered without editing this test)."""
    sections = {}
    for stage in stages().values():
        module = importlib.import_module(stage_module(stage))
        sections.update(sections_read(module.__name__))
    return sections


def key_paths(tree: dict, prefix: str = "") -> set[str]:
    paths = set()
    for key, value in tree.items():
        paths.add(prefix + key)
        if isinstance(value, dict):
            paths |= key_paths(value, f"{prefix}{key}.")
    return paths


def effective(data: dict) -> dict:
    """The params as the stages see them: each trainer's section over the `training` section."""
    trainers = {section for section, model in stage_sections().items() if getattr(model, "DEFAULTS_SECTION", None)}
    return {name: {**data["training"], **value} if name in trainers else value for name, value in data.items()}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """params.yaml, and params.yaml with each preset applied (`python -m scripts.use_params <preset>`)."""
    from scripts.use_params import use_params

    files = {"params.yaml": yaml.safe_load((ROOT / "params.yaml").read_text())}
    for name in PRESETS[1:]:
        target = tmp_path_factory.mktemp("preset") / "params.yaml"
        target.write_text((ROOT / "params.yaml").read_text())
        use_params(ROOT / name, target)
        files[name] = yaml.safe_load(target.read_text())
    return files


@pytest.fixture(scope="module")
def params_files(written: dict[str, dict]) -> dict[str, dict]:
    return {name: effective(data) for name, data in written.items()}


def test_a_preset_holds_only_what_differs_and_applies_in_one_command(tmp_path: Path) -> None:
    default = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name in PRESETS[1:]:
        preset = yaml.safe_load((ROOT / name).read_text())
        same = [
            f"{section}.{key}"
            for section, values in preset.items()
            if isinstance(values, dict)
            for key, value in values.items()
            if (default[section] or {}).get(key, object()) == value
        ]
        assert not same, f"{name} repeats params.yaml's values: {same}"
        assert len((ROOT / name).read_text().splitlines()) < 100
    target = tmp_path / "params.yaml"
    target.write_text((ROOT / "params.yaml").read_text())
    done = subprocess.run(
        [sys.executable, "-m", "scripts.use_params", str(ROOT / "params-book.yaml"), "--params", str(target)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "now has" in done.stdout, done.stderr
    text = target.read_text()
    assert "lr: 4.0e-4" in text and "# ---- the trainers' shared settings" in text  # params.yaml's comments stay
    assert "init: torch             # PyTorch's default initialisation, as the book's GPTModel" in text  # the preset's
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain:\n  lrr: 1.0\n")
    failed = subprocess.run(
        [sys.executable, "-m", "scripts.use_params", str(bad), "--params", str(target)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 1 and failed.stderr.strip() == (
        f"use_params: error: {bad}: pretrain.lrr: not a key of params.yaml (a preset only sets keys params.yaml has)"
    )
    assert target.read_text() == text


def test_the_trainers_shared_settings_are_written_once(written: dict[str, dict]) -> None:
    trainers = [s for s, model in stage_sections().items() if getattr(model, "DEFAULTS_SECTION", None)]
    assert sorted(trainers) == [
        "adapt_pretrain",
        "finetune_classifier",
        "finetune_instruct",
        "preference_tune",
        "pretrain",
    ]
    for name, data in list(written.items())[:1]:  # params.yaml (the presets' repeats: the test above)
        for key, value in data["training"].items():
            same = [s for s in trainers if data[s].get(key, value) == value and key in data[s]]
            assert not same, f"{name}: {same} repeat training.{key}: {value!r}"


def test_book_params_have_exactly_the_default_keys(params_files: dict[str, dict]) -> None:
    default, book = (key_paths(params_files[name]) for name in ("params.yaml", "params-book.yaml"))
    assert sorted(default - book) == [] and sorted(book - default) == []


@pytest.mark.parametrize("name", PRESETS)
def test_every_stage_section_validates(name: str, params_files: dict[str, dict]) -> None:
    sections = stage_sections()
    assert {"pretrain", "finetune_classifier", "score_spam", "windows", "tokenizer"} <= set(sections)
    for section, model in sections.items():
        validate_section(params_files[name], section, model, name)


def test_book_params_are_the_books_settings(params_files: dict[str, dict]) -> None:
    book = params_files["params-book.yaml"]
    model = book["pretrain"]["model"]
    assert (model["preset"], model["qkv_bias"], model["tie_embeddings"], model["drop_rate"]) == (
        "gpt2-small",
        False,
        False,
        0.1,
    )
    assert (book["pretrain"]["epochs"], book["pretrain"]["batch_size"], book["pretrain"]["lr"]) == (10, 2, 4e-4)
    assert book["base_model"]["dir"] == "models/gpt2" and book["load_gpt2"]["required"] is True
    assert book["classifier_base"]["dir"] == "models/gpt2"  # the book's classifier: GPT-2, no adaptation
    spam = book["finetune_classifier"]
    assert (spam["trainable"], spam["token_position"], spam["lr"], spam["epochs"]) == ("last_block", "last", 5e-5, 5)
    assert (book["finetune_instruct"]["lr"], book["finetune_instruct"]["epochs"]) == (5e-5, 2)


def test_qwen3_preset_differs_only_where_it_fine_tunes_qwen3_with_lora(params_files: dict[str, dict]) -> None:
    default, qwen3 = params_files["params.yaml"], params_files["params-qwen3.yaml"]
    assert sorted(key_paths(qwen3) - key_paths(default)) == [
        "finetune_instruct.lora.alpha",
        "finetune_instruct.lora.rank",
    ]
    assert key_paths(default) <= key_paths(qwen3)
    assert sorted(name for name in default if default[name] != qwen3[name]) == [
        "base_model",
        "finetune_instruct",
        "score_instructions",
    ]
    assert qwen3["base_model"] == {"dir": "models/base", "source": "Qwen/Qwen3-0.6B", "dtype": "bfloat16"}
    assert qwen3["finetune_instruct"]["lora"] == {"rank": 16, "alpha": 32.0}
    assert qwen3["finetune_instruct"]["precision"] == "auto"  # bf16 autocast on a GPU, fp32 elsewhere


def field_paths(model: type, prefix: str = "") -> set[str]:
    """Every field of a params model, nested models' fields as ``a.b``."""
    paths = set()
    for name, info in model.model_fields.items():
        paths.add(prefix + name)
        nested = info.annotation
        if isinstance(nested, type) and hasattr(nested, "model_fields"):
            paths |= field_paths(nested, f"{prefix}{name}.")
    return paths


@pytest.mark.parametrize("name", PRESETS)
def test_no_silent_defaults_every_knob_is_written_in_the_params_files(name: str, params_files: dict[str, dict]) -> None:
    for section, model in stage_sections().items():
        if section == "training":  # the shared keys; each trainer's section (read over it) has them all
            continue
        written = key_paths(params_files[name][section])
        missing = sorted(field_paths(model) - written)
        assert not missing, f"{name}: section {section} leaves {missing} to code defaults"


def test_params_are_strictly_typed(params_files: dict[str, dict]) -> None:
    sections = stage_sections()
    for key, bad in [("epochs", True), ("lr", "1e-3"), ("batch_size", 8.0)]:
        data = {**params_files["params.yaml"], "pretrain": {**params_files["params.yaml"]["pretrain"], key: bad}}
        with pytest.raises(ValueError, match=rf"pretrain\.{key}: "):
            validate_section(data, "pretrain", sections["pretrain"], "params.yaml")


def test_params_read_as_dvc_writes_them() -> None:
    """`dvc exp run -S finetune_classifier.lr=2e-3` writes 2e-3, a number in YAML 1.2 (DVC's YAML)."""
    from llmpipe.params import load_yaml

    data = load_yaml("finetune_classifier:\n  lr: 2e-3\n  epochs: 5\n  mask: true\n")
    assert data == {"finetune_classifier": {"lr": 0.002, "epochs": 5, "mask": True}}


def test_a_trainer_reads_training_under_its_own_keys_and_errors_name_where_a_value_is_written(
    written: dict[str, dict],
) -> None:
    sections = stage_sections()
    data = {**written["params.yaml"], "training": {**written["params.yaml"]["training"], "device": "cpu"}}
    clf = validate_section(data, "finetune_classifier", sections["finetune_classifier"])
    assert (clf.device, clf.lr, clf.grad_clip) == ("cpu", written["params.yaml"]["finetune_classifier"]["lr"], 1.0)
    own = {
        **data,
        "finetune_classifier": {**data["finetune_classifier"], "device": "cuda"},
    }  # -S finetune_classifier.device=cuda
    assert validate_section(own, "finetune_classifier", sections["finetune_classifier"]).device == "cuda"
    bad = {**data, "training": {**data["training"], "grad_clip": -1.0}}
    with pytest.raises(ValueError, match=r"training\.grad_clip: Input should be greater than 0"):
        validate_section(bad, "pretrain", sections["pretrain"])
    missing = {**data, "pretrain": {k: v for k, v in data["pretrain"].items() if k != "lr"}}
    with pytest.raises(ValueError, match=r"pretrain\.lr: Field required"):
        validate_section(missing, "pretrain", sections["pretrain"])


def test_a_flow_override_sets_a_shared_key_for_one_trainer_and_refuses_unknown_keys(tmp_path: Path) -> None:
    """The UI's params override ({"pretrain.precision": "auto"}), as `dvc exp run -S ++pretrain.precision=auto`."""
    from pipelines.dag import PipelineError
    from pipelines.experiments import set_params

    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    set_params({"pretrain.precision": "auto", "training.compile": True}, params)
    data = yaml.safe_load(params.read_text())
    assert (data["pretrain"]["precision"], data["training"]["compile"]) == ("auto", True)
    assert "# ---- the trainers' shared settings" in params.read_text()  # comments stay
    before = params.read_text()
    for key in ("score_spam.precision", "pretrain.precisionn"):
        with pytest.raises(PipelineError, match=f"no parameter '{key}' to override"):
            set_params({key: "auto"}, params)
    assert params.read_text() == before
