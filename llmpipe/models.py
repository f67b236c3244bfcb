"""Model directories: the base model of the fine-tunes (an llmcore checkpoint a stage wrote), and
the BPE files (GPT-2's or a trained encoding's) every model directory carries, so ``llm`` and
serving need no network."""

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
from llmpipe.io import atomic_path
from llmpipe.params import StrictModel

# Where tiktoken's get_encoding("gpt2") caches the BPE files: sha1 of the URL, in its cache dir.
TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{}"


# What a loading stage (load_gpt2, load_base) writes beside the weights: whether it loaded, and from where.
STATUS_FILE = "status.json"


class BaseModelError(ValueError):
    """The base model directory holds no usable weights (e.g. GPT-2's could not be downloaded)."""


class BaseModelParams(StrictModel):
    dir: str  # an llmcore checkpoint: models/pretrained (own), models/adapted (adapt_pretrain) or models/gpt2


class LoraParams(StrictModel):
    """LoRA adapters (llmcore.lora) of a fine-tune that trains them only."""

    rank: int = Field(ge=1)
    alpha: float = Field(gt=0)


class BaseModelSectionParams(BaseModelParams):
    """params.yaml's base_model section: the fine-tunes' base, and what load_base converts."""

    # A Hugging Face Llama 3.2 / Qwen3 / Gemma 3 directory or Hub id that load_base converts to
    # models/base; "" (the default): no such base, load_base writes only status.json (loaded=false).
    source: str
    dtype: Literal["float32", "bfloat16"]  # the converted weights' dtype


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
        raise BaseModelError(
            f"base model {base_dir} was trained with {what}, but the pipeline encodes with "
            f"{'GPT-2' if is_gpt2(tokenizer) else 'a trained'} BPE ({tokenizer.name}, "
            f"{tokenizer.n_vocab} tokens): set tokenizer.source to match, or pick another base"
        )
    if tokenizer.n_vocab > vocab_size:
        raise BaseModelError(f"base model {base_dir} has {vocab_size} token rows, the tokenizer {tokenizer.n_vocab}")


def is_decoder_base(base_dir: Path) -> bool:
    """Whether ``base_dir`` holds a Hugging Face base (a Llama / Qwen3 / Gemma 3 checkpoint)."""
    return (base_dir / "config.json").is_file() and read_checkpoint_meta(base_dir).get("format") == DECODER_FORMAT


def load_base_model(base_dir: Path, tokenizer=None, *, decoder_ok: bool = False, **overrides) -> GPTModel:
    """The llmcore checkpoint in ``base_dir`` (``overrides``: config fields such as drop_rate),
    checked against ``tokenizer`` (``check_base_tokenizer``) when one is given. A Hugging Face base
    (format llmcore-decoder) only where the caller tokenizes with its own tokenizer
    (``decoder_ok``: instruction SFT, ``base_tokenizer``); else a BaseModelError.

    A ``status.json`` saying ``loaded: false`` (load_gpt2 without GPT-2's weights) is an error.
    """
    status_path = base_dir / STATUS_FILE
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
    if is_decoder_base(base_dir):
        if decoder_ok:
            return load_checkpoint(base_dir, **overrides)
        # The other fine-tunes tokenize with GPT-2's BPE: ids that mean nothing to a Llama/Qwen3/Gemma base.
        raise BaseModelError(
            f"base model {base_dir} is a Hugging Face base (format {DECODER_FORMAT}); the "
            "preference fine-tune and adapt_pretrain do not support it yet (they tokenize with GPT-2's BPE): use it "
            "with `llm generate/chat`, or set base_model.dir to a GPT checkpoint"
        )
    model = load_checkpoint(base_dir, **overrides)
    if tokenizer is not None:
        check_base_tokenizer(base_dir, tokenizer, model.cfg.vocab_size)
    return model


def base_tokenizer(base_dir: Path, tokenizer_source: str, stage: str, *, chat: bool = True):
    """A Hugging Face base's own tokenizer (tokenizer.json + chat template in ``base_dir``), which
    the stage uses instead of params ``tokenizer.*`` (said in one log line); ``tokenizer.source:
    trained`` contradicts it: a BaseModelError, as a missing chat template where ``chat`` (SFT) needs one."""
    from llmcore.hf_tokenizer import HFTokenizer  # deferred: GPT-2 models never need `tokenizers`

    if tokenizer_source != "gpt2":
        raise BaseModelError(
            f"params tokenizer.source is {tokenizer_source!r}, but base model {base_dir} is a Hugging "
            "Face base that tokenizes with its own tokenizer.json: set tokenizer.source: gpt2"
        )
    tokenizer = HFTokenizer(base_dir)
    if chat and not tokenizer.chat_template:
        raise BaseModelError(f"base model {base_dir}: its tokenizer_config.json has no chat_template to fine-tune in")
    what = (
        "tokenizer.json and chat template (params tokenizer.* and the instruction data's prompt_style"
        if chat
        else "tokenizer.json (params tokenizer.*"
    )
    print(
        f"{stage}: {base_dir} is a Hugging Face base's model: it tokenizes with its own {what} do not apply)",
        flush=True,
    )
    return tokenizer


def bundle_base_tokenizer(base_dir: Path, model_dir: Path, end_token: str) -> None:
    """Copy a Hugging Face base's tokenizer files into ``model_dir``; when the chat template's
    end-of-turn token (``end_token``) is not the tokenizer's eos token, it becomes the eos token
    (tokenizer_config.json, special_tokens_map.json) and the old one follows it in
    generation_config.json's eos_token_id, so `llm`, serving and scoring stop at the turn's end."""
    from llmcore.hf_checkpoint import copy_tokenizer_files
    from llmcore.hf_tokenizer import HFTokenizer

    copy_tokenizer_files(base_dir, model_dir)
    tokenizer = HFTokenizer(model_dir)
    if tokenizer.special_tokens.get("eos_token") == end_token:
        return
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = model_dir / name
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            data["eos_token"] = end_token
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    generation_path = model_dir / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
    eos_ids = [
        tokenizer.token_to_id(end_token),
        *[i for i in tokenizer.eos_ids if i != tokenizer.token_to_id(end_token)],
    ]
    generation_path.write_text(json.dumps({**generation, "eos_token_id": eos_ids}, indent=2) + "\n")


def find_encoding_files(encoding_dir: str | None) -> dict[str, Path] | None:
    """GPT-2's encoder.json + vocab.bpe from ``encoding_dir`` or tiktoken's cache, if both are there."""
    if encoding_dir:
        candidates = {name: Path(encoding_dir) / name for name in GPT2_FILES}
    else:
        cache = Path(
            os.environ.get("TIKTOKEN_CACHE_DIR")
            or os.environ.get("DATA_GYM_CACHE_DIR")
            or Path(tempfile.gettempdir()) / "data-gym-cache"
        )
        candidates = {name: cache / hashlib.sha1(TIKTOKEN_URL.format(name).encode()).hexdigest() for name in GPT2_FILES}
    for name, path in candidates.items():
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != GPT2_FILE_SHA256[name]:
            return None
    return candidates


def bundle_tokenizer(model_dir: Path, encoding_dir: str | None) -> bool:
    """Copy the tokenizer files the model was trained with into ``model_dir``: a trained encoding's
    (``llmcore.bpe``: bpe.tiktoken + encoding.json, checked by loading), else GPT-2's encoder.json +
    vocab.bpe (checked); False when GPT-2's are not at hand. A directory already carrying a Hugging
    Face tokenizer (tokenizer.json) is left alone: True."""
    if (model_dir / "tokenizer.json").is_file():
        return True
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


def write_status(model_dir: Path, status: dict) -> None:
    """A loading stage's ``status.json`` in ``model_dir`` (the stage's atomic output directory)."""
    (model_dir / STATUS_FILE).write_text(json.dumps(status, indent=2, sort_keys=True) + "\n")


def log_status(stage: str, experiment: str, params, status: dict) -> None:
    """A loading stage's MLflow run: its params, a ``loaded`` tag and the status as an artifact."""
    from llmpipe.tracking import stage_run  # mlflow imports take seconds: not at import

    with stage_run(stage, experiment, params):
        import mlflow

        mlflow.set_tag("loaded", status["loaded"])
        mlflow.log_dict(status, STATUS_FILE)
