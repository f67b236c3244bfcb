"""The wire format: pydantic models of the requests (OpenAI's, and classification) and the JSON answered.

Types are strict, as OpenAI's API is (``"max_tokens": "5"`` is an error, not 5); fields this server
does not implement are ignored, except ``n`` > 1, which would silently return fewer answers.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingRequest(Strict):
    model: str | None = None  # None: the one generator served
    max_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default; 0 is greedy
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, gt=0)  # not OpenAI's; as `llm generate --top-k`
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences")
        return stop

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return prompt

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, gt=0)  # the newer name of max_tokens

    def budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class DataFrameSplit(Strict):
    columns: list[str]
    data: list[list[str]]


class ClassifyRequest(Strict):
    """``input`` (a text or a list), or one of MLflow's scoring-server forms with a ``text`` column."""

    model: str | None = None
    input: str | list[str] | None = None
    dataframe_split: DataFrameSplit | None = None
    dataframe_records: list[dict[str, str]] | None = None
    inputs: dict[str, list[str]] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> ClassifyRequest:
        given = [f for f in ("input", "dataframe_split", "dataframe_records", "inputs") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of input, dataframe_split, dataframe_records, inputs (got {given or 'none'})"
            )
        return self

    def texts(self) -> list[str]:
        """The texts to classify; ValueError when a form lacks its ``text`` column."""
        if self.input is not None:
            return [self.input] if isinstance(self.input, str) else self.input
        if self.dataframe_split is not None:
            columns, rows = self.dataframe_split.columns, self.dataframe_split.data
            if "text" not in columns or any(len(row) != len(columns) for row in rows):
                raise ValueError(f"dataframe_split needs a 'text' column and rows of {len(columns)} values")
            return [row[columns.index("text")] for row in rows]
        if self.dataframe_records is not None:
            if any("text" not in record for record in self.dataframe_records):
                raise ValueError("every record of dataframe_records needs a 'text' field")
            return [record["text"] for record in self.dataframe_records]
        if "text" not in self.inputs:
            raise ValueError(f"inputs needs a 'text' column, got {sorted(self.inputs)}")
        return self.inputs["text"]


class Reply:
    """The JSON of one answer, whole or as stream chunks: ``chat`` (chat.completion) or text_completion."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _envelope(self, kind: str, choices: list[dict], **extra) -> dict:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def whole(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
        choice = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        kind = "chat.completion" if self.chat else "text_completion"
        return self._envelope(kind, [choice], usage=usage(prompt_tokens, completion_tokens))

    def chunk(self, text: str | None, finish_reason: str | None = None, *, first: bool = False) -> dict:
        choice: dict = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice])

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(kind, [], usage=usage(prompt_tokens, completion_tokens))


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
