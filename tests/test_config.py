"""GPTConfig: GPT-2's exact parameter counts, validation naming the bad field, dict round trips."""

from __future__ import annotations

import pytest
import torch

from llmcore import PRESETS, GPTConfig, GPTModel
from llmcore.config import ConfigError


def test_gpt2_small_parameter_count_tied_and_untied() -> None:
    # The meta device builds the 124M-parameter shapes without allocating or initialising them.
    with torch.device("meta"):
        tied = GPTModel(GPTConfig.from_preset("gpt2-small"))
        untied = GPTModel(GPTConfig.from_preset("gpt2-small", tie_embeddings=False))
    assert tied.cfg.qkv_bias
    assert tied.num_parameters() == 124_439_808
    assert untied.num_parameters() == 163_037_184
    # The untied model's extra parameters are exactly one vocab x emb_dim head.
    assert untied.num_parameters() - tied.num_parameters() == 50257 * 768


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"emb_dim": 100, "n_heads": 12}, "emb_dim"),
        ({"n_layers": 0}, "n_layers"),
        ({"vocab_size": -1}, "vocab_size"),
        ({"context_length": 0}, "context_length"),
        ({"n_heads": 0}, "n_heads"),
        ({"emb_dim": 64.0}, "emb_dim"),
        ({"drop_rate": 1.0}, "drop_rate"),
        ({"drop_rate": -0.1}, "drop_rate"),
        ({"qkv_bias": 1}, "qkv_bias"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
    ],
)
def test_invalid_config_names_the_field(fields: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        GPTConfig(**fields)


def test_unknown_preset_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown model preset 'gpt3'.*gpt2-small"):
        GPTConfig.from_preset("gpt3")


def test_from_dict_rejects_unknown_field() -> None:
    data = {**GPTConfig().to_dict(), "n_embd": 768}
    with pytest.raises(ConfigError, match="n_embd"):
        GPTConfig.from_dict(data)


def test_overrides_are_validated_too() -> None:
    with pytest.raises(ConfigError, match="emb_dim"):
        GPTConfig.from_preset("cpu-tiny", n_heads=3)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_dict(name: str) -> None:
    cfg = PRESETS[name]
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    assert GPTConfig.from_preset(name) == cfg
    assert cfg.head_dim * cfg.n_heads == cfg.emb_dim


def test_cpu_presets_have_the_documented_shapes() -> None:
    shapes = {
        name: (PRESETS[name].n_layers, PRESETS[name].emb_dim, PRESETS[name].context_length)
        for name in ("cpu-tiny", "cpu-small", "cpu-base")
    }
    assert shapes == {"cpu-tiny": (2, 64, 64), "cpu-small": (4, 192, 128), "cpu-base": (6, 384, 256)}


def test_init_scheme_gpt2_or_pytorch_defaults() -> None:
    small = dict(vocab_size=50, context_length=8, emb_dim=256, n_heads=4, n_layers=1)
    torch.manual_seed(0)
    gpt2 = GPTModel(GPTConfig(**small))
    torch.manual_seed(0)
    book = GPTModel(GPTConfig(**small, init="torch"))
    assert abs(gpt2.tok_emb.weight.std().item() - 0.02) < 0.002  # GPT-2: N(0, 0.02)
    assert abs(book.tok_emb.weight.std().item() - 1.0) < 0.05  # PyTorch's nn.Embedding: N(0, 1)
    # PyTorch's nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); GPT-2's: normal, unbounded tails.
    assert book.trf_blocks[0].ff.fc.weight.abs().max() <= 1 / 256**0.5
    assert gpt2.trf_blocks[0].ff.fc.weight.abs().max() > 1 / 256**0.5
    with pytest.raises(ConfigError, match="GPTConfig.init must be one of"):
        GPTConfig(**small, init="xavier")
