"""GPT-2 weight loading, checked against transformers' own GPT2LMHeadModel on tiny random checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file

from llmcore.checkpoint import CheckpointError
from llmcore.generate import generate
from llmcore.weights import HF_REPOS, WeightsUnavailableError, load_gpt2


def rewrite_weights(directory: Path, edit) -> None:
    """Apply ``edit`` to the checkpoint's tensor dict and write it back."""
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@torch.no_grad()
def hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    idx = torch.tensor([prompt])
    for _ in range(n):
        next_id = hf_model(idx).logits[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, next_id], dim=1)
    return idx[0, len(prompt) :].tolist()


@pytest.mark.parametrize("tied", [True, False])
def test_logits_and_greedy_generation_match_transformers(make_hf_gpt2, tied: bool) -> None:
    # A wide init spreads the logits, so greedy decoding has no near-ties to flip on rounding.
    directory, hf_model = make_hf_gpt2(tie_word_embeddings=tied, initializer_range=0.2)
    model = load_gpt2(directory).eval()
    assert model.cfg.tie_embeddings is tied and model.cfg.qkv_bias and model.cfg.context_length == 64
    assert (model.out_head.weight is model.tok_emb.weight) is tied
    idx = torch.randint(0, 1000, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx), hf_model(idx).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    prompt = idx[0, :5].tolist()
    assert generate(model, [prompt], 15) == [hf_greedy(hf_model, prompt, 15)]


def test_checkpoint_generated_by_transformers_generate(make_hf_gpt2) -> None:
    directory, hf_model = make_hf_gpt2(initializer_range=0.2)
    model = load_gpt2(directory)
    prompt = torch.tensor([[5, 17, 300, 2]])
    # No eos: transformers would stop there (or, with min_new_tokens, suppress it) but generate() here won't.
    out = hf_model.generate(
        prompt,
        do_sample=False,
        max_new_tokens=8,
        eos_token_id=None,
        attention_mask=torch.ones_like(prompt),
        pad_token_id=0,
    )
    assert out.shape == (1, 12)
    assert generate(model, prompt, 8) == [out[0, 4:].tolist()]


def test_missing_tensor_is_named(make_hf_gpt2) -> None:
    directory, _ = make_hf_gpt2()
    rewrite_weights(directory, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor h\.1\.mlp\.c_fc\.bias"):
        load_gpt2(directory)


def test_unexpected_tensor_is_named(make_hf_gpt2) -> None:
    directory, _ = make_hf_gpt2()
    rewrite_weights(directory, lambda t: t.update({"transformer.h.2.ln_1.weight": torch.ones(64)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*h\.2\.ln_1\.weight"):
        load_gpt2(directory)


def test_misshaped_tensor_is_named_in_the_files_layout(make_hf_gpt2) -> None:
    directory, _ = make_hf_gpt2()
    rewrite_weights(directory, lambda t: t.update({"transformer.h.0.attn.c_attn.weight": torch.zeros(64, 100)}))
    with pytest.raises(CheckpointError, match=r"h\.0\.attn\.c_attn\.weight has shape \(64, 100\).*\(64, 192\)"):
        load_gpt2(directory)


def test_untied_head_of_wrong_shape_is_named(make_hf_gpt2) -> None:
    directory, _ = make_hf_gpt2(tie_word_embeddings=False)
    rewrite_weights(directory, lambda t: t.update({"lm_head.weight": torch.zeros(999, 64)}))
    with pytest.raises(CheckpointError, match="out_head.weight"):
        load_gpt2(directory)


def test_missing_config_json_is_named(make_hf_gpt2) -> None:
    directory, _ = make_hf_gpt2()
    (directory / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_gpt2(directory)


def test_unsupported_activation_is_refused(make_hf_gpt2) -> None:
    directory, _ = make_hf_gpt2(activation_function="relu")
    with pytest.raises(CheckpointError, match="activation_function='relu'"):
        load_gpt2(directory)


def test_unsupported_inner_size_is_refused(make_hf_gpt2) -> None:
    directory, _ = make_hf_gpt2()
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "n_inner": 100}))
    with pytest.raises(CheckpointError, match="n_inner"):
        load_gpt2(directory)


@pytest.mark.parametrize(
    ("source", "repo_id"),
    [("gpt2-small", "openai-community/gpt2"), ("openai-community/gpt2-medium", "openai-community/gpt2-medium")],
)
def test_hub_unreachable_says_how_to_use_a_local_directory(
    monkeypatch: pytest.MonkeyPatch, source: str, repo_id: str
) -> None:
    requested = []

    def offline(repo_id, **kwargs):
        requested.append(repo_id)
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(WeightsUnavailableError, match="point the source at that local directory"):
        load_gpt2(source)
    assert requested == [repo_id]
    assert HF_REPOS["gpt2-small"] == "openai-community/gpt2"


def test_missing_local_directory_is_not_looked_up_on_the_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(huggingface_hub, "snapshot_download", pytest.fail)
    with pytest.raises(WeightsUnavailableError, match="nowhere does not exist"):
        load_gpt2(tmp_path / "nowhere")


def test_unknown_name_is_refused() -> None:
    with pytest.raises(WeightsUnavailableError, match="gpt5.*gpt2-small"):
        load_gpt2("gpt5")


def test_openai_layout_without_prefix_and_with_mask_buffers(make_hf_gpt2) -> None:
    # OpenAI's own files (openai-community/gpt2) name tensors without "transformer." and carry the
    # causal-mask buffers h.<i>.attn.bias / masked_bias, which are constants, not weights.
    directory, hf_model = make_hf_gpt2()

    def to_openai_layout(tensors):
        renamed = {name.removeprefix("transformer."): t for name, t in tensors.items()}
        tensors.clear()
        tensors.update(renamed)
        for i in range(2):
            tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
            tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)

    rewrite_weights(directory, to_openai_layout)
    idx = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_gpt2(directory)(idx), hf_model(idx).logits, atol=1e-4, rtol=0)


def test_unreadable_weights_file_is_named(make_hf_gpt2) -> None:
    directory, _ = make_hf_gpt2()
    (directory / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable"):
        load_gpt2(directory)


def test_config_of_another_architecture_is_refused(make_hf_gpt2) -> None:
    directory, _ = make_hf_gpt2()
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(CheckpointError, match="no vocab_size, n_positions, n_embd, n_head, n_layer"):
        load_gpt2(directory)


@pytest.mark.parametrize("tied", [True, False])
def test_padded_vocabulary_loads_gpt2_weights_with_the_same_logits(make_hf_gpt2, tied: bool) -> None:
    directory, hf_model = make_hf_gpt2(tie_word_embeddings=tied, initializer_range=0.2)
    model = load_gpt2(directory, pad_vocab_to_multiple=64).eval()
    vocab = hf_model.config.vocab_size
    assert model.out_head.weight.shape[0] == model.cfg.padded_vocab_size > vocab
    assert torch.equal(model.out_head.weight[vocab:], torch.zeros_like(model.out_head.weight[vocab:]))
    idx = torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(idx) - hf_model(idx).logits).abs().max().item() < 1e-4
