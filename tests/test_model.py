"""GPTModel: shapes, causality, weight tying, hidden states, context limit."""

from __future__ import annotations

import pytest
import torch

from llmcore import GPTConfig, GPTModel

CFG = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


@pytest.fixture(scope="module")
def model() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(CFG).eval()


def test_logits_and_hidden_state_shapes(model: GPTModel) -> None:
    idx = torch.randint(0, CFG.vocab_size, (3, 10))
    with torch.no_grad():
        logits = model(idx)
        hidden = model.hidden_states(idx)
    assert logits.shape == (3, 10, CFG.vocab_size)
    assert hidden.shape == (3, 10, CFG.emb_dim)
    # The logits are the LM head applied to those (final-norm) hidden states.
    torch.testing.assert_close(logits, model.out_head(hidden))
    # Final LayerNorm: every position is normalised (weight 1, bias 0 at init).
    torch.testing.assert_close(hidden.mean(-1), torch.zeros(3, 10), atol=1e-5, rtol=0)


def test_later_tokens_do_not_change_earlier_logits(model: GPTModel) -> None:
    idx = torch.randint(0, CFG.vocab_size, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (idx[:, 7] + 1) % CFG.vocab_size
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_tied_head_shares_storage_untied_does_not() -> None:
    tied = GPTModel(CFG)
    assert tied.out_head.weight is tied.tok_emb.weight
    assert tied.out_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    untied = GPTModel(GPTConfig(**{**CFG.to_dict(), "tie_embeddings": False}))
    assert untied.out_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert untied.num_parameters() - tied.num_parameters() == CFG.vocab_size * CFG.emb_dim


def test_longer_than_context_is_refused(model: GPTModel) -> None:
    model(torch.zeros((1, CFG.context_length), dtype=torch.long))  # exactly the context is fine
    with pytest.raises(ValueError, match="17 tokens exceeds context_length 16"):
        model(torch.zeros((1, CFG.context_length + 1), dtype=torch.long))


def test_dropout_only_in_training_mode() -> None:
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(**{**CFG.to_dict(), "drop_rate": 0.5}))
    idx = torch.randint(0, CFG.vocab_size, (2, 8))
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_backward_reaches_every_parameter() -> None:
    model = GPTModel(CFG)
    model(torch.randint(0, CFG.vocab_size, (2, 8))).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []
