"""Serve a pipeline flow on a schedule: ``python -m pipelines.serve --cron "0 3 * * *"``.

Creates a deployment on the Prefect server named by ``PREFECT_API_URL`` and runs its scheduled
(and UI- or API-triggered) runs from this process until stopped. Each run works in a workspace of
its own (a clean checkout of the commit this checkout is at when serving starts, sharing its DVC
cache; ``pipelines/workspace.py``), so runs may overlap and none changes this checkout. A real
server is required: Prefect's temporary per-process server runs no scheduler.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipelines.dag import PIPELINES
from pipelines.run import use_offline_mirror


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Serve a pipeline flow with a cron or interval schedule.")
    parser.add_argument("--flow", choices=list(PIPELINES), default="all", help="the deployment's default pipeline")
    when = parser.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help='cron expression, e.g. "0 3 * * *" (03:00 daily)')
    when.add_argument("--interval", type=float, help="seconds between runs")
    parser.add_argument("--timezone", default="UTC", help="timezone of the cron schedule (default: %(default)s)")
    parser.add_argument("--name", default=None, help="deployment name (default: <flow>-scheduled)")
    parser.add_argument("--offline", action="store_true", help="runs use the input mirror ../shared/data")
    parser.add_argument("--limit", type=int, default=None, help="at most this many runs at once (default: no limit)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        sys.exit(
            "serve: error: set PREFECT_API_URL to a running Prefect server (prefect server start); "
            "the temporary per-process server has no scheduler"
        )
    if not Path("dvc.yaml").is_file():
        sys.exit("serve: error: no dvc.yaml here; run from the repository root")
    if args.offline:
        use_offline_mirror()
    from pipelines.workspace import WorkspaceError, resolve_revision, source_repository

    try:
        commit = resolve_revision(source_repository(), "HEAD")
    except WorkspaceError as exc:
        sys.exit(f"serve: error: {exc}")
    print(
        f"serve: runs check out commit {commit[:10]} (uncommitted changes here are not part of them)", file=sys.stderr
    )

    from prefect.schedules import Cron, Interval

    from pipelines.flows import llm_pipeline

    schedule = Cron(args.cron, timezone=args.timezone) if args.cron else Interval(args.interval)
    # The UI's Run form offers the flow's parameters: pipeline, params overrides, experiment
    # name, where (workspace) and revision (the commit served, by default).
    llm_pipeline.serve(
        name=args.name or f"{args.flow}-scheduled",
        schedule=schedule,
        limit=args.limit,
        parameters={"pipeline": args.flow, "revision": commit},
    )


if __name__ == "__main__":
    main()
