"""Int8 weights for fast CPU inference: every ``nn.Linear``, the vocabulary head included.

Decoding one sequence reads every weight once per new token, so on a CPU it is bound by memory
bandwidth, not arithmetic: fp32 GPT-2 small moves ~500 MB per token. ``quantize_int8`` stores each
Linear's weight as int8 with one fp32 scale per output channel (a quarter of the bytes) and runs it
with PyTorch's dynamic-quantization kernels (fbgemm on x86), which also quantize each call's input
to 8 bits on the fly (one scale per call) and accumulate in int32. A head tied to the token
embedding gets its own int8 copy; the embedding itself stays fp32 (a lookup reads one row).

Inference only: the result cannot be trained, and ``save_checkpoint`` should be given the fp32
model (quantizing takes about a second, so keep fp32 checkpoints and quantize after loading).
``torch.ops.aten._weight_int8pack_mm`` (weight-only int8) was measured as well: 10-20x slower
than fbgemm for these shapes on AVX2 and AVX-512 CPUs, so eager int8 uses dynamic quantization.

``quantize_int8_weight_only`` is the format for compiled decoding (``generate(..., compile=True)``):
the same int8 weights and per-channel scales as plain tensors (``Int8Linear``), activations stay
fp32. Under torch.compile a one-token step's matrix-vector products become reductions that
convert each int8 weight as they read it, fused with their neighbours in one generated kernel per
layer; the weights are read once, as int8, at the memory's speed. Without compile it dequantizes
each weight per call (slow at a few tokens): use ``quantize_int8`` for eager decoding.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn


class QuantizationUnavailableError(RuntimeError):
    """This PyTorch build has no dynamic int8 quantization (``torch.ao.quantization``)."""


def _check_quantizable(model: nn.Module) -> None:
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("int8 quantization runs on CPU only: move the model with model.cpu() first")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("int8 quantization expects an fp32 model")


def quantize_int8(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Return ``model`` with every ``nn.Linear`` replaced by an int8 one, in eval mode.

    By default ``model`` is left untouched and a quantized deep copy is returned; with
    ``inplace=True`` its Linear layers are swapped in place (no second copy in memory).
    Only CPU inference is supported (``model(idx)``, ``hidden_states``, ``generate``).
    """
    _check_quantizable(model)
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


class Int8Linear(nn.Module):
    """A Linear with int8 weights, one fp32 scale per output channel (symmetric), fp32 activations.

    ``y = (x @ weight.T) * scale + bias``: the int8 values times their row's scale approximate the
    fp32 weight to half a step (``max |w| / 254``). See the module doc for when it is fast.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
        self.register_buffer("weight", torch.round(w / scale[:, None]).to(torch.int8).contiguous())
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype)
        if torch.compiler.is_compiling() and x[..., 0].numel() == 1:
            # One row (a batch-1 decoding step): a reduction that inductor compiles into one pass
            # over the int8 weight. More rows (a prompt, a batch) take a dequantized matmul, which
            # is compute-bound there anyway (a reduction over symbolic rows compiles ~20x slower).
            y = (x.unsqueeze(-2) * w).sum(-1)
        else:
            y = F.linear(x, w)
        y = y * self.scale
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8_weight_only(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Return ``model`` with every ``nn.Linear`` replaced by an ``Int8Linear``, in eval mode.

    A head tied to the token embedding gets its own int8 copy; the embedding stays fp32. As for
    ``quantize_int8``, ``model`` is left untouched unless ``inplace=True``.
    """
    _check_quantizable(model)
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    for parent in list(target.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                setattr(parent, name, Int8Linear(child))
    return target
