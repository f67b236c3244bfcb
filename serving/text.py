"""Text in and out of the generator: chat messages as a prompt, tokens back as text with stop strings.

A token may be part of a multi-byte character, so token bytes go through an incremental UTF-8
decoder. OpenAI's ``stop`` strings are not part of the answer, and a streamed answer cannot take
back text already sent, so text that might be the start of a stop string is held back until the
next tokens show whether it is one.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from llmcore.prompts import CHAT_STYLES, chat_prompt

PROMPT_STYLES = CHAT_STYLES  # every style llmcore prompts a model in


class PromptError(ValueError):
    """Chat messages that cannot be rendered as a prompt (answered as a 400)."""


def render_chat(messages: Sequence[tuple[str, str]], style: str = "alpaca", tokenizer=None) -> str:
    """The prompt for (role, content) messages in the model's style (``llmcore.prompts.chat_prompt``:
    alpaca, phi3, plain); ``template`` (a Llama/Qwen3/Gemma base): the tokenizer's own chat
    template, generation prompt on."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
    if not messages:
        raise PromptError("messages must not be empty")
    if style == "template":
        if not getattr(tokenizer, "chat_template", None):
            raise PromptError("this model's tokenizer has no chat template")
        try:
            return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages])
        except Exception as exc:  # a template's raise_exception (e.g. "roles must alternate") is the caller's error
            raise PromptError(f"the chat template refused these messages: {exc}") from exc
    try:
        return chat_prompt(messages, style)
    except ValueError as exc:
        raise PromptError(str(exc)) from exc


class TextStream:
    """One answer's tokens as text pieces safe to send, ending at the first stop string."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.sent = 0  # characters of ``text`` already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Text that can be sent now that ``token`` arrived; sets ``stopped`` at a stop string."""
        self.text += self.decoder.decode(self.tokenizer.decode_single_token_bytes(token))
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._take(min(hits))
        return self._take(len(self.text) - self._held_back())

    def finish(self) -> str:
        """The rest of the text, when generation ends without a stop string."""
        if self.stopped:
            return ""
        self.text += self.decoder.decode(b"", final=True)
        return self._take(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest unsent suffix that begins some stop string."""
        unsent = self.text[self.sent :]
        return max(
            (k for s in self.stops for k in range(min(len(s) - 1, len(unsent)), 0, -1) if unsent.endswith(s[:k])),
            default=0,
        )

    def _take(self, end: int) -> str:
        piece, self.sent = self.text[self.sent : end], max(self.sent, end)
        return piece
