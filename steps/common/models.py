"""Model directories: the base model of the fine-tunes (an llmcore checkpoint a stage wrote), and
the BPE files (GPT-2's or a trained encoding's) every model directory carries, so ``llm`` and serving need no network."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field

from llmcore.bpe import TRAINED_FILES, is_trained_dir, load_encoding
from llmcore.checkpoint import DECODER_FORMAT, load_checkpoint, read_checkpoint_meta
from llmcore.model import GPTModel
from llmcore.tokenizer import ENCODING_DIR_ENV, GPT2_FILE_SHA256, GPT2_FILES, is_gpt2, tokenizer_digest
from steps.common.io import atomic_path
from steps.common.params import StrictModel

# Where tiktoken's get_encoding("gpt2") caches the BPE files: sha1 of the URL, in its cache dir.
TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{}"


class BaseModelError(ValueError):
    """The base model directory holds no usable weights (e.g. GPT-2's could not be downloaded)."""


class BaseModelParams(StrictModel):
    dir: str  # an llmcore checkpoint: models/pretrained (own), models/adapted (adapt_pretrain) or models/gpt2


class LoraParams(StrictModel):
    """LoRA adapters (llmcore.lora) of a fine-tune that trains them only."""

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)


class BaseModelSectionParams(BaseModelParams):
    """params.yaml's base_model section: the fine-tunes' base, and what load_base converts."""

    # A Hugging Face Llama 3.2 / Qwen3 / Gemma 3 directory or Hub id that load_base converts to
    # models/base; "" (the default): no such base, load_base writes only status.json (loaded=false).
    source: str = ""
    dtype: Literal["float32", "bfloat16"] = "float32"  # the converted weights' dtype


def check_base_tokenizer(base_dir: Path, tokenizer, vocab_size: int) -> None:
    """A base model fine-tuned with ``tokenizer`` must have been trained with it: a model directory
    carrying a trained encoding needs that encoding; one without (GPT-2's weights, a GPT-2-vocab
    model) needs GPT-2's BPE. Else a BaseModelError naming both."""
    if is_trained_dir(base_dir):
        theirs = load_encoding(base_dir)
        same = not is_gpt2(tokenizer) and tokenizer_digest(theirs) == tokenizer_digest(tokenizer)
        what = f"the trained encoding in {base_dir / TRAINED_FILES[1]}"
    else:
        same, what = is_gpt2(tokenizer), "GPT-2's BPE"
    if not same:
        raise BaseModelError(f"base model {base_dir} was trained with {what}, but the pipeline encodes with "
                             f"{'GPT-2' if is_gpt2(tokenizer) else 'a trained'} BPE ({tokenizer.name}, "
                             f"{tokenizer.n_vocab} tokens): set tokenizer.source to match, or pick another base")
    if tokenizer.n_vocab > vocab_size:
        raise BaseModelError(f"base model {base_dir} has {vocab_size} token rows, the tokenizer {tokenizer.n_vocab}")


def load_base_model(base_dir: Path, tokenizer=None, **overrides) -> GPTModel:
    """The llmcore checkpoint in ``base_dir`` (``overrides``: config fields such as drop_rate),
    checked against ``tokenizer`` (``check_base_tokenizer``) when one is given.

    A ``status.json`` saying ``loaded: false`` (load_gpt2 without GPT-2's weights) is an error.
    """
    status_path = base_dir / "status.json"
    if status_path.is_file():
        status = json.loads(status_path.read_text())
        if not status.get("loaded", True):
            details = {k: v for k, v in status.items() if k != "loaded"}
            raise BaseModelError(
                f"base model {base_dir} has no weights ({status_path}: loaded=false {details}); "
                "GPT-2 weights were unavailable to load_gpt2. Provide them, or set base_model.dir "
                "(classifier_base.dir for the spam classifier) to the project's own pretrained model "
                "(models/pretrained)"
            )
    if not (base_dir / "config.json").is_file():
        raise BaseModelError(f"base model {base_dir} not found (no config.json): run its stage first (dvc repro)")
    if read_checkpoint_meta(base_dir).get("format") == DECODER_FORMAT:
        # The fine-tunes tokenize with GPT-2's BPE: ids that mean nothing to a Llama/Qwen3/Gemma base.
        raise BaseModelError(f"base model {base_dir} is a Hugging Face base (format {DECODER_FORMAT}); the "
                             "fine-tuning stages do not support it yet (they tokenize with GPT-2's BPE): use it "
                             "with `llm generate/chat`, or set base_model.dir to a GPT checkpoint")
    model = load_checkpoint(base_dir, **overrides)
    if tokenizer is not None:
        check_base_tokenizer(base_dir, tokenizer, model.cfg.vocab_size)
    return model


def find_encoding_files(encoding_dir: str | None) -> dict[str, Path] | None:
    """GPT-2's encoder.json + vocab.bpe from ``encoding_dir`` or tiktoken's cache, if both are there."""
    if encoding_dir:
        candidates = {name: Path(encoding_dir) / name for name in GPT2_FILES}
    else:
        cache = Path(os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
                     or Path(tempfile.gettempdir()) / "data-gym-cache")
        candidates = {name: cache / hashlib.sha1(TIKTOKEN_URL.format(name).encode()).hexdigest()
                      for name in GPT2_FILES}
    for name, path in candidates.items():
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != GPT2_FILE_SHA256[name]:
            return None
    return candidates


def bundle_tokenizer(model_dir: Path, encoding_dir: str | None) -> bool:
    """Copy the tokenizer files the model was trained with into ``model_dir``: a trained encoding's
    (``llmcore.bpe``: bpe.tiktoken + encoding.json, checked by loading), else GPT-2's encoder.json +
    vocab.bpe (checked); False when GPT-2's are not at hand."""
    if is_trained_dir(encoding_dir):
        load_encoding(encoding_dir)  # an incomplete or altered pair is an error, not a copy
        files = {name: Path(encoding_dir) / name for name in TRAINED_FILES}
    else:
        files = find_encoding_files(encoding_dir or os.environ.get(ENCODING_DIR_ENV))
    if files is None:
        return False
    for name, source in files.items():
        with atomic_path(model_dir / name) as tmp:
            shutil.copyfile(source, tmp)
    return True
