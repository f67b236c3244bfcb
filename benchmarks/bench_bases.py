"""Modern bases at real shapes (Qwen3-0.6B, Llama-3.2-1B), random weights: loading and decoding.

One run, per shape:

* a random checkpoint is written by transformers (``save_pretrained``, bf16, as published);
* **loading**, each in a fresh child process: ``llmcore.hf_checkpoint.load_hf_model`` into bf16
  (the checkpoint's own dtype) and into fp32, and transformers' ``from_pretrained`` into fp32 —
  seconds, and peak RSS (``VmHWM``) above the process's RSS after imports, after every weight
  was read once (a bf16 load keeps the file's memory-mapped pages, which count only once
  touched), as a ratio of the size of the model it builds (the target: <= 1.3x);
* **greedy KV-cache decoding**, new tokens/s, batch 1 and 8: transformers ``generate`` fp32 vs
  ``llmcore.generate`` fp32 and int8 (``llmcore.quantize.quantize_int8``), measured alternately,
  best of the trials (the machine is shared and noisy).

    python -m benchmarks.bench_bases                       # both shapes
    python -m benchmarks.bench_bases --shapes qwen3-0.6b --new-tokens 16 --trials 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from llmcore.generate import generate
from llmcore.hf_checkpoint import load_hf_model
from llmcore.quantize import quantize_int8

SHAPES = {  # the text fields of the published config.json files
    "qwen3-0.6b": dict(
        model_type="qwen3",
        architectures=["Qwen3ForCausalLM"],
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
    ),
    "llama-3.2-1b": dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--load", action=argparse.BooleanOptionalAction, default=True, help="measure loading")
    parser.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True, help="measure decoding")
    parser.add_argument("--child-load", nargs=2, metavar=("DIR", "WHO_DTYPE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child_load(directory: str, who_dtype: str) -> None:
    """Runs in a fresh process: load once, print seconds and peak RSS above the post-import RSS."""
    import transformers  # imported before the baseline, so both loaders start from the same RSS

    who, dtype_name = who_dtype.split("-")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    base = _rss_kib("VmRSS")
    start = time.perf_counter()
    if who == "llmcore":
        model = load_hf_model(directory, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    seconds = time.perf_counter() - start
    with torch.no_grad():  # read every weight once: memory-mapped pages count only once touched
        for param in model.parameters():
            param.sum()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_above_base_mib": (_rss_kib("VmHWM") - base) / 1024,
                "model_mib": model_bytes / 2**20,
            }
        )
    )


def measure_load(directory: Path, who_dtype: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_bases", "--child-load", str(directory), who_dtype],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["peak_over_model"] = result["peak_above_base_mib"] / result["model_mib"]
    return result


def write_checkpoint(shape: str, directory: Path) -> float:
    import transformers

    config = transformers.AutoConfig.for_model(**SHAPES[shape])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    return sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 2**20


def tokens_per_s(run, batch: int, new_tokens: int) -> float:
    start = time.perf_counter()
    run()
    return batch * new_tokens / (time.perf_counter() - start)


def measure_decode(directory: Path, args: argparse.Namespace) -> dict:
    import transformers

    ours = load_hf_model(directory).eval()
    ours_int8 = quantize_int8(load_hf_model(directory), inplace=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id, hf.generation_config.pad_token_id = None, 0
    vocab, results = ours.cfg.vocab_size, {}
    for batch in args.batches:
        prompt = torch.randint(0, vocab, (batch, args.prompt_tokens), generator=torch.Generator().manual_seed(batch))
        runs = {
            "transformers_fp32": lambda: hf.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens, do_sample=False
            ),
            "llmcore_fp32": lambda: generate(ours, prompt, args.new_tokens),
            "llmcore_int8": lambda: generate(ours_int8, prompt, args.new_tokens),
        }
        best = {name: 0.0 for name in runs}
        with torch.no_grad():
            for _ in range(args.trials):  # alternate the variants, keep each one's best
                for name, run in runs.items():
                    best[name] = max(best[name], tokens_per_s(run, batch, args.new_tokens))
        best["fp32_ratio"] = best["llmcore_fp32"] / best["transformers_fp32"]
        best["int8_ratio"] = best["llmcore_int8"] / best["transformers_fp32"]
        results[f"batch_{batch}"] = best
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.child_load:
        child_load(*args.child_load)
        return
    report = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    for shape in args.shapes:
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(tmp) / shape
            entry = report[shape] = {"checkpoint_mib_bf16": write_checkpoint(shape, directory), "load": {}}
            for who in ("llmcore-bf16", "llmcore-fp32", "transformers-fp32") if args.load else ():
                entry["load"][who] = load = measure_load(directory, who)
                print(
                    f"{shape}: load {who}: {load['seconds']:.1f} s, peak RSS above imports "
                    f"{load['peak_above_base_mib']:.0f} MiB = {load['peak_over_model']:.2f}x the model "
                    f"({load['model_mib']:.0f} MiB)",
                    flush=True,
                )
            entry["decode"] = measure_decode(directory, args) if args.decode else {}
        print(json.dumps({shape: entry}, indent=2), flush=True)
    for shape in args.shapes:
        for batch, row in report[shape]["decode"].items():
            print(
                f"{shape} {batch}: llmcore fp32 {row['llmcore_fp32']:.1f} tok/s, int8 {row['llmcore_int8']:.1f}, "
                f"transformers fp32 {row['transformers_fp32']:.1f}  (fp32 {row['fp32_ratio']:.2f}x, "
                f"int8 {row['int8_ratio']:.2f}x)"
            )


if __name__ == "__main__":
    main()
