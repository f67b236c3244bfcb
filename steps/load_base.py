"""Convert a Hugging Face Llama 3.2 / Qwen3 / Gemma 3 base into an llmcore checkpoint (``models/base``).

``base_model.source`` is a local model directory (config.json, model.safetensors or shards +
index, tokenizer.json, tokenizer_config.json) or a Hub repo id such as ``Qwen/Qwen3-0.6B``
(through huggingface_hub's cache). The output holds the checkpoint (format ``llmcore-decoder``,
its config naming the family), the tokenizer and chat-template files, and ``status.json``; set
``base_model.dir: models/base`` to start the fine-tunes from it.

``base_model.source: ""`` (the default: the CPU pipeline needs no such base) writes only
``status.json`` = ``{"loaded": false, ...}``, as load_gpt2 does without GPT-2's weights; a
fine-tune whose ``base_model.dir`` is ``models/base`` then fails with a clear message.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmcore.checkpoint import CheckpointError, save_checkpoint
from llmcore.hf_checkpoint import BaseUnavailableError, copy_tokenizer_files, load_hf_model, resolve_hf_source
from llmcore.hf_tokenizer import HFTokenizer, TokenizerConfigError
from llmpipe.cli import StageParams, run_stage
from llmpipe.io import atomic_path
from llmpipe.models import STATUS_FILE, BaseModelSectionParams, log_status, write_status

STAGE = "load_base"
EXPERIMENT = "load-base"


def load_base_stage(params: BaseModelSectionParams, *, out_dir: Path) -> dict:
    """Write ``out_dir`` (checkpoint + tokenizer files + status.json, or status.json alone); returns the status."""
    if not params.source:
        status = {"loaded": False, "source": "", "reason": "base_model.source is empty (no Hugging Face base chosen)"}
        with atomic_path(out_dir, is_dir=True) as tmp:
            write_status(tmp, status)
        log_status(STAGE, EXPERIMENT, params, status)
        return status
    directory = resolve_hf_source(params.source)
    model = load_hf_model(directory, dtype=getattr(torch, params.dtype))
    tokenizer = HFTokenizer(directory) if (directory / "tokenizer.json").is_file() else None
    status = {
        "loaded": True,
        "source": params.source,
        "family": model.cfg.family,
        "parameters": model.num_parameters(),
        "dtype": params.dtype,
        "tokenizer": tokenizer is not None,
        "chat_template": bool(tokenizer and tokenizer.chat_template),
        "eos_ids": tokenizer.eos_ids if tokenizer else [],
    }
    # One atomic directory: readers never see weights without their tokenizer or status.json.
    with atomic_path(out_dir, is_dir=True) as tmp:
        # A base is chatted with in its own chat template when it has one (llmcore.prompts).
        style = "template" if status["chat_template"] else "plain"
        save_checkpoint(
            model,
            tmp,
            extra={"stage": STAGE, "source": params.source, "prompt_style": style},
            files=lambda target: copy_tokenizer_files(directory, target),
        )
        write_status(tmp, status)
    log_status(STAGE, EXPERIMENT, params, status)
    return status


def main(argv: list[str] | None = None) -> None:
    def body(args, params: StageParams) -> str | None:
        settings = params.section("base_model", BaseModelSectionParams)
        status = load_base_stage(settings, out_dir=args.out)
        if not status["loaded"]:
            return f"no base_model.source: wrote {args.out / STATUS_FILE} (loaded=false)"
        return f"{settings.source} ({status['family']}, {status['parameters']:,} parameters) -> {args.out}"

    run_stage(
        STAGE,
        "Convert a Hugging Face Llama / Qwen3 / Gemma 3 base into an llmcore checkpoint.",
        body,
        argv=argv,
        errors=(BaseUnavailableError, CheckpointError, TokenizerConfigError),
        paths={"out": "the llmcore checkpoint"},
    )


if __name__ == "__main__":
    main()
