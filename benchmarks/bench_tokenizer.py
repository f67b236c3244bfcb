"""Your own BPE (issue 26): training throughput, memory, and encoding speed against tiktoken's GPT-2.

Generates a corpus of many text files (``--mb``, default 1000: the issue's 1 GB; the generator of
``benchmarks.bench_tokenize``, paragraphs of the mirrored texts shuffled per file), then reports,
on this machine in this run:

- the train_tokenizer stage (``python -m steps.train_tokenizer``, a child process, ``--vocab``
  tokens, ``--sample-mb`` of training text streamed from the corpus): wall time, training MB/s
  (the trainer's own time, from the stage's report) and the child's peak RSS;
- encoding the same ``--encode-mb`` of the corpus with the trained encoding and with tiktoken's
  GPT-2 (both tiktoken, one thread, ``encode_ordinary``; then ``encode_ordinary_batch`` on every
  core): MB/s, their ratio, and bytes per token of each.

    python -m benchmarks.bench_tokenizer [--mb 1000] [--sample-mb 1000] [--vocab 8192] [--dir /tmp/bench-bpe]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.bench_tokenize import MIRROR, make_corpus
from llmcore.tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parents[1]
# The stage's own peak RSS: VmHWM of its process image (a child's ru_maxrss also counts the
# parent's RSS when the child was forked or vforked from it).
CHILD = """
import re, sys
from pathlib import Path
from steps import train_tokenizer
train_tokenizer.main(sys.argv[1:])
print("VmHWM_kB", re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
"""


def run_stage(corpus: Path, work: Path, vocab: int, sample_mb: float) -> dict:
    """The train_tokenizer stage in a child process: its report, wall seconds and peak RSS."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tokenizer"] |= {"source": "trained", "encoding_dir": str(MIRROR / "gpt2")}
    params["corpus"]["root"] = str(corpus)
    params["train_tokenizer"] |= {"vocab_size": vocab, "sample_bytes": int(sample_mb * 1e6)}
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            "--params",
            str(work / "params.yaml"),
            "--out",
            str(work / "tokenizer"),
            "--report",
            str(work / "report.json"),
            "--metrics",
            str(work / "metrics.json"),
        ],
        cwd=REPO,
        env=env,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    wall = time.perf_counter() - started
    print(done.stdout.strip().splitlines()[0])  # the stage's summary line
    peak_mb = int(done.stdout.split("VmHWM_kB")[-1]) / 1024
    return {"report": json.loads((work / "report.json").read_text()), "wall_s": wall, "peak_rss_mb": peak_mb}


def sample_texts(corpus: Path, megabytes: float) -> list[str]:
    texts, size = [], 0
    for path in sorted(corpus.iterdir()):
        texts.append(path.read_text(encoding="utf-8"))
        size += len(texts[-1].encode())
        if size >= megabytes * 1e6:
            break
    return texts


def encode_speed(encoding, texts: list[str], threads: int) -> dict:
    n_bytes = sum(len(t.encode()) for t in texts)
    started = time.perf_counter()
    tokens = sum(len(encoding.encode_ordinary(t)) for t in texts)
    one = time.perf_counter() - started
    started = time.perf_counter()
    encoding.encode_ordinary_batch(texts, num_threads=threads)
    many = time.perf_counter() - started
    return {
        "mb_per_s_1_thread": n_bytes / 1e6 / one,
        f"mb_per_s_{threads}_threads": n_bytes / 1e6 / many,
        "bytes_per_token": n_bytes / tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=1000, help="corpus size (MB)")
    parser.add_argument("--files", type=int, default=256)
    parser.add_argument("--sample-mb", type=float, default=1000, help="training text read (MB)")
    parser.add_argument("--encode-mb", type=float, default=50, help="text encoded by both encodings (MB)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench-bpe"))
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    corpus, work = args.dir / "corpus", args.dir / "work"
    shutil.rmtree(args.dir, ignore_errors=True)
    work.mkdir(parents=True)
    written = make_corpus(corpus, int(args.mb * 1e6), args.files)
    print(f"corpus: {written / 1e6:.0f} MB in {args.files} files")
    try:
        stage = run_stage(corpus, work, args.vocab, args.sample_mb)
        trained = stage["report"]["trained"]
        print(
            f"train_tokenizer ({args.vocab} tokens, {stage['report']['train_bytes'] / 1e6:.0f} MB trained on): "
            f"{stage['wall_s']:.1f} s wall, trainer {trained['train_mb_per_s']:.2f} MB/s, "
            f"peak RSS {stage['peak_rss_mb']:.0f} MB"
        )
        texts = sample_texts(corpus, args.encode_mb)
        threads = len(os.sched_getaffinity(0))
        ours = encode_speed(get_tokenizer(work / "tokenizer"), texts, threads)
        gpt2 = encode_speed(get_tokenizer(MIRROR / "gpt2"), texts, threads)
        for name, figures in (("trained", ours), ("gpt2", gpt2)):
            print(f"encode {name:8s}: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()))
        print("trained / gpt2: " + ", ".join(f"{k} {ours[k] / gpt2[k]:.2f}x" for k in ours))
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
