"""The GPT-2 tokenizer built offline from the mirror's encoder.json + vocab.bpe."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from llmcore.tokenizer import ENCODING_DIR_ENV, ENDOFTEXT_ID, TokenizerFilesError, encode, get_tokenizer

BOOK_TEXT = "Hello, do you like tea? <|endoftext|> In the sunlit terraces"
BOOK_IDS = [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114]


def test_the_verdict_has_5145_tokens(tokenizer, mirror: Path) -> None:
    text = (mirror / "the-verdict.txt").read_text(encoding="utf-8")
    assert len(encode(tokenizer, text)) == 5145


def test_book_example_ids_and_endoftext(tokenizer) -> None:
    ids = encode(tokenizer, BOOK_TEXT)
    assert ids == BOOK_IDS
    assert ids[8] == ENDOFTEXT_ID
    assert tokenizer.n_vocab == 50257


def test_decode_round_trip(tokenizer) -> None:
    text = "Akwirw ier, naïve café 1234 — <|endoftext|> done.\n\n  spaces"
    assert tokenizer.decode(encode(tokenizer, text)) == text


def test_encoding_dir_from_environment(monkeypatch: pytest.MonkeyPatch, gpt2_encoding_dir: Path) -> None:
    monkeypatch.setenv(ENCODING_DIR_ENV, str(gpt2_encoding_dir))
    assert encode(get_tokenizer(), BOOK_TEXT) == BOOK_IDS


def test_directory_missing_vocab_bpe_is_named(tmp_path: Path, gpt2_encoding_dir: Path) -> None:
    shutil.copy(gpt2_encoding_dir / "encoder.json", tmp_path / "encoder.json")
    with pytest.raises(TokenizerFilesError, match="vocab.bpe"):
        get_tokenizer(tmp_path)


def test_missing_directory_from_environment_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENCODING_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(TokenizerFilesError, match="nowhere"):
        get_tokenizer()


def test_tampered_vocab_is_rejected_by_size(tmp_path: Path, gpt2_encoding_dir: Path) -> None:
    shutil.copy(gpt2_encoding_dir / "encoder.json", tmp_path / "encoder.json")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\nĠ t\n", encoding="utf-8")
    with pytest.raises(
        TokenizerFilesError,
        match=rf"^{tmp_path / 'vocab.bpe'} is 19 bytes, GPT-2's vocab.bpe is "
        r"456,318 \(truncated or another file\): copy it again$",
    ):
        get_tokenizer(tmp_path)


def test_a_truncated_or_altered_file_is_named_not_called_a_download(tmp_path: Path, gpt2_encoding_dir: Path) -> None:
    shutil.copy(gpt2_encoding_dir / "encoder.json", tmp_path / "encoder.json")
    data = (gpt2_encoding_dir / "vocab.bpe").read_bytes()
    (tmp_path / "vocab.bpe").write_bytes(data[: len(data) // 2])
    with pytest.raises(TokenizerFilesError) as caught:
        get_tokenizer(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / 'vocab.bpe'} is 228,159 bytes") and "download" not in str(
        caught.value
    )
    (tmp_path / "vocab.bpe").write_bytes(data[:-2] + b"xx")  # same size, other bytes
    from llmcore.tokenizer import _encoding_from_dir

    _encoding_from_dir.cache_clear()
    with pytest.raises(TokenizerFilesError, match=r"vocab\.bpe has sha256 [0-9a-f]{16}\.\.\., not GPT-2's vocab\.bpe"):
        get_tokenizer(tmp_path)
