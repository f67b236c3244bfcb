"""Tiny random Llama 3.2 / Qwen3 / Gemma 3 checkpoints, written by transformers itself.

Every parameter (norm weights included) is drawn at random, so a mix-up of Gemma's ``1 + w``
norm, a transposed projection or a swapped norm shows up in the logits.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 96


def hf_config(family: str, vocab: int = VOCAB):
    import transformers as tf

    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        max_position_embeddings=64,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    if family == "llama":
        # llama3 RoPE scaling with an original context of 16: with head_dim 8 one frequency falls in
        # the blended band, two are divided by the factor and one is left alone.
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
        return tf.LlamaConfig(
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters=rope,
            tie_word_embeddings=False,
            **common,
        )
    if family == "qwen3":
        return tf.Qwen3Config(
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=True,
            **common,
        )
    if family == "gemma3":
        rope = {
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        }
        return tf.Gemma3TextConfig(
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            query_pre_attn_scalar=12,
            sliding_window=4,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters=rope,
            final_logit_softcapping=5.0,
            **common,
        )
    raise ValueError(family)


def hf_model(family: str, seed: int = 0, vocab: int = VOCAB):
    import transformers as tf

    torch.manual_seed(seed)
    classes = {"llama": tf.LlamaForCausalLM, "qwen3": tf.Qwen3ForCausalLM, "gemma3": tf.Gemma3ForCausalLM}
    model = classes[family](hf_config(family, vocab)).eval()
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


TOKENIZER_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Spam: win a free prize now! Reply YES.",
    "Hello there, how are you today? Fine, thanks; and you?",
    "Numbers 12345 and ünïcödé text.",
] * 20
SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
# Qwen3's ChatML shape (system prompt optional, generation prompt opens the assistant turn).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# Qwen3's shape for the final answer: an empty think block before it (the lead a prompt leaves out).
CHATML_THINK = (
    "{% for message in messages %}{% if message['role'] == 'assistant' and loop.last %}"
    "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + message['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama 3's shape: a bos token, header ids, trimmed contents, <|eot_id|> ending each turn.
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Gemma 3's shape: the assistant is "model", <end_of_turn> and a newline end each turn.
GEMMA3 = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# Per family: the template, the extra special tokens and the special-token settings of its tokenizer
# (Llama 3.2's base ends text with <|end_of_text|>, not the turn's <|eot_id|>).
CHAT_TOKENIZERS = {
    "qwen3": (CHATML_THINK, ["<think>", "</think>"], {"eos_token": "<|im_end|>"}),
    "llama": (LLAMA3, ["<|end_of_text|>"], {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}),
    "gemma3": (
        GEMMA3,
        ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"],
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
    ),
}


def train_tokenizer(vocab_size: int = 300, extra_special: tuple[str, ...] | list[str] = ()):
    """A byte-level BPE tokenizer trained with Hugging Face `tokenizers` on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        TOKENIZER_TEXT,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[*SPECIAL_TOKENS, *extra_special],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return tok


def save_family_tokenizer(directory: Path, family: str):
    """transformers' fast tokenizer around ``train_tokenizer`` in the family's chat-template shape."""
    import transformers as tf

    template, extra, special = CHAT_TOKENIZERS[family]
    hf = tf.PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(extra_special=extra), **special)
    hf.chat_template = template
    hf.save_pretrained(directory)
    return hf


def save_chatml_tokenizer(directory: Path):
    """transformers' fast tokenizer around ``train_tokenizer``, ChatML template, eos <|im_end|>."""
    import transformers as tf

    hf = tf.PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(), eos_token="<|im_end|>")
    hf.chat_template = CHATML
    hf.save_pretrained(directory)
    return hf
