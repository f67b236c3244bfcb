"""Tokenization at scale and pretraining speed against corpus size (issue 13): a script, not a test.

Generates a corpus of many text files (``--gb``, default 2) from the mirrored texts: paragraphs of
tinyshakespeare, the-verdict and the instruction answers, shuffled per file and each led by a
random name and number, so no two files repeat. Then it reports, on this machine in this run:

- the tokenize stage (``python -m steps.tokenize``, in a child process) on the whole corpus and on
  a 5 MB corpus: MB/s and the child's peak RSS;
- raw tiktoken, ``encode_ordinary_batch`` over a sample of the same files on as many threads as
  cores, before and after the stage runs (the limit; the machine may be shared): MB/s;
- pretraining tokens/s (``llmcore.train.train``, cpu-tiny, context 256) on the windows of the 5 MB
  and of the large corpus, fixed-stride and random-offset.

The generated files are deleted at the end (``--keep`` keeps them).

    python -m benchmarks.bench_tokenize [--gb 2] [--files 256] [--dir /tmp/bench-tokenize]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from benchmarks.train_settings import bench_config
from llmcore.config import GPTConfig
from llmcore.model import GPTModel
from llmcore.tokenizer import get_tokenizer
from llmcore.train import TrainCallback, TrainState, train
from steps.build_windows import WindowParams, build_windows
from steps.data.windows import load_windows

MIRROR = Path(os.environ.get("LLMPIPE_MIRROR") or Path(__file__).resolve().parents[2] / "shared" / "data")
NAMES = ["ALONSO", "Beatrice", "the clerk", "Mrs. Gisburn", "KING", "Nurse", "a stranger", "Rickham", "CORIOLANUS"]


def paragraphs() -> list[str]:
    """The mirrored texts cut into paragraphs (blank-line separated; instruction answers whole)."""
    texts = [(MIRROR / name).read_text(encoding="utf-8") for name in ("tinyshakespeare.txt", "the-verdict.txt")]
    found = [p.strip() for text in texts for p in text.split("\n\n") if p.strip()]
    found += [e["output"] for e in json.loads((MIRROR / "instruction-data.json").read_text()) if e["output"]]
    return found


def make_corpus(directory: Path, total_bytes: int, n_files: int, seed: int = 0) -> int:
    """``n_files`` text files of about ``total_bytes`` in all; returns the bytes written."""
    directory.mkdir(parents=True, exist_ok=True)
    pool, rng = paragraphs(), np.random.default_rng(seed)
    per_file, written = total_bytes // n_files, 0
    for i in range(n_files):
        parts, size = [], 0
        while size < per_file:
            order = rng.permutation(len(pool))
            names, numbers = rng.integers(0, len(NAMES), len(pool)), rng.integers(0, 10**6, len(pool))
            for j, name, number in zip(order.tolist(), names.tolist(), numbers.tolist()):
                parts.append(f"[{NAMES[name]} {number}] {pool[j]}")
                size += len(parts[-1]) + 2
                if size >= per_file:
                    break
        data = "\n\n".join(parts).encode()
        (directory / f"part-{i:05d}.txt").write_bytes(data)
        written += len(data)
    return written


def raw_tiktoken_mb_s(files: list[Path], threads: int) -> float:
    """MB/s of ``encode_ordinary_batch`` over these files' texts (read before timing)."""
    texts = [path.read_text(encoding="utf-8") for path in files]
    tokenizer = get_tokenizer()
    started = time.perf_counter()
    tokenizer.encode_ordinary_batch(texts, num_threads=threads)
    return sum(len(t.encode()) for t in texts) / 1e6 / (time.perf_counter() - started)


# The stage's own peak RSS: VmHWM of its process image (ru_maxrss would include the parent's RSS at fork).
CHILD = """
import json, re, sys, time
from pathlib import Path
from steps import tokenize
started = time.perf_counter()
tokenize.main(sys.argv[1:])
peak_kb = int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
print(json.dumps({"seconds": time.perf_counter() - started, "rss_mb": peak_kb / 1024}))
"""


def run_tokenize(corpus: Path, work: Path) -> dict:
    """The tokenize stage on ``corpus`` in a child process: its seconds, peak RSS and metrics."""
    work.mkdir(parents=True, exist_ok=True)
    params = work / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "tokenizer": {"encoding_dir": os.environ.get("LLMCORE_GPT2_ENCODING_DIR")},
                "corpus": {"root": str(corpus)},
            }
        )
    )
    argv = [
        "--params",
        str(params),
        "--tokens",
        str(work / "tokens"),
        "--metrics",
        str(work / "tokenize.json"),
        "--state-dir",
        str(work / "state"),
    ]
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *argv],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    lines = done.stdout.strip().splitlines()
    return {**json.loads(lines[-1]), "summary": lines[-2], **json.loads((work / "tokenize.json").read_text())}


class Stop(Exception):
    pass


class StepRates(TrainCallback):
    def __init__(self, steps: int):
        self.steps, self.rates = steps, []

    def on_step_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        self.rates.append(metrics["tokens_per_s"])
        if len(self.rates) == self.steps:
            raise Stop


def pretrain_tokens_per_s(tokens: Path, work: Path, sampling: str, steps: int, warmup: int) -> float:
    """Median tokens/s of ``steps`` training steps (after ``warmup``) on the windows of ``tokens``."""
    build_windows(
        WindowParams(context_length=256, stride=256, train_ratio=0.9, sampling=sampling, random_windows=None, seed=123),
        tokens_dir=tokens,
        out_dir=work / f"windows-{sampling}",
        metrics_out=work / f"windows-{sampling}.json",
    )
    cfg = GPTConfig.from_preset("cpu-tiny", context_length=256)
    windows = load_windows(work / f"windows-{sampling}", cfg)
    torch.manual_seed(0)
    rates = StepRates(warmup + steps)
    config = bench_config(epochs=1, batch_size=8, eval_every=0, eval_batches=1, lr=1e-3, progress=False)
    try:
        train(GPTModel(cfg), windows["train"], windows["val"], config, callbacks=[rates])
    except Stop:
        pass
    return statistics.median(rates.rates[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=2.0, help="size of the large corpus")
    parser.add_argument("--files", type=int, default=256)
    parser.add_argument("--sample-files", type=int, default=12, help="files the raw tiktoken rate is measured on")
    parser.add_argument("--steps", type=int, default=12, help="timed pretraining steps per run (after 3 untimed)")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench-tokenize"))
    parser.add_argument("--keep", action="store_true", help="keep the generated corpus and shards")
    args = parser.parse_args()
    threads = len(os.sched_getaffinity(0))
    shutil.rmtree(args.dir, ignore_errors=True)
    try:
        started = time.perf_counter()
        large = make_corpus(args.dir / "large", int(args.gb * 1e9), args.files)
        small = make_corpus(args.dir / "small", 5_000_000, 5, seed=1)
        print(
            f"corpus: {args.files} files, {large / 1e6:.0f} MB ({time.perf_counter() - started:.0f} s to write); "
            f"small: 5 files, {small / 1e6:.1f} MB; {threads} cores"
        )
        sample = sorted((args.dir / "large").iterdir())[: args.sample_files]
        raw = [raw_tiktoken_mb_s(sample, threads)]
        runs = {name: run_tokenize(args.dir / name, args.dir / f"out-{name}") for name in ("large", "small")}
        raw.append(raw_tiktoken_mb_s(sample, threads))
        limit = statistics.mean(raw)
        print(
            f"raw tiktoken encode_ordinary_batch ({threads} threads, {args.sample_files} files): "
            f"{raw[0]:.1f} MB/s before, {raw[1]:.1f} MB/s after"
        )
        for name, run in runs.items():
            rate = run["bytes"] / 1e6 / run["seconds"]
            print(
                f"tokenize {name}: {run['bytes'] / 1e6:.1f} MB, {run['tokens']} tokens, {run['shards']} shard(s) "
                f"in {run['seconds']:.1f} s = {rate:.1f} MB/s ({rate / limit:.0%} of raw tiktoken), "
                f"peak RSS {run['rss_mb']:.0f} MB"
            )
        for sampling in ("fixed", "random"):
            rates = {
                name: pretrain_tokens_per_s(
                    args.dir / f"out-{name}" / "tokens", args.dir / f"out-{name}", sampling, args.steps, warmup=3
                )
                for name in ("small", "large")
            }
            print(
                f"pretrain ({sampling} windows, cpu-tiny, batch 8 x 256): {rates['small']:.0f} tokens/s on 5 MB, "
                f"{rates['large']:.0f} tokens/s on {large / 1e6:.0f} MB ({rates['large'] / rates['small']:.2f}x)"
            )
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
