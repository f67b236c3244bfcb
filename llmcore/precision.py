"""Training precision: fp32, or autocast mixed precision over fp32 master weights.

``bf16-mixed`` and ``fp16-mixed`` run the forward pass and the loss under ``torch.autocast``
(matmuls in 16 bits; norms, softmax and the loss in fp32) while the weights, their gradients and
the optimizer state stay fp32: checkpoints and resumable states hold the same fp32 tensors under
every policy. fp16's narrow range needs dynamic loss scaling (a GradScaler); bf16 does not.
``auto`` is bf16-mixed on a CUDA GPU that supports bf16 and fp32 elsewhere: CPU autocast is
slower than fp32 on most CPUs. On CUDA, fp32 matmuls run on TF32 tensor cores in every policy.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

PRECISIONS = ("auto", "fp32", "bf16-mixed", "fp16-mixed")
_AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


def resolve_precision(name: str, device: torch.device) -> str:
    """The policy ``name`` stands for on ``device`` (``auto`` becomes a concrete one)."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
    if name != "auto":
        return name
    return "bf16-mixed" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype matmuls run in under ``precision`` (a resolved policy)."""
    return _AUTOCAST_DTYPES.get(precision, torch.float32)


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """The context forward passes and losses run in: autocast for the mixed policies."""
    if precision not in _AUTOCAST_DTYPES:
        return nullcontext()
    return torch.autocast(device.type, dtype=_AUTOCAST_DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Dynamic loss scaling for fp16-mixed; a disabled scaler (a no-op) for the others."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16-mixed")


def enable_tf32(device: torch.device) -> None:
    """Let fp32 matmuls use TF32 tensor cores on CUDA (a global setting; no effect elsewhere)."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
