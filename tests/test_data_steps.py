"""The data steps on the real (mirrored) inputs, checked against the book's counts, and bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from llmcore.config import GPTConfig
from llmcore.prompts import RESPONSE_MARKER, extract_response, format_input, format_response
from llmcore.tokenizer import encode, get_tokenizer, tokenizer_digest
from llmpipe.data import DataError, TokenizerParams, read_text
from llmpipe.params import ParamsError, read_params, validate_section
from steps import build_instruction_dataset as instr
from steps import build_spam_dataset as spam
from steps import build_windows as windows
from steps import tokenize
from steps.data import datasets
from steps.data.shards import ShardsMeta, read_shards_meta
from steps.data.windows import load_token_shards, load_windows, read_windows_meta
from steps.fetch import FetchSettings, Source
from tests.params_values import params_file, params_for

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("LLMPIPE_MIRROR") or REPO.parent / "shared" / "data")
TOKENIZER = params_for(TokenizerParams, encoding_dir=str(MIRROR / "gpt2"))

pytestmark = pytest.mark.skipif(not MIRROR.is_dir(), reason=f"offline mirror {MIRROR} not found")


def write_params(path: Path, **sections: dict) -> Path:
    path.write_text(yaml.safe_dump(params_file({"tokenizer": TOKENIZER.model_dump(), **sections})))
    return path


# ---- tokenize


@pytest.fixture(scope="module")
def verdict_tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tokens")
    tokenize.tokenize_corpus(
        params_for(tokenize.CorpusParams),
        root=MIRROR / "the-verdict.txt",
        out_dir=root / "tokens",
        metrics_out=root / "tokenize.json",
        tokenizer_params=TOKENIZER,
        state_dir=root / "state",
    )
    return root / "tokens"


def verdict_ids() -> np.ndarray:
    """Today's tokenization of the book's corpus: the whole file encoded in one call."""
    return np.asarray(encode(get_tokenizer(TOKENIZER.encoding_dir), read_text(MIRROR / "the-verdict.txt")))


def test_tokenize_the_verdict(verdict_tokens: Path) -> None:
    tokens, meta = load_token_shards(verdict_tokens)
    assert len(tokens) == 5145 and tokens[:4].tolist() == [40, 367, 2885, 1464]  # "I HAD always"
    assert np.array_equal(tokens[0 : len(tokens)], verdict_ids())  # no <|endoftext|> added to one document
    assert (meta.dtype, meta.vocab_size, meta.tokens, len(meta.shards)) == ("uint16", 50257, 5145, 1)
    assert meta.tokenizer.sha256 == tokenizer_digest(get_tokenizer(TOKENIZER.encoding_dir))
    assert json.loads((verdict_tokens.parent / "tokenize.json").read_text()) == {
        "files": 1,
        "documents": 1,
        "empty_documents": 0,
        "bytes": 20479,
        "characters": 20479,
        "tokens": 5145,
        "shards": 1,
        "skipped_entries": 0,
        "skipped": [],
    }
    assert not (verdict_tokens.parent / "state").exists() or not any((verdict_tokens.parent / "state").iterdir())


def test_tokenize_rejects_missing_and_empty_corpora(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="corpus .*missing.txt does not exist"):
        tokenize.tokenize_corpus(
            params_for(tokenize.CorpusParams),
            root=tmp_path / "missing.txt",
            out_dir=tmp_path / "t",
            metrics_out=tmp_path / "m.json",
            tokenizer_params=TOKENIZER,
            state_dir=tmp_path / "state",
        )
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="has no text"):
        tokenize.tokenize_corpus(
            params_for(tokenize.CorpusParams),
            root=tmp_path / "empty.txt",
            out_dir=tmp_path / "t",
            metrics_out=tmp_path / "m.json",
            tokenizer_params=TOKENIZER,
            state_dir=tmp_path / "state",
        )
    assert not (tmp_path / "t").exists() and not (tmp_path / "m.json").exists()


def test_tokenize_cli_reports_a_bad_tokenizer_dir(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(params_file({"tokenizer": {"encoding_dir": str(tmp_path)}, "corpus": {}})))
    with pytest.raises(
        SystemExit,
        match=r"^tokenize: error: .*encoder\.json not found: the GPT-2 encoding needs encoder\.json and vocab\.bpe",
    ):
        tokenize.main(
            [
                "--params",
                str(params),
                "--corpus",
                str(MIRROR / "the-verdict.txt"),
                "--tokens",
                str(tmp_path / "t"),
                "--metrics",
                str(tmp_path / "m.json"),
                "--state-dir",
                str(tmp_path / "state"),
            ]
        )


# ---- build_windows


def todays_windows(tokens: np.ndarray, context_length: int, stride: int) -> np.ndarray:
    """The rows the previous build_windows materialised (its make_windows), to compare the views with."""
    return np.ascontiguousarray(np.lib.stride_tricks.sliding_window_view(tokens, context_length + 1)[::stride])


def assert_windows_equal(dataset, rows: np.ndarray) -> None:
    assert len(dataset) == len(rows)
    for row, (inputs, targets) in zip(rows, dataset):
        assert np.array_equal(row[:-1], inputs.numpy()) and np.array_equal(row[1:], targets.numpy())


def test_windows_match_the_book_and_todays_output(verdict_tokens: Path, tmp_path: Path) -> None:
    meta = windows.build_windows(
        params_for(windows.WindowParams),
        tokens_dir=verdict_tokens,
        out_dir=tmp_path / "windows",
        metrics_out=tmp_path / "m.json",
    )
    # The book: 9 train batches of 2 (drop_last) and 1 validation batch of 2.
    assert {k: meta[k] for k in ("n_train_windows", "n_val_windows", "train_tokens", "val_tokens")} == {
        "n_train_windows": 18,
        "n_val_windows": 2,
        "train_tokens": 4630,
        "val_tokens": 515,
    }
    assert json.loads((tmp_path / "windows" / "meta.json").read_text()) == meta
    assert json.loads((tmp_path / "m.json").read_text()) == meta
    assert sorted(p.name for p in (tmp_path / "windows").iterdir()) == ["meta.json"]  # views: no window copies
    views = load_windows(tmp_path / "windows", GPTConfig.from_preset("cpu-tiny", context_length=256))
    ids = verdict_ids()
    for split, part in (("train", ids[:4630]), ("val", ids[4630:])):
        assert_windows_equal(views[split], todays_windows(part, 256, 256))


def test_the_windows_meta_is_typed_and_a_bad_one_is_named(verdict_tokens: Path, tmp_path: Path) -> None:
    """data/windows/meta.json is read back as steps.data.windows.WindowsMeta, not by string keys."""
    windows.build_windows(
        params_for(windows.WindowParams),
        tokens_dir=verdict_tokens,
        out_dir=tmp_path / "w",
        metrics_out=tmp_path / "m.json",
    )
    meta = read_windows_meta(tmp_path / "w")
    assert (meta.context_length, meta.n_train_windows, meta.tokens) == (256, 18, str(verdict_tokens))
    path = tmp_path / "w" / "meta.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "n_val_windows": "2"}))
    with pytest.raises(
        DataError, match=r"meta.json: n_val_windows: Input should be a valid integer \(rerun the build_windows"
    ):
        read_windows_meta(tmp_path / "w")


def test_the_token_shards_meta_is_typed_and_a_bad_one_is_named(verdict_tokens: Path, tmp_path: Path) -> None:
    """data/tokens/meta.json is steps.data.shards.ShardsMeta: tokenize writes it, build_windows reads it."""
    shutil.copytree(verdict_tokens, tmp_path / "t")
    path = tmp_path / "t" / "meta.json"
    meta = json.loads(path.read_text())
    assert sorted(meta) == sorted(ShardsMeta.model_fields)  # the file holds the model's fields, no others
    meta["shards"][0]["tokens"] = -1
    path.write_text(json.dumps(meta))
    with pytest.raises(
        DataError, match=r"meta.json: shards.0.tokens: Input should be greater than or equal to 0 \(rerun"
    ):
        windows.build_windows(
            params_for(windows.WindowParams),
            tokens_dir=tmp_path / "t",
            out_dir=tmp_path / "w",
            metrics_out=tmp_path / "m.json",
        )
    path.write_text(json.dumps({**meta, "format": "something-else/2"}))
    with pytest.raises(DataError, match=r"meta.json: format: Input should be 'llmpipe-token-shards/1'"):
        read_shards_meta(tmp_path / "t")
    assert not (tmp_path / "w").exists()


def test_overlapping_windows_equal_todays(verdict_tokens: Path, tmp_path: Path) -> None:
    params = params_for(windows.WindowParams, context_length=4, stride=1, train_ratio=0.5)
    meta = windows.build_windows(
        params, tokens_dir=verdict_tokens, out_dir=tmp_path / "w", metrics_out=tmp_path / "m.json"
    )
    assert meta["n_train_windows"] == 2568
    views = load_windows(tmp_path / "w", GPTConfig.from_preset("cpu-tiny", context_length=4))
    assert_windows_equal(views["train"], todays_windows(verdict_ids()[:2572], 4, 1))


def test_a_split_shorter_than_a_window_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "short.txt").write_text(" ".join(["word"] * 300))  # 300 tokens
    tokenize.tokenize_corpus(
        params_for(tokenize.CorpusParams),
        root=tmp_path / "short.txt",
        out_dir=tmp_path / "t",
        metrics_out=tmp_path / "tm.json",
        tokenizer_params=TOKENIZER,
        state_dir=tmp_path / "state",
    )
    with pytest.raises(DataError, match="val split has 30 tokens; one window of context_length=256 needs at least 257"):
        windows.build_windows(
            params_for(windows.WindowParams),
            tokens_dir=tmp_path / "t",
            out_dir=tmp_path / "w",
            metrics_out=tmp_path / "m.json",
        )
    assert not (tmp_path / "w").exists()


def test_windows_reject_a_missing_token_dir(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"^build_windows: error: cannot read token shards .*meta.json"):
        windows.main(
            [
                "--params",
                str(write_params(tmp_path / "p.yaml", windows={})),
                "--tokens",
                str(tmp_path / "t"),
                "--out",
                str(tmp_path / "w"),
                "--metrics",
                str(tmp_path / "m.json"),
            ]
        )


@pytest.mark.parametrize(
    ("section", "pattern"),
    [
        ({"train_ratio": 1.5}, r"windows\.train_ratio"),
        ({"stride": 0}, r"windows\.stride"),
        ({"context": 256}, r"windows\.context"),
        ({"sampling": "shuffled"}, r"windows\.sampling"),
    ],
)
def test_window_params_are_validated(section: dict, pattern: str) -> None:
    with pytest.raises(ParamsError, match=pattern):
        validate_section({"windows": section}, "windows", windows.WindowParams)


# ---- build_spam_dataset


@pytest.fixture(scope="module")
def spam_tsv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("spam") / "SMSSpamCollection"
    with zipfile.ZipFile(MIRROR / "sms+spam+collection.zip") as zf:
        path.write_bytes(zf.read("SMSSpamCollection"))
    return path


def test_spam_dataset_matches_the_book(spam_tsv: Path, tmp_path: Path) -> None:
    metrics = spam.build_spam_dataset(
        params_for(spam.SpamDataParams), source=spam_tsv, out_dir=tmp_path / "spam", metrics_out=tmp_path / "m.json"
    )
    assert metrics["source"] == {"ham": 4827, "spam": 747, "malformed_skipped": 0}
    sizes = {name: sum(metrics[name].values()) for name in spam.SPLITS}
    assert sizes == {"train": 1045, "validation": 149, "test": 300}
    assert (
        sum(metrics[name]["ham"] for name in spam.SPLITS) == sum(metrics[name]["spam"] for name in spam.SPLITS) == 747
    )
    assert json.loads((tmp_path / "m.json").read_text()) == metrics
    frames = {name: pd.read_csv(tmp_path / "spam" / f"{name}.csv") for name in spam.SPLITS}
    for name, frame in frames.items():
        assert list(frame.columns) == ["Label", "Text"] and frame["Label"].dtype == np.int64
        assert frame["Label"].value_counts().to_dict() == {0: metrics[name]["ham"], 1: metrics[name]["spam"]}
    assert pd.concat(frames.values())["Text"].notna().all()
    again = spam.build_spam_dataset(
        params_for(spam.SpamDataParams), source=spam_tsv, out_dir=tmp_path / "again", metrics_out=tmp_path / "m2.json"
    )
    assert again == metrics
    assert (tmp_path / "again" / "train.csv").read_bytes() == (tmp_path / "spam" / "train.csv").read_bytes()
    spam.build_spam_dataset(
        params_for(spam.SpamDataParams, seed=1),
        source=spam_tsv,
        out_dir=tmp_path / "other",
        metrics_out=tmp_path / "m3.json",
    )
    assert (tmp_path / "other" / "train.csv").read_bytes() != (tmp_path / "spam" / "train.csv").read_bytes()


def small_tsv(path: Path, extra_lines: list[str]) -> Path:
    lines = [f"ham\tham message {i}" for i in range(20)] + [f'spam\tspam message {i} "WIN"' for i in range(10)]
    path.write_text("\n".join(lines[:2] + extra_lines + lines[2:]) + "\n")
    return path


@pytest.mark.parametrize(
    ("bad_line", "reason"),
    [
        ("no tab here", "no tab between label and text"),
        ("", "no tab between label and text"),
        ("Spam\tcase matters", "unknown label 'Spam'"),
        ("ham\t", "empty text"),
    ],
)
def test_malformed_lines_name_the_line(tmp_path: Path, bad_line: str, reason: str) -> None:
    tsv = small_tsv(tmp_path / "sms.tsv", [bad_line])
    with pytest.raises(DataError, match=f"sms.tsv line 3: {reason} \\(1 malformed row"):
        spam.build_spam_dataset(
            params_for(spam.SpamDataParams), source=tsv, out_dir=tmp_path / "out", metrics_out=tmp_path / "m.json"
        )
    assert not (tmp_path / "out").exists()


def test_malformed_lines_can_be_skipped_and_counted(tmp_path: Path) -> None:
    tsv = small_tsv(tmp_path / "sms.tsv", ["no tab", "eggs\tunknown label", "spam\ta\ttab inside"])
    params = params_for(spam.SpamDataParams, on_malformed="skip")
    metrics = spam.build_spam_dataset(params, source=tsv, out_dir=tmp_path / "out", metrics_out=tmp_path / "m.json")
    assert metrics["source"] == {"ham": 20, "spam": 11, "malformed_skipped": 2}
    texts = pd.concat(pd.read_csv(tmp_path / "out" / f"{n}.csv") for n in spam.SPLITS)["Text"]
    assert "a\ttab inside" in set(texts) and 'spam message 0 "WIN"' in set(texts)


def test_spam_cli_and_params(tmp_path: Path) -> None:
    bad = write_params(tmp_path / "p.yaml", spam_data={"train_frac": 0.8, "validation_frac": 0.3})
    with pytest.raises(SystemExit, match="(?s)^build_spam_dataset: error: .*spam_data: .*must be < 1"):
        spam.main(["--params", str(bad)])
    bad = write_params(tmp_path / "p.yaml", spam_data={"on_malformed": "ignore"})
    with pytest.raises(SystemExit, match=r"spam_data\.on_malformed"):
        spam.main(["--params", str(bad)])
    good = write_params(tmp_path / "p.yaml", spam_data={})
    with pytest.raises(SystemExit, match="^build_spam_dataset: error: cannot read .*nope"):
        spam.main(["--params", str(good), "--input", str(tmp_path / "nope")])


# ---- build_instruction_dataset and prompts


@pytest.fixture(scope="module")
def instruction_entries() -> list[dict]:
    return json.loads((MIRROR / "instruction-data.json").read_text())


def test_instruction_dataset_matches_the_book(tmp_path: Path, instruction_entries: list[dict]) -> None:
    params = params_for(instr.InstructionDataParams)
    metrics = instr.build_instruction_dataset(
        params,
        source=MIRROR / "instruction-data.json",
        out_dir=tmp_path / "out",
        metrics_out=tmp_path / "m.json",
        tokenizer=TOKENIZER,
    )
    assert {name: metrics[name]["entries"] for name in instr.SPLITS} == {"train": 935, "test": 110, "validation": 55}
    splits = {name: json.loads((tmp_path / "out" / f"{name}.json").read_text()) for name in instr.SPLITS}
    assert splits["train"] + splits["test"] + splits["validation"] == instruction_entries  # in file order
    for stats in metrics.values():
        assert 0 < stats["tokens_min"] <= stats["tokens_mean"] <= stats["tokens_p95"] <= stats["tokens_max"] < 1024
    assert json.loads((tmp_path / "m.json").read_text()) == metrics


def test_instruction_shuffle_is_seeded(instruction_entries: list[dict]) -> None:
    shuffled = instr.split_entries(instruction_entries, params_for(instr.InstructionDataParams, shuffle=True, seed=1))
    again = instr.split_entries(instruction_entries, params_for(instr.InstructionDataParams, shuffle=True, seed=1))
    assert shuffled == again and shuffled["train"] != instruction_entries[:935]
    assert sorted(map(json.dumps, sum(shuffled.values(), []))) == sorted(map(json.dumps, instruction_entries))


@pytest.mark.parametrize(
    ("entries", "pattern"),
    [
        (
            [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "a", "input": 3, "output": "b"}],
            "entry 1 field 'input': Input should be a valid string",
        ),
        ([{"instruction": "a", "input": "", "output": ""}], "entry 0 field 'output': String should have at least 1"),
        ([{"input": "", "output": "b"}], "entry 0 field 'instruction': Field required"),
        (["just text"], "entry 0: Input should be a valid dictionary"),
        ({"instruction": "a"}, "top level: Input should be a valid list"),
    ],
)
def test_bad_instruction_entries_name_index_and_field(tmp_path: Path, entries: object, pattern: str) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(DataError, match=pattern):
        datasets.load_entries(path)


def test_instruction_cli_errors(tmp_path: Path) -> None:
    (tmp_path / "data.json").write_text("[{")
    params = write_params(tmp_path / "p.yaml", instruction_data={})
    with pytest.raises(SystemExit, match="^build_instruction_dataset: error: .*is not valid JSON"):
        instr.main(["--params", str(params), "--input", str(tmp_path / "data.json"), "--out", str(tmp_path / "o")])
    params = write_params(tmp_path / "p.yaml", instruction_data={"train_frac": 0.95, "test_frac": 0.1})
    with pytest.raises(SystemExit, match="(?s)instruction_data: .*must be < 1"):
        instr.main(["--params", str(params)])
    with pytest.raises(DataError, match="3 entries leave the test split"):
        instr.split_entries(
            [{"instruction": "a", "input": "", "output": "b"}] * 3, params_for(instr.InstructionDataParams)
        )


def test_prompt_format_is_the_books() -> None:
    entry = {"instruction": "Rewrite the sentence.", "input": "The cake was eaten.", "output": "Someone ate it."}
    assert format_input(entry) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nRewrite the sentence.\n\n### Input:\nThe cake was eaten."
    )
    assert format_input({**entry, "input": ""}).endswith("### Instruction:\nRewrite the sentence.")
    assert format_response(entry) == "\n\n### Response:\nSomeone ate it."
    prompt = format_input(entry)
    assert extract_response(prompt + format_response(entry) + "\n", prompt) == "Someone ate it."
    assert extract_response(f"{prompt}\n{RESPONSE_MARKER} Done.", prompt) == "Done."
    assert extract_response(prompt + " no marker ", prompt) == "no marker"


# ---- the real params.yaml and dvc.yaml


def test_params_yaml_validates_and_dvc_yaml_declares_existing_params() -> None:
    data = read_params(REPO / "params.yaml")
    validate_section(data, "fetch", FetchSettings)
    for name in data["sources"]:
        validate_section(data, f"sources.{name}", Source)
    validate_section(data, "tokenizer", TokenizerParams)
    validate_section(data, "corpus", tokenize.CorpusParams)
    validate_section(data, "windows", windows.WindowParams)
    validate_section(data, "spam_data", spam.SpamDataParams)
    validate_section(data, "instruction_data", instr.InstructionDataParams)
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage in stages.values():
        for key in stage.get("params", []):
            if isinstance(key, dict):  # a whole params file (check_params reads every section)
                continue
            node = data
            for part in key.split("."):
                assert part in node, f"dvc.yaml lists param {key} that params.yaml lacks"
                node = node[part]
