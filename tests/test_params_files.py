"""params.yaml and params-book.yaml must stay interchangeable: same sections and keys, all valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from steps.evaluate import EvaluateParams
from steps.finetune_classifier import FinetuneClassifierParams
from steps.finetune_instruct import FinetuneInstructParams
from steps.common.params import validate_section
from steps.pretrain import PretrainParams
from steps.score_instructions import ScoreInstructionsParams
from steps.score_spam import ScoreSpamParams

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {
    "pretrain": PretrainParams,
    "evaluate": EvaluateParams,
    "finetune_classifier": FinetuneClassifierParams,
    "finetune_instruct": FinetuneInstructParams,
    "score_instructions": ScoreInstructionsParams,
    "score_spam": ScoreSpamParams,
}


def key_paths(tree: dict, prefix: str = "") -> set[str]:
    paths = set()
    for key, value in tree.items():
        paths.add(prefix + key)
        if isinstance(value, dict):
            paths |= key_paths(value, f"{prefix}{key}.")
    return paths


@pytest.fixture(scope="module")
def params_files() -> dict[str, dict]:
    return {name: yaml.safe_load((ROOT / name).read_text()) for name in ("params.yaml", "params-book.yaml")}


def test_book_params_have_exactly_the_default_keys(params_files: dict[str, dict]) -> None:
    default, book = (key_paths(params_files[name]) for name in ("params.yaml", "params-book.yaml"))
    assert sorted(default - book) == [] and sorted(book - default) == []


@pytest.mark.parametrize("name", ["params.yaml", "params-book.yaml"])
def test_every_training_section_validates(name: str, params_files: dict[str, dict]) -> None:
    for section, model in SECTIONS.items():
        validate_section(params_files[name], section, model, name)


def test_book_params_are_the_books_settings(params_files: dict[str, dict]) -> None:
    book = params_files["params-book.yaml"]
    model = book["pretrain"]["model"]
    assert (model["preset"], model["qkv_bias"], model["tie_embeddings"], model["drop_rate"]) == ("gpt2-small", False, False, 0.1)
    assert (book["pretrain"]["epochs"], book["pretrain"]["batch_size"], book["pretrain"]["optimizer"]["lr"]) == (10, 2, 4e-4)
    assert book["base_model"]["dir"] == "models/gpt2" and book["load_gpt2"]["required"] is True
    spam = book["finetune_classifier"]
    assert (spam["trainable"], spam["token_position"], spam["lr"], spam["epochs"]) == ("last_block", "last", 5e-5, 5)
    assert (book["finetune_instruct"]["lr"], book["finetune_instruct"]["epochs"]) == (5e-5, 2)
