"""Your own BPE: the trained tiktoken encoding against the trainer's encoder, its files, the stage,
and the downstream checks (vocabulary size, a GPT-2-vocab base refused)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmcore.bpe import ENDOFTEXT, META_FILE, chunks, load_encoding, save_encoding, to_tiktoken, train_bpe
from llmcore.tokenizer import TokenizerFilesError, encode, eot_id, get_tokenizer, is_gpt2

SPECIALS = [ENDOFTEXT, "<|user|>", "<|assistant|>"]


@pytest.fixture(scope="module")
def shakespeare(mirror: Path) -> str:
    return (mirror / "tinyshakespeare.txt").read_text()


@pytest.fixture(scope="module", params=["gpt2", "gpt4"])
def trained(request, shakespeare: str):
    """(pattern, trainer's tokenizer, tiktoken encoding): 2,048 tokens on tinyshakespeare's first 600 KB."""
    hf = train_bpe(chunks([shakespeare[:600_000]], 1024), 2048, request.param, SPECIALS)
    return request.param, hf, to_tiktoken(hf, request.param)


def test_ids_equal_the_trainers_encoder_on_held_out_text(trained, shakespeare: str):
    _, hf, encoding = trained
    held_out = shakespeare[600_000:]  # text the merges were not learned from
    ours = encoding.encode_ordinary(held_out)
    assert ours == hf.encode(held_out).ids
    assert encoding.decode(ours) == held_out


def test_vocabulary_and_special_ids(trained):
    _, _, encoding = trained
    assert encoding.n_vocab == 2048
    # the special tokens come after the 256 bytes and the merges, <|endoftext|> first
    assert [encoding.encode_single_token(t) for t in SPECIALS] == [2045, 2046, 2047]
    assert eot_id(encoding) == 2045
    assert not is_gpt2(encoding)


def test_plain_text_never_yields_a_special_token(trained):
    _, _, encoding = trained
    text = f"a {ENDOFTEXT} b <|user|>hi<|assistant|>"
    ids = encoding.encode_ordinary(text)
    assert not set(ids) & {encoding.encode_single_token(t) for t in SPECIALS}
    assert encoding.decode(ids) == text
    ids = encode(encoding, text)  # what every stage calls: <|endoftext|> special, the chat markers plain
    assert ids.count(eot_id(encoding)) == 1
    assert not set(ids) & {encoding.encode_single_token(t) for t in SPECIALS[1:]}
    assert encoding.decode(ids) == text


def test_files_round_trip_and_are_checked(trained, tmp_path: Path, shakespeare: str):
    _, _, encoding = trained
    save_encoding(encoding, tmp_path)
    loaded = get_tokenizer(tmp_path)
    sample = shakespeare[:20_000]
    assert loaded.encode_ordinary(sample) == encoding.encode_ordinary(sample)
    assert loaded.special_tokens_set == encoding.special_tokens_set
    (tmp_path / "bpe.tiktoken").write_text((tmp_path / "bpe.tiktoken").read_text()[:-40])
    with pytest.raises(ValueError, match="sha256"):
        load_encoding(tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    del meta["pat_str"]
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(TokenizerFilesError, match="encoding.json"):
        get_tokenizer(tmp_path)


def test_too_small_a_vocabulary_is_an_error():
    with pytest.raises(ValueError, match="at least 256"):
        train_bpe(["abc"], 258, "gpt2", SPECIALS)


def test_a_base_model_must_share_the_pipelines_tokenizer(trained, tokenizer, tmp_path: Path):
    """GPT-2's weights (no trained files beside them) with a trained vocabulary, a trained model
    with GPT-2's BPE or with another trained vocabulary: each a one-line BaseModelError."""
    from llmpipe.models import BaseModelError, check_base_tokenizer

    _, _, encoding = trained
    gpt2_dir, ours = tmp_path / "gpt2", tmp_path / "ours"
    gpt2_dir.mkdir(), ours.mkdir()
    save_encoding(encoding, ours)
    check_base_tokenizer(gpt2_dir, tokenizer, 50257)
    check_base_tokenizer(ours, get_tokenizer(ours), 2048)
    with pytest.raises(BaseModelError, match="GPT-2's BPE, but the pipeline encodes with a trained BPE"):
        check_base_tokenizer(gpt2_dir, encoding, 50257)
    with pytest.raises(BaseModelError, match="trained encoding .* but the pipeline encodes with GPT-2"):
        check_base_tokenizer(ours, tokenizer, 50257)
    other = to_tiktoken(train_bpe(["one two three " * 50], 300, "gpt2", SPECIALS), "gpt2")
    with pytest.raises(BaseModelError, match="trained encoding"):
        check_base_tokenizer(ours, other, 2048)
    with pytest.raises(BaseModelError, match="1000 token rows, the tokenizer 2048"):
        check_base_tokenizer(ours, encoding, 1000)


def test_pretrain_sizes_the_vocabulary_from_a_trained_tokenizer(trained, tokenizer):
    from llmcore.config import GPTConfig
    from steps.pretrain import vocab_for

    _, _, encoding = trained
    preset = GPTConfig(context_length=32, emb_dim=64, n_heads=2, n_layers=2)
    assert vocab_for(preset, tokenizer, None) == preset  # GPT-2's BPE: the book's 50,257 rows
    ours = vocab_for(preset, encoding, None)
    assert (ours.vocab_size, ours.padded_vocab_size) == (2048, 2048)
    assert (
        vocab_for(
            preset, to_tiktoken(train_bpe(["one two three " * 50], 300, "gpt2", SPECIALS), "gpt2"), None
        ).padded_vocab_size
        == 320
    )
