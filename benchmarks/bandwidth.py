"""The memory-bandwidth limit of decoding: bytes of weights read per token, and the machine's bandwidth.

Decoding one sequence reads every weight once per new token, so tokens/s can be at most
``bandwidth / weight bytes``. ``read_bandwidth`` measures the bandwidth in this run (a sum over
a buffer far larger than the caches, the way a matrix-vector product streams its weights). On
the CPU the buffer sits on huge pages (``llmcore.hugepages``), as ``quantize_int8_weight_only``
puts its weights: read that way the README's VM gives 6% (at ~35 GB/s) to 28% (at ~65 GB/s)
more than from 4 KB pages, so the limit is the higher figure. ``weight_bytes_per_token`` counts
what a decoding step reads: every Linear's weight and bias (a head tied to the token embedding
counts, since the head reads all of it), the norms, but not the embedding tables, of which a
step reads one row. The KV cache (a few MB at these lengths) is left out, so the limit is
slightly optimistic.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from llmcore import hugepages


def read_bandwidth(device: str = "cpu", mbytes: int = 512, trials: int = 7) -> float:
    """Bytes/s of reading a ``mbytes`` MB fp32 buffer (``sum``), the best of ``trials`` (after a warm-up)."""
    if device == "cpu":  # on huge pages where the OS gives them, as llmcore's int8 weights are
        buffer = hugepages.huge_page_buffer(mbytes * 2**20).view(torch.float32).fill_(1.0)
    else:
        buffer = torch.ones(mbytes * 2**20 // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for i in range(trials + 1):
        if device != "cpu":
            torch.cuda.synchronize()
        started = time.perf_counter()
        buffer.sum().item()
        if i:
            best = min(best, time.perf_counter() - started)
    return buffer.numel() * 4 / best


def _own_tensors(module: nn.Module) -> tuple[list[torch.Tensor], int]:
    """The tensors a module holds (parameters, buffers), and the bytes of a dynamically quantized
    Linear's packed weight (int8 values, per-channel scales, bias), which are not tensors of it."""
    tensors = list(module.parameters(recurse=False))
    tensors += [t for t in module.buffers(recurse=False) if t.dim() > 0 and t.dtype != torch.bool]
    packed = 0
    weight = getattr(module, "weight", None)
    if callable(weight) and not tensors:  # torch.ao dynamic quantized Linear: weight() unpacks a copy
        w, bias = weight(), module.bias()
        per_channel = w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
        packed = w.numel() + (8 * w.shape[0] if per_channel else 8) + (0 if bias is None else bias.numel() * 4)
    return tensors, packed


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decoding step reads (see the module doc); tied tensors count once."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            continue
        tensors, packed = _own_tensors(module)
        total += packed
        for tensor in tensors:
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total
