"""A model directory's tokenizer.json and chat template, against transformers' own tokenizer."""

from __future__ import annotations

import json

import pytest

from llmcore.hf_tokenizer import HFTokenizer, TokenizerConfigError
from tests.bases_helpers import CHATML, train_tokenizer

tf = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# Llama 3's shape: bos_token first, header ids, trimmed content, a date from strftime_now, a tojson filter.
LLAMA3 = (
    "{{ bos_token }}{% set date = strftime_now('%Y') %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}{{ '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{{ 'Year ' + date + ' ' + ({'k': 'ü'} | tojson) + '<|eot_id|>' }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "  Is this spam? Win now!  "},
    {"role": "assistant", "content": "Yes."},
    {"role": "user", "content": "And this: see you at 5?"},
]


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def saved(request, tmp_path_factory):
    tok = train_tokenizer()
    chatml = request.param == "chatml"
    hf = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>" if chatml else "<|eot_id|>",
        bos_token=None if chatml else "<|begin_of_text|>",
    )
    hf.chat_template = CHATML if chatml else LLAMA3
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory)
    return hf, HFTokenizer(directory)


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_renders_as_transformers(saved, generation_prompt):
    hf, ours = saved
    expected = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=generation_prompt)
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt=generation_prompt) == expected
    ids = hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=generation_prompt)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ours.chat_ids(MESSAGES, add_generation_prompt=generation_prompt) == list(ids)


def test_encode_decode_and_special_tokens_match_transformers(saved):
    hf, ours = saved
    text = "Win a free prize <|im_end|> now, ünïcödé!"
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text)) == hf.decode(
        hf.encode(text, add_special_tokens=False), skip_special_tokens=True
    )
    assert ours.n_vocab == len(hf)
    assert ours.eos_id == hf.eos_token_id and ours.special_tokens["eos_token"] == hf.eos_token


def test_generation_config_adds_eos_ids(saved, tmp_path):
    hf, _ = saved
    hf.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [hf.eos_token_id, 7]}))
    assert HFTokenizer(tmp_path).eos_ids == [hf.eos_token_id, 7]


def test_missing_files_and_templates_are_named(tmp_path):
    with pytest.raises(TokenizerConfigError, match="has no tokenizer.json"):
        HFTokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerConfigError, match="tokenizer.json: unreadable tokenizer"):
        HFTokenizer(tmp_path)


def test_template_errors_are_named(saved, tmp_path):
    hf, _ = saved
    hf.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerConfigError, match="no chat_template"):
        HFTokenizer(tmp_path).apply_chat_template(MESSAGES)


def test_stream_decode_pieces_join_to_the_decoded_text(saved):
    _, ours = saved
    ids = ours.encode("Numbers 12345 and ünïcödé text.<|im_end|> fox")
    pieces = list(ours.stream_decode(ids))
    assert "".join(pieces) == ours.decode(ids) and len(pieces) > 1
    assert not any("\ufffd" in piece for piece in pieces)


def test_token_bytes_concatenate_to_the_text(saved):
    _, ours = saved
    text = "Numbers 12345 and ünïcödé text.<|im_end|> fox"
    ids = ours.encode(text)
    assert b"".join(ours.decode_single_token_bytes(t) for t in ids).decode("utf-8") == text
