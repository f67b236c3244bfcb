"""Int8 weights for fast CPU inference: every ``nn.Linear``, the vocabulary head included.

Decoding one sequence reads every weight once per new token, so on a CPU it is bound by memory
bandwidth, not arithmetic: fp32 GPT-2 small moves ~500 MB per token. ``quantize_int8`` stores each
Linear's weight as int8 with one fp32 scale per output channel (a quarter of the bytes) and runs it
with PyTorch's dynamic-quantization kernels (fbgemm on x86), which also quantize each call's input
to 8 bits on the fly (one scale per call) and accumulate in int32. A head tied to the token
embedding gets its own int8 copy; the embedding itself stays fp32 (a lookup reads one row).

Inference only: the result cannot be trained, and ``save_checkpoint`` should be given the fp32
model (quantizing takes about a second, so keep fp32 checkpoints and quantize after loading).

``quantize_int8_weight_only`` keeps the same int8 weights and per-channel scales as plain tensors
(``Int8Linear``) and runs them with llmcore's own kernel (``llmcore.int8_kernel``, compiled for
this CPU on first use): activations stay fp32 at the interface and are quantized to 15 bits, not
8, inside it (perplexity within 0.02% of fp32). One sequence decodes faster this way, eager
(GPT-2 small, batch 1, 2-core AVX-512 CPU: 137-190 new tokens/s against fbgemm's 101-123) and
compiled (``generate(..., compile=True)``: ~170-190; ``compile="aot"``: ~205-227; ``compile="fused"``,
the whole step in C++, ``llmcore.fused_step``: ~270-300, ~420-480 in the VM's fast state); fbgemm stays
ahead on batches (8 rows: 601 against 430), which is why the server keeps ``quantize_int8``.
Where the kernel cannot be built, ``Int8Linear`` keeps the weight as (out, in) and falls back to
PyTorch operations: a reduction that inductor fuses under compile, and an fp32 matmul over
dequantized weights eagerly (slow: use ``quantize_int8`` there; ``preferred_int8()`` picks).
``torch.ops.aten._weight_int8pack_mm`` was measured as well: 10-20x slower than fbgemm for these
shapes on AVX2 and AVX-512 CPUs.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from llmcore import hugepages, int8_kernel


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

    ``y = (x @ W.T) * scale + bias``: the int8 values times their row's scale approximate the fp32
    weight to half a step (``max |w| / 254``). ``W`` (``weight_int8``) is stored in the kernel's
    packed layout where the kernel is built (see ``llmcore.int8_kernel``; ``quantize_int8_weight_only``
    puts all of a model's in one huge-page region), else as (out, in); ``int8_weight()`` gives it
    as (out, in).
    fp32 inputs run the kernel when it is built; otherwise a dequantized matmul (under
    torch.compile, one row: a reduction inductor fuses into one pass over the int8 weight).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
        q = torch.round(w / scale[:, None]).to(torch.int8)
        self.kernel = int8_kernel.available()  # built on first use; see llmcore.int8_kernel
        # The kernel's packed layout where it runs; else (out, in), the order the fallback reads.
        self.register_buffer("weight_int8", int8_kernel.pack(q) if self.kernel else q)
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def int8_weight(self) -> torch.Tensor:
        """The int8 weight matrix (out, in)."""
        if not self.kernel:
            return self.weight_int8
        return int8_kernel.unpack(self.weight_int8, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel and x.dtype == torch.float32:
            return torch.ops.llmcore.int8_linear(x, self.weight_int8, self.scale, self.bias)
        w = self.int8_weight().to(x.dtype)
        if torch.compiler.is_compiling() and x[..., 0].numel() == 1:
            # One row (a batch-1 decoding step) without the kernel: a reduction that inductor
            # compiles into one pass over the int8 weight. More rows take a dequantized matmul.
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
    # The kernel's weights as one huge-page region in module order (a decoding step's order of
    # reads): no TLB miss or prefetcher restart every 4 KB (see llmcore.hugepages).
    layers = [m for m in target.modules() if isinstance(m, Int8Linear) and m.kernel]
    for layer, weight in zip(layers, hugepages.gather([layer.weight_int8 for layer in layers])):
        layer.weight_int8 = weight
    return target


def preferred_int8(*, compile: bool = False):
    """The int8 format that decodes one sequence fastest here: weight-only (llmcore's kernel) where
    the kernel is built or the step is compiled, else fbgemm's dynamic quantization."""
    return quantize_int8_weight_only if compile or int8_kernel.available() else quantize_int8
