"""llmcore's own checkpoints: ``model.safetensors`` + ``config.json`` in one directory.

Loading is strict: a missing, unexpected or mis-shaped tensor, or a config that does not fit
the tensors, raises ``CheckpointError`` naming it; nothing is loaded partially. Nothing is ever
unpickled: weights are safetensors, and the training state (``train_state.pt``) is read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from llmcore.config import ConfigError, GPTConfig
from llmcore.decoder import DecoderModel
from llmcore.decoder_config import DecoderConfig
from llmcore.fileio import atomic_path
from llmcore.model import GPTModel

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "llmcore-gpt"
# A Llama / Qwen3 / Gemma 3 model (llmcore.decoder); its config names the family.
DECODER_FORMAT = "llmcore-decoder"


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it is loaded into (names the tensor or file)."""


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with each shared tensor once (a tied head is stored as the token embedding)."""
    seen: set[int] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        state[name] = tensor.detach().contiguous().cpu()
    return state


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model`` only if every tensor is present, expected and shaped right."""
    expected = unique_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(state[name].shape)}, the model expects {tuple(tensor.shape)}"
            )
    # strict=False only because tied weights appear under two names; both are covered above.
    model.load_state_dict(state, strict=False)


def save_checkpoint(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    kind: str | None = None,
    extra: dict[str, Any] | None = None,
    files: Callable[[Path], Any] | None = None,
) -> Path:
    """Write ``model`` (whose ``cfg`` is a GPTConfig or DecoderConfig) atomically as safetensors +
    JSON config; ``files(tmp_dir)`` may add files (a tokenizer) before the directory appears."""
    directory = Path(directory)
    if kind is None:
        kind = DECODER_FORMAT if isinstance(model.cfg, DecoderConfig) else FORMAT
    meta = {"format": kind, "config": model.cfg.to_dict(), **(extra or {})}
    with atomic_path(directory, is_dir=True) as tmp:
        save_file(unique_state_dict(model), str(tmp / WEIGHTS_FILE), metadata={"format": kind})
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if files is not None:
            files(tmp)
    return directory


def read_checkpoint_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory}: {CONFIG_FILE} not found")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or "config" not in meta:
        raise CheckpointError(f"{path}: no 'config' field; not an llmcore checkpoint")
    return meta


def read_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory}: {WEIGHTS_FILE} not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file: {exc}") from exc


def load_checkpoint(
    directory: str | os.PathLike, *, map_location: str | torch.device = "cpu", **overrides
) -> nn.Module:
    """Rebuild the GPTModel (or, format llmcore-decoder, the DecoderModel) saved in ``directory``;
    ``overrides`` change config fields (drop_rate)."""
    meta = read_checkpoint_meta(directory)
    kinds = {FORMAT: (GPTConfig, GPTModel), DECODER_FORMAT: (DecoderConfig, DecoderModel)}
    if meta.get("format") not in kinds:
        raise CheckpointError(f"checkpoint {directory}: format {meta.get('format')!r}, expected one of {sorted(kinds)}")
    config_cls, model_cls = kinds[meta["format"]]
    try:
        cfg = config_cls.from_dict({**meta["config"], **overrides})
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{Path(directory) / CONFIG_FILE}: invalid config: {exc}") from exc
    model = model_cls(cfg)
    load_state_strict(model, read_weights(directory), str(Path(directory) / WEIGHTS_FILE))
    return model.to(map_location)
