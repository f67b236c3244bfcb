"""llmcore's C++ kernels for the CPU (``csrc/*.cpp``), built for this machine on first use.

Two operators, in the ``torch.ops.llmcore`` namespace, and a class:

* ``int8_linear``: int8 weights times fp32 activations (``llmcore.int8_kernel``, used by
  ``llmcore.quantize.Int8Linear``);
* ``decode_attention``: one query per head against the KV cache (``decode_attention`` below),
  used by ``llmcore.model.attention`` inside a compiled decoding step;
* ``torch.classes.llmcore.GptDecoder``: a whole one-token step of an int8 GPT built on both
  (``llmcore.fused_step``). The shared parts live in ``csrc/int8_block.h`` and
  ``csrc/attention_head.h``.

The sources are compiled together, once per machine, with ``torch.utils.cpp_extension`` (a C++
compiler and ninja) for this CPU (``-march=native``; ``LLMCORE_INT8_MARCH`` names another target,
e.g. ``x86-64-v3`` for AVX2 only) and cached in torch's extension directory
(``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) under a name made from the
sources, the target and this CPU's features, so a shared home directory never hands one CPU
another's binary: ~10-15 s the first time, then a load. Where they cannot be built (no compiler,
a build error) or are switched off (``LLMCORE_INT8_KERNEL=0``), ``isa()`` is None, one warning says
why, and each caller computes the same thing with PyTorch operations instead.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
from pathlib import Path

import torch

from llmcore.fallback import warn_fallback

_CSRC = Path(__file__).with_name("csrc")
SOURCES = tuple(_CSRC / name for name in ("int8_linear.cpp", "decode_attention.cpp", "gpt_decode.cpp"))
HEADERS = tuple(_CSRC / name for name in ("int8_block.h", "attention_head.h"))

_loaded_isa: str | None = None
"""``isa()`` once the kernels are loaded (a plain global, so that compiled code can read it)."""


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
    """Build and load the kernels; their instruction set, or None (after one warning) if unavailable."""
    global _loaded_isa
    if os.environ.get("LLMCORE_INT8_KERNEL", "1") == "0":
        return None
    if platform.system() != "Linux":
        return None
    march = os.environ.get("LLMCORE_INT8_MARCH", "native")
    digest = hashlib.sha256(b"\0".join(x.encode() for x in (march, _cpu_features(), torch.__version__)))
    for source in SOURCES + HEADERS:
        digest.update(source.read_bytes())
    name = f"llmcore_kernels_{digest.hexdigest()[:12]}"
    if not _is_built(name):
        print(f"llmcore: building the CPU kernels for this CPU (once, ~10-15 s): {name}", file=sys.stderr)
    try:
        from torch.utils.cpp_extension import load

        load(
            name,
            [str(source) for source in SOURCES],
            extra_cflags=["-O3", f"-march={march}", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        isa = torch.ops.llmcore.int8_linear_isa()
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the PyTorch path
        message = "llmcore: the CPU kernels (llmcore/csrc) could not be built, int8 layers and decoding attention use"
        warn_fallback(message + " PyTorch operations instead (slower)", exc, stacklevel=3)
        return None

    # Shapes for torch.compile and torch.export: each kernel is one opaque call.
    @torch.library.register_fake("llmcore::int8_linear")
    def _(x, packed, scale, bias):
        return x.new_empty((*x.shape[:-1], scale.shape[0]))

    @torch.library.register_fake("llmcore::decode_attention")
    def _(q, k, v, scale):
        return q.new_empty(q.shape)

    _loaded_isa = isa
    return isa


def isa() -> str | None:
    """The kernels' instruction set ("avx512_vnni", "avx2", "scalar"), or None when not built
    (building them on first call)."""
    return _load()


def loaded() -> bool:
    """Whether the kernels are built and loaded already (never builds them: cheap, and readable
    inside compiled code)."""
    return _loaded_isa is not None


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(q @ k.T * scale) @ v`` for one query per head: q (batch, heads, 1, head_dim), k and v
    (batch, heads, keys, head_dim) with contiguous rows (a view of a longer cache is fine), fp32 on
    the CPU; the kernels must be loaded (``loaded()``)."""
    return torch.ops.llmcore.decode_attention(q, k, v, scale)
