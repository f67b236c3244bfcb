"""Load OpenAI's GPT-2 checkpoints in the Hugging Face format (config.json + model.safetensors).

The weight mapping is spelled out name by name, as in nanoGPT's ``from_pretrained``. GPT-2 stores
its projections as ``Conv1D`` (in_features, out_features), the transpose of ``nn.Linear``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from llmcore.checkpoint import CheckpointError, load_state_strict, read_weights
from llmcore.config import GPTConfig
from llmcore.model import GPTModel

# The Hub repositories of the four published sizes, by llmcore preset name.
HF_REPOS = {
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
HF_FILES = ("config.json", "model.safetensors")
# Buffers some GPT-2 checkpoints carry (causal-mask constants), not weights.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


class WeightsUnavailableError(RuntimeError):
    """GPT-2 weights could not be found locally nor downloaded."""


def resolve_gpt2_source(source: str | os.PathLike) -> Path:
    """A local directory as is; a preset name or Hub repo id through huggingface_hub's cache."""
    path = Path(source)
    if not path.is_dir() and (path.is_absolute() or str(source).startswith((".", "~")) or path.exists()):
        # Clearly a filesystem path, never a Hub repo id ("owner/name"): say so, not "not on the Hub".
        raise WeightsUnavailableError(f"GPT-2 weights directory {path} does not exist (or is not a directory)")
    if path.is_dir():
        for name in HF_FILES:
            if not (path / name).is_file():
                raise CheckpointError(f"GPT-2 directory {path} lacks {name} (it needs {', '.join(HF_FILES)})")
        return path
    repo_id = HF_REPOS.get(str(source), str(source))
    if "/" not in repo_id and repo_id not in HF_REPOS.values():
        raise WeightsUnavailableError(
            f"{source!r} is neither a directory nor a GPT-2 size ({', '.join(HF_REPOS)}) nor a Hub repo id"
        )
    from huggingface_hub import snapshot_download  # deferred: only the Hub path needs it

    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(HF_FILES)))
    except Exception as exc:  # huggingface_hub raises many types for "offline" / "not found"
        raise WeightsUnavailableError(
            f"could not get GPT-2 weights {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
            "With no network, download config.json and model.safetensors elsewhere and point the source "
            "at that local directory (or pre-fill the Hub cache, HF_HOME)."
        ) from exc


def config_from_hf(hf: dict, **overrides) -> GPTConfig:
    """GPTConfig for a Hugging Face GPT-2 config.json; refuses variants this model does not implement."""
    unsupported = {
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
        "reorder_and_upcast_attn": (False,),
    }
    missing = [key for key in ("vocab_size", "n_positions", "n_embd", "n_head", "n_layer") if key not in hf]
    if missing:
        raise CheckpointError(f"config.json: no {', '.join(missing)}; not a GPT-2 config")
    for key, allowed in unsupported.items():
        if key in hf and hf[key] not in allowed:
            raise CheckpointError(f"config.json: {key}={hf[key]!r} is not supported (expected one of {allowed})")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise CheckpointError(f"config.json: n_inner={hf['n_inner']} is not 4 * n_embd")
    fields = dict(
        vocab_size=hf["vocab_size"],
        context_length=hf["n_positions"],
        emb_dim=hf["n_embd"],
        n_heads=hf["n_head"],
        n_layers=hf["n_layer"],
        drop_rate=0.0,
        qkv_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True),
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )
    return GPTConfig(**{**fields, **overrides})


def hf_to_llmcore_state(hf_state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Rename (and transpose Conv1D) Hugging Face GPT-2 tensors to llmcore's names."""
    state = {}
    for raw_name, tensor in hf_state.items():
        name = raw_name.removeprefix("transformer.")
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        state[name] = tensor
    out = {}
    with torch.device("meta"):  # shapes only, nothing allocated; the file's layout has no padded rows
        expected = {
            name: t.shape
            for name, t in GPTModel(dataclasses.replace(cfg, pad_vocab_to_multiple=1)).state_dict().items()
        }

    def take(hf_name: str, ours: str, transpose: bool = False) -> None:
        if hf_name not in state:
            raise CheckpointError(f"GPT-2 checkpoint: missing tensor {hf_name} (for {ours})")
        tensor = state.pop(hf_name)
        # Checked here, in the file's own names and layout, not after renaming and transposing.
        hf_shape = tuple(reversed(expected[ours])) if transpose else tuple(expected[ours])
        if tuple(tensor.shape) != hf_shape:
            raise CheckpointError(
                f"GPT-2 checkpoint: tensor {hf_name} has shape {tuple(tensor.shape)}, config.json implies {hf_shape}"
            )
        out[ours] = tensor.t().contiguous() if transpose else tensor

    take("wte.weight", "tok_emb.weight")
    take("wpe.weight", "pos_emb.weight")
    for i in range(cfg.n_layers):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        take(h + "ln_1.weight", b + "norm1.weight")
        take(h + "ln_1.bias", b + "norm1.bias")
        take(h + "attn.c_attn.weight", b + "att.qkv.weight", transpose=True)
        take(h + "attn.c_attn.bias", b + "att.qkv.bias")
        take(h + "attn.c_proj.weight", b + "att.out_proj.weight", transpose=True)
        take(h + "attn.c_proj.bias", b + "att.out_proj.bias")
        take(h + "ln_2.weight", b + "norm2.weight")
        take(h + "ln_2.bias", b + "norm2.bias")
        take(h + "mlp.c_fc.weight", b + "ff.fc.weight", transpose=True)
        take(h + "mlp.c_fc.bias", b + "ff.fc.bias")
        take(h + "mlp.c_proj.weight", b + "ff.proj.weight", transpose=True)
        take(h + "mlp.c_proj.bias", b + "ff.proj.bias")
    take("ln_f.weight", "final_norm.weight")
    take("ln_f.bias", "final_norm.bias")
    head = state.pop("lm_head.weight", None)
    if cfg.tie_embeddings:
        if head is not None and not torch.equal(head, out["tok_emb.weight"]):
            raise CheckpointError("GPT-2 checkpoint: lm_head.weight differs from wte.weight but the config ties them")
    elif head is None:
        raise CheckpointError("GPT-2 checkpoint: missing tensor lm_head.weight (untied head)")
    else:
        out["out_head.weight"] = head
    if state:
        raise CheckpointError(f"GPT-2 checkpoint: unexpected tensor(s) {sorted(state)[:5]}")
    for name in ("tok_emb.weight", "out_head.weight"):  # a padded vocabulary's extra rows: zeros, never predicted
        if name in out and cfg.padded_vocab_size > cfg.vocab_size:
            out[name] = torch.cat([out[name], out[name].new_zeros(cfg.padded_vocab_size - cfg.vocab_size, cfg.emb_dim)])
    return out


def load_gpt2(source: str | os.PathLike, *, map_location: str | torch.device = "cpu", **overrides) -> GPTModel:
    """GPTModel with GPT-2 weights from a local HF-format directory, a size name or a Hub repo id."""
    directory = resolve_gpt2_source(source)
    try:
        hf_config = json.loads((directory / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{directory / 'config.json'}: not valid JSON: {exc}") from exc
    cfg = config_from_hf(hf_config, **overrides)
    model = GPTModel(cfg)
    weights_path = directory / "model.safetensors"
    state = hf_to_llmcore_state(read_weights(directory), cfg)  # names the file if unreadable
    load_state_strict(model, state, str(weights_path))
    return model.to(map_location)
