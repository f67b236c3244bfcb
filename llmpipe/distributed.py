"""Data-parallel training stages: the ``distributed`` params section and the torchrun relaunch.

A training stage calls ``setup_distributed`` first thing in ``main``. With more than one process
requested (``distributed.nproc_per_node`` x ``distributed.nnodes``) and not yet under torchrun,
the stage runs itself again through ``python -m torch.distributed.run`` and exits with its exit
code; under torchrun it joins the process group, and ``llmcore.train.train`` runs the model in
DistributedDataParallel. Only rank 0 logs to MLflow and writes outputs (``is_main_process``).
See docs/distributed.md.
"""

from __future__ import annotations

import atexit
import contextlib
import shlex
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

from pydantic import Field, model_validator

from llmcore.distributed import cleanup, init_distributed, is_main_process, launched_by_torchrun
from llmpipe.params import StrictModel, read_params, validate_section

SECTION = "distributed"

__all__ = [
    "DistributedParams",
    "is_main_process",
    "load_distributed_params",
    "setup_distributed",
    "stage_run_on_main",
    "torchrun_command",
]


class DistributedParams(StrictModel):
    nproc_per_node: int = Field(ge=1)  # processes (GPUs) on each machine
    nnodes: int = Field(ge=1)  # machines; each runs the stage with its own node_rank
    node_rank: int = Field(ge=0)  # 0 on the machine that runs dvc and writes the outputs
    rdzv_endpoint: str = Field(pattern="^[^:\\s]+:\\d+$")  # node 0's host:port (nnodes > 1)
    backend: Literal["auto", "nccl", "gloo"]  # auto: nccl on CUDA, gloo on CPU
    timeout_s: float = Field(gt=0)  # how long a rank waits for a missing peer

    @model_validator(mode="after")
    def _node_rank_in_range(self) -> DistributedParams:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nnodes {self.nnodes}")
        return self

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def load_distributed_params(data: Mapping[str, Any], source: str = "params.yaml") -> DistributedParams:
    """The ``distributed`` section; a params file without one trains in a single process."""
    if SECTION not in data:
        return DistributedParams(
            nproc_per_node=1, nnodes=1, node_rank=0, rdzv_endpoint="127.0.0.1:29500", backend="auto", timeout_s=1800.0
        )
    return validate_section(dict(data), SECTION, DistributedParams, source)


def torchrun_command(module: str, argv: Sequence[str], params: DistributedParams) -> list[str]:
    """``python -m torch.distributed.run ... -m <module> <argv>`` for this machine's processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(params.nproc_per_node)]
    if params.nnodes == 1:
        command.append("--standalone")  # rendezvous on a free local port
    else:
        # Static rendezvous: node_rank 0 hosts global rank 0, the process that writes the outputs.
        host, port = params.rdzv_endpoint.rsplit(":", 1)
        command += [
            "--nnodes",
            str(params.nnodes),
            "--node-rank",
            str(params.node_rank),
            "--master-addr",
            host,
            "--master-port",
            port,
        ]
    return command + ["-m", module, *argv]


def setup_distributed(module: str, params_path: str, argv: Sequence[str] | None = None) -> None:
    """Relaunch ``module`` under torchrun when several processes are asked for (exits with its
    code), or join torchrun's process group when already under it; a no-op for one process."""
    params = load_distributed_params(read_params(params_path), params_path)
    if launched_by_torchrun():
        if init_distributed(None if params.backend == "auto" else params.backend, params.timeout_s):
            atexit.register(cleanup)
    elif params.world_size > 1:
        argv = sys.argv[1:] if argv is None else list(argv)
        for node in range(1, params.nnodes if params.node_rank == 0 else 1):
            other = torchrun_command(module, argv, params.model_copy(update={"node_rank": node}))
            print(f"{module}: waiting for node {node}; run there: {shlex.join(other)}", file=sys.stderr)
        sys.exit(subprocess.run(torchrun_command(module, argv, params)).returncode)


@contextlib.contextmanager
def stage_run_on_main(stage: str, experiment: str, params: Any = None) -> Iterator[Any]:
    """``llmpipe.tracking.stage_run`` on rank 0; None on the other ranks, which log nothing."""
    if not is_main_process():
        yield None
        return
    from llmpipe.tracking import stage_run  # mlflow imports take seconds

    with stage_run(stage, experiment, params) as run:
        yield run
