"""Servers for the serving tests, always on 127.0.0.1 and a free port, always shut down.

``app_server`` runs an app in a uvicorn thread of the test process (the test can reach into it);
``serve_process`` runs ``python -m serving`` as a real process. ``tiny_generator`` and
``tiny_classifier`` write small random checkpoints that fit the GPT-2 tokenizer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch
import uvicorn
from torch import nn

from llmcore.checkpoint import save_checkpoint
from llmcore.classifier import GPTClassifier, save_classifier
from llmcore.config import GPTConfig
from llmcore.distributed import free_port
from llmcore.model import GPTModel
from llmcore.tokenizer import ENCODING_DIR_ENV

REPO = Path(__file__).resolve().parents[1]


def tiny_gpt(seed: int = 0, context_length: int = 256) -> GPTModel:
    """cpu-tiny with large random weights: spread-out logits, so greedy answers have no near-ties."""
    torch.manual_seed(seed)
    model = GPTModel(GPTConfig.from_preset("cpu-tiny", context_length=context_length)).eval()
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.2)
    return model


def tiny_generator(directory: Path) -> Path:
    return save_checkpoint(tiny_gpt(), directory)


def tiny_classifier(directory: Path) -> Path:
    torch.manual_seed(1)
    return save_classifier(GPTClassifier.from_gpt(tiny_gpt(1, 64), max_length=32), directory)


def wait_until_healthy(url: str, alive, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the server at {url} exited before it answered /health")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"the server at {url} did not answer /health within {timeout:.0f} s")


@contextmanager
def app_server(app) -> Iterator[str]:
    """Serve ``app`` from a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, thread.is_alive, timeout=30)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def serve_process(*args: str, encoding_dir: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run ``python -m serving ARGS`` (one torch thread); yields its base URL."""
    port = free_port()
    environ = {**os.environ, ENCODING_DIR_ENV: str(encoding_dir), "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "serving", *args, "--port", str(port), "--log-level", "warning"]
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, cwd=REPO, env=environ, stdout=log, stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_until_healthy(url, lambda: process.poll() is None)
            except (RuntimeError, TimeoutError) as exc:
                log.seek(0)
                raise RuntimeError(f"{exc}; its output:\n{log.read()}") from exc
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
