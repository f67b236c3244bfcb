"""Tiny random Llama 3.2 / Qwen3 / Gemma 3 checkpoints, written by transformers itself.

Every parameter (norm weights included) is drawn at random, so a mix-up of Gemma's ``1 + w``
norm, a transposed projection or a swapped norm shows up in the logits.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 96


def hf_config(family: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, max_position_embeddings=64,
                  eos_token_id=None, bos_token_id=None, pad_token_id=None)
    if family == "llama":
        # llama3 RoPE scaling with an original context of 16: with head_dim 8 one frequency falls in
        # the blended band, two are divided by the factor and one is left alone.
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        return tf.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              rope_parameters=rope, tie_word_embeddings=False, **common)
    if family == "qwen3":
        return tf.Qwen3Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                              tie_word_embeddings=True, **common)
    if family == "gemma3":
        rope = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
        return tf.Gemma3TextConfig(num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   query_pre_attn_scalar=12, sliding_window=4,
                                   layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                   rope_parameters=rope, final_logit_softcapping=5.0, **common)
    raise ValueError(family)


def hf_model(family: str, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    classes = {"llama": tf.LlamaForCausalLM, "qwen3": tf.Qwen3ForCausalLM, "gemma3": tf.Gemma3ForCausalLM}
    model = classes[family](hf_config(family)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def save_hf(model, directory: Path, *, shard: bool = False, dtype: torch.dtype | None = None) -> Path:
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(directory, max_shard_size="20KB" if shard else "5GB")
    return directory
