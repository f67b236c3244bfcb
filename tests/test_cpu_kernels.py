"""llmcore's CPU kernels (``llmcore.cpu_kernels``): the decoding attention (csrc/decode_attention.cpp)
against SDPA in fp64, its errors, and that a compiled decoding step runs it. The int8 kernel has
its own tests (test_int8_kernel.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmcore import cpu_kernels
from llmcore.config import GPTConfig
from llmcore.generate import generate
from llmcore.model import GPTModel


@pytest.fixture(scope="module", autouse=True)
def kernels() -> None:
    assert cpu_kernels.isa() is not None, "llmcore's CPU kernels did not build on this machine"


# (batch, heads, keys, head_dim, cache length): a view of a longer cache (as a decoding step
# passes it), one key, head dims that the vector path takes (multiples of 16) and one it leaves to
# the scalar path (48 is, 40 is not), keys past a multiple of 16, a long cache.
SHAPES = [
    (1, 12, 150, 64, 404),
    (2, 3, 1, 64, 8),
    (1, 4, 37, 128, 40),
    (3, 2, 17, 48, 20),
    (2, 2, 21, 40, 30),
    (1, 2, 1000, 64, 1024),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_decode_attention_matches_sdpa_in_float64(shape) -> None:
    batch, heads, keys, head_dim, length = shape
    g = torch.Generator().manual_seed(keys)
    cache_k, cache_v = (torch.randn(batch, heads, length, head_dim, generator=g) * 3 for _ in range(2))
    q = torch.randn(batch, heads, 1, head_dim, generator=g) * 3
    k, v = cache_k[:, :, :keys], cache_v[:, :, :keys]  # strided views, as KVCache.update returns
    scale = 0.7 * head_dim**-0.5
    got = cpu_kernels.decode_attention(q, k, v, scale)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)
    fp32 = F.scaled_dot_product_attention(q, k, v, scale=scale)
    assert got.shape == q.shape and got.dtype == torch.float32
    # within fp32 rounding: no worse than twice SDPA's own fp32 error, and small in absolute terms
    error, sdpa_error = (got.double() - ref).abs().max().item(), (fp32.double() - ref).abs().max().item()
    assert error < max(2 * sdpa_error, 1e-6) and error < 1e-5, (error, sdpa_error)


def test_decode_attention_rejects_bad_inputs_in_one_line() -> None:
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 4, 5, 16)
    with pytest.raises(RuntimeError, match="fp32 CPU tensors only"):
        cpu_kernels.decode_attention(q.double(), k.double(), k.double(), 0.25)
    with pytest.raises(RuntimeError, match=r"q \[1, 2, 1, 16\], k \[1, 4, 5, 16\] and v \[1, 4, 5, 16\] do not match"):
        cpu_kernels.decode_attention(q[:, :2], k, k, 0.25)
    with pytest.raises(RuntimeError, match="need contiguous rows"):
        cpu_kernels.decode_attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), k, 0.25)
    with pytest.raises(RuntimeError, match=r"q must be \(batch, heads, 1, head_dim\)"):
        cpu_kernels.decode_attention(torch.randn(1, 4, 2, 16), k, k, 0.25)


def test_a_compiled_decoding_step_runs_the_kernel_and_decodes_the_eager_tokens() -> None:
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=97, context_length=32, emb_dim=64, n_heads=4, n_layers=2)).eval()
    targets: list[str] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    from llmcore import generate as generation

    step = torch.compile(generation._step_logits, backend=recording_backend, dynamic=True)
    caches = generation.new_kv_caches(model, 1, 32)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), kv_caches=caches, start_pos=0)
        step(model, torch.tensor([[4]]), kv_caches=caches, start_pos=3)
    assert any("llmcore.decode_attention" in target for target in targets), targets
    prompt = [[5, 6, 7]]
    torch._dynamo.reset()
    assert generate(model, prompt, 20, compile=True) == generate(model, prompt, 20)
