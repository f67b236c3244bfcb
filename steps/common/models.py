"""The base model of the fine-tunes: an llmcore checkpoint that a training stage wrote."""

from __future__ import annotations

import json
from pathlib import Path

from llmcore.checkpoint import load_checkpoint
from llmcore.model import GPTModel
from steps.common.params import StrictModel


class BaseModelError(ValueError):
    """The base model directory holds no usable weights (e.g. GPT-2's could not be downloaded)."""


class BaseModelParams(StrictModel):
    dir: str  # an llmcore checkpoint: models/pretrained (own) or models/gpt2 (GPT-2's weights)


def load_base_model(base_dir: Path, **overrides) -> GPTModel:
    """The llmcore checkpoint in ``base_dir`` (``overrides``: config fields such as drop_rate).

    A ``status.json`` saying ``loaded: false`` (load_gpt2 without GPT-2's weights) is an error.
    """
    status_path = base_dir / "status.json"
    if status_path.is_file():
        status = json.loads(status_path.read_text())
        if not status.get("loaded", True):
            details = {k: v for k, v in status.items() if k != "loaded"}
            raise BaseModelError(
                f"base model {base_dir} has no weights ({status_path}: loaded=false {details}); "
                "GPT-2 weights were unavailable to load_gpt2. Provide them, or set base_model.dir "
                "to the project's own pretrained model (models/pretrained)"
            )
    if not (base_dir / "config.json").is_file():
        raise BaseModelError(f"base model {base_dir} not found (no config.json): run its stage first (dvc repro)")
    return load_checkpoint(base_dir, **overrides)
