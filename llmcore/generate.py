"""Text generation: a pre-allocated KV cache, greedy / temperature / top-k / top-p sampling.

``generate_stream`` is the one decoding loop; ``generate`` and ``generate_text`` collect it.
Prompts of different lengths are left-padded and masked, with per-row positions, so a batch
gives each prompt the same tokens it would get alone. When the sequence outgrows the context,
the window is cropped to the last ``context_length`` tokens (as the book's ``generate``); the
cache is then refilled, so cached and uncached decoding stay token-for-token identical.
(``llmcore.slot_cache.SlotKVCache`` holds sequences that join and leave a batch between steps: a
server's continuous batching.)

With ``compile=True`` every step runs under torch.compile with dynamic shapes: the cache length,
the prompt length and the batch are symbols, so a few graphs (the prompt, the one-token step,
the step that fills the cache's last column, a refill after cropping) serve every generation,
and a step attends over the filled cache only. With int8 weights
(``llmcore.quantize.quantize_int8_weight_only``) each matrix product is one call of llmcore's int8
kernel (``llmcore.int8_kernel``) inside the compiled graph, which reads each weight once, as int8.

With ``compile="aot"`` the one-token step of an unpadded batch, what decoding runs most, is compiled
ahead of time by AOTInductor (``llmcore.aot_step``) and runs as one call into a C++ library, without
Dynamo's guards and inductor's Python wrapper (GPT-2 small, int8 weight-only, 2-core CPU: ~3.7 ms a
step where the torch.compile step takes ~4.6); the prompt, padded batches and refills run eagerly.
``compile="fused"`` runs that step, for one sequence of a GPT with int8 weight-only layers, as one
call of llmcore's C++ decoder instead (``llmcore.fused_step``), and as ``"aot"`` otherwise.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from llmcore import cpu_kernels, hugepages
from llmcore.fallback import warn_fallback
from llmcore.tokenizer import encode


class KVCache:
    """One layer's keys and values, allocated once for the whole generation: zeros, or the two
    halves of ``memory`` (zeroed, ``2 * batch * n_heads * max_len * head_dim`` elements)."""

    def __init__(self, batch: int, n_heads: int, max_len: int, head_dim: int, *, dtype, device, memory=None):
        shape = (batch, n_heads, max_len, head_dim)
        if memory is None:
            memory = torch.zeros((2, *shape), dtype=dtype, device=device)
        self.k, self.v = memory.view(2, *shape).unbind(0)

    def update(self, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v from column ``start_pos`` on; return the filled prefix, which attention reads."""
        end = start_pos + k.shape[2]
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def _kv_heads(cfg) -> int:
    """Key/value heads per layer: fewer than the query heads under grouped-query attention."""
    return getattr(cfg, "n_kv_heads", cfg.n_heads)


def new_kv_caches(model: nn.Module, batch: int, max_len: int) -> list[KVCache]:
    """Every layer's cache; on the CPU all in one huge-page region, which attention reads faster
    than 4 KB pages (see llmcore.hugepages)."""
    cfg = model.cfg
    param = next(model.parameters())
    shape = (batch, _kv_heads(cfg), max_len, cfg.head_dim)
    per_layer = 2 * math.prod(shape)
    if param.device.type == "cpu":
        region = hugepages.huge_page_buffer(cfg.n_layers * per_layer * param.element_size()).view(param.dtype)
        memory = region.zero_().split(per_layer)
    else:
        memory = [None] * cfg.n_layers
    return [KVCache(*shape, dtype=param.dtype, device=param.device, memory=m) for m in memory]


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token id per row of ``logits`` (batch, vocab); temperature 0 means greedy."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    if temperature == 0.0:
        if logits.device.type == "cpu" and logits.dtype == torch.float32:
            # numpy's argmax is vectorized: ~5 µs over 50,257 logits where torch's takes ~45, a
            # percent of an int8 decoding step. Both pick the first of equal maxima.
            return torch.from_numpy(logits.detach().numpy().argmax(axis=-1))
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p (the first always stays).
        drop_sorted = (probs.cumsum(dim=-1) - probs) > top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _left_pad(prompts: torch.Tensor | Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token matrix (batch, longest prompt) and its validity mask, prompts aligned to the right.

    Padding positions hold id 0; they are masked out of attention, so the id never matters.
    """
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.shape[1] == 0:
            raise ValueError(f"prompt tensor must be (batch, tokens) with tokens > 0, got {tuple(prompts.shape)}")
        return prompts.to(device), torch.ones_like(prompts, dtype=torch.bool, device=device)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    tokens = torch.zeros((len(prompts), width), dtype=torch.long)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        valid[row, width - len(prompt) :] = True
    return tokens.to(device), valid.to(device)


def _padding_mask(key_valid: torch.Tensor, n_queries: int) -> torch.Tensor:
    """(batch, 1, queries, keys) mask: causal, no padded keys; each query always sees itself."""
    n_keys = key_valid.shape[1]
    q_cols = torch.arange(n_keys - n_queries, n_keys, device=key_valid.device)[:, None]
    k_cols = torch.arange(n_keys, device=key_valid.device)[None, :]
    causal = k_cols <= q_cols
    mask = (causal[None] & key_valid[:, None, :]) | (k_cols == q_cols)[None]
    return mask[:, None]


def _step_logits(model: nn.Module, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
    return model(tokens, **kwargs)[:, -1, :]


@functools.cache
def _compiled_step():
    """``_step_logits`` compiled on first use, with dynamic shapes (see the module doc). Where it
    cannot be compiled (no C++ compiler), one warning, then every step runs eagerly. Dynamo keeps
    8 graphs per function (``recompile_limit``) and a model takes 2-4, so a process that compiles
    more than two or three models decodes the rest eagerly (Dynamo warns once).

    ``realize_opcount_threshold=1`` makes inductor store each LayerNorm's output once: by default
    it recomputes the norm inside a fused matrix-vector product that reads it, once per output row,
    which made the int8 step without llmcore's kernel (``Int8Linear``'s fallback reduction)
    compute-bound (GPT-2 small, 2-core CPU: 105 against 175 tok/s).
    ``use_recursive_dict_tags_for_guards`` lets Dynamo skip the guards of a module subtree whose
    attributes did not change since the last call: checking a 12-layer model's guards before
    every step took 0.45-0.5 ms, about 0.25 ms with it.
    """
    compiled = [torch.compile(_step_logits, dynamic=True, options={"realize_opcount_threshold": 1})]

    def step(*args, **kwargs):
        try:
            with torch._dynamo.config.patch(use_recursive_dict_tags_for_guards=True):
                return compiled[0](*args, **kwargs)
        except torch._inductor.exc.InductorError as exc:  # raised before the step ran: the cache is intact
            warn_fallback("llmcore: the decoding step could not be compiled, it runs eagerly instead", exc)
            compiled[0] = _step_logits
            return _step_logits(*args, **kwargs)

    return step


_VIEWS = ("position_ids", "attn_mask")


def _one_token_step(model, compile, batch: int):
    """The ahead-of-time step for ``compile`` "aot" or "fused" (None if it could not be compiled)."""
    if compile == "fused" and batch == 1:
        from llmcore.fused_step import fused_step

        step = fused_step(model)
        if step is not None:
            return step
    from llmcore.aot_step import aot_step  # torch.export and AOTInductor load only when asked for

    return aot_step(model)


def _last_logits(model, tokens, valid, caches, q_start: int, win_start: int, *, padded: bool, compiled, aot):
    """Logits of the last position: the model runs on columns ``q_start:`` of the window that
    starts at ``win_start`` (the new token alone when the cache holds the rest). ``aot``: the
    model's ahead-of-time step when ``compiled`` is "aot" or "fused" (None if it could not be
    compiled: then torch.compile runs the one-token steps)."""
    kwargs = {"kv_caches": caches, "start_pos": q_start - win_start}
    if padded:
        window_valid = valid[:, win_start:]
        kwargs["position_ids"] = (window_valid.long().cumsum(dim=1) - 1).clamp(min=0)[:, q_start - win_start :]
        kwargs["attn_mask"] = _padding_mask(window_valid, tokens.shape[1] - q_start)
    if compiled in ("aot", "fused"):
        if tokens.shape[1] - q_start != 1 or caches is None or padded:  # a prompt, a refill, padding
            return _step_logits(model, tokens[:, q_start:], **kwargs)
        if aot is not None:
            return aot(tokens[:, q_start:], caches, q_start - win_start)
    if compiled:  # fresh tensors: a view's strides change every step and would recompile
        fresh = {k: v.clone(memory_format=torch.contiguous_format) for k, v in kwargs.items() if k in _VIEWS}
        token = tokens[:, q_start:].clone(memory_format=torch.contiguous_format)
        return _compiled_step()(model, token, **{**kwargs, **fresh})
    return _step_logits(model, tokens[:, q_start:], **kwargs)


@torch.no_grad()
def generate_stream(
    model: nn.Module,
    prompts: torch.Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    compile: bool | str = False,
) -> Iterator[torch.Tensor]:
    """Yield one (batch,) tensor of new token ids per step; stops early once every row hit eos.

    A row that has finished keeps yielding ``eos_id`` until the others finish. ``compile=True``
    runs every step through torch.compile; ``compile="aot"`` runs the one-token steps of an
    unpadded batch through an AOTInductor library and the rest eagerly, ``"fused"`` those of one
    sequence through llmcore's C++ decoder where it applies (see the module doc).
    """
    if compile not in (False, True, "aot", "fused"):
        raise ValueError(f"compile must be False, True, 'aot' or 'fused', got {compile!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    device = next(model.parameters()).device
    context = model.cfg.context_length
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    tokens, valid = _left_pad(prompts, device)
    has_padding = not bool(valid.all())
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=device)
    caches, cache_start, cache_end = None, -1, -1
    was_training = model.training
    model.eval()
    try:
        if compile and device.type == "cpu":
            cpu_kernels.isa()  # llmcore's CPU kernels, for the compiled step's attention (built once per machine)
        aot = _one_token_step(model, compile, tokens.shape[0]) if compile in ("aot", "fused") and use_cache else None
        if getattr(aot, "fused", False) and tokens.shape[1] + max_new_tokens - 1 <= context:
            from llmcore.fused_step import stream  # its own loop: one sequence, no cropping

            sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "generator": generator}
            yield from stream(aot, model, tokens, max_new_tokens, eos_id=eos_id, **sampling)
            return
        for _ in range(max_new_tokens):
            n_cols = tokens.shape[1]
            win_start = max(0, n_cols - context)
            incremental = use_cache and caches is not None and cache_start == win_start and cache_end == n_cols - 1
            q_start = n_cols - 1 if incremental else win_start
            if use_cache and caches is None:
                caches = new_kv_caches(model, tokens.shape[0], min(context, n_cols + max_new_tokens))
            logits = _last_logits(
                model,
                tokens,
                valid,
                caches if use_cache else None,
                q_start,
                win_start,
                padded=has_padding,
                compiled=compile,
                aot=aot,
            )
            cache_start, cache_end = win_start, n_cols
            next_ids = sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            if eos_id is not None:
                next_ids = torch.where(finished, torch.full_like(next_ids, eos_id), next_ids)
                finished |= next_ids == eos_id
            yield next_ids
            tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
            valid = torch.cat([valid, torch.ones_like(next_ids[:, None], dtype=torch.bool)], dim=1)
            if eos_id is not None and bool(finished.all()):
                break
    finally:
        model.train(was_training)


def generate(
    model: nn.Module,
    prompts: torch.Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    **kwargs,
) -> list[list[int]]:
    """New token ids per prompt (up to, not including, eos); options as for ``generate_stream``."""
    eos_id = kwargs.get("eos_id")
    steps = list(generate_stream(model, prompts, max_new_tokens, **kwargs))
    if not steps:
        n_rows = prompts.shape[0] if isinstance(prompts, torch.Tensor) else len(prompts)
        return [[] for _ in range(n_rows)]
    out = []
    for row in torch.stack(steps, dim=1).tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        out.append(row)
    return out


def generate_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int, **kwargs) -> str:
    """Prompt text in, continuation text out (the prompt itself is not repeated)."""
    ids = encode(tokenizer, prompt)
    return tokenizer.decode(generate(model, [ids], max_new_tokens, **kwargs)[0])
