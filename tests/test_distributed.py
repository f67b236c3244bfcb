"""DDP on CPU: 2 gloo processes train exactly like 1 process with the same global batch.

One ``torch.multiprocessing`` launch runs every 2-rank scenario (a full run, an interrupted run,
a resume of a single-process state) to pay the process start-up once; the parent runs the
single-process references and resumes the state the ranks saved.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from llmcore import distributed
from llmcore.config import GPTConfig
from llmcore.data import SlidingWindowDataset
from llmcore.model import GPTModel
from llmcore.train import TrainCallback, TrainConfig, TrainState, train
from llmpipe.distributed import DistributedParams, load_distributed_params, torchrun_command
from llmpipe.params import ParamsError
from tests.params_values import params_for, values_for
from tests.trainer_params import train_config

WORLD = 2
CFG = GPTConfig.from_preset("cpu-tiny", vocab_size=97, context_length=16, drop_rate=0.0)
# 21 training windows, global batch 4: 5 micro-batches an epoch, steps of 2, 2 and 1 micro-batches.
CONFIG = train_config(
    epochs=2,
    batch_size=4,
    grad_accum_steps=2,
    lr=3e-3,
    warmup_steps=1,
    eval_every=2,
    eval_batches=2,
    checkpoint_every=1,
    seed=7,
    progress=False,
)
STOP_AFTER_STEP = 4  # the interrupted runs end right after saving this step
TIMEOUT_S = 120


class Interrupted(Exception):
    """Raised by CountingDataset to stop a run as a crash would."""


class CountingDataset(torch.utils.data.Dataset):
    """Records which items are read; raises Interrupted on the read after ``limit``."""

    def __init__(self, data: torch.utils.data.Dataset, limit: int | None = None):
        self.data, self.limit, self.read = data, limit, []

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        if self.limit is not None and len(self.read) >= self.limit:
            raise Interrupted
        self.read.append(index)
        return self.data[index]


class Recorder(TrainCallback):
    """Step losses, and the item reads done when each step's state was saved."""

    def __init__(self, data: CountingDataset | None = None):
        self.data, self.step_losses, self.reads_at_save = data, [], {}

    def on_step_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        self.step_losses.append(metrics["loss"])

    def on_checkpoint(self, state: TrainState, path: Path) -> None:
        if self.data is not None:
            self.reads_at_save[state.step] = len(self.data.read)


@torch.no_grad()
def token_accuracy(model: torch.nn.Module, loader, max_batches: int | None) -> dict[str, float]:
    """An eval_fn: the share of next tokens predicted right."""
    correct = total = 0
    for inputs, targets in itertools.islice(loader, max_batches):
        correct += (model(inputs).argmax(-1) == targets).sum().item()
        total += targets.numel()
    return {"accuracy": correct / total}


def datasets() -> tuple[SlidingWindowDataset, SlidingWindowDataset]:
    """21 training windows; 7 validation windows: the second evaluated batch is partial."""
    tokens = torch.randint(0, CFG.vocab_size, (16 * 28 + 1,), generator=torch.Generator().manual_seed(0))
    return SlidingWindowDataset(tokens[: 16 * 21 + 1], 16, 16), SlidingWindowDataset(tokens[16 * 21 :], 16, 16)


def run(state_dir: Path | None = None, read_limit: int | None = None, config: TrainConfig = CONFIG) -> dict:
    """Train a fresh model (resuming from ``state_dir`` if it holds a state); what rank 0 saw."""
    torch.manual_seed(0)
    model = GPTModel(CFG)
    train_data, val_data = datasets()
    counted = CountingDataset(train_data, read_limit)
    recorder = Recorder(counted)
    try:
        state = train(
            model, counted, val_data, config, eval_fn=token_accuracy, callbacks=[recorder], state_dir=state_dir
        )
    except Interrupted:
        state = None
    return {
        "history": state.history if state else None,
        "step_losses": recorder.step_losses,
        "reads_at_save": recorder.reads_at_save,
        "read": counted.read,
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }


def worker(rank: int, port: int, tmp: str, read_limit: int) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    assert distributed.init_distributed("gloo", timeout_s=60)  # CPU tensors, even where CUDA exists
    try:
        results = {
            "full": run(),
            "interrupted": run(Path(tmp, "ddp_state"), read_limit),
            "resumed": run(Path(tmp, "single_state")),
            "compiled": run(config=dataclasses.replace(CONFIG, compile=True)),
        }
        results["rank_reads"] = distributed.all_gather_object(results["full"]["read"])
        if distributed.is_main_process():
            torch.save(results, Path(tmp, "ddp_results.pt"))
    finally:
        distributed.cleanup()


def spawn_ranks(tmp: Path, read_limit: int) -> dict:
    context = mp.start_processes(
        worker, args=(distributed.free_port(), str(tmp), read_limit), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} ranks did not finish within {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    return torch.load(tmp / "ddp_results.pt", weights_only=False)


def assert_same_run(got: dict, want: dict) -> None:
    assert got["step_losses"] == pytest.approx(want["step_losses"], abs=1e-5)
    assert len(got["history"]) == len(want["history"])
    for got_eval, want_eval in zip(got["history"], want["history"]):
        assert got_eval.keys() == {
            "step",
            "epoch",
            "tokens_seen",
            "train_loss",
            "val_loss",
            "train_accuracy",
            "val_accuracy",
        }
        assert got_eval == pytest.approx(want_eval, abs=1e-5)  # step, epoch, tokens_seen: exactly
    assert got["weights"].keys() == want["weights"].keys()
    for name, tensor in want["weights"].items():
        torch.testing.assert_close(got["weights"][name], tensor, atol=1e-5, rtol=0, msg=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("ddp")
    single = run(tmp / "reference_state")
    # Stop a single-process run right after step STOP_AFTER_STEP is saved (its resume is below).
    stop_reads = single["reads_at_save"][STOP_AFTER_STEP]
    run(tmp / "single_state", read_limit=stop_reads)
    # Every rank reads a 1/WORLD share of the items (training and evaluation alike).
    ddp = spawn_ranks(tmp, read_limit=stop_reads // WORLD)
    return {"tmp": tmp, "single": single, "ddp": ddp, "stop_reads": stop_reads}


def test_two_ranks_train_like_one_process_with_the_same_global_batch(runs):
    assert_same_run(runs["ddp"]["full"], runs["single"])


def test_two_ranks_under_torch_compile_train_like_one_eager_process(runs):
    got, want = runs["ddp"]["compiled"], runs["single"]
    assert got["step_losses"] == pytest.approx(want["step_losses"], abs=1e-5)
    assert len(got["history"]) == len(want["history"])
    for got_eval, want_eval in zip(got["history"], want["history"]):
        assert got_eval == pytest.approx(want_eval, abs=1e-5)
    # Compiled kernels sum in another order; Adam's normalised steps carry that to the 1e-5 level.
    torch.testing.assert_close(got["weights"], want["weights"], atol=5e-5, rtol=0)


def test_ranks_share_the_reads_of_one_process(runs):
    """Training and evaluation reads of the ranks add up to those of one process, evenly split."""
    rank_reads = runs["ddp"]["rank_reads"]
    assert [len(reads) for reads in rank_reads] == [len(runs["single"]["read"]) // WORLD] * WORLD
    assert Counter(rank_reads[0]) + Counter(rank_reads[1]) == Counter(runs["single"]["read"])


def test_ddp_saved_state_resumes_in_one_process(runs):
    saved = runs["tmp"] / "ddp_state" / "train_state"
    state = (saved / "state.json").read_text()
    assert f'"step": {STOP_AFTER_STEP}' in state
    # Rank 0 saved the unwrapped model: the names are the model's own, with no "module." prefix.
    from safetensors.torch import load_file

    assert not any(name.startswith("module.") for name in load_file(saved / "model.safetensors"))
    resumed = run(runs["tmp"] / "ddp_state")
    torch.testing.assert_close(resumed["weights"], runs["single"]["weights"], atol=1e-5, rtol=0)
    assert resumed["history"][-1] == pytest.approx(runs["single"]["history"][-1], abs=1e-5)


def test_single_process_state_resumes_under_ddp(runs):
    resumed = runs["ddp"]["resumed"]
    torch.testing.assert_close(resumed["weights"], runs["single"]["weights"], atol=1e-5, rtol=0)
    assert resumed["history"][-1] == pytest.approx(runs["single"]["history"][-1], abs=1e-5)


# ---- stages: the distributed params and the torchrun relaunch

PROBE = """
import sys
from llmcore import distributed
from llmpipe.distributed import setup_distributed

setup_distributed("ddp_probe", sys.argv[1])
print(f"rank {distributed.rank()} of {distributed.world_size()}", flush=True)
sys.exit(3 if distributed.rank() == 1 and "--fail" in sys.argv else 0)
"""


def test_missing_section_means_one_process():
    assert load_distributed_params({}).world_size == 1


@pytest.mark.parametrize(
    "section, problem",
    [
        ({"nnodes": 2, "node_rank": 2}, "node_rank"),
        ({"rdzv_endpoint": "node0"}, "rdzv_endpoint"),
        ({"nproc_per_node": 0}, "nproc_per_node"),
        ({"gpus": 2}, "gpus"),
    ],
)
def test_bad_distributed_params_name_the_key(section, problem):
    with pytest.raises(ParamsError, match=problem):
        load_distributed_params({"distributed": section})


def test_multi_node_command_uses_a_static_rendezvous_on_node_0():
    params = params_for(DistributedParams, nproc_per_node=8, nnodes=2, node_rank=1, rdzv_endpoint="node0.lan:29400")
    command = torchrun_command("steps.pretrain", ["--params", "p.yaml"], params)
    assert command[1:] == [
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "8",
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--master-addr",
        "node0.lan",
        "--master-port",
        "29400",
        "-m",
        "steps.pretrain",
        "--params",
        "p.yaml",
    ]


def test_stage_relaunches_itself_under_torchrun_and_fails_when_a_rank_fails(tmp_path, repo_root):
    (tmp_path / "ddp_probe.py").write_text(PROBE)
    params = tmp_path / "params.yaml"
    section = values_for(DistributedParams, nproc_per_node=2, backend="gloo", timeout_s=60)
    params.write_text(json.dumps({"distributed": section}))  # JSON is YAML
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(repo_root)])}
    env.pop("RANK", None)
    done = subprocess.run(
        [sys.executable, "-m", "ddp_probe", str(params), "--fail"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    output = done.stdout + done.stderr
    assert "rank 0 of 2" in output and "rank 1 of 2" in output, output
    assert done.returncode != 0, output
