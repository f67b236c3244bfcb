"""llmcore's C++ decoding step (``llmcore.fused_step``, csrc/gpt_decode.cpp): the eager int8 model's
logits and tokens, the same logits for any thread count, the cases it leaves to the AOTInductor
step, and one-line errors. Each instruction set's build is checked by test_int8_kernel.py."""

from __future__ import annotations

import pytest
import torch

from llmcore import cpu_kernels
from llmcore.config import GPTConfig
from llmcore.fused_step import FusedStep, fused_step, unsupported
from llmcore.generate import generate, new_kv_caches
from llmcore.lora import apply_lora
from llmcore.model import GPTModel
from llmcore.quantize import quantize_int8_weight_only

# Shapes the vector paths leave tails of: head_dim 24 (attention's plain loop; heads end mid-block
# of 16 rows), emb_dim 72 (LayerNorm and quantization tails), a padded vocabulary of 101 rows
# (not a multiple of 16), an untied head without qkv bias; and head_dim 64 with qkv bias, tied.
CONFIGS = {
    "tails": GPTConfig(
        vocab_size=101,
        context_length=40,
        emb_dim=72,
        n_heads=3,
        n_layers=2,
        drop_rate=0.0,
        qkv_bias=False,
        tie_embeddings=False,
        pad_vocab_to_multiple=8,
    ),
    "gpt2-like": GPTConfig(
        vocab_size=300, context_length=48, emb_dim=128, n_heads=2, n_layers=3, drop_rate=0.0, qkv_bias=True
    ),
}


@pytest.fixture(scope="module", autouse=True)
def kernels() -> None:
    assert cpu_kernels.isa() is not None, "llmcore's CPU kernels did not build on this machine"


def int8_model(name: str) -> GPTModel:
    torch.manual_seed(0)
    model = GPTModel(CONFIGS[name])
    with torch.no_grad():  # biases and norms away from their initial 0 and 1, so that they count
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return quantize_int8_weight_only(model.eval())


def check_against_eager(model: GPTModel, prompt: list[int], steps: int) -> list[torch.Tensor]:
    """Run ``steps`` fused steps after an eager prefill and the eager model beside it; the fused logits."""
    step = FusedStep(model)
    caches, ref_caches = new_kv_caches(model, 1, len(prompt) + steps), new_kv_caches(model, 1, len(prompt) + steps)
    got = []
    with torch.no_grad():
        tokens = torch.tensor([prompt])
        model(tokens[:, :-1], kv_caches=caches, start_pos=0)
        model(tokens[:, :-1], kv_caches=ref_caches, start_pos=0)
        token = tokens[:, -1:]
        for pos in range(len(prompt) - 1, len(prompt) - 1 + steps):
            logits, ref = step(token, caches, pos), model(token, kv_caches=ref_caches, start_pos=pos)[:, -1]
            assert logits.shape == ref.shape == (1, model.cfg.vocab_size)
            # the int8 kernel's arithmetic; LayerNorm and GELU differ from PyTorch's in the last bits,
            # which can move an activation's 15-bit quantization by one step
            assert (logits - ref).abs().max() <= 1e-4 * ref.abs().max() + 1e-5, pos
            for c, r in zip(caches, ref_caches):
                for mine, theirs in ((c.k, r.k), (c.v, r.v)):
                    mine, theirs = mine[:, :, : pos + 1], theirs[:, :, : pos + 1]
                    assert (mine - theirs).abs().max() <= 1e-4 * theirs.abs().max(), pos
            got.append(logits)
            token = ref.argmax(-1, keepdim=True)
    return got


@pytest.mark.parametrize("name", CONFIGS)
def test_fused_step_gives_the_eager_logits_and_fills_the_cache(name: str) -> None:
    model = int8_model(name)
    assert unsupported(model) is None
    check_against_eager(model, [3, 1, 4, 1, 5], 20)


def test_the_logits_do_not_depend_on_the_thread_count() -> None:
    model = int8_model("tails")
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 3, 5):
            torch.set_num_threads(n)
            runs.append(torch.cat(check_against_eager(model, [7, 8], 12)))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        assert torch.equal(runs[0], other)


@pytest.mark.parametrize("name", CONFIGS)
def test_fused_generation_gives_the_eager_tokens_greedy_and_sampled(name: str, monkeypatch) -> None:
    from llmcore import fused_step as module

    model, loops = int8_model(name), []
    real = module.stream
    monkeypatch.setattr(module, "stream", lambda *args, **kwargs: loops.append(1) or real(*args, **kwargs))
    prompt = [[2, 7, 1, 8]]
    assert generate(model, prompt, 25, compile="fused") == generate(model, prompt, 25)
    assert loops == [1]  # its own loop (greedy: 16 tokens a call), not generate_stream's
    sampled = {"temperature": 0.8, "top_k": 20, "seed": 3}
    assert generate(model, prompt, 25, compile="fused", **sampled) == generate(model, prompt, 25, **sampled)


def test_past_the_context_and_at_eos_it_decodes_as_the_eager_loop() -> None:
    model = int8_model("tails")  # context 40: 50 new tokens crop the window and refill the cache
    prompt = [[5, 9, 2]]
    assert generate(model, prompt, 50, compile="fused") == generate(model, prompt, 50)
    full = generate(model, prompt, 20)[0]
    eos = full[6]
    assert generate(model, prompt, 20, compile="fused", eos_id=eos) == [full[: full.index(eos)]]


def test_what_it_does_not_cover_decodes_through_the_aot_step(monkeypatch) -> None:
    fp32 = GPTModel(CONFIGS["gpt2-like"]).eval()
    assert "is not an int8 layer" in unsupported(fp32)
    assert fused_step(fp32) is None
    lora = GPTModel(CONFIGS["gpt2-like"])
    apply_lora(lora, rank=2, alpha=4)
    assert "LinearWithLoRA" in unsupported(quantize_int8_weight_only(lora))

    class Subclass(GPTModel):
        pass

    assert "is not llmcore.model.GPTModel" in unsupported(quantize_int8_weight_only(Subclass(CONFIGS["tails"])))
    model = int8_model("gpt2-like")
    compiled = []
    from llmcore import aot_step

    real = aot_step.aot_step
    monkeypatch.setattr(aot_step, "aot_step", lambda m: compiled.append(m) or real(m))
    two = [[1, 2, 3], [4, 5, 6]]  # a batch of two: the AOTInductor step
    assert generate(model, two, 6, compile="fused") == generate(model, two, 6)
    assert compiled == [model]


def test_bad_tokens_positions_and_tensors_fail_in_one_line() -> None:
    model = int8_model("tails")
    step = FusedStep(model)
    caches = new_kv_caches(model, 1, 10)
    step.decoder.set_caches([c.k for c in caches], [c.v for c in caches])
    with pytest.raises(RuntimeError, match="token id 104 is outside the embedding's 104 rows"):
        step.decoder.step(104, 0)
    with pytest.raises(RuntimeError, match=r"position 10 is outside the KV cache \(10 columns\)"):
        step.decoder.step(1, 10)
    with pytest.raises(RuntimeError, match="one key and one value cache per block"):
        step.decoder.set_caches([caches[0].k], [caches[0].v])
    with pytest.raises(RuntimeError, match=r"a KV cache must be contiguous fp32 \(1, 3, columns, 24\)"):
        step.decoder.set_caches([c.k.double() for c in caches], [c.v for c in caches])
    from llmcore import fused_step as module

    tensors = module._tensors(model)
    tensors[8] = tensors[8].float()  # block 0's qkv weights
    with pytest.raises(RuntimeError, match="block 0 qkv weights must be packed int8"):
        torch.classes.llmcore.GptDecoder(tensors, [2, 3, 101], 1e-5)
