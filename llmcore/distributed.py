"""torch.distributed helpers: one training process per device, started by torchrun.

torchrun (``python -m torch.distributed.run``) starts the processes and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; ``init_distributed`` joins
them into one process group. Without a process group every helper here answers as a group of
one (rank 0 of 1, reductions return their input), so single-process code needs no branches.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Sequence

import torch
import torch.distributed as dist

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


def all_reduce_mean(values: Sequence[float]) -> list[float]:
    """Element-wise mean of ``values`` over all ranks, in one collective."""
    if not is_distributed():
        return list(values)
    world = dist.get_world_size()
    return [v / world for v in _all_reduce_sum(values)]


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a group."""
    if not is_distributed():
        return [obj]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, for a local rendezvous (tests, benchmarks)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
