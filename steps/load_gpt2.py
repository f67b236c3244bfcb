"""Load OpenAI's GPT-2 weights into an llmcore checkpoint (``models/gpt2``) for the fine-tunes.

``load_gpt2.source`` is a GPT-2 size (gpt2-small/medium/large/xl, through the Hugging Face Hub
cache), a Hub repo id, or a local directory in the Hugging Face format (config.json +
model.safetensors). The output directory holds the checkpoint (model.safetensors + config.json),
GPT-2's BPE files (encoder.json + vocab.bpe, when a local copy exists) and ``status.json``.

Offline, the weights are usually unavailable. With ``required: false`` (the default, so that the
default pipeline runs without network) the stage then warns and writes only
``status.json`` = ``{"loaded": false, "source": ..., "reason": ...}``; a fine-tune whose
``base_model.dir`` is ``models/gpt2`` reads it and fails with a clear message. With
``required: true`` the stage itself fails.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from pydantic import Field

from llmcore.checkpoint import CheckpointError, save_checkpoint
from llmcore.tokenizer import ENCODING_DIR_ENV
from llmcore.weights import HF_REPOS, WeightsUnavailableError, load_gpt2
from llmpipe.cli import StageParams, run_stage
from llmpipe.data import TokenizerParams
from llmpipe.io import atomic_path
from llmpipe.models import STATUS_FILE, find_encoding_files, log_status, write_status
from llmpipe.params import StrictModel

STAGE = "load_gpt2"
EXPERIMENT = "load-gpt2"
HOW_TO_PROVIDE = (
    "To load GPT-2 offline, set load_gpt2.source to a local directory in the Hugging Face format "
    "(config.json + model.safetensors, e.g. a copy of the Hub repo {repo}), or pre-fill the Hugging "
    "Face cache (HF_HOME) on this machine with that repo"
)


class LoadGPT2Params(StrictModel):
    source: str = Field(min_length=1)  # a GPT-2 size, a Hub repo id, or a local HF-format dir
    required: bool  # false: unavailable weights give status.json loaded=false, not an error


def load_gpt2_stage(params: LoadGPT2Params, *, out_dir: Path, tokenizer_params: TokenizerParams) -> dict:
    """Write ``out_dir`` (checkpoint + BPE files + status.json, or status.json alone); returns the status."""
    try:
        model = load_gpt2(params.source)
    except WeightsUnavailableError as exc:
        repo = HF_REPOS.get(params.source, "openai-community/gpt2")
        if params.required:
            raise WeightsUnavailableError(f"{exc}\n{HOW_TO_PROVIDE.format(repo=repo)}") from exc
        status = {"loaded": False, "source": params.source, "reason": str(exc)}
        with atomic_path(out_dir, is_dir=True) as tmp:
            write_status(tmp, status)
        print(
            f"{STAGE}: WARNING: GPT-2 weights {params.source!r} are unavailable; wrote only "
            f"{out_dir / STATUS_FILE} (loaded=false). Fine-tunes with base_model.dir={out_dir} will fail. "
            f"{HOW_TO_PROVIDE.format(repo=repo)}, and set load_gpt2.required: true to make this an error.",
            file=sys.stderr,
        )
        log_status(STAGE, EXPERIMENT, params, status)
        return status

    encoding_files = find_encoding_files(tokenizer_params.encoding_dir or os.environ.get(ENCODING_DIR_ENV))
    status = {
        "loaded": True,
        "source": params.source,
        "parameters": model.num_parameters(),
        "tokenizer_files": encoding_files is not None,
    }
    # One atomic directory: readers never see weights without status.json or the reverse.
    with atomic_path(out_dir, is_dir=True) as tmp:
        save_checkpoint(model, tmp, extra={"stage": STAGE, "source": params.source, "prompt_style": "plain"})
        for name, path in (encoding_files or {}).items():
            shutil.copyfile(path, tmp / name)
        write_status(tmp, status)
    log_status(STAGE, EXPERIMENT, params, status)
    return status


def main(argv: list[str] | None = None) -> None:
    def body(args, params: StageParams) -> str | None:
        settings = params.section(STAGE, LoadGPT2Params)
        status = load_gpt2_stage(
            settings, out_dir=args.out, tokenizer_params=params.section("tokenizer", TokenizerParams)
        )
        return f"{settings.source} ({status['parameters']:,} parameters) -> {args.out}" if status["loaded"] else None

    run_stage(
        STAGE,
        "Load OpenAI's GPT-2 weights into an llmcore checkpoint.",
        body,
        argv=argv,
        errors=(WeightsUnavailableError, CheckpointError),
        paths={"out": "GPT-2's llmcore checkpoint (or status.json when its weights are unavailable)"},
    )


if __name__ == "__main__":
    main()
