"""The whole pipeline on your own vocabulary, as a user runs it: a baseline commit on GPT-2's BPE
(tinyshakespeare; only its compression report), then ``dvc exp run -S tokenizer.source=trained -S
train_tokenizer.vocab_size=1024 score_spam score_instructions score_preference``: train_tokenizer
→ tokenize → build_windows → pretrain → adapt_pretrain → finetune_classifier → score_spam, and
finetune_instruct → score_instructions and preference_tune → score_preference, all on 1,024 tokens
(tiny params: a few optimizer steps per trainer). ``dvc exp show`` lists both compressions; every
model directory carries the trained encoding; ``llm generate`` on the instruction model works with
no GPT-2 files anywhere."""

from __future__ import annotations

import json
import math
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


MODEL_DIRS = ("pretrained", "adapted", "spam_classifier", "instruct", "preference")


def test_the_whole_pipeline_on_a_trained_vocabulary_and_generate_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("LLMPIPE_MIRROR", str(MIRROR))
    monkeypatch.setenv("LLMCORE_GPT2_ENCODING_DIR", str(MIRROR / "gpt2"))  # the baseline's and the report's GPT-2
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name in ("LLMPIPE_MLFLOW_PARENT_RUN_ID", "LLMPIPE_MLFLOW_EXPERIMENT", "LLMPIPE_PARAMS", "DVC_EXP_NAME"):
        monkeypatch.delenv(name, raising=False)
    repo = copy_repo(tmp_path / "repo", remote=tmp_path / "remote")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["corpus"]["root"] = params["sources"]["shakespeare"]["out"]
    params["train_tokenizer"]["sample_bytes"] = 200_000  # a bounded sample of the 1.1 MB
    # A context of 128: the Alpaca prompt takes 75-95 of these tokens (GPT-2's: 31-45), and an answer
    # must fit after it; ~200 training windows (stride 2,048): a dozen steps.
    params["windows"] |= {"context_length": 128, "stride": 2048}
    params["finetune_instruct"]["max_length"] = 128
    params["adapt_pretrain"]["stride"] = 1024
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc(repo, "repro", "train_tokenizer")  # the baseline: GPT-2's compression on the held-out slice
    assert json.loads((repo / "models/tokenizer/source.json").read_text()) == {"source": "gpt2"}
    subprocess.run([*GIT, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "baseline on GPT-2's BPE"], cwd=repo, check=True)

    log = dvc(
        repo,
        "exp",
        "run",
        "-n",
        "bpe1k",
        "-S",
        "tokenizer.source=trained",
        "-S",
        "train_tokenizer.vocab_size=1024",
        "score_spam",
        "score_instructions",
        "score_preference",
    )
    assert "train_tokenizer: trained -> models/tokenizer" in log
    shown = tokenizer_metrics(repo)
    ours, gpt2 = shown["bpe1k"], shown["baseline"]
    assert ours["vocab_size"] == 1024 and gpt2["vocab_size"] == 50257
    assert ours["gpt2_bytes_per_token"] == gpt2["bytes_per_token"]  # the same held-out slice
    assert 1.0 < ours["bytes_per_token"] and 0 < ours["vocab_used"] <= 1

    tokens = json.loads((repo / "data/tokens/meta.json").read_text())
    assert tokens["vocab_size"] == 1024 and tokens["endoftext_id"] == 1024 - 4
    config = json.loads((repo / "models/pretrained/config.json").read_text())["config"]
    assert config["vocab_size"] == 1024 and config["pad_vocab_to_multiple"] == 64
    for name in MODEL_DIRS:  # every model carries the encoding it was trained with, no GPT-2 files
        files = {p.name for p in (repo / "models" / name).iterdir()}
        assert {"bpe.tiktoken", "encoding.json"} <= files and "encoder.json" not in files, name
    spam = json.loads((repo / "metrics/spam.json").read_text())
    assert 0 <= spam["test_accuracy"] <= 1
    instructions = json.loads(
        (repo / "reports/instructions.json").read_text()
    )  # closing target: the trained <|endoftext|>
    assert instructions["response_tokens"] > 0 and math.isfinite(instructions["response_loss"])
    preference = json.loads((repo / "metrics/preference.json").read_text())
    assert all(0 <= preference[model]["test_preference_accuracy"] <= 1 for model in ("sft", "dpo"))

    # Offline and without GPT-2's files: the model directory's own encoding is all llm needs.
    env = {k: v for k, v in os.environ.items() if k != "LLMCORE_GPT2_ENCODING_DIR"}
    env |= {"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty-cache"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.llm",
            "generate",
            "ROMEO:",
            "--model",
            str(repo / "models/instruct"),
            "--max-new-tokens",
            "20",
            "--seed",
            "1",
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ROMEO:") and len(done.stdout.strip()) > len("ROMEO:")
