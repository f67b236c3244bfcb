"""The pretrain, evaluate and load_gpt2 stages on tiny models and windows, with MLflow in tmp.

Covers: outputs and MLflow contents of a pretraining run (params, curves, samples, plot, the
pyfunc generator model), an interrupted run resumed to the same final weights and metrics,
evaluation figures cross-checked against the training loop's, and GPT-2 loading from a tiny
transformers checkpoint plus the offline (weights unavailable) behaviours.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from llmcore.checkpoint import load_checkpoint
from llmcore.generate import generate_text
from llmcore.tokenizer import ENDOFTEXT_ID, get_tokenizer
from llmcore.train import STATE_DIR, TrainCallback
from llmcore.weights import WeightsUnavailableError
from llmpipe.data import TokenizerParams
from llmpipe.io import file_digest
from llmpipe.params import ParamsError, validate_section
from llmpipe.stats import ComparisonParams
from steps import evaluate as evaluate_step
from steps import load_gpt2 as load_gpt2_step
from steps.build_windows import WindowParams, build_windows
from steps.data.shards import ShardWriter, TokenizerIdentity
from steps.pretrain import PretrainParams, PretrainPaths, pretrain
from tests.params_values import params_file, params_for
from tests.trainer_params import trainer_params

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("LLMPIPE_MIRROR") or REPO.parent / "shared" / "data")
TOKENIZER = params_for(TokenizerParams, encoding_dir=str(MIRROR / "gpt2"))
CONTEXT = 16

pytestmark = pytest.mark.skipif(not MIRROR.is_dir(), reason=f"offline mirror {MIRROR} not found")

TINY = {
    "model": {
        "preset": "cpu-tiny",
        "emb_dim": 32,
        "n_heads": 2,
        "n_layers": 1,
        "drop_rate": 0.1,
    },  # dropout on: resuming must also replay the dropout masks
    "lr": 1e-2,
    "warmup_steps": 2,
    "schedule": "cosine",
    "grad_clip": 1.0,
    "epochs": 2,
    "batch_size": 4,
    "eval_every": 2,
    "eval_batches": None,
    "checkpoint_every": 2,
    "seed": 7,
    "device": "cpu",
    "sample": {"prompt": "Every effort moves you", "max_new_tokens": 5},
}


def tiny_params(**changes) -> PretrainParams:
    return trainer_params(PretrainParams, **{**TINY, **changes})


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    """A tmp dir with tiny windows, that is the cwd and holds the MLflow store for this module."""
    root = tmp_path_factory.mktemp("train_steps")
    writer = ShardWriter(root / "work", np.uint16)  # 322 random tokens: 257 train (16 windows), 65 val (4)
    writer.write(np.random.default_rng(0).integers(0, 50257, 322, dtype=np.uint16))
    writer.commit(1, {})
    writer.finish(
        root / "tokens", vocab_size=50257, endoftext_id=50256, tokenizer=TokenizerIdentity(name="gpt2", sha256="0" * 64)
    )
    meta = build_windows(
        params_for(WindowParams, context_length=CONTEXT, stride=CONTEXT, train_ratio=0.8),
        tokens_dir=root / "tokens",
        out_dir=root / "windows",
        metrics_out=root / "windows.json",
    )
    assert (meta["n_train_windows"], meta["n_val_windows"]) == (16, 4)  # 4 training steps per epoch
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.delenv("LLMPIPE_MLFLOW_PARENT_RUN_ID", raising=False)
        mp.delenv("LLMPIPE_MLFLOW_EXPERIMENT", raising=False)
        mp.chdir(root)  # MLflow's artifact store (./mlruns) lands here
        previous_uri = mlflow.get_tracking_uri()
        yield root
        mlflow.set_tracking_uri(previous_uri)


def paths_in(root: Path) -> PretrainPaths:
    return PretrainPaths(
        windows=root.parent / "windows",
        model_out=root / "model",
        metrics=root / "metrics.json",
        history_csv=root / "loss.csv",
        loss_plot=root / "loss.png",
        state_dir=root / "state",
    )


@pytest.fixture(scope="module")
def pretrained(workspace: Path) -> tuple[PretrainPaths, dict]:
    paths = paths_in(workspace / "run")
    return paths, pretrain(tiny_params(), paths=paths, tokenizer_params=TOKENIZER, progress=False)


def last_run(experiment: str):
    runs = mlflow.search_runs(experiment_names=[experiment], order_by=["start_time DESC"], output_format="list")
    return runs[0]


# ---- pretrain


def test_pretrain_writes_checkpoint_metrics_plots_and_cleans_its_state(pretrained) -> None:
    paths, metrics = pretrained
    model = load_checkpoint(paths.model_out)
    assert model.cfg.context_length == CONTEXT and model.cfg.emb_dim == 32 and model.cfg.n_layers == 1
    # The file holds what the run reached; its speed (different every run) goes to MLflow and the caller.
    speed = {"tokens_per_s", "wall_time_s", "mfu", "run_id", "registered_version"}
    assert json.loads(paths.metrics.read_text()) == {k: v for k, v in metrics.items() if k not in speed}
    assert metrics["steps"] == 8 and metrics["tokens_seen"] == 8 * 4 * CONTEXT
    assert metrics["parameters"] == model.num_parameters()
    assert metrics["tokens_per_s"] > 0 and metrics["wall_time_s"] > 0 and 0 < metrics["mfu"] < 1
    history = pd.read_csv(paths.history_csv)
    assert list(history.columns) == ["step", "epoch", "tokens_seen", "train_loss", "val_loss"]
    assert history["step"].tolist() == [2, 4, 6, 8]
    assert history["val_loss"].iloc[-1] == pytest.approx(metrics["val_loss"])
    # Random tokens have nothing to learn but their frequencies: the loss still falls from ln(50257).
    assert history["train_loss"].iloc[-1] < math.log(50257) - 0.5
    assert paths.loss_plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not paths.state_dir.exists()
    # The model carries its tokenizer files: `llm` and serving need no network or environment.
    for name in ("encoder.json", "vocab.bpe"):
        assert (paths.model_out / name).read_bytes() == (MIRROR / "gpt2" / name).read_bytes()


def test_pretrain_mlflow_run_holds_params_curves_samples_plot_and_a_loadable_generator(pretrained) -> None:
    paths, metrics = pretrained
    run = last_run("pretrain")
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "pretrain" and "git_commit" in run.data.tags
    params = run.data.params
    assert params["model.preset"] == "cpu-tiny" and params["lr"] == "0.01" and params["epochs"] == "2"
    assert params["sample.prompt"] == "Every effort moves you" and params["resolved_device"] == "cpu"
    client = mlflow.MlflowClient()
    val_curve = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in val_curve] == [2 * 4 * CONTEXT * k for k in (1, 2, 3, 4)]  # against tokens seen
    assert len(client.get_metric_history(run.info.run_id, "lr")) == 8
    assert val_curve[-1].value == pytest.approx(metrics["val_loss"])  # the curve, no one-value final_* copy
    assert not any(key.startswith("final_") for key in run.data.metrics)
    assert params["steps"] == str(metrics["steps"]) and params["tokens_seen"] == str(metrics["tokens_seen"])
    assert run.data.metrics["tokens_per_s"] > 0 and run.data.metrics["mfu"] > 0
    # Each evaluation also logs the mean throughput since the previous one.
    assert len(client.get_metric_history(run.info.run_id, "throughput_tokens_per_s")) == 4
    # What it was trained on: the windows' definition and the token shards' index, with their DVC hash (md5).
    inputs = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert inputs == {
        f"{name}/meta.json": file_digest(paths.windows.parent / name / "meta.json", "md5")
        for name in ("windows", "tokens")
    }
    # The weights it wrote are findable from the model directory, and registered as @candidate.
    assert run.data.tags["model_md5"] == file_digest(paths.model_out / "model.safetensors", "md5")
    candidate = client.get_model_version_by_alias("pretrained-gpt", "candidate")
    assert candidate.run_id == run.info.run_id
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert artifacts == {"samples/epoch_001.txt", "samples/epoch_002.txt"}
    sample = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/samples/epoch_002.txt")
    assert sample.startswith("Every effort moves you")
    assert f"plots/{paths.loss_plot.name}" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}

    generator = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/generator")
    out = generator.predict(pd.DataFrame({"prompt": ["Every effort moves you", "I HAD"]}), params={"max_new_tokens": 6})
    model, tokenizer = load_checkpoint(paths.model_out), get_tokenizer(TOKENIZER.encoding_dir)
    expected = [generate_text(model, tokenizer, p, 6, eos_id=ENDOFTEXT_ID) for p in ("Every effort moves you", "I HAD")]
    assert out["completion"].tolist() == expected


class Interrupt(Exception):
    pass


class InterruptAtStep(TrainCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, state, metrics) -> None:
        if state.step == self.step:
            raise Interrupt


def test_interrupted_pretraining_resumes_to_the_same_weights_and_metrics(workspace: Path, pretrained) -> None:
    reference_paths, reference = pretrained
    paths = paths_in(workspace / "resumed")
    with pytest.raises(Interrupt):  # in epoch 2, one step after the checkpoint at step 6
        pretrain(
            tiny_params(), paths=paths, tokenizer_params=TOKENIZER, callbacks=(InterruptAtStep(7),), progress=False
        )
    saved = list(paths.state_dir.glob(f"*/{STATE_DIR}/state.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["step"] == 6
    assert not paths.metrics.exists() and not paths.model_out.exists()

    metrics = pretrain(tiny_params(), paths=paths, tokenizer_params=TOKENIZER, progress=False)
    deterministic = ("train_loss", "val_loss", "steps", "tokens_seen", "parameters")
    assert {k: metrics[k] for k in deterministic} == {k: reference[k] for k in deterministic}
    assert paths.history_csv.read_text() == reference_paths.history_csv.read_text()
    weights, expected = (
        load_file(paths.model_out / "model.safetensors"),
        load_file(reference_paths.model_out / "model.safetensors"),
    )
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in weights)
    assert not paths.state_dir.exists()
    run = last_run("pretrain")
    assert run.data.tags["resumed_from_step"] == "6"
    # The resumed run carries the whole curve: evaluations before the interruption are re-logged.
    assert len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_loss")) == 4


def test_random_offset_windows_pretrain_and_resume_exactly(workspace: Path) -> None:
    random = params_for(
        WindowParams, context_length=CONTEXT, stride=CONTEXT, train_ratio=0.8, sampling="random", random_windows=12
    )
    build_windows(
        random,
        tokens_dir=workspace / "tokens",
        out_dir=workspace / "random_windows",
        metrics_out=workspace / "random.json",
    )
    reference_paths, paths = (
        dataclasses.replace(paths_in(workspace / name), windows=workspace / "random_windows")
        for name in ("random", "random_resumed")
    )
    reference = pretrain(tiny_params(), paths=reference_paths, tokenizer_params=TOKENIZER, progress=False)
    assert reference["steps"] == 6  # 12 windows at random offsets per epoch, batches of 4, 2 epochs
    with pytest.raises(Interrupt):
        pretrain(
            tiny_params(), paths=paths, tokenizer_params=TOKENIZER, callbacks=(InterruptAtStep(5),), progress=False
        )
    resumed = pretrain(tiny_params(), paths=paths, tokenizer_params=TOKENIZER, progress=False)
    assert (resumed["train_loss"], resumed["val_loss"]) == (reference["train_loss"], reference["val_loss"])
    weights, expected = (
        load_file(paths.model_out / "model.safetensors"),
        load_file(reference_paths.model_out / "model.safetensors"),
    )
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


def test_a_saved_state_with_other_settings_is_not_resumed(workspace: Path, pretrained) -> None:
    _, reference = pretrained
    paths = paths_in(workspace / "changed")
    with pytest.raises(Interrupt):
        pretrain(
            tiny_params(seed=8),
            paths=paths,
            tokenizer_params=TOKENIZER,
            callbacks=(InterruptAtStep(3),),
            progress=False,
        )
    metrics = pretrain(tiny_params(), paths=paths, tokenizer_params=TOKENIZER, progress=False)  # the reference settings
    assert metrics["val_loss"] == reference["val_loss"] and metrics["train_loss"] == reference["train_loss"]


def test_the_context_length_is_stated_once_by_the_windows() -> None:
    with pytest.raises(ParamsError, match=r"pretrain\.model\.context_length: Extra inputs are not permitted"):
        validate_section(
            {"pretrain": {**TINY, "model": {**TINY["model"], "context_length": 32}}}, "pretrain", PretrainParams
        )


def test_pretrain_params_name_the_bad_key() -> None:
    with pytest.raises(ParamsError, match=r"pretrain\.model\.preset: .*unknown preset"):
        validate_section({"pretrain": {**TINY, "model": {"preset": "gpt5"}}}, "pretrain", PretrainParams)
    with pytest.raises(ParamsError, match=r"pretrain\.schedul"):
        validate_section({"pretrain": {**TINY, "schedul": "cosine"}}, "pretrain", PretrainParams)


# ---- evaluate


def test_evaluate_scores_whole_splits_and_generates_reproducibly(workspace: Path, pretrained) -> None:
    paths, trained = pretrained
    params = evaluate_step.EvaluateParams.model_validate(
        {
            "batch_size": 3,
            "device": "cpu",
            "generation": {
                "prompts": ["Every effort moves you", "I"],
                "max_new_tokens": 5,
                "temperature": 1.0,
                "top_k": 20,
                "seed": 5,
            },
        }
    )
    out = workspace / "eval"

    def run(name: str) -> dict:
        return evaluate_step.evaluate(
            params,
            model_dir=paths.model_out,
            windows_dir=paths.windows,
            metrics_out=out / "metrics.json",
            headline_out=out / "headline.json",
            position_csv=out / "position.csv",
            windows_out=out / "windows.csv",
            generations_out=out / name,
            tokenizer_params=TOKENIZER,
            comparison=params_for(ComparisonParams),
        )

    metrics = run("generations.json")
    # The training loop's last evaluation covered the whole val split in batches of 4: the same mean.
    assert metrics["val"]["loss"] == pytest.approx(trained["val_loss"], rel=1e-5)
    assert metrics["val"]["perplexity"] == pytest.approx(math.exp(metrics["val"]["loss"]))
    assert metrics["train"]["tokens"] == 16 * CONTEXT and metrics["val"]["tokens"] == 4 * CONTEXT
    assert json.loads((out / "metrics.json").read_text()) == metrics
    curve = pd.read_csv(out / "position.csv")
    assert curve["position"].tolist() == list(range(1, CONTEXT + 1))
    assert curve["val_loss"].mean() == pytest.approx(metrics["val"]["loss"], rel=1e-5)
    generations = json.loads((out / "generations.json").read_text())
    assert [g["prompt"] for g in generations] == ["Every effort moves you", "I"]
    assert all(g["completion"] for g in generations)
    run("again.json")
    assert json.loads((out / "again.json").read_text()) == generations  # fixed seed
    val = metrics["val"]
    assert json.loads((out / "headline.json").read_text()) == {
        f"val_{k}": val[k]
        for k in ("loss", "loss_ci_low", "loss_ci_high", "perplexity", "perplexity_ci_low", "perplexity_ci_high")
    }
    # The interval is the t interval over the 4 val windows, whose losses are kept per window.
    windows = pd.read_csv(out / "windows.csv")
    assert val["windows"] == 4 and windows.query("split == 'val'")["loss"].mean() == pytest.approx(
        val["loss"], rel=1e-5
    )
    assert val["loss_ci_low"] < val["loss"] < val["loss_ci_high"]
    assert val["perplexity_ci_low"] == pytest.approx(math.exp(val["loss_ci_low"]))
    # The scores land in the run that trained these weights, beside its params.
    training_run = last_run("pretrain")
    assert training_run.data.tags["stage"] == "pretrain"
    assert training_run.data.metrics["val_perplexity"] == pytest.approx(metrics["val"]["perplexity"])
    champion = mlflow.MlflowClient().get_model_version_by_alias("pretrained-gpt", "champion")
    assert champion.run_id == training_run.info.run_id
    (key,) = [k for k in champion.tags if k.startswith("eval.validation.n4.") and k.endswith(".loss")]
    assert float(champion.tags[key]) == pytest.approx(metrics["val"]["loss"], rel=1e-5)


# ---- load_gpt2


def test_load_gpt2_converts_a_local_checkpoint_with_identical_logits(workspace: Path, make_hf_gpt2) -> None:
    source, hf_model = make_hf_gpt2(tie_word_embeddings=True)
    out = workspace / "gpt2"
    status = load_gpt2_step.load_gpt2_stage(
        params_for(load_gpt2_step.LoadGPT2Params, source=str(source)), out_dir=out, tokenizer_params=TOKENIZER
    )
    assert status["loaded"] and status["tokenizer_files"]
    assert json.loads((out / "status.json").read_text()) == status
    assert (out / "encoder.json").read_bytes() == (MIRROR / "gpt2" / "encoder.json").read_bytes()
    model = load_checkpoint(out).eval()
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_model(ids).logits, atol=1e-5, rtol=1e-5)
    assert last_run("load-gpt2").data.tags["loaded"] == "True"


def test_unavailable_gpt2_writes_a_not_loaded_status_unless_required(workspace: Path, capsys) -> None:
    missing = str(workspace / "no-such-gpt2")
    out = workspace / "gpt2-offline"
    status = load_gpt2_step.load_gpt2_stage(
        params_for(load_gpt2_step.LoadGPT2Params, source=missing), out_dir=out, tokenizer_params=TOKENIZER
    )
    assert status["loaded"] is False and status["source"] == missing and "does not exist" in status["reason"]
    assert [p.name for p in out.iterdir()] == ["status.json"]
    assert "WARNING" in capsys.readouterr().err

    required_params = workspace / "params-required.yaml"
    required_params.write_text(
        yaml.safe_dump(
            params_file({"load_gpt2": {"source": missing, "required": True}, "tokenizer": TOKENIZER.model_dump()})
        )
    )
    with pytest.raises(SystemExit) as exited:
        load_gpt2_step.main(["--params", str(required_params), "--out", str(workspace / "gpt2-required")])
    assert str(exited.value).startswith("load_gpt2: error:") and "load_gpt2.source" in str(exited.value)
    assert not (workspace / "gpt2-required").exists()
    with pytest.raises(WeightsUnavailableError, match="local directory"):
        load_gpt2_step.load_gpt2_stage(
            params_for(load_gpt2_step.LoadGPT2Params, source=missing, required=True),
            out_dir=out,
            tokenizer_params=TOKENIZER,
        )
