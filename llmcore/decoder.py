"""The modern decoder (Llama 3.2, Qwen3, Gemma 3), written out: RMSNorm, RoPE, grouped-query
attention, a gated feed-forward.

One model for the three families, switched by ``DecoderConfig`` (see llmcore.decoder_config):

* **RMSNorm** normalises by the root mean square in fp32; Gemma scales by ``1 + weight``.
* **RoPE** rotates the two halves of each query/key head by position-dependent angles (the
  "rotate half" layout of the Hugging Face checkpoints). Llama 3 stretches the low frequencies
  (``llama3`` scaling); Gemma 3's sliding layers use their own base (``local_rope_theta``).
* **Grouped-query attention**: ``n_kv_heads`` key/value heads, each shared by a group of query
  heads; Qwen3 and Gemma 3 RMS-normalise each query and key head first (QK-norm). Gemma 3's
  sliding layers see only the last ``sliding_window`` positions.
* **Feed-forward**: ``down(act(gate(x)) * up(x))``, SiLU (SwiGLU) or tanh-GELU (GeGLU).
* Gemma multiplies embeddings by sqrt(emb_dim) (rounded to the weight dtype) and adds a norm
  after each sub-layer ("sandwich"); the head may be tied to the embedding.

The model answers the same calls as llmcore.model.GPTModel (``hidden_states``, ``logits``,
``loss``, a ``LayerKV`` cache per layer), so llmcore.generate decodes it unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmcore.decoder_config import DecoderConfig
from llmcore.model import IGNORE_INDEX, LayerKV, attention, head_cross_entropy


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.unit_offset:  # Gemma: the scale is applied in fp32, then cast back
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(cfg: DecoderConfig, theta: float, scaled: bool) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,) of one RoPE, with Llama 3's or linear scaling if ``scaled``."""
    exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64, device="cpu").float() / cfg.head_dim
    inv_freq = 1.0 / (theta**exponents)
    if not scaled or cfg.rope_scaling == "none":
        return inv_freq
    if cfg.rope_scaling == "linear":
        return inv_freq / cfg.rope_factor
    # llama3: short wavelengths (high frequencies) stay, long ones are divided by the factor, and
    # the band in between blends the two smoothly.
    factor, low, high, old_ctx = (
        cfg.rope_factor,
        cfg.rope_low_freq_factor,
        cfg.rope_high_freq_factor,
        cfg.rope_original_context,
    )
    wavelen = 2 * math.pi / inv_freq
    scaled_freq = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled_freq / factor + smooth * scaled_freq
    in_band = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(in_band, blended, scaled_freq)


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (batch, 1, tokens, head_dim) for ``positions`` (batch, tokens), computed in fp32."""
    angles = positions[..., None].float() * inv_freq.to(positions.device)
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attention_mask(
    n_queries: int,
    n_keys: int,
    start_pos: int | torch.Tensor,
    attn_mask: torch.Tensor | None,
    window: int | None,
    device: torch.device,
) -> tuple[torch.Tensor | None, bool]:
    """The mask SDPA gets and whether it is implicitly causal. A sliding window keeps the keys less
    than ``window`` cache columns behind the query (the query's own column included); queries sit
    at columns ``start_pos...`` (an int), or at ``start_pos`` per row (a tensor: one-token steps)."""
    if window is None:
        if attn_mask is None and n_queries > 1:  # a Python bool also when n_queries is a symbol
            return None, True
        return attn_mask, False
    k_cols = torch.arange(n_keys, device=device)
    if isinstance(start_pos, torch.Tensor):
        q_cols = start_pos.to(device).reshape(-1, 1)
    else:
        q_cols = torch.arange(start_pos, start_pos + n_queries, device=device)[None, :]
    distance = q_cols[..., None] - k_cols  # (batch or 1, queries, keys)
    in_window = distance < window
    if attn_mask is None:
        return (in_window & (distance >= 0))[:, None], False
    return attn_mask & in_window[:, None], False


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.emb_dim, cfg.n_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.emb_dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.emb_dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.out_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.emb_dim, bias=cfg.attention_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_unit_offset)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_unit_offset)
        self.qk_norm = cfg.qk_norm
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        self.window = cfg.sliding_window if cfg.is_sliding(layer) else None
        self.softcap, self.drop = cfg.attn_softcap, cfg.drop_rate

    def forward(self, x, cos, sin, kv_cache: LayerKV | None = None, start_pos=0, attn_mask=None) -> torch.Tensor:
        batch, n_tokens, _ = x.shape
        q = self.q_proj(x).view(batch, n_tokens, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(batch, n_tokens, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, n_tokens, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v, start_pos)
        if isinstance(start_pos, int) and attn_mask is None and n_tokens > 1 and k.shape[2] != n_tokens:
            raise ValueError("a multi-token step after position 0 needs an explicit attn_mask")
        mask, is_causal = attention_mask(n_tokens, k.shape[2], start_pos, attn_mask, self.window, x.device)
        groups = self.n_heads // self.n_kv_heads
        if groups > 1:  # each key/value head serves `groups` consecutive query heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if self.softcap is None:
            dropout_p = self.drop if self.training else 0.0
            y = attention(q, k, v, mask, is_causal=is_causal, scale=self.scale, dropout_p=dropout_p)
        else:
            y = self._softcapped(q, k, v, mask, is_causal)
        return self.out_proj(y.transpose(1, 2).reshape(batch, n_tokens, self.n_heads * self.head_dim))

    def _softcapped(self, q, k, v, mask, is_causal) -> torch.Tensor:
        """Attention with scores soft-capped by tanh before the softmax (no SDPA kernel does this)."""
        scores = (q @ k.transpose(-2, -1)) * self.scale
        scores = torch.tanh(scores / self.softcap) * self.softcap
        if is_causal:
            n_q, n_k = scores.shape[-2:]
            mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return F.dropout(probs, self.drop, self.training) @ v


class GatedFeedForward(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.emb_dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.up = nn.Linear(cfg.emb_dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.hidden_dim, cfg.emb_dim, bias=cfg.mlp_bias)
        self.gelu = cfg.activation == "gelu_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate(x)
        gate = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down(gate * self.up(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        norm = lambda: RMSNorm(cfg.emb_dim, cfg.norm_eps, cfg.norm_unit_offset)  # noqa: E731
        self.norm1, self.att, self.norm2, self.ff = norm(), Attention(cfg, layer), norm(), GatedFeedForward(cfg)
        if cfg.sandwich_norm:
            self.post_att_norm, self.post_ff_norm = norm(), norm()
        self.sandwich, self.sliding = cfg.sandwich_norm, cfg.is_sliding(layer)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x, rope, kv_cache=None, start_pos=0, attn_mask=None):
        cos, sin = rope["local" if self.sliding and "local" in rope else "global"]
        h = self.att(self.norm1(x), cos, sin, kv_cache, start_pos, attn_mask)
        x = x + self.drop_shortcut(self.post_att_norm(h) if self.sandwich else h)
        h = self.ff(self.norm2(x))
        return x + self.drop_shortcut(self.post_ff_norm(h) if self.sandwich else h)


class DecoderModel(nn.Module):
    """A Llama / Qwen3 / Gemma 3 decoder; ``cfg`` says which (see the module doc)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.trf_blocks = nn.ModuleList(DecoderBlock(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.emb_dim, cfg.norm_eps, cfg.norm_unit_offset)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.out_head.weight = self.tok_emb.weight
        # Not in the state dict: always recomputed (also when the model is built on the meta device).
        self.register_buffer("inv_freq", rope_inv_freq(cfg, cfg.rope_theta, scaled=True), persistent=False)
        if cfg.local_rope_theta is not None:
            self.register_buffer(
                "local_inv_freq", rope_inv_freq(cfg, cfg.local_rope_theta, scaled=False), persistent=False
            )
        self.embed_scale = math.sqrt(cfg.emb_dim) if cfg.embed_scale else None

    def num_parameters(self) -> int:
        """Distinct parameters (a tied head counts once)."""
        return sum(p.numel() for p in self.parameters())

    def hidden_states(
        self,
        idx: torch.Tensor,
        *,
        kv_caches: list[LayerKV] | None = None,
        start_pos: int | torch.Tensor = 0,
        attn_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (batch, tokens, emb_dim); arguments as GPTModel.hidden_states."""
        n_tokens = idx.shape[1]
        if position_ids is None:
            if start_pos + n_tokens > self.cfg.context_length:
                raise ValueError(
                    f"sequence of {start_pos + n_tokens} tokens exceeds context_length {self.cfg.context_length}"
                )
            position_ids = torch.arange(start_pos, start_pos + n_tokens, device=idx.device)
        position_ids = position_ids.reshape(-1, n_tokens)
        x = self.tok_emb(idx)
        if self.embed_scale is not None:  # rounded to the weight dtype first, as Gemma's checkpoints expect
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype, device=x.device)
        rope = {"global": rope_cos_sin(self.inv_freq, position_ids, x.dtype)}
        if self.cfg.local_rope_theta is not None:
            rope["local"] = rope_cos_sin(self.local_inv_freq, position_ids, x.dtype)
        for i, block in enumerate(self.trf_blocks):
            x = block(x, rope, None if kv_caches is None else kv_caches[i], start_pos, attn_mask)
        return self.final_norm(x)

    def forward(self, idx: torch.Tensor, **kwargs) -> torch.Tensor:
        """Logits (batch, tokens, vocab_size); keyword arguments as for ``hidden_states``."""
        return self.logits(self.hidden_states(idx, **kwargs))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.out_head(hidden)
        cap = self.cfg.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (chunked through the head when no soft-cap applies)."""
        hidden = self.hidden_states(idx)
        head = self.out_head
        if type(head) is nn.Linear and head.bias is None and self.cfg.final_softcap is None:
            return head_cross_entropy(hidden, head.weight, targets, n_classes=self.cfg.vocab_size)
        return F.cross_entropy(self.logits(hidden).flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
