"""Domain-adaptive pretraining: the corpus never holds a validation or test text; the corpus-vocabulary
loss is the softmax over those ids; the stage continues the base model and writes a usable checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

from llmcore.checkpoint import save_checkpoint
from llmcore.config import GPTConfig
from llmcore.model import GPTModel
from llmpipe.data import TokenizerParams
from llmpipe.models import load_base_model
from llmpipe.training import TrainingOutputs
from steps import adapt_pretrain as ap
from tests.params_values import params_file, params_for
from tests.trainer_params import trainer_params

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("LLMPIPE_MIRROR") or REPO.parent / "shared" / "data")
TOKENIZER = params_for(TokenizerParams, encoding_dir=str(MIRROR / "gpt2"))

TRAIN = ["see you at lunch", "WINNER! claim your FREE prize now", "ok i will call you later", "Txt STOP to end"]
VALIDATION = ["are we still on for tonight?", "URGENT! your mobile won a 2000 cash award"]
TEST = ["thanks, got it", "FREE ringtone, reply YES", "Ok lor"]
# What the split discarded: held-out texts again with other case and spacing, dropped ham, and a
# training text again.
DISCARDED = [
    "ARE WE  still on for\ttonight?",
    "ok LOR",
    "dropped ham: see you at the gym",
    "dropped ham: mum says dinner at eight",
    "see you at lunch",
]


def write_task(root: Path, train: list[str] = TRAIN) -> Path:
    data = root / "data"
    data.mkdir(parents=True)
    for split, texts in {"train": train, "validation": VALIDATION, "test": TEST}.items():
        pd.DataFrame({"Label": [i % 2 for i in range(len(texts))], "Text": texts}).to_csv(
            data / f"{split}.csv", index=False
        )
    pd.DataFrame({"Text": DISCARDED}).to_csv(data / "discarded.csv", index=False)
    (data / "labels.json").write_text(json.dumps({"labels": ["ham", "spam"]}))
    return data


def test_the_corpus_never_holds_a_validation_or_test_text(tmp_path: Path) -> None:
    data = write_task(tmp_path, train=[*TRAIN, "OK  lor"])  # a training text equal to a test text
    corpus, counts = ap.build_corpus(data, params_for(ap.CorpusParams, val_frac=0.2))
    texts = corpus["train"] + corpus["val"]
    held_out = {ap.text_key(t) for t in VALIDATION + TEST}
    assert not {ap.text_key(t) for t in texts} & held_out
    assert sorted(texts) == sorted([*TRAIN, "dropped ham: see you at the gym", "dropped ham: mum says dinner at eight"])
    assert len(texts) == len(set(texts))  # "see you at lunch" in train and discarded, once in the corpus
    assert counts["train_split_excluded_held_out"] == 1 and counts["discarded_excluded_held_out"] == 2
    assert (counts["train_messages"], counts["val_messages"]) == (5, 1)
    only_train, _ = ap.build_corpus(data, params_for(ap.CorpusParams, discarded=False, val_frac=0.2))
    assert sorted(only_train["train"] + only_train["val"]) == sorted(TRAIN)


def test_no_held_out_text_of_a_balanced_split_reaches_the_corpus(tmp_path: Path) -> None:
    """build_spam_dataset's own split of an SMS file whose messages repeat (as the real one's do)."""
    from steps.build_spam_dataset import SpamDataParams, build_spam_dataset

    ham = [f"ham message {i % 23}" for i in range(60)] + ["Ok lor"] * 6 + ["OK  LOR"] * 2
    spam = [f"WIN a prize {i % 7} now" for i in range(14)] + ["Ok lor"]
    source = tmp_path / "SMSSpamCollection"
    source.write_text(
        "".join(f"{label}\t{text}\n" for label, texts in (("ham", ham), ("spam", spam)) for text in texts),
        encoding="utf-8",
    )
    data = tmp_path / "spam"
    counts = build_spam_dataset(
        params_for(SpamDataParams), source=source, out_dir=data, metrics_out=tmp_path / "report.json"
    )
    assert counts["discarded"] == {"ham": len(ham) - len(spam), "spam": 0}
    corpus, _ = ap.build_corpus(data, params_for(ap.CorpusParams, val_frac=0.1))
    held_out = {ap.text_key(t) for split in ("validation", "test") for t in pd.read_csv(data / f"{split}.csv")["Text"]}
    kept = {ap.text_key(t) for t in corpus["train"] + corpus["val"]}
    assert held_out and not kept & held_out
    discarded = {ap.text_key(t) for t in pd.read_csv(data / "discarded.csv")["Text"]}
    assert discarded - held_out <= kept  # every discarded text that is not held out is read


def test_corpus_vocabulary_loss_is_the_softmax_over_those_ids() -> None:
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("cpu-tiny", context_length=8, vocab_size=50))
    inputs, targets = torch.tensor([[3, 7, 7, 12]]), torch.tensor([[7, 7, 12, 3]])
    loss_fn = ap.CorpusVocabLoss(np.array([12, 3, 7, 40, 3]), vocab_size=50)
    loss = loss_fn(model, (inputs, targets))
    vocab = torch.tensor([3, 7, 12, 40])
    logits = model.hidden_states(inputs) @ model.out_head.weight[vocab].T
    expected = F.cross_entropy(logits.flatten(0, 1), torch.tensor([1, 1, 2, 0]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    rows_with_grad = set(model.out_head.weight.grad.abs().sum(dim=1).nonzero().flatten().tolist())
    assert {40} <= rows_with_grad and 41 not in rows_with_grad  # 40 is in the softmax; 41 is not (nor an input)
    with pytest.raises(ValueError, match="outside the corpus vocabulary"):
        loss_fn(model, (inputs, torch.tensor([[7, 7, 12, 41]])))


@pytest.mark.skipif(not MIRROR.is_dir(), reason=f"offline mirror {MIRROR} not found")
def test_the_stage_continues_the_base_and_writes_a_base_for_the_classifier(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("LLMPIPE_MLFLOW_PARENT_RUN_ID", raising=False)
    monkeypatch.delenv("LLMPIPE_MLFLOW_EXPERIMENT", raising=False)
    monkeypatch.chdir(tmp_path)
    data = write_task(tmp_path)
    torch.manual_seed(0)
    save_checkpoint(GPTModel(GPTConfig.from_preset("cpu-tiny", context_length=4)), tmp_path / "base")
    params = trainer_params(
        ap.AdaptPretrainParams, corpus={"val_frac": 0.3}, epochs=1, batch_size=4, lr=1e-2, eval_batches=2, device="cpu"
    )
    out = TrainingOutputs(
        tmp_path / "adapted",
        tmp_path / "report.json",
        tmp_path / "hist.csv",
        {"loss": tmp_path / "loss.png"},
        tmp_path / ".cache",
    )
    metrics = ap.adapt_pretrain(
        params,
        base_dir=tmp_path / "base",
        data_dir=data,
        corpus_dir=tmp_path / "corpus",
        out=out,
        tokenizer_params=TOKENIZER,
    )
    written = [t for split in ("train", "val") for t in json.loads((tmp_path / "corpus" / f"{split}.json").read_text())]
    assert not {ap.text_key(t) for t in written} & {ap.text_key(t) for t in VALIDATION + TEST}
    assert metrics["corpus"]["train_messages"] + metrics["corpus"]["val_messages"] == len(written) == 6
    assert 0 < metrics["corpus"]["loss_vocab_size"] < 100 and np.isfinite(metrics["val_loss"])
    base, adapted = load_base_model(tmp_path / "base"), load_base_model(tmp_path / "adapted")
    assert adapted.cfg == base.cfg and not torch.equal(adapted.tok_emb.weight, base.tok_emb.weight)
    assert json.loads((tmp_path / "report.json").read_text())["corpus"] == metrics["corpus"]


def test_main_names_a_bad_discarded_file_and_writes_no_model(tmp_path: Path) -> None:
    data = write_task(tmp_path)
    (data / "discarded.csv").write_text("Message\nfine\n")
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            params_file(
                {
                    ap.STAGE: trainer_params(ap.AdaptPretrainParams).model_dump(),
                    "tokenizer": TOKENIZER.model_dump(),
                    "distributed": {"nproc_per_node": 1},
                }
            )
        )
    )
    with pytest.raises(SystemExit, match=r"adapt_pretrain: error: .*discarded.csv: missing column 'Text'"):
        ap.main(
            [
                "--params",
                str(params),
                "--base",
                str(tmp_path / "base"),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "adapted"),
                "--corpus",
                str(tmp_path / "corpus"),
            ]
        )
    assert not (tmp_path / "adapted").exists() and not (tmp_path / "corpus").exists()


@pytest.mark.skipif(not MIRROR.is_dir(), reason=f"offline mirror {MIRROR} not found")
def test_windows_longer_than_the_base_context_are_a_params_error(tmp_path: Path) -> None:
    data = write_task(tmp_path)
    save_checkpoint(GPTModel(GPTConfig.from_preset("cpu-tiny", context_length=4)), tmp_path / "base")
    out = TrainingOutputs(
        tmp_path / "adapted",
        tmp_path / "report.json",
        tmp_path / "hist.csv",
        {"loss": tmp_path / "loss.png"},
        tmp_path / ".cache",
    )
    with pytest.raises(
        ap.ParamsError, match=r"adapt_pretrain.window_length: 8 is longer than the base model's context \(4\)"
    ):
        ap.adapt_pretrain(
            trainer_params(ap.AdaptPretrainParams, window_length=8, device="cpu"),
            base_dir=tmp_path / "base",
            data_dir=data,
            corpus_dir=tmp_path / "corpus",
            out=out,
            tokenizer_params=TOKENIZER,
        )
    assert not (tmp_path / "adapted").exists()
