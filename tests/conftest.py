"""Shared fixtures: repo and mirror paths, an offline GPT-2 tokenizer, tiny GPT-2 checkpoints."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("LLMPIPE_MIRROR") or REPO.parent / "shared" / "data")
# A checkpoint small enough to build, save and compare in well under a second.
TINY_HF_CONFIG = dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=1000)

# The tests' models are tiny: intra-op threads only add synchronisation, and on a shared, busy CPU
# spinning OpenMP threads make each forward pass tens of times slower.
torch.set_num_threads(1)

# CI (.ci/run) installs everything a test needs, so there a skipped test is a failure: a missing
# browser, server or package must not pass unnoticed as "skipped".
NO_SKIPS = os.environ.get("LLMPIPE_NO_SKIPS") == "1"


def _stop_like_ctrl_c(signum, frame) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def pytest_configure(config) -> None:
    """A run stopped with SIGTERM (``kill``, a CI timeout) ends as Ctrl-C does: pytest still tears
    its fixtures down, so a module's team stack (whose servers ``llm stack up`` starts as daemons,
    in their own sessions) is stopped with ``llm stack down`` instead of being left running."""
    signal.signal(signal.SIGTERM, _stop_like_ctrl_c)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if NO_SKIPS and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (LLMPIPE_NO_SKIPS=1), which installs what tests need: {reason}"


def pytest_collection_modifyitems(config, items) -> None:
    """End-to-end files first (a stable sort: files keep their order otherwise). pytest-xdist
    (``-n``, ``--dist loadfile --no-loadscope-reorder``) hands files to workers in this order, so
    the few long ones start at once instead of forming a tail after the many short ones (by
    default xdist would hand out the files with the most tests first: the e2e files came last)."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is None)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def mirror() -> Path:
    if not MIRROR.is_dir():
        pytest.skip(f"offline mirror {MIRROR} not found (set LLMPIPE_MIRROR)")
    return MIRROR


@pytest.fixture(scope="session")
def gpt2_encoding_dir(mirror: Path) -> Path:
    return mirror / "gpt2"


@pytest.fixture(scope="session")
def tokenizer(gpt2_encoding_dir: Path):
    """GPT-2's encoding built from the mirror's encoder.json + vocab.bpe (no network)."""
    from llmcore.tokenizer import get_tokenizer

    return get_tokenizer(gpt2_encoding_dir)


@pytest.fixture
def make_hf_gpt2(tmp_path: Path) -> Callable[..., tuple[Path, torch.nn.Module]]:
    """Factory: a tiny random transformers GPT2LMHeadModel saved with save_pretrained.

    Returns (directory, model in eval mode); keyword arguments override GPT2Config fields.
    """
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()

    def make(name: str = "hf-gpt2", seed: int = 0, **overrides) -> tuple[Path, torch.nn.Module]:
        torch.manual_seed(seed)
        config = transformers.GPT2Config(**{**TINY_HF_CONFIG, "bos_token_id": 0, "eos_token_id": 0, **overrides})
        model = transformers.GPT2LMHeadModel(config).eval()
        directory = tmp_path / name
        model.save_pretrained(directory)
        return directory, model

    return make


def spread_out_model(cfg):
    """A random GPTModel with large weights (std 0.3), so logits are spread out and greedy decoding
    has no near-ties for float noise to flip."""
    from torch import nn

    from llmcore.model import GPTModel

    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.3)
    return model


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 64 KiB tmpfs (a full disk for real); skipped where mounting is not allowed (not root)."""
    import subprocess

    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not root'})")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def in_stage_workspace(workspace: Path):
    """A module's stage tests run from ``workspace`` with its own MLflow store (artifacts land in
    ./mlruns there) and none of a surrounding pipeline run's variables; a generator for a fixture."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow.db'}")
    for name in ("LLMPIPE_MLFLOW_PARENT_RUN_ID", "LLMPIPE_MLFLOW_EXPERIMENT", "LLMCORE_GPT2_ENCODING_DIR"):
        mp.delenv(name, raising=False)
    mp.chdir(workspace)
    yield workspace
    mp.undo()


def stage_argv(defaults: dict[str, str], **paths: str) -> list[str]:
    """``--key value`` options of a stage's command line: ``defaults`` overridden by ``paths``."""
    return [arg for key, value in {**defaults, **paths}.items() for arg in (f"--{key}", value)]
