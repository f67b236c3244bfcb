"""The memory-bandwidth limit of decoding: bytes of weights read per token, and the machine's bandwidth.

Decoding one sequence reads every weight once per new token, so tokens/s can be at most
``bandwidth / weight bytes``. ``read_bandwidth`` measures the bandwidth in this run (a sum over
a buffer far larger than the caches, the way a matrix-vector product streams its weights);
``weight_bytes_per_token`` counts what a decoding step reads: every Linear's weight and bias (a
head tied to the token embedding counts, since the head reads all of it), the norms, but not
the embedding tables, of which a step reads one row. The KV cache (a few MB at these lengths)
is left out, so the limit is slightly optimistic.
"""

from __future__ import annotations

import time

import torch
from torch import nn


def read_bandwidth(device: str = "cpu", mbytes: int = 512, trials: int = 7) -> float:
    """Bytes/s of reading a ``mbytes`` MB fp32 buffer (``sum``), the best of ``trials`` (after a warm-up)."""
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


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The tensors a module itself holds: parameters, or a dynamically quantized Linear's packed weight."""
    tensors = list(module.parameters(recurse=False))
    weight = getattr(module, "weight", None)
    if callable(weight) and not tensors:  # torch.ao dynamic quantized Linear: weight() unpacks
        w = weight()
        tensors = [w.int_repr(), w.q_per_channel_scales().float() if w.qscheme() != torch.per_tensor_affine else w]
        bias = module.bias()
        tensors += [bias] if bias is not None else []
    return tensors + [t for t in module.buffers(recurse=False) if t.dim() > 0 and t.dtype != torch.bool]


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one decoding step reads (see the module doc); tied tensors count once."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            continue
        for tensor in _own_tensors(module):
            key = (tensor.data_ptr(), tensor.numel())
            if key not in seen:
                seen.add(key)
                total += tensor.numel() * tensor.element_size()
    return total
