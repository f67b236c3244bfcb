"""A test run stopped with SIGTERM still tears its fixtures down (tests/conftest.py), so the
servers a fixture started (a team stack) do not outlive it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO

SLEEPER = """
import time
from pathlib import Path

import pytest

@pytest.fixture
def resource():
    yield
    Path({down!r}).write_text("torn down")

def test_sleeps(resource):
    Path({up!r}).write_text("running")
    time.sleep(120)
"""


def test_a_run_stopped_by_sigterm_still_tears_its_fixtures_down(tmp_path: Path) -> None:
    up, down = tmp_path / "up", tmp_path / "down"
    test_file = tmp_path / "test_sleeper.py"
    test_file.write_text(SLEEPER.format(up=str(up), down=str(down)))
    # This repository's conftest as a plugin; one process, no cache, nothing else from addopts.
    command = [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider"]
    command += ["-o", "addopts=", "-q", str(test_file)]
    run = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not up.exists():
            assert run.poll() is None, run.communicate()[0][-2000:]
            assert time.monotonic() < deadline, "the test in the child run never started"
            time.sleep(0.1)
        run.send_signal(signal.SIGTERM)
        output = run.communicate(timeout=60)[0]
    finally:
        run.kill()
    assert down.read_text() == "torn down", output[-2000:]
    assert run.returncode != 0 and "KeyboardInterrupt" in output
