"""`llm compare` and the pipeline's LLM − baseline line: paired tests on real per-example predictions.

Real models on the real SMS data (the mirror's, split as the pipeline splits it): the TF-IDF
baseline trained with two seeds of one configuration is "not significant", the same model with a
deliberately broken configuration (C = 1e-5: almost no fit; 94% instead of 97%) is flagged as
significantly worse; the printed figures equal statsmodels' McNemar test on the same table.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pandas as pd
import pytest
from statsmodels.stats.contingency_tables import mcnemar

from cli import llm as cli
from llmpipe.stats import ComparisonParams
from pipelines import compare
from pipelines.summary import baseline_comparison, baseline_line
from steps import baseline_spam as bl
from steps.build_spam_dataset import SpamDataParams, build_spam_dataset
from tests.params_values import params_for

GRID = {"classifier": ["linear_svm"], "C": [1.0]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, mirror: Path) -> dict[str, Path]:
    """The SMS data split as the pipeline does; three baseline runs' per-example predictions."""
    root = tmp_path_factory.mktemp("compare")
    with zipfile.ZipFile(mirror / "sms+spam+collection.zip") as archive:
        (root / "SMSSpamCollection").write_bytes(archive.read("SMSSpamCollection"))
    build_spam_dataset(
        params_for(SpamDataParams),
        source=root / "SMSSpamCollection",
        out_dir=root / "data",
        metrics_out=root / "spam_data.json",
    )
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    for name in ("LLMPIPE_MLFLOW_PARENT_RUN_ID", "LLMPIPE_MLFLOW_EXPERIMENT"):
        mp.delenv(name, raising=False)
    mp.chdir(root)
    out = {}
    try:
        configs = {
            "seed1": {"seed": 1},
            "seed2": {"seed": 2},
            "broken": {"seed": 1, "grid": {"classifier": ["linear_svm"], "C": [1e-5]}},
        }
        for name, update in configs.items():
            params = params_for(bl.BaselineParams, **{"grid": GRID, **update})
            bl.baseline_spam(
                params,
                data_dir=root / "data",
                metrics_out=root / name / "report.json",
                headline_out=root / name / "headline.json",
                predictions_out=root / name / "predictions.csv",
                comparison=params_for(ComparisonParams),
            )
            out[name] = root / name / "predictions.csv"
    finally:
        mp.undo()
    return out


def test_two_seeds_of_one_configuration_are_not_significant(runs: dict[str, Path]) -> None:
    result, lines = compare.compare(str(runs["seed1"]), str(runs["seed2"]), params=params_for(ComparisonParams))
    assert result.n == 300 and not result.significant()
    assert "not significant at 5%" in lines[3]
    assert result.interval.low <= 0 <= result.interval.high


def test_a_broken_configuration_is_significantly_worse_and_the_p_value_is_mcnemars(runs: dict[str, Path]) -> None:
    result, lines = compare.compare(str(runs["broken"]), str(runs["seed1"]), params=params_for(ComparisonParams))
    assert result.significant() and result.difference < 0 and result.interval.high < 0
    assert "A − B: −" in lines[3] and ": significant at 5%" in lines[3] and "McNemar p = " in lines[3]
    a = pd.read_csv(runs["broken"]).query("split == 'test'")["correct"].to_numpy()
    b = pd.read_csv(runs["seed1"]).query("split == 'test'")["correct"].to_numpy()
    table = [
        [int(((a == 1) & (b == 1)).sum()), int(((a == 1) & (b == 0)).sum())],
        [int(((a == 0) & (b == 1)).sum()), int(((a == 0) & (b == 0)).sum())],
    ]
    assert result.p_value == pytest.approx(mcnemar(table, exact=True).pvalue)
    assert result.difference == pytest.approx(a.mean() - b.mean())
    validation, _ = compare.compare(
        str(runs["broken"]), str(runs["seed1"]), split="validation", params=params_for(ComparisonParams)
    )
    assert validation.n == 149


def test_llm_compare_prints_the_verdict_and_fails_in_one_line(
    runs: dict[str, Path], capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no params.yaml: the comparison defaults
    assert cli.main(["compare", str(runs["seed1"]), str(runs["seed2"])]) == 0
    out = capsys.readouterr().out
    assert "accuracy on the test split, 300 paired examples" in out and "not significant at 5%" in out
    assert "(95% CI " in out
    assert cli.main(["compare", str(runs["seed1"]), "no-such-experiment"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llm compare: error: no-such-experiment: not a DVC experiment") and err.count("\n") == 1
    other = tmp_path / "other.csv"
    pd.read_csv(runs["seed2"]).iloc[:-5].to_csv(other, index=False)  # other examples: no pairing
    assert cli.main(["compare", str(runs["seed1"]), str(other)]) == 1
    assert "scored on different examples" in capsys.readouterr().err


def test_the_pipeline_line_states_the_gap_with_its_interval_and_p_value(runs: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "spam_predictions.csv").write_bytes(runs["broken"].read_bytes())  # stands for the LLM
    (tmp_path / "reports" / "baseline_predictions.csv").write_bytes(runs["seed1"].read_bytes())
    paired = baseline_comparison(tmp_path)
    llm = pd.read_csv(runs["broken"]).query("split == 'test'")["correct"].mean()
    base = pd.read_csv(runs["seed1"]).query("split == 'test'")["correct"].mean()
    metrics = {"spam.test_accuracy": llm, "baseline.baseline_test_accuracy": base}
    line = baseline_line(metrics, paired)
    points = f"{100 * (llm - base):+.1f}".replace("-", "−")
    assert line.startswith(f"LLM − baseline: {points} points, 95% CI [−") and "McNemar p = " in line
    assert "(significant)" in line
    assert baseline_comparison(tmp_path / "nowhere") is None
    assert "no per-example predictions" in baseline_line(metrics, None)
