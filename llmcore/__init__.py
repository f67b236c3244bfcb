"""llmcore: a GPT written from scratch in PyTorch (tokenizer, datasets, model, generation,
training loop, GPT-2 weight loading, checkpoints).

Pure PyTorch + tiktoken: this package never imports prefect, dvc or mlflow; training exposes
callbacks so that pipeline steps can log wherever they like.
"""

from llmcore.config import PRESETS, GPTConfig
from llmcore.model import GPTModel

__all__ = ["GPTConfig", "GPTModel", "PRESETS"]
