"""The preference stages on a tiny model: the data split and its checks, DPO (MLflow, registry,
resume), LoRA, scoring before and after, and the instruction scoring of the DPO model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from llmcore.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint
from llmcore.config import GPTConfig
from llmcore.dpo import pair_logprobs, pair_summary
from llmcore.model import GPTModel
from llmpipe.data import DataError, TokenizerParams
from llmpipe.params import read_params, validate_section
from steps import build_preference_dataset as build
from steps import preference_tune as tune
from steps import score_instructions
from steps import score_preference as score
from steps.data.datasets import load_preference_entries
from steps.data.preferences import load_pairs
from tests.conftest import in_stage_workspace, stage_argv
from tests.fake_ollama import closed_port_url
from tests.params_values import params_file, params_for
from tests.trainer_params import TEST_TRAINING


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> Path:
    """A tiny 'instruction model' (context 128), 40 of the book's pairs, params, an MLflow store."""
    root = tmp_path_factory.mktemp("preference")
    torch.manual_seed(0)
    save_checkpoint(
        GPTModel(GPTConfig.from_preset("cpu-tiny", context_length=128)),
        root / "models" / "instruct",
        extra={"stage": "finetune_instruct", "prompt_style": "alpaca"},
    )
    entries = json.loads((mirror / "instruction-data-with-preference.json").read_text())
    (root / "pairs.json").write_text(json.dumps(entries[:40]))
    instructions = json.loads((mirror / "instruction-data.json").read_text())
    (root / "instructions").mkdir()
    (root / "instructions" / "test.json").write_text(json.dumps(instructions[:3]))
    params = {
        "tokenizer": {"encoding_dir": str(mirror / "gpt2")},
        "preference_data": {"input": "pairs.json"},
        "training": TEST_TRAINING,
        "preference_tune": {
            "beta": 0.5,
            "epochs": 2,
            "batch_size": 4,
            "lr": 2e-3,
            "eval_every": 4,
            "eval_batches": 2,
            "checkpoint_every": 4,
            "grad_clip": 1.0,
            "device": "cpu",
        },
        "score_preference": {"batch_size": 3, "device": "cpu"},
        "score_instructions": {
            "max_new_tokens": 4,
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


def tune_argv(**paths: str) -> list[str]:
    defaults = {
        "params": "params.yaml",
        "out": "models/preference",
        "metrics": "reports/tune.json",
        "history": "plots/tune.csv",
        "plots": "plots",
        "cache": ".cache/tune",
    }
    return stage_argv(defaults, **paths)


@pytest.fixture(scope="module")
def prepared(in_workspace: Path) -> Path:
    build.main(["--params", "params.yaml", "--out", "data/preferences", "--metrics", "reports/data.json"])
    return in_workspace / "data" / "preferences"


@pytest.fixture(scope="module")
def tuned(prepared: Path, in_workspace: Path) -> Path:
    tune.main(tune_argv())
    return in_workspace / "models" / "preference"


def tune_params() -> tune.PreferenceTuneParams:
    return validate_section(read_params("params.yaml"), "preference_tune", tune.PreferenceTuneParams)


# ---- data


def test_the_books_file_splits_85_10_5_in_file_order_as_the_instruction_data(tmp_path: Path, mirror: Path) -> None:
    metrics = build.build_preference_dataset(
        params_for(build.PreferenceDataParams),
        source=mirror / "instruction-data-with-preference.json",
        out_dir=tmp_path / "out",
        metrics_out=tmp_path / "m.json",
        tokenizer=params_for(TokenizerParams, encoding_dir=str(mirror / "gpt2")),
    )
    assert [metrics[s]["chosen"]["entries"] for s in ("train", "test", "validation")] == [935, 110, 55]
    assert sum(metrics[s]["identical_pairs"] for s in metrics) == 6  # the book's file has 6 chosen == rejected
    instructions = json.loads((mirror / "instruction-data.json").read_text())
    test = json.loads((tmp_path / "out" / "test.json").read_text())
    assert [e["instruction"] for e in test] == [e["instruction"] for e in instructions[935:1045]]
    assert not (tmp_path / "out" / "meta.json").exists()


def test_chat_preferences_from_jsonl_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "chats.jsonl"
    chats = [
        {
            "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": f"Q{i}?"}],
            "chosen": [{"role": "assistant", "content": "Gladly."}],
            "rejected": "No.",
        }
        for i in range(3)
    ]
    path.write_text("\n".join(json.dumps(c) for c in chats) + "\n")
    assert load_preference_entries(path) == chats


@pytest.mark.parametrize(
    ("entries", "pattern"),
    [
        (
            [{"instruction": "a", "input": "", "chosen": "b", "rejected": 3}],
            "entry 0 field 'rejected': Input should be a valid string",
        ),
        (
            [{"instruction": "a", "input": "", "chosen": "", "rejected": "c"}],
            "entry 0 field 'chosen': String should have at least 1",
        ),
        ([{"instruction": "a", "input": "", "chosen": "b"}], "entry 0 field 'rejected': Field required"),
        ([{"instruction": "a", "input": "", "output": "b"}], "entry 0 field 'chosen': Field required"),
        (
            [{"prompt": [{"role": "assistant", "content": "x"}], "chosen": "b", "rejected": "c"}],
            "entry 0 field 'prompt': Value error, the prompt must end with the user's turn",
        ),
        (
            [
                {
                    "prompt": [{"role": "user", "content": "x"}],
                    "chosen": [{"role": "user", "content": "b"}],
                    "rejected": "c",
                }
            ],
            "entry 0 field 'chosen': Value error, a completion is a string or one message",
        ),
    ],
)
def test_bad_preference_entries_name_the_entry_and_field(tmp_path: Path, entries: list, pattern: str) -> None:
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(DataError, match=f"^{path}: {pattern}"):
        load_preference_entries(path)


def test_a_bad_entry_through_main_is_one_line_and_writes_nothing(tmp_path: Path, mirror: Path) -> None:
    good = json.loads((mirror / "instruction-data-with-preference.json").read_text())[:20]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(e) for e in good[:5]) + '\n{"instruction": "x", "input": "", "chosen": "y"}\n')
    params = tmp_path / "p.yaml"
    params.write_text(
        yaml.safe_dump(params_file({"tokenizer": {"encoding_dir": str(mirror / "gpt2")}, "preference_data": {}}))
    )
    with pytest.raises(SystemExit) as exc:
        build.main(
            [
                "--params",
                str(params),
                "--input",
                str(bad),
                "--out",
                str(tmp_path / "out"),
                "--metrics",
                str(tmp_path / "m.json"),
            ]
        )
    message = str(exc.value.code)
    assert message == f"build_preference_dataset: error: {bad}: line 6 field 'rejected': Field required"
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()


# ---- DPO


def test_dpo_writes_the_model_curves_and_registers_a_candidate(tuned: Path, in_workspace: Path) -> None:
    import mlflow

    meta = read_checkpoint_meta(tuned)
    assert meta["stage"] == "preference_tune" and meta["prompt_style"] == "alpaca" and meta["beta"] == 0.5
    metrics = json.loads((in_workspace / "reports" / "tune.json").read_text())
    assert metrics["steps"] == 16 and metrics["train_pairs"] == 34 and metrics["val_pairs"] == 2
    history = pd.read_csv(in_workspace / "plots" / "tune.csv")
    assert history["step"].tolist() == [4, 8, 12, 16]
    for column in ("loss", "reward_margin", "reward_accuracy", "preference_accuracy", "chosen_reward"):
        assert {f"train_{column}", f"val_{column}"} <= set(history.columns)
    assert history["train_loss"].iloc[-1] < math.log(2) < history["train_loss"].iloc[0] + 0.05
    for curve in tune.CURVES:
        assert (in_workspace / "plots" / f"preference_training_{curve}.png").stat().st_size > 0
    assert not (in_workspace / ".cache" / "tune").exists()
    client = mlflow.MlflowClient()
    candidate = client.get_model_version_by_alias("preference-gpt", "candidate")
    run = client.get_run(candidate.run_id)
    assert run.data.tags["stage"] == "preference_tune" and run.data.params["beta"] == "0.5"
    assert len(client.get_metric_history(run.info.run_id, "val_reward_margin")) == 4
    assert len(client.get_metric_history(run.info.run_id, "step_loss")) == 16
    answers = mlflow.pyfunc.load_model("models:/preference-gpt@candidate").predict(
        pd.DataFrame({"instruction": ["Name a color."], "input": [""]}), params={"max_new_tokens": 3}
    )
    assert list(answers.columns) == ["response"]


def test_dpo_raises_preference_accuracy_on_its_training_pairs(tuned: Path, in_workspace: Path, tokenizer) -> None:
    pairs, _, _ = load_pairs(in_workspace / "data" / "preferences" / "train.json", tokenizer, "alpaca", 128)
    before = pair_summary(*pair_logprobs(load_checkpoint(in_workspace / "models" / "instruct"), pairs))
    after = pair_summary(*pair_logprobs(load_checkpoint(tuned), pairs))
    assert after["preference_accuracy"] > before["preference_accuracy"] + 0.2
    assert after["logprob_margin"] > before["logprob_margin"]


def test_interrupted_dpo_resumes_to_the_same_weights(tuned: Path, in_workspace: Path, monkeypatch) -> None:
    from llmpipe import tracking

    paths = dict(
        instruct_dir=in_workspace / "models" / "instruct",
        data_dir=in_workspace / "data" / "preferences",
        out_dir=in_workspace / "resumed",
        metrics_out=in_workspace / "r.json",
        history_out=in_workspace / "r.csv",
        plots_dir=in_workspace / "rplots",
        cache_dir=in_workspace / ".cache" / "resume",
    )
    tokenizer = params_for(TokenizerParams, **read_params("params.yaml")["tokenizer"])
    original = tracking.MlflowCallback.on_step_end

    def crash_after_the_step_8_state(self, state, metrics) -> None:
        original(self, state, metrics)
        if state.step == 10:
            raise KeyboardInterrupt  # as a kill would: the state of step 8 is on disk

    with monkeypatch.context() as patch:
        patch.setattr(tracking.MlflowCallback, "on_step_end", crash_after_the_step_8_state)
        with pytest.raises(KeyboardInterrupt):
            tune.preference_tune(tune_params(), tokenizer_params=tokenizer, **paths)
    assert paths["cache_dir"].is_dir() and not paths["out_dir"].exists()
    metrics = tune.preference_tune(tune_params(), tokenizer_params=tokenizer, **paths)
    resumed, uninterrupted = load_file(paths["out_dir"] / "model.safetensors"), load_file(tuned / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys() and all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    reference = json.loads((in_workspace / "reports" / "tune.json").read_text())
    assert all(metrics[k] == reference[k] for k in ("val_loss", "val_reward_margin", "train_preference_accuracy"))
    assert paths["history_out"].read_text() == (in_workspace / "plots" / "tune.csv").read_text()


def test_lora_trains_adapters_only_and_saves_a_plain_model(prepared: Path, in_workspace: Path) -> None:
    params = tune_params().model_copy(update={"trainable": "lora", "epochs": 1})
    tokenizer = params_for(TokenizerParams, **read_params("params.yaml")["tokenizer"])
    metrics = tune.preference_tune(
        params,
        tokenizer_params=tokenizer,
        instruct_dir=in_workspace / "models" / "instruct",
        data_dir=prepared,
        out_dir=in_workspace / "lora",
        metrics_out=in_workspace / "l.json",
        history_out=in_workspace / "l.csv",
        plots_dir=in_workspace / "lplots",
        cache_dir=in_workspace / ".cache" / "lora",
    )
    base = load_file(in_workspace / "models" / "instruct" / "model.safetensors")
    tuned = load_file(in_workspace / "lora" / "model.safetensors")
    assert tuned.keys() == base.keys()  # adapters merged: the plain layout
    assert metrics["trainable_parameters"] < sum(t.numel() for t in base.values()) // 10
    assert torch.equal(tuned["tok_emb.weight"], base["tok_emb.weight"])  # outside the adapters: frozen
    assert not torch.equal(tuned["trf_blocks.0.att.qkv.weight"], base["trf_blocks.0.att.qkv.weight"])


def test_a_bad_pair_stops_dpo_with_one_line_and_no_model(prepared: Path, in_workspace: Path) -> None:
    broken = in_workspace / "broken"
    broken.mkdir()
    for split in ("train", "validation"):
        (broken / f"{split}.json").write_text((prepared / f"{split}.json").read_text())
    entries = json.loads((broken / "validation.json").read_text())
    entries[1]["chosen"] = None
    (broken / "validation.json").write_text(json.dumps(entries))
    with pytest.raises(SystemExit) as exc:
        tune.main(tune_argv(out="models/broken", metrics="reports/broken.json") + ["--data", "broken"])
    assert str(exc.value.code) == (
        "preference_tune: error: broken/validation.json: entry 1 field 'chosen': Input should be a valid string"
    )
    assert not (in_workspace / "models" / "broken").exists() and not (in_workspace / "reports" / "broken.json").exists()


# ---- scoring


def test_score_preference_compares_sft_and_dpo_on_the_same_pairs(tuned: Path, in_workspace: Path) -> None:
    import mlflow

    score.main(["--params", "params.yaml", "--metrics", "reports/pref.json", "--headline", "metrics/pref.json"])
    report = json.loads((in_workspace / "reports" / "pref.json").read_text())
    headline = json.loads((in_workspace / "metrics" / "pref.json").read_text())
    assert report["test"]["pairs"] == 4 and report["val"]["pairs"] == 2 and report["beta"] == 0.5
    assert set(headline) == {"sft", "dpo", "dpo_minus_sft"}
    assert set(headline["sft"]) == {
        "val_preference_accuracy",
        "test_preference_accuracy",
        "test_preference_accuracy_ci_low",
        "test_preference_accuracy_ci_high",
    }
    assert {"test_preference_accuracy", "test_reward_margin", "test_reward_accuracy"} <= set(headline["dpo"])
    assert headline["sft"]["test_preference_accuracy"] == round(report["test"]["sft"]["preference_accuracy"], 6)
    for model in ("sft", "dpo"):  # Wilson's interval around each accuracy
        low, high = (headline[model][f"test_preference_accuracy_ci_{b}"] for b in ("low", "high"))
        assert 0 <= low <= headline[model]["test_preference_accuracy"] <= high <= 1 and high - low > 0.2  # 4 pairs
    paired = headline["dpo_minus_sft"]  # on the same 4 test pairs
    assert paired["test_preference_accuracy"] == pytest.approx(
        headline["dpo"]["test_preference_accuracy"] - headline["sft"]["test_preference_accuracy"], abs=1e-5
    )
    assert (
        paired["test_preference_accuracy_ci_low"]
        <= paired["test_preference_accuracy"]
        <= paired["test_preference_accuracy_ci_high"]
        and 0 < paired["test_mcnemar_p"] <= 1
    )
    # The DPO model against the SFT model it started from: rewards are their log-prob differences.
    test = report["test"]["dpo"]
    assert math.isclose(test["reward_margin"], test["chosen_reward"] - test["rejected_reward"], abs_tol=1e-6)
    assert math.isclose(
        test["reward_margin"], test["logprob_margin"] - report["test"]["sft"]["logprob_margin"], abs_tol=1e-5
    )
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("preference-gpt", "champion")
    run = client.get_run(champion.run_id)
    assert run.data.tags["stage"] == "preference_tune"
    assert run.data.metrics["sft_test_preference_accuracy"] == headline["sft"]["test_preference_accuracy"]
    # The registry chose on the validation pairs (n2), never on test.
    (key,) = [k for k in champion.tags if k.startswith("eval.validation.n2.") and k.endswith(".preference_accuracy")]
    assert champion.tags[key] == f"{report['val']['dpo']['preference_accuracy']:.6g}"
    assert not any(k.startswith("eval.test") for k in champion.tags)


def test_the_dpo_model_is_scored_by_the_instruction_scoring_into_its_own_run(tuned: Path, in_workspace: Path) -> None:
    import mlflow

    with pytest.warns(RuntimeWarning, match="LLM judge unavailable"):
        score_instructions.main(
            [
                "--params",
                "params.yaml",
                "--model",
                "models/preference",
                "--test",
                "instructions/test.json",
                "--responses",
                "out/dpo_responses.json",
                "--metrics",
                "out/dpo.json",
                "--headline",
                "out/dpo_headline.json",
            ]
        )
    metrics = json.loads((in_workspace / "out" / "dpo.json").read_text())
    assert metrics["n_entries"] == 3 and 0 <= metrics["rouge_l_f1"] <= 1
    from llmpipe.tracking import training_run_of

    run = training_run_of(tuned)  # the DPO run that wrote these weights holds their ROUGE-L now
    assert run.data.tags["stage"] == "preference_tune" and run.data.metrics["rouge_l_f1"] == metrics["rouge_l_f1"]
    client = mlflow.MlflowClient()
    assert not client.search_model_versions("name = 'instruct-gpt'")  # the SFT model's registry is untouched


def test_score_preference_without_a_dpo_model_says_so(prepared: Path, in_workspace: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        score.main(
            [
                "--params",
                "params.yaml",
                "--model",
                "models/missing",
                "--metrics",
                "reports/x.json",
                "--headline",
                "metrics/x.json",
            ]
        )
    assert str(exc.value.code).startswith("score_preference: error: base model models/missing not found")
    assert not (in_workspace / "metrics" / "x.json").exists()


def test_the_dpo_model_is_served_as_an_instruction_model(tuned: Path) -> None:
    from serving.models import GENERATOR, load_served

    served = load_served(str(tuned), GENERATOR)
    assert served.prompt_style == read_checkpoint_meta(tuned)["prompt_style"] == "alpaca"
    assert served.card()["context_length"] == 128
