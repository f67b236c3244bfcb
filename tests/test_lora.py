"""LoRA adapters: which parameters train, a no-op at initialisation, and merging."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmcore.config import GPTConfig
from llmcore.lora import LinearWithLoRA, apply_lora, has_lora, merge_lora
from llmcore.model import GPTModel


@pytest.fixture
def model() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(GPTConfig.from_preset("cpu-tiny", vocab_size=100)).eval()


def test_apply_lora_wraps_block_linears_and_trains_only_a_and_b(model: GPTModel) -> None:
    wrapped = apply_lora(model, rank=4, alpha=8)
    assert wrapped == [
        f"trf_blocks.{i}.{name}" for i in range(2) for name in ("att.qkv", "att.out_proj", "ff.fc", "ff.proj")
    ]
    assert isinstance(model.out_head, nn.Linear) and not isinstance(model.out_head, LinearWithLoRA)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{layer}.lora.{ab}" for layer in wrapped for ab in ("A", "B")}
    qkv = model.trf_blocks[0].att.qkv
    assert qkv.lora.A.shape == (64, 4) and qkv.lora.B.shape == (4, 192)
    assert qkv.lora.scale == 2.0 and torch.count_nonzero(qkv.lora.B) == 0


def test_fresh_adapters_change_nothing(model: GPTModel) -> None:
    idx = torch.randint(0, 100, (2, 10))
    before = model(idx)
    apply_lora(model, rank=2, alpha=4)
    torch.testing.assert_close(model(idx), before)


def test_merged_model_equals_unmerged(model: GPTModel) -> None:
    apply_lora(model, rank=4, alpha=8)
    for name, param in model.named_parameters():
        if name.endswith("lora.B"):
            nn.init.normal_(param, std=0.5)  # as if trained
    idx = torch.randint(0, 100, (3, 12))
    with torch.no_grad():
        unmerged = model(idx)
    assert merge_lora(model) == 8 and not has_lora(model)
    assert type(model.trf_blocks[1].ff.fc) is nn.Linear
    assert set(model.state_dict()) == set(GPTModel(model.cfg).state_dict())  # the plain layout again
    with torch.no_grad():
        merged = model(idx)
    assert not torch.allclose(merged, GPTModel(model.cfg).eval()(idx))
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)


def test_lora_gradients_reach_only_adapters(model: GPTModel) -> None:
    apply_lora(model, rank=2, alpha=2)
    model(torch.randint(0, 100, (2, 8))).sum().backward()
    layer = model.trf_blocks[0].ff.proj
    assert layer.linear.weight.grad is None
    assert layer.lora.A.grad is not None  # B is zero at first, so A's gradient is zero but present
    assert layer.lora.B.grad is not None and layer.lora.B.grad.abs().sum() > 0


def test_targets_must_match_something(model: GPTModel) -> None:
    with pytest.raises(ValueError, match="no nn.Linear layer matches"):
        apply_lora(model, rank=2, alpha=2, targets=("nothing.*",))
    with pytest.raises(ValueError, match=r"\['out_head'\] have weights tied"):
        apply_lora(model, rank=2, alpha=2, targets=("out_head",))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        apply_lora(model, rank=0, alpha=2)
