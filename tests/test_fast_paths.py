"""The speed paths must compute what the plain paths compute: the chunked LM-head loss against
``F.cross_entropy`` of full logits (value and gradients, also under autocast), int8 weights against
fp32, a padded vocabulary against none, compiled decoding against eager decoding."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cli import llm as cli
from llmcore.checkpoint import load_checkpoint, save_checkpoint
from llmcore.config import GPTConfig
from llmcore.generate import generate
from llmcore.model import IGNORE_INDEX, GPTModel, head_cross_entropy
from llmcore.quantize import Int8Linear, quantize_int8, quantize_int8_weight_only
from llmcore.tokenizer import ENCODING_DIR_ENV, encode, eot_id
from llmpipe.model_dirs import tokenizer_for

CFG = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


@pytest.mark.parametrize("chunk_rows", [1, 7, 24, 1000])  # one row, ragged chunks, exact, one chunk
def test_chunked_head_loss_matches_full_logits_value_and_gradients(chunk_rows: int) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(3, 8, 32, requires_grad=True)
    weight = torch.randn(97, 32, requires_grad=True)
    targets = torch.randint(0, 97, (3, 8))
    targets[0, :3] = IGNORE_INDEX  # ignored rows, some of them in the first chunk
    targets[2, -1] = IGNORE_INDEX

    loss = head_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows)
    (loss * 2.5).backward()  # a non-unit upstream gradient must scale the stored ones
    got = loss.detach(), hidden.grad.clone(), weight.grad.clone()

    hidden.grad = weight.grad = None
    reference = F.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    (reference * 2.5).backward()
    torch.testing.assert_close(got[0], reference.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2], weight.grad, rtol=1e-5, atol=1e-6)


def test_gpt_model_loss_equals_cross_entropy_of_its_logits_with_tied_and_untied_heads() -> None:
    for tied in (False, True):
        torch.manual_seed(1)
        model = GPTModel(GPTConfig(**{**CFG.__dict__, "tie_embeddings": tied}))
        reference_model = copy.deepcopy(model)
        idx, targets = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
        model.loss(idx, targets).backward()
        F.cross_entropy(reference_model(idx).flatten(0, 1), targets.flatten()).backward()
        for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=f"{name} (tied={tied})")


def test_chunked_loss_rejects_targets_outside_the_vocabulary() -> None:
    with pytest.raises(ValueError, match="target id 97 is outside the vocabulary of 97"):
        head_cross_entropy(torch.randn(4, 32), torch.randn(97, 32), torch.tensor([1, 2, 97, 3]))


def test_under_no_grad_the_chunked_loss_does_no_gradient_work() -> None:
    hidden, weight = torch.randn(6, 32, requires_grad=True), torch.randn(97, 32, requires_grad=True)
    with torch.no_grad():
        loss = head_cross_entropy(hidden, weight, torch.randint(0, 97, (6,)))
    assert not loss.requires_grad and hidden.grad is None


def trained_tiny_model() -> GPTModel:
    """A model whose logits are not near-uniform, so int8 rounding could change greedy tokens."""
    torch.manual_seed(0)
    model = GPTModel(CFG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.arange(64).remainder(13).reshape(4, 16)  # a repeating pattern to learn
    for _ in range(60):
        optimizer.zero_grad()
        model.loss(data[:, :-1], data[:, 1:]).backward()
        optimizer.step()
    return model.eval()


def quantized_twin(quantize) -> tuple[GPTModel, torch.nn.Module]:
    """A trained fp32 model and its quantized copy, checked: the original untouched, every Linear
    replaced, logits within 5% of the largest, the same greedy tokens."""
    model = trained_tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = quantize(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # original untouched
    assert not any(type(m) is torch.nn.Linear for m in quantized.modules())  # every Linear replaced
    idx = torch.arange(12).remainder(13)[None]
    with torch.no_grad():
        fp32_logits, int8_logits = model(idx), quantized(idx)
    assert (int8_logits - fp32_logits).abs().max() < 0.05 * fp32_logits.abs().max()
    assert generate(quantized, idx, 20) == generate(model, idx, 20)
    return model, quantized


def test_int8_model_keeps_the_fp32_model_and_agrees_with_it() -> None:
    quantized_twin(quantize_int8)


def test_int8_rejects_models_it_cannot_quantize() -> None:
    for quantize in (quantize_int8, quantize_int8_weight_only):
        with pytest.raises(ValueError, match="fp32"):
            quantize(GPTModel(CFG).to(torch.float64))


def test_weight_only_int8_is_within_half_a_step_of_fp32_and_agrees_with_it() -> None:
    model, quantized = quantized_twin(quantize_int8_weight_only)
    int8_layers = {name: m for name, m in quantized.named_modules() if isinstance(m, Int8Linear)}
    assert len(int8_layers) == 9  # 2 blocks x (qkv, out_proj, fc, proj) + the head
    for name, layer in int8_layers.items():
        fp32 = model.get_submodule(name).weight.detach()
        w = layer.int8_weight()
        assert w.dtype == torch.int8 and w.shape == fp32.shape and int(w.abs().max()) == 127
        assert ((w.float() * layer.scale[:, None] - fp32).abs() <= layer.scale[:, None] / 2 + 1e-7).all()
    assert torch.equal(quantized.tok_emb.weight, model.tok_emb.weight)  # the tied embedding stays fp32


def test_compiled_weight_only_int8_decoding_matches_eager_with_one_graph_for_all_lengths() -> None:
    """Batch 1 takes the compiled int8 reduction (one row); the window is cropped past the context
    (16) and refilled; a second generation of other lengths compiles nothing new."""
    quantized = quantize_int8_weight_only(trained_tiny_model())
    torch._dynamo.reset()
    stats = torch._dynamo.utils.counters["stats"]  # this process's running totals
    before = stats["unique_graphs"]
    assert generate(quantized, [[1, 2, 3]], 20, compile=True) == generate(quantized, [[1, 2, 3]], 20)
    graphs = stats["unique_graphs"] - before
    # The prompt (start 0), the one-token step, the step that fills the cache's last column, the refill.
    assert 0 < graphs <= 4
    prompt = [[5, 6, 7, 8, 9]]
    assert generate(quantized, prompt, 7, compile=True) == generate(quantized, prompt, 7)
    assert stats["unique_graphs"] - before == graphs


def test_cli_generate_with_int8_weights(tmp_path: Path, gpt2_encoding_dir: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv(ENCODING_DIR_ENV, str(gpt2_encoding_dir))
    torch.manual_seed(0)
    model_dir = save_checkpoint(GPTModel(GPTConfig.from_preset("cpu-tiny")), tmp_path / "gpt")
    assert (
        cli.main(["generate", "Every effort moves you", "--model", str(model_dir), "--max-new-tokens", "5", "--int8"])
        == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("Every effort moves you") and len(out) > len("Every effort moves you\n")


def test_cli_generate_with_compiled_int8_gives_the_weight_only_models_tokens(
    tmp_path: Path, gpt2_encoding_dir: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv(ENCODING_DIR_ENV, str(gpt2_encoding_dir))
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("cpu-tiny"))
    model_dir = save_checkpoint(model, tmp_path / "gpt")
    prompt = "Every effort moves you"
    argv = ["generate", prompt, "--model", str(model_dir), "--max-new-tokens", "6", "--temperature", "0"]
    assert cli.main([*argv, "--int8", "--compile"]) == 0
    tokenizer = tokenizer_for(model_dir)
    expected = generate(quantize_int8_weight_only(model), [encode(tokenizer, prompt)], 6, eos_id=eot_id(tokenizer))
    assert capsys.readouterr().out == prompt + tokenizer.decode(expected[0]) + "\n"


def test_cli_compile_without_a_cxx_compiler_decodes_eagerly_after_warnings(
    tmp_path: Path, gpt2_encoding_dir: Path, monkeypatch
) -> None:
    """No working C++ compiler: llmcore's kernels, the ahead-of-time step and torch.compile each give
    way with one warning, and the tokens are the eager ones (not a traceback)."""
    import os
    import subprocess
    import sys

    monkeypatch.setenv(ENCODING_DIR_ENV, str(gpt2_encoding_dir))  # for the expected tokens, in this process
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("cpu-tiny"))
    model_dir = save_checkpoint(model, tmp_path / "gpt")
    prompt = "Every effort moves you"
    argv = ["generate", prompt, "--model", str(model_dir), "--max-new-tokens", "6", "--temperature", "0"]
    env = {**os.environ, ENCODING_DIR_ENV: str(gpt2_encoding_dir), "CXX": "/bin/false"}
    env.update(TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "cli.llm", *argv, "--compile"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    for message in (
        "the CPU kernels (llmcore/csrc) could not be built",
        "no ahead-of-time decoding step",
        "runs eagerly",
    ):
        assert message in done.stderr, done.stderr[-2000:]
    tokenizer = tokenizer_for(model_dir)
    expected = generate(model, [encode(tokenizer, prompt)], 6, eos_id=eot_id(tokenizer))
    assert done.stdout == prompt + tokenizer.decode(expected[0]) + "\n"


# ---- mixed precision, a padded vocabulary, the compiled decoder


def test_chunked_loss_under_autocast_matches_fp32_and_keeps_fp32_gradients() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(24, 32, requires_grad=True)
    weight = torch.randn(97, 32, requires_grad=True)
    targets = torch.randint(0, 97, (24,))
    reference = F.cross_entropy(hidden @ weight.T, targets)
    ref_grads = torch.autograd.grad(reference, (hidden, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head_cross_entropy(hidden, weight, targets, chunk_rows=7)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    torch.testing.assert_close(loss, reference, rtol=2e-2, atol=0)  # bf16 matmuls: ~3 significant digits
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * want.abs().max().item())


def padded_twin(model: GPTModel, multiple: int = 64) -> GPTModel:
    """The same model with its vocabulary rows padded; the extra rows get huge weights, so any
    leak of them into a softmax or an argmax would show."""
    padded = GPTModel(GPTConfig(**{**model.cfg.to_dict(), "pad_vocab_to_multiple": multiple}))
    state = dict(model.state_dict())
    extra = padded.cfg.padded_vocab_size - model.cfg.vocab_size
    for name in ("tok_emb.weight", "out_head.weight"):
        state[name] = torch.cat([state[name], 50.0 * torch.randn(extra, model.cfg.emb_dim)])
    padded.load_state_dict(state)
    return padded


def test_padded_vocabulary_changes_neither_logits_nor_loss_and_its_rows_get_no_gradient() -> None:
    torch.manual_seed(2)
    model = GPTModel(CFG)
    padded = padded_twin(model)
    assert padded.cfg.padded_vocab_size == 128 and padded.out_head.weight.shape == (128, 32)
    idx, targets = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(padded(idx), model(idx))  # (2, 16, 97): the padding is cut off
    loss, padded_loss = model.loss(idx, targets), padded.loss(idx, targets)
    torch.testing.assert_close(padded_loss, loss)
    loss.backward()
    padded_loss.backward()
    assert torch.equal(padded.out_head.weight.grad[97:], torch.zeros(31, 32))
    torch.testing.assert_close(padded.out_head.weight.grad[:97], model.out_head.weight.grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="target id 97 is outside the vocabulary of 97"):
        padded.loss(idx, torch.full_like(targets, 97))


def test_padded_vocabulary_is_never_sampled(tmp_path: Path) -> None:
    torch.manual_seed(3)
    padded = padded_twin(GPTModel(CFG))
    prompts = torch.randint(0, 97, (4, 3))
    for kwargs in ({}, {"temperature": 5.0, "seed": 1}, {"temperature": 1.0, "top_p": 0.99, "seed": 2}):
        assert max(max(row) for row in generate(padded, prompts, 30, **kwargs)) < 97
    reloaded = load_checkpoint(save_checkpoint(padded, tmp_path / "padded"))
    assert reloaded.cfg.pad_vocab_to_multiple == 64 and torch.equal(reloaded.out_head.weight, padded.out_head.weight)


def test_compiled_decoding_matches_eager_decoding() -> None:
    model = trained_tiny_model()
    torch._dynamo.reset()  # graphs other tests compiled in this process count against Dynamo's limit
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]  # left-padded; 20 new tokens run past the context
    assert generate(model, prompts, 20, compile=True) == generate(model, prompts, 20)
    sampled = dict(temperature=1.0, top_k=20, seed=5)
    assert generate(model, prompts, 20, compile=True, **sampled) == generate(model, prompts, 20, **sampled)
