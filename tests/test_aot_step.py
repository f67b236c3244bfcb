"""``generate(..., compile="aot")``: the one-token step compiled ahead of time (``llmcore.aot_step``)
must decode exactly what eager decoding decodes, follow the model's weights, and give way to
torch.compile, with one warning, where it cannot be compiled. Each compile takes ~10-15 s."""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch

from llmcore import aot_step as aot
from llmcore.config import GPTConfig
from llmcore.generate import generate
from llmcore.model import GPTModel
from llmcore.quantize import quantize_int8_weight_only

sys.path.insert(0, str(Path(__file__).parent))
from bases_helpers import hf_model, save_hf  # noqa: E402

CFG = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
PROMPTS = {
    "one prompt, past the context (a refill)": [[1, 2, 3]],
    "an unpadded batch": [[1, 2, 3], [4, 5, 6]],
    "a padded batch (eager steps)": [[1, 2], [3, 4, 5, 6, 7]],
    "a one-token prompt": [[9]],
}


def trained_tiny_model() -> GPTModel:
    """Logits that are not near-uniform, so a wrong step would change greedy tokens."""
    torch.manual_seed(0)
    model = GPTModel(CFG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.arange(64).remainder(13).reshape(4, 16)
    for _ in range(60):
        optimizer.zero_grad()
        model.loss(data[:, :-1], data[:, 1:]).backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def model() -> GPTModel:
    return trained_tiny_model()


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "int8 weight-only"])
def test_aot_decoding_gives_eager_tokens_greedy_and_sampled(model: GPTModel, quantized: bool) -> None:
    target = quantize_int8_weight_only(model) if quantized else model
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to torch.compile would pass unseen
        for name, prompts in PROMPTS.items():
            assert generate(target, prompts, 20, compile="aot") == generate(target, prompts, 20), name
        sampled = dict(temperature=1.0, top_k=20, seed=5)
        prompts = PROMPTS["an unpadded batch"]
        assert generate(target, prompts, 20, compile="aot", **sampled) == generate(target, prompts, 20, **sampled)
    step = aot._STEPS[target]  # compiled once for every batch size, cache length and position
    assert step is not None and aot.aot_step(target) is step


def test_aot_step_follows_weights_changed_after_compiling(model: GPTModel) -> None:
    target = copy.deepcopy(model)
    prompts = [[1, 2, 3], [4, 5, 6]]
    generate(target, prompts, 4, compile="aot")
    step = aot._STEPS[target]
    with torch.no_grad():
        target.trf_blocks[1].ff.fc.weight.mul_(-1.5)  # in place
        proj = target.trf_blocks[0].att.out_proj
        proj.weight = torch.nn.Parameter(proj.weight.flip(0).clone())  # a new tensor of the same shape
    assert generate(target, prompts, 12, compile="aot") == generate(target, prompts, 12)
    assert aot._STEPS[target] is step  # the library was pointed at the new tensors
    # Untied from the embedding (two constants where the library has one) and in another dtype:
    # compiled again.
    target.out_head.weight = torch.nn.Parameter(target.out_head.weight.flip(0).clone())
    target.double()
    assert generate(target, prompts, 12, compile="aot") == generate(target, prompts, 12)
    assert aot._STEPS[target] is not step


def test_a_decoder_family_decodes_the_same_ahead_of_time(tmp_path: Path) -> None:
    from llmcore.hf_checkpoint import load_hf_model

    model = load_hf_model(save_hf(hf_model("gemma3"), tmp_path / "gemma3"))  # sliding window, GQA, soft-cap
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for prompts in ([[1, 2, 3, 4]], [[1, 2, 3], [4, 5, 6]]):
            assert generate(model, prompts, 12, compile="aot") == generate(model, prompts, 12)


def test_where_it_cannot_compile_one_warning_and_torch_compile_decodes(model: GPTModel, monkeypatch) -> None:
    def broken(wrapper):
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(aot, "_compile", broken)
    target = copy.deepcopy(model)
    torch._dynamo.reset()
    message = "no ahead-of-time decoding step for GPTModel, torch.compile runs its steps instead: no C"
    with pytest.warns(RuntimeWarning, match=message):
        tokens = generate(target, [[1, 2, 3]], 8, compile="aot")
    assert tokens == generate(target, [[1, 2, 3]], 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # once per model, not per generation
        assert generate(target, [[4, 5]], 4, compile="aot") == generate(target, [[4, 5]], 4)


def test_compile_accepts_only_its_four_values(model: GPTModel) -> None:
    with pytest.raises(ValueError, match="compile must be False, True, 'aot' or 'fused', got 'fast'"):
        generate(model, [[1, 2]], 2, compile="fast")


def test_int8_layers_without_the_kernel_decode_with_torch_compile(model: GPTModel, monkeypatch) -> None:
    """Exported, the kernel's PyTorch fallback would be a dequantized matmul every step."""
    from llmcore import int8_kernel

    monkeypatch.setattr(int8_kernel, "available", lambda: False)
    quantized = quantize_int8_weight_only(model)  # layers built as on a machine without the kernel
    torch._dynamo.reset()
    with pytest.warns(RuntimeWarning, match="int8 layers run without llmcore's int8 kernel"):
        tokens = generate(quantized, [[1, 2, 3]], 8, compile="aot")
    assert tokens == generate(quantized, [[1, 2, 3]], 8)
    assert aot._STEPS[quantized] is None
