"""llmcore vs Hugging Face transformers on the same GPT-2-small shape: generation, fp32, on this CPU.

(Training speed, eager/compiled x fp32/bf16 with MFU, is ``benchmarks.bench_training_speed``.)
One run measures, with random weights (the speed of a step does not depend on their values):

* greedy KV-cache generation, new tokens/s, 200 tokens from a 4-token prompt, batch 1:
  transformers' ``model.generate`` against ``llmcore.generate`` in fp32 (eager, and compiled:
  ``generate(..., compile=True)``, torch.compile, and ``compile="aot"``, the one-token step compiled
  ahead of time by AOTInductor), with int8 weights (``llmcore.quantize.quantize_int8``, eager
  fbgemm kernels) and with weight-only int8 (``quantize_int8_weight_only``: llmcore's own int8
  kernel, ``llmcore.int8_kernel``, where it builds), eager, both compiled ways and
  ``compile="fused"`` (the whole step as one C++ call, ``llmcore.fused_step``);
* each variant against the memory-bandwidth limit: the machine's read bandwidth, measured in this
  run (``benchmarks.bandwidth``, read just before and just after every generation), over the bytes
  of weights a token reads (fp32 ~500 MB, int8 ~a quarter of it); decoding one sequence cannot go
  faster. The median tok/s against the median bandwidth, and "paired": each generation against
  the higher of its two readings, with its range (the README's VM switches between ~35 and ~70
  GB/s within seconds, and a generation's share of its limit differs between the two);
* peak memory of each phase, in a fresh child process (its peak RSS, ``VmHWM``, minus its RSS
  after imports);
* int8 quality: a small model (cpu-small) is trained for a minute on the-verdict, then fp32 and
  both int8 formats are compared by perplexity and greedy-token agreement (random weights would
  make both meaningless).

The machine is shared and noisy, so the libraries are measured alternately, generation by
generation, and the best and median of the trials are reported.

    python -m benchmarks.bench_llmcore_vs_transformers              # everything, ~5 minutes
    python -m benchmarks.bench_llmcore_vs_transformers --no-quality --no-memory --gen-trials 2
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.bandwidth import read_bandwidth, weight_bytes_per_token
from benchmarks.train_settings import bench_config
from llmcore import int8_kernel
from llmcore.config import GPTConfig
from llmcore.data import SlidingWindowDataset
from llmcore.generate import generate
from llmcore.model import GPTModel
from llmcore.quantize import quantize_int8, quantize_int8_weight_only
from llmcore.train import train

VOCAB, EMB_DIM, N_LAYERS, N_HEADS, N_POSITIONS = 50257, 768, 12, 12, 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=200, help="tokens generated per trial")
    parser.add_argument("--prompt-tokens", type=int, default=4)
    parser.add_argument("--gen-trials", type=int, default=3, help="timed generations per variant")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time llmcore's compiled decoding (torch.compile and AOTInductor), fp32 and weight-only int8",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--generation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the generations (and the bandwidth limit)",
    )
    parser.add_argument(
        "--quality",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train a cpu-small model on the-verdict and compare fp32 and int8",
    )
    parser.add_argument("--quality-epochs", type=int, default=12)
    parser.add_argument("--quality-preset", default="cpu-small")
    parser.add_argument("--text", type=Path, default=None, help="the-verdict.txt (default: the offline mirror)")
    parser.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure each phase's peak RSS in a child process",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: memory child
    return parser.parse_args(argv)


# --- models and steps -------------------------------------------------------------------------


def llmcore_model() -> GPTModel:
    return GPTModel(GPTConfig.from_preset("gpt2-small"))  # drop_rate 0, qkv bias, tied head


def hf_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=N_POSITIONS,
        n_embd=EMB_DIM,
        n_layer=N_LAYERS,
        n_head=N_HEADS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def hf_generate(model, prompt: torch.Tensor, n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            use_cache=True,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=0,
        )
    return out[0, prompt.shape[1] :].tolist()


def llmcore_generate(model, prompt: torch.Tensor, n: int, compile: bool | str = False) -> list[int]:
    return generate(model, prompt, n, compile=compile)[0]


# --- timing -----------------------------------------------------------------------------------


def interleaved(fns: dict, rounds: int, around=None) -> dict[str, list[float]]:
    """Seconds per call of each function, alternating the order every round to share the noise;
    ``around(name)``, if given, runs untimed before and after each call."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            if around is not None:
                around(name)
            started = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - started)
            if around is not None:
                around(name)
    return times


def summarise(times: list[float], units_per_call: int) -> dict[str, float]:
    rates = [units_per_call / t for t in times]
    return {"best": max(rates), "median": statistics.median(rates), "trials": len(rates)}


def bench_generation(args) -> dict:
    torch.manual_seed(args.seed)
    ours = llmcore_model().eval()
    ours_int8 = quantize_int8(ours)
    theirs = hf_model().eval()
    prompt = torch.randint(0, VOCAB, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(args.seed))
    n = args.new_tokens
    models = {"transformers": theirs, "llmcore": ours, "llmcore_int8": ours_int8}
    models["llmcore_int8_wo"] = quantize_int8_weight_only(ours)
    modes = dict.fromkeys(models, False)
    if args.compile:
        for suffix, mode in (("+compile", True), ("+aot", "aot")):
            models["llmcore" + suffix], models["llmcore_int8" + suffix] = ours, models["llmcore_int8_wo"]
            modes["llmcore" + suffix] = modes["llmcore_int8" + suffix] = mode
        # llmcore's C++ decoding step (llmcore.fused_step); for fp32 it is the +aot step
        models["llmcore_int8+fused"], modes["llmcore_int8+fused"] = models["llmcore_int8_wo"], "fused"
    outputs = {}

    def run(name: str) -> None:
        if name == "transformers":
            outputs[name] = hf_generate(theirs, prompt, n)
        else:
            outputs[name] = llmcore_generate(models[name], prompt, n, modes[name])

    fns = {name: functools.partial(run, name) for name in models}
    for fn in fns.values():  # warm-up (allocations, first-call dispatch, compilation)
        fn()
    # The VM's bandwidth drifts and switches (35-70 GB/s within minutes), so it is read just before
    # and just after every generation too, and each generation is also compared with the higher of
    # its two readings ("paired": a switch during the generation counts against it).
    bandwidths: dict[str, list[float]] = {name: [] for name in fns}
    times = interleaved(fns, args.gen_trials, around=lambda name: bandwidths[name].append(read_bandwidth(trials=3)))
    result = {name: summarise(t, n) for name, t in times.items()}
    every_reading = [bw for readings in bandwidths.values() for bw in readings]
    result["bandwidth_gb_s"] = statistics.median(every_reading) / 1e9
    for name in times:
        weight_bytes = weight_bytes_per_token(models[name])
        limit = statistics.median(every_reading) / weight_bytes
        readings = bandwidths[name]
        pairs = [max(readings[2 * i], readings[2 * i + 1]) for i in range(len(times[name]))]
        paired = [n / t / (bw / weight_bytes) for t, bw in zip(times[name], pairs)]
        result[name].update(
            weight_mb=weight_bytes / 1e6,
            limit_tokens_per_s=limit,
            fraction_of_limit=result[name]["median"] / limit,
            fraction_of_limit_paired=statistics.median(paired),
            fraction_of_limit_paired_range=(min(paired), max(paired)),
        )
    assert all(len(tokens) == n for tokens in outputs.values()), "a generation stopped early"
    result["int8_vs_fp32_token_agreement_random_weights"] = agreement(outputs["llmcore"], outputs["llmcore_int8"])
    if args.compile:
        for suffix in ("+compile", "+aot", "+fused"):
            same = {"weight-only int8": outputs["llmcore_int8" + suffix] == outputs["llmcore_int8_wo"]}
            if "llmcore" + suffix in outputs:
                same["fp32"] = outputs["llmcore" + suffix] == outputs["llmcore"]
            result[f"same_tokens_as_eager{suffix}"] = same
        result["int8_weight_only_vs_fp32_token_agreement_random_weights"] = agreement(
            outputs["llmcore"], outputs["llmcore_int8+compile"]
        )
    with torch.no_grad():
        idx = torch.randint(0, VOCAB, (1, 64), generator=torch.Generator().manual_seed(args.seed + 1))
        ref, q, wo = ours(idx), ours_int8(idx), models["llmcore_int8_wo"](idx)
    result["int8_logits_rel_error"] = ((q - ref).norm() / ref.norm()).item()
    result["int8_weight_only_logits_rel_error"] = ((wo - ref).norm() / ref.norm()).item()
    return result


# --- int8 quality on a trained model ----------------------------------------------------------


def agreement(a: list[int], b: list[int]) -> dict[str, float]:
    same = [x == y for x, y in zip(a, b)]
    first_diff = same.index(False) if False in same else len(same)
    return {"same_fraction": sum(same) / len(same), "first_difference_at": first_diff}


def find_text(explicit: Path | None) -> Path:
    candidates = (
        [explicit]
        if explicit
        else [
            Path(os.environ.get("LLMPIPE_MIRROR", "../shared/data")) / "the-verdict.txt",
            Path("data/raw/corpus.txt"),
        ]
    )
    for path in candidates:
        if path is not None and path.is_file():
            return path
    sys.exit(f"bench: error: the-verdict.txt not found (tried {', '.join(map(str, candidates))}); pass --text")


@torch.no_grad()
def perplexity(model, data: SlidingWindowDataset) -> float:
    losses = [F.cross_entropy(model(x[None])[0], y, reduction="sum").item() for x, y in data]
    return float(torch.tensor(sum(losses) / (len(data) * data.max_length)).exp())


def bench_quality(args) -> dict:
    from benchmarks.bench_serve import use_offline_encoding
    from llmcore.tokenizer import encode, get_tokenizer

    use_offline_encoding()
    tokenizer = get_tokenizer()
    ids = encode(tokenizer, find_text(args.text).read_text(encoding="utf-8"))
    split = int(0.9 * len(ids))
    torch.manual_seed(args.seed)
    cfg = GPTConfig.from_preset(args.quality_preset, drop_rate=0.0)
    ctx = cfg.context_length
    train_data = SlidingWindowDataset(ids[:split], ctx, ctx // 2)
    val_data = SlidingWindowDataset(ids[split:], min(ctx, len(ids) - split - 1), ctx)
    model = GPTModel(cfg)
    started = time.perf_counter()
    train(
        model,
        train_data,
        None,
        bench_config(
            epochs=args.quality_epochs,
            batch_size=8,
            lr=1e-3,
            warmup_steps=5,
            eval_every=0,
            eval_batches=1,
            progress=False,
            seed=args.seed,
        ),
    )
    result: dict = {"preset": args.quality_preset, "train_seconds": time.perf_counter() - started}
    model.eval()
    int8, int8_wo = quantize_int8(model), quantize_int8_weight_only(model)
    eval_train = SlidingWindowDataset(ids[:split], ctx, ctx)
    for name, data in (("train_split", eval_train), ("val_split", val_data)):
        fp32_ppl, int8_ppl, wo_ppl = perplexity(model, data), perplexity(int8, data), perplexity(int8_wo, data)
        result[f"perplexity_{name}"] = {
            "fp32": fp32_ppl,
            "int8": int8_ppl,
            "rel_diff": int8_ppl / fp32_ppl - 1,
            "int8_weight_only": wo_ppl,
            "weight_only_rel_diff": wo_ppl / fp32_ppl - 1,
        }
    # Greedy continuations of prompts taken across the text (the train split is what it learned).
    prompts = [ids[i : i + args.prompt_tokens] for i in range(0, len(ids) - args.prompt_tokens, len(ids) // 5)][:5]
    fp32_tokens = [generate(model, [p], args.new_tokens)[0] for p in prompts]
    result["greedy_agreement"] = {}
    for name, quantized in (("int8", int8), ("int8_weight_only", int8_wo)):
        scores = [agreement(a, generate(quantized, [p], args.new_tokens)[0]) for a, p in zip(fp32_tokens, prompts)]
        result["greedy_agreement"][name] = {
            "prompts": len(prompts),
            "new_tokens": args.new_tokens,
            "same_fraction": statistics.mean(s["same_fraction"] for s in scores),
            "first_difference_at": [s["first_difference_at"] for s in scores],
        }
    return result


# --- memory (fresh child processes) -----------------------------------------------------------


def proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (Linux). VmHWM, unlike ru_maxrss, starts afresh at exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_probe(args) -> None:
    """Child process: one phase, then print the peak RSS above the RSS after imports."""
    import transformers  # noqa: F401  (imported in every probe, so the baselines match)

    baseline = proc_status_bytes("VmRSS")
    lib = args.probe
    torch.manual_seed(args.seed)
    prompt = torch.randint(0, VOCAB, (1, args.prompt_tokens))
    if lib == "transformers":
        hf_generate(hf_model().eval(), prompt, args.new_tokens)
    else:
        model = llmcore_model().eval()
        if lib == "llmcore_int8":
            model = quantize_int8(model, inplace=True)
        llmcore_generate(model, prompt, args.new_tokens)
    print(json.dumps({"peak_rss_above_imports_mb": (proc_status_bytes("VmHWM") - baseline) / 2**20}))


def bench_memory(args) -> dict:
    result = {}
    for probe in ("llmcore", "llmcore_int8", "transformers"):
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.bench_llmcore_vs_transformers",
            "--probe",
            probe,
            "--new-tokens",
            str(args.new_tokens),
            "--threads",
            str(args.threads),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        result[probe] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_above_imports_mb"]
    return result


# --- report -----------------------------------------------------------------------------------


VARIANTS = (
    "llmcore",
    "llmcore+compile",
    "llmcore+aot",
    "llmcore_int8",
    "llmcore_int8_wo",
    "llmcore_int8+compile",
    "llmcore_int8+aot",
    "llmcore_int8+fused",
)
"""llmcore's decoding variants, in the order they are reported (int8_wo: weight-only int8, eager;
+compile: ``generate(..., compile=True)``; +aot: ``compile="aot"``, ``llmcore.aot_step``; +fused:
``compile="fused"``, ``llmcore.fused_step``, weight-only int8 only)."""


def report(results: dict) -> None:
    print(f"\n== {results['environment']}")
    if "generation" in results:
        g = results["generation"]
        print(f"\ngreedy KV-cache generation, new tokens/s (batch 1, {results['args']['new_tokens']} new tokens):")
        print(
            f"  read bandwidth {g['bandwidth_gb_s']:.1f} GB/s (median, read before and after each run); "
            "limit = bandwidth / weight bytes a token reads; paired: each generation against the "
            "higher of the bandwidths read just before and just after it (median, and its range over the runs)"
        )
        for name in (n for n in ("transformers", *VARIANTS) if n in g):
            print(
                f"  {name:20s} best {g[name]['best']:7.1f}   median {g[name]['median']:7.1f}   "
                f"({g[name]['trials']} runs)"
                f"   weights {g[name]['weight_mb']:4.0f} MB, limit {g[name]['limit_tokens_per_s']:6.1f} tok/s, "
                f"median = {g[name]['fraction_of_limit']:.0%} of it, paired {g[name]['fraction_of_limit_paired']:.0%}"
                " ({:.0%}-{:.0%})".format(*g[name]["fraction_of_limit_paired_range"])
            )
        for name in (n for n in VARIANTS if n in g):
            print(
                f"  ratio {name}/transformers: best {g[name]['best'] / g['transformers']['best']:.2f}x, "
                f"median {g[name]['median'] / g['transformers']['median']:.2f}x"
            )
        print(
            f"  int8 vs fp32 (random weights): logits rel. error {g['int8_logits_rel_error']:.4f}, "
            f"same greedy tokens {g['int8_vs_fp32_token_agreement_random_weights']['same_fraction']:.0%}"
        )
        for suffix in ("+compile", "+aot", "+fused"):
            if f"same_tokens_as_eager{suffix}" in g:
                same = ", ".join(f"{k} {v}" for k, v in g[f"same_tokens_as_eager{suffix}"].items())
                print(f"  {suffix[1:]} decoding gives the eager tokens: {same}")
        if "int8_weight_only_vs_fp32_token_agreement_random_weights" in g:
            wo = g["int8_weight_only_vs_fp32_token_agreement_random_weights"]
            print(
                f"  weight-only int8 vs fp32 (random weights): logits rel. error "
                f"{g['int8_weight_only_logits_rel_error']:.4f}, same greedy tokens {wo['same_fraction']:.0%}"
            )
    if "memory" in results:
        print("\npeak memory of generation: peak RSS (VmHWM) of a fresh process, minus its RSS after imports (MiB):")
        for probe, mb in results["memory"].items():
            print(f"  {probe:24s} {mb:8.0f}")
    if "quality" in results:
        q = results["quality"]
        print(f"\nint8 quality ({q['preset']} trained {q['train_seconds']:.0f} s on the-verdict):")
        for split in ("train_split", "val_split"):
            p = q[f"perplexity_{split}"]
            print(
                f"  perplexity {split:11s} fp32 {p['fp32']:9.2f}   int8 {p['int8']:9.2f} ({p['rel_diff']:+.2%})   "
                f"weight-only int8 {p['int8_weight_only']:9.2f} ({p['weight_only_rel_diff']:+.2%})"
            )
        for name, a in q["greedy_agreement"].items():
            print(
                f"  {name}: greedy tokens identical to fp32 {a['same_fraction']:.1%} over {a['prompts']} prompts "
                f"x {a['new_tokens']} tokens; first difference at {a['first_difference_at']}"
            )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if args.probe:
        run_probe(args)
        return
    import transformers

    results: dict = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{args.threads} threads, load average at start {os.getloadavg()[0]:.1f}, "
        f"llmcore int8 kernel: {int8_kernel.isa() or 'not built'}",
    }
    started = time.perf_counter()
    if args.generation:
        results["generation"] = bench_generation(args)
        report(results)  # now, in case a later phase fails
        sys.stdout.flush()
    if args.memory:
        results["memory"] = bench_memory(args)
    if args.quality:
        results["quality"] = bench_quality(args)
    results["seconds"] = time.perf_counter() - started
    results["environment"] += f", at end {os.getloadavg()[0]:.1f}; {results['seconds']:.0f} s"
    report({k: v for k, v in results.items() if k != "generation"})
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
