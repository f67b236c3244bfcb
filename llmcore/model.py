"""The GPT model: token + learned position embeddings, pre-LayerNorm blocks, causal SDPA attention.

One readable file, in the spirit of nanoGPT's model.py. Attention projects q, k and v with one
fused Linear (GPT-2's ``c_attn`` layout, so GPT-2 weights map onto it by a transpose) and calls
``scaled_dot_product_attention``. An optional per-layer KV cache (see ``llmcore.generate``) turns
decoding into one new position per step instead of re-running the whole prefix. ``GPTModel.loss``
computes the vocabulary head and cross-entropy a chunk of rows at a time, so training never holds
the full (tokens x 50257) logits, their log-softmax and their gradient at once. The vocabulary
rows may be padded (``GPTConfig.pad_vocab_to_multiple``) for faster matmuls; the padding is
never predicted.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from llmcore import cpu_kernels
from llmcore.config import GPTConfig


class LayerKV(Protocol):
    """What attention needs from a cache: store this step's k/v, return all k/v so far.

    ``start_pos`` is an int (the first new column), or a tensor of per-row positions in a one-token
    step of rows at different lengths (``llmcore.slot_cache.SlotKVCache``).
    """

    def update(
        self, k: torch.Tensor, v: torch.Tensor, start_pos: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


IGNORE_INDEX = -100  # targets with this value are skipped, as in F.cross_entropy
# Logits alive at once in the chunked loss: 2^25 fp32 values (128 MiB; 667 rows of 50,304). Fewer,
# larger chunks keep the head's three matmuls efficient; the budget keeps their memory bounded.
LOSS_CHUNK_ELEMENTS = 1 << 25


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, one chunk of rows at a time.

    The gradients are computed in the forward pass, while each chunk's logits are at hand
    (softmax minus one-hot), so backward only scales them: the logits are never stored. The
    matmuls run in ``matmul_dtype`` (bf16/fp16 under autocast); the softmax, the loss sum and the
    weight gradient's accumulation over chunks stay fp32. Logit columns from ``n_classes`` on (a
    padded head's extra rows) are masked out: they get probability 0 and no gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, n_valid, n_classes, chunk_rows, need_hidden, need_weight, matmul_dtype):
        with torch.autocast(hidden.device.type, enabled=False):  # every cast below is explicit
            grad_hidden = torch.empty_like(hidden) if need_hidden else None
            grad_weight = torch.empty_like(weight) if need_weight else None
            w = weight.to(matmul_dtype)  # a 16-bit copy under autocast, else the weight itself
            total = hidden.new_zeros((), dtype=torch.float32)
            scale = 1.0 / n_valid
            for start in range(0, hidden.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                h, t = hidden[rows].to(matmul_dtype), targets[rows]
                valid = t != IGNORE_INDEX
                safe_t = torch.where(valid, t, 0)[:, None]
                logits = (h @ w.T).float()
                if n_classes < logits.shape[1]:
                    logits[:, n_classes:] = float("-inf")
                log_probs = torch.log_softmax(logits, dim=-1)
                total -= log_probs.gather(1, safe_t).squeeze(1)[valid].sum()
                if need_hidden or need_weight:
                    # d(loss)/d(logits) = (softmax - one_hot(target)) / n_valid; ignored rows get 0.
                    grad_logits = log_probs.exp_()
                    grad_logits.scatter_add_(1, safe_t, torch.full_like(safe_t, -1, dtype=grad_logits.dtype))
                    grad_logits.mul_(valid[:, None].to(grad_logits.dtype) * scale)
                    _accumulate_grads(grad_logits.to(matmul_dtype), h, w, rows, grad_hidden, grad_weight, start == 0)
        ctx.grads = grad_hidden, grad_weight
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.grads
        if bool(grad_loss != 1.0):
            grad_hidden = None if grad_hidden is None else grad_hidden * grad_loss
            grad_weight = None if grad_weight is None else grad_weight * grad_loss
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def _accumulate_grads(grad_logits, h, w, rows, grad_hidden, grad_weight, first: bool) -> None:
    """One chunk's share of the head's gradients: its rows of grad_hidden, a sum into grad_weight."""
    if grad_hidden is not None:
        grad_hidden[rows] = grad_logits @ w
    if grad_weight is None:
        return
    if grad_weight.dtype == grad_logits.dtype:  # fp32: accumulate inside the matmul, no temporary
        grad_weight.addmm_(grad_logits.T, h, beta=0.0 if first else 1.0)
    elif first:
        grad_weight.copy_(grad_logits.T @ h)
    else:
        grad_weight += grad_logits.T @ h


@torch.compiler.disable  # a Python loop with data-dependent checks: torch.compile runs it as is
def head_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int | None = None,
    n_classes: int | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, targets)`` (mean; IGNORE_INDEX skipped) in row chunks.

    ``n_classes`` (default: every row of ``weight``) is the real vocabulary of a padded head.
    Under autocast the matmuls run in the autocast dtype and the rest in fp32.
    """
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    n_classes = weight.shape[0] if n_classes is None else n_classes
    out_of_range = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= n_classes))
    if bool(out_of_range.any()):
        raise ValueError(f"target id {targets[out_of_range][0].item()} is outside the vocabulary of {n_classes}")
    n_valid = int((targets != IGNORE_INDEX).sum())
    device_type = hidden.device.type
    autocasting = torch.is_autocast_enabled(device_type)
    matmul_dtype = torch.get_autocast_dtype(device_type) if autocasting else weight.dtype
    grad = torch.is_grad_enabled()  # under no_grad (evaluation) no gradient work is done at all
    return _ChunkedHeadCrossEntropy.apply(
        hidden,
        weight,
        targets,
        n_valid or float("nan"),
        n_classes,
        chunk_rows or max(1, LOSS_CHUNK_ELEMENTS // weight.shape[0]),
        grad and hidden.requires_grad,
        grad and weight.requires_grad,
        matmul_dtype,
    )


def attention(q, k, v, attn_mask=None, *, is_causal=False, scale=None, dropout_p=0.0) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, except for one query without a mask under torch.compile
    or torch.export (a compiled decoding step). There, fp32 on a CPU where llmcore's kernels are
    loaded (``llmcore.cpu_kernels``, which compiled decoding loads), their ``decode_attention``
    (GPT-2 small's 12 heads at 100-200 cached positions: ~13 us, where inductor's fused kernel
    took 20-45 in the step); otherwise plain matmuls and a softmax, which inductor fuses into one
    kernel (SDPA's CPU kernel stays an opaque call, ~35 us per layer, against ~25 fused). The
    query is scaled before the product: inductor rewrites ``softmax(q @ k.T * scale) @ v`` back
    into SDPA."""
    if torch.compiler.is_compiling() and q.shape[-2] == 1 and attn_mask is None and not is_causal and not dropout_p:
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        cpu_fp32 = q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.float32
        if cpu_kernels.loaded() and cpu_fp32 and k.shape[1] == q.shape[1] and not torch.is_grad_enabled():
            return cpu_kernels.decode_attention(q, k, v, scale)
        return torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale)


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
        start_pos: int | torch.Tensor = 0,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, n_tokens, emb_dim = x.shape
        qkv = self.qkv(x).view(batch, n_tokens, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, heads, tokens, head_dim)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v, start_pos)
        # With no explicit mask, the causal mask is implied: square (prefix from position 0)
        # or a single new query that may see every cached key.
        is_causal = False  # a Python bool also when n_tokens is a symbol (dynamic-shape compile)
        if attn_mask is None and n_tokens > 1:
            is_causal = True
        if is_causal and k.shape[2] != n_tokens:
            raise ValueError("a multi-token step after position 0 needs an explicit attn_mask")
        y = attention(q, k, v, attn_mask, is_causal=is_causal, dropout_p=self.attn_drop if self.training else 0.0)
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
        self.tok_emb = nn.Embedding(cfg.padded_vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.emb_dim, eps=cfg.layer_norm_eps)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.padded_vocab_size, bias=False)
        if cfg.init == "gpt2":
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
        start_pos: int | torch.Tensor = 0,
        attn_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (batch, tokens, emb_dim): what the LM or a classifier head reads."""
        n_tokens = idx.shape[1]
        if position_ids is None:
            if start_pos + n_tokens > self.cfg.context_length:
                raise ValueError(
                    f"sequence of {start_pos + n_tokens} tokens exceeds context_length {self.cfg.context_length}"
                )
            position_ids = torch.arange(start_pos, start_pos + n_tokens, device=idx.device)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(position_ids))
        for i, block in enumerate(self.trf_blocks):
            x = block(x, None if kv_caches is None else kv_caches[i], start_pos, attn_mask)
        return self.final_norm(x)

    def forward(self, idx: torch.Tensor, **kwargs) -> torch.Tensor:
        """Logits (batch, tokens, vocab_size); keyword arguments as for ``hidden_states``."""
        return self.logits(self.hidden_states(idx, **kwargs))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The vocabulary head; a padded head's extra rows are cut off, so nothing can predict them."""
        logits = self.out_head(hidden)
        return logits if logits.shape[-1] == self.cfg.vocab_size else logits[..., : self.cfg.vocab_size]

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy, equal to ``F.cross_entropy`` of ``self(idx)``, but the
        head and loss run chunk-wise (faster, far less memory) when the head is a plain Linear."""
        hidden = self.hidden_states(idx)
        head = self.out_head
        # Under torch.compile, when all the logits fit the chunk budget (one chunk: the same memory),
        # the plain head + cross-entropy, which the compiler fuses, instead of the chunked Function,
        # which it runs eagerly after a graph break (GPT-2 small, 512 tokens, 2-core CPU: 4.6% less
        # time per training step, median of 14 interleaved pairs).
        if type(head) is nn.Linear and head.bias is None:
            fused = (
                torch.compiler.is_compiling() and hidden[..., 0].numel() * head.weight.shape[0] <= LOSS_CHUNK_ELEMENTS
            )
            if not fused:
                return head_cross_entropy(hidden, head.weight, targets, n_classes=self.cfg.vocab_size)
        return F.cross_entropy(self.logits(hidden).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
