"""One warning when a fast path gives way to a slower one (a kernel that cannot be built, a step
that cannot be compiled): what is used instead, and the first line of the reason."""

from __future__ import annotations

import warnings


def warn_fallback(message: str, exc: BaseException, *, stacklevel: int = 2) -> None:
    """``RuntimeWarning``: ``message``, then the first line of ``exc`` (no traceback: it is expected)."""
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    warnings.warn(f"{message}: {first_line}", RuntimeWarning, stacklevel=stacklevel + 1)
