"""The int8-weight matrix-vector kernel (``csrc/int8_linear.cpp``), built for this CPU on first use.

``int8_linear(x, packed, scale, bias)`` computes ``x @ (W * scale[:, None]).T + bias`` for int8
weights ``W`` (out, in), given as ``pack(W)``, and fp32 ``x`` (..., in), with each row of ``x``
quantized to 15 bits inside the kernel (see the source). A decoding step (one row, a few) reads
each weight once, as int8, as fast as the memory delivers it; more rows reuse each weight from the
cache, four at a time. On GPT-2 small's weights (2-core AVX-512 CPU) it takes 4.3 ms for 1 row,
15.5 for 16, 187 for 256, 755 for 1,024, where widening the weights to fp32 and a matmul take
157, 291, 727 and 1,985 ms: ``Int8Linear`` runs it for every row count.

The source is built with llmcore's other CPU kernels, once per machine, by ``llmcore.cpu_kernels``
(a C++ compiler and ninja; ~10-15 s the first time, then a load). Where they cannot be built or
are switched off (``LLMCORE_INT8_KERNEL=0``), ``available()`` is False, one warning says why, and
``llmcore.quantize.Int8Linear`` computes the same product with PyTorch operations instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmcore import cpu_kernels


def available() -> bool:
    """Whether the kernel is built and vectorized for this CPU (AVX-512 VNNI or AVX2)."""
    return cpu_kernels.isa() not in (None, "scalar")


def isa() -> str | None:
    """The kernel's instruction set ("avx512_vnni", "avx2", "scalar"), or None when not built."""
    return cpu_kernels.isa()


BLOCK_ROWS = 16
"""Output rows per packed block (``kRows`` in the source)."""


def pack(weight: torch.Tensor) -> torch.Tensor:
    """int8 (out, in) -> the kernel's layout (blocks, pairs, 16, 2): ``[b, p, j, t] = W[16b + j, 2p + t]``,
    zero-padded to a multiple of 16 rows and of 4 columns."""
    n, k = weight.shape
    padded = F.pad(weight, (0, -k % 4, 0, -n % BLOCK_ROWS))
    blocks, pairs = padded.shape[0] // BLOCK_ROWS, padded.shape[1] // 2
    return padded.view(blocks, BLOCK_ROWS, pairs, 2).transpose(1, 2).contiguous()


def unpack(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The (out, in) int8 matrix that ``pack`` was given (a copy)."""
    blocks, pairs = packed.shape[:2]
    return packed.transpose(1, 2).reshape(blocks * BLOCK_ROWS, pairs * 2)[:out_features, :in_features]


def int8_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (W * scale[:, None]).T + bias`` by the kernel, ``packed = pack(W)``."""
    if cpu_kernels.isa() is None:
        raise RuntimeError("llmcore's int8 kernel is not built on this machine (see llmcore.cpu_kernels)")
    return torch.ops.llmcore.int8_linear(x, packed, scale, bias)
