"""The one-token decoding step compiled ahead of time with AOTInductor: ``generate(..., compile="aot")``.

Decoding one sequence on a CPU is a memory-bound step of small work: a few dozen matrix-vector
products, each ~20-1,000 µs. Under ``torch.compile`` every step also pays Python: Dynamo's guard
check, the AOT dispatcher's wrappers, and inductor's Python wrapper that calls each kernel
(GPT-2 small: ~0.8 ms of a ~4.6 ms int8 step; a 12-layer model with tiny matrices: 0.79 ms a step
where this module's step takes 0.33). Here the step is exported once (``torch.export``, with the
batch, the cache length and the position as symbols) and compiled by AOTInductor into a shared
library whose C++ wrapper calls the kernels in turn; each step is one call into it.

The library gets no copy of the weights: they are handed to it as user-managed constants (the
model's own tensors), again before every generation, so later in-place changes to the weights are
seen. The step covers what ``generate`` runs most: one new token per row of an unpadded batch
with the KV cache. The prompt, a padded batch and a refill after cropping run eagerly.

For one sequence of an int8 GPT, ``compile="fused"`` runs llmcore's hand-written C++ step instead
(``llmcore.fused_step``: no compilation, and faster); this step serves everything else.

Compiling takes ~20-30 s on a 2-core CPU (a C++ compiler is needed, as for ``torch.compile``),
once per model object and process. Where export or compilation fails, or int8 layers run without
llmcore's kernel, one warning says why and ``generate`` runs that model's steps with
``torch.compile`` instead.
"""

from __future__ import annotations

import tempfile
import warnings
import weakref
from pathlib import Path

import torch
from torch import nn

from llmcore.fallback import warn_fallback
from llmcore.generate import KVCache


class _TensorCache(KVCache):
    """A layer's cache over given tensors (the exported step's inputs)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v


class _OneTokenStep(nn.Module):
    """Logits of one new token per row at column ``position.shape[0] - 1`` (a symbol in the export;
    the length is at least 2 since a step follows a prompt of at least one token)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens, position, keys: list[torch.Tensor], values: list[torch.Tensor]):
        caches = [_TensorCache(k, v) for k, v in zip(keys, values)]
        return self.model(tokens, kv_caches=caches, start_pos=position.shape[0] - 1)[:, -1, :]


class AOTStep:
    """``model``'s one-token step as an AOTInductor library; call it as ``step(tokens, caches, start_pos)``."""

    def __init__(self, model: nn.Module):
        if any(getattr(m, "kernel", None) is False for m in model.modules()):  # llmcore.quantize.Int8Linear
            # Exported, their PyTorch fallback is a dequantized matmul (GPT-2 small: ~13 tok/s
            # against ~150 for torch.compile's fused reduction).
            raise RuntimeError("its int8 layers run without llmcore's int8 kernel (see llmcore.int8_kernel)")
        self.runner = _compile(_OneTokenStep(model))
        named = _named_tensors(model)
        self.signature = _signature(named)
        self._positions = torch.empty(0)
        self.refresh(named)

    def refresh(self, named: dict[str, torch.Tensor]) -> None:
        """Point the library at the model's current tensors, ``_named_tensors(model)`` (no copy;
        they stay referenced here)."""
        wanted = self.runner.get_constant_fqns()
        missing = [name for name in wanted if name not in named]
        if missing:
            raise RuntimeError(f"the compiled step needs tensors the model does not hold: {missing[:3]}")
        self.constants = {name: named[name] for name in wanted}
        self.runner.load_constants(self.constants, check_full_update=True, user_managed=True)

    def __call__(self, tokens: torch.Tensor, caches: list[KVCache], start_pos: int) -> torch.Tensor:
        """Logits (batch, vocab) of ``tokens`` (batch, 1) at column ``start_pos``; the caches get its k/v."""
        if self._positions.shape[0] <= start_pos:
            self._positions = torch.empty(max(start_pos + 1, 2 * self._positions.shape[0]), device=tokens.device)
        # The library assumes the strides it was compiled with: contiguous inputs.
        inputs = [tokens.contiguous(), self._positions[: start_pos + 1], *(c.k for c in caches), *(c.v for c in caches)]
        return self.runner.loader.boxed_run(inputs)[0]


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers under the names the exported step gives them."""
    named = dict(model.named_parameters(prefix="model", remove_duplicate=False))
    named.update(model.named_buffers(prefix="model", remove_duplicate=False))
    return named


def _signature(named: dict[str, torch.Tensor]) -> list[tuple]:
    """What the library was compiled for: each tensor's name, shape, dtype and device, and which
    names share a tensor (a tied head is one constant of the library: untied, it needs two)."""
    first_name: dict[int, str] = {}
    return [(name, tuple(t.shape), t.dtype, t.device, first_name.setdefault(id(t), name)) for name, t in named.items()]


def _example_inputs(model: nn.Module):
    """Batch 2, column 3, a cache of 8 columns: sizes that are not 0 or 1, so none is specialized."""
    cfg, param = model.cfg, next(model.parameters())
    kv_heads = getattr(cfg, "n_kv_heads", cfg.n_heads)
    shape = (2, kv_heads, 8, cfg.head_dim)
    caches = [torch.zeros(shape, dtype=param.dtype, device=param.device) for _ in range(2 * cfg.n_layers)]
    tokens = torch.zeros((2, 1), dtype=torch.long, device=param.device)
    return tokens, torch.empty(4, device=param.device), caches[: cfg.n_layers], caches[cfg.n_layers :]


def _compile(wrapper: _OneTokenStep):
    """Export the step (batch, cache columns and position dynamic) and compile it with AOTInductor."""
    tokens, positions, keys, values = _example_inputs(wrapper.model)
    batch, columns = torch.export.Dim("batch"), torch.export.Dim("columns", min=2)
    cache = {0: batch, 2: columns}
    position = torch.export.Dim("position", min=2, max=wrapper.model.cfg.context_length)
    dynamic = ({0: batch}, {0: position}, [cache] * len(keys), [cache] * len(values))
    with torch.no_grad(), warnings.catch_warnings():
        # torch's own pytree code warns about its own deprecated class while exporting.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        program = torch.export.export(wrapper, (tokens, positions, keys, values), dynamic_shapes=dynamic)
        options = {"aot_inductor.package_constants_in_so": False, "realize_opcount_threshold": 1}
        with tempfile.TemporaryDirectory(prefix="llmcore-aot-") as tmp:
            path = torch._inductor.aoti_compile_and_package(
                program, package_path=str(Path(tmp) / "step.pt2"), inductor_configs=options
            )
            return torch._inductor.aoti_load_package(path)


_STEPS: weakref.WeakKeyDictionary[nn.Module, AOTStep | None] = weakref.WeakKeyDictionary()


def aot_step(model: nn.Module) -> AOTStep | None:
    """``model``'s compiled step (compiled on first use, and again if its tensors changed shape, dtype
    or device; pointed at its current weights on every call), or None after one warning when it
    cannot be compiled."""
    if model in _STEPS:
        step = _STEPS[model]
        if step is None:
            return None
        named = _named_tensors(model)
        if step.signature == _signature(named):  # else: the model changed shape, dtype or device
            step.refresh(named)
            return step
    try:
        step = AOTStep(model)
    except Exception as exc:  # noqa: BLE001 - any export/compile failure: torch.compile serves instead
        name = type(model).__name__
        warn_fallback(
            f"llmcore: no ahead-of-time decoding step for {name}, torch.compile runs its steps instead",
            exc,
            stacklevel=3,
        )
        step = None
    _STEPS[model] = step
    return step
