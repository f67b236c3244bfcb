"""Your own byte-level BPE: trained with Hugging Face ``tokenizers``, encoded with tiktoken.

``train_bpe`` runs the Rust trainer of ``tokenizers`` over an iterator of texts (it keeps word
counts, not the text, so memory is bounded by the distinct pre-tokens). The pre-tokenizer is the
same regex tiktoken then uses (GPT-2's or GPT-4's), followed by the byte-level alphabet, so the
trained merges become a tiktoken encoding (``mergeable_ranks``: a token's bytes -> its id, which is
its merge order) with the ids the trainer's own encoder gives. The special tokens come after the
merges, ``<|endoftext|>`` first.

A trained encoding is two files in a directory: ``bpe.tiktoken`` (tiktoken's own format: base64
token and rank per line) and ``encoding.json`` (name, pattern, special tokens, vocabulary size,
the sha256 of ``bpe.tiktoken``). ``llmcore.tokenizer.get_tokenizer`` loads such a directory.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import tiktoken

BPE_FILE = "bpe.tiktoken"
META_FILE = "encoding.json"
TRAINED_FILES = (BPE_FILE, META_FILE)
ENDOFTEXT = "<|endoftext|>"
# tiktoken's pre-tokenization patterns: GPT-2's (r50k/p50k) and GPT-4's (cl100k_base).
PATTERNS = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
    "gpt4": (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
        r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
    ),
}


class EncodingFileError(ValueError):
    """A trained encoding directory is incomplete or its files disagree."""


def hf_tokenizer(pattern: str):
    """An untrained ``tokenizers`` BPE whose pre-tokenization is tiktoken's: ``pattern``, then bytes."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    pattern: str = "gpt2",
    special_tokens: Iterable[str] = (ENDOFTEXT,),
    min_frequency: int = 2,
):
    """Train on ``texts``; returns the ``tokenizers`` Tokenizer (special tokens added last).

    ``vocab_size`` counts everything: 256 byte tokens, the merges and the special tokens.
    """
    from tokenizers import pre_tokenizers, trainers

    specials = list(dict.fromkeys(special_tokens))
    merges_room = vocab_size - len(specials)
    if merges_room < 256:
        raise ValueError(
            f"vocab_size {vocab_size} leaves {merges_room} tokens besides the {len(specials)} "
            "special tokens: at least 256 (the bytes) are needed"
        )
    tok = hf_tokenizer(PATTERNS.get(pattern, pattern))
    trainer = trainers.BpeTrainer(
        vocab_size=merges_room,
        min_frequency=min_frequency,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(specials)
    return tok


def byte_decoder() -> dict[str, int]:
    """The byte-level alphabet's characters back to their bytes (GPT-2's bytes_to_unicode, inverted):
    how byte-level BPE vocabularies (a trained one, a Hugging Face tokenizer.json) spell bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def to_tiktoken(tok, pattern: str, name: str = "trained") -> tiktoken.Encoding:
    """The trained ``tokenizers`` BPE as a tiktoken encoding with the same ids."""
    decoder = byte_decoder()
    specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    ranks = {bytes(decoder[c] for c in piece): i for piece, i in tok.get_vocab(with_added_tokens=False).items()}
    if len(ranks) != len(tok.get_vocab(with_added_tokens=False)):
        raise EncodingFileError("two trained tokens have the same bytes")
    return tiktoken.Encoding(
        name=name, pat_str=PATTERNS.get(pattern, pattern), mergeable_ranks=ranks, special_tokens=specials
    )


def save_encoding(encoding: tiktoken.Encoding, directory: Path, extra: dict | None = None) -> None:
    """Write ``bpe.tiktoken`` + ``encoding.json`` into ``directory`` (which must exist)."""
    ranks = encoding._mergeable_ranks  # tiktoken keeps them; there is no public getter
    # tiktoken's .tiktoken format (its dump_tiktoken_bpe needs blobfile): base64 token, rank; by rank
    data = b"".join(
        base64.b64encode(token) + b" " + str(rank).encode() + b"\n"
        for token, rank in sorted(ranks.items(), key=lambda item: item[1])
    )
    (directory / BPE_FILE).write_bytes(data)
    meta = {
        "name": encoding.name,
        "pat_str": encoding._pat_str,
        "special_tokens": encoding._special_tokens,
        "n_vocab": encoding.n_vocab,
        "bpe_sha256": hashlib.sha256(data).hexdigest(),
        **(extra or {}),
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def is_trained_dir(directory: str | os.PathLike | None) -> bool:
    return bool(directory) and (Path(directory) / META_FILE).is_file()


def load_encoding(directory: str | os.PathLike) -> tiktoken.Encoding:
    """The encoding ``save_encoding`` wrote (its bpe file checked against the recorded sha256)."""
    root = Path(directory)
    meta_path, bpe_path = root / META_FILE, root / BPE_FILE
    try:
        meta = json.loads(meta_path.read_text())
        fields = {key: meta[key] for key in ("name", "pat_str", "special_tokens", "n_vocab", "bpe_sha256")}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EncodingFileError(f"{meta_path}: not a trained encoding's metadata ({exc!r})") from exc
    if not bpe_path.is_file():
        raise EncodingFileError(f"{bpe_path} not found: a trained encoding needs {' and '.join(TRAINED_FILES)}")
    data = bpe_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != fields["bpe_sha256"]:
        raise EncodingFileError(f"{bpe_path} does not match the sha256 in {meta_path}: copy both files again")
    ranks = {}
    for number, line in enumerate(data.splitlines(), 1):
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(
        name=fields["name"],
        pat_str=fields["pat_str"],
        mergeable_ranks=ranks,
        special_tokens=fields["special_tokens"],
        explicit_n_vocab=fields["n_vocab"],
    )


def chunks(texts: Iterable[str], size: int = 1 << 14) -> Iterator[str]:
    """Texts cut into pieces of about ``size`` characters at a newline (or anywhere, lacking one)."""
    for text in texts:
        start = 0
        while start < len(text):
            end = min(start + size, len(text))
            if end < len(text):
                newline = text.rfind("\n", start, end)
                end = newline + 1 if newline > start else end
            yield text[start:end]
            start = end
