"""The training settings the benchmarks state (llmcore's ``TrainConfig`` takes no defaults): AdamW
as the book's chapter 5 has it (lr 4e-4, weight decay 0.1) with a cosine schedule, clipping at 1.0,
one micro-batch per step, fp32; each benchmark names what it changes."""

from __future__ import annotations

from typing import Any

from llmcore.train import TrainConfig

BENCH_TRAIN: dict[str, Any] = {
    "epochs": 1,
    "batch_size": 2,
    "lr": 4e-4,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.1,
    "betas": (0.9, 0.999),
    "warmup_steps": 0,
    "schedule": "cosine",
    "grad_clip": 1.0,
    "grad_accum_steps": 1,
    "eval_every": 5,
    "eval_batches": 5,
    "checkpoint_every": 0,
    "seed": 123,
    "precision": "fp32",
    "compile": False,
}


def bench_config(**fields: Any) -> TrainConfig:
    return TrainConfig(**{**BENCH_TRAIN, **fields})
