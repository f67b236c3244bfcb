"""``POST /v1/completions`` and ``POST /v1/chat/completions``: OpenAI's wire format over the engine.

A request is validated (model, prompt length against the context, ``max_tokens`` against the
server's cap) before it reaches the engine, so the engine only sees work it can finish. With
``stream: true`` the answer is server-sent events, one chunk per piece of text (the text the
engine made since the last chunk: a token, or several when the client reads slower), ending with
``data: [DONE]``; a client that disconnects cancels its generation (Starlette cancels the
response, which closes the engine's event stream).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from llmcore.tokenizer import encode, eot_id
from serving.engine import EngineBusy, Request, SamplingParams
from serving.errors import APIError, error_body
from serving.models import GENERATOR, Served
from serving.schemas import ChatRequest, CompletionRequest, Reply, SamplingRequest
from serving.text import PromptError, render_chat

if TYPE_CHECKING:
    from serving.app import ServeState


# Shorter texts are rendered and tokenized on the event loop (well under a millisecond); longer
# ones in a worker thread, so that /health and the streams keep going. The hop to a worker costs
# more than a short prompt's tokenization, and it delays every request's admission.
INLINE_CHARS = 4_000


async def off_the_loop_if_long(chars: int, fn, *args):
    """``fn(*args)``, in a worker thread when it works on more than ``INLINE_CHARS`` characters."""
    return fn(*args) if chars <= INLINE_CHARS else await run_in_threadpool(fn, *args)


def openai_router(state: ServeState) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest):
        served = state.lookup(GENERATOR, body.model)
        return await answer(state, served, Reply(False, served.name), body.text(), body, body.max_tokens, "prompt")

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        served = state.lookup(GENERATOR, body.model)
        messages = [(m.role, m.text()) for m in body.messages]
        try:
            prompt = await off_the_loop_if_long(
                sum(len(text) for _, text in messages), render_chat, messages, served.prompt_style, served.tokenizer
            )
        except PromptError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        return await answer(state, served, Reply(True, served.name), prompt, body, body.budget(), "messages")

    return router


def completion_budget(requested: int | None, prompt_tokens: int, context: int, cap: int, param: str) -> int:
    """The tokens to generate: as asked, or what fits (at most ``cap``); a 400 when it cannot fit."""
    room = context - prompt_tokens
    if room < 1:
        raise APIError(
            400,
            f"the prompt has {prompt_tokens} tokens; this model's context is {context} tokens",
            param=param,
            code="context_length_exceeded",
        )
    if requested is None:
        return min(cap, room)
    if requested > cap:
        raise APIError(400, f"max_tokens {requested} is above this server's limit of {cap}", param="max_tokens")
    if requested > room:
        raise APIError(
            400,
            f"this model's context is {context} tokens, but {prompt_tokens + requested} were asked "
            f"for ({prompt_tokens} in the prompt, {requested} for the completion)",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


async def answer(
    state: ServeState,
    served: Served,
    reply: Reply,
    prompt: str,
    body: SamplingRequest,
    requested: int | None,
    param: str,
):
    """Submit one generation and answer it whole or as a stream."""
    ids = await off_the_loop_if_long(len(prompt), encode, served.tokenizer, prompt)
    ids = ids or [eot_id(served.tokenizer)]  # empty: <|endoftext|>
    context, cap = served.model.cfg.context_length, state.config.max_tokens
    params = SamplingParams(
        max_tokens=completion_budget(requested, len(ids), context, cap, param),
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stops(),
    )
    try:
        request = state.engine.submit(ids, params)
    except EngineBusy as exc:
        raise APIError(429, f"server busy: {exc}", code="too_many_requests", headers={"Retry-After": "1"}) from exc
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            events(reply, request, len(ids), include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    parts = []
    async for event in request.stream():
        if event.error:
            raise APIError(500, event.error)
        parts.append(event.text)
        if event.finish_reason:
            return reply.whole("".join(parts), event.finish_reason, len(ids), event.completion_tokens)


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def events(reply: Reply, request: Request, prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    """The answer as OpenAI's stream: a role chunk (chat), text chunks, a finish chunk, usage, [DONE]."""
    if reply.chat:
        yield sse(reply.chunk(None, first=True))
    completion_tokens = 0
    async for event in request.stream():
        if event.error:
            yield sse(error_body(500, event.error))
            return
        out = sse(reply.chunk(event.text)) if event.text else ""
        if event.finish_reason:  # the last text and the finish chunk: one write
            completion_tokens = event.completion_tokens
            out += sse(reply.chunk(None, event.finish_reason))
        if out:
            yield out
    tail = sse(reply.usage_chunk(prompt_tokens, completion_tokens)) if include_usage else ""
    yield tail + sse("[DONE]")
