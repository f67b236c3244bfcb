"""A copy of the project as a fresh git repo with tiny params, for tests that run real DVC stages.

No data, no dvc.lock, and its DVC remote pointed at a temporary directory (``remote`` argument),
so that nothing a test pushes lands in the user's default remote.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
GIT = ["git", "-c", "user.name=tests", "-c", "user.email=tests@example.invalid"]


def closed_port() -> int:
    """A localhost port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Only keys that exist in params.yaml are overridden (a renamed key fails loudly below).
TINY_PARAMS = {
    # Few windows and examples: a handful of optimizer steps per training stage.
    "windows": {"context_length": 32, "stride": 128},
    "spam_data": {"train_frac": 0.1, "validation_frac": 0.05},
    "instruction_data": {"train_frac": 0.05, "test_frac": 0.05},
    "pretrain": {
        "model": {"preset": "cpu-tiny", "emb_dim": None, "n_heads": None, "n_layers": None},
        "epochs": 1,
        "batch_size": 16,
        "eval_every": 0,
        "eval_batches": 1,
        "checkpoint_every": 0,
        "sample": {"max_new_tokens": 4},
    },
    "evaluate": {"batch_size": 32, "generation": {"max_new_tokens": 4}},
    # Windows of the tiny base's context, a quarter of them (stride 4x), one epoch.
    "adapt_pretrain": {
        "window_length": 32,
        "stride": 128,
        "epochs": 1,
        "batch_size": 16,
        "eval_batches": 1,
        "checkpoint_every": 0,
    },
    "baseline_spam": {"grid": {"classifier": ["logistic_regression"], "C": [1.0]}},
    "finetune_classifier": {"epochs": 1, "batch_size": 16, "max_length": 32, "eval_every": 0, "eval_batches": 1},
    "finetune_instruct": {
        "epochs": 1,
        "batch_size": 16,
        "max_length": 32,
        "eval_every": 0,
        "eval_batches": 1,
        "checkpoint_every": 0,
        "sample_entries": 1,
        "sample_max_new_tokens": 4,
    },
    "score_instructions": {
        "max_new_tokens": 4,
        "max_entries": 4,
        "judge": {
            "url": f"http://127.0.0.1:{closed_port()}",
            "required": False,
            "connect_retries": 0,
            "connect_timeout_s": 1,
        },
    },
    "preference_data": {"train_frac": 0.05, "test_frac": 0.05},
    "preference_tune": {"epochs": 1, "batch_size": 16, "eval_every": 0, "eval_batches": 1, "checkpoint_every": 0},
    "score_preference": {"batch_size": 64},
    "orchestration": {"mlflow_experiment": "e2e", "download_retry_delays_s": [1]},
}


MODEL_STAGES = {
    "pretrain",
    "evaluate",
    "load_gpt2",
    "adapt_pretrain",
    "finetune_classifier",
    "score_spam",
    "finetune_instruct",
    "preference_tune",
    "score_preference",
    "score_instructions_dpo",
    "score_instructions",
}


def override(params: dict, tiny: dict, where: str = "") -> None:
    for key, value in tiny.items():
        if key not in params:
            if where:  # a nested key the stage does not know: the test is out of date
                raise KeyError(f"params.yaml has no {where}{key}; update TINY_PARAMS")
            continue  # a stage not in this checkout yet
        if isinstance(value, dict) and isinstance(params[key], dict):
            override(params[key], value, f"{where}{key}.")
        else:
            params[key] = value


def copy_repo(dest: Path, remote: Path | None = None) -> Path:
    """The project's files (tracked or not ignored), as a fresh git repo: no data, no dvc.lock,
    no committed metrics; its DVC remote is ``remote`` (default: a directory beside ``dest``)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if name == "dvc.lock" or name.startswith("metrics/") or not source.is_file():
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest / name)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    override(params, TINY_PARAMS)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([*GIT, "init", "-q"], cwd=dest, check=True)
    subprocess.run([*GIT, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "tiny params"], cwd=dest, check=True)
    use_remote(dest, remote or dest.parent / f"{dest.name}-dvc-remote")
    return dest


def use_remote(repo: Path, remote: Path) -> None:
    """Point the clone's default DVC remote at ``remote`` (in .dvc/config.local, untracked)."""
    subprocess.run(
        [sys.executable, "-m", "dvc", "remote", "modify", "--local", "local", "url", str(remote)], cwd=repo, check=True
    )
