"""An LLM judge over Ollama's HTTP API that scores model responses 0-100 (book chapter 7.8).

The book asks Llama 3 (through Ollama) to score each response against the reference and
averages the integers it answers. Here the judge is optional: if the server cannot be reached
(or stops answering) the scores so far are kept and the rest are unscored, so scoring still
completes offline. An answer that is not an integer in 0..100 is asked again (with another seed,
since the judge is deterministic otherwise) and, if it never becomes one, that response is
unscored: such answers are counted and warned about with an example. ``required`` makes any
unscored response an error. Credentials come from ``$LLMPIPE_JUDGE_API_KEY`` (a bearer token),
never from the URL in params; every URL in a message is written with its secrets redacted.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import requests
from pydantic import Field, field_validator
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from llmcore.prompts import prompt_text, reference
from llmpipe.params import StrictModel
from llmpipe.secrets import judge_api_key, redact

_SCORE = re.compile(r"\s*(\d{1,3})\s*\.?\s*")


# A URL without user:password@ (requests would send Basic auth instead of the bearer key): checked
# by the validator below, and written into the JSON Schema so the check_params stage refuses it too.
_NO_USERINFO = {
    "pattern": r"^[Hh][Tt][Tt][Pp][Ss]?://[^@/?#]*([/?#].*)?$",
    "description": "an http(s) URL with no user:password@ in it (the key comes from LLMPIPE_JUDGE_API_KEY)",
}


class JudgeParams(StrictModel):
    url: str = Field(json_schema_extra=_NO_USERINFO)  # Ollama's default address
    model: str  # the book used Llama 3 8B
    required: bool  # true: an unreachable judge fails the stage
    retries: int = Field(ge=0)  # extra asks when an answer is not an integer 0..100
    connect_retries: int = Field(ge=0)  # urllib3 Retry for connection errors and 429/5xx
    backoff_factor: float = Field(ge=0)
    connect_timeout_s: float = Field(gt=0)
    read_timeout_s: float = Field(gt=0)
    seed: int
    num_ctx: int = Field(gt=0)

    @field_validator("url", mode="before")
    @classmethod
    def _no_credentials(cls, url: object) -> object:
        if isinstance(url, str) and urlsplit(url).scheme.lower() not in ("http", "https"):
            raise ValueError("must be an http(s) URL")
        if isinstance(url, str) and urlsplit(url).username is not None:
            raise ValueError(
                "holds credentials (user:password@): remove them and put the key in "
                "LLMPIPE_JUDGE_API_KEY (sent as a bearer token)"
            )
        return url


class JudgeUnavailableError(RuntimeError):
    """The judge server could not be reached or refused the request."""


def judge_prompt(entry: Mapping, response: str) -> str:
    """The book's scoring prompt (a chat's input: its turns before the answer)."""
    return (
        f"Given the input `{prompt_text(entry)}` "
        f"and correct output `{reference(entry)}`, "
        f"score the model response `{response}`"
        f" on a scale from 0 to 100, where 100 is the best score. "
        f"Respond with the integer number only."
    )


def parse_score(answer: str) -> int | None:
    """The integer 0..100 the judge answered, or None when it answered anything else."""
    match = _SCORE.fullmatch(answer)
    if match is None:
        return None
    value = int(match.group(1))
    return value if value <= 100 else None


def chat_url(base: str) -> str:
    """``base`` with ``/api/chat`` appended to its path (its query string, if any, kept after it)."""
    parts = urlsplit(base)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/api/chat"))


class OllamaJudge:
    """``POST {url}/api/chat`` with deterministic options; one pooled session with retries."""

    def __init__(self, params: JudgeParams):
        self.params = params
        self.session = requests.Session()
        retry = Retry(
            total=params.connect_retries,
            connect=params.connect_retries,
            read=params.connect_retries,
            status=params.connect_retries,
            status_forcelist=(429, 500, 502, 503, 504),
            allowed_methods=frozenset({"POST"}),  # asking for a score again is harmless
            backoff_factor=params.backoff_factor,
            raise_on_status=False,
        )
        self.session.mount("http://", HTTPAdapter(max_retries=retry))
        self.session.mount("https://", HTTPAdapter(max_retries=retry))
        if key := judge_api_key():
            self.session.headers["Authorization"] = f"Bearer {key}"
        self.last_unusable: str | None = None  # the last answer that was no score (for the warning)

    def ask(self, prompt: str, seed: int) -> str:
        """The judge's answer text; JudgeUnavailableError when there is no usable HTTP answer."""
        url = chat_url(self.params.url)
        shown = redact(url)
        payload = {
            "model": self.params.model,
            "messages": [{"role": "user", "content": prompt}],
            "stream": False,
            "options": {"seed": seed, "temperature": 0, "num_ctx": self.params.num_ctx},
        }
        try:
            reply = self.session.post(
                url, json=payload, timeout=(self.params.connect_timeout_s, self.params.read_timeout_s)
            )
        except requests.RequestException as exc:
            raise JudgeUnavailableError(
                f"judge at {shown} unreachable ({type(exc).__name__}: {redact(str(exc))})"
            ) from exc
        if reply.status_code != 200:
            detail = reply.text[:200].strip()
            hint = f" (is it pulled? `ollama pull {self.params.model}`)" if reply.status_code == 404 else ""
            raise JudgeUnavailableError(f"judge at {shown} answered HTTP {reply.status_code}: {detail}{hint}")
        try:
            content = reply.json()["message"]["content"]
        except (ValueError, KeyError, TypeError):
            return reply.text  # not Ollama's JSON: treated like any unparsable answer
        return content if isinstance(content, str) else str(content)

    def score(self, entry: Mapping[str, str], response: str) -> int | None:
        """A score 0..100, asking up to ``1 + retries`` times; None when no answer parsed."""
        prompt = judge_prompt(entry, response)
        for attempt in range(1 + self.params.retries):
            answer = self.ask(prompt, seed=self.params.seed + attempt)
            score = parse_score(answer)
            if score is not None:
                return score
        self.last_unusable = answer
        return None

    def close(self) -> None:
        self.session.close()


@dataclass
class JudgeResult:
    scores: list[int | None]  # per response; None = unscored
    available: bool = True  # False once the server could not be reached
    error: str | None = None
    n_unusable: int = 0  # responses whose every answer was no integer 0..100
    unusable_example: str | None = None

    @property
    def n_unreachable(self) -> int:
        """Responses left unscored because the judge could not be asked."""
        return len(self.scores) - self.n_scored - self.n_unusable

    @property
    def n_scored(self) -> int:
        return sum(s is not None for s in self.scores)

    @property
    def mean_score(self) -> float | None:
        scored = [s for s in self.scores if s is not None]
        return sum(scored) / len(scored) if scored else None


def judge_responses(entries: Sequence[Mapping[str, str]], responses: Sequence[str], params: JudgeParams) -> JudgeResult:
    """Score every response; stops asking (and warns) once the judge is unreachable.

    Raises JudgeUnavailableError instead when ``params.required`` is set.
    """
    judge = OllamaJudge(params)
    result = JudgeResult(scores=[None] * len(responses))
    try:
        for i, (entry, response) in enumerate(zip(entries, responses, strict=True)):
            try:
                result.scores[i] = judge.score(entry, response)
            except JudgeUnavailableError as exc:
                if params.required:
                    raise JudgeUnavailableError(f"{exc} (score_instructions.judge.required is true)") from exc
                result.available, result.error = False, str(exc)
                message = (
                    f"LLM judge unavailable after {i} of {len(responses)} responses: {exc}. "
                    "Judge scores are left out; start Ollama with the judge model "
                    f"(`ollama serve`, `ollama pull {params.model}`) to get them."
                )
                warnings.warn(message, RuntimeWarning, stacklevel=2)
                break
            if result.scores[i] is None:
                result.n_unusable += 1
                result.unusable_example = judge.last_unusable
    finally:
        judge.close()
    _report_unusable(result, params)
    return result


def _report_unusable(result: JudgeResult, params: JudgeParams) -> None:
    """Answers that never became a score: a warning with an example, or an error when required."""
    if not result.n_unusable:
        return
    message = (
        f"LLM judge {params.model}: {result.n_unusable} of {len(result.scores)} responses unscored, "
        f"its answers were no integer 0..100 after {1 + params.retries} asks "
        f"(e.g. {(result.unusable_example or '')[:120]!r})"
    )
    if params.required:
        raise JudgeUnavailableError(f"{message} (score_instructions.judge.required is true)")
    warnings.warn(message, RuntimeWarning, stacklevel=3)
