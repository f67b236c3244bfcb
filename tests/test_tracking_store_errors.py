"""A tracking store locked mid-run: one line naming the store, not MLflow's and SQLAlchemy's
tracebacks with SQL (LLMPIPE_DEBUG=1 keeps those loggers)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

LOCKED_MIDWAY = """
import sqlite3, sys
from llmpipe.tracking import TrackingError, check_store, tracking_errors
import mlflow
check_store("locked-store")                      # the stage's early check passes
lock = sqlite3.connect(sys.argv[1], timeout=0)   # then another process locks the file
lock.execute("BEGIN EXCLUSIVE")
try:
    with tracking_errors():
        with mlflow.start_run():
            mlflow.log_param("a", 1)
except TrackingError as exc:
    sys.exit(f"stage: error: {exc}")
"""


def test_a_store_locked_midway_is_one_line_without_tracebacks(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}", "PYTHONPATH": str(REPO)}
    env.pop("LLMPIPE_DEBUG", None)
    done = subprocess.run(
        [sys.executable, "-c", LOCKED_MIDWAY, str(db)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "[SQL:" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"stage: error: MLflow tracking store sqlite:///{db} (MLFLOW_TRACKING_URI) failed: "
        "(sqlite3.OperationalError) database is locked; check that it is reachable"
    )


@pytest.mark.parametrize("debug", ["", "1"])
def test_store_loggers_are_quiet_unless_debugging(debug: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from llmpipe import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    monkeypatch.setenv("LLMPIPE_DEBUG", debug)
    for name in tracking.STORE_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
    tracking.configure_tracking()
    levels = {logging.getLogger(name).level for name in tracking.STORE_LOGGERS}
    assert levels == ({logging.NOTSET} if debug else {logging.CRITICAL})
