"""Deploy the pipeline flow to a work pool: ``python -m pipelines.deploy --pool llm-process``.

The deployment's runs are executed by ``prefect worker start --pool llm-process`` (any number of
workers, on this machine or others with a checkout and the venv at the same path). The deployment
carries what a worker needs and would otherwise lack (job variables ``env``): the input mirror
(``LLMPIPE_MIRROR``, ``LLMCORE_GPT2_ENCODING_DIR``, with ``--offline``), the MLflow tracking URI
(the default relative sqlite file made absolute: this checkout's ``mlflow.db``) and the MLflow UI
address. Credentials never go there (job variables are shown in the UI): a worker gets them from
its own environment. Each run works in a workspace of its own at the commit deployed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

from pipelines.dag import PIPELINES
from pipelines.run import use_offline_mirror

ENTRYPOINT = "pipelines/flows.py:llm_pipeline"
WORKER_ENV = ("LLMPIPE_MIRROR", "LLMCORE_GPT2_ENCODING_DIR", "LLMPIPE_MLFLOW_UI_URL", "LLMPIPE_RUNS_DIR")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Deploy the pipeline flow to a Prefect work pool.")
    parser.add_argument("--pool", required=True, help="the work pool (created as a process pool if missing)")
    parser.add_argument("--flow", choices=list(PIPELINES), default="all", help="the deployment's default pipeline")
    parser.add_argument("--name", default=None, help="deployment name (default: <flow>-<pool>)")
    parser.add_argument("--cron", default=None, help='optional schedule, e.g. "0 3 * * *"')
    parser.add_argument("--timezone", default="UTC", help="timezone of the cron schedule (default: %(default)s)")
    parser.add_argument("--offline", action="store_true", help="runs use the input mirror ../shared/data")
    parser.add_argument(
        "--source",
        default=None,
        help="where workers get the code: this checkout (default; workers on this machine, or at the "
        "same path on others) or a git URL ending in .git that each run clones (workers anywhere; "
        "push the commit first; the experiment's ref is pushed back to it, the outputs to the DVC "
        "remote committed in .dvc/config)",
    )
    return parser.parse_args(argv)


def worker_env() -> dict[str, str]:
    """The job variables' ``env``: what a worker's flow run needs from this shell, no secrets."""
    from llmpipe.tracking import configure_tracking

    env = {name: os.environ[name] for name in WORKER_ENV if os.environ.get(name)}
    uri = configure_tracking()  # sqlite:///mlflow.db -> sqlite:////abs/checkout/mlflow.db
    if urlsplit(uri).password:
        print(
            "deploy: MLFLOW_TRACKING_URI holds a password: not stored in the deployment; give it to the workers",
            file=sys.stderr,
        )
    else:
        env["MLFLOW_TRACKING_URI"] = uri
    return env


def ensure_process_pool(pool: str) -> None:
    """Create ``pool`` as a process work pool unless it exists (of any type)."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
            print(f"deploy: created process work pool {pool}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        sys.exit("deploy: error: set PREFECT_API_URL to a running Prefect server (prefect server start)")
    if not Path("dvc.yaml").is_file():
        sys.exit("deploy: error: no dvc.yaml here; run from the repository root")
    if args.source and not urlsplit(args.source).path.rstrip("/").endswith(".git"):
        sys.exit(
            f"deploy: error: --source {args.source}: not a git URL ending in .git "
            "(Prefect would read it as a directory)"
        )
    if args.offline:
        use_offline_mirror()
    from pipelines.workspace import WorkspaceError, resolve_revision, source_repository

    try:
        source = source_repository()
        commit = resolve_revision(source, "HEAD")
    except WorkspaceError as exc:
        sys.exit(f"deploy: error: {exc}")

    from prefect import flow
    from prefect.schedules import Cron

    env = worker_env()
    code = args.source or str(source)
    if args.source:
        # A run's checkout is a clone that disappears with it: its experiment must reach the git
        # remote (`dvc exp push origin NAME`, origin being the URL cloned), or it is lost.
        env.update({"DVC_EXP_AUTO_PUSH": "true", "DVC_EXP_GIT_REMOTE": "origin"})
    ensure_process_pool(args.pool)
    name = args.name or f"{args.flow}-{args.pool}"
    deployment = flow.from_source(source=code, entrypoint=ENTRYPOINT).deploy(
        name=name,
        work_pool_name=args.pool,
        parameters={"pipeline": args.flow, "revision": commit},
        job_variables={"env": env},
        schedule=Cron(args.cron, timezone=args.timezone) if args.cron else None,
        build=False,
        push=False,
        print_next_steps=False,
    )
    print(
        f"deploy: llm-pipeline/{name} (id {deployment}) on pool {args.pool}, code from {code}, commit {commit[:10]}, "
        f"worker env: {', '.join(sorted(env)) or 'none'}"
    )
    print(f"deploy: start a worker: prefect worker start --pool {args.pool}")


if __name__ == "__main__":
    main()
