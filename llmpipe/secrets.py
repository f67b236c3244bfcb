"""Secrets stay out of params, tags, logs and artifacts: URLs are written with their credentials
redacted, and the judge's API key comes from the environment only."""

from __future__ import annotations

import os
import re

JUDGE_API_KEY_ENV = "LLMPIPE_JUDGE_API_KEY"  # sent to the judge as "Authorization: Bearer <key>"
REDACTED = "***"
# scheme://user:password@host -> scheme://***@host
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@'\"]+@")
# ?api_key=...&token=... -> ?api_key=***&token=***
_QUERY_SECRET = re.compile(
    r"(?i)([?&;](?:api[_-]?key|apikey|key|token|access[_-]?token|auth|password|passwd|secret|signature|sig)=)[^&;#\s'\"]+"
)


def redact(text: str) -> str:
    """``text`` with every URL's userinfo and secret-looking query values replaced by ``***``."""
    return _QUERY_SECRET.sub(rf"\g<1>{REDACTED}", _USERINFO.sub(rf"\g<1>{REDACTED}@", text))


def judge_api_key() -> str | None:
    return os.environ.get(JUDGE_API_KEY_ENV) or None
