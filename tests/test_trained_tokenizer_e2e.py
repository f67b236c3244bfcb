"""The pretraining pipeline on your own vocabulary, as a user runs it: a baseline on GPT-2's BPE
(tinyshakespeare, tiny params) committed, then ``dvc exp run -S tokenizer.source=trained -S
train_tokenizer.vocab_size=2048 pretrain``: train_tokenizer → tokenize → build_windows → pretrain
on 2,048 tokens; ``dvc exp show`` lists both compressions; ``llm generate`` on the model works
with no GPT-2 files anywhere (the model directory carries its encoding)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import MIRROR
from tests.repo_copy import GIT, copy_repo

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not MIRROR.is_dir(), reason=f"offline mirror {MIRROR} not found"),
]


def dvc(repo: Path, *args: str) -> str:
    """A DVC command in ``repo`` as a user runs it (the venv's python first on PATH); its output."""
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def tokenizer_metrics(repo: Path) -> dict[str, dict]:
    """``dvc exp show --json`` as {baseline or experiment name: its metrics/tokenizer.json}."""
    shown = json.loads(dvc(repo, "exp", "show", "--json").strip().splitlines()[-1])
    found = {}
    for commit in shown:
        found["baseline"] = commit["data"]["metrics"]["metrics/tokenizer.json"]["data"]
        for exp in commit.get("experiments") or []:
            found[exp["name"]] = exp["revs"][0]["data"]["metrics"]["metrics/tokenizer.json"]["data"]
    return found


def test_pretrain_on_a_trained_vocabulary_and_generate_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LLMPIPE_MIRROR", str(MIRROR))
    monkeypatch.setenv("LLMCORE_GPT2_ENCODING_DIR", str(MIRROR / "gpt2"))  # the baseline's and the report's GPT-2
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name in ("LLMPIPE_MLFLOW_PARENT_RUN_ID", "LLMPIPE_MLFLOW_EXPERIMENT", "LLMPIPE_PARAMS", "DVC_EXP_NAME"):
        monkeypatch.delenv(name, raising=False)
    repo = copy_repo(tmp_path / "repo", remote=tmp_path / "remote")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["corpus"]["root"] = params["sources"]["shakespeare"]["out"]
    params["train_tokenizer"]["sample_bytes"] = 400_000  # a bounded sample of the 1.1 MB
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc(repo, "repro", "pretrain")
    assert json.loads((repo / "models/tokenizer/source.json").read_text()) == {"source": "gpt2"}
    subprocess.run([*GIT, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "baseline on GPT-2's BPE"], cwd=repo, check=True)

    log = dvc(repo, "exp", "run", "-n", "bpe2k", "-S", "tokenizer.source=trained",
              "-S", "train_tokenizer.vocab_size=2048", "pretrain")
    assert "train_tokenizer: trained -> models/tokenizer" in log
    shown = tokenizer_metrics(repo)
    ours, gpt2 = shown["bpe2k"], shown["baseline"]
    assert ours["vocab_size"] == 2048 and gpt2["vocab_size"] == 50257
    assert ours["gpt2_bytes_per_token"] == gpt2["bytes_per_token"]  # the same held-out slice
    assert 1.0 < ours["bytes_per_token"] and 0 < ours["vocab_used"] <= 1

    model_dir = repo / "models/pretrained"
    config = json.loads((model_dir / "config.json").read_text())["config"]
    assert config["vocab_size"] == 2048 and config["pad_vocab_to_multiple"] == 64
    assert {"bpe.tiktoken", "encoding.json"} <= {p.name for p in model_dir.iterdir()}
    assert not (model_dir / "encoder.json").exists()
    tokens = json.loads((repo / "data/tokens/meta.json").read_text())
    assert tokens["vocab_size"] == 2048 and tokens["endoftext_id"] == 2048 - 4

    # Offline and without GPT-2's files: the model directory's own encoding is all llm needs.
    env = {k: v for k, v in os.environ.items() if k != "LLMCORE_GPT2_ENCODING_DIR"}
    env |= {"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "cli.llm", "generate", "ROMEO:", "--model", str(model_dir),
                           "--max-new-tokens", "20", "--seed", "1"], cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ROMEO:") and len(done.stdout.strip()) > len("ROMEO:")
