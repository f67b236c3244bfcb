"""``llm serve --model X`` serves X by the kind its checkpoint is: a classifier given as --model
(``llm serve --model models:/spam-classifier@champion``) is served as the classifier."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmpipe.model_dirs import UsageError
from serving.__main__ import build_parser, load_all
from serving.models import CLASSIFIER, GENERATOR
from tests.serve_helpers import tiny_classifier, tiny_generator


@pytest.fixture
def dirs(tmp_path: Path, gpt2_encoding_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.setenv("LLMCORE_GPT2_ENCODING_DIR", str(gpt2_encoding_dir))
    return {"generator": tiny_generator(tmp_path / "gen"), "classifier": tiny_classifier(tmp_path / "clf")}


def test_a_classifier_given_as_model_is_served_as_the_classifier(dirs: dict[str, Path]) -> None:
    args = build_parser().parse_args(["--model", str(dirs["classifier"])])  # --classifier left to its default
    served = load_all({GENERATOR: args.model, CLASSIFIER: str(dirs["classifier"])}, args)
    assert served[GENERATOR] is None and served[CLASSIFIER].kind == CLASSIFIER
    assert served[CLASSIFIER].source == str(dirs["classifier"]) and served[CLASSIFIER].model.labels == ["ham", "spam"]


def test_two_classifiers_named_explicitly_are_one_line_error(dirs: dict[str, Path]) -> None:
    args = build_parser().parse_args(["--model", str(dirs["classifier"]), "--classifier", str(dirs["classifier"])])
    with pytest.raises(UsageError, match="two classifiers"):
        load_all({GENERATOR: args.model, CLASSIFIER: args.classifier}, args)


def test_a_generator_and_a_classifier_load_as_before(dirs: dict[str, Path]) -> None:
    args = build_parser().parse_args(["--model", str(dirs["generator"]), "--classifier", str(dirs["classifier"])])
    served = load_all({GENERATOR: args.model, CLASSIFIER: args.classifier}, args)
    assert served[GENERATOR].kind == GENERATOR and served[CLASSIFIER].kind == CLASSIFIER
