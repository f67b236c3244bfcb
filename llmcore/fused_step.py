"""GPT's one-token decoding step as one C++ call: ``generate(..., compile="fused")``.

Decoding one sequence with int8 weights reads 125 MB a token (GPT-2 small), ~2 ms at this
machine's bandwidth, in 49 matrix-vector products. The AOTInductor step (``llmcore.aot_step``)
spends 0.7-1 ms more on what lies between them: two threads forked and joined for every kernel,
the small fused kernels, the attention, the call itself. ``csrc/gpt_decode.cpp`` is the whole step
of ``llmcore.model.GPTModel`` written out in C++ (one parallel region a step, four barriers a
block; see its header) over the model's own tensors: the int8 kernel and the decoding attention
of ``llmcore.cpu_kernels``, the same arithmetic.

It covers the case that decoding on a CPU runs most: a ``GPTModel`` (not a subclass) whose every
Linear is an ``Int8Linear`` on llmcore's kernel (``quantize_int8_weight_only``), fp32 on the CPU,
one sequence, with the KV cache. For anything else ``fused_step`` says why not, and ``generate``
runs the AOTInductor step instead (no warning: ``"fused"`` means "fused where it applies"). No
compilation: the kernels are built with the others, once per machine.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from llmcore import cpu_kernels
from llmcore.generate import new_kv_caches, sample_next_token
from llmcore.model import CausalSelfAttention, FeedForward, GPTModel, TransformerBlock
from llmcore.quantize import Int8Linear


def unsupported(model: nn.Module) -> str | None:
    """Why ``model`` has no fused step (one line), or None when it has one."""
    if type(model) is not GPTModel:
        return f"{type(model).__name__} is not llmcore.model.GPTModel"
    if cpu_kernels.isa() is None:
        return "llmcore's CPU kernels are not built"
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or (isinstance(module, Int8Linear) and not module.kernel):
            return f"{name} is not an int8 layer on llmcore's kernel (quantize_int8_weight_only)"
        if isinstance(module, nn.Dropout) and module.training:
            return "the model is in training mode"
        if isinstance(module, (nn.LayerNorm, nn.Embedding)) and module.weight.dtype != torch.float32:
            return f"{name} is not fp32"
    expected = (TransformerBlock, CausalSelfAttention, FeedForward, nn.LayerNorm, Int8Linear, nn.Dropout)
    for name, module in model.trf_blocks.named_modules():
        if name and type(module) not in expected:
            return f"trf_blocks.{name} is a {type(module).__name__}"
    if type(model.out_head) is not Int8Linear or type(model.final_norm) is not nn.LayerNorm:
        return "its head or final norm is not an Int8Linear and a LayerNorm"
    if any(t.device.type != "cpu" for t in model.parameters()):
        return "the model is not on the CPU"
    return None


def _tensors(model: GPTModel) -> list[torch.Tensor]:
    """What ``GptDecoder`` reads, in its order (see csrc/gpt_decode.cpp); an empty tensor for no bias."""

    def linear(layer: Int8Linear) -> list[torch.Tensor]:
        bias = layer.bias if layer.bias is not None else torch.empty(0)
        return [layer.weight_int8, layer.scale, bias]

    tensors = [model.tok_emb.weight, model.pos_emb.weight, model.final_norm.weight, model.final_norm.bias]
    tensors += linear(model.out_head)[:2]
    for block in model.trf_blocks:
        tensors += [block.norm1.weight, block.norm1.bias, *linear(block.att.qkv), *linear(block.att.out_proj)]
        tensors += [block.norm2.weight, block.norm2.bias, *linear(block.ff.fc), *linear(block.ff.proj)]
    return [t.detach() for t in tensors]


class FusedStep:
    """``model``'s one-token step, batch 1, as ``step(tokens, caches, start_pos)`` -> logits (1, vocab)."""

    fused = True  # what generate_stream asks to run its own loop (``stream``)

    def __init__(self, model: GPTModel):
        cfg = model.cfg
        dims = [cfg.n_layers, cfg.n_heads, cfg.vocab_size]
        self.decoder = torch.classes.llmcore.GptDecoder(_tensors(model), dims, cfg.layer_norm_eps)
        self._caches: list | None = None

    def __call__(self, tokens: torch.Tensor, caches: list, start_pos: int) -> torch.Tensor:
        if caches is not self._caches:
            self.decoder.set_caches([c.k for c in caches], [c.v for c in caches])
            self._caches = caches
        return self.decoder.step(int(tokens[0, -1]), start_pos)


def fused_step(model: nn.Module) -> FusedStep | None:
    """``model``'s fused step, over its current tensors, or None if it has none (``unsupported``)."""
    return None if unsupported(model) is not None else FusedStep(model)


GREEDY_CHUNK = 16
"""Greedy tokens computed per call into C++ (they are yielded one by one, 16 at a time)."""


def stream(
    step: FusedStep, model: GPTModel, prompt: torch.Tensor, max_new_tokens: int, *, eos_id=None, **sampling
) -> Iterator[torch.Tensor]:
    """``generate_stream``'s loop for one sequence that fits the context (``prompt`` (1, n), ``n +
    max_new_tokens - 1 <= context_length``): the prompt eagerly, then one C++ call a token, or, greedy
    (``temperature`` 0), one call for ``GREEDY_CHUNK`` tokens, the logits never leaving C++. Yields
    (1,) tensors, as ``generate_stream``."""
    n = prompt.shape[1]
    caches = new_kv_caches(model, 1, n + max_new_tokens)
    step.decoder.set_caches([c.k for c in caches], [c.v for c in caches])
    next_id = int(sample_next_token(model(prompt, kv_caches=caches, start_pos=0)[:, -1], **sampling)[0])
    yield torch.tensor([next_id])
    pos, end, eos = n, n + max_new_tokens - 1, -1 if eos_id is None else eos_id
    while pos < end and next_id != eos:
        if sampling.get("temperature", 0.0) == 0.0:
            ids = step.decoder.generate_greedy(next_id, pos, min(GREEDY_CHUNK, end - pos), eos)
        else:
            ids = [int(sample_next_token(step.decoder.step(next_id, pos), **sampling)[0])]
        for next_id in ids:
            yield torch.tensor([next_id])
        pos += len(ids)
