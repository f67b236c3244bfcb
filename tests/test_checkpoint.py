"""llmcore checkpoints: safetensors + config.json, written atomically, loaded strictly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmcore import GPTConfig, GPTModel
from llmcore import checkpoint as ckpt
from llmcore.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_meta, save_checkpoint

CFG = GPTConfig(vocab_size=60, context_length=12, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.1)


def make_model(seed: int = 0, **overrides) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(GPTConfig(**{**CFG.to_dict(), **overrides}))


def logits(model: GPTModel) -> torch.Tensor:
    idx = torch.arange(10).view(1, 10) * 5
    with torch.no_grad():
        return model.eval()(idx)


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_gives_identical_outputs(tmp_path: Path, tied: bool) -> None:
    model = make_model(tie_embeddings=tied)
    save_checkpoint(model, tmp_path / "ckpt", extra={"step": 7})
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.cfg == model.cfg
    assert torch.equal(logits(loaded), logits(model))
    assert (loaded.out_head.weight is loaded.tok_emb.weight) is tied
    assert read_checkpoint_meta(tmp_path / "ckpt")["step"] == 7


def test_only_safetensors_and_json_are_written(tmp_path: Path) -> None:
    save_checkpoint(make_model(), tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    tensors = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert "tok_emb.weight" in tensors and "out_head.weight" not in tensors  # tied head stored once
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["format"] == "llmcore-gpt" and meta["config"] == CFG.to_dict()


def test_overwrite_replaces_whole_directory_and_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    save_checkpoint(make_model(seed=0), target)
    (target / "stale.txt").write_text("from an older run")
    second = make_model(seed=1)
    save_checkpoint(second, target)
    assert torch.equal(logits(load_checkpoint(target)), logits(second))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp or .old directories
    assert not (target / "stale.txt").exists()


def test_failure_while_writing_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "ckpt"
    first = make_model(seed=0)
    save_checkpoint(first, target)

    def crash(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(make_model(seed=1), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert torch.equal(logits(load_checkpoint(target)), logits(first))


def edit_weights(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop("trf_blocks.1.ff.proj.bias"), r"missing tensor.*trf_blocks\.1\.ff\.proj\.bias"),
        (lambda t: t.update({"extra.weight": torch.zeros(2)}), r"unexpected tensor.*extra\.weight"),
        (
            lambda t: t.update({"trf_blocks.0.att.qkv.weight": torch.zeros(48, 8)}),
            r"trf_blocks\.0\.att\.qkv\.weight has shape \(48, 8\), the model expects \(48, 16\)",
        ),
    ],
)
def test_bad_tensors_are_named(tmp_path: Path, edit, message: str) -> None:
    save_checkpoint(make_model(), tmp_path / "ckpt")
    edit_weights(tmp_path / "ckpt", edit)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "ckpt")


def test_config_that_does_not_fit_the_tensors(tmp_path: Path) -> None:
    save_checkpoint(make_model(), tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "config.json"
    meta = json.loads(path.read_text())
    meta["config"]["emb_dim"] = 32
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"tok_emb\.weight has shape \(60, 16\), the model expects \(60, 32\)"):
        load_checkpoint(tmp_path / "ckpt")
    meta["config"]["emb_dim"] = 16
    meta["config"]["tie_embeddings"] = False
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"missing tensor.*out_head\.weight"):
        load_checkpoint(tmp_path / "ckpt")


def test_invalid_config_and_missing_files_are_named(tmp_path: Path) -> None:
    save_checkpoint(make_model(), tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "config.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "config": {**meta["config"], "n_heads": 3}}))
    with pytest.raises(CheckpointError, match="invalid config.*emb_dim"):
        load_checkpoint(tmp_path / "ckpt")
    path.write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(CheckpointError, match="format 'something-else'"):
        load_checkpoint(tmp_path / "ckpt")
    path.write_text(json.dumps(meta))
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors not found"):
        load_checkpoint(tmp_path / "ckpt")
    path.unlink()
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_checkpoint(tmp_path / "ckpt")


def test_overrides_change_config_fields(tmp_path: Path) -> None:
    save_checkpoint(make_model(), tmp_path / "ckpt")
    assert load_checkpoint(tmp_path / "ckpt", drop_rate=0.0).cfg.drop_rate == 0.0


def test_atomic_writes_remove_what_a_killed_writer_left(tmp_path: Path) -> None:
    from llmcore.fileio import atomic_path

    target = tmp_path / "model"
    (tmp_path / ".model.tmpab12cd").mkdir()  # kill -9 in the middle of a write
    (tmp_path / ".model.tmpab12cd" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".model.old4242").mkdir()  # ... or in the middle of a directory swap
    (tmp_path / ".other.tmpzz").mkdir()  # another target's: not ours to remove
    with atomic_path(target, is_dir=True) as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmpzz", "model"]
