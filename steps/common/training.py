"""What the training stages share around ``llmcore.train.train``."""

from __future__ import annotations

import dataclasses

from llmcore.train import TrainConfig
from steps.common.params import StrictModel


def train_config_from(params: StrictModel) -> TrainConfig:
    """The TrainConfig of a fine-tuning params section: every field it shares by name with TrainConfig."""
    shared = {f.name for f in dataclasses.fields(TrainConfig)} & set(type(params).model_fields)
    return TrainConfig(**{name: getattr(params, name) for name in shared})


