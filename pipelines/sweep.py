"""``llm sweep -S key=value ... --seeds 123,124,125``: one configuration over K seeds, as DVC experiments.

Each seed is a sequential ``dvc exp run -n NAME-s<seed> -S ... -S <seed key>=<seed>`` (so ``dvc exp
show`` lists them side by side, grouped by name). Every stage's MLflow run gets the tag
``sweep=NAME`` (filter the compare view with ``tags.sweep = 'NAME'``), and a summary run tagged
the same holds each headline metric's mean and sd across the seeds. The table printed at the end
shows each seed's headline metrics and mean ± sd, so a difference between two configurations can
be read against the seed-to-seed spread. Afterwards params.yaml is put back as it was (and
``dvc checkout`` restores its outputs); ``dvc exp apply NAME-s<seed>`` brings one seed back.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from llmpipe.stats import mean_sd

SWEEP_ENV = "LLMPIPE_SWEEP"  # llmpipe/tracking.py tags every stage run with it
DEFAULT_SEED_KEY = "finetune_classifier.seed"


class SweepError(Exception):
    """A bad option or a failed experiment; printed as one line."""


def sweep_name(overrides: Sequence[str]) -> str:
    """``finetune_classifier.lr=2e-3`` -> ``lr-2e-3``; no overrides: ``default``."""
    parts = []
    for item in overrides:
        key, _, value = item.partition("=")
        parts.append(f"{key.split('.')[-1]}-{value}")
    name = "_".join(parts) or "default"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise SweepError(f"--seeds: {text!r} is not a comma-separated list of integers") from exc
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise SweepError(f"--seeds: {text!r}: give at least two different seeds")
    return seeds


def run_seed(name: str, overrides: Sequence[str], seed_key: str, seed: int, sweep: str) -> None:
    """One ``dvc exp run`` in this workspace; its stages' MLflow runs tagged with the sweep."""
    command = ["dvc", "exp", "run", "-n", name, *[a for o in overrides for a in ("-S", o)], "-S", f"{seed_key}={seed}"]
    print(f"sweep {sweep}: {' '.join(command)}", flush=True)
    done = subprocess.run(command, env={**os.environ, SWEEP_ENV: sweep})
    if done.returncode != 0:
        raise SweepError(f"experiment {name} failed (dvc exp run exit {done.returncode}); the earlier seeds are saved")


def headline_keys(rows: dict[int, dict[str, float]], wanted: Sequence[str]) -> list[str]:
    if wanted:
        return list(wanted)
    keys = sorted({k for values in rows.values() for k in values})
    return [k for k in keys if "_ci_" not in k]


def table(sweep: str, rows: dict[int, dict[str, float]], keys: Sequence[str]) -> list[str]:
    """Each seed's metrics, then mean ± sd across seeds."""
    width = max(len(k) for k in keys)
    lines = [
        f"sweep {sweep}: {len(rows)} seeds",
        f"{'metric':<{width}}  " + "  ".join(f"s{s:<9}" for s in rows) + "  mean ± sd",
    ]
    for key in keys:
        values = [rows[s].get(key) for s in rows]
        mean, sd = mean_sd(values)
        cells = "  ".join(f"{v:<10.4f}" if v is not None else f"{'-':<10}" for v in values)
        lines.append(
            f"{key:<{width}}  {cells}  {mean:.4f} ± {sd:.4f}" if math.isfinite(mean) else f"{key:<{width}}  {cells}"
        )
    return lines


def log_summary(
    sweep: str, rows: dict[int, dict[str, float]], keys: Sequence[str], overrides: Sequence[str]
) -> str | None:
    """A run tagged ``sweep`` with each metric's mean and sd, in the experiment the seeds' runs went to."""
    import mlflow

    from llmpipe.tracking import configure_tracking, tracking_errors

    configure_tracking()
    with tracking_errors():
        client = mlflow.MlflowClient()
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = (
            client.search_runs(experiments, filter_string=f"tags.sweep = '{sweep}'", max_results=1)
            if experiments
            else []
        )
        if not runs:
            return None
        stats = {}
        for key in keys:
            mean, sd = mean_sd([rows[s].get(key) for s in rows])
            stats.update({f"{key}_mean": mean, f"{key}_sd": sd} if math.isfinite(sd) else {})
        with mlflow.start_run(
            experiment_id=runs[0].info.experiment_id,
            run_name=f"{sweep} (mean ± sd, {len(rows)} seeds)",
            tags={"sweep": sweep, "sweep_seeds": ",".join(map(str, rows)), "stage": "sweep"},
        ) as run:
            mlflow.log_params({"overrides": " ".join(overrides) or "(none)", "seeds": len(rows)})
            mlflow.log_metrics(stats)
        return run.info.run_id


def sweep(
    overrides: Sequence[str],
    seeds: Sequence[int],
    *,
    name: str | None = None,
    seed_key: str = DEFAULT_SEED_KEY,
    metrics: Sequence[str] = (),
    metrics_dir: Path = Path("metrics"),
) -> list[str]:
    from pipelines.summary import read_metrics

    base = name or sweep_name(overrides)
    rows: dict[int, dict[str, float]] = {}
    params_file = Path("params.yaml")
    before = params_file.read_text() if params_file.is_file() else None
    try:
        for seed in seeds:
            run_seed(f"{base}-s{seed}", overrides, seed_key, seed, base)
            rows[seed] = read_metrics(metrics_dir)  # the workspace holds the experiment just run
    finally:
        if before is not None and params_file.read_text() != before:  # the workspace as it was, not the last seed's
            params_file.write_text(before)
            subprocess.run(["dvc", "checkout", "--quiet"], check=False)
    keys = headline_keys(rows, metrics)
    lines = table(base, rows, keys)
    run_id = log_summary(base, rows, keys, overrides)
    lines.append(f"MLflow: runs tagged sweep={base}" + (f", summary run {run_id}" if run_id else ""))
    lines.append(f"dvc exp show: experiments {base}-s{seeds[0]} ... {base}-s{seeds[-1]}")
    return lines


def main(argv: Sequence[str] | None = None, prog: str = "llm sweep") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-S",
        "--set-param",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a params override, as dvc exp run -S (repeatable)",
    )
    parser.add_argument("--seeds", required=True, help="comma-separated seeds, e.g. 123,124,125")
    parser.add_argument("-n", "--name", help="the sweep's name (experiments NAME-s<seed>); default from the overrides")
    parser.add_argument(
        "--seed-key", default=DEFAULT_SEED_KEY, help="the params key the seed goes to (default: %(default)s)"
    )
    parser.add_argument(
        "--metric", action="append", default=[], help="headline metric to tabulate, e.g. spam.test_accuracy"
    )
    args = parser.parse_args(argv)
    try:
        bad = [o for o in args.overrides if "=" not in o]
        if bad:
            raise SweepError(f"-S {bad[0]!r}: expected KEY=VALUE")
        lines = sweep(
            args.overrides, parse_seeds(args.seeds), name=args.name, seed_key=args.seed_key, metrics=args.metric
        )
    except (SweepError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0
