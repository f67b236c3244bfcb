"""``python -m serving`` under load: throughput and latency at 1, 4 and 16 concurrent clients, fp32 and int8.

A small GPT (the ``cpu-small`` preset, random weights: a step's speed does not depend on their
values) is saved once and served by a real ``python -m serving`` process per precision. Each
client thread streams ``/v1/completions`` (greedy, ``max_tokens`` new tokens, its own prompt)
back to back; the figures are

* aggregate tokens/s: completion tokens of all clients / wall time of the level;
* time to first token (TTFT): request sent -> first text chunk, p50 and p95;
* per-token latency: the gaps between a stream's chunks (about one token each), p50 and p95;
* the batching gain: aggregate tokens/s at 16 clients / at 1 client;

against the ceiling, the same model decoded in this process with ``llmcore.generate`` (no HTTP),
one prompt alone and 16 prompts as one batch. The clients run on the same machine as the server
and compete with it for the CPU.

    python -m benchmarks.bench_serve                      # ~3 minutes on 2 cores
    python -m benchmarks.bench_serve --levels 1 4 --requests 2 --precisions fp32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from llmcore.checkpoint import load_checkpoint, save_checkpoint
from llmcore.config import GPTConfig
from llmcore.distributed import free_port
from llmcore.generate import generate
from llmcore.model import GPTModel
from llmcore.quantize import quantize_int8
from llmcore.tokenizer import ENCODING_DIR_ENV, encode, get_tokenizer

REPO = Path(__file__).resolve().parents[1]
TOPICS = ["the sea", "a city", "winter", "music", "a garden", "the moon", "old books", "trains",
          "rain", "a market", "mountains", "coffee", "a library", "the desert", "friendship", "bridges"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients")
    parser.add_argument("--requests", type=int, default=3, help="requests per client at each level")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8"])
    return parser.parse_args(argv)


def prompt_for(i: int) -> str:
    return f"Here is a short story about {TOPICS[i % len(TOPICS)]}, told by traveller number {i}:"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def stream_one(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> tuple[float, list[float], int]:
    """One streamed completion: (TTFT s, gaps between chunks s, completion tokens)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    arrivals, tokens = [], 0
    with client.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return arrivals[0] - sent, gaps, tokens


def run_level(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    """``clients`` threads, each streaming ``requests`` completions back to back."""
    results: list[tuple[float, list[float], int]] = []
    lock = threading.Lock()

    def client_loop(index: int) -> None:
        with httpx.Client() as client:
            for r in range(requests):
                result = stream_one(client, url, prompt_for(index * requests + r), max_tokens)
                with lock:
                    results.append(result)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ttft = [r[0] for r in results]
    gaps = [g for r in results for g in r[1]]
    return {"clients": clients, "requests": len(results), "tokens": sum(r[2] for r in results), "wall_s": wall,
            "tokens_per_s": sum(r[2] for r in results) / wall, "ttft_p50_ms": 1e3 * percentile(ttft, 0.5),
            "ttft_p95_ms": 1e3 * percentile(ttft, 0.95), "token_p50_ms": 1e3 * percentile(gaps, 0.5),
            "token_p95_ms": 1e3 * percentile(gaps, 0.95)}


def serve(model_dir: Path, int8: bool, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "serving", "--model", str(model_dir), "--classifier", "", "--port", str(port),
               "--log-level", "warning", *(["--int8"] if int8 else [])]
    process = subprocess.Popen(command, cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.terminate()
    raise RuntimeError("the server did not start")


def in_process(model_dir: Path, int8: bool, tokenizer, max_tokens: int) -> dict:
    """The ceiling: llmcore.generate on the same checkpoint, batch 1 and batch 16, no server (best of 3)."""
    model = load_checkpoint(model_dir).eval()
    model = quantize_int8(model, inplace=True) if int8 else model
    prompts = [encode(tokenizer, prompt_for(i)) for i in range(16)]
    generate(model, prompts[:1], 8)  # warm-up
    out = {}
    for batch in (1, 16):
        for _ in range(3):
            started = time.perf_counter()
            tokens = sum(len(row) for row in generate(model, prompts[:batch], max_tokens))
            speed = tokens / (time.perf_counter() - started)
            out[f"batch{batch}_tokens_per_s"] = max(speed, out.get(f"batch{batch}_tokens_per_s", 0.0))
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    mirror = REPO.parent / "shared" / "data" / "gpt2"
    if ENCODING_DIR_ENV not in os.environ and mirror.is_dir():
        os.environ[ENCODING_DIR_ENV] = str(mirror)  # offline, as the tests
    env = {**os.environ}
    tokenizer = get_tokenizer()
    print(f"model {args.preset} (random weights), {args.max_tokens} new tokens per request, greedy; "
          f"{args.requests} requests per client; torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads")
    header = f"{'precision':9} {'clients':>7} {'tok/s':>8} {'TTFT p50':>9} {'p95':>7} {'token p50':>9} {'p95':>7}  (ms)"
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_checkpoint(GPTModel(GPTConfig.from_preset(args.preset, drop_rate=0.0)), Path(tmp) / "bench")
        for precision in args.precisions:
            int8 = precision == "int8"
            ceiling = in_process(model_dir, int8, tokenizer, args.max_tokens)
            process, url = serve(model_dir, int8, env)
            try:
                run_level(url, 1, 1, 8)  # warm-up
                levels = {n: run_level(url, n, args.requests, args.max_tokens) for n in args.levels}
            finally:
                process.terminate()
                process.wait(timeout=30)
            print(f"\n{header}")
            for n, row in levels.items():
                print(f"{precision:9} {n:>7} {row['tokens_per_s']:>8.1f} {row['ttft_p50_ms']:>9.1f} "
                      f"{row['ttft_p95_ms']:>7.1f} {row['token_p50_ms']:>9.1f} {row['token_p95_ms']:>7.1f}")
            print(f"{precision}: in-process llmcore.generate (no server): {ceiling['batch1_tokens_per_s']:.1f} tok/s "
                  f"alone, {ceiling['batch16_tokens_per_s']:.1f} tok/s as a batch of 16")
            if 1 in levels and 16 in levels:
                gain = levels[16]["tokens_per_s"] / levels[1]["tokens_per_s"]
                print(f"{precision}: batching gain (aggregate tok/s at 16 clients / at 1): {gain:.2f}x")


if __name__ == "__main__":
    main()
