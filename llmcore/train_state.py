"""The resumable training state on disk, and what it takes to continue a run exactly.

``<state_dir>/train_state/`` holds the weights (``model.safetensors``), the optimizer, schedule,
loss-scaler and RNG states (``optimizer.pt``, tensors and plain values only, read back with
``torch.load(weights_only=True)``: nothing is unpickled) and the progress (``state.json``). The
RNG state is every rank's, gathered the same way with one process or many; rank 0 writes, every
rank reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmcore import distributed
from llmcore.checkpoint import load_state_strict, unique_state_dict
from llmcore.fileio import atomic_path

STATE_DIR = "train_state"


class ResumeMismatchError(ValueError):
    """A saved training state was made with different settings than the run trying to resume it."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    micro_batch: int = 0  # micro-batches of the current epoch already consumed
    tokens_seen: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per evaluation
    steps_per_epoch: int = 0  # optimizer steps in one epoch (set by train, for plots against epochs)
    skipped_steps: int = 0  # optimizer steps fp16's GradScaler skipped (inf/NaN gradients; 0 unless fp16-mixed)


@dataclass(frozen=True)
class Resumable:
    """The objects whose state a saved training state restores."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def has_train_state(directory: str | Path | None) -> bool:
    return directory is not None and (Path(directory) / STATE_DIR / "state.json").is_file()


def found_by_all_ranks(directory: str | Path | None) -> bool:
    """``has_train_state`` that fails if only some ranks (nodes) can see the saved state."""
    found = has_train_state(directory)
    count = distributed.all_reduce_sum([float(found)])[0]
    if 0 < count < distributed.world_size():
        raise ResumeMismatchError(
            f"{directory}/{STATE_DIR} is visible to {int(count)} of {distributed.world_size()} ranks: "
            "put state_dir on storage every node can read"
        )
    return found


def _rng_state(device: torch.device) -> dict[str, torch.Tensor | None]:
    """This process's RNG state: the CPU generator's and its own GPU's (not every visible GPU's)."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _restore_rng_state(saved: list[dict], device: torch.device, seed: int) -> None:
    """Each rank continues its own RNG stream when the state was saved by as many ranks.

    Otherwise rank 0 continues the saved rank 0's stream and the other ranks start fresh ones:
    after a change of world size only dropout masks can differ from an uninterrupted run.
    """
    rank = distributed.rank()
    if len(saved) != distributed.world_size() and rank > 0:
        torch.manual_seed(seed + rank)
        return
    mine = saved[rank if len(saved) == distributed.world_size() else 0]
    torch.set_rng_state(mine["cpu"])
    if mine["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"], device)


def save_train_state(directory: Path, parts: Resumable, state: TrainState, fingerprint: str) -> Path | None:
    """Write the state (rank 0); returns its path there, None on the other ranks.

    Every rank must call it: it gathers their RNG states, and no rank returns (or goes on
    training) before the files are on disk.
    """
    rng_states = distributed.all_gather_object(_rng_state(parts.device))
    target = None
    if distributed.is_main_process():
        target = directory / STATE_DIR
        with atomic_path(target, is_dir=True) as tmp:
            save_file(unique_state_dict(parts.model), str(tmp / "model.safetensors"))
            torch.save(
                {
                    "optimizer": parts.optimizer.state_dict(),
                    "scheduler": parts.scheduler.state_dict(),
                    "scaler": parts.scaler.state_dict(),
                    "rng_states": rng_states,
                    "fingerprint": fingerprint,
                },
                tmp / "optimizer.pt",
            )
            (tmp / "state.json").write_text(json.dumps(dataclasses.asdict(state), indent=2))
    distributed.barrier()
    return target


class UnreadableTrainState(ValueError):
    """A saved state that cannot be read (truncated, corrupt, from another version)."""


def _read_saved(source: Path) -> tuple[dict, dict, TrainState]:
    """Every file of a saved state, read before anything is restored from it (weights_only: no
    pickled code runs)."""
    try:
        extra = torch.load(source / "optimizer.pt", map_location="cpu", weights_only=True)
        weights = load_file(str(source / "model.safetensors"))
        state = TrainState(**json.loads((source / "state.json").read_text()))
        fingerprint = extra["fingerprint"]
    except Exception as exc:  # any failure to read is the same case: the state is unusable
        if isinstance(exc, pickle.UnpicklingError) and "weights only" in str(exc).lower():
            # Not torch's advice (load it unsafely): that is not for us to repeat.
            raise UnreadableTrainState(
                f"{source / 'optimizer.pt'}: not a state this code wrote (it holds pickled "
                "objects beyond tensors and plain values, which are never unpickled)"
            ) from exc
        raise UnreadableTrainState(f"{source}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
    if not isinstance(fingerprint, str):
        raise UnreadableTrainState(f"{source}: no fingerprint")
    return extra, weights, state


def load_train_state(directory: Path, parts: Resumable, fingerprint: str, seed: int) -> TrainState:
    """Restore ``parts`` and the RNG from the saved state; refuses one made with other settings
    (ResumeMismatchError) and one that cannot be read (UnreadableTrainState, nothing restored)."""
    source = directory / STATE_DIR
    extra, weights, state = _read_saved(source)
    if extra["fingerprint"] != fingerprint:
        raise ResumeMismatchError(f"{source} was saved with different training settings; delete it to start over")
    load_state_strict(parts.model, weights, str(source / "model.safetensors"))
    parts.optimizer.load_state_dict(extra["optimizer"])
    parts.scheduler.load_state_dict(extra["scheduler"])
    parts.scaler.load_state_dict(extra["scaler"])
    _restore_rng_state(extra["rng_states"], parts.device, seed)
    return state


def set_aside(directory: Path) -> Path:
    """Move an unreadable saved state out of the way (kept for a look, never deleted)."""
    source = directory / STATE_DIR
    aside = directory / f"{STATE_DIR}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
    os.replace(source, aside)
    return aside
