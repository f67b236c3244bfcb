"""Model configuration: one dataclass plus named presets (GPT-2 sizes and small CPU shapes)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

INIT_SCHEMES = ("gpt2", "torch")


class ConfigError(ValueError):
    """An invalid model configuration; the message names the offending field."""


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    tie_embeddings: bool = True
    layer_norm_eps: float = 1e-5
    # Weight initialisation of a new model: "gpt2" draws every Linear and Embedding weight from
    # N(0, 0.02) (GPT-2, nanoGPT); "torch" keeps PyTorch's defaults (N(0, 1) embeddings), as the
    # book's GPTModel does. On the book's tiny corpus only "torch" lets the 124M model memorise
    # it the way chapter 5 shows. Loaded weights replace either.
    init: str = "gpt2"
    # Rows of the embedding and vocabulary head are rounded up to a multiple of this (64: 50,257
    # becomes 50,304), for matmul shapes that GPUs (and CPUs) run faster. The extra rows are never
    # predicted: the logits stop at vocab_size and the loss masks them. 1 (no padding) is GPT-2's
    # and the book's layout.
    pad_vocab_to_multiple: int = 1

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "pad_vocab_to_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.emb_dim % self.n_heads != 0:
            raise ConfigError(f"GPTConfig.emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})")
        if not isinstance(self.drop_rate, (int, float)) or not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate!r}")
        for name in ("qkv_bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"GPTConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.init not in INIT_SCHEMES:
            raise ConfigError(f"GPTConfig.init must be one of {INIT_SCHEMES}, got {self.init!r}")
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"GPTConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and the head: vocab_size rounded up to pad_vocab_to_multiple."""
        return -(-self.vocab_size // self.pad_vocab_to_multiple) * self.pad_vocab_to_multiple

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A preset by name, with any field overridden (e.g. context_length=256)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown GPTConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_GPT2 = dict(vocab_size=50257, context_length=1024, drop_rate=0.0, qkv_bias=True, tie_embeddings=True)

PRESETS: dict[str, GPTConfig] = {
    # The four GPT-2 sizes, shaped as OpenAI's checkpoints (qkv bias on, head tied to wte).
    "gpt2-small": GPTConfig(emb_dim=768, n_layers=12, n_heads=12, **_GPT2),
    "gpt2-medium": GPTConfig(emb_dim=1024, n_layers=24, n_heads=16, **_GPT2),
    "gpt2-large": GPTConfig(emb_dim=1280, n_layers=36, n_heads=20, **_GPT2),
    "gpt2-xl": GPTConfig(emb_dim=1600, n_layers=48, n_heads=25, **_GPT2),
    # Small shapes that train in seconds to minutes on a laptop CPU.
    "cpu-tiny": GPTConfig(context_length=64, emb_dim=64, n_heads=2, n_layers=2, drop_rate=0.0),
    "cpu-small": GPTConfig(context_length=128, emb_dim=192, n_heads=4, n_layers=4, drop_rate=0.1),
    "cpu-base": GPTConfig(context_length=256, emb_dim=384, n_heads=6, n_layers=6, drop_rate=0.1),
}
