"""Reproduce the book's chapter 5 pretraining run on the-verdict with llmcore (no DVC, no MLflow).

The book's settings: GPT_CONFIG_124M (gpt2-small shape, qkv_bias off, untied output head),
context 256, drop 0.1, PyTorch's default initialisation (GPTConfig.init "torch"); the text split
90/10 by characters and each part tokenized on its own;
windows of 256 with stride 256, batch 2 (train: shuffled, drop_last; val: in order); AdamW
lr 4e-4, weight decay 0.1, constant lr, no warmup, no gradient clipping; 10 epochs;
torch.manual_seed(123) before building the model; evaluation every 5 steps on 5 batches.
The book reports a final train loss of about 0.57 and val loss of about 6.37 (numbers vary with
hardware and PyTorch version).

Where llmcore differs (so expect the same trend, not the same digits):
- the shuffling order comes from llmcore's seeded ResumableSampler, not DataLoader(shuffle=True);
- weight decay skips biases and LayerNorm weights (the book decays every parameter);
- evaluation runs after optimizer steps 5, 10, ..., 90 (the book's at 1, 6, ..., 86), on the first
  5 batches of the train split in order (the book: 5 batches of its shuffled train loader) and on
  the whole validation split (1 batch of 2 windows, as the book's val loader).
The figures printed are the last evaluation, after the 90th and final step.

    nice -n 5 python -m benchmarks.reproduce_book_pretraining [--seeds 123 124 125]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from benchmarks.train_settings import bench_config
from llmcore.config import GPTConfig
from llmcore.data import SlidingWindowDataset
from llmcore.model import GPTModel
from llmcore.tokenizer import encode, get_tokenizer
from llmcore.train import train

BOOK_MODEL = dict(context_length=256, qkv_bias=False, tie_embeddings=False, drop_rate=0.1, init="torch")
BOOK_TRAIN = dict(
    epochs=10,
    batch_size=2,
    lr=4e-4,
    weight_decay=0.1,
    schedule="constant",
    warmup_steps=0,
    grad_clip=None,
    eval_every=5,
    eval_batches=5,
)
BOOK_REPORTED = {"train_loss": 0.57, "val_loss": 6.37}


def run(text: str, seed: int, preset: str, epochs: int) -> dict[str, float]:
    tokenizer = get_tokenizer()
    split = int(0.9 * len(text))
    context = BOOK_MODEL["context_length"]
    train_data = SlidingWindowDataset(encode(tokenizer, text[:split]), context, context)
    val_data = SlidingWindowDataset(encode(tokenizer, text[split:]), context, context)
    torch.manual_seed(seed)
    model = GPTModel(GPTConfig.from_preset(preset, **BOOK_MODEL))
    config = bench_config(**{**BOOK_TRAIN, "epochs": epochs}, seed=seed)
    started = time.perf_counter()
    state = train(model, train_data, val_data, config)
    final = state.history[-1]
    return {
        "seed": seed,
        "train_loss": final["train_loss"],
        "val_loss": final["val_loss"],
        "steps": state.step,
        "tokens_seen": state.tokens_seen,
        "wall_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--corpus",
        type=Path,
        default=Path("data/raw/corpus.txt"),
        help="the-verdict.txt (default: %(default)s, written by `dvc repro download_corpus`)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[123])
    parser.add_argument("--preset", default="gpt2-small", help="model shape (cpu-tiny for a smoke test)")
    parser.add_argument("--epochs", type=int, default=BOOK_TRAIN["epochs"])
    args = parser.parse_args()
    text = args.corpus.read_text(encoding="utf-8")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"tokenizer dir {os.environ.get('LLMCORE_GPT2_ENCODING_DIR') or 'tiktoken'}"
    )
    results = []
    for seed in args.seeds:
        result = run(text, seed, args.preset, args.epochs)
        results.append(result)
        print(
            f"seed {seed}: train loss {result['train_loss']:.3f}, val loss {result['val_loss']:.3f} "
            f"after {result['steps']} steps / {result['tokens_seen']} tokens in {result['wall_s']:.0f} s",
            flush=True,
        )
    print(f"book (chapter 5): train loss {BOOK_REPORTED['train_loss']}, val loss {BOOK_REPORTED['val_loss']}")
    if len(results) > 1:
        for key in ("train_loss", "val_loss"):
            values = torch.tensor([r[key] for r in results])
            print(
                f"{key} over seeds {args.seeds}: mean {values.mean():.3f}, std {values.std():.3f}, "
                f"min {values.min():.3f}, max {values.max():.3f}"
            )


if __name__ == "__main__":
    main()
