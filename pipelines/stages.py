"""One DVC stage as a subprocess: ``dvc repro --single-item <stage>``, output streamed line by line.

DVC alone decides whether the stage is up to date; we only read its verdict from what it
prints ("Running stage", "didn't change, skipping", "is cached - skipping run") so the run
summary can say which stages ran. No Prefect here: the flow wraps this in a task.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pipelines.dag import PipelineError

# DVC's own messages (dvc/stage/__init__.py, run.py, cache.py), checked in this order.
STATUS_MESSAGES = {
    "ran": "Running stage '{}'",
    "cached": "Stage '{}' is cached - skipping run",  # outputs restored from DVC's run cache
    "skipped": "Stage '{}' didn't change, skipping",
}
TAIL_LINES = 40
# A tqdm redraw ("train:  45%|####5     | 9/20 [00:03<00:04, 2.6step/s]"): the text stream turns
# each "\r" redraw into a line of its own, so they are thinned to one every PROGRESS_EVERY_S.
PROGRESS_LINE = re.compile(r"\d+%\|.*\| *\d+/\d+ \[")
PROGRESS_EVERY_S = 10.0


@dataclass(frozen=True)
class StageResult:
    stage: str
    status: str  # ran | cached | skipped
    seconds: float


class ProgressThrottle:
    """Passes every line on, except progress-bar redraws: the first, then at most one every
    ``every_s`` seconds, and the one that reaches 100% (a bar's end, with its final rate)."""

    def __init__(self, log: Callable[[str], None], every_s: float = PROGRESS_EVERY_S, clock=time.monotonic):
        self.log, self.every_s, self.clock = log, every_s, clock
        self.last_shown: float | None = None

    def __call__(self, line: str) -> None:
        if PROGRESS_LINE.search(line):
            now = self.clock()
            due = self.last_shown is None or now - self.last_shown >= self.every_s
            if not (due or "100%|" in line):
                return
            self.last_shown = now
        self.log(line)


class StageFailed(PipelineError):
    """``dvc repro`` of a stage exited non-zero; the message carries the end of its output."""


# MLflow's usage telemetry (on by default) starts a thread that, offline, fails and unsets its
# session variable in os.environ while the stage's own thread iterates os.environ for an HTTP call:
# seen as `API request ... failed with exception '_MLFLOW_TELEMETRY_SESSION_ID'` (a KeyError) in a
# stage against the MLflow server. Off unless the environment turns it on.
NO_TELEMETRY = {"MLFLOW_DISABLE_TELEMETRY": "true"}


def stage_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment of a stage: ours, unbuffered, this interpreter's bin first, plus ``extra``.

    DVC runs a stage's ``python -m steps.x`` through the shell, so without the venv activated
    PATH could name another python; putting ``sys.executable``'s directory first avoids that.
    Progress bars redraw every few seconds instead of ten times a second (each redraw is a line;
    ``ProgressThrottle`` thins them further for the log).
    """
    bin_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
    return {"TQDM_MININTERVAL": "5", **NO_TELEMETRY, **os.environ, "PATH": path, "PYTHONUNBUFFERED": "1", **extra}


def stage_status(stage: str, lines: list[str]) -> str:
    for status, message in STATUS_MESSAGES.items():
        needle = message.format(stage)
        if any(needle in line for line in lines):
            return status
    raise PipelineError(f"stage {stage!r}: could not tell from dvc's output whether it ran")


def dvc_status(targets: list[str] | None, cwd: str | os.PathLike = ".") -> dict:
    """``dvc status`` of the targets and everything upstream (all stages if None): {} if up to date."""
    command = [sys.executable, "-m", "dvc", "status", "--json"]
    if targets:
        command += ["--with-deps", *targets]
    done = subprocess.run(command, cwd=cwd, env=stage_env({}), capture_output=True, text=True)
    if done.returncode != 0:
        raise PipelineError(f"dvc status failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout or "{}")


def repro_stage(
    stage: str, extra_env: Mapping[str, str], log: Callable[[str], None], cwd: str | os.PathLike = "."
) -> StageResult:
    """Run ``dvc repro --single-item stage``, passing each output line to ``log``."""
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    start = time.perf_counter()
    verdict_lines: list[str] = []
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    show = ProgressThrottle(log)
    with subprocess.Popen(
        command,
        cwd=cwd,
        env=stage_env(extra_env),
        text=True,
        errors="replace",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        bufsize=1,
    ) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if not line:
                continue
            show(line)
            tail.append(line)
            if line.startswith(("Running stage", "Stage '")):
                verdict_lines.append(line)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        output = "\n".join(tail)
        raise StageFailed(f"stage {stage!r} failed (dvc repro exit {proc.returncode}) after {seconds:.1f} s:\n{output}")
    return StageResult(stage, stage_status(stage, verdict_lines), seconds)
