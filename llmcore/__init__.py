"""llmcore: a GPT written from scratch in PyTorch (tokenizer, datasets, model, generation,
training loop, GPT-2 weight loading, checkpoints).

Pure PyTorch + tiktoken: this package never imports prefect, dvc or mlflow; training exposes
callbacks so that pipeline steps can log wherever they like.
"""

import importlib

__all__ = ["GPTConfig", "GPTModel", "PRESETS"]
# Imported when first asked for (PEP 562), not with the package: ``import llmcore.tokenizer`` in a
# data stage must not cost torch's import (seconds).
_HOMES = {"GPTConfig": "llmcore.config", "PRESETS": "llmcore.config", "GPTModel": "llmcore.model"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'llmcore' has no attribute {name!r}")
