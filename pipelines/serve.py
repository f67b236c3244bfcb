"""Serve a pipeline flow on a schedule: ``python -m pipelines.serve --cron "0 3 * * *"``.

Creates a deployment on the Prefect server named by ``PREFECT_API_URL`` and runs its scheduled
(and UI-triggered) runs from this process, in the current directory, until stopped. A real
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        sys.exit("serve: error: set PREFECT_API_URL to a running Prefect server (prefect server start); "
                 "the temporary per-process server has no scheduler")
    if not Path("dvc.yaml").is_file():
        sys.exit("serve: error: no dvc.yaml here; run from the repository root")
    if args.offline:
        use_offline_mirror()

    from prefect.schedules import Cron, Interval

    from pipelines.flows import llm_pipeline

    schedule = Cron(args.cron, timezone=args.timezone) if args.cron else Interval(args.interval)
    # One run at a time: DVC locks the repository, so overlapping runs would fail. The UI's Run
    # form offers the flow's parameters: pipeline, params overrides, experiment name.
    llm_pipeline.serve(name=args.name or f"{args.flow}-scheduled", schedule=schedule, limit=1,
                       parameters={"pipeline": args.flow})


if __name__ == "__main__":
    main()
