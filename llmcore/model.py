"""The GPT model: token + learned position embeddings, pre-LayerNorm blocks, causal SDPA attention.

One readable file, in the spirit of nanoGPT's model.py. Attention projects q, k and v with one
fused Linear (GPT-2's ``c_attn`` layout, so GPT-2 weights map onto it by a transpose) and calls
``scaled_dot_product_attention``. An optional per-layer KV cache (see ``llmcore.generate``) turns
decoding into one new position per step instead of re-running the whole prefix.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from llmcore.config import GPTConfig


class LayerKV(Protocol):
    """What attention needs from a cache: store this step's k/v, return all k/v so far."""

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]: ...


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.attn_drop = cfg.drop_rate

    def forward(
        self,
        x: torch.Tensor,
        kv_cache: LayerKV | None = None,
        start_pos: int = 0,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, n_tokens, emb_dim = x.shape
        qkv = self.qkv(x).view(batch, n_tokens, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, heads, tokens, head_dim)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v, start_pos)
        # With no explicit mask, the causal mask is implied: square (prefix from position 0)
        # or a single new query that may see every cached key.
        is_causal = attn_mask is None and n_tokens > 1
        if is_causal and k.shape[2] != n_tokens:
            raise ValueError("a multi-token step after position 0 needs an explicit attn_mask")
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.attn_drop if self.training else 0.0,
            is_causal=is_causal,
        )
        return self.out_proj(y.transpose(1, 2).reshape(batch, n_tokens, emb_dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.proj = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.att = CausalSelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.ff = FeedForward(cfg)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x, kv_cache=None, start_pos=0, attn_mask=None):
        x = x + self.drop_shortcut(self.att(self.norm1(x), kv_cache, start_pos, attn_mask))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.out_head.weight = self.tok_emb.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # GPT-2's initialisation: N(0, 0.02) weights, zero biases.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Distinct parameters (a tied head counts once)."""
        return sum(p.numel() for p in self.parameters())

    def hidden_states(
        self,
        idx: torch.Tensor,
        *,
        kv_caches: list[LayerKV] | None = None,
        start_pos: int = 0,
        attn_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (batch, tokens, emb_dim): what the LM or a classifier head reads."""
        n_tokens = idx.shape[1]
        if position_ids is None:
            if start_pos + n_tokens > self.cfg.context_length:
                raise ValueError(
                    f"sequence of {start_pos + n_tokens} tokens exceeds context_length "
                    f"{self.cfg.context_length}"
                )
            position_ids = torch.arange(start_pos, start_pos + n_tokens, device=idx.device)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(position_ids))
        for i, block in enumerate(self.trf_blocks):
            x = block(x, None if kv_caches is None else kv_caches[i], start_pos, attn_mask)
        return self.final_norm(x)

    def forward(self, idx: torch.Tensor, **kwargs) -> torch.Tensor:
        """Logits (batch, tokens, vocab_size); keyword arguments as for ``hidden_states``."""
        return self.out_head(self.hidden_states(idx, **kwargs))
