"""The ``llm`` command: missing models name their stage, generate streams, chat, classify."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli import llm as cli
from llmcore.checkpoint import save_checkpoint
from llmcore.classifier import GPTClassifier, classify_texts, save_classifier
from llmcore.config import GPTConfig
from llmcore.generate import generate, generate_text
from llmcore.instruct import response_prompt
from llmcore.model import GPTModel
from llmcore.tokenizer import ENCODING_DIR_ENV, ENDOFTEXT_ID, TokenizerFilesError, encode
from llmpipe import model_dirs


@pytest.fixture
def offline_tokenizer(monkeypatch: pytest.MonkeyPatch, gpt2_encoding_dir: Path) -> None:
    monkeypatch.setenv(ENCODING_DIR_ENV, str(gpt2_encoding_dir))


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(GPTModel(GPTConfig.from_preset("cpu-tiny")), tmp_path_factory.mktemp("cli") / "gpt")


@pytest.mark.parametrize(
    ("command", "stage"),
    [(["classify", "hi"], "finetune_classifier"), (["generate", "hi"], "pretrain"), (["chat"], "finetune_instruct")],
)
def test_missing_default_model_names_the_stage_that_makes_it(
    command: list[str], stage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)  # no models/ here
    assert cli.main(command) == 1
    err = capsys.readouterr().err
    assert f"run `dvc repro {stage}`" in err and "not found" in err


def test_gpt2_dir_without_weights_is_reported(tmp_path: Path, capsys) -> None:
    (tmp_path / "status.json").write_text(json.dumps({"loaded": False}))
    assert cli.main(["generate", "hi", "--model", str(tmp_path)]) == 1
    assert "holds no weights" in capsys.readouterr().err


def test_generate_prints_the_prompt_and_its_greedy_continuation(
    gpt_dir: Path, offline_tokenizer, tokenizer, capsys
) -> None:
    assert (
        cli.main(
            [
                "generate",
                "Every effort moves you",
                "--model",
                str(gpt_dir),
                "--max-new-tokens",
                "12",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    model = cli.load_checkpoint(gpt_dir)
    expected = generate_text(model, tokenizer, "Every effort moves you", 12, eos_id=ENDOFTEXT_ID)
    assert capsys.readouterr().out == "Every effort moves you" + expected + "\n"


def test_generate_writes_each_token_before_the_next_is_computed(
    gpt_dir: Path, offline_tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    printed_when_asked: list[int] = []
    real_stream = cli.generate_stream

    def recording_stream(*args, **kwargs):
        for step in real_stream(*args, **kwargs):
            yield step
            printed_when_asked.append(len(out.getvalue()))  # what was on screen when the next step ran

    monkeypatch.setattr(cli, "generate_stream", recording_stream)
    assert (
        cli.main(
            [
                "generate",
                "Hello",
                "--model",
                str(gpt_dir),
                "--max-new-tokens",
                "8",
                "--temperature",
                "1.0",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    assert len(printed_when_asked) == 8
    assert printed_when_asked == sorted(printed_when_asked) and printed_when_asked[-1] > printed_when_asked[0]


def test_stream_text_keeps_multibyte_characters_whole(tokenizer) -> None:
    text = "naïve café 😀 日本語"
    ids = encode(tokenizer, text)
    # Some tokens are fragments of a character: decoding them one by one would print garbage.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    pieces = list(cli.stream_text(tokenizer, ids))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert len(pieces) > 1


def expected_replies(gpt_dir: Path, tokenizer, entries) -> list[str]:
    model = cli.load_checkpoint(gpt_dir)
    replies = [generate(model, [encode(tokenizer, response_prompt(e))], 6, eos_id=ENDOFTEXT_ID)[0] for e in entries]
    return [f"Response: {tokenizer.decode(reply)}\n" for reply in replies]


def test_chat_at_a_terminal_asks_for_the_instruction_then_its_input(
    gpt_dir: Path, offline_tokenizer, tokenizer, monkeypatch, capsys
) -> None:
    stdin = io.StringIO("Name a color.\n\nTranslate to German.\nGood morning\nexit\nnever read\n")
    stdin.isatty = lambda: True
    monkeypatch.setattr("sys.stdin", stdin)
    assert cli.main(["chat", "--model", str(gpt_dir), "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    for reply in expected_replies(
        gpt_dir,
        tokenizer,
        (
            {"instruction": "Name a color.", "input": ""},
            {"instruction": "Translate to German.", "input": "Good morning"},
        ),
    ):
        assert reply in out
    assert out.count("Response: ") == 2


def test_piped_chat_takes_one_instruction_per_line_and_input_after_a_tab(
    gpt_dir: Path, offline_tokenizer, tokenizer, monkeypatch, capsys
) -> None:
    monkeypatch.setattr(
        "sys.stdin",
        io.StringIO("Name a color.\nTranslate to German.\tGood morning\nName a fruit.\n\nexit\nnever read\n"),
    )
    assert cli.main(["chat", "--model", str(gpt_dir), "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    entries = (
        {"instruction": "Name a color.", "input": ""},
        {"instruction": "Translate to German.", "input": "Good morning"},
        {"instruction": "Name a fruit.", "input": ""},
    )
    blocks = out.split("\nInstruction: ")[1:]  # one per line read, in order
    assert len(blocks) == 3 and "never read" not in out
    for block, entry, reply in zip(blocks, entries, expected_replies(gpt_dir, tokenizer, entries)):
        assert block.startswith(entry["instruction"] + ("\nInput: Good morning" if entry["input"] else "") + "\n")
        assert reply in block


def test_piped_chat_separator_is_an_option(gpt_dir: Path, offline_tokenizer, tokenizer, monkeypatch, capsys) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Translate to German. || Good morning\n"))
    assert cli.main(["chat", "--model", str(gpt_dir), "--max-new-tokens", "6", "--input-separator", "||"]) == 0
    out = capsys.readouterr().out
    assert (
        expected_replies(gpt_dir, tokenizer, [{"instruction": "Translate to German.", "input": "Good morning"}])[0]
        in out
    )


@pytest.mark.parametrize(
    ("extra", "prompt"),
    [
        (
            {"stage": "finetune_instruct", "prompt_style": "phi3"},
            "<|user|>\nTranslate to German.\nGood morning\n<|assistant|>\n",
        ),
        ({"stage": "pretrain"}, "Translate to German.\nGood morning"),  # older checkpoint: style by its stage
    ],
)
def test_chat_prompts_in_the_style_the_checkpoint_records(
    extra: dict, prompt: str, tmp_path: Path, offline_tokenizer, tokenizer, monkeypatch, capsys
) -> None:
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("cpu-tiny"))
    model_dir = save_checkpoint(model, tmp_path / "m", extra=extra)
    monkeypatch.setattr("sys.stdin", io.StringIO("Translate to German.\tGood morning\n"))
    assert cli.main(["chat", "--model", str(model_dir), "--max-new-tokens", "6"]) == 0
    answer = generate(model.eval(), [encode(tokenizer, prompt)], 6, eos_id=ENDOFTEXT_ID)[0]
    assert f"Response: {tokenizer.decode(answer)}\n" in capsys.readouterr().out


def test_chat_exits_cleanly_at_end_of_input(gpt_dir: Path, offline_tokenizer, monkeypatch, capsys) -> None:
    stdin = io.StringIO("Name a color.\n")  # EOF while asking for the input, at a terminal
    stdin.isatty = lambda: True
    monkeypatch.setattr("sys.stdin", stdin)
    assert cli.main(["chat", "--model", str(gpt_dir)]) == 0
    assert "Response:" not in capsys.readouterr().out


def test_classify_prints_label_and_spam_probability(tmp_path: Path, offline_tokenizer, tokenizer, capsys) -> None:
    torch.manual_seed(0)
    classifier = GPTClassifier.from_gpt(GPTModel(GPTConfig.from_preset("cpu-tiny")), max_length=32)
    save_classifier(classifier, tmp_path / "clf")
    texts = ["WINNER! Claim your free prize now", "see you at lunch"]
    assert cli.main(["classify", *texts, "--model", str(tmp_path / "clf")]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = classify_texts(classifier.eval(), tokenizer, texts)
    assert lines == [f"{t!r}: {label} (spam probability {p:.3f})" for t, (label, p) in zip(texts, expected)]


def test_tokenizer_files_beside_the_model_are_used_without_the_env(
    gpt_dir: Path, gpt2_encoding_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = Path(shutil.copytree(gpt_dir, tmp_path / "with_bpe"))
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(gpt2_encoding_dir / name, model_dir / name)
    monkeypatch.delenv(ENCODING_DIR_ENV, raising=False)
    asked: list = []
    monkeypatch.setattr(model_dirs, "get_tokenizer", lambda directory=None: asked.append(directory) or "tok")
    assert model_dirs.tokenizer_for(model_dir) == "tok" and asked == [model_dir]
    (model_dir / "vocab.bpe").unlink()  # no download attempt: the missing file is named
    with pytest.raises(TokenizerFilesError, match=rf"^{model_dir / 'vocab.bpe'} not found: a model directory carries"):
        model_dirs.tokenizer_for(model_dir)
    assert asked == [model_dir]


def test_generate_with_a_model_dir_lacking_its_bpe_file_is_one_line(
    gpt_dir: Path, gpt2_encoding_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    model_dir = Path(shutil.copytree(gpt_dir, tmp_path / "m"))
    shutil.copy(gpt2_encoding_dir / "encoder.json", model_dir / "encoder.json")
    monkeypatch.delenv(ENCODING_DIR_ENV, raising=False)
    monkeypatch.setattr("tiktoken.get_encoding", lambda name: pytest.fail("tried tiktoken's download"))
    assert cli.main(["generate", "Hi", "--model", str(model_dir), "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"llm generate: error: {model_dir / 'vocab.bpe'} not found") and "\n" not in err
    (model_dir / "vocab.bpe").write_bytes((gpt2_encoding_dir / "vocab.bpe").read_bytes()[:1000])  # truncated
    assert cli.main(["generate", "Hi", "--model", str(model_dir), "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"llm generate: error: {model_dir / 'vocab.bpe'} is 1,000 bytes, GPT-2's vocab.bpe is 456,318 "
        "(truncated or another file): copy it again"
    )


def test_serve_is_the_serving_package_imported_only_when_asked(capsys) -> None:
    probe = "import sys, cli.llm; print(sorted(m for m in ('fastapi', 'uvicorn', 'serving') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == "[]\n"
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: llm serve") and "--classifier" in out and "--int8" in out


def test_generate_samples_by_default_and_reports_a_cropped_prompt(gpt_dir: Path, offline_tokenizer, capsys) -> None:
    args = cli.build_parser().parse_args(["generate", "hi"])
    assert (args.temperature, args.top_k) == (0.8, 40)  # readable sampling, not greedy repetition
    context = cli.load_checkpoint(gpt_dir).cfg.context_length
    long_prompt = "word" * (context + 10)
    assert cli.main(["generate", long_prompt, "--model", str(gpt_dir), "--max-new-tokens", "2", "--seed", "1"]) == 0
    assert f"tokens and the model's context {context}: it reads only the last {context - 1}" in capsys.readouterr().err


def test_a_closed_pipe_ends_generate_quietly(gpt_dir: Path, gpt2_encoding_dir: Path) -> None:
    command = (
        f"{sys.executable} -m cli.llm generate 'Every effort' --model {gpt_dir} --max-new-tokens 200 "
        f"--seed 1 | head -c 5"
    )
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", ENCODING_DIR_ENV: str(gpt2_encoding_dir)},
    )
    assert done.returncode == 0 and done.stdout == "Every"
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr
