"""The int8-weight matrix-vector kernel (``csrc/int8_linear.cpp``), built for this CPU on first use.

``int8_linear(x, packed, scale, bias)`` computes ``x @ (W * scale[:, None]).T + bias`` for int8
weights ``W`` (out, in), given as ``pack(W)``, and fp32 ``x`` (..., in), with each row of ``x``
quantized to 15 bits inside the kernel (see the source). A decoding step (one row, a few) reads
each weight once, as int8, as fast as the memory delivers it; more rows reuse each weight from the
cache, four at a time. On GPT-2 small's weights (2-core AVX-512 CPU) it takes 4.3 ms for 1 row,
15.5 for 16, 187 for 256, 755 for 1,024, where widening the weights to fp32 and a matmul take
157, 291, 727 and 1,985 ms: ``Int8Linear`` runs it for every row count.

The source is compiled once per machine with ``torch.utils.cpp_extension`` (a C++ compiler and
ninja) for this CPU (``-march=native``; ``LLMCORE_INT8_MARCH`` names another target, e.g.
``x86-64-v3`` for AVX2 only) and cached in torch's extension directory (``TORCH_EXTENSIONS_DIR``,
by default ``~/.cache/torch_extensions``) under a name made from the source, the target and this
CPU's features, so a shared home directory never hands one CPU another's binary: ~10-15 s the
first time, then a load. Where it cannot be built (no compiler, a build error) or is switched off
(``LLMCORE_INT8_KERNEL=0``), ``available()`` is False, one warning says why, and
``llmcore.quantize.Int8Linear`` computes the same product with PyTorch operations instead.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from llmcore.fallback import warn_fallback

SOURCE = Path(__file__).with_name("csrc") / "int8_linear.cpp"


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _is_built(name: str) -> bool:
    """Whether torch's extension cache holds the build (a private helper of torch: if it is gone,
    the build just goes unannounced)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return (Path(_get_build_directory(name, False)) / f"{name}.so").exists()
    except Exception:  # noqa: BLE001
        return True


@functools.cache
def _load() -> str | None:
    """Build and load the kernel; its instruction set, or None (after one warning) if unavailable."""
    if os.environ.get("LLMCORE_INT8_KERNEL", "1") == "0":
        return None
    if platform.system() != "Linux":
        return None
    march = os.environ.get("LLMCORE_INT8_MARCH", "native")
    digest = hashlib.sha256(b"\0".join(x.encode() for x in (march, _cpu_features(), torch.__version__)))
    digest.update(SOURCE.read_bytes())
    name = f"llmcore_int8_{digest.hexdigest()[:12]}"
    if not _is_built(name):
        print(f"llmcore: building the int8 kernel for this CPU (once, ~10-15 s): {name}", file=sys.stderr)
    try:
        from torch.utils.cpp_extension import load

        load(
            name,
            [str(SOURCE)],
            extra_cflags=["-O3", f"-march={march}", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        isa = torch.ops.llmcore.int8_linear_isa()
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the PyTorch path
        message = f"llmcore: the int8 kernel ({SOURCE.name}) could not be built, int8 layers use PyTorch operations"
        warn_fallback(message + " instead (slower)", exc, stacklevel=3)
        return None

    @torch.library.register_fake("llmcore::int8_linear")
    def _(x, packed, scale, bias):  # shapes for torch.compile: the kernel is one opaque call
        return x.new_empty((*x.shape[:-1], scale.shape[0]))

    return isa


def available() -> bool:
    """Whether the kernel is built and vectorized for this CPU (AVX-512 VNNI or AVX2)."""
    return _load() not in (None, "scalar")


def isa() -> str | None:
    """The kernel's instruction set ("avx512_vnni", "avx2", "scalar"), or None when not built."""
    return _load()


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
    if _load() is None:
        raise RuntimeError("llmcore's int8 kernel is not built on this machine (see llmcore.int8_kernel)")
    return torch.ops.llmcore.int8_linear(x, packed, scale, bias)
