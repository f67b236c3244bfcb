"""Reading the published checkpoints' config.json (the pre-transformers-5 layout: rope_theta,
rope_scaling, Gemma's rope_local_base_freq and sliding_window_pattern), checked against how
transformers itself reads the same dict."""

from __future__ import annotations

import json

import pytest
import torch

from llmcore.config import ConfigError
from llmcore.decoder import rope_inv_freq
from llmcore.decoder_config import DecoderConfig, config_from_hf
from llmcore.hf_checkpoint import load_hf_model
from tests.bases_helpers import VOCAB, hf_model, save_hf

tf = pytest.importorskip("transformers")

# The text fields of the published config.json files (Llama-3.2-1B, Qwen3-0.6B, gemma-3-1b-it).
LLAMA_3_2_1B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}
QWEN3_0_6B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "attention_bias": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "max_position_embeddings": 40960,
    "max_window_layers": 28,
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
    "vocab_size": 151936,
}
GEMMA_3_1B = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "attention_bias": False,
    "attn_logit_softcapping": None,
    "bos_token_id": 2,
    "eos_token_id": [1, 106],
    "final_logit_softcapping": None,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152,
    "intermediate_size": 6912,
    "max_position_embeddings": 32768,
    "num_attention_heads": 4,
    "num_hidden_layers": 26,
    "num_key_value_heads": 1,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "torch_dtype": "bfloat16",
    "vocab_size": 262144,
}


def test_llama_3_2_config_and_its_rope_scaling_match_transformers():
    cfg = config_from_hf(LLAMA_3_2_1B)
    assert (cfg.family, cfg.n_kv_heads, cfg.head_dim, cfg.tie_embeddings, cfg.rope_scaling) == (
        "llama",
        8,
        64,
        True,
        "llama3",
    )
    assert (cfg.rope_factor, cfg.rope_original_context, cfg.qk_norm, cfg.layer_types) == (32.0, 8192, False, ())
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](tf.LlamaConfig(**LLAMA_3_2_1B), "cpu")
    assert torch.equal(rope_inv_freq(cfg, cfg.rope_theta, scaled=True), expected)


def test_qwen3_config():
    cfg = config_from_hf(QWEN3_0_6B)
    assert (cfg.family, cfg.head_dim, cfg.n_heads * cfg.head_dim, cfg.emb_dim) == ("qwen3", 128, 2048, 1024)
    assert cfg.qk_norm and not cfg.norm_unit_offset and cfg.rope_theta == 1e6 and cfg.sliding_window is None
    assert cfg.extra == {"bos_token_id": 151643, "eos_token_id": 151645}


def test_gemma3_config_layer_pattern_matches_transformers():
    cfg = config_from_hf(GEMMA_3_1B)
    assert list(cfg.layer_types) == tf.Gemma3TextConfig(**GEMMA_3_1B).layer_types
    assert cfg.layer_types[:6] == ("sliding_attention",) * 5 + ("full_attention",)
    assert (cfg.sliding_window, cfg.local_rope_theta, cfg.rope_theta, cfg.query_pre_attn_scalar) == (
        512,
        10000.0,
        1e6,
        256.0,
    )
    assert cfg.norm_unit_offset and cfg.sandwich_norm and cfg.embed_scale and cfg.activation == "gelu_tanh"


def test_legacy_gemma_config_loads_like_transformers(tmp_path):
    """A tiny Gemma 3 saved with the published layout: both libraries read it, the logits agree."""
    directory = save_hf(hf_model("gemma3"), tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    for key in ("layer_types", "rope_parameters"):
        config.pop(key)
    config.update(
        rope_theta=1000000.0,
        rope_local_base_freq=10000.0,
        sliding_window_pattern=3,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    )
    (directory / "config.json").write_text(json.dumps(config))
    reference = tf.AutoModelForCausalLM.from_pretrained(directory).eval()
    ours = load_hf_model(directory).eval()
    assert ours.cfg.layer_types == ("sliding_attention", "sliding_attention", "full_attention")
    ids = torch.randint(0, VOCAB, (1, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids) - reference(ids).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_act": "relu"}, "activation 'relu' is not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not supported"),
        ({"num_key_value_heads": 5}, "multiple of n_kv_heads"),
    ],
)
def test_unsupported_config_values_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        config_from_hf({**LLAMA_3_2_1B, **change})


def test_config_round_trips_through_dict():
    cfg = config_from_hf(GEMMA_3_1B)
    assert DecoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
