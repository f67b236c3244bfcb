"""The pipeline's model directories as the ``llm`` command and serving find them: the default ones,
the stage that makes each (read from dvc.yaml), and the tokenizer a directory carries.

This is platform knowledge (dvc.yaml, the ``models/`` folders, load_gpt2's ``status.json``), kept
here so that llmcore, the model package, knows nothing of the pipeline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from llmcore.bpe import is_trained_dir
from llmcore.tokenizer import ENCODING_DIR_ENV, GPT2_FILES, TokenizerFilesError, get_tokenizer

DEFAULT_MODELS = ("models/spam_classifier", "models/pretrained", "models/instruct", "models/preference", "models/gpt2")


class UsageError(Exception):
    """A problem the user can fix (a missing model, a bad option): printed as one line, no traceback."""


def produced_by(path: str) -> str | None:
    """The dvc.yaml stage whose outputs include ``path``, read from the file (so it never goes stale):
    the current directory's, else that of the checkout this package runs from."""
    from llmpipe.cli import pipeline_stages  # only for the error message of a missing model

    for name, stage in pipeline_stages().items():
        outs = {next(iter(out)) if isinstance(out, dict) else out for out in stage.get("outs", [])}
        if path in outs:
            return name
    return None


def check_model_dir(directory: str) -> Path:
    """``directory`` if it holds a checkpoint, else a UsageError saying which stage makes it."""
    path = Path(directory)
    status = path / "status.json"
    if status.is_file() and not json.loads(status.read_text()).get("loaded", True):
        raise UsageError(f"{path} holds no weights (see {status}): provide GPT-2's, then `dvc repro -f load_gpt2`")
    if not (path / "config.json").is_file():
        stage = produced_by(path.as_posix())
        fix = f"run `dvc repro {stage}`" if stage else "pass --model with a checkpoint directory"
        raise UsageError(f"{path} not found: {fix}")
    return path


def tokenizer_for(model_dir: Path):
    """A Llama/Qwen3/Gemma base's own tokenizer.json; a trained BPE's files (llmcore.bpe) beside the
    model; else $LLMCORE_GPT2_ENCODING_DIR, else GPT-2's BPE files saved beside the model (checked
    by content). Never tiktoken's download: a model directory without its files is an error naming
    the file."""
    if (model_dir / "tokenizer.json").is_file():
        from llmcore.hf_tokenizer import HFTokenizer  # deferred: GPT-2 models never need `tokenizers`

        return HFTokenizer(model_dir)
    if is_trained_dir(model_dir):  # a vocabulary trained by train_tokenizer: only its own files fit
        return get_tokenizer(model_dir)
    if os.environ.get(ENCODING_DIR_ENV):
        return get_tokenizer()
    missing = [name for name in GPT2_FILES if not (model_dir / name).is_file()]
    if missing:
        raise TokenizerFilesError(
            f"{model_dir / missing[0]} not found: a model directory carries the GPT-2 "
            f"files it was trained with ({' and '.join(GPT2_FILES)}); copy them there or "
            f"set {ENCODING_DIR_ENV} to a directory holding them"
        )
    return get_tokenizer(model_dir)
