"""Int8 weights for fast CPU inference: every ``nn.Linear``, the vocabulary head included.

Decoding one sequence reads every weight once per new token, so on a CPU it is bound by memory
bandwidth, not arithmetic: fp32 GPT-2 small moves ~500 MB per token. ``quantize_int8`` stores each
Linear's weight as int8 with one fp32 scale per output channel (a quarter of the bytes) and runs it
with PyTorch's dynamic-quantization kernels (fbgemm on x86), which also quantize each call's input
to 8 bits on the fly (one scale per call) and accumulate in int32. A head tied to the token
embedding gets its own int8 copy; the embedding itself stays fp32 (a lookup reads one row).

Inference only: the result cannot be trained, and ``save_checkpoint`` should be given the fp32
model (quantizing takes about a second, so keep fp32 checkpoints and quantize after loading).
``torch.ops.aten._weight_int8pack_mm`` (weight-only int8) was measured as well: on this AVX2 CPU
it is several times slower than fp32 for these shapes, so dynamic quantization is used.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn


class QuantizationUnavailableError(RuntimeError):
    """This PyTorch build has no dynamic int8 quantization (``torch.ao.quantization``)."""


def quantize_int8(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Return ``model`` with every ``nn.Linear`` replaced by an int8 one, in eval mode.

    By default ``model`` is left untouched and a quantized deep copy is returned; with
    ``inplace=True`` its Linear layers are swapped in place (no second copy in memory).
    Only CPU inference is supported (``model(idx)``, ``hidden_states``, ``generate``).
    """
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("quantize_int8 runs on CPU only: move the model with model.cpu() first")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("quantize_int8 expects an fp32 model")
    try:
        with warnings.catch_warnings():
            # torch.ao.quantization announces its move to torchao; its kernels are what runs here.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            target = model if inplace else copy.deepcopy(model)
            target.eval()
            quantize_dynamic(target, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    except (ImportError, AttributeError, RuntimeError) as exc:
        raise QuantizationUnavailableError(
            f"int8 dynamic quantization is unavailable in torch {torch.__version__}: {exc}"
        ) from exc
    return target
