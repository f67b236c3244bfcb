"""Background servers with pid files and logs, and waiting until they answer."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from stack.settings import StackConfig, StackError


def pid_file(config: StackConfig, name: str) -> Path:
    return config.run / f"{name}.pid"


def log_file(config: StackConfig, name: str) -> Path:
    return config.logs / f"{name}.log"


def is_running(pid: int) -> bool:
    """The process exists and is not a zombie (a child that exited but was not reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def running_pid(config: StackConfig, name: str) -> int | None:
    """The pid in ``name``'s pid file if that process still runs (else None, and the stale file goes)."""
    path = pid_file(config, name)
    try:
        pid = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    if is_running(pid):
        return pid
    path.unlink(missing_ok=True)
    return None


def spawn(config: StackConfig, name: str, argv: Sequence[str], env: Mapping[str, str], cwd: Path | None = None) -> int:
    """Start ``argv`` in its own session (it outlives ``llm stack up``), output appended to its log."""
    config.logs.mkdir(parents=True, exist_ok=True)
    config.run.mkdir(parents=True, exist_ok=True)
    log = log_file(config, name)
    with open(log, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}: {argv[0]}\n".encode())
        out.flush()
        try:
            proc = subprocess.Popen(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise StackError(f"{name}: cannot start {argv[0]}: {exc.strerror}") from None
    pid_file(config, name).write_text(f"{proc.pid}\n")
    return proc.pid


def terminate(pids: Mapping[str, int], timeout_s: float = 40.0) -> list[str]:
    """SIGTERM to every process (their whole session), wait for all, SIGKILL those left after
    ``timeout_s``; returns the names that had to be killed."""
    for pid in pids.values():
        with _ignore_gone():
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(is_running(pid) for pid in pids.values()):
        time.sleep(0.2)
    killed = [name for name, pid in pids.items() if is_running(pid)]
    for name in killed:
        with _ignore_gone():
            os.killpg(pids[name], signal.SIGKILL)
    return killed


class _ignore_gone:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        return kind is not None and issubclass(kind, ProcessLookupError)


def wait_until(name: str, check: Callable[[], bool], timeout_s: float, log: Path, pid: int | None = None) -> float:
    """Poll ``check`` until it returns True; a one-line error naming the service and its log when
    it does not within ``timeout_s`` or its process exits first. Returns the seconds waited."""
    start = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - start
        except StackError:  # a verdict of the check itself (a worker that exited)
            raise
        except Exception:  # not answering yet: connection refused, 503, not ready
            pass
        if pid is not None and not is_running(pid):
            raise StackError(f"{name} exited before answering (log: {log})")
        if time.monotonic() - start > timeout_s:
            raise StackError(f"{name} did not come up within {timeout_s:.0f} s (log: {log})")
        time.sleep(0.3)
