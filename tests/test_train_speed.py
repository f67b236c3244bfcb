"""The training speed switches change speed, not results: mixed precision tracks fp32, torch.compile
matches eager, both resume exactly and both reach every trainer (pretraining, the classifier's loop,
the stages' params); throughput telemetry reaches the callbacks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import TensorDataset

from llmcore import GPTConfig, GPTModel
from llmcore.classifier import GPTClassifier, classification_accuracy, classification_loss
from llmcore.data import SlidingWindowDataset
from llmcore.precision import resolve_precision
from llmcore.throughput import GPU_PEAK_FLOPS, peak_flops, training_flops_per_token
from llmcore.train import TrainCallback, TrainConfig, train
from steps.finetune_classifier import FinetuneClassifierParams
from steps.finetune_instruct import FinetuneInstructParams
from steps.pretrain import PretrainParams
from tests.trainer_params import train_config, trainer_params

CFG = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
# 2 epochs of 6 micro-batches of 2, accumulated in pairs: 3 optimizer steps per epoch.
CONFIG = train_config(
    epochs=2,
    batch_size=2,
    grad_accum_steps=2,
    lr=3e-3,
    warmup_steps=1,
    eval_every=2,
    eval_batches=2,
    checkpoint_every=2,
    seed=7,
    progress=False,
)


def make_model(seed: int = 0, **overrides) -> GPTModel:
    torch.manual_seed(seed)
    return GPTModel(GPTConfig(**{**CFG.to_dict(), **overrides}))


def windows(n: int, seed: int = 0) -> SlidingWindowDataset:
    return SlidingWindowDataset(np.random.default_rng(seed).integers(0, CFG.vocab_size, n * 16 + 1), 16, 16)


class Recorder(TrainCallback):
    def __init__(self, stop_after: int | None = None):
        self.steps, self.stop_after = [], stop_after

    def on_step_end(self, state, metrics):
        self.steps.append(dict(metrics))
        if state.step == self.stop_after:
            raise KeyboardInterrupt


def run(config: TrainConfig, model: GPTModel | None = None, **kwargs):
    model = model or make_model()
    log = Recorder(kwargs.pop("stop_after", None))
    state = train(model, windows(12), windows(4, seed=1), config, callbacks=[log], **kwargs)
    return model, state, log


def assert_resumes_exactly(config: TrainConfig, tmp_path: Path, model_overrides: dict | None = None) -> None:
    """Interrupted after step 3 (the last state is step 2) and resumed: the uninterrupted weights."""
    overrides = model_overrides or {}
    full_model, full, _ = run(config, make_model(**overrides), state_dir=tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(config, make_model(**overrides), state_dir=tmp_path / "run", stop_after=3)
    resumed_model, resumed, log = run(config, make_model(seed=9, **overrides), state_dir=tmp_path / "run")
    assert len(log.steps) == 4 and resumed.history == full.history
    for (name, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("precision, tolerance", [("bf16-mixed", 0.03), ("fp16-mixed", 0.005)])
def test_mixed_precision_losses_track_fp32(precision: str, tolerance: float, tmp_path: Path) -> None:
    _, fp32, fp32_log = run(CONFIG)
    model, mixed, mixed_log = run(dataclasses.replace(CONFIG, precision=precision), state_dir=tmp_path)
    step_losses = [m["loss"] for m in mixed_log.steps]
    assert step_losses == pytest.approx([m["loss"] for m in fp32_log.steps], rel=tolerance)
    for got, want in zip(mixed.history, fp32.history):
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=tolerance)
    assert step_losses[-1] < step_losses[0]  # it trains
    # Master weights, and so checkpoints and saved states, stay fp32.
    assert all(p.dtype == torch.float32 for p in model.parameters())
    saved = load_file(tmp_path / "train_state" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed"])
def test_resume_under_mixed_precision_is_exact(precision: str, tmp_path: Path) -> None:
    # fp16 also restores the loss scaler's scale and growth tracker.
    assert_resumes_exactly(dataclasses.replace(CONFIG, precision=precision), tmp_path, {"drop_rate": 0.1})


def test_fp16_steps_the_grad_scaler_skips_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loss scale of 2**60 overflows fp16 on every step of this short run: each step is skipped
    (the weights never move), and the count reaches the step metrics and the final state."""
    from llmcore import precision as amp

    monkeypatch.setattr(
        amp,
        "grad_scaler",
        lambda precision, device: torch.amp.GradScaler(
            device.type, init_scale=2.0**60, enabled=precision == "fp16-mixed"
        ),
    )
    start = make_model().state_dict()
    model, state, log = run(dataclasses.replace(CONFIG, precision="fp16-mixed", grad_clip=None))
    assert state.skipped_steps == state.step == 6
    assert [m["skipped_steps"] for m in log.steps] == [1, 2, 3, 4, 5, 6]
    for name, weight in model.state_dict().items():
        assert torch.equal(weight, start[name]), name
    _, fp32, fp32_log = run(CONFIG)
    assert fp32.skipped_steps == 0 and fp32_log.steps[-1]["skipped_steps"] == 0


def test_compiled_training_matches_eager() -> None:
    eager_model, eager, eager_log = run(CONFIG)
    compiled_model, compiled, compiled_log = run(dataclasses.replace(CONFIG, compile=True))
    assert [m["loss"] for m in compiled_log.steps] == pytest.approx([m["loss"] for m in eager_log.steps], abs=1e-5)
    for got, want in zip(compiled.history, eager.history):
        assert got == pytest.approx(want, abs=1e-5)
    # Compiled kernels sum in another order; Adam's normalised steps carry that to the 1e-5 level.
    torch.testing.assert_close(compiled_model.state_dict(), eager_model.state_dict(), atol=5e-5, rtol=0)


def test_the_compiled_loss_is_one_graph_and_the_chunked_loss_padded_or_not() -> None:
    """Under torch.compile the head + loss compile with the model (no graph break at the chunked
    Function) while the logits fit one chunk; loss and gradients equal eager's chunked ones, with
    a padded vocabulary too."""
    for pad in (1, 64):
        model = make_model(pad_vocab_to_multiple=pad)
        idx = torch.randint(0, CFG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(pad))
        targets = idx.roll(-1, dims=1)
        assert torch._dynamo.explain(model.loss)(idx, targets).break_reasons == []
        torch._dynamo.reset()
        losses, grads = [], []
        for loss_of in (model.loss, torch.compile(model.loss)):
            model.zero_grad(set_to_none=True)
            loss = loss_of(idx, targets)
            loss.backward()
            losses.append(loss.detach())
            grads.append([p.grad.clone() for p in model.parameters()])
        torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
        for got, want in zip(grads[1], grads[0]):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_resume_under_compile_is_exact(tmp_path: Path) -> None:
    assert_resumes_exactly(dataclasses.replace(CONFIG, compile=True), tmp_path, {"drop_rate": 0.1})


def test_auto_precision_is_fp32_on_cpu_and_unknown_precisions_are_refused() -> None:
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="precision"):
        train_config(precision="fp8")


def test_step_metrics_carry_throughput_and_mfu() -> None:
    _, _, log = run(CONFIG)
    for metrics in log.steps:
        assert metrics["tokens_per_s"] == pytest.approx(2 * 2 * 16 / metrics["step_time_s"])
        assert 0 < metrics["mfu"] < 1
    assert "peak_memory_mb" not in log.steps[0]  # CUDA only


def test_flops_per_token_follow_the_palm_convention() -> None:
    with torch.device("meta"):  # shapes only
        model = GPTModel(GPTConfig.from_preset("gpt2-small"))
    # 6 x (12 layers x 12 x 768^2 block weights + the 50,257 x 768 head) + 12 x 12 x 768 x 1024.
    expected = 6 * (12 * 12 * 768**2 + 50257 * 768) + 12 * 12 * 768 * 1024
    assert training_flops_per_token(model, 1024) == pytest.approx(expected, rel=1e-12)


def test_gpu_peaks_come_from_the_datasheet_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda"), "bf16-mixed") == 989e12
    assert peak_flops(torch.device("cuda"), "fp32") == 494e12  # TF32
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-40GB")
    assert peak_flops(torch.device("cuda"), "fp16-mixed") == 312e12
    assert all(peaks["fp32"] < peaks["fp16"] for _, peaks in GPU_PEAK_FLOPS)


def classifier_run(config: TrainConfig) -> tuple[GPTClassifier, object]:
    """The spam fine-tune's loop on random 'messages': classification loss and accuracy."""
    torch.manual_seed(0)
    model = GPTClassifier(CFG, token_position="flexible")
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, CFG.vocab_size, (16, 12), generator=generator)
    data = TensorDataset(inputs, inputs[:, 0] % 2, torch.randint(4, 13, (16,), generator=generator))
    state = train(model, data, data, config, loss_fn=classification_loss, eval_fn=classification_accuracy)
    return model, state


def test_classifier_loop_under_bf16_and_under_compile() -> None:
    config = dataclasses.replace(CONFIG, grad_accum_steps=1, checkpoint_every=0)
    eager_model, eager = classifier_run(config)
    _, mixed = classifier_run(dataclasses.replace(config, precision="bf16-mixed"))
    compiled_model, compiled = classifier_run(dataclasses.replace(config, compile=True))
    for got_mixed, got_compiled, want in zip(mixed.history, compiled.history, eager.history):
        assert got_mixed["val_loss"] == pytest.approx(want["val_loss"], rel=0.03)
        assert got_compiled == pytest.approx(want, abs=1e-5)  # accuracy included
    torch.testing.assert_close(compiled_model.state_dict(), eager_model.state_dict(), atol=5e-5, rtol=0)


def test_every_trainers_params_carry_precision_and_compile() -> None:
    switches = {"precision": "bf16-mixed", "compile": True}
    configs = [
        trainer_params(PretrainParams, **switches).train_config(),
        trainer_params(FinetuneClassifierParams, **switches).train_config(),
        trainer_params(FinetuneInstructParams, **switches).train_config(),
    ]
    assert all((c.precision, c.compile) == ("bf16-mixed", True) for c in configs)
    assert (trainer_params(PretrainParams).precision, trainer_params(PretrainParams).compile) == (
        "fp32",
        False,
    )  # the CPU defaults
    model = trainer_params(PretrainParams, model={"preset": "cpu-tiny", "pad_vocab_to_multiple": 64}).model.gpt_config(
        context_length=256
    )
    assert model.padded_vocab_size == 50304
