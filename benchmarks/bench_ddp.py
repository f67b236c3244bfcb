"""Training throughput of llmcore's loop in 1 vs N DistributedDataParallel processes (gloo, CPU).

Every run trains the same model on the same global batch (``--batch`` windows of ``--context``
tokens per optimizer step) with ``llmcore.train.train``; N processes split each batch, so the
work per step is constant and tokens/s compares directly. Each process runs ``--threads``
threads (default 1), so N processes use N times the cores of one and the scaling efficiency is
tokens/s(N) / (N x tokens/s(1)). A last run gives one process as many threads as the largest N
(the same cores without DDP). The first ``--warmup`` steps are not timed. Figures on a shared
machine are noisy: run it twice.

    nice -n 5 python -m benchmarks.bench_ddp [--preset cpu-base] [--procs 1 2] [--steps 8]

On GPUs, time torchrun itself: ``dvc exp run -S distributed.nproc_per_node=N`` and compare the
``tokens_per_s`` metric the training stages log to MLflow.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

from benchmarks.train_settings import bench_config
from llmcore import distributed
from llmcore.config import GPTConfig
from llmcore.data import SlidingWindowDataset
from llmcore.model import GPTModel
from llmcore.train import TrainCallback, TrainState, train


class StepTimes(TrainCallback):
    def __init__(self) -> None:
        self.tokens_per_s: list[float] = []

    def on_step_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        self.tokens_per_s.append(metrics["tokens_per_s"])


def worker(rank: int, world: int, port: int, args: argparse.Namespace, threads: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(threads)
    distributed.init_distributed("gloo", timeout_s=600)
    try:
        cfg = GPTConfig.from_preset(args.preset, context_length=args.context, drop_rate=0.0)
        n_windows = args.batch * (args.steps + args.warmup)
        tokens = torch.randint(
            0, cfg.vocab_size, (n_windows * args.context + 1,), generator=torch.Generator().manual_seed(0)
        )
        data = SlidingWindowDataset(tokens, args.context, args.context)
        torch.manual_seed(0)
        model = GPTModel(cfg)
        config = bench_config(batch_size=args.batch, eval_every=0, eval_batches=1, shuffle=False, progress=False)
        timer = StepTimes()
        train(model, data, None, config, callbacks=[timer])
        if distributed.is_main_process():
            Path(out).write_text(repr(timer.tokens_per_s[args.warmup :]))
    finally:
        distributed.cleanup()


def tokens_per_s(world: int, threads: int, args: argparse.Namespace) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp, "tokens_per_s.txt"))
        mp.start_processes(
            worker, args=(world, distributed.free_port(), args, threads, out), nprocs=world, start_method="spawn"
        )
        return eval(Path(out).read_text())  # noqa: S307 - our own repr of a list of floats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-base", help="model shape (cpu-base, gpt2-small, ...)")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="global batch (windows per step)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    args = parser.parse_args()
    print(
        f"{args.preset}, context {args.context}, global batch {args.batch}, {args.steps} timed steps, "
        f"{os.cpu_count()} cores, torch {torch.__version__}"
    )
    baseline = None
    for world in args.procs:
        rate = report(world, args.threads, args)
        baseline = baseline or rate / world
        print(f"    scaling efficiency {rate / (baseline * world):.0%}")
    report(1, args.threads * max(args.procs), args)


def report(world: int, threads: int, args: argparse.Namespace) -> float:
    rates = tokens_per_s(world, threads, args)
    median = statistics.median(rates)
    print(
        f"{world} process(es) x {threads} thread(s): {median:8.0f} tokens/s "
        f"(median of {len(rates)} steps; min {min(rates):.0f}, max {max(rates):.0f})"
    )
    return median


if __name__ == "__main__":
    main()
