"""``python -m serving`` / ``llm serve``: load the models and serve them with uvicorn.

    python -m serving                                      # models/instruct + models/spam_classifier
    python -m serving --model models:/instruct-gpt@champion --classifier models:/spam-classifier@champion
    LLMPIPE_SERVE_API_KEY=... python -m serving --host 0.0.0.0 --int8

The API key comes from the environment only (a command-line argument would end up in shell
history and process listings); binding to anything but a loopback address requires one.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from llmcore.checkpoint import CheckpointError
from llmcore.tokenizer import TokenizerFilesError
from llmpipe.model_dirs import UsageError
from serving.limits import DEFAULT_MAX_BODY_MB, ServeConfig
from serving.text import PROMPT_STYLES

API_KEY_ENV = "LLMPIPE_SERVE_API_KEY"
DEFAULTS = {"model": "models/instruct", "classifier": "models/spam_classifier"}


def build_parser(prog: str = "python -m serving") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve the instruction model (OpenAI-compatible API, "
        "chat page at /) and the spam classifier over HTTP.",
    )
    parser.add_argument(
        "--model",
        help="generator: a checkpoint directory or models:/NAME@ALIAS "
        f"(default: {DEFAULTS['model']} if present; '' for none)",
    )
    parser.add_argument(
        "--classifier",
        help="classifier: a directory or models:/NAME@ALIAS "
        f"(default: {DEFAULTS['classifier']} if present; '' for none)",
    )
    parser.add_argument("--host", default="127.0.0.1", help=f"a non-loopback address needs ${API_KEY_ENV}")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--int8", action="store_true", help="int8 Linear weights (CPU; see llmcore.quantize)")
    parser.add_argument(
        "--prompt-style",
        choices=PROMPT_STYLES,
        help="how chat messages become the prompt; default: the checkpoint's own prompt_style "
        "(its fine-tuning style, plain for a pretrained model, template for a Hugging Face base)",
    )
    limits = ServeConfig()  # each limit's default has one home: ServeConfig
    parser.add_argument(
        "--max-batch", type=int, default=limits.max_batch, help="generations decoded together (default: %(default)s)"
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=limits.max_queue,
        help="generations waiting; more get 429 (default: %(default)s)",
    )
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=limits.max_tokens,
        help="the largest max_tokens a request may ask (default: %(default)s)",
    )
    parser.add_argument(
        "--max-classify",
        type=int,
        default=limits.max_classify,
        help="classification requests computed at once; more get 429 (default: %(default)s)",
    )
    parser.add_argument(
        "--max-body-mb",
        type=float,
        default=DEFAULT_MAX_BODY_MB,
        help="larger request bodies are refused with a 413 before they are read (default: %(default)s)",
    )
    parser.add_argument(
        "--stream-interval-ms",
        type=float,
        default=10.0,
        help="streamed text is sent at most this often, a request's first and last pieces at "
        "once; 0 sends every token as it comes (default: %(default)s)",
    )
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def model_spec(value: str | None, default: str) -> str | None:
    """The model to load: as given ('' for none), else the default directory if the pipeline made it."""
    if value is None:
        return default if (Path(default) / "config.json").is_file() else None
    return value or None


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_all(specs: dict[str, str | None], args: argparse.Namespace) -> dict:
    """Each model by the kind its checkpoint is: ``--model`` naming a classifier (``llm serve --model
    models:/spam-classifier@champion``) serves it as the classifier, in place of the default one."""
    from serving.models import CLASSIFIER, GENERATOR, load_served

    served = {GENERATOR: None, CLASSIFIER: None}
    for kind, spec in specs.items():
        if not spec or (kind == CLASSIFIER and args.classifier is None and served[CLASSIFIER] is not None):
            continue
        model = load_served(spec, kind, int8=args.int8, prompt_style=args.prompt_style)
        if served[model.kind] is not None:
            raise UsageError(
                f"two {model.kind}s: {served[model.kind].source} and {model.source}; pass one with --{model.kind}"
            )
        served[model.kind] = model
    return served


def serve(args: argparse.Namespace) -> None:
    import torch
    import uvicorn

    from serving.app import create_app
    from serving.models import CLASSIFIER, GENERATOR

    api_key = os.environ.get(API_KEY_ENV) or None
    if not is_loopback(args.host) and api_key is None:
        raise UsageError(f"--host {args.host} is reachable from other machines: set {API_KEY_ENV} to require a key")
    specs = {
        GENERATOR: model_spec(args.model, DEFAULTS["model"]),
        CLASSIFIER: model_spec(args.classifier, DEFAULTS["classifier"]),
    }
    if not any(specs.values()):
        raise UsageError(
            f"nothing to serve: pass --model and/or --classifier (the defaults {DEFAULTS['model']} and "
            f"{DEFAULTS['classifier']} come from `dvc repro finetune_instruct finetune_classifier`)"
        )
    # The main thread (loading, the event loop) runs torch with one thread, so that it keeps no
    # OpenMP pool beside the torch thread's: see serving.engine (two pools: decoding 2-2.5x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    served = load_all(specs, args)
    config = ServeConfig(
        torch_threads=threads,
        api_key=api_key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_tokens=args.max_tokens,
        max_classify=args.max_classify,
        max_body_bytes=int(args.max_body_mb * 1e6),
        stream_interval_s=args.stream_interval_ms / 1e3,
    )
    app = create_app(served[GENERATOR], served[CLASSIFIER], config)
    for kind, model in served.items():
        if model is not None:
            print(f"{kind}: {model.name!r} from {model.source}{' (int8)' if model.int8 else ''}", flush=True)
    print(
        f"serving on http://{args.host}:{args.port} (chat page at /, API at /v1)"
        f"{'; API key required' if api_key else ''}",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def main(argv: Sequence[str] | None = None, prog: str = "python -m serving") -> int:
    args = build_parser(prog).parse_args(argv)
    if (
        args.max_batch < 1
        or args.max_queue < 0
        or args.max_tokens < 1
        or args.max_classify < 1
        or not args.max_body_mb > 0
        or args.stream_interval_ms < 0
    ):
        print(
            f"{prog}: error: --max-batch, --max-tokens and --max-classify must be >= 1, --max-queue >= 0, "
            "--max-body-mb > 0, "
            "--stream-interval-ms >= 0",
            file=sys.stderr,
        )
        return 2
    try:
        serve(args)
    except (UsageError, CheckpointError, TokenizerFilesError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
