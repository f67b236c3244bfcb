"""The training loop: exact resume, schedule, accumulation, weight decay, callbacks, divergence."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from llmcore import GPTConfig, GPTModel
from llmcore.data import SlidingWindowDataset
from llmcore.train import (
    ResumeMismatchError,
    TrainCallback,
    TrainingDivergedError,
    build_optimizer,
    evaluate_loss,
    lr_lambda,
    next_token_loss,
    train,
)
from tests.trainer_params import train_config

CFG = GPTConfig(vocab_size=32, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.1)
# 2 epochs of 10 micro-batches of 2, accumulated in pairs: 5 optimizer steps per epoch.
RESUME_CONFIG = train_config(
    epochs=2,
    batch_size=2,
    lr=3e-3,
    grad_accum_steps=2,
    warmup_steps=2,
    eval_every=2,
    eval_batches=2,
    checkpoint_every=3,
    seed=7,
    progress=False,
)


def make_model(seed: int = 0, **overrides) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(GPTConfig(**{**CFG.to_dict(), **overrides}))


def windows(n_windows: int, seed: int = 0) -> SlidingWindowDataset:
    tokens = np.random.default_rng(seed).integers(0, CFG.vocab_size, n_windows * 8 + 1)
    return SlidingWindowDataset(tokens, max_length=8, stride=8)


class Recorder(TrainCallback):
    def __init__(self, stop_after: int | None = None):
        self.steps, self.evals, self.checkpoints, self.epochs = [], [], [], []
        self.stop_after = stop_after

    def on_step_end(self, state, metrics):
        self.steps.append((state.step, dict(metrics)))
        if state.step == self.stop_after:
            raise KeyboardInterrupt

    def on_eval(self, state, metrics):
        self.evals.append(dict(metrics))

    def on_epoch_end(self, state, model):
        self.epochs.append(state.epoch)

    def on_checkpoint(self, state, path):
        self.checkpoints.append((state.step, sorted(p.name for p in path.iterdir())))


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path: Path) -> None:
    train_data, val_data = windows(20), windows(6, seed=1)
    full_model = make_model()
    full = train(full_model, train_data, val_data, RESUME_CONFIG, state_dir=tmp_path / "full")

    interrupted = Recorder(stop_after=7)  # the last saved state is step 6
    with pytest.raises(KeyboardInterrupt):
        train(make_model(), train_data, val_data, RESUME_CONFIG, callbacks=[interrupted], state_dir=tmp_path / "run")
    assert [step for step, _ in interrupted.checkpoints] == [3, 5, 6]  # every 3 steps + the epoch end

    resumed_model = make_model(seed=99)  # weights come from the saved state, not from this init
    resumed_log = Recorder()
    resumed = train(
        resumed_model, train_data, val_data, RESUME_CONFIG, callbacks=[resumed_log], state_dir=tmp_path / "run"
    )
    assert [step for step, _ in resumed_log.steps] == [7, 8, 9, 10]
    assert full.step == resumed.step == 10 and full.tokens_seen == resumed.tokens_seen == 2 * 20 * 8
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.history == full.history
    assert [h["step"] for h in full.history] == [2, 4, 5, 6, 8, 10]  # every 2 steps + epoch ends


@pytest.mark.parametrize("damage", ["optimizer.pt", "model.safetensors", "state.json"])
def test_an_unreadable_state_is_set_aside_once_and_training_starts_over(tmp_path: Path, damage: str) -> None:
    train_data = windows(20)
    with pytest.raises(KeyboardInterrupt):
        train(make_model(), train_data, None, RESUME_CONFIG, callbacks=[Recorder(stop_after=4)], state_dir=tmp_path)
    saved = tmp_path / "train_state" / damage
    saved.write_bytes(saved.read_bytes()[: len(saved.read_bytes()) // 2])  # truncated, as by a full disk
    fresh_model, log = make_model(), Recorder()
    with pytest.warns(RuntimeWarning, match=r"cannot resume from .*train_state.*moved it to .*unreadable"):
        state = train(fresh_model, train_data, None, RESUME_CONFIG, callbacks=[log], state_dir=tmp_path)
    assert log.steps[0][0] == 1 and state.step == 10  # started over from step 1 and finished
    (aside,) = tmp_path.glob("train_state.unreadable-*")
    assert (aside / damage).is_file()  # kept for a look, not deleted
    reference = make_model()
    train(reference, train_data, None, RESUME_CONFIG)
    for (name, a), b in zip(reference.state_dict().items(), fresh_model.state_dict().values()):
        assert torch.equal(a, b), name  # the fresh start is an ordinary run: same weights


class Planted:
    """Not a tensor nor a plain value: what a planted pickle would carry (never instantiated on load)."""


def test_a_planted_pickle_is_set_aside_in_our_words(tmp_path: Path) -> None:
    train_data = windows(20)
    with pytest.raises(KeyboardInterrupt):
        train(make_model(), train_data, None, RESUME_CONFIG, callbacks=[Recorder(stop_after=4)], state_dir=tmp_path)
    torch.save({"fingerprint": "x", "payload": Planted()}, tmp_path / "train_state" / "optimizer.pt")
    with pytest.warns(RuntimeWarning) as caught:
        train(make_model(), train_data, None, RESUME_CONFIG, state_dir=tmp_path)
    (message,) = [str(w.message) for w in caught if "cannot resume" in str(w.message)]
    assert message.startswith(
        f"cannot resume from {tmp_path / 'train_state' / 'optimizer.pt'}: not a state this code "
        "wrote (it holds pickled objects beyond tensors and plain values, which are never "
        "unpickled); moved it to "
    )
    assert "weights_only" not in message and "Re-running" not in message


def test_resume_with_different_settings_is_refused(tmp_path: Path) -> None:
    config = train_config(batch_size=2, eval_every=0, eval_batches=1, progress=False)
    train(make_model(), windows(4), None, config, state_dir=tmp_path)
    changed = train_config(batch_size=2, eval_every=0, eval_batches=1, progress=False, lr=1e-3)
    with pytest.raises(ResumeMismatchError, match="different training settings"):
        train(make_model(), windows(4), None, changed, state_dir=tmp_path)
    with pytest.raises(ResumeMismatchError):
        train(make_model(), windows(4), None, config, state_dir=tmp_path, fingerprint_extra="other-data")
    # Only the progress display may differ, and resume=False starts over.
    train(make_model(), windows(4), None, dataclasses.replace(config, progress=True), state_dir=tmp_path)
    assert train(make_model(), windows(4), None, changed, state_dir=tmp_path, resume=False).step == 2


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_stops_training(bad: float) -> None:
    def diverging_loss(model, batch):
        return model(batch[0]).sum() * bad

    with pytest.raises(TrainingDivergedError, match=rf"loss became {bad} at epoch 1, step 1"):
        train(make_model(), windows(4), None, train_config(progress=False), loss_fn=diverging_loss)


def test_lr_schedule_warmup_then_cosine_to_min() -> None:
    config = train_config(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    factor = lr_lambda(config, total_steps=14)
    assert [factor(s) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert factor(9) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the 10 decay steps
    assert factor(14) == pytest.approx(0.1) and factor(30) == pytest.approx(0.1)
    values = [factor(s) for s in range(4, 15)]
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly decreasing
    constant = lr_lambda(train_config(lr=1.0, warmup_steps=2, schedule="constant"), total_steps=14)
    assert [constant(s) for s in (0, 1, 2, 13)] == [0.5, 1.0, 1.0, 1.0]


def test_lr_used_by_each_step_follows_the_schedule() -> None:
    config = train_config(
        batch_size=2, lr=1e-3, warmup_steps=2, min_lr_ratio=0.2, eval_every=0, eval_batches=1, progress=False
    )
    log = Recorder()
    train(make_model(), windows(12), None, config, callbacks=[log])  # 6 steps
    factor = lr_lambda(config, total_steps=6)
    assert [m["lr"] for _, m in log.steps] == pytest.approx([1e-3 * factor(s) for s in range(6)])
    assert log.steps[-1][1]["lr"] > 1e-3 * 0.2


def test_grad_accumulation_matches_a_larger_batch() -> None:
    data = windows(4)
    common = dict(lr=1e-2, eval_every=0, eval_batches=1, progress=False)
    big, accumulated = make_model(drop_rate=0.0), make_model(drop_rate=0.0)
    train(big, data, None, train_config(batch_size=4, **common))
    train(accumulated, data, None, train_config(batch_size=2, grad_accum_steps=2, **common))
    untrained = make_model(drop_rate=0.0)
    for (name, a), b, before in zip(
        big.state_dict().items(), accumulated.state_dict().values(), untrained.state_dict().values()
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    assert not torch.equal(big.tok_emb.weight, untrained.tok_emb.weight)  # one step was taken


def test_weight_decay_only_on_matrices() -> None:
    model = make_model()
    decay, no_decay = build_optimizer(model, train_config(weight_decay=0.3)).param_groups
    assert decay["weight_decay"] == 0.3 and no_decay["weight_decay"] == 0.0
    assert decay["params"] and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["params"] and all(p.dim() < 2 for p in no_decay["params"])
    ids = {id(p) for p in decay["params"] + no_decay["params"]}
    assert ids == {id(p) for p in model.parameters()}  # the tied head counted once
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_callbacks_see_losses_and_tokens(tmp_path: Path) -> None:
    log = Recorder()
    config = train_config(
        epochs=2, batch_size=2, grad_accum_steps=2, eval_every=2, eval_batches=1, checkpoint_every=0, progress=False
    )

    def accuracy(model, loader, max_batches):
        return {"acc": 0.5}

    state = train(
        make_model(), windows(8), windows(4, seed=1), config, eval_fn=accuracy, callbacks=[log], state_dir=tmp_path
    )
    tokens = [m["tokens_seen"] for _, m in log.steps]
    assert tokens == [2 * 2 * 8 * (i + 1) for i in range(4)]  # batch x accum x context per step
    assert log.evals == state.history and [e["step"] for e in log.evals] == [2, 4]
    for metrics in log.evals:
        assert {"step", "epoch", "tokens_seen", "train_loss", "val_loss", "train_acc", "val_acc"} <= set(metrics)
        assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss"])
        assert metrics["train_acc"] == metrics["val_acc"] == 0.5
    assert log.epochs == [0, 1]
    saved_files = ["model.safetensors", "optimizer.pt", "state.json"]
    assert log.checkpoints == [(2, saved_files), (4, saved_files)]  # epoch ends (checkpoint_every=0)


def test_loss_decreases_when_overfitting_a_tiny_corpus() -> None:
    data = SlidingWindowDataset(np.tile(np.arange(9), 8), max_length=8, stride=8)  # 8 windows, one pattern
    model = make_model(drop_rate=0.0)
    before = evaluate_loss(model, DataLoader(data, batch_size=4), next_token_loss)
    config = train_config(
        epochs=20, batch_size=4, lr=1e-2, eval_every=0, eval_batches=None, progress=False, weight_decay=0.0
    )
    state = train(model, data, data, config)
    after = state.history[-1]["train_loss"]
    assert before > 3.0 and after < 1.0, (before, after)  # ln(32) = 3.47: from chance towards memorised
    assert after == state.history[-1]["val_loss"]


def test_too_little_data_for_one_batch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not one batch of 4"):
        train(make_model(), windows(3), None, train_config(batch_size=4, progress=False))


@pytest.mark.parametrize(
    "bad",
    [
        {"epochs": 0},
        {"grad_accum_steps": 0},
        {"lr": 0.0},
        {"warmup_steps": -1},
        {"min_lr_ratio": 1.5},
        {"schedule": "linear"},
        {"eval_every": -1},
        {"checkpoint_every": -2},
        {"eval_batches": 0},
    ],
)
def test_invalid_train_config_is_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        train_config(**bad)


class StopAtEval(TrainCallback):
    def on_eval(self, state, metrics):
        raise KeyboardInterrupt


def test_resume_between_last_step_and_epoch_end_with_partial_batch(tmp_path: Path) -> None:
    # 9 samples in batches of 2: the epoch's last batch is partial, and the state saved after its
    # step resumes at sample 10 of 9. Interrupted at the epoch-end evaluation, it must still finish.
    config = train_config(
        epochs=2,
        batch_size=2,
        drop_last=False,
        eval_every=0,
        eval_batches=1,
        checkpoint_every=5,
        seed=3,
        progress=False,
    )
    full_model = make_model()
    full = train(full_model, windows(9), None, config, state_dir=tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        train(make_model(), windows(9), None, config, callbacks=[StopAtEval()], state_dir=tmp_path / "run")
    resumed_model = make_model(seed=5)
    resumed = train(resumed_model, windows(9), None, config, state_dir=tmp_path / "run")
    assert resumed.history == full.history and resumed.step == full.step == 10
    assert all(torch.equal(a, b) for a, b in zip(full_model.parameters(), resumed_model.parameters()))
