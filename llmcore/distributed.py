"""torch.distributed helpers: one training process per device, started by torchrun.

torchrun (``python -m torch.distributed.run``) starts the processes and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; ``init_distributed`` joins
them into one process group. Without a process group every helper here answers as a group of
one (rank 0 of 1, reductions return their input), so single-process code needs no branches.
The data-parallel pieces of the training loop (the local batch, evaluation shards, the DDP wrapper
and its no_sync for gradient accumulation) are here too, so llmcore.train reads as one process.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, Subset

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_by_torchrun() -> bool:
    """True inside a process started by torchrun (or anything setting its environment)."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Rank 0 alone logs, shows progress and writes files."""
    return rank() == 0


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> bool:
    """Join torchrun's process group; False (nothing done) outside torchrun or with one process.

    ``backend`` None or "auto" picks nccl when CUDA is available (each process then uses the GPU
    of its ``LOCAL_RANK``) and gloo otherwise. ``timeout_s`` bounds how long a collective waits
    for a missing peer before failing instead of hanging.
    """
    if is_distributed():
        return True
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return False
    if backend in (None, "auto"):
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("backend 'nccl' needs CUDA; use 'gloo' (or 'auto') on CPU")
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def _all_reduce_sum(values: Sequence[float]) -> list[float]:
    # nccl reduces only CUDA tensors; float64 keeps token counts exact.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (the values themselves without a group)."""
    return _all_reduce_sum(values) if is_distributed() else list(values)


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a group."""
    if not is_distributed():
        return [obj]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


# ---- data parallelism for the training loop (llmcore.train)


def local_batch_size(global_batch: int) -> int:
    """This rank's share of a global batch, which must split evenly over the ranks."""
    if global_batch % world_size():
        raise ValueError(f"batch_size {global_batch} (global) does not split over {world_size()} processes")
    return global_batch // world_size()


def shard(data: Dataset, n: int) -> Dataset:
    """This rank's share of the first ``n`` samples: every world_size-th, from its rank on, so that
    rank batch k is this rank's share of the single-process batch k."""
    return Subset(data, range(rank(), n, world_size()))


def data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel in a process group; as it is without one."""
    if not is_distributed():
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def gradient_sync(module: nn.Module, sync: bool) -> AbstractContextManager:
    """Where a micro-batch's backward runs: DDP all-reduces the accumulated gradients only when
    ``sync`` (a step's last micro-batch). Looks through torch.compile's wrapper."""
    ddp = getattr(module, "_orig_mod", module)
    if sync or not isinstance(ddp, DistributedDataParallel):
        return nullcontext()
    return ddp.no_sync()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, for a local rendezvous (tests, benchmarks)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
