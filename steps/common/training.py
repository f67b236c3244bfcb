"""What the training stages share around ``llmcore.train.train``."""

from __future__ import annotations

import dataclasses

from llmcore.checkpoint import CheckpointError
from llmcore.config import ConfigError
from llmcore.tokenizer import TokenizerFilesError
from llmcore.train import TrainConfig, TrainingDivergedError
from steps.common.models import BaseModelError
from steps.common.params import StrictModel

# What a training stage's CLI reports in one line (steps.common.cli.run_stage's ``errors``).
TRAINING_ERRORS = (ConfigError, CheckpointError, TokenizerFilesError, TrainingDivergedError, BaseModelError)


def train_config_from(params: StrictModel) -> TrainConfig:
    """The TrainConfig of a fine-tuning params section: every field it shares by name with TrainConfig."""
    shared = {f.name for f in dataclasses.fields(TrainConfig)} & set(type(params).model_fields)
    return TrainConfig(**{name: getattr(params, name) for name in shared})


