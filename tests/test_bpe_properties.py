"""Property tests of a trained BPE's tiktoken encoding (hypothesis): any text and any bytes survive
encode/decode, and plain text never yields a special token."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmcore.bpe import ENDOFTEXT, chunks, to_tiktoken, train_bpe

SPECIALS = [ENDOFTEXT, "<|user|>", "<|assistant|>"]


@pytest.fixture(scope="module")
def small_encoding(mirror: Path):
    text = (mirror / "the-verdict.txt").read_text()
    return to_tiktoken(train_bpe(chunks([text], 1024), 600, "gpt4", SPECIALS), "gpt4")


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300))
def test_round_trip_of_arbitrary_text(small_encoding, text: str):
    ids = small_encoding.encode_ordinary(text)
    assert small_encoding.decode(ids) == text
    assert max(ids, default=0) < small_encoding.n_vocab - len(SPECIALS)  # never a special id


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300))
def test_round_trip_of_arbitrary_bytes(small_encoding, data: bytes):
    """Any byte string (each byte as one character, so invalid UTF-8 too) decodes back from its
    tokens, and the tokens' bytes concatenate to the text's UTF-8."""
    text = data.decode("latin-1")
    ids = small_encoding.encode_ordinary(text)
    assert small_encoding.decode(ids).encode("latin-1") == data
    assert small_encoding.decode_bytes(ids) == text.encode()
