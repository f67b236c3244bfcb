"""Keys and values of sequences that join and leave a batch between decoding steps: a server's
continuous batching. ``SlotKVCache`` decodes each sequence exactly as ``llmcore.generate`` decodes
it alone, within the context.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from llmcore.generate import _kv_heads


class SlotKVCache:
    """Keys and values of independent sequences, one per row ("slot"), for continuous batching.

    Unlike ``generate``'s left-padded batch, each row starts at column 0 and has its own length, so a
    sequence can be prefilled into a free row while others are mid-generation, and a finished one
    can leave, between any two decoding steps. A decoding step feeds every active row its last
    token at its own position; keys past a row's length are masked out. Rows ``0..n-1`` are the
    active ones (``move`` keeps them packed). Columns grow on demand up to ``max_len``.
    """

    def __init__(self, model: nn.Module, slots: int, max_len: int | None = None):
        cfg, param = model.cfg, next(model.parameters())
        self.max_len = max_len or cfg.context_length
        shape = (slots, _kv_heads(cfg), min(64, self.max_len), cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=param.dtype, device=param.device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros_like(t) for t in self.k]

    def _ensure(self, width: int) -> None:
        if width > self.max_len:
            raise ValueError(f"sequence of {width} tokens exceeds the cache's {self.max_len}")
        old = self.k[0].shape[2]
        if width <= old:
            return
        new = min(self.max_len, max(width, 2 * old))
        for store in (self.k, self.v):
            for i, t in enumerate(store):
                store[i] = torch.cat([t, t.new_zeros((*t.shape[:2], new - old, t.shape[3]))], dim=2)

    @torch.no_grad()
    def prefill(self, model: nn.Module, row: int, ids: Sequence[int]) -> torch.Tensor:
        """Run a prompt into ``row`` (its previous content is overwritten); its last logits (vocab,)."""
        return self.prefill_rows(model, row, [ids])[0]

    @torch.no_grad()
    def prefill_rows(self, model: nn.Module, first_row: int, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Run prompts into rows ``first_row, first_row + 1, ...`` in one forward; last logits (n, vocab).

        The prompts are right-padded: under the causal mask a prompt's positions never see the
        padding after them, and the cache columns the padding fills lie past the row's length,
        where decoding masks them out and overwrites them. Only the last position of each prompt
        goes through the vocabulary head.
        """
        lengths = [len(p) for p in prompts]
        self._ensure(max(lengths))
        device = self.k[0].device
        tokens = torch.zeros((len(prompts), max(lengths)), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            tokens[i, : lengths[i]] = torch.as_tensor(list(prompt), dtype=torch.long)
        views = [_RowWriter(k, v, first_row) for k, v in zip(self.k, self.v)]
        hidden = model.hidden_states(tokens.to(device), kv_caches=views, start_pos=0)
        last = hidden[torch.arange(len(prompts), device=device), torch.tensor(lengths, device=device) - 1]
        return model.logits(last)

    @torch.no_grad()
    def decode(self, model: nn.Module, last_tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """One step for rows ``0..n-1``: ``last_tokens`` (n,) sit at positions ``lengths`` (n,), the
        tokens each row holds so far (its last token not yet included); logits (n, vocab)."""
        width = int(lengths.max()) + 1
        self._ensure(width)
        device = self.k[0].device
        lengths = lengths.to(device)
        mask = torch.arange(width, device=device)[None, :] <= lengths[:, None]
        views = [_StepWriter(k, v, lengths, width) for k, v in zip(self.k, self.v)]
        # start_pos: each row's query column (a sliding-window layer measures distances from it).
        return model(
            last_tokens.to(device)[:, None],
            kv_caches=views,
            start_pos=lengths,
            position_ids=lengths[:, None],
            attn_mask=mask[:, None, None, :],
        )[:, -1]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy row ``src``'s first ``length`` columns to row ``dst`` (to keep active rows packed)."""
        for store in (self.k, self.v):
            for t in store:
                t[dst, :, :length] = t[src, :, :length]


class _RowWriter:
    """LayerKV for a prefill: the prompts' keys and values go to rows ``row, row + 1, ...`` from column 0."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, row: int):
        self.k, self.v, self.row = k, v, row

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        end, rows = start_pos + k.shape[2], slice(self.row, self.row + k.shape[0])
        self.k[rows, :, start_pos:end] = k
        self.v[rows, :, start_pos:end] = v
        return self.k[rows, :, :end], self.v[rows, :, :end]


class _StepWriter:
    """LayerKV for a decoding step: row i's new key and value go to column ``lengths[i]``."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, width: int):
        self.k, self.v, self.lengths, self.width = k, v, lengths, width

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = k.shape[0]
        rows = torch.arange(n, device=k.device)
        self.k[rows, :, self.lengths] = k[:, :, 0]
        self.v[rows, :, self.lengths] = v[:, :, 0]
        return self.k[:n, :, : self.width], self.v[:n, :, : self.width]
