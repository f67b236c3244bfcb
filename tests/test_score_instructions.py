"""The instruction stages end to end on a tiny model: fine-tune (MLflow, resume), then scoring with
the judge answering, unreachable, or required; and ROUGE-L on known pairs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from llmcore.checkpoint import load_checkpoint, save_checkpoint
from llmcore.config import GPTConfig
from llmcore.instruct import generate_responses
from llmcore.model import GPTModel
from llmcore.tokenizer import get_tokenizer
from llmpipe.data import TokenizerParams
from llmpipe.params import read_params, validate_section
from steps import finetune_instruct as ft
from steps import score_instructions as score
from tests.conftest import in_stage_workspace, stage_argv
from tests.fake_ollama import FakeOllama, closed_port_url, ollama_reply
from tests.params_values import params_file, params_for
from tests.trainer_params import TEST_TRAINING


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> Path:
    """A tiny base model (context 64: long examples are cut), 8/2/4 entries, params, MLflow store."""
    root = tmp_path_factory.mktemp("instruct")
    torch.manual_seed(0)
    save_checkpoint(GPTModel(GPTConfig.from_preset("cpu-tiny", context_length=64)), root / "base")
    entries = json.loads((mirror / "instruction-data.json").read_text())
    (root / "data").mkdir()
    for name, part in {"train": entries[:8], "validation": entries[8:10], "test": entries[10:14]}.items():
        (root / "data" / f"{name}.json").write_text(json.dumps(part))
    (root / "data" / "meta.json").write_text(json.dumps({"prompt_style": "alpaca"}))
    params = {
        "tokenizer": {"encoding_dir": str(mirror / "gpt2")},
        "base_model": {"dir": str(root / "base")},
        "training": TEST_TRAINING,
        "finetune_instruct": {
            "epochs": 2,
            "batch_size": 4,
            "lr": 1e-3,
            "eval_every": 3,
            "eval_batches": 1,
            "sample_entries": 1,
            "sample_max_new_tokens": 4,
            "device": "cpu",
        },
        "score_instructions": {
            "max_new_tokens": 6,
            "batch_size": 3,
            "device": "cpu",
            "judge": {"url": closed_port_url(), "connect_retries": 0, "backoff_factor": 0},
        },
        "comparison": {"bootstrap_samples": 200},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params_file(params)))
    return root


@pytest.fixture(scope="module")
def in_workspace(workspace: Path):
    yield from in_stage_workspace(workspace)


def finetune_argv(**paths: str) -> list[str]:
    defaults = {
        "params": "params.yaml",
        "out": "models/instruct",
        "metrics": "metrics/ft.json",
        "history": "plots/ft.csv",
        "plot": "plots/ft.png",
        "cache": ".cache/ft",
    }
    return stage_argv(defaults, **paths) + ["--data", "data"]


@pytest.fixture(scope="module")
def finetuned(in_workspace: Path) -> Path:
    (in_workspace / ".cache" / "ft" / "stale").mkdir(parents=True)
    ft.main(finetune_argv())
    return in_workspace / "models" / "instruct"


def score_argv(params: str = "params.yaml", **paths: str) -> list[str]:
    defaults = {
        "model": "models/instruct",
        "test": "data/test.json",
        "responses": "out/responses.json",
        "metrics": "out/metrics.json",
        "headline": "out/headline.json",
    }
    return ["--params", params] + [arg for k, v in {**defaults, **paths}.items() for arg in (f"--{k}", v)]


def with_judge(workspace: Path, name: str, **judge) -> str:
    """A copy of the workspace params with other judge settings."""
    data = read_params(workspace / "params.yaml")
    data["score_instructions"]["judge"].update(judge)
    (workspace / name).write_text(yaml.safe_dump(params_file(data)))
    return name


# ---- fine-tuning


def test_finetune_writes_model_metrics_history_and_clears_its_state(finetuned: Path, in_workspace: Path) -> None:
    model, base = load_checkpoint(finetuned), load_checkpoint(in_workspace / "base")
    assert model.cfg == base.cfg
    assert not torch.equal(model.tok_emb.weight, base.tok_emb.weight)
    metrics = json.loads((in_workspace / "metrics" / "ft.json").read_text())
    assert metrics["steps"] == 4 and math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss"])
    history = pd.read_csv(in_workspace / "plots" / "ft.csv")
    assert history["step"].tolist() == [2, 3, 4]  # every 3 steps and at each epoch end (2 steps each)
    assert (in_workspace / "plots" / "ft.png").stat().st_size > 0
    assert not (in_workspace / ".cache" / "ft").exists()  # its state and the stale one are gone


def test_finetune_logs_losses_and_sample_responses_to_mlflow(finetuned: Path, in_workspace: Path) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    run = client.search_runs(
        [client.get_experiment_by_name("instruction-sft").experiment_id],
        filter_string="tags.stage = 'finetune_instruct'",
        order_by=["start_time ASC"],
    )[0]
    assert run.data.params["lr"] == "0.001" and run.data.params["base_model"] == str(in_workspace / "base")
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 3
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert samples == ["samples/epoch_01.md", "samples/epoch_02.md"]
    # Logged as a pyfunc with a signature, registered as the @candidate of instruct-gpt.
    candidate = client.get_model_version_by_alias("instruct-gpt", "candidate")
    assert candidate.run_id == run.info.run_id
    model = mlflow.pyfunc.load_model("models:/instruct-gpt@candidate")
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["instruction", "input"]
    answers = model.predict(
        pd.DataFrame({"instruction": ["Name a color."], "input": [""]}), params={"max_new_tokens": 3}
    )
    assert list(answers.columns) == ["response"] and len(answers) == 1


def test_interrupted_finetune_resumes_to_the_same_weights(finetuned: Path, in_workspace: Path, monkeypatch) -> None:
    params = validate_section(read_params("params.yaml"), "finetune_instruct", ft.FinetuneInstructParams)
    tokenizer = params_for(TokenizerParams, **read_params("params.yaml")["tokenizer"])
    paths = dict(
        base_model=in_workspace / "base",
        data_dir=in_workspace / "data",
        out_dir=in_workspace / "resumed",
        metrics_out=in_workspace / "r.json",
        history_out=in_workspace / "r.csv",
        plot_out=in_workspace / "r.png",
        cache_dir=in_workspace / ".cache" / "resume",
    )

    def crash_in_second_epoch(self, state, model) -> None:
        if state.epoch == 1:
            raise KeyboardInterrupt  # after epoch 1's state was saved, before epoch 2's

    with monkeypatch.context() as patch:
        patch.setattr(ft.SampleResponses, "on_epoch_end", crash_in_second_epoch)
        with pytest.raises(KeyboardInterrupt):
            ft.finetune_instruct(params, tokenizer_params=tokenizer, **paths)
    assert (paths["cache_dir"]).is_dir() and not paths["out_dir"].exists()
    metrics = ft.finetune_instruct(params, tokenizer_params=tokenizer, **paths)
    resumed, uninterrupted = (
        load_file(paths["out_dir"] / "model.safetensors"),
        load_file(finetuned / "model.safetensors"),
    )
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    assert metrics["val_loss"] == json.loads((in_workspace / "metrics" / "ft.json").read_text())["val_loss"]


def test_finetune_refuses_a_gpt2_dir_without_weights(in_workspace: Path) -> None:
    empty = in_workspace / "gpt2"
    empty.mkdir()
    (empty / "status.json").write_text(json.dumps({"loaded": False, "reason": "no network"}))
    with pytest.raises(SystemExit) as exc:
        ft.main(finetune_argv(out="models/from_gpt2") + ["--base", str(empty)])
    message = str(exc.value.code)
    assert message.startswith("finetune_instruct: error:") and str(empty) in message and "no weights" in message
    assert not (in_workspace / "models" / "from_gpt2").exists()


# ---- scoring


def test_score_with_a_judge_saves_responses_and_all_metrics(finetuned: Path, in_workspace: Path) -> None:
    server = FakeOllama(lambda n, body: ollama_reply(str(70 + 10 * (n % 2))))
    try:
        score.main(score_argv(with_judge(in_workspace, "judged.yaml", url=server.url)))
    finally:
        server.close()
    metrics = json.loads((in_workspace / "out" / "metrics.json").read_text())
    assert metrics["n_entries"] == 4 and metrics["n_scored"] == 4 and metrics["n_unscored"] == 0
    assert metrics["judge_score"] == 75.0 and metrics["judge_available"] is True
    assert 0 <= metrics["rouge_l_f1"] <= 1 and metrics["response_tokens"] > 0
    assert math.isclose(metrics["response_perplexity"], math.exp(metrics["response_loss"]), rel_tol=1e-4)

    records = json.loads((in_workspace / "out" / "responses.json").read_text())
    test = json.loads((in_workspace / "data" / "test.json").read_text())
    model = load_checkpoint(finetuned)
    tokenizer = get_tokenizer(read_params("params.yaml")["tokenizer"]["encoding_dir"])
    assert [r["model_response"] for r in records] == generate_responses(model, tokenizer, test, max_new_tokens=6)
    assert [(r["instruction"], r["input"], r["output"]) for r in records] == [
        (e["instruction"], e["input"], e["output"]) for e in test
    ]
    assert [r["judge_score"] for r in records] == [70, 80, 70, 80]
    assert len(server.requests) == 4
    headline = json.loads((in_workspace / "out" / "headline.json").read_text())
    assert headline == {
        k: metrics[k]
        for k in (
            "rouge_l_f1",
            "rouge_l_f1_ci_low",
            "rouge_l_f1_ci_high",
            "judge_score",
            "judge_score_ci_low",
            "judge_score_ci_high",
            "validation_response_loss",
        )
    }
    assert headline["judge_score_ci_low"] == 70.0 and headline["judge_score_ci_high"] == 80.0  # 4 scores of 70 or 80
    assert headline["rouge_l_f1_ci_low"] <= metrics["rouge_l_f1"] <= headline["rouge_l_f1_ci_high"]
    assert metrics["response_loss_ci_low"] <= metrics["response_loss"] <= metrics["response_loss_ci_high"]
    assert [r["response_tokens"] for r in records] and sum(r["response_tokens"] for r in records) == metrics[
        "response_tokens"
    ]
    # The scores go into the fine-tune's MLflow run; the first scored version becomes @champion.
    import mlflow

    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("instruct-gpt", "champion")
    training = client.get_run(champion.run_id)
    assert training.data.tags["stage"] == "finetune_instruct"
    assert training.data.metrics["judge_score"] == 75.0 and training.data.metrics["rouge_l_f1"] == metrics["rouge_l_f1"]
    # Chosen on the validation split's response loss (2 entries); the test scores recorded beside.
    (key,) = [k for k in champion.tags if k.startswith("eval.validation.n2.") and k.endswith(".response_loss")]
    assert float(champion.tags[key]) == pytest.approx(metrics["validation_response_loss"], rel=1e-5)
    assert float(champion.tags[key.replace(".response_loss", ".test_judge_score")]) == 75.0


def test_score_without_a_judge_completes_with_offline_metrics(finetuned: Path, in_workspace: Path) -> None:
    with pytest.warns(RuntimeWarning, match="LLM judge unavailable"):
        score.main(score_argv(metrics="out/offline.json", responses="out/offline_responses.json"))
    metrics = json.loads((in_workspace / "out" / "offline.json").read_text())
    assert metrics["judge_score"] is None and metrics["judge_available"] is False
    assert metrics["n_scored"] == 0 and metrics["n_unscored"] == 4
    assert math.isfinite(metrics["response_loss"]) and 0 <= metrics["rouge_l_f1"] <= 1
    records = json.loads((in_workspace / "out" / "offline_responses.json").read_text())
    assert all(r["judge_score"] is None for r in records)


def test_score_fails_when_a_required_judge_is_unreachable(finetuned: Path, in_workspace: Path) -> None:
    params = with_judge(in_workspace, "required.yaml", required=True)
    with pytest.raises(SystemExit) as exc:
        score.main(score_argv(params, metrics="out/req.json", responses="out/req_responses.json"))
    assert "score_instructions: error:" in str(exc.value.code) and "required" in str(exc.value.code)
    assert not (in_workspace / "out" / "req.json").exists()
    assert not (in_workspace / "out" / "req_responses.json").exists()


def test_score_reports_no_response_loss_when_the_context_cuts_every_response(in_workspace: Path) -> None:
    torch.manual_seed(0)
    save_checkpoint(GPTModel(GPTConfig.from_preset("cpu-tiny", context_length=16)), in_workspace / "models" / "short")
    with pytest.warns(RuntimeWarning, match="LLM judge unavailable"):
        score.main(score_argv(model="models/short", metrics="out/short.json", responses="out/short_responses.json"))
    metrics = json.loads((in_workspace / "out" / "short.json").read_text())
    assert (
        metrics["response_tokens"] == 0 and metrics["response_loss"] is None and metrics["response_perplexity"] is None
    )


def test_score_without_a_model_names_the_stage(in_workspace: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        score.main(score_argv(model="models/missing"))
    assert "dvc repro finetune_instruct" in str(exc.value.code)


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("The cat sat on the mat.", "the cat sat on the mat", 1.0),
        ("the cat on the mat", "the cat sat on the mat", 10 / 11),  # LCS 5: P = 1, R = 5/6
        ("a b c", "c b a", 1 / 3),  # order matters: LCS 1
        ("police killed the gunman", "the gunman killed police", 0.5),  # LCS 2 of 4 words
        ("completely different", "nothing shared here", 0.0),
        ("", "reference", 0.0),
    ],
)
def test_rouge_l_f1_on_known_pairs(prediction: str, reference: str, expected: float) -> None:
    assert math.isclose(score.rouge_l_f1(prediction, reference), expected, rel_tol=1e-9, abs_tol=1e-12)


def test_a_secret_in_the_judge_url_reaches_no_store_log_or_file(finetuned: Path, in_workspace: Path, capfd) -> None:
    credentials = closed_port_url().replace("http://", "http://admin:PLANTED-SECRET@")
    with pytest.raises(SystemExit) as refused:  # user:password@ is refused: the key comes from the environment
        score.main(
            score_argv(
                with_judge(in_workspace, "creds.yaml", url=credentials),
                metrics="out/creds.json",
                responses="out/creds_responses.json",
            )
        )
    assert "score_instructions.judge.url: Value error, holds credentials" in str(refused.value.code)
    assert "PLANTED" not in str(refused.value.code) and not (in_workspace / "out" / "creds.json").exists()
    url = closed_port_url() + "/?api_key=PLANTED-QUERY"
    with pytest.warns(RuntimeWarning, match=r"api_key=\*\*\*"):
        score.main(
            score_argv(
                with_judge(in_workspace, "secret.yaml", url=url),
                metrics="out/secret.json",
                responses="out/secret_responses.json",
            )
        )
    printed = capfd.readouterr()
    assert "PLANTED" not in printed.out + printed.err
    written = [p for p in in_workspace.rglob("*") if p.is_file() and p.name not in ("secret.yaml", "creds.yaml")]
    leaks = [str(p) for p in written if b"PLANTED" in p.read_bytes()]
    assert leaks == []  # mlflow.db (params, tags), mlruns artifacts, metrics and responses included
    assert (in_workspace / "mlflow.db") in written
