"""The one command: ``python -m pipelines.run [--flow all|pretrain|spam|instructions] [--offline]``.

Runs the pipeline flow once, from the repository root. Without ``PREFECT_API_URL`` Prefect starts
a temporary local server for this process (seconds); with it, the run appears in that server's UI.
A second run with nothing changed is a no-op: DVC skips every stage. Without a Prefect server (and
without -S or --workspace) a run with nothing to do is told by one ``dvc status`` and never starts
Prefect: no temporary server for a run that would record nothing.
``-S finetune_classifier.lr=5e-4 -n lr-5e-4`` makes the run a named DVC experiment, as
``dvc exp run -S ... -n ...`` does. It runs in this checkout (models/ and metrics/ are updated
here); ``--workspace`` runs it in a clean checkout of ``--revision`` (default HEAD) of its own that
shares this checkout's DVC cache, saved as an experiment (``dvc exp apply NAME && dvc checkout``
brings its outputs here).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from llmpipe.params import load_yaml
from pipelines.dag import PIPELINES

START = time.perf_counter()

OFFLINE_MIRROR = Path("..") / "shared" / "data"
# Defaults for Prefect's temporary server, set before prefect is imported: no telemetry calls
# (offline machines wait on DNS for them), and a start-up timeout that tolerates a busy CPU.
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def use_offline_mirror(mirror: Path = OFFLINE_MIRROR, *, asked: bool = True) -> None:
    """Point downloads and the GPT-2 tokenizer at the mirror, unless already set. The mirror is tried
    before the upstream URL and every file is checked against its checksum (docs/data.md), so a
    mirror beside the checkout is used without being asked for (``asked``: ``--offline`` was given)."""
    if not mirror.is_dir():
        if asked:
            print(f"pipeline: --offline: no mirror at {mirror}, downloading from upstream", file=sys.stderr)
        return
    if not asked and "LLMPIPE_MIRROR" not in os.environ:
        print(f"pipeline: inputs from the mirror {mirror} first (checksums verified; --no-mirror: upstream only)")
    os.environ.setdefault("LLMPIPE_MIRROR", str(mirror.resolve()))
    if (mirror / "gpt2").is_dir():
        os.environ.setdefault("LLMCORE_GPT2_ENCODING_DIR", str((mirror / "gpt2").resolve()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run the DVC pipeline as a Prefect flow, tracked in MLflow.")
    parser.add_argument(
        "--flow",
        choices=list(PIPELINES),
        default="all",
        help="which pipeline: all stages, or a sub-pipeline and what it needs (default: %(default)s)",
    )
    parser.add_argument(
        "-S",
        "--set-param",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a params.yaml value (YAML syntax, as `dvc exp run -S`); makes the run a DVC experiment",
    )
    parser.add_argument("-n", "--name", default=None, help="the DVC experiment's name (with -S; default: generated)")
    parser.add_argument(
        "--workspace",
        action="store_true",
        help="run in a clean checkout of its own (as runs from the Prefect UI do), saved as a DVC experiment; "
        "this checkout is left untouched",
    )
    parser.add_argument(
        "--revision", default="", help="with --workspace: the git revision to check out (default: HEAD)"
    )
    mirror = parser.add_mutually_exclusive_group()
    mirror.add_argument(
        "--offline",
        action="store_true",
        help=f"use the input mirror {OFFLINE_MIRROR} (LLMPIPE_MIRROR, LLMCORE_GPT2_ENCODING_DIR); "
        "the default whenever it exists, and a warning when it does not",
    )
    mirror.add_argument(
        "--no-mirror", action="store_true", help=f"download from upstream only, even when {OFFLINE_MIRROR} exists"
    )
    args = parser.parse_args(argv)
    if args.revision and not args.workspace:
        parser.error("--revision needs --workspace (this checkout is never switched to another commit)")
    args.params = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"-S {item!r}: expected KEY=VALUE, e.g. -S finetune_classifier.lr=5e-4")
        args.params[key] = load_yaml(value)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.no_mirror:
        use_offline_mirror(asked=args.offline)
    if not Path("dvc.yaml").is_file():
        sys.exit("pipeline: error: no dvc.yaml here; run from the repository root")
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)

    try:
        report = None
        if not (args.params or args.workspace or os.environ.get("PREFECT_API_URL")):
            report = nothing_to_run(args.flow)
        if report is None:
            from pipelines.flows import llm_pipeline  # imports prefect: after its settings are in the environment

            report = llm_pipeline(
                pipeline=args.flow,
                params=args.params,
                experiment=args.name,
                where="workspace" if args.workspace else "in-place",
                revision=args.revision,
            )
    except Exception as exc:
        sys.exit(f"pipeline: error: {exc}")
    print_summary(args.flow, report)


def nothing_to_run(pipeline: str):
    """The report of a run of ``pipeline`` when DVC says every stage of it is up to date (what the
    flow reports then: every stage skipped, the metrics, no MLflow run); None when any changed."""
    from pipelines.dag import execution_order, read_dag
    from pipelines.stages import StageResult, dvc_status
    from pipelines.summary import PipelineReport, baseline_comparison, read_metrics

    if dvc_status(PIPELINES[pipeline]):
        return None
    order = execution_order(read_dag("."), PIPELINES[pipeline])
    return PipelineReport(
        flow=pipeline,
        results=[StageResult(stage, "skipped", 0.0) for stage in order],
        not_run=[],
        wall_s=time.perf_counter() - START,
        metrics=read_metrics("metrics"),
        mlflow_run_id="",
        mlflow_url="",
        baseline=baseline_comparison("."),
    )


def print_summary(flow: str, report) -> None:
    from pipelines.summary import baseline_line

    total = time.perf_counter() - START
    overhead = total - report.stage_s
    print(
        f"pipeline {flow}: ran {len(report.stages_by_status['ran'])} of {len(report.results)} stages; "
        f"{total:.1f} s in all, {report.stage_s:.1f} s inside dvc repro, "
        f"orchestration overhead {overhead:.1f} s ({overhead / total:.1%})"
        + (f"\n{comparison}" if (comparison := baseline_line(report.metrics, report.baseline)) else "")
        + (f"\nDVC experiment: {report.experiment}" if report.experiment else "")
        + (f"\nMLflow: {report.mlflow_url}" if report.mlflow_url else "\nMLflow: nothing ran, no run logged")
    )


if __name__ == "__main__":
    main()
