"""The trainers' params for tests that build them in Python: the stage's model validated with
these test values under the fields a test names; llmcore's ``TrainConfig`` likewise. (The
product's values live in params.yaml only: ``TrainParams`` has no defaults; its ``training``
section gives the shared ones.)"""

from __future__ import annotations

from typing import Any, TypeVar

from benchmarks.train_settings import BENCH_TRAIN
from llmcore.train import TrainConfig
from llmpipe.training import TrainParams

P = TypeVar("P", bound=TrainParams)

TEST_TRAINING: dict[str, Any] = {
    "epochs": 1,
    "batch_size": 8,
    "grad_accum_steps": 1,
    "lr": 5e-5,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.1,
    "betas": [0.9, 0.999],
    "schedule": "constant",
    "warmup_steps": 0,
    "grad_clip": None,
    "eval_every": 5,
    "eval_batches": 5,
    "checkpoint_every": 0,
    "seed": 123,
    "device": "auto",
    "precision": "fp32",
    "compile": False,
}


def trainer_params(params_model: type[P], /, **fields: Any) -> P:
    """A trainer's params: the shared test values, its own (tests/params_values.py), then ``fields``."""
    from tests.params_values import params_for  # imports every stage: only when a test builds params

    return params_for(params_model, **{**TEST_TRAINING, **fields})


# llmcore's TrainConfig for tests of the loop itself: the settings the benchmarks state (the book's
# chapter 5 AdamW, what llmcore defaulted to before it took no defaults), no progress bar.
TEST_CONFIG: dict[str, Any] = BENCH_TRAIN


def train_config(**fields: Any) -> TrainConfig:
    return TrainConfig(**{**TEST_CONFIG, **fields})
