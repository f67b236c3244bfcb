"""The ``llm`` command: classify a text (spam or ham, or your own labels), continue a prompt, or chat
with the instruction model.

    llm classify "You won a prize! Call now"        # spam (0.97)
    llm generate "Every effort moves you" --max-new-tokens 40 --temperature 0.8 --top-k 40
    llm chat                                          # instruction (+ optional input), answer streams
    llm chat --int8                                   # int8 Linear weights: faster CPU decoding
    llm chat --int8 --compile                         # int8 decoding as one C++ call a token: faster still
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
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from llmcore.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_meta
from llmcore.generate import generate_stream
from llmcore.prompts import checkpoint_prompt_style, response_prompt
from llmcore.tokenizer import TokenizerFilesError, encode, eot_id
from llmpipe.model_dirs import UsageError, check_model_dir, tokenizer_for


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
    options = dict(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        compile="fused" if args.compile else False,
    )
    if hasattr(tokenizer, "eos_ids"):  # a Hugging Face base's tokenizer (llmcore.hf_tokenizer)
        ids = prompt if isinstance(prompt, list) else tokenizer.encode(prompt, add_special_tokens=True)
        steps = generate_stream(model, [ids], args.max_new_tokens, eos_id=tokenizer.eos_id, **options)
        for piece in tokenizer.stream_decode(int(s[0]) for s in steps if int(s[0]) not in tokenizer.eos_ids):
            print(piece, end="", flush=True)
        return
    eos = eot_id(tokenizer)
    ids = encode(tokenizer, prompt) or [eos]  # an empty prompt starts from <|endoftext|>
    context = model.cfg.context_length
    if len(ids) >= context:
        print(
            f"llm: the prompt is {len(ids)} tokens and the model's context {context}: it reads only the "
            f"last {context - 1}",
            file=sys.stderr,
        )
    steps = generate_stream(model, [ids], args.max_new_tokens, eos_id=eos, **options)
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
    """The checkpoint at ``args.model``, with int8 Linear weights when ``--int8`` (CPU, ~4-6x faster):
    weight-only int8 on llmcore's kernel, or fbgemm's where the kernel cannot be built
    (``llmcore.quantize.preferred_int8``)."""
    model_dir = check_model_dir(args.model)
    model = load_checkpoint(model_dir)
    if args.int8:
        from llmcore.quantize import preferred_int8

        model = preferred_int8(compile=args.compile)(model.cpu(), inplace=True)
    if args.compile and next(model.parameters()).device.type == "cpu":
        from llmcore import cpu_kernels

        cpu_kernels.isa()  # built here (once per machine, announced) rather than after the prompt is echoed
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


def chat_prompt_for(tokenizer, style: str, instruction: str, extra: str) -> str | list[int]:
    """One turn's prompt in the checkpoint's style (``llmcore.prompts``): its fine-tuning format, the
    text itself for a pretrained model, a Hugging Face base's own chat template."""
    if style == "template":
        content = f"{instruction}\n\n{extra}" if extra else instruction
        return tokenizer.chat_ids([{"role": "user", "content": content}])
    if style == "plain":
        return f"{instruction}\n{extra}" if extra else instruction
    return response_prompt({"instruction": instruction, "input": extra}, style)


def cmd_chat(args: argparse.Namespace) -> None:
    model_dir, model = load_generator(args)
    tokenizer = tokenizer_for(model_dir)
    style = checkpoint_prompt_style(read_checkpoint_meta(model_dir))  # the style it was fine-tuned in
    if style == "template" and not getattr(tokenizer, "chat_template", None):
        raise UsageError(f"{model_dir} is prompted with its tokenizer's chat template, and its tokenizer has none")
    interactive = sys.stdin.isatty()
    if interactive:
        print(f'Chatting with {model_dir}. Type an instruction ("exit" or Ctrl-D to quit).')
    for instruction, extra in chat_turns(sys.stdin, args.input_separator, interactive):
        print("Response: ", end="", flush=True)
        stream_reply(model, tokenizer, chat_prompt_for(tokenizer, style, instruction, extra), args)
        print()
    print()


def cmd_serve(argv: Sequence[str]) -> int:
    # `llm serve` hands its arguments to the serving package (FastAPI, uvicorn), imported only then.
    from serving.__main__ import main as serve_main

    return serve_main(argv, prog="llm serve")


def cmd_pipeline_tool(command: str, argv: Sequence[str]) -> int:
    # `llm compare` and `llm sweep` read DVC experiments, MLflow and scipy: their logic lives in the
    # pipelines package, imported only then.
    import importlib

    return importlib.import_module(f"pipelines.{command}").main(argv, prog=f"llm {command}")


def cmd_stack(argv: Sequence[str]) -> int:
    # Like `llm serve`: the stack package (servers, boto3, psycopg2) is imported only then.
    from stack.cli import main as stack_main

    return stack_main(argv, prog="llm stack")


def _add_sampling(
    parser: argparse.ArgumentParser, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None
) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=temperature, help="0: greedy (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=top_k, help="sample from the k likeliest (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")
    parser.add_argument(
        "--int8", action="store_true", help="int8 weights for the Linear layers (CPU inference; see llmcore.quantize)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="decode one token per C++ call: with --int8 on a CPU, llmcore's fused step (llmcore.fused_step, "
        "no wait); otherwise the step compiled ahead of time (AOTInductor, llmcore.aot_step: the first reply "
        "waits ~20-40 s for compilation)",
    )


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
    chat.add_argument(
        "--input-separator",
        default="\t",
        metavar="SEP",
        help="piped input: one instruction per line, its optional input after SEP (default: a tab)",
    )
    _add_sampling(chat, max_new_tokens=256)
    chat.set_defaults(run=cmd_chat)

    # Its options are serving's own (`llm serve --help`): they are passed through unparsed.
    commands.add_parser("serve", help="serve the models over HTTP (OpenAI-compatible API, chat page)", add_help=False)
    commands.add_parser(
        "compare", help="two models on the same examples: difference, interval, paired test", add_help=False
    )
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
    except (UsageError, CheckpointError, TokenizerFilesError, ValueError) as exc:
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
