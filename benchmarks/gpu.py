"""Everything a lent GPU should measure, in one run of under 8 minutes, printed as one Markdown table.

* training, GPT-2-small shape (context 1024, batch 8): llmcore and transformers, eager and
  compiled, fp32 (TF32) and bf16 autocast; tokens/s (median step, steps of all variants
  interleaved), the ratio to transformers' same variant, MFU against the GPU's datasheet peak
  (``llmcore.throughput.GPU_PEAK_FLOPS``, keyed by the device name);
* decoding, GPT-2-small shape, greedy, KV cache: llmcore fp32/bf16 (and compiled) at batch 1 and
  16, transformers fp32 at batch 1; batch 1 as a fraction of the memory-bandwidth limit (the
  device's read bandwidth, measured in this run, over the weight bytes a token reads);
* serving: ``benchmarks.bench_serve``'s levels (1 and 16 clients) against in-process decoding.
  The server decodes on the CPU (``serving`` has no CUDA path), so this row measures the host.

Each section is timed and guarded: one that fails prints its error in the table and the others
still run. ``--dry-run`` runs every section on the CPU with tiny shapes and a few steps, to check
that the script works where no GPU is lent (minutes on an idle 2-core box; ~10 on a loaded one).

    python -m benchmarks.gpu                 # on a CUDA machine
    python -m benchmarks.gpu --dry-run       # anywhere
    bash benchmarks/gpu.sh                   # the same, with the offline environment set
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks.bandwidth import read_bandwidth, weight_bytes_per_token
from benchmarks.bench_llmcore_vs_transformers import interleaved
from benchmarks.bench_training_speed import PRECISIONS, Variant, make_step
from benchmarks.train_settings import bench_config
from llmcore.config import GPTConfig
from llmcore.generate import generate
from llmcore.model import GPTModel
from llmcore.precision import enable_tf32
from llmcore.throughput import peak_flops, training_flops_per_token
from llmcore.train import build_optimizer

Row = tuple[str, str, str, str, str]  # section, variant, tokens/s, vs. reference, note


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, a few steps: check that it runs")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the compiled variants (default: on a GPU yes, in a dry run no)",
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["training", "decoding", "serving"],
        choices=["training", "decoding", "serving"],
    )
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per variant")
    args = parser.parse_args(argv)
    args.device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if args.device.type == "cpu" and not args.dry_run:
        parser.error("no CUDA device here: run with --dry-run to check the script on the CPU")
    args.compile = (not args.dry_run) if args.compile is None else args.compile
    args.steps = args.steps or (2 if args.dry_run else 10)
    args.preset = "cpu-tiny" if args.dry_run else "gpt2-small"
    args.context, args.batch = (32, 2) if args.dry_run else (1024, 8)
    args.new_tokens = 16 if args.dry_run else 200
    return args


def hf_gpt2(cfg: GPTConfig):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.context_length,
            n_embd=cfg.emb_dim,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            attn_implementation="sdpa",
        )
    )


def llmcore_gpt(args) -> GPTModel:
    return GPTModel(GPTConfig.from_preset(args.preset, drop_rate=0.0, pad_vocab_to_multiple=64))


# --- training ---------------------------------------------------------------------------------


def training(args) -> list[Row]:
    device = args.device
    cfg = GPTConfig.from_preset(args.preset, drop_rate=0.0)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, cfg.vocab_size, (args.batch, args.context + 1), generator=gen)
    batch = rows[:, :-1].contiguous().to(device), rows[:, 1:].contiguous().to(device)
    precisions = ["fp32", "bf16"]
    variants = [
        Variant(lib, compiled, p)
        for lib in ("llmcore", "transformers")
        for compiled in ((False, True) if args.compile else (False,))
        for p in precisions
    ]
    steps = {}
    for lib in ("llmcore", "transformers"):
        torch.manual_seed(0)
        model = (llmcore_gpt(args) if lib == "llmcore" else hf_gpt2(cfg)).to(device)
        optimizer = build_optimizer(model, bench_config(lr=4e-4, weight_decay=0.1))
        for v in (v for v in variants if v.lib == lib):
            steps[v.name] = make_step(v, model, optimizer, batch, device)
    for step in steps.values():  # warm-up; the compiled variants compile here
        step(), step()
    times = interleaved(steps, args.steps)
    tokens = args.batch * args.context
    with torch.device("meta"):
        flops = training_flops_per_token(GPTModel(cfg), args.context)
    out = []
    for v in variants:
        speed = tokens / statistics.median(times[v.name])
        theirs = tokens / statistics.median(times[Variant("transformers", v.compiled, v.precision).name])
        mfu = speed * flops / peak_flops(device, PRECISIONS[v.precision])
        out.append(("training", v.name, f"{speed:,.0f}", f"{speed / theirs:.2f}x transformers", f"MFU {mfu:.1%}"))
    return out


# --- decoding ---------------------------------------------------------------------------------


def decoding(args) -> list[Row]:
    device = args.device
    bandwidth = read_bandwidth(device.type, mbytes=64 if args.dry_run else 2048)
    torch.manual_seed(0)
    fp32 = llmcore_gpt(args).to(device).eval()
    cfg = fp32.cfg
    variants = {
        "llmcore fp32": (fp32, False),
        "llmcore bf16": (llmcore_gpt(args).to(device, torch.bfloat16).eval(), False),
    }
    if args.compile:
        variants["llmcore fp32 compiled"] = (fp32, True)
    if device.type == "cpu":
        from llmcore.quantize import quantize_int8

        variants["llmcore int8"] = (quantize_int8(fp32), False)
    prompt = torch.randint(0, cfg.vocab_size, (1, 4), device=device)
    n = args.new_tokens
    fns = {
        f"{name} batch {b}": (lambda m=m, c=c, b=b: generate(m, prompt.expand(b, -1), n, compile=c))
        for name, (m, c) in variants.items()
        for b in (1, 16)
    }
    hf = hf_gpt2(GPTConfig.from_preset(args.preset)).to(device).eval()

    def hf_generate():
        with torch.no_grad():
            hf.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=0,
            )

    fns["transformers fp32 batch 1"] = hf_generate
    for fn in fns.values():
        fn()
    times = interleaved({k: synchronised(f, device) for k, f in fns.items()}, 3)
    rows = []
    for name, seconds in times.items():
        batch = 16 if name.endswith("batch 16") else 1
        speed = batch * n / statistics.median(seconds)
        model = hf if name.startswith("transformers") else variants[name.rsplit(" batch", 1)[0]][0]
        limit = bandwidth / weight_bytes_per_token(model)
        note = f"{speed / limit:.0%} of the bandwidth limit {limit:,.0f} tok/s" if batch == 1 else ""
        rows.append(("decoding", name, f"{speed:,.1f}", "", note))
    rows.append(("decoding", "read bandwidth", f"{bandwidth / 1e9:,.0f} GB/s", "", "sum over a buffer >> caches"))
    return rows


def synchronised(fn, device: torch.device):
    def run():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run


# --- serving ----------------------------------------------------------------------------------


def serving(args) -> list[Row]:
    from benchmarks import bench_serve
    from llmcore.checkpoint import save_checkpoint
    from llmcore.tokenizer import get_tokenizer

    bench_serve.use_offline_encoding()
    levels = [1, 2] if args.dry_run else [1, 16]
    opts = SimpleNamespace(
        levels=levels,
        rounds=1 if args.dry_run else 2,
        requests=1 if args.dry_run else 2,
        max_tokens=8 if args.dry_run else 64,
        stream_interval_ms=None,
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        preset = "cpu-tiny" if args.dry_run else "cpu-small"
        model_dir = save_checkpoint(GPTModel(GPTConfig.from_preset(preset, drop_rate=0.0)), Path(tmp) / "bench")
        for int8 in (False, True):
            result = bench_serve.bench_precision(opts, model_dir, int8, get_tokenizer(), env)
            for n, row in result.items():
                ratio = row["tokens_per_s"] / row["in_process_tokens_per_s"]
                rows.append(
                    (
                        "serving (CPU)",
                        f"{preset} {'int8' if int8 else 'fp32'}, {n} client(s)",
                        f"{row['tokens_per_s']:,.0f}",
                        f"{ratio:.0%} of in-process",
                        f"TTFT p50 {row['ttft_p50_ms']:.0f} ms",
                    )
                )
    return rows


# --- report -----------------------------------------------------------------------------------


def environment(args) -> str:
    if args.device.type == "cuda":
        name = torch.cuda.get_device_name(args.device)
        peaks = (
            f"datasheet peak bf16 {peak_flops(args.device, 'bf16-mixed') / 1e12:.0f} TFLOP/s, "
            f"fp32 (TF32) {peak_flops(args.device, 'fp32') / 1e12:.0f}"
        )
    else:
        name, peaks = platform.processor() or platform.machine(), "peak: a measured matmul (no datasheet for CPUs)"
    return (
        f"{name}; torch {torch.__version__}; {os.cpu_count()} CPUs; {peaks}; load average "
        f"{os.getloadavg()[0]:.1f}{'; DRY RUN (tiny shapes on the CPU)' if args.dry_run else ''}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    enable_tf32(args.device)
    started, rows, failed = time.perf_counter(), [], False
    for section in args.sections:
        began = time.perf_counter()
        try:
            rows += globals()[section](args)
        except Exception as exc:  # one broken section must not cost the others their minutes
            traceback.print_exc()
            rows.append((section, "FAILED", "", "", f"{type(exc).__name__}: {exc}".replace("|", "/")[:200]))
            failed = True
        print(f"{section}: {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    print(f"\n{environment(args)}; {time.perf_counter() - started:.0f} s in all\n")
    print("| section | variant | tokens/s | vs. reference | note |\n|---|---|---:|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
