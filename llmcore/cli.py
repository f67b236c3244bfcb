"""The ``llm`` command: classify a text (spam or ham, or your own labels), continue a prompt, or chat
with the instruction model.

    llm classify "You won a prize! Call now"        # spam (0.97)
    llm generate "Every effort moves you" --max-new-tokens 40 --temperature 0.8 --top-k 40
    llm chat                                          # instruction (+ optional input), answer streams
    llm chat --int8                                   # int8 Linear weights: faster CPU decoding
    llm serve                                         # HTTP: OpenAI-compatible API + chat page (serving/)
    llm compare lr-2e-3 lr-3e-4                       # paired: difference, 95% CI, McNemar p (pipelines/compare.py)
    llm sweep -S finetune_classifier.lr=2e-3 --seeds 123,124,125   # mean ± sd over seeds (pipelines/sweep.py)
    llm stack up                                      # the team stack: PostgreSQL, S3, MLflow, Prefect (stack/)

Models are the pipeline's outputs (``models/...``); a missing one is reported with the DVC stage
that produces it. Text is printed as tokens arrive: a token may be part of a multi-byte character,
so the bytes go through an incremental UTF-8 decoder instead of decoding tokens one by one.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from llmcore.bpe import is_trained_dir
from llmcore.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_meta
from llmcore.generate import generate_stream
from llmcore.instruct import response_prompt
from llmcore.tokenizer import ENCODING_DIR_ENV, GPT2_FILES, TokenizerFilesError, encode, eot_id, get_tokenizer

DEFAULT_MODELS = ("models/spam_classifier", "models/pretrained", "models/instruct", "models/preference", "models/gpt2")


def produced_by(path: str) -> str | None:
    """The dvc.yaml stage whose outputs include ``path``, read from the file (so it never goes stale):
    the current directory's, else that of the checkout this package runs from."""
    import yaml  # only for the error message of a missing model

    found = [f for f in (Path("dvc.yaml"), Path(__file__).resolve().parents[1] / "dvc.yaml") if f.is_file()]
    try:
        stages = yaml.safe_load(found[0].read_text()).get("stages", {}) if found else {}
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    for name, stage in stages.items():
        outs = {next(iter(out)) if isinstance(out, dict) else out for out in stage.get("outs", [])}
        if path in outs:
            return name
    return None


class CliError(Exception):
    """A problem the user can fix (missing model, bad option); printed without a traceback."""


def check_model_dir(directory: str) -> Path:
    """``directory`` if it holds a checkpoint, else a CliError saying which stage makes it."""
    path = Path(directory)
    status = path / "status.json"
    if status.is_file() and not json.loads(status.read_text()).get("loaded", True):
        raise CliError(f"{path} holds no weights (see {status}): provide GPT-2's, then `dvc repro -f load_gpt2`")
    if not (path / "config.json").is_file():
        stage = produced_by(path.as_posix())
        fix = f"run `dvc repro {stage}`" if stage else "pass --model with a checkpoint directory"
        raise CliError(f"{path} not found: {fix}")
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
        raise TokenizerFilesError(f"{model_dir / missing[0]} not found: a model directory carries the GPT-2 "
                                  f"files it was trained with ({' and '.join(GPT2_FILES)}); copy them there or "
                                  f"set {ENCODING_DIR_ENV} to a directory holding them")
    return get_tokenizer(model_dir)


def stream_text(tokenizer, token_steps: Iterable[int]) -> Iterator[str]:
    """Text pieces as tokens arrive; bytes of an unfinished UTF-8 character wait for the next token."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in token_steps:
        piece = decoder.decode(tokenizer.decode_single_token_bytes(token))
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


def stream_reply(model, tokenizer, prompt: str | list[int], args: argparse.Namespace) -> None:
    """Generate from ``prompt`` (text, or ids) until the end-of-text token or the token limit,
    printing text as it comes."""
    if hasattr(tokenizer, "eos_ids"):  # a Hugging Face base's tokenizer (llmcore.hf_tokenizer)
        ids = prompt if isinstance(prompt, list) else tokenizer.encode(prompt, add_special_tokens=True)
        steps = generate_stream(model, [ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, eos_id=tokenizer.eos_id, seed=args.seed)
        for piece in tokenizer.stream_decode(int(s[0]) for s in steps if int(s[0]) not in tokenizer.eos_ids):
            print(piece, end="", flush=True)
        return
    eos = eot_id(tokenizer)
    ids = encode(tokenizer, prompt) or [eos]  # an empty prompt starts from <|endoftext|>
    context = model.cfg.context_length
    if len(ids) >= context:
        print(f"llm: the prompt is {len(ids)} tokens and the model's context {context}: it reads only the "
              f"last {context - 1}", file=sys.stderr)
    steps = generate_stream(
        model, [ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, eos_id=eos, seed=args.seed,
    )
    tokens = (int(step[0]) for step in steps if int(step[0]) != eos)
    for piece in stream_text(tokenizer, tokens):
        print(piece, end="", flush=True)


def cmd_classify(args: argparse.Namespace) -> None:
    from llmcore.classifier import classify_texts, load_classifier

    model_dir = check_model_dir(args.model)
    model = load_classifier(model_dir)
    # Two classes: the positive class's probability ("spam probability"); more: the label's own.
    of = f"{model.labels[1]} probability" if model.num_classes == 2 else "probability"
    for text, (label, probability) in zip(args.text, classify_texts(model, tokenizer_for(model_dir), args.text)):
        prefix = f"{text!r}: " if len(args.text) > 1 else ""
        print(f"{prefix}{label} ({of} {probability:.3f})")


def load_generator(args: argparse.Namespace) -> tuple[Path, object]:
    """The checkpoint at ``args.model``, with int8 Linear weights when ``--int8`` (CPU, ~2-4x faster)."""
    model_dir = check_model_dir(args.model)
    model = load_checkpoint(model_dir)
    if args.int8:
        from llmcore.quantize import quantize_int8

        model = quantize_int8(model.cpu(), inplace=True)
    return model_dir, model


def cmd_generate(args: argparse.Namespace) -> None:
    model_dir, model = load_generator(args)
    tokenizer = tokenizer_for(model_dir)
    print(args.prompt, end="", flush=True)
    stream_reply(model, tokenizer, args.prompt, args)
    print()


def chat_turns(stream, separator: str, interactive: bool) -> Iterator[tuple[str, str]]:
    """(instruction, input) pairs. At a terminal: an instruction prompt, then an optional input
    prompt. Piped: one line per instruction, its optional input after ``separator`` on the same
    line (a tab by default: ``printf 'Summarize\tThe text' | llm chat``). "exit" or the end stops."""
    while True:
        if interactive:
            try:
                instruction = input("\nInstruction: ").strip()
                if instruction.lower() in ("exit", "quit"):
                    return
                extra = input("Input (optional, Enter to skip): ").strip() if instruction else ""
            except EOFError:
                return
        else:
            line = stream.readline()
            if not line:
                return
            instruction, _, extra = line.rstrip("\r\n").partition(separator)
            instruction, extra = instruction.strip(), extra.strip()
            if instruction.lower() in ("exit", "quit"):
                return
            if instruction:
                print(f"\nInstruction: {instruction}" + (f"\nInput: {extra}" if extra else ""))
        if instruction:
            yield instruction, extra


def cmd_chat(args: argparse.Namespace) -> None:
    model_dir, model = load_generator(args)
    tokenizer = tokenizer_for(model_dir)
    style = read_checkpoint_meta(model_dir).get("prompt_style", "alpaca")  # the style it was fine-tuned in
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {model_dir}. Type an instruction (\"exit\" or Ctrl-D to quit).")
    for instruction, extra in chat_turns(sys.stdin, args.input_separator, interactive):
        print("Response: ", end="", flush=True)
        if getattr(tokenizer, "chat_template", None):  # a base with a chat template: the model's own format
            content = f"{instruction}\n\n{extra}" if extra else instruction
            stream_reply(model, tokenizer, tokenizer.chat_ids([{"role": "user", "content": content}]), args)
        else:
            stream_reply(model, tokenizer, response_prompt({"instruction": instruction, "input": extra}, style), args)
        print()
    print()


def cmd_serve(argv: Sequence[str]) -> int:
    # The one exception to llmcore importing nothing but torch and tiktoken: `llm serve` hands its
    # arguments to the serving package (FastAPI, uvicorn), imported here and only here.
    from serving.__main__ import main as serve_main

    return serve_main(argv, prog="llm serve")


def cmd_pipeline_tool(command: str, argv: Sequence[str]) -> int:
    # `llm compare` and `llm sweep` read DVC experiments, MLflow and scipy: their logic lives in the
    # pipelines package, imported here and only here (llmcore stays pure PyTorch + tiktoken).
    import importlib

    return importlib.import_module(f"pipelines.{command}").main(argv, prog=f"llm {command}")


def cmd_stack(argv: Sequence[str]) -> int:
    # Like `llm serve`: the stack package (servers, boto3, psycopg2) is imported here and only here.
    from stack.cli import main as stack_main

    return stack_main(argv, prog="llm stack")


def _add_sampling(parser: argparse.ArgumentParser, max_new_tokens: int, temperature: float = 0.0,
                  top_k: int | None = None) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=temperature, help="0: greedy (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=top_k, help="sample from the k likeliest (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")
    parser.add_argument("--int8", action="store_true",
                        help="int8 weights for the Linear layers (CPU inference; see llmcore.quantize)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm", description="Use the pipeline's models from the terminal.")
    commands = parser.add_subparsers(dest="command", required=True)

    classify = commands.add_parser("classify", help="each text's label (spam or ham by default) and probability")
    classify.add_argument("text", nargs="+", help="one or more texts")
    classify.add_argument("--model", default="models/spam_classifier")
    classify.set_defaults(run=cmd_classify)

    generate = commands.add_parser("generate", help="continue a prompt, streaming tokens")
    generate.add_argument("prompt")
    generate.add_argument("--model", default="models/pretrained")
    # Sampling by default: a small model's greedy continuation is mostly the same few tokens again.
    _add_sampling(generate, max_new_tokens=50, temperature=0.8, top_k=40)
    generate.set_defaults(run=cmd_generate)

    chat = commands.add_parser("chat", help="answer instructions with the instruction-tuned model")
    chat.add_argument("--model", default="models/instruct")
    chat.add_argument("--input-separator", default="\t", metavar="SEP",
                      help="piped input: one instruction per line, its optional input after SEP (default: a tab)")
    _add_sampling(chat, max_new_tokens=256)
    chat.set_defaults(run=cmd_chat)

    # Its options are serving's own (`llm serve --help`): they are passed through unparsed.
    commands.add_parser("serve", help="serve the models over HTTP (OpenAI-compatible API, chat page)", add_help=False)
    commands.add_parser("compare", help="two models on the same examples: difference, interval, paired test",
                        add_help=False)
    commands.add_parser("sweep", help="one configuration over several seeds (dvc exp run): mean ± sd", add_help=False)
    commands.add_parser("stack", help="the team stack: up | down | env | status | remote (stack/)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        return cmd_serve(rest)
    if args.command in ("compare", "sweep"):
        return cmd_pipeline_tool(args.command, rest)
    if args.command == "stack":
        return cmd_stack(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        args.run(args)
    except (CliError, CheckpointError, TokenizerFilesError, ValueError) as exc:
        print(f"llm {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `llm generate ... | head` closed the pipe: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
