"""The request body limit: a pure ASGI middleware in front of the app, so a body over the limit is
refused (413, OpenAI's error JSON) before any of it is parsed, and the event loop stays free.

A declared ``Content-Length`` over the limit is refused without reading a byte; a body without one
(chunked) is read up to the limit, and refused once past it. A body within the limit is handed to
the app as it came.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from serving.errors import error_body

DEFAULT_MAX_BODY_MB = 4.0  # far above any prompt that fits a context; far below what stalls a worker


@dataclass(frozen=True)
class ServeConfig:
    api_key: str | None = None
    max_batch: int = 16  # sequences decoded together
    max_queue: int = 64  # generations waiting for a free row; more are refused with 429
    max_tokens: int = 1024  # the largest max_tokens a request may ask for
    max_texts: int = 256  # texts per classification request
    max_classify: int = 16  # classification requests computed at once; more are refused with 429
    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 1e6)  # larger request bodies get a 413 unread
    stream_interval_s: float = 0.01  # streamed text goes out at most this often (first and last pieces at once)
    torch_threads: int | None = None  # the torch thread's intra-op threads (None: leave torch's setting)


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self.refuse(send, f"{int(declared):,} bytes")
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client left: let the app see it
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self.refuse(send, f"over {self.max_bytes:,} bytes (so far)")
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def refuse(self, send, size: str) -> None:
        limit_mb = self.max_bytes / 1e6
        body = json.dumps(
            error_body(
                413,
                f"the request body is {size}; this server takes at most "
                f"{self.max_bytes:,} bytes ({limit_mb:g} MB, --max-body-mb)",
                code="request_too_large",
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
