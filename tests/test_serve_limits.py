"""Request bodies over the limit get a 413 before they are read; CPU work (a long prompt's
tokenization) runs in a worker thread, so /health answers while a request is being read or tokenized. Real HTTP: uvicorn
on a free loopback port, raw sockets for what an HTTP client library would not send."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from llmcore.tokenizer import ENCODING_DIR_ENV
from serving import openai_api
from serving.app import ServeConfig, create_app
from serving.models import GENERATOR, load_served
from tests.serve_helpers import app_server, tiny_generator

LIMIT = 100_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, gpt2_encoding_dir: Path) -> Iterator[str]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENCODING_DIR_ENV, str(gpt2_encoding_dir))
        directory = tiny_generator(tmp_path_factory.mktemp("limits") / "gen")
        app = create_app(load_served(str(directory), GENERATOR), None, ServeConfig(max_body_bytes=LIMIT))
        with app_server(app) as url:
            yield url


def raw_request(url: str, head: str) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    sock.sendall(head.encode())
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
        [line for line in data.split(b"\r\n") if line.lower().startswith(b"content-length:")][0].split(b":")[1]
    ):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body)


def post_head(path: str, extra: str) -> str:
    return f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{extra}\r\n"


def test_a_declared_huge_body_is_refused_before_any_of_it_is_sent(server: str) -> None:
    with raw_request(server, post_head("/v1/chat/completions", "Content-Length: 50000000\r\n")) as sock:
        status, body = read_response(sock)  # not one byte of the 50 MB was sent
    assert status == 413
    assert body["error"]["code"] == "request_too_large" and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"] == (
        "the request body is 50,000,000 bytes; this server takes at most 100,000 bytes (0.1 MB, --max-body-mb)"
    )


def test_a_chunked_body_is_refused_once_past_the_limit(server: str) -> None:
    with raw_request(server, post_head("/v1/completions", "Transfer-Encoding: chunked\r\n")) as sock:
        chunk = b"x" * 30_000
        for _ in range(4):  # 120 KB: past the 100 KB limit
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        status, body = read_response(sock)
    assert status == 413 and "over 100,000 bytes" in body["error"]["message"]


def test_health_answers_while_a_large_body_is_still_arriving(server: str) -> None:
    with raw_request(server, post_head("/v1/completions", "Content-Length: 90000\r\n")) as sock:
        sock.sendall(b'{"prompt": "' + b"a" * 40_000)  # half of it; the rest never comes while we ask
        assert httpx.get(f"{server}/health", timeout=5).json()["status"] == "ok"
        sock.sendall(b"a" * (90_000 - 40_000 - 12 - 3) + b'"}\n')
        status, body = read_response(sock)
    assert status in (200, 400), body  # answered: the prompt is tokenized, the limit was not hit


def test_a_body_within_the_limit_is_answered(server: str) -> None:
    reply = httpx.post(
        f"{server}/v1/completions", json={"prompt": "Every effort", "max_tokens": 3, "temperature": 0}, timeout=60
    )
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 3


def test_tokenization_of_a_long_prompt_runs_off_the_event_loop(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a long prompt is being tokenized (held here until /health has answered), the server
    still answers: with tokenization on the event loop, /health would wait for it. ("Hello" is long
    here: the limit is lowered to 3 characters; shorter prompts are tokenized on the loop.)"""
    monkeypatch.setattr(openai_api, "INLINE_CHARS", 3)
    tokenizing, release = threading.Event(), threading.Event()
    real_encode = openai_api.encode

    def slow_encode(tokenizer, text):
        tokenizing.set()
        release.wait(30)
        return real_encode(tokenizer, text)

    monkeypatch.setattr(openai_api, "encode", slow_encode)
    result: dict = {}
    request = threading.Thread(
        target=lambda: result.update(
            reply=httpx.post(f"{server}/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=60)
        )
    )
    request.start()
    try:
        assert tokenizing.wait(30), "the request never reached tokenization"
        health = httpx.get(f"{server}/health", timeout=10)
        assert health.status_code == 200 and "reply" not in result  # answered while the prompt was held
    finally:
        release.set()
        request.join(60)
    assert result["reply"].status_code == 200


def test_the_flag_is_checked(capsys) -> None:
    from serving.__main__ import main

    assert main(["--max-body-mb", "0"]) == 2
    assert "--max-body-mb > 0" in capsys.readouterr().err
