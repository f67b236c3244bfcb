"""Orchestration pieces without Prefect: stage order from a real dvc.yaml, DVC's verdicts, the summary."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.dag import PipelineError, execution_order, read_dag
from pipelines.stages import StageFailed, StageResult, dvc_status, repro_stage, stage_status
from pipelines.summary import PipelineReport, baseline_difference, read_metrics, render_markdown

REPO = Path(__file__).resolve().parents[1]


def touch_stage(out: str, *deps: str) -> dict:
    """A stage writing ``out`` from its deps with the shell alone (fast, no Python)."""
    cat = " ".join(deps) if deps else "/dev/null"
    return {"cmd": f"cat {cat} > {out} && echo {out} >> {out}", "deps": list(deps), "outs": [out]}


@pytest.fixture
def dvc_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A DVC repo (no git) whose dvc.yaml lists stages out of dependency order on purpose."""
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    stages = {
        "report": touch_stage("report.txt", "model.txt", "extra.txt"),
        "download": touch_stage("raw.txt"),
        "train": touch_stage("model.txt", "raw.txt"),
        "extra": touch_stage("extra.txt", "raw.txt"),
        "unrelated": touch_stage("other.txt"),
        "broken": {"cmd": "echo about to fail && echo 'bad input: raw.txt' >&2 && exit 3", "deps": ["raw.txt"]},
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_execution_order_is_topological_and_keeps_dvc_yaml_order_otherwise(dvc_repo: Path) -> None:
    dag = read_dag(dvc_repo)
    assert execution_order(dag) == ["download", "train", "extra", "report", "unrelated", "broken"]
    assert execution_order(dag, ["report"]) == ["download", "train", "extra", "report"]
    assert execution_order(dag, ["train", "unrelated"]) == ["download", "train", "unrelated"]
    with pytest.raises(PipelineError, match="'evaluate' is not in dvc.yaml"):
        execution_order(dag, ["evaluate"])


def test_stage_names_do_not_depend_on_the_current_directory(dvc_repo: Path, tmp_path_factory, monkeypatch) -> None:
    """A flow run in a workspace reads the workspace's dvc.yaml from the launching checkout: the
    stage names must be the ones ``dvc repro`` takes in the workspace, not paths from here."""
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    dag = read_dag(dvc_repo)
    assert execution_order(dag, ["report"]) == ["download", "train", "extra", "report"]
    result = repro_stage("download", {}, lambda line: None, cwd=dvc_repo)
    assert result.status == "ran" and (dvc_repo / "raw.txt").is_file()


def test_repro_stage_reports_what_dvc_did_and_fails_with_the_output_tail(dvc_repo: Path) -> None:
    lines: list[str] = []
    first = repro_stage("download", {}, lines.append)
    assert first.status == "ran" and (dvc_repo / "raw.txt").is_file()
    assert "Running stage 'download':" in lines
    assert repro_stage("download", {}, lines.append).status == "skipped"
    assert dvc_status(["download"]) == {}
    assert "train" in dvc_status(["report"])  # upstream of report, not run yet
    assert repro_stage("train", {}, lines.append).status == "ran"
    (dvc_repo / "model.txt").unlink()
    assert repro_stage("train", {}, lines.append).status == "cached"  # restored from DVC's run cache
    with pytest.raises(StageFailed, match=r"(?s)stage 'broken' failed.*about to fail.*bad input: raw.txt"):
        repro_stage("broken", {}, lines.append)


def test_stage_env_reaches_the_stage(dvc_repo: Path) -> None:
    stages = yaml.safe_load((dvc_repo / "dvc.yaml").read_text())["stages"]
    stages["env"] = {
        "cmd": "echo parent=$LLMPIPE_MLFLOW_PARENT_RUN_ID python=$(command -v python) > env.txt",
        "outs": ["env.txt"],
    }
    (dvc_repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    repro_stage("env", {"LLMPIPE_MLFLOW_PARENT_RUN_ID": "abc123"}, lambda line: None)
    text = (dvc_repo / "env.txt").read_text()
    assert "parent=abc123" in text
    # DVC runs `python -m steps.x` through the shell: it must be this interpreter's python.
    assert f"python={Path(sys.executable).parent}" in text


def test_stage_status_needs_a_dvc_verdict() -> None:
    assert stage_status("tokenize", ["Stage 'tokenize' didn't change, skipping"]) == "skipped"
    assert stage_status("tokenize", ["Running stage 'tokenize':"]) == "ran"
    with pytest.raises(PipelineError, match="could not tell"):
        stage_status("tokenize", ["Running stage 'tokenize_more':"])


def test_read_metrics_flattens_numbers_of_every_metrics_file(tmp_path: Path) -> None:
    (tmp_path / "evaluate.json").write_text(
        json.dumps({"val_loss": 5.25, "perplexity": {"val": 190.6}, "ok": True, "note": "x"})
    )
    (tmp_path / "score_spam.json").write_text(json.dumps({"test_accuracy": 0.9, "n": 300, "per_class": [1, 2]}))
    assert read_metrics(tmp_path) == {
        "evaluate.val_loss": 5.25,
        "evaluate.perplexity.val": 190.6,
        "score_spam.test_accuracy": 0.9,
        "score_spam.n": 300,
    }
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        read_metrics(tmp_path)


def make_report(**overrides) -> PipelineReport:
    values = dict(
        flow="spam",
        results=[
            StageResult("download_spam", "skipped", 0.6),
            StageResult("finetune_classifier", "ran", 30.0),
            StageResult("build_spam_dataset", "cached", 1.4),
        ],
        not_run=[],
        wall_s=40.0,
        metrics={"score_spam.test_accuracy": 0.953333, "spam_data.train_rows": 1045},
        mlflow_run_id="abc",
        mlflow_url="http://mlflow:5000/#/experiments/1/runs/abc",
    )
    return PipelineReport(**{**values, **overrides})


def test_summary_markdown_lists_stages_timing_metrics_and_the_mlflow_link() -> None:
    report = make_report()
    assert report.stages_by_status == {
        "ran": ["finetune_classifier"],
        "cached": ["build_spam_dataset"],
        "skipped": ["download_spam"],
    }
    assert report.overhead_s == pytest.approx(8.0)
    text = render_markdown(report)
    assert text.startswith("# Pipeline `spam`: completed")
    assert "[abc](http://mlflow:5000/#/experiments/1/runs/abc)" in text
    assert "| download_spam | up to date, skipped | 0.6 |" in text
    assert "| finetune_classifier | ran | 30.0 |" in text
    assert "Ran: finetune_classifier. Up to date: 1, restored from run cache: 1." in text
    assert "orchestration overhead 8.0 s (20.0%)" in text
    assert "| score_spam.test_accuracy | 0.9533 | |" in text and "| spam_data.train_rows | 1045 | |" in text
    with_ci = render_markdown(
        make_report(
            metrics={
                "spam.test_accuracy": 0.96,
                "spam.test_accuracy_ci_low": 0.93139,
                "spam.test_accuracy_ci_high": 0.97697,
            }
        )
    )
    assert "| spam.test_accuracy | 0.96 | [0.9314, 0.977] |" in with_ci and "ci_low" not in with_ci


def test_summary_states_the_llm_minus_baseline_difference_when_both_headlines_exist() -> None:
    both = {"spam.test_accuracy": 0.96, "baseline.baseline_test_accuracy": 0.9733333}
    assert baseline_difference(both) == pytest.approx(-1.33)
    text = render_markdown(make_report(metrics=both))
    assert (
        "**LLM − baseline: −1.3 points (no per-example predictions: no interval) (test accuracy: GPT classifier "
        "96.00%, TF-IDF baseline 97.33%)**"
    ) in text
    ahead = render_markdown(make_report(metrics={**both, "spam.test_accuracy": 0.99}))
    assert "LLM − baseline: +1.7 points" in ahead
    alone = render_markdown(make_report(metrics={"spam.test_accuracy": 0.96}))
    assert baseline_difference({"spam.test_accuracy": 0.96}) is None and "baseline" not in alone


def test_summary_markdown_of_a_failed_run_shows_the_error_and_what_did_not_run() -> None:
    failure = "stage 'finetune_classifier' failed (dvc repro exit 255) after 3.0 s:\nValueError: bad"
    text = render_markdown(
        make_report(
            results=[StageResult("download_spam", "ran", 2.0)],
            not_run=["finetune_classifier", "score_spam"],
            metrics={},
            failure=failure,
        )
    )
    assert text.startswith("# Pipeline `spam`: failed: stage 'finetune_classifier' failed")
    assert "| score_spam | not run | |" in text
    assert "ValueError: bad" in text and "## Metrics" not in text


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module.split(".")[0])
    return modules


@pytest.mark.parametrize("package", ["steps", "steps/data", "llmpipe", "llmcore"])
def test_stage_code_never_imports_prefect(package: str) -> None:
    """Each stage is its own process: importing prefect there would cost seconds per stage."""
    offenders = [p.name for p in sorted((REPO / package).glob("*.py")) if "prefect" in imported_modules(p)]
    assert offenders == []


def test_offline_mirror_is_used_only_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.run import use_offline_mirror

    for key in ("LLMPIPE_MIRROR", "LLMCORE_GPT2_ENCODING_DIR"):
        monkeypatch.delenv(key, raising=False)
    use_offline_mirror(tmp_path / "missing")
    assert "LLMPIPE_MIRROR" not in os.environ
    (tmp_path / "mirror" / "gpt2").mkdir(parents=True)
    use_offline_mirror(tmp_path / "mirror", asked=False)  # the README's plain command: a mirror beside is used
    assert os.environ["LLMPIPE_MIRROR"] == str(tmp_path / "mirror")
    assert os.environ["LLMCORE_GPT2_ENCODING_DIR"] == str(tmp_path / "mirror" / "gpt2")


def test_no_mirror_downloads_from_upstream_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines import run

    for key in ("LLMPIPE_MIRROR", "LLMCORE_GPT2_ENCODING_DIR"):
        monkeypatch.delenv(key, raising=False)
    used = []
    monkeypatch.setattr(run, "use_offline_mirror", lambda *a, **k: used.append(k))
    monkeypatch.chdir(tmp_path)  # no dvc.yaml: main stops right after the mirror choice
    for argv, expected in (([], [{"asked": False}]), (["--offline"], [{"asked": True}]), (["--no-mirror"], [])):
        used.clear()
        with pytest.raises(SystemExit, match="no dvc.yaml here"):
            run.main(argv)
        assert used == expected, argv
    with pytest.raises(SystemExit):
        run.parse_args(["--offline", "--no-mirror"])


def test_a_run_with_nothing_to_do_never_starts_prefect(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a Prefect server, an up-to-date pipeline is told by one `dvc status`: no temporary
    server, no MLflow or torch import, the same summary as the flow's no-op run."""
    from pipelines.run import nothing_to_run

    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    stages = {"download": touch_stage("raw.txt"), "train": touch_stage("model.txt", "raw.txt")}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    assert nothing_to_run("all") is None  # nothing ran yet: the flow runs
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], cwd=tmp_path, check=True)
    probe = (
        "import sys; from pipelines.run import main; main([])\n"
        "print(sorted(m for m in ('prefect', 'mlflow', 'torch') if m in sys.modules))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr
    summary, mlflow_line, imported = done.stdout.splitlines()
    assert summary.startswith("pipeline all: ran 0 of 2 stages;") and "orchestration overhead" in summary
    assert (mlflow_line, imported) == ("MLflow: nothing ran, no run logged", "[]")
