"""Configuration of the modern decoder families (Llama 3.2, Qwen3, Gemma 3), and its reading from
a Hugging Face ``config.json``.

One frozen dataclass describes all three, in the spirit of litgpt's single ``Config``: the
families differ only in a handful of switches (QK-norm, Gemma's ``(1 + w)`` RMSNorm, sandwich
norms, embedding scaling, GeGLU vs SwiGLU, the sliding/global layer pattern and its two RoPE
bases). ``from_hf_config`` reads both config layouts found in the wild: the older ``rope_theta`` +
``rope_scaling`` (+ Gemma's ``rope_local_base_freq`` and ``sliding_window_pattern``) of the
published checkpoints, and transformers 5's ``rope_parameters`` (per layer type for Gemma 3).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from llmcore.config import ConfigError

FAMILIES = ("llama", "qwen3", "gemma3")
ACTIVATIONS = ("silu", "gelu_tanh")
ROPE_SCALINGS = ("none", "llama3", "linear")
LAYER_TYPES = ("full_attention", "sliding_attention")
# Hugging Face architectures this module reads (config.json's "architectures"), by family.
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3", "Gemma3ForCausalLM": "gemma3"}
HF_MODEL_TYPES = {"llama": "llama", "qwen3": "qwen3", "gemma3_text": "gemma3"}


@dataclass(frozen=True)
class DecoderConfig:
    family: str = "llama"
    """Which published family the weights come from: "llama", "qwen3" or "gemma3" (names the layout)."""
    vocab_size: int = 128256
    """Rows of the token embedding and the vocabulary head."""
    context_length: int = 131072
    """Longest sequence the model accepts (HF ``max_position_embeddings``)."""
    emb_dim: int = 2048
    """Width of the residual stream (HF ``hidden_size``)."""
    n_layers: int = 16
    """Number of transformer blocks."""
    n_heads: int = 32
    """Query heads per attention layer."""
    n_kv_heads: int = 8
    """Key/value heads (grouped-query attention: each is shared by n_heads / n_kv_heads query heads)."""
    head_dim: int = 64
    """Width of one head; Qwen3 and Gemma 3 set it independently of emb_dim / n_heads."""
    hidden_dim: int = 8192
    """Width of the gated feed-forward layer (HF ``intermediate_size``)."""
    activation: str = "silu"
    """Gate activation: "silu" (SwiGLU: Llama, Qwen3) or "gelu_tanh" (GeGLU: Gemma)."""
    norm_eps: float = 1e-5
    """RMSNorm's epsilon (HF ``rms_norm_eps``)."""
    norm_unit_offset: bool = False
    """Gemma's RMSNorm scales by (1 + weight), computed in fp32; others by weight."""
    qk_norm: bool = False
    """RMSNorm over each query and key head before RoPE (Qwen3, Gemma 3)."""
    sandwich_norm: bool = False
    """Gemma's extra norms after attention and after the feed-forward, before each residual add."""
    embed_scale: bool = False
    """Multiply token embeddings by sqrt(emb_dim), rounded to the weight dtype (Gemma)."""
    attention_bias: bool = False
    """Bias on the q/k/v/o projections (HF ``attention_bias``)."""
    mlp_bias: bool = False
    """Bias on the feed-forward projections (HF ``mlp_bias``, Llama only)."""
    query_pre_attn_scalar: float | None = None
    """Attention scores are scaled by this ** -0.5 (Gemma); None: head_dim ** -0.5."""
    rope_theta: float = 500000.0
    """RoPE base of the full-attention layers."""
    rope_scaling: str = "none"
    """RoPE frequency scaling: "none", "llama3" (Llama 3.1+'s smooth band scaling) or "linear"."""
    rope_factor: float = 1.0
    """Scaling factor of "llama3" and "linear" (positions are stretched by it)."""
    rope_low_freq_factor: float = 1.0
    """llama3 scaling: wavelengths beyond original_context / this are divided by rope_factor."""
    rope_high_freq_factor: float = 4.0
    """llama3 scaling: wavelengths below original_context / this are left alone; between: blended."""
    rope_original_context: int = 8192
    """llama3 scaling: the pre-training context the band limits are measured against."""
    local_rope_theta: float | None = None
    """RoPE base of the sliding-window layers, unscaled (Gemma 3: 10,000); None: the global RoPE."""
    sliding_window: int | None = None
    """Keys a sliding-window layer sees: those less than this many positions back (incl. itself)."""
    layer_types: tuple[str, ...] = ()
    """Per layer "full_attention" or "sliding_attention" (Gemma 3: 5 sliding, 1 full); empty: all full."""
    attn_softcap: float | None = None
    """tanh soft-capping of attention scores at this value (Gemma 2 style); None: off."""
    final_softcap: float | None = None
    """tanh soft-capping of the output logits at this value; None: off."""
    tie_embeddings: bool = True
    """The vocabulary head reuses the token embedding matrix."""
    drop_rate: float = 0.0
    """Dropout on attention and residual branches during fine-tuning (the published models use 0)."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    """Unused by the model: the source's token ids (bos/eos/pad) kept for generation."""

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "context_length",
            "emb_dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "hidden_dim",
            "rope_original_context",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"DecoderConfig.{name} must be a positive integer, got {value!r}")
        choices = {"family": FAMILIES, "activation": ACTIVATIONS, "rope_scaling": ROPE_SCALINGS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"DecoderConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"DecoderConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.layer_types and len(self.layer_types) != self.n_layers:
            raise ConfigError(
                f"DecoderConfig.layer_types has {len(self.layer_types)} entries for {self.n_layers} layers"
            )
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        if bad:
            raise ConfigError(f"DecoderConfig.layer_types: {bad[0]!r} is not one of {LAYER_TYPES}")
        if "sliding_attention" in self.layer_types and not (self.sliding_window or 0) > 0:
            raise ConfigError("DecoderConfig.sliding_window must be a positive integer when a layer slides")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"DecoderConfig.drop_rate must be in [0, 1), got {self.drop_rate!r}")

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and head (no padding in these families: vocab_size)."""
        return self.vocab_size

    def is_sliding(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == "sliding_attention"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown DecoderConfig field(s) {unknown}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["layer_types"] = list(self.layer_types)
        return data


def hf_family(hf: dict[str, Any], source: str = "config.json") -> str:
    """The family of a HF config.json, from its architectures (else model_type); a one-line error if unknown."""
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[arch]
    model_type = hf.get("model_type")
    if not archs and model_type in HF_MODEL_TYPES:
        return HF_MODEL_TYPES[model_type]
    raise ConfigError(
        f"{source}: architecture {archs or model_type!r} is not supported "
        f"(llmcore reads {', '.join(HF_ARCHITECTURES)}; GPT-2 goes through load_gpt2)"
    )


def _rope_fields(rope: dict[str, Any] | None, source: str) -> dict[str, Any]:
    """llmcore's rope_* fields from one HF rope dict (rope_type/type, factor, ...)."""
    rope = dict(rope or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {"rope_scaling": "none"}
    if kind == "linear":
        return {"rope_scaling": "linear", "rope_factor": float(rope["factor"])}
    if kind == "llama3":
        return {
            "rope_scaling": "llama3",
            "rope_factor": float(rope["factor"]),
            "rope_low_freq_factor": float(rope["low_freq_factor"]),
            "rope_high_freq_factor": float(rope["high_freq_factor"]),
            "rope_original_context": int(rope["original_max_position_embeddings"]),
        }
    raise ConfigError(f"{source}: rope type {kind!r} is not supported (default, linear, llama3)")


def _rope_from_hf(hf: dict[str, Any], family: str, source: str) -> dict[str, Any]:
    params = hf.get("rope_parameters")
    if params and isinstance(params.get("full_attention"), dict):  # transformers 5, per layer type
        full, local = params["full_attention"], params.get("sliding_attention") or {}
        out = {"rope_theta": float(full["rope_theta"]), **_rope_fields(full, source)}
        if local:
            if local.get("rope_type", "default") != "default":
                raise ConfigError(f"{source}: scaled RoPE on sliding layers is not supported")
            out["local_rope_theta"] = float(local["rope_theta"])
        return out
    rope = params or hf.get("rope_scaling") or {}
    default_theta = {"llama": 500000.0, "qwen3": 1000000.0, "gemma3": 1000000.0}[family]
    theta = (params or {}).get("rope_theta", hf.get("rope_theta", default_theta))
    out = {"rope_theta": float(theta), **_rope_fields(rope, source)}
    if family == "gemma3":
        out["local_rope_theta"] = float(hf.get("rope_local_base_freq", 10000.0))
    return out


def _layer_types(hf: dict[str, Any], family: str, n_layers: int) -> tuple[str, ...]:
    if hf.get("layer_types"):
        return tuple(hf["layer_types"])
    if family == "gemma3":
        pattern = int(hf.get("sliding_window_pattern", 6))
        return tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers))
    if family == "qwen3" and hf.get("use_sliding_window"):
        first = int(hf.get("max_window_layers", n_layers))
        return tuple("sliding_attention" if i >= first else "full_attention" for i in range(n_layers))
    return ()


def config_from_hf(hf: dict[str, Any], source: str = "config.json", **overrides: Any) -> DecoderConfig:
    """DecoderConfig for a Hugging Face Llama / Qwen3 / Gemma 3 (text) config.json."""
    family = hf_family(hf, source)
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [key for key in required if key not in hf]
    if missing:
        raise ConfigError(f"{source}: no {', '.join(missing)}")
    if hf.get("use_bidirectional_attention"):
        raise ConfigError(f"{source}: use_bidirectional_attention is not supported")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    activation = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}.get(act)
    if activation is None:
        raise ConfigError(f"{source}: activation {act!r} is not supported (silu, gelu_pytorch_tanh)")
    n_layers, gemma = int(hf["num_hidden_layers"]), family == "gemma3"
    layer_types = _layer_types(hf, family, n_layers)
    fields = dict(
        family=family,
        vocab_size=int(hf["vocab_size"]),
        emb_dim=int(hf["hidden_size"]),
        context_length=int(hf.get("max_position_embeddings", 131072)),
        hidden_dim=int(hf["intermediate_size"]),
        n_layers=n_layers,
        n_heads=int(hf["num_attention_heads"]),
        n_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]),
        activation=activation,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        norm_unit_offset=gemma,
        qk_norm=family in ("qwen3", "gemma3"),
        sandwich_norm=gemma,
        embed_scale=gemma,
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)) if gemma else None,
        sliding_window=int(hf["sliding_window"]) if "sliding_attention" in layer_types else None,
        layer_types=layer_types,
        attn_softcap=hf.get("attn_logit_softcapping"),
        final_softcap=hf.get("final_logit_softcapping"),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        extra={key: hf[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if hf.get(key) is not None},
        **_rope_from_hf(hf, family, source),
    )
    try:
        return DecoderConfig(**{**fields, **overrides})
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{source}: {exc}") from exc
