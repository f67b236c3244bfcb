"""Your own instruction data: Alpaca JSON/JSONL and chat-format ``messages``, prompt styles, loss on
answers only, entry-by-entry validation, and a chat dataset fine-tuned and scored end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from llmcore.checkpoint import read_checkpoint_meta, save_checkpoint
from llmcore.config import GPTConfig
from llmcore.instruct import IGNORE_INDEX, InstructionDataset, collate_instructions, encode_entry, response_prompt
from llmcore.model import GPTModel
from llmcore.prompts import extract_response, format_input, format_response, reference, segments
from llmcore.tokenizer import get_tokenizer
from llmpipe.data import DataError, TokenizerParams
from steps import build_instruction_dataset as data_stage
from steps import finetune_instruct as ft
from steps import score_instructions as score
from steps.data.datasets import load_entries
from tests.fake_ollama import closed_port_url
from tests.params_values import params_file, params_for
from tests.trainer_params import TEST_TRAINING

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("LLMPIPE_MIRROR") or REPO.parent / "shared" / "data")
TOKENIZER = params_for(TokenizerParams, encoding_dir=str(MIRROR / "gpt2"))

pytestmark = pytest.mark.skipif(not MIRROR.is_dir(), reason=f"offline mirror {MIRROR} not found")


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


CHATS = [
    chat(
        ("system", "You answer briefly."),
        ("user", "Capital of France?"),
        ("assistant", "Paris."),
        ("user", "And of Italy?"),
        ("assistant", "Rome."),
    ),
    chat(("user", "Name a primary color."), ("assistant", "Red.")),
    chat(("user", "What is 2 + 2?"), ("assistant", "4.")),
]


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer(TOKENIZER.encoding_dir)


def test_a_single_turn_chat_is_the_books_prompt() -> None:
    entry = CHATS[1]
    alpaca = {"instruction": "Name a primary color.", "input": "", "output": "Red."}
    assert "".join(text for text, _ in segments(entry)) == format_input(alpaca) + format_response(alpaca)
    assert response_prompt(entry) == response_prompt(alpaca) and reference(entry) == "Red."


def test_phi3_style_and_multi_turn_chats() -> None:
    assert "".join(t for t, _ in segments(CHATS[0], "phi3")) == (
        "<|system|>\nYou answer briefly.\n<|user|>\nCapital of France?\n<|assistant|>\nParis.<|endoftext|>"
        "\n<|user|>\nAnd of Italy?\n<|assistant|>\nRome."
    )
    alpaca = {"instruction": "Rewrite it.", "input": "The cake was eaten.", "output": "Someone ate it."}
    assert response_prompt(alpaca, "phi3") == "<|user|>\nRewrite it.\nThe cake was eaten.\n<|assistant|>\n"
    assert response_prompt(CHATS[0]) == (  # the system message in place of the preamble
        "You answer briefly.\n\n### Instruction:\nCapital of France?\n\n### Response:\nParis.<|endoftext|>"
        "\n\n### Instruction:\nAnd of Italy?\n\n### Response:\n"
    )
    prompt = response_prompt(CHATS[2], "phi3")
    assert extract_response(prompt + " 4. ", prompt, "phi3") == "4."
    with pytest.raises(ValueError, match="prompt style"):
        segments(CHATS[2], "chatml")


def test_only_assistant_turns_are_trained(tok) -> None:
    for style in ("alpaca", "phi3"):
        example = encode_entry(tok, CHATS[0], style)
        inputs, targets = collate_instructions([example], mask_prompt=True)
        trained = [int(t) for t in targets[0] if t != IGNORE_INDEX]
        text = tok.decode(trained)
        assert "Paris.<|endoftext|>" in text and "Rome.<|endoftext|>" in text  # the final one: the pad target
        assert "France" not in text and "Italy" not in text and "briefly" not in text
        assert len(example.response_spans) == 2
        unmasked = collate_instructions([example], mask_prompt=False)[1]
        assert (unmasked[0] != IGNORE_INDEX).sum() == len(example.token_ids)


def test_the_books_entries_encode_as_before(tok) -> None:
    entries = json.loads((MIRROR / "instruction-data.json").read_text())[:50]
    for entry, example in zip(entries, InstructionDataset(entries, tok)):
        prompt_ids = tok.encode(format_input(entry))
        assert example.token_ids == tok.encode(format_input(entry) + format_response(entry), allowed_special="all")
        assert example.prompt_length <= len(prompt_ids) and example.response_spans == ()


def test_jsonl_alpaca_and_chat_entries_load(tmp_path: Path) -> None:
    alpaca = {"instruction": "a", "input": "", "output": "b"}
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(e) for e in (alpaca, CHATS[1], CHATS[0])) + "\n")
    assert load_entries(tmp_path / "d.jsonl") == [alpaca, CHATS[1], CHATS[0]]


@pytest.mark.parametrize(
    ("entries", "pattern"),
    [
        (
            [chat(("user", "q"), ("bot", "a"))],
            r"entry 0 field 'messages\[1\]\.role': Input should be 'system', 'user' or 'assistant'",
        ),
        (
            [chat(("user", "q"), ("assistant", ""))],
            r"entry 0 field 'messages\[1\]\.content': String should have at least 1",
        ),
        (
            [CHATS[1], chat(("assistant", "a"), ("user", "q"))],
            r"entry 1 field 'messages': .*message 0 has role 'assistant' where 'user'",
        ),
        (
            [chat(("user", "q"), ("assistant", "a"), ("user", "again"))],
            r"entry 0 field 'messages': .*last message must be the assistant's",
        ),
        (
            [{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}],
            r"entry 0 field 'messages\[0\]\.content': Field required",
        ),
        ([{"messages": "hi"}], r"entry 0 field 'messages': Input should be a valid list"),
    ],
)
def test_bad_chat_entries_name_entry_and_field(tmp_path: Path, entries: list, pattern: str) -> None:
    (tmp_path / "d.json").write_text(json.dumps(entries))
    with pytest.raises(DataError, match=pattern):
        load_entries(tmp_path / "d.json")


def test_bad_jsonl_lines_are_named(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text(json.dumps(CHATS[1]) + "\n{oops\n")
    with pytest.raises(DataError, match=r"d\.jsonl line 2: not valid JSON"):
        load_entries(tmp_path / "d.jsonl")
    (tmp_path / "d.jsonl").write_text(
        json.dumps(CHATS[1]) + "\n" + json.dumps({"instruction": "a", "input": ""}) + "\n"
    )
    with pytest.raises(DataError, match=r"d\.jsonl: line 2 field 'output': Field required"):
        load_entries(tmp_path / "d.jsonl")


# ---- chats in the phi3 style through the data stage, fine-tuning and scoring


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("chats")
    torch.manual_seed(0)
    save_checkpoint(GPTModel(GPTConfig.from_preset("cpu-tiny", context_length=64)), root / "base")
    lines = [chat(("user", f"Say the number {i}."), ("assistant", f"{i}.")) for i in range(16)] + CHATS
    (root / "chats.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    params = {
        "tokenizer": TOKENIZER.model_dump(),
        "base_model": {"dir": str(root / "base")},
        "instruction_data": {"input": str(root / "chats.jsonl"), "prompt_style": "phi3", "shuffle": True},
        "training": TEST_TRAINING,
        "finetune_instruct": {
            "epochs": 1,
            "batch_size": 4,
            "lr": 1e-3,
            "eval_every": 0,
            "eval_batches": 1,
            "mask_prompt": True,
            "sample_entries": 1,
            "sample_max_new_tokens": 3,
            "device": "cpu",
        },
        "score_instructions": {
            "max_new_tokens": 4,
            "batch_size": 4,
            "device": "cpu",
            "judge": {"url": closed_port_url(), "connect_retries": 0, "backoff_factor": 0},
        },
        "comparison": {"confidence": 0.95, "bootstrap_samples": 200, "seed": 1, "promote_alpha": 0.05},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params_file(params)))
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    for name in ("LLMPIPE_MLFLOW_PARENT_RUN_ID", "LLMPIPE_MLFLOW_EXPERIMENT"):
        mp.delenv(name, raising=False)
    mp.chdir(root)
    data_stage.main(["--params", "params.yaml", "--out", "data", "--metrics", "data.json"])
    ft.main(
        [
            "--params",
            "params.yaml",
            "--data",
            "data",
            "--out",
            "model",
            "--metrics",
            "ft.json",
            "--history",
            "ft.csv",
            "--plot",
            "ft.png",
            "--cache",
            ".cache",
        ]
    )
    score.main(
        [
            "--params",
            "params.yaml",
            "--model",
            "model",
            "--test",
            "data/test.json",
            "--responses",
            "responses.json",
            "--metrics",
            "scores.json",
            "--headline",
            "headline.json",
        ]
    )
    yield root
    mp.undo()


def test_chat_data_is_split_with_its_prompt_style(chat_run: Path) -> None:
    assert json.loads((chat_run / "data" / "meta.json").read_text()) == {"prompt_style": "phi3"}
    splits = {name: json.loads((chat_run / "data" / f"{name}.json").read_text()) for name in data_stage.SPLITS}
    assert [len(splits[name]) for name in data_stage.SPLITS] == [16, 1, 2]
    assert all("messages" in e for part in splits.values() for e in part)


def test_chat_data_fine_tunes_and_scores_in_its_style(chat_run: Path) -> None:
    assert read_checkpoint_meta(chat_run / "model")["prompt_style"] == "phi3"
    assert json.loads((chat_run / "ft.json").read_text())["steps"] == 4
    records = json.loads((chat_run / "responses.json").read_text())
    assert len(records) == 1 and all("messages" in r and r["messages"][-1]["role"] == "user" for r in records)
    test = json.loads((chat_run / "data" / "test.json").read_text())
    assert [r["output"] for r in records] == [reference(e) for e in test]
    scores = json.loads((chat_run / "scores.json").read_text())
    assert scores["n_entries"] == 1 and scores["response_tokens"] > 0 and scores["judge_available"] is False
