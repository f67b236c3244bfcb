"""The tokenize stage on your own corpus: files, directories and globs of text, JSONL and parquet
(optionally gzipped), document boundaries, shards, threads, resuming, and bad input."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from llmcore.tokenizer import ENDOFTEXT_ID, encode, get_tokenizer
from llmpipe.data import DataError, TokenizerParams
from steps import tokenize
from steps.data import corpus
from steps.data.shards import ShardWriter
from steps.data.windows import load_token_shards
from tests.params_values import params_file, params_for

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("LLMPIPE_MIRROR") or REPO.parent / "shared" / "data")
TOKENIZER = params_for(TokenizerParams, encoding_dir=str(MIRROR / "gpt2"))

pytestmark = pytest.mark.skipif(not MIRROR.is_dir(), reason=f"offline mirror {MIRROR} not found")

DOCS = ["First document.\nIt has two lines.", "Second one:  spaces,\ttabs\n\nand 123 numbers!", "Third's the last."]


def ids(text: str) -> list[int]:
    return encode(get_tokenizer(TOKENIZER.encoding_dir), text)


def run(root: Path, tmp: Path, **params) -> tuple[list[int], dict, dict]:
    """Tokenize ``root``; the tokens, the shards' meta.json and the metrics."""
    metrics = tokenize.tokenize_corpus(
        params_for(tokenize.CorpusParams, **params),
        root=root,
        out_dir=tmp / "tokens",
        metrics_out=tmp / "metrics.json",
        tokenizer_params=TOKENIZER,
        state_dir=tmp / "state",
    )
    tokens, meta = load_token_shards(tmp / "tokens")
    return tokens[0 : len(tokens)].tolist(), meta, metrics


def joined(docs: list[str]) -> list[int]:
    """The documents' ids with <|endoftext|> between them (the ``between`` default)."""
    out: list[int] = []
    for i, doc in enumerate(docs):
        out += ([ENDOFTEXT_ID] if i else []) + ids(doc)
    return out


def test_every_format_gives_the_same_documents(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    (root / "text").mkdir(parents=True)
    (root / "text" / "a.txt").write_text(DOCS[0])
    (root / "text" / "b.md.gz").write_bytes(gzip.compress(DOCS[1].encode()))
    (root / "c.jsonl").write_text(json.dumps({"text": DOCS[2], "id": 1}) + "\n\n")  # a blank line is skipped
    pd.DataFrame({"text": [DOCS[0], None, DOCS[1]], "n": [1, 2, 3]}).to_parquet(root / "d.parquet")
    (root / "e.jsonl.gz").write_bytes(gzip.compress((json.dumps({"text": DOCS[2]}) + "\n").encode()))
    pd.DataFrame({"text": [DOCS[0]]}).to_parquet(tmp_path / "f.parquet")
    (root / "f.parquet.gz").write_bytes(gzip.compress((tmp_path / "f.parquet").read_bytes()))
    (root / ".hidden.txt").write_text("never read")
    tokens, meta, metrics = run(root, tmp_path)
    # Sorted by path: c.jsonl, d.parquet (3 rows, one null), e.jsonl.gz, f.parquet.gz, text/a.txt, text/b.md.gz
    order = [DOCS[2], DOCS[0], DOCS[1], DOCS[2], DOCS[0], DOCS[0], DOCS[1]]
    assert tokens == joined(order)
    assert metrics == {
        "files": 6,
        "documents": 7,
        "empty_documents": 1,
        "characters": sum(map(len, order)),
        "bytes": sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name[0] != "."),
        "tokens": len(tokens),
        "shards": 1,
        "skipped_entries": 0,
        "skipped": [],
    }
    assert meta.max_token_id == max(tokens) and meta.dtype == "uint16"


def test_globs_several_and_after_each(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    (root / "notes").mkdir(parents=True)
    for name, doc in zip(("notes/x.md", "notes/y.txt", "z.txt"), DOCS):
        (root / name).write_text(doc)
    tokens, _, metrics = run(root, tmp_path, include=["z.txt", "notes/*.md"], endoftext="after_each")
    assert tokens == ids(DOCS[2]) + [ENDOFTEXT_ID] + ids(DOCS[0]) + [ENDOFTEXT_ID]  # in the globs' order
    assert metrics["files"] == 2
    tokens, _, _ = run(root, tmp_path, include=["**/*.txt", "z.txt"])  # a file matched twice is read once
    assert tokens == joined([DOCS[1], DOCS[2]])


def test_pieces_threads_and_shards_never_change_the_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (MIRROR / "tinyshakespeare.txt").read_text(encoding="utf-8")[:200_000]
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(4):
        (root / f"part{i}.txt").write_text(text[i * 50_000 : (i + 1) * 50_000])
    reference, meta, _ = run(root, tmp_path)
    assert reference == joined([text[i * 50_000 : (i + 1) * 50_000] for i in range(4)])
    monkeypatch.setattr(corpus, "PIECE_CHARS", 997)  # hundreds of cuts inside each file
    for workers, shard_tokens in ((1, 10**9), (3, 1)):
        tokens, meta, metrics = run(root, tmp_path, workers=workers, shard_tokens=shard_tokens)
        assert tokens == reference
    assert metrics["shards"] == len(meta.shards) == 4  # a shard closes at a file boundary only
    assert [s.tokens for s in meta.shards] == [
        len(ids(text[i * 50_000 : (i + 1) * 50_000])) + (i > 0) for i in range(4)
    ]


def test_a_killed_run_resumes_after_its_last_committed_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    for i, doc in enumerate(DOCS * 2):
        (root / f"{i}.txt").write_text(doc)
    reference, _, _ = run(root, tmp_path / "reference", shard_tokens=1)
    commit, calls = ShardWriter.commit, []

    def killed_after_two(self, next_file, counts):
        calls.append(next_file)
        if len(calls) == 3:
            (self.work_dir / "tokens_00002.bin.partial").write_bytes(b"\x01\x02half")  # a shard being written
            raise KeyboardInterrupt
        commit(self, next_file, counts)

    monkeypatch.setattr(ShardWriter, "commit", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        run(root, tmp_path, shard_tokens=1)
    assert not (tmp_path / "tokens").exists() and not (tmp_path / "metrics.json").exists()
    monkeypatch.setattr(ShardWriter, "commit", commit)
    read = []
    documents = tokenize.documents
    monkeypatch.setattr(tokenize, "documents", lambda path, *a: (read.append(path.name), documents(path, *a))[1])
    tokens, meta, metrics = run(root, tmp_path, shard_tokens=1)
    assert read == ["2.txt", "3.txt", "4.txt", "5.txt"]  # files 0 and 1 were committed
    assert tokens == reference and metrics["files"] == 6 and metrics["documents"] == 6
    assert not any((tmp_path / "state").iterdir())  # the work directory is gone


def test_a_changed_corpus_starts_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.txt").write_text(DOCS[0])
    (root / "b.txt").write_text(DOCS[1])
    monkeypatch.setattr(ShardWriter, "finish", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run(root, tmp_path, shard_tokens=1)
    monkeypatch.undo()
    (root / "a.txt").write_text(DOCS[2])
    tokens, _, _ = run(root, tmp_path, shard_tokens=1)
    assert tokens == joined([DOCS[2], DOCS[1]])


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize(
    ("files", "params", "pattern"),
    [
        ({}, {}, r"no readable files in directory .*corpus"),
        ({"a.txt": "x"}, {"include": ["*.jsonl"]}, r"glob '\*\.jsonl' matches no readable file under .*corpus"),
        ({"a.jsonl": '{"text": "ok"}\n{"text": "unfinished\n'}, {}, r"a\.jsonl line 2: not valid JSON"),
        (
            {"a.jsonl": '{"text": "ok"}\n\n{"body": "no text"}\n'},
            {},
            r"a\.jsonl line 3: no field 'text' \(fields: \['body'\]\)",
        ),
        ({"a.jsonl": '{"text": 5}\n'}, {}, r"a\.jsonl line 1: field 'text' is int, expected a string"),
        ({"a.jsonl": '["a list"]\n'}, {}, r"a\.jsonl line 1: expected a JSON object, got list"),
        ({"a.txt": b"ok \xff\xfe"}, {}, r"a\.txt is not valid UTF-8"),
        ({"a.txt.gz": b"not gzip"}, {}, r"cannot read .*a\.txt\.gz"),
        ({"a.csv": "x,y"}, {}, r"a\.csv: unsupported file type '\.csv'"),
        ({"README": "x"}, {}, r"README: unsupported file type '\(no suffix\)'"),
    ],
)
def test_bad_input_is_named_and_nothing_is_written(tmp_path: Path, files: dict, params: dict, pattern: str) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    for name, content in files.items():
        write(root / name, content)
    with pytest.raises(DataError, match=pattern):
        run(root, tmp_path, **params)
    assert not (tmp_path / "tokens").exists() and not (tmp_path / "metrics.json").exists()


def test_a_parquet_without_the_column_or_with_numbers_is_named(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    root.mkdir()
    pd.DataFrame({"body": ["a"]}).to_parquet(root / "a.parquet")
    with pytest.raises(DataError, match=r"a\.parquet: no column 'text' \(columns: \['body'\]\)"):
        run(root, tmp_path)
    with pytest.raises(DataError, match=r"a\.parquet: column 'body' holds int64, expected strings"):
        pd.DataFrame({"body": [1]}).to_parquet(root / "a.parquet")
        run(root, tmp_path, text_field="body")


def test_every_skipped_entry_is_warned_about_and_counted(tmp_path: Path) -> None:
    """A symlink loop, a broken link, a binary .txt and an unreadable file: each skipped with a
    warning naming it and why; the report counts and lists them; the rest is tokenized."""
    root = tmp_path / "corpus"
    write(root / "good.txt", DOCS[0])
    write(root / "binary.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (root / "loop.txt").symlink_to("loop.txt")
    (root / "gone.txt").symlink_to("nowhere.txt")
    unreadable = write(root / "secret.txt", "private")
    unreadable.chmod(0)
    readable_anyway = os.access(unreadable, os.R_OK)  # root reads every file
    with pytest.warns(RuntimeWarning) as caught:
        tokens, _, metrics = run(root, tmp_path)
    messages = sorted(str(w.message) for w in caught)
    expected = [
        f"corpus: skipped {root / 'binary.txt'}: binary (NUL bytes in its first 8 KB), not text",
        f"corpus: skipped {root / 'gone.txt'}: broken symlink (-> nowhere.txt)",
        f"corpus: skipped {root / 'loop.txt'}: symlink loop",
    ]
    if not readable_anyway:
        expected.append(f"corpus: skipped {root / 'secret.txt'}: unreadable: Permission denied")
    assert messages == sorted(expected)
    assert metrics["skipped_entries"] == len(expected) and len(metrics["skipped"]) == len(expected)
    assert {entry["reason"] for entry in metrics["skipped"]} >= {"symlink loop", "broken symlink (-> nowhere.txt)"}
    assert metrics["files"] == (2 if readable_anyway else 1)
    assert tokens[: len(ids(DOCS[0]))] == ids(DOCS[0])


def test_the_stage_prints_each_skip_as_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = tmp_path / "corpus"
    write(root / "good.txt", DOCS[0])
    (root / "loop.txt").symlink_to("loop.txt")
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(params_file({"tokenizer": TOKENIZER.model_dump(), "corpus": {"root": str(root)}})))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "steps.tokenize",
            "--params",
            str(params),
            "--tokens",
            str(tmp_path / "t"),
            "--metrics",
            str(tmp_path / "m.json"),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "LLMPIPE_DEBUG": ""},
    )
    assert done.returncode == 0, done.stderr
    assert f"tokenize: warning: corpus: skipped {root / 'loop.txt'}: symlink loop\n" in done.stderr
    assert "1 corpus entr(y/ies) skipped" in done.stdout
    assert json.loads((tmp_path / "m.json").read_text())["skipped_entries"] == 1


def test_corpus_params_and_cli(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="relative glob"):
        params_for(tokenize.CorpusParams, include=["../elsewhere/*.txt"])
    with pytest.raises(DataError, match="needs a directory"):
        corpus.corpus_files(MIRROR / "the-verdict.txt", ["*.txt"])
    params = tmp_path / "params.yaml"
    params.write_text(
        json.dumps(params_file({"tokenizer": TOKENIZER.model_dump(), "corpus": {"root": str(tmp_path / "nope")}}))
    )
    with pytest.raises(SystemExit, match=r"^tokenize: error: corpus .*nope does not exist"):
        tokenize.main(
            [
                "--params",
                str(params),
                "--tokens",
                str(tmp_path / "t"),
                "--metrics",
                str(tmp_path / "m.json"),
                "--state-dir",
                str(tmp_path / "state"),
            ]
        )


def test_safe_cuts_split_where_bpe_splits_anyway() -> None:
    text = "A  b\n\n c\t\u00a0d 'sé 12!?\u3000e\nf"
    whole = ids(text)
    cuts = [i for i in range(1, len(text)) if text[i] in " \n" and not text[i - 1].isspace()]
    assert cuts  # every position safe_cut may choose
    for i in cuts:
        assert ids(text[:i]) + ids(text[i:]) == whole
        assert corpus.safe_cut(text[: i + 1]) == i
    assert corpus.safe_cut("nospace") == 0 and corpus.safe_cut("   ") == 0


@pytest.mark.parametrize("block", [16, 17, 64, 1 << 20])
def test_long_jsonl_records_stream_in_blocks_to_the_same_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    """Records longer than a block are read a block at a time; escapes (\\n, \\", \\\\, \\u, surrogate
    pairs) cut anywhere decode to the text json.loads gives, other fields before and after skipped."""
    import random

    from steps.data import readers

    monkeypatch.setattr(readers, "BLOCK_CHARS", block)
    rng = random.Random(block)
    alphabet = ["a", " ", "\n", '"', "\\", "é", "😀", "\t", "\u2028", "x" * 5, "\\u00e9"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 200))) for _ in range(12)]
    lines = []
    for i, text in enumerate(texts):
        record = {"id": i, "meta": {"tags": ["a", "b"], "n": None}, "text": text, "after": [1, 2.5, "z"]}
        if i % 3 == 0:
            record = {"text": text, "id": i}
        lines.append(json.dumps(record, ensure_ascii=i % 2 == 0))
    path = write(
        tmp_path / "c.jsonl", "\n".join(lines[:6]) + "\n\n" + "\n".join(lines[6:])
    )  # a blank line, no final \n
    got = ["".join(blocks) for blocks in readers.jsonl_texts(path, False, "text")]
    assert got == texts


@pytest.mark.parametrize(
    ("line", "pattern"),
    [
        ('{"id": 1, "text": "' + "a" * 40, r"c\.jsonl line 1: the line ends inside a string"),
        ('{"id": 1, "body": "abc", "more": [1, 2, 3], "x": "yy"}', r"c\.jsonl line 1: no field 'text'"),
        (
            '{"id": 1, "body": "' + "a" * 40 + '", "text": "a"}',
            r"c\.jsonl line 1: not valid JSON, or a value other than the text over 32 characters",
        ),
        ('{"text": "a\tb' + "a" * 40 + '"}', r"c\.jsonl line 1: a control character is inside a string"),
        (
            '{"text": 12345, "id": "' + "a" * 20 + '", "x": 1}',
            r"c\.jsonl line 1: field 'text' is int, expected a string",
        ),
        ('["text", "' + "a" * 40 + '"]', r"c\.jsonl line 1: expected a JSON object"),
        ('{"text": "' + "a" * 40 + '"} trailing', r"c\.jsonl line 1: not valid JSON \(text after the object\)"),
    ],
)
def test_a_bad_long_record_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str, pattern: str) -> None:
    from steps.data import readers

    monkeypatch.setattr(readers, "BLOCK_CHARS", 8)
    path = write(tmp_path / "c.jsonl", line + "\n")
    with pytest.raises(DataError, match=pattern):
        ["".join(blocks) for blocks in readers.jsonl_texts(path, False, "text")]
