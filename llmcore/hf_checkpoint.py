"""Load Hugging Face Llama / Qwen3 / Gemma 3 (text) checkpoints into llmcore's DecoderModel.

A model directory holds ``config.json`` and either ``model.safetensors`` or shards
``model-0000x-of-0000y.safetensors`` listed by ``model.safetensors.index.json``. The model is built
on the meta device (no memory), then every tensor is read on its own (``safe_open`` per tensor,
memory-mapped, released right after), renamed, checked against the shape the config implies,
cast to the wanted dtype and assigned in place: peak memory is the model plus one tensor.

Names are mapped one by one (``llmcore_name``); a tensor the model has no place for, a missing
one or a wrong shape raises ``CheckpointError`` naming the tensor and its file. ``convert_hf``
writes an llmcore checkpoint (format ``llmcore-decoder``) that also carries the tokenizer files,
so the converted directory works offline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from llmcore.checkpoint import CheckpointError, save_checkpoint
from llmcore.config import ConfigError
from llmcore.decoder import DecoderModel
from llmcore.decoder_config import DecoderConfig, config_from_hf

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# What a model directory carries besides the weights: the tokenizer and its chat template.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
HUB_PATTERNS = ["config.json", "*.safetensors", INDEX_FILE, *TOKENIZER_FILES]

# Per-layer renames: the Hugging Face name after "model.layers.{i}." -> llmcore's after "trf_blocks.{i}.".
_LAYER_NAMES = {
    "input_layernorm": "norm1",
    "self_attn.q_proj": "att.q_proj",
    "self_attn.k_proj": "att.k_proj",
    "self_attn.v_proj": "att.v_proj",
    "self_attn.o_proj": "att.out_proj",
    "self_attn.q_norm": "att.q_norm",
    "self_attn.k_norm": "att.k_norm",
    "pre_feedforward_layernorm": "norm2",  # Gemma: the norm before the feed-forward
    "post_feedforward_layernorm": "post_ff_norm",
    "mlp.gate_proj": "ff.gate",
    "mlp.up_proj": "ff.up",
    "mlp.down_proj": "ff.down",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


class BaseUnavailableError(RuntimeError):
    """A base model could not be found locally nor downloaded."""


def llmcore_name(hf_name: str, cfg: DecoderConfig) -> str | None:
    """llmcore's parameter name for a Hugging Face tensor name; None if the model has no such tensor."""
    top = {
        "model.embed_tokens.weight": "tok_emb.weight",
        "model.norm.weight": "final_norm.weight",
        "lm_head.weight": "out_head.weight",
    }
    if hf_name in top:
        return top[hf_name]
    match = _LAYER_RE.fullmatch(hf_name)
    if not match:
        return None
    layer, module, kind = match.groups()
    if module == "post_attention_layernorm":  # Gemma: after attention; the others: before the feed-forward
        ours = "post_att_norm" if cfg.sandwich_norm else "norm2"
    else:
        ours = _LAYER_NAMES.get(module)
    return None if ours is None else f"trf_blocks.{layer}.{ours}.{kind}"


def resolve_hf_source(source: str | os.PathLike) -> Path:
    """A local model directory as is; a Hub repo id ("Qwen/Qwen3-0.6B") through huggingface_hub's cache."""
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"model directory {path} lacks config.json")
        return path
    if path.is_absolute() or str(source).startswith((".", "~")) or path.exists() or str(source).count("/") != 1:
        raise BaseUnavailableError(f"base model {source}: no such directory (nor an owner/name Hub id)")
    from huggingface_hub import snapshot_download  # deferred: only the Hub path needs it

    try:
        return Path(snapshot_download(str(source), allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # huggingface_hub raises many types for "offline" / "gated" / "not found"
        raise BaseUnavailableError(
            f"could not get {source!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}); "
            "download it elsewhere (huggingface-cli download) and point the source at that directory"
        ) from exc


def read_hf_config(directory: Path) -> dict:
    path = directory / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return data


def weight_files(directory: Path) -> dict[str, list[str]]:
    """Tensor names per safetensors file (the index's map for shards, else the single file's keys)."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: no valid weight_map: {exc}") from exc
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(file, []).append(name)
        for file in files:
            if not (directory / file).is_file():
                raise CheckpointError(f"{index}: shard {file} not found")
        return files
    if not (directory / SINGLE_FILE).is_file():
        raise CheckpointError(f"model directory {directory} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    try:
        with safe_open(directory / SINGLE_FILE, framework="pt") as f:
            return {SINGLE_FILE: list(f.keys())}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{directory / SINGLE_FILE}: unreadable safetensors file: {exc}") from exc


def _read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor, its file mapped only while it is read."""
    try:
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(name)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read tensor {name}: {exc}") from exc


def load_hf_state(model: DecoderModel, directory: Path, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Every tensor of the directory, renamed, shape-checked and cast; errors name the tensor."""
    cfg = model.cfg
    expected = dict(model.named_parameters())  # distinct parameters: a tied head appears once
    state: dict[str, torch.Tensor] = {}
    tied_head: tuple[Path, str] | None = None
    for file, names in weight_files(directory).items():
        for hf_name in names:
            ours = llmcore_name(hf_name, cfg)
            if ours == "out_head.weight" and cfg.tie_embeddings:
                tied_head = (directory / file, hf_name)  # checked against the embedding below
                continue
            if ours not in expected:
                raise CheckpointError(
                    f"{directory / file}: tensor {hf_name} has no place in a {cfg.family} model "
                    "(unexpected name for this config.json)"
                )
            tensor = _read_tensor(directory / file, hf_name)
            if tuple(tensor.shape) != tuple(expected[ours].shape):
                raise CheckpointError(
                    f"{directory / file}: tensor {hf_name} has shape {tuple(tensor.shape)}, "
                    f"config.json implies {tuple(expected[ours].shape)}"
                )
            state[ours] = tensor.to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{directory}: missing tensor {missing[0]} ({len(missing)} missing in all)")
    if tied_head is not None:
        head = _read_tensor(*tied_head).to(device=device, dtype=dtype)
        if not torch.equal(head, state["tok_emb.weight"]):
            raise CheckpointError(
                f"{tied_head[0]}: tensor {tied_head[1]} differs from the embedding, "
                "but config.json ties them (tie_word_embeddings)"
            )
    return state


def load_hf_model(
    source: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    map_location: str | torch.device = "cpu",
    **overrides,
) -> DecoderModel:
    """DecoderModel with the weights of a HF model directory or Hub id, in ``dtype`` on ``map_location``."""
    directory = resolve_hf_source(source)
    try:
        cfg = config_from_hf(read_hf_config(directory), str(directory / "config.json"), **overrides)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from exc
    with torch.device("meta"):  # shapes only: nothing is allocated until the tensors are assigned
        model = DecoderModel(cfg)
    state = load_hf_state(model, directory, dtype, map_location)
    model.load_state_dict(state, strict=False, assign=True)  # completeness was checked name by name
    if cfg.tie_embeddings:
        model.out_head.weight = model.tok_emb.weight
    return model.to(map_location)


def copy_tokenizer_files(source: Path, target: Path) -> list[str]:
    """Copy the tokenizer and chat-template files ``source`` has into ``target``; their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
            copied.append(name)
    return copied


def convert_hf(source: str | os.PathLike, target: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write the HF model at ``source`` as an llmcore checkpoint (with its tokenizer) at ``target``."""
    directory = resolve_hf_source(source)
    model = load_hf_model(directory, dtype=dtype)
    extra = {"source": str(source), "dtype": str(dtype).removeprefix("torch.")}
    return save_checkpoint(model, target, extra=extra, files=lambda tmp: copy_tokenizer_files(directory, tmp))
