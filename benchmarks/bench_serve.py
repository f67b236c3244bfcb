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
as many prompts as there are clients as one batch; the ratio server / in-process is printed per
level (the targets: >= 70% at 1 client, >= 80% at 16). The machine is shared, so the two are
interleaved (in-process batch, then the server's level, ``--rounds`` times) and each figure is the
median of its rounds; the load average is printed with them. The clients run on the same machine
as the server and compete with it for the CPU.

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
TOPICS = [
    "the sea",
    "a city",
    "winter",
    "music",
    "a garden",
    "the moon",
    "old books",
    "trains",
    "rain",
    "a market",
    "mountains",
    "coffee",
    "a library",
    "the desert",
    "friendship",
    "bridges",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients")
    parser.add_argument("--requests", type=int, default=3, help="requests per client at each level")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads, in this process and the server's"
    )
    parser.add_argument(
        "--stream-interval-ms",
        type=float,
        default=None,
        help="the server's --stream-interval-ms (default: the server's default)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (in-process, server) per level")
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
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid``, all its threads (Linux: /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_level(url: str, server: int, clients: int, requests: int, max_tokens: int) -> dict:
    """``clients`` threads, each streaming ``requests`` completions back to back; with the CPU time
    the server and the clients (this process) spent on them. Each client's ``httpx.Client`` is made
    before the clock starts (making one loads the CA certificates: ~10 ms of CPU, which is not
    serving's)."""
    results: list[tuple[float, list[float], int]] = []
    lock = threading.Lock()
    sessions = [httpx.Client() for _ in range(clients)]
    start = threading.Barrier(clients + 1)

    def client_loop(index: int) -> None:
        start.wait()
        for r in range(requests):
            result = stream_one(sessions[index], url, prompt_for(index * requests + r), max_tokens)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    server_cpu, client_cpu, started = cpu_seconds(server), time.process_time(), time.perf_counter()
    start.wait()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    server_cpu, client_cpu = cpu_seconds(server) - server_cpu, time.process_time() - client_cpu
    for session in sessions:
        session.close()
    tokens = sum(r[2] for r in results)
    ttft = [r[0] for r in results]
    gaps = [g for r in results for g in r[1]]
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": sum(r[2] for r in results),
        "wall_s": wall,
        "tokens_per_s": sum(r[2] for r in results) / wall,
        "ttft_p50_ms": 1e3 * percentile(ttft, 0.5),
        "ttft_p95_ms": 1e3 * percentile(ttft, 0.95),
        "token_p50_ms": 1e3 * percentile(gaps, 0.5),
        "token_p95_ms": 1e3 * percentile(gaps, 0.95),
        "server_cpu_ms_per_token": 1e3 * server_cpu / tokens,
        "client_cpu_ms_per_token": 1e3 * client_cpu / tokens,
    }


def serve(model_dir: Path, int8: bool, env: dict[str, str], interval_ms: float | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "serving",
        "--model",
        str(model_dir),
        "--classifier",
        "",
        "--port",
        str(port),
        "--log-level",
        "warning",
        *(["--int8"] if int8 else []),
        *([] if interval_ms is None else ["--stream-interval-ms", str(interval_ms)]),
    ]
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


def load_model(model_dir: Path, int8: bool):
    model = load_checkpoint(model_dir).eval()
    return quantize_int8(model, inplace=True) if int8 else model


def in_process(model, tokenizer, batch: int, max_tokens: int) -> tuple[float, float]:
    """The ceiling: tokens/s of llmcore.generate on ``batch`` prompts at once, no server; CPU ms per token."""
    prompts = [encode(tokenizer, prompt_for(i)) for i in range(batch)]
    cpu, started = time.process_time(), time.perf_counter()
    tokens = sum(len(row) for row in generate(model, prompts, max_tokens))
    return tokens / (time.perf_counter() - started), 1e3 * (time.process_time() - cpu) / tokens


def median_row(rows: list[dict]) -> dict:
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


def bench_precision(args, model_dir: Path, int8: bool, tokenizer, env: dict[str, str]) -> dict:
    """Interleaved rounds of (in-process batch, server level) for every level; medians."""
    model = load_model(model_dir, int8)
    generate(model, [encode(tokenizer, prompt_for(0))], 8)  # warm-up
    process, url = serve(model_dir, int8, env, args.stream_interval_ms)
    server = process.pid
    rows: dict[int, list[dict]] = {n: [] for n in args.levels}
    try:
        run_level(url, server, 1, 1, 8)  # warm-up
        for _ in range(args.rounds):
            for n in args.levels:
                speed, cpu = in_process(model, tokenizer, n, args.max_tokens)
                row = run_level(url, server, n, args.requests, args.max_tokens)
                rows[n].append({**row, "in_process_tokens_per_s": speed, "in_process_cpu_ms_per_token": cpu})
    finally:
        process.terminate()
        process.wait(timeout=30)
    return {n: median_row(rows[n]) for n in args.levels}


def use_offline_encoding() -> None:
    """GPT-2's encoding from the offline mirror (as the tests), unless one is set already."""
    mirror = Path(os.environ.get("LLMPIPE_MIRROR") or REPO.parent / "shared" / "data") / "gpt2"
    if ENCODING_DIR_ENV not in os.environ and mirror.is_dir():
        os.environ[ENCODING_DIR_ENV] = str(mirror)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    use_offline_encoding()
    torch.set_num_threads(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    tokenizer = get_tokenizer()
    print(
        f"model {args.preset} (random weights), {args.max_tokens} new tokens per request, greedy; "
        f"{args.requests} requests per client; torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads"
    )
    header = (
        f"{'precision':9} {'clients':>7} {'tok/s':>8} {'TTFT p50':>9} {'p95':>7} {'token p50':>9} {'p95':>7}"
        f"  (ms) {'in-process':>10} {'server/in-process':>17}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_checkpoint(GPTModel(GPTConfig.from_preset(args.preset, drop_rate=0.0)), Path(tmp) / "bench")
        for precision in args.precisions:
            load = os.getloadavg()[0]
            levels = bench_precision(args, model_dir, precision == "int8", tokenizer, env)
            print(
                f"\n{precision}: medians of {args.rounds} interleaved rounds; load average {load:.2f} at start, "
                f"{os.getloadavg()[0]:.2f} at end\n{header}"
            )
            for n, row in levels.items():
                print(
                    f"{precision:9} {n:>7} {row['tokens_per_s']:>8.1f} {row['ttft_p50_ms']:>9.1f} "
                    f"{row['ttft_p95_ms']:>7.1f} {row['token_p50_ms']:>9.1f} {row['token_p95_ms']:>7.1f}       "
                    f"{row['in_process_tokens_per_s']:>10.1f} "
                    f"{row['tokens_per_s'] / row['in_process_tokens_per_s']:>16.0%}"
                )
            print(
                f"{precision}: CPU ms per token (user+system, all threads): "
                + "; ".join(
                    f"{n} clients: server {r['server_cpu_ms_per_token']:.2f} + clients "
                    f"{r['client_cpu_ms_per_token']:.2f} vs in-process {r['in_process_cpu_ms_per_token']:.2f}"
                    for n, r in levels.items()
                )
            )
            if 1 in levels and 16 in levels:
                gain = levels[16]["tokens_per_s"] / levels[1]["tokens_per_s"]
                print(f"{precision}: batching gain (aggregate tok/s at 16 clients / at 1): {gain:.2f}x")


if __name__ == "__main__":
    main()
