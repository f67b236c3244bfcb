"""One training loop for pretraining and both fine-tunes.

``train`` runs AdamW with weight decay, linear warmup + cosine decay, gradient clipping and
gradient accumulation over a Dataset, evaluates train/val loss every ``eval_every`` steps, and
saves a resumable training state every ``checkpoint_every`` steps. A run resumed from that state
replays the same batches with the same RNG, so it ends with the same weights as a run that was
never interrupted. What differs between tasks is only the ``loss_fn`` (and optional extra
evaluation metrics); steps observe progress through ``TrainCallback`` without llmcore knowing
about MLflow.

Speed switches (``TrainConfig``): ``precision`` (fp32 or autocast mixed precision over fp32
weights, llmcore.precision) and ``compile`` (torch.compile of the loss, for training and
evaluation). Every step reports tokens/s, MFU and peak memory (llmcore.throughput).

Under torchrun (``llmcore.distributed.init_distributed``) the same loop runs data-parallel with
PyTorch's DistributedDataParallel: ``batch_size`` stays the global micro-batch, split evenly over
the ranks, so N processes follow the same schedule and sample order as one (docs/distributed.md).
One process is the group of one: every collective below returns its input.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from llmcore import distributed
from llmcore import precision as amp
from llmcore import train_state as states
from llmcore.data import TrainLoaders, make_train_loaders
from llmcore.model import GPTModel
from llmcore.throughput import Throughput
from llmcore.train_state import STATE_DIR, Resumable, ResumeMismatchError, TrainState, has_train_state

__all__ = [
    "STATE_DIR",
    "ResumeMismatchError",
    "TrainCallback",
    "TrainConfig",
    "TrainState",
    "TrainingDivergedError",
    "build_optimizer",
    "evaluate_loss",
    "has_train_state",
    "lr_lambda",
    "next_token_loss",
    "train",
]

Batch = Sequence[torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
EvalFn = Callable[[nn.Module, DataLoader, int | None], dict[str, float]]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How ``train`` trains. The settings have no defaults here: the pipeline's values are in
    params.yaml (its trainers' sections over ``training``), a library caller states its own; only
    the loop's switches below the settings default."""

    epochs: int
    batch_size: int  # global micro-batch: under DDP each of N ranks takes batch_size // N
    lr: float  # peak learning rate (after warmup)
    min_lr_ratio: float  # cosine decays to lr * min_lr_ratio
    weight_decay: float  # AdamW's, on matrices only
    betas: tuple[float, float]  # AdamW's
    warmup_steps: int  # linear warmup from 0, in optimizer steps
    schedule: str  # "cosine" or "constant" (the book's chapter 5 uses constant)
    grad_clip: float | None  # max gradient norm; None: no clipping
    grad_accum_steps: int  # micro-batches per optimizer step
    eval_every: int  # optimizer steps; 0 evaluates only at the end of each epoch
    eval_batches: int | None  # batches per evaluation; None = the whole split
    checkpoint_every: int  # optimizer steps; 0 = only at epoch ends (when a dir is given)
    seed: int  # model-independent randomness: sample order, dropout
    precision: str  # fp32 | bf16-mixed | fp16-mixed | auto (llmcore.precision)
    compile: bool  # torch.compile the loss (training and evaluation)
    drop_last: bool = True  # the epoch's incomplete last micro-batch is dropped (the book's loader)
    shuffle: bool = True
    progress: bool = True  # a tqdm bar

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.grad_accum_steps < 1:
            raise ValueError("epochs, batch_size and grad_accum_steps must be >= 1")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.lr <= 0 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("lr must be > 0, warmup_steps >= 0, min_lr_ratio in [0, 1]")
        # A negative interval would fire on every step; zero evaluation batches would log NaN losses.
        if (
            self.eval_every < 0
            or self.checkpoint_every < 0
            or (self.eval_batches is not None and self.eval_batches < 1)
        ):
            raise ValueError("eval_every and checkpoint_every must be >= 0, eval_batches >= 1 or None")
        if self.precision not in amp.PRECISIONS:
            raise ValueError(f"precision must be one of {amp.PRECISIONS}, got {self.precision!r}")

    def fingerprint(self) -> str:
        """What must match for a saved state to be resumed (progress display may differ)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "progress"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


class TrainCallback:
    """Hooks a step can override to log progress (MLflow, printing, sample generations)."""

    def on_step_end(self, state: TrainState, metrics: dict[str, float]) -> None: ...

    def on_eval(self, state: TrainState, metrics: dict[str, float]) -> None: ...

    def on_epoch_end(self, state: TrainState, model: nn.Module) -> None: ...

    def on_checkpoint(self, state: TrainState, path: Path) -> None: ...


def next_token_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of every position's next token; targets of -100 are ignored.

    A GPTModel computes it with ``GPTModel.loss`` (head and loss fused, a chunk of rows at a time).
    """
    inputs, targets = batch[0], batch[1]
    if isinstance(model, GPTModel):
        return model.loss(inputs, targets)
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate_loss(model: nn.Module, loader: DataLoader, loss_fn: LossFn, max_batches: int | None = None) -> float:
    """Mean loss over the first ``max_batches`` batches (all when None); NaN for an empty loader."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for batch in itertools.islice(loader, max_batches):  # reads no batch beyond the last
            total += loss_fn(model, [t.to(device) for t in batch]).item()
            count += 1
    finally:
        model.train(was_training)
    return total / count if count else float("nan")


def lr_lambda(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of ``lr`` at an optimizer step: linear warmup, then constant or cosine decay."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "constant":
            return 1.0
        decay_steps = max(1, total_steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine

    return factor


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel updates each tensor in one pass over memory instead of a dozen (about 5x
    # faster per step on CPU); dtypes or devices it does not cover keep the foreach version.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    implementation = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, **implementation)


class _LossModule(nn.Module):
    """``loss_fn`` as a module, what DDP wraps (a loss_fn may call any model method and still have
    its gradients synchronised) and torch.compile compiles."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


@dataclass
class _Trainer:
    """What one optimizer step, one evaluation and one checkpoint need, built once by ``train``."""

    config: TrainConfig
    parts: Resumable  # model, optimizer, schedule, loss scaler: what a saved state restores
    precision: str
    train_loss: nn.Module  # the loss as a module: DDP-wrapped and/or compiled
    eval_loss: nn.Module  # the same, never DDP-wrapped (ranks evaluate different batch counts)
    eval_model: nn.Module  # what eval_fn gets: the model, compiled when config.compile
    eval_fn: EvalFn | None
    loaders: TrainLoaders
    throughput: Throughput
    callbacks: Sequence[TrainCallback]
    state_dir: Path | None
    fingerprint: str

    def step(self, batches: Iterator[Batch], n_micro: int, state: TrainState) -> dict[str, float]:
        """One optimizer step over ``n_micro`` accumulated micro-batches; updates ``state``."""
        started = time.perf_counter()
        optimizer, scaler, device = self.parts.optimizer, self.parts.scaler, self.parts.device
        lr = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad(set_to_none=True)
        step_loss, tokens, flops = 0.0, 0, 0.0
        for i in range(n_micro):
            batch = [t.to(device, non_blocking=True) for t in next(batches)]
            with distributed.gradient_sync(self.train_loss, sync=i == n_micro - 1):
                with amp.autocast(self.precision, device):
                    loss = self.train_loss(batch)
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(
                        f"loss became {loss.item()} at epoch {state.epoch + 1}, step {state.step + 1}"
                    )
                scaler.scale(loss / n_micro).backward()
            step_loss += loss.item() / n_micro
            tokens += batch[0].numel()
            flops += self.throughput.flops(batch[0])
        if self.config.grad_clip:
            scaler.unscale_(optimizer)  # clip the true gradients, not the fp16 loss-scaled ones
            torch.nn.utils.clip_grad_norm_(self.parts.model.parameters(), self.config.grad_clip)
        scale = scaler.get_scale() if scaler.is_enabled() else 0.0
        scaler.step(optimizer)  # fp16: skipped (and the scale lowered) when a gradient is inf/NaN
        scaler.update()
        state.skipped_steps += int(scaler.is_enabled() and scaler.get_scale() < scale)
        self.parts.scheduler.step()
        loss_sum, tokens, flops = distributed.all_reduce_sum([step_loss, tokens, flops])  # over all ranks
        state.step, state.micro_batch = state.step + 1, state.micro_batch + n_micro
        state.tokens_seen += round(tokens)
        return {
            "loss": loss_sum / distributed.world_size(),
            "lr": lr,
            "tokens_seen": state.tokens_seen,
            "skipped_steps": state.skipped_steps,
            **self.throughput.figures(round(tokens), flops, time.perf_counter() - started),
        }

    @torch.no_grad()
    def evaluate(self, state: TrainState) -> None:
        """Loss (and eval_fn's metrics) of every split; each rank evaluates its share."""
        metrics = {"step": state.step, "epoch": state.epoch, "tokens_seen": state.tokens_seen}
        model = self.parts.model
        model.eval()
        try:
            for split, loader in self.loaders.eval.items():
                metrics.update(self._evaluate_split(split, loader))
        finally:
            model.train()
        state.history.append(metrics)
        for cb in self.callbacks:
            cb.on_eval(state, metrics)

    def _evaluate_split(self, split: str, loader: DataLoader) -> dict[str, float]:
        """Summed over ranks, this rank's share gives what one process computes over the split:
        rank batch k is its share of the global batch k, weighted by its share of the samples."""
        n, shard_size, batch_size = self.loaders.eval_samples[split], len(loader.dataset), self.config.batch_size
        loss_sum, extra = 0.0, {}
        with amp.autocast(self.precision, self.parts.device):
            for k, batch in enumerate(loader):
                global_size = min(batch_size, n - k * batch_size)
                loss = self.eval_loss([t.to(self.parts.device, non_blocking=True) for t in batch]).item()
                loss_sum += loss * (len(batch[0]) / global_size)
            if self.eval_fn is not None and shard_size:
                extra = self.eval_fn(self.eval_model, loader, None)
        shares = distributed.all_gather_object((loss_sum, shard_size, extra))
        n_batches = math.ceil(n / batch_size)
        metrics = {f"{split}_loss": sum(loss for loss, _, _ in shares) / n_batches if n_batches else float("nan")}
        for name in shares[0][2]:
            metrics[f"{split}_{name}"] = sum(size / n * values[name] for _, size, values in shares if size)
        return metrics

    def checkpoint(self, state: TrainState) -> None:
        if self.state_dir is None:
            return
        path = states.save_train_state(self.state_dir, self.parts, state, self.fingerprint)
        for cb in self.callbacks:
            cb.on_checkpoint(state, path)


def _loss_modules(
    model: nn.Module, loss_fn: LossFn, config: TrainConfig, device: torch.device
) -> tuple[nn.Module, nn.Module]:
    """The loss for training (DDP-wrapped in a process group) and for evaluation, compiled if asked."""
    loss = _LossModule(model, loss_fn)
    parallel = distributed.data_parallel(loss, device)
    if not config.compile:
        return parallel, loss
    compiled = torch.compile(loss)
    return (compiled if parallel is loss else torch.compile(parallel)), compiled


def _resume_or_start_fresh(state_dir: Path, parts: Resumable, fingerprint: str, seed: int) -> TrainState:
    """The saved state, or (when it cannot be read) a fresh start: the unreadable state is
    reported once and moved aside, so the next run does not trip over it again."""
    try:
        return states.load_train_state(state_dir, parts, fingerprint, seed)
    except states.UnreadableTrainState as exc:
        distributed.barrier()  # every rank has tried to read it before rank 0 moves it
        if distributed.is_main_process():
            aside = states.set_aside(state_dir)
            warnings.warn(
                f"cannot resume from {exc}; moved it to {aside} and starting over", RuntimeWarning, stacklevel=3
            )
        return TrainState()


def train(
    model: nn.Module,
    train_data: Dataset,
    val_data: Dataset | None,
    config: TrainConfig,
    *,
    loss_fn: LossFn = next_token_loss,
    eval_fn: EvalFn | None = None,
    collate_fn: Callable | None = None,
    callbacks: Sequence[TrainCallback] = (),
    state_dir: str | Path | None = None,
    resume: bool = True,
    fingerprint_extra: str = "",
) -> TrainState:
    """Train ``model`` in place; returns the final state (its ``history`` holds every evaluation).

    With ``state_dir`` the training state is saved there (and resumed from it when ``resume``).
    ``fingerprint_extra`` lets a caller add settings (model config, data) that must match on resume.

    In a process group (torchrun) the model is wrapped in DistributedDataParallel; each rank trains
    on its share of every global batch and evaluates its share of the evaluated batches (combined
    over ranks into the single-process figures); only rank 0 calls ``callbacks``, shows progress
    and writes the state.
    """
    device = next(model.parameters()).device
    precision = amp.resolve_precision(config.precision, device)
    amp.enable_tf32(device)
    main = distributed.is_main_process()
    torch.manual_seed(config.seed + distributed.rank())  # rank 0 draws what a single process draws
    loaders = make_train_loaders(train_data, val_data, config, collate_fn, device)
    micro_per_epoch = len(loaders.train)
    total_steps = math.ceil(micro_per_epoch / config.grad_accum_steps) * config.epochs
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))
    parts = Resumable(model, optimizer, scheduler, amp.grad_scaler(precision, device))
    fingerprint = config.fingerprint() + fingerprint_extra
    state = TrainState()
    if resume and states.found_by_all_ranks(state_dir):
        state = _resume_or_start_fresh(Path(state_dir), parts, fingerprint, config.seed)
    state.steps_per_epoch = total_steps // config.epochs
    train_loss, eval_loss = _loss_modules(model, loss_fn, config, device)
    trainer = _Trainer(
        config=config,
        parts=parts,
        precision=precision,
        train_loss=train_loss,
        eval_loss=eval_loss,
        eval_model=torch.compile(model) if config.compile and eval_fn else model,
        eval_fn=eval_fn,
        loaders=loaders,
        throughput=Throughput(model, device, precision, distributed.world_size()),
        callbacks=callbacks if main else (),
        state_dir=None if state_dir is None else Path(state_dir),
        fingerprint=fingerprint,
    )
    bar = tqdm(total=total_steps, initial=state.step, disable=not (config.progress and main), desc="train", unit="step")
    model.train()
    try:
        while state.epoch < config.epochs:
            batches = loaders.epoch_batches(state)
            while state.micro_batch < micro_per_epoch:
                n_micro = min(config.grad_accum_steps, micro_per_epoch - state.micro_batch)
                metrics = trainer.step(batches, n_micro, state)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}")
                for cb in trainer.callbacks:
                    cb.on_step_end(state, metrics)
                if config.eval_every and state.step % config.eval_every == 0:
                    trainer.evaluate(state)
                if config.checkpoint_every and state.step % config.checkpoint_every == 0:
                    trainer.checkpoint(state)
            if not config.eval_every or state.step % config.eval_every != 0:
                trainer.evaluate(state)  # every epoch ends with an evaluation
            for cb in trainer.callbacks:
                cb.on_epoch_end(state, model)
            state.epoch, state.micro_batch = state.epoch + 1, 0
            trainer.checkpoint(state)
    finally:
        bar.close()
    return state
