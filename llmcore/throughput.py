"""Training throughput: model FLOPs per token, the device's peak FLOP/s, MFU, peak memory.

MFU (model FLOPs utilisation, PaLM appendix B) is the FLOP/s the model needs at the measured
tokens/s divided by the device's peak for the dtype its matmuls run in. A trained token costs 6
FLOPs per matmul weight (2 forward, 4 backward) plus ``12 * n_layers * emb_dim * seq_len`` for the
attention scores and their weighted values: the convention of PaLM, nanoGPT and llm.c, which
leaves out embedding lookups, norms and activations and counts frozen layers as trained.

GPU peaks come from the vendors' datasheets; any other device (a CPU, an unknown GPU) is measured
once per process: the best rate of a large square matmul in the dtype in use.
"""

from __future__ import annotations

import functools
import re
import time

import torch
from torch import nn

from llmcore.precision import compute_dtype, resolve_precision

# Dense tensor-core peaks (FLOP/s, no sparsity) by a pattern of torch.cuda.get_device_name(), first
# match wins. "fp32" is the TF32 rate: training turns TF32 on for CUDA (llmcore.precision).
GPU_PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"H100.*PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12}),
    (r"H100|H200|H800|GH200", {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}),
    (r"A100|A800", {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}),
    (r"L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 183e12}),
    (r"\bL4\b", {"bf16": 121e12, "fp16": 121e12, "fp32": 60e12}),
    (r"\bA10\b", {"bf16": 125e12, "fp16": 125e12, "fp32": 62.5e12}),
    (r"RTX 4090", {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12}),
    (r"RTX 3090", {"bf16": 71e12, "fp16": 71e12, "fp32": 35.6e12}),
    (r"V100", {"fp16": 125e12, "fp32": 15.7e12}),  # no bf16 tensor cores
    (r"\bT4\b", {"fp16": 65e12, "fp32": 8.1e12}),
)
_KINDS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def matmul_weights(model: nn.Module) -> int:
    """Weights that take part in a matmul: every nn.Linear's (a tied head counted as a matmul)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def training_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Forward + backward FLOPs of one token in a sequence of ``seq_len`` (see the module doc)."""
    return _flops_per_token(matmul_weights(model), getattr(model, "cfg", None), seq_len)


def _flops_per_token(weights: int, cfg, seq_len: int) -> float:
    attention = 0.0 if cfg is None else 12.0 * cfg.n_layers * cfg.emb_dim * seq_len
    return 6.0 * weights + attention


def matmul_seconds(n: int, dtype: torch.dtype, device: torch.device) -> float:
    """Seconds one (n x n) @ (n x n) matmul takes, the device synchronised around it."""
    a = torch.full((n, n), 0.01, dtype=dtype, device=device)  # no RNG draw: resume stays exact
    _synchronize(device)
    started = time.perf_counter()
    a @ a
    _synchronize(device)
    return time.perf_counter() - started


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(device_type: str, dtype: torch.dtype) -> float:
    """The best FLOP/s of a square matmul on this device, growing it until one takes >= 50 ms."""
    device, n = torch.device(device_type), 256
    while True:
        seconds = min(matmul_seconds(n, dtype, device) for _ in range(5))  # the first call warms up
        if seconds >= 0.05 or n >= 8192:
            return 2 * n**3 / seconds
        n *= 2


def peak_flops(device: torch.device, precision: str) -> float:
    """FLOP/s the device can do in the matmul dtype of ``precision``: datasheet or measured."""
    dtype = compute_dtype(precision)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for pattern, peaks in GPU_PEAK_FLOPS:
            if re.search(pattern, name) and _KINDS[dtype] in peaks:
                return peaks[_KINDS[dtype]]
    return measured_matmul_flops(device.type, dtype)


def peak_memory_mb(device: torch.device) -> float | None:
    """The most memory tensors have held on a CUDA device since the process started (None elsewhere)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def run_summary(
    model: nn.Module, tokens_per_s: float, seq_len: int, device: torch.device, precision: str, n_devices: int = 1
) -> dict[str, float]:
    """MFU of a whole run at ``tokens_per_s`` (over all devices), and peak memory where known."""
    precision = resolve_precision(precision, device)
    flops_per_s = tokens_per_s * training_flops_per_token(model, seq_len)
    summary = {"mfu": flops_per_s / (peak_flops(device, precision) * n_devices)}
    memory = peak_memory_mb(device)
    if memory is not None:
        summary["peak_memory_mb"] = memory
    return summary


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Throughput:
    """Tokens/s, MFU and peak memory of training steps of ``model`` on ``device``."""

    def __init__(self, model: nn.Module, device: torch.device, precision: str, n_devices: int = 1):
        self.device, self.precision, self.n_devices = device, precision, n_devices
        self.weights, self.cfg = matmul_weights(model), getattr(model, "cfg", None)

    def flops(self, inputs: torch.Tensor) -> float:
        """Training FLOPs of a (batch, seq_len) batch of token ids."""
        return inputs.numel() * _flops_per_token(self.weights, self.cfg, inputs.shape[-1])

    def figures(self, tokens: int, flops: float, seconds: float) -> dict[str, float]:
        """What a step that trained ``tokens`` (``flops``, over all devices) in ``seconds`` achieved."""
        if seconds <= 0:
            return {"tokens_per_s": float("nan"), "mfu": float("nan"), "step_time_s": seconds}
        peak = peak_flops(self.device, self.precision) * self.n_devices
        figures = {"tokens_per_s": tokens / seconds, "mfu": flops / seconds / peak, "step_time_s": seconds}
        memory = peak_memory_mb(self.device)
        if memory is not None:
            figures["peak_memory_mb"] = memory
        return figures
