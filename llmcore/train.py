"""One training loop for pretraining and both fine-tunes.

``train`` runs AdamW with weight decay, linear warmup + cosine decay, gradient clipping and
gradient accumulation over a Dataset, evaluates train/val loss every ``eval_every`` steps, and
saves a resumable training state every ``checkpoint_every`` steps. A run resumed from that state
replays the same batches with the same RNG, so it ends with the same weights as a run that was
never interrupted. What differs between tasks is only the ``loss_fn`` (and optional extra
evaluation metrics); steps observe progress through ``TrainCallback`` without llmcore knowing
about MLflow.

Under torchrun (``llmcore.distributed.init_distributed``) the same loop runs data-parallel with
PyTorch's DistributedDataParallel: ``batch_size`` stays the global micro-batch, split evenly over
the ranks, so N processes follow the same schedule and sample order as one (docs/distributed.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from llmcore import distributed
from llmcore.checkpoint import unique_state_dict, load_state_strict
from llmcore.data import ResumableSampler
from llmcore.fileio import atomic_path
from llmcore.model import GPTModel

Batch = Sequence[torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
EvalFn = Callable[[nn.Module, DataLoader, int | None], dict[str, float]]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


class ResumeMismatchError(ValueError):
    """A saved training state was made with different settings than the run trying to resume it."""


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 2  # global micro-batch: under DDP each of N ranks takes batch_size // N
    lr: float = 4e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: str = "cosine"  # "cosine" or "constant" (the book's chapter 5 uses constant)
    grad_clip: float | None = 1.0
    grad_accum_steps: int = 1
    eval_every: int = 5  # optimizer steps; 0 evaluates only at the end of each epoch
    eval_batches: int | None = 5  # batches per evaluation; None = the whole split
    checkpoint_every: int = 0  # optimizer steps; 0 = only at epoch ends (when a dir is given)
    drop_last: bool = True
    shuffle: bool = True
    seed: int = 123
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.grad_accum_steps < 1:
            raise ValueError("epochs, batch_size and grad_accum_steps must be >= 1")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.lr <= 0 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("lr must be > 0, warmup_steps >= 0, min_lr_ratio in [0, 1]")
        # A negative interval would fire on every step; zero evaluation batches would log NaN losses.
        if self.eval_every < 0 or self.checkpoint_every < 0 or (self.eval_batches is not None and self.eval_batches < 1):
            raise ValueError("eval_every and checkpoint_every must be >= 0, eval_batches >= 1 or None")

    def fingerprint(self) -> str:
        """What must match for a saved state to be resumed (progress display may differ)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "progress"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    micro_batch: int = 0  # micro-batches of the current epoch already consumed
    tokens_seen: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per evaluation


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


@torch.no_grad()
def _shard_loss_sum(model: nn.Module, loader: DataLoader, loss_fn: LossFn, n_samples: int, batch_size: int) -> float:
    """This rank's part of ``evaluate_loss``: summed over ranks and divided by the number of
    global batches, it is what one process computes over the same ``n_samples``.

    Rank batch k holds this rank's share of the single-process batch k, so its loss is weighted by
    its share of that batch's samples (exact when every sample weighs the same in the loss).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    try:
        for k, batch in enumerate(loader):
            global_size = min(batch_size, n_samples - k * batch_size)
            total += loss_fn(model, [t.to(device) for t in batch]).item() * len(batch[0]) / global_size
    finally:
        model.train(was_training)
    return total


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


STATE_DIR = "train_state"


def _rank_rng(device: torch.device) -> dict[str, torch.Tensor | None]:
    """This process's RNG state; under DDP only its own GPU's (not every visible GPU's)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _restore_rank_rng(saved: list[dict] | None, device: torch.device, seed: int) -> None:
    """Each rank continues its own RNG stream when the state was saved by as many ranks.

    Otherwise rank 0 keeps the saved main stream and the other ranks start fresh ones: after a
    change of world size only dropout masks can differ from an uninterrupted run.
    """
    rank = distributed.rank()
    if saved is not None and len(saved) == distributed.world_size():
        torch.set_rng_state(saved[rank]["cpu"])
        if saved[rank]["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(saved[rank]["cuda"], device)
    elif rank > 0:
        torch.manual_seed(seed + rank)


def _save_state(directory: Path, model, optimizer, scheduler, state: TrainState, fingerprint: str,
                rank_rngs: list[dict] | None = None) -> Path:
    target = directory / STATE_DIR
    with atomic_path(target, is_dir=True) as tmp:
        save_file(unique_state_dict(model), str(tmp / "model.safetensors"))
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and rank_rngs is None else [],
                "fingerprint": fingerprint,
                **({"rank_rngs": rank_rngs} if rank_rngs is not None else {}),
            },
            tmp / "optimizer.pt",
        )
        (tmp / "state.json").write_text(json.dumps(dataclasses.asdict(state), indent=2))
    return target


def _load_state(directory: Path, model, optimizer, scheduler, fingerprint: str,
                device: torch.device | None = None, seed: int = 0) -> TrainState:
    source = directory / STATE_DIR
    extra = torch.load(source / "optimizer.pt", map_location="cpu", weights_only=True)
    if extra["fingerprint"] != fingerprint:
        raise ResumeMismatchError(
            f"{source} was saved with different training settings; delete it to start over"
        )
    load_state_strict(model, load_file(str(source / "model.safetensors")), str(source / "model.safetensors"))
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng"])
    if extra["cuda_rng"] and torch.cuda.is_available() and not distributed.is_distributed():
        torch.cuda.set_rng_state_all(extra["cuda_rng"])
    if distributed.is_distributed():
        _restore_rank_rng(extra.get("rank_rngs"), device, seed)
    return TrainState(**json.loads((source / "state.json").read_text()))


def has_train_state(directory: str | Path | None) -> bool:
    return directory is not None and (Path(directory) / STATE_DIR / "state.json").is_file()


def _found_by_all_ranks(directory: str | Path | None) -> bool:
    """``has_train_state`` that fails if only some ranks (nodes) can see the saved state."""
    found = has_train_state(directory)
    count = distributed.all_reduce_sum([float(found)])[0]
    if 0 < count < distributed.world_size():
        raise ResumeMismatchError(
            f"{directory}/{STATE_DIR} is visible to {int(count)} of {distributed.world_size()} ranks: "
            "put state_dir on storage every node can read"
        )
    return found


class _LossModule(nn.Module):
    """Runs ``loss_fn`` inside DistributedDataParallel's forward, so a loss_fn may call any method
    of the model (``hidden_states``, ``cfg``) and still have its gradients synchronised."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


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
    rank, world = distributed.rank(), distributed.world_size()
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} (global) does not split over {world} processes")
    rank_batch = config.batch_size // world
    callbacks = callbacks if rank == 0 else ()
    torch.manual_seed(config.seed + rank)  # rank 0 draws what a single process draws
    sampler = ResumableSampler(train_data, shuffle=config.shuffle, seed=config.seed,
                               num_replicas=world, rank=rank, drop_last=config.drop_last)
    # Each loader gets its own generator: creating an iterator would otherwise draw from the global
    # RNG (which dropout uses) and a resumed run would see different dropout masks.
    def make_loader(data: Dataset, **kwargs) -> DataLoader:
        return DataLoader(data, batch_size=rank_batch, collate_fn=collate_fn,
                          generator=torch.Generator().manual_seed(config.seed), **kwargs)

    eval_data = {"train": train_data} if val_data is None else {"train": train_data, "val": val_data}
    eval_sizes = {  # samples one evaluation covers
        split: len(data) if config.eval_batches is None else min(len(data), config.eval_batches * config.batch_size)
        for split, data in eval_data.items()
    }

    def make_eval_loader(split: str) -> DataLoader:
        if world == 1:
            return make_loader(eval_data[split])
        # Every world-th sample: this rank's batch k is its share of the single-process batch k.
        return make_loader(Subset(eval_data[split], range(rank, eval_sizes[split], world)))

    eval_loaders = {split: make_eval_loader(split) for split in eval_data}
    loader = make_loader(train_data, sampler=sampler, drop_last=config.drop_last)
    micro_per_epoch = len(loader)
    if micro_per_epoch == 0:
        raise ValueError(
            f"training data has {len(train_data)} samples: not one batch of {config.batch_size}"
        )
    steps_per_epoch = math.ceil(micro_per_epoch / config.grad_accum_steps)
    total_steps = steps_per_epoch * config.epochs
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))
    fingerprint = config.fingerprint() + fingerprint_extra
    state = TrainState()
    if resume and _found_by_all_ranks(state_dir):
        state = _load_state(Path(state_dir), model, optimizer, scheduler, fingerprint, device, config.seed)
    ddp = None
    if world > 1:
        ddp = DistributedDataParallel(_LossModule(model, loss_fn),
                                      device_ids=[device.index] if device.type == "cuda" else None)

    def forward_loss(batch: Batch) -> torch.Tensor:
        return loss_fn(model, batch) if ddp is None else ddp(batch)

    def run_eval() -> None:
        metrics = {"step": state.step, "epoch": state.epoch, "tokens_seen": state.tokens_seen}
        for split, eval_loader in eval_loaders.items():
            if world == 1:
                metrics[f"{split}_loss"] = evaluate_loss(model, eval_loader, loss_fn, config.eval_batches)
                extra = eval_fn(model, eval_loader, config.eval_batches) if eval_fn is not None else {}
            else:  # each rank evaluates its share; eval_fn values are weighted by share size
                n, shard = eval_sizes[split], len(eval_loader.dataset)
                shares = distributed.all_gather_object((
                    _shard_loss_sum(model, eval_loader, loss_fn, n, config.batch_size), shard,
                    eval_fn(model, eval_loader, None) if eval_fn is not None and shard else {},
                ))
                metrics[f"{split}_loss"] = sum(loss for loss, _, _ in shares) / math.ceil(n / config.batch_size)
                extra = {name: sum(size * values[name] for _, size, values in shares if size) / n
                         for name in shares[0][2]}
            for name, value in extra.items():
                metrics[f"{split}_{name}"] = value
        state.history.append(metrics)
        for cb in callbacks:
            cb.on_eval(state, metrics)

    def save() -> None:
        if state_dir is None:
            return
        rank_rngs = distributed.all_gather_object(_rank_rng(device)) if world > 1 else None
        if rank == 0:
            path = _save_state(Path(state_dir), model, optimizer, scheduler, state, fingerprint, rank_rngs)
            for cb in callbacks:
                cb.on_checkpoint(state, path)
        distributed.barrier()  # no rank goes on (or ends) before the state is on disk

    bar = tqdm(total=total_steps, initial=state.step, disable=not config.progress or rank != 0,
               desc="train", unit="step")
    model.train()
    try:
        while state.epoch < config.epochs:
            sampler.set_epoch(state.epoch, state.micro_batch * rank_batch)
            batches = iter(loader)
            while state.micro_batch < micro_per_epoch:
                started = time.perf_counter()
                group = min(config.grad_accum_steps, micro_per_epoch - state.micro_batch)
                optimizer.zero_grad(set_to_none=True)
                step_loss, step_tokens = 0.0, 0
                for i in range(group):
                    batch = [t.to(device) for t in next(batches)]
                    # Under DDP only the step's last backward all-reduces the accumulated gradients.
                    with nullcontext() if ddp is None or i == group - 1 else ddp.no_sync():
                        loss = forward_loss(batch)
                        if not torch.isfinite(loss):
                            raise TrainingDivergedError(
                                f"loss became {loss.item()} at epoch {state.epoch + 1}, step {state.step + 1}"
                            )
                        (loss / group).backward()
                    step_loss += loss.item() / group
                    step_tokens += batch[0].numel()
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                if world > 1:  # the step's mean loss and token count over all ranks
                    loss_sum, tokens_sum = distributed.all_reduce_sum([step_loss, step_tokens])
                    step_loss, step_tokens = loss_sum / world, round(tokens_sum)
                state.step += 1
                state.micro_batch += group
                state.tokens_seen += step_tokens
                elapsed = time.perf_counter() - started
                step_metrics = {"loss": step_loss, "lr": lr, "tokens_seen": state.tokens_seen,
                                "tokens_per_s": step_tokens / elapsed if elapsed > 0 else float("nan")}
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}")
                for cb in callbacks:
                    cb.on_step_end(state, step_metrics)
                if config.eval_every and state.step % config.eval_every == 0:
                    run_eval()
                if config.checkpoint_every and state.step % config.checkpoint_every == 0:
                    save()
            if not config.eval_every or state.step % config.eval_every != 0:
                run_eval()  # every epoch ends with an evaluation
            for cb in callbacks:
                cb.on_epoch_end(state, model)
            state.epoch += 1
            state.micro_batch = 0
            save()
    finally:
        bar.close()
    return state
