"""GPT-2 BPE tokenizer through tiktoken, buildable offline from encoder.json + vocab.bpe; or a
BPE trained on your corpus (``llmcore.bpe``), from the directory holding its files.

tiktoken's own ``get_encoding("gpt2")`` downloads both files on first use. Pointing
``LLMCORE_GPT2_ENCODING_DIR`` (or the ``encoding_dir`` argument) at a directory holding them
builds the identical encoding with no network access.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from llmcore.bpe import TRAINED_FILES, EncodingFileError, is_trained_dir, load_encoding

ENCODING_DIR_ENV = "LLMCORE_GPT2_ENCODING_DIR"
ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 50256
GPT2_FILES = ("encoder.json", "vocab.bpe")
# The sha256 of OpenAI's published files; a local copy must match them byte for byte.
GPT2_FILE_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
GPT2_FILE_BYTES = {"vocab.bpe": 456_318, "encoder.json": 1_042_301}
# GPT-2's pre-tokenisation pattern (the same string tiktoken uses for "gpt2"/"r50k_base").
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class TokenizerFilesError(FileNotFoundError):
    """The encoding directory lacks a file the GPT-2 encoding needs, or holds one that is not GPT-2's."""


def check_gpt2_files(root: Path) -> None:
    """Each GPT-2 file in ``root`` present and byte-identical to OpenAI's (size, then sha256), else
    a TokenizerFilesError naming the file: tiktoken would call a truncated copy a corrupted download."""
    if not root.is_dir():
        raise TokenizerFilesError(f"GPT-2 encoding directory {root} does not exist")
    for name in GPT2_FILES:
        path = root / name
        if not path.is_file():
            raise TokenizerFilesError(
                f"{path} not found: the GPT-2 encoding needs {' and '.join(GPT2_FILES)} in {root}"
            )
        size = path.stat().st_size
        if size != GPT2_FILE_BYTES[name]:
            raise TokenizerFilesError(
                f"{path} is {size:,} bytes, GPT-2's {name} is {GPT2_FILE_BYTES[name]:,} "
                "(truncated or another file): copy it again"
            )
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != GPT2_FILE_SHA256[name]:
            raise TokenizerFilesError(
                f"{path} has sha256 {digest[:16]}..., not GPT-2's {name} "
                f"({GPT2_FILE_SHA256[name][:16]}...): copy it again"
            )


def get_tokenizer(encoding_dir: str | os.PathLike | None = None) -> tiktoken.Encoding:
    """A trained encoding when ``encoding_dir`` holds one (``llmcore.bpe``: bpe.tiktoken +
    encoding.json); else GPT-2's: from ``encoding_dir``, else ``$LLMCORE_GPT2_ENCODING_DIR``, else tiktoken."""
    if is_trained_dir(encoding_dir):
        root = Path(encoding_dir).resolve()
        # cached per directory and file versions: rewritten files (a new training) are read again
        stamp = tuple(
            (s.st_mtime_ns, s.st_size) if (p := root / name).is_file() and (s := p.stat()) else None
            for name in TRAINED_FILES
        )
        return _trained_from_dir(str(root), stamp)
    directory = encoding_dir if encoding_dir is not None else os.environ.get(ENCODING_DIR_ENV)
    if not directory:
        return tiktoken.get_encoding("gpt2")
    return _encoding_from_dir(str(Path(directory).resolve()))


@functools.lru_cache(maxsize=4)
def _trained_from_dir(directory: str, stamp: tuple) -> tiktoken.Encoding:
    try:
        return load_encoding(directory)
    except EncodingFileError as exc:
        raise TokenizerFilesError(str(exc)) from exc


def is_gpt2(tokenizer) -> bool:
    """Whether ``tokenizer`` is GPT-2's BPE (the ids of GPT-2's weights), not a trained vocabulary."""
    return getattr(tokenizer, "name", None) in ("gpt2", "r50k_base")


@functools.lru_cache(maxsize=4)
def _encoding_from_dir(directory: str) -> tiktoken.Encoding:
    root = Path(directory)
    check_gpt2_files(root)
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(root / "vocab.bpe"),
        encoder_json_file=str(root / "encoder.json"),
        vocab_bpe_hash=GPT2_FILE_SHA256["vocab.bpe"],
        encoder_json_hash=GPT2_FILE_SHA256["encoder.json"],
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=_GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: ENDOFTEXT_ID},
    )


def eot_id(tokenizer) -> int:
    """The id of ``<|endoftext|>`` in ``tokenizer`` (50256 in GPT-2's; after the merges in a trained one);
    a Hugging Face base's tokenizer (``llmcore.hf_tokenizer``): its end-of-sequence id."""
    if hasattr(tokenizer, "eos_ids") and tokenizer.eos_id is not None:
        return tokenizer.eos_id
    try:
        return tokenizer.eot_token
    except (AttributeError, KeyError):
        return ENDOFTEXT_ID


def encode(tokenizer: tiktoken.Encoding, text: str) -> list[int]:
    """Encode text, letting ``<|endoftext|>`` through as its special id (as the book does); a trained
    encoding's other special tokens (chat markers) in text are plain text, as they are to GPT-2."""
    if isinstance(tokenizer, tiktoken.Encoding):
        return tokenizer.encode(text, allowed_special={ENDOFTEXT}, disallowed_special=())
    return tokenizer.encode(text, allowed_special={ENDOFTEXT})  # a Hugging Face base's (llmcore.hf_tokenizer)


def tokenizer_digest(tokenizer: tiktoken.Encoding) -> str:
    """sha256 of what fixes the token ids: the encoding's name, every token's bytes in id order
    (tiktoken merges by rank, which is the id) and the special tokens."""
    digest = hashlib.sha256(tokenizer.name.encode())
    for token in range(tokenizer.n_vocab):
        try:
            digest.update(len(piece := tokenizer.decode_single_token_bytes(token)).to_bytes(4, "little") + piece)
        except KeyError:  # an id without a token (a gap some encodings have)
            digest.update(b"\xff\xff\xff\xff")
    digest.update(json.dumps(sorted(tokenizer.special_tokens_set)).encode())
    return digest.hexdigest()
