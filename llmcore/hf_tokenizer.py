"""The tokenizer and chat template a Hugging Face model directory carries, read offline.

``tokenizer.json`` goes through Hugging Face's ``tokenizers`` (the fast tokenizer transformers
wraps); ``tokenizer_config.json`` (or ``chat_template.jinja``) gives the chat template and the
special tokens. The template is rendered with jinja2 the way transformers' ``apply_chat_template``
renders it: a sandboxed environment with ``trim_blocks`` and ``lstrip_blocks``, loop controls,
a ``tojson`` that keeps non-ASCII text, ``raise_exception`` and ``strftime_now``, and the special
tokens (``bos_token``, ``eos_token``, ...) as variables next to ``messages`` and
``add_generation_prompt``. The end-of-sequence ids are the tokenizer's eos token plus any
``eos_token_id`` of ``generation_config.json`` (Llama 3 and Qwen3 stop on several).

The object answers ``encode`` / ``decode`` / ``n_vocab`` like the GPT-2 tiktoken encoding, so
llmcore.generate's ``generate_text`` works with either.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from llmcore.bpe import byte_decoder
from llmcore.tokenizer import get_tokenizer

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


_BYTE_DECODER = byte_decoder()


class TokenizerConfigError(ValueError):
    """A model directory's tokenizer files are missing or unreadable (names the file)."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TokenizerConfigError(f"{path}: unreadable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerConfigError(f"{path}: not a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


@functools.lru_cache(maxsize=8)
def _compile_template(source: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class HFTokenizer:
    """A model directory's tokenizer.json, special tokens and chat template."""

    def __init__(self, directory: str | os.PathLike):
        from tokenizers import Tokenizer  # deferred: only models with a tokenizer.json need it

        root = Path(directory)
        path = root / "tokenizer.json"
        if not path.is_file():
            raise TokenizerConfigError(f"model directory {root} has no tokenizer.json")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise TokenizerConfigError(f"{path}: unreadable tokenizer: {exc}") from exc
        config = _read_json(root / "tokenizer_config.json")
        special_map = _read_json(root / "special_tokens_map.json")
        self.special_tokens = {
            key: text
            for key in SPECIAL_TOKEN_KEYS
            if (text := _token_text(config.get(key, special_map.get(key)))) is not None
        }
        self.chat_template = self._find_template(root, config)
        self.name = root.name
        self.eos_ids = self._eos_ids(root)
        added = self._tok.get_added_tokens_decoder()
        self._added = {i: t.content for i, t in added.items()}
        self.special_ids = {t.content: i for i, t in added.items() if t.special}  # control tokens (<|im_end|>)
        self.added_ids = {t.content: i for i, t in added.items()}  # those and other added ones (Qwen3's <think>)
        self._byte_level = "ByteLevel" in json.dumps(json.loads(path.read_text(encoding="utf-8")).get("decoder"))

    @staticmethod
    def _find_template(root: Path, config: dict[str, Any]) -> str | None:
        if (root / "chat_template.jinja").is_file():
            return (root / "chat_template.jinja").read_text(encoding="utf-8")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the "default" one is the chat template
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template

    def _eos_ids(self, root: Path) -> list[int]:
        ids: list[int] = []
        eos = self.special_tokens.get("eos_token")
        if eos is not None and (eos_id := self._tok.token_to_id(eos)) is not None:
            ids.append(eos_id)
        generation = _read_json(root / "generation_config.json").get("eos_token_id")
        for extra in generation if isinstance(generation, list) else [generation]:
            if isinstance(extra, int) and extra not in ids:
                ids.append(extra)
        return ids

    @property
    def n_vocab(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int | None:
        """The first end-of-sequence id (generation stops on it)."""
        return self.eos_ids[0] if self.eos_ids else None

    def encode(self, text: str, add_special_tokens: bool = False, allowed_special=None) -> list[int]:
        """Token ids; special-token text (``<|im_end|>``) maps to its id. ``add_special_tokens``
        applies the tokenizer's post-processor (e.g. Llama's leading <|begin_of_text|>).
        ``allowed_special`` (tiktoken's keyword, which llmcore.tokenizer.encode passes) is accepted
        and has no effect: every special token's text is always its id here."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_single_token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (as tiktoken's method of that name), so byte-wise UTF-8
        streaming works: byte-level BPE pieces (Llama 3, Qwen3) map back through GPT-2's byte
        alphabet; SentencePiece-style pieces (Gemma) turn ``▁`` into a space and ``<0xNN>`` into
        that byte; added (special) tokens are their text; an id the tokenizer lacks, nothing (as
        ``decode`` skips it)."""
        added = self._added.get(token)
        if added is not None:
            return added.encode("utf-8")
        piece = self._tok.id_to_token(token)
        if piece is None:  # a model's padded vocabulary rows (Qwen3: 151,936 > the tokenizer's 151,669)
            return b""
        if self._byte_level:
            return bytes(_BYTE_DECODER[ch] for ch in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The conversation rendered as transformers' ``apply_chat_template(..., tokenize=False)``."""
        if not self.chat_template:
            raise TokenizerConfigError(f"tokenizer {self.name}: tokenizer_config.json has no chat_template")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message:
                raise TokenizerConfigError(f"chat message {i} needs a 'role' (and 'content'), got {message!r}")
        variables = {**self.special_tokens, **kwargs}
        return _compile_template(self.chat_template).render(
            messages=[dict(m) for m in messages],
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )

    def chat_ids(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> list[int]:
        """The rendered conversation's token ids (as ``apply_chat_template(tokenize=True)``: the
        template writes the special tokens itself, none are added)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt))

    def stream_decode(self, token_ids) -> Iterator[str]:
        """Text pieces as token ids arrive (special tokens skipped); a piece that ends inside a
        multi-byte character (decoded as U+FFFD) waits for the next token."""
        ids: list[int] = []
        shown = ""
        for token in token_ids:
            ids.append(int(token))
            text = self.decode(ids)
            if text.endswith("\ufffd"):
                continue
            if text.startswith(shown):
                piece, shown = text[len(shown) :], text
                if piece:
                    yield piece
        text = self.decode(ids)
        if text.startswith(shown) and text[len(shown) :]:
            yield text[len(shown) :]


def carried_tokenizer(model_dir: str | os.PathLike, encoding_dir: str | os.PathLike | None = None):
    """The tokenizer a model directory carries when it is a Hugging Face base's (its
    tokenizer.json); else ``get_tokenizer(encoding_dir)`` (GPT-2's or a trained BPE)."""
    if (Path(model_dir) / "tokenizer.json").is_file():
        return HFTokenizer(model_dir)
    return get_tokenizer(encoding_dir)
