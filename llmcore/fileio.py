"""Atomic writes: outputs go to a temp path beside the target and are renamed into place; a full
or read-only disk is reported naming the path being written (``writing``)."""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# What only a write can fail with: disk full, quota, file too large, read-only filesystem.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


class OutputWriteError(OSError):
    """Writing an output failed for want of space or a writable filesystem; ``filename`` is the
    output (never an input being read), ``strerror`` says what the OS said."""


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Report a write failure (``WRITE_ERRNOS``) inside the block as an OutputWriteError naming
    ``path``: ``file.write`` raises them with no file name, ``shutil.copyfile`` with the source's."""
    try:
        yield
    except OutputWriteError:
        raise
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        raise OutputWriteError(exc.errno, f"cannot write: {os.strerror(exc.errno)}", os.fspath(path)) from exc


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temp path beside ``target``; on success rename it onto ``target``, else delete it.

    With ``is_dir`` the yielded path is an empty directory that replaces ``target`` whole, so a
    reader never sees a half-written checkpoint directory. Temp paths a killed writer of the same
    target left behind are removed first.
    """
    target = Path(target)
    with writing(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp", dir=target.parent))
    if is_dir:  # mkdtemp makes it owner-only; give the directory the usual umask-based mode
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
    out = tmp if is_dir else tmp / target.name
    try:
        with writing(target):
            yield out
        if is_dir and target.exists():
            old = target.with_name(f".{target.name}.old{os.getpid()}")
            os.replace(target, old)
            os.replace(out, target)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            os.replace(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temps(target: Path) -> None:
    """Delete what an interrupted ``atomic_path`` of ``target`` left: its temp dirs and an old copy
    set aside for a directory swap (one writer per target: the stage that owns it)."""
    name = glob.escape(target.name)
    for stale in [*target.parent.glob(f".{name}.tmp*"), *target.parent.glob(f".{name}.old*")]:
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
