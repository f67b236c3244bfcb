"""Download the pipeline's inputs: an offline mirror first, then the upstream URL, checked by sha256.

Each entry of ``sources`` in params.yaml names its upstream location, the sha256 of its bytes
(where upstream bytes are stable) and its output path. ``$LLMPIPE_MIRROR``, a directory or an
http(s) base URL holding byte copies, is tried first so the pipeline runs offline; the upstream
URL stays the reference. Every attempt writes into a temp path that is renamed onto the output
only once verified, so a failed, truncated or tampered download leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Annotated
from urllib.parse import quote, unquote, urlsplit

import requests
from pydantic import Field, field_validator, model_validator
from requests.adapters import HTTPAdapter
from urllib3.util import Retry

from llmpipe.cli import StageParams, run_stage
from llmpipe.io import atomic_path, sha256_file
from llmpipe.params import ParamsError, StrictModel, read_params, validate_section

MIRROR_ENV = "LLMPIPE_MIRROR"
# Transient server states worth retrying; anything else (404, 403, ...) fails at once.
RETRY_STATUSES = (429, 500, 502, 503, 504)
_CHUNK = 1 << 16

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class FetchError(RuntimeError):
    """A source could not be fetched, verified or extracted; the message names source and location."""


def location_kind(location: str) -> str:
    """``"http"`` for http(s) URLs, ``"path"`` for local paths; any other scheme is refused."""
    scheme = urlsplit(location).scheme.lower()
    if scheme in ("http", "https"):
        return "http"
    if not scheme:
        return "path"
    raise ValueError(f"unsupported scheme {scheme!r} in {location!r}: use an http(s) URL or a local path")


def is_safe_member(name: str) -> bool:
    """False for archive member names that could escape the extraction directory (zip-slip)."""
    path = PurePosixPath(name.replace("\\", "/"))
    return bool(name) and not (path.is_absolute() or PureWindowsPath(name).drive or ".." in path.parts)


class FetchSettings(StrictModel):
    """HTTP behaviour shared by every source."""

    connect_timeout_s: float = Field(gt=0)
    read_timeout_s: float = Field(gt=0)
    retries: int = Field(ge=0, le=10)
    backoff_factor: float = Field(ge=0, le=60)


class ZipMember(StrictModel):
    """The one member of a zip archive that a source keeps, verified by its own sha256."""

    member: str
    sha256: Sha256
    max_bytes: int = Field(gt=0)

    @field_validator("member")
    @classmethod
    def _relative(cls, member: str) -> str:
        if not is_safe_member(member):
            raise ValueError("must be a relative path inside the archive, without '..'")
        return member


class Source(StrictModel):
    """One input: where it comes from, how to verify it, where it goes."""

    url: str
    # None where upstream bytes are not stable (the spam zip is re-packed; its member is verified).
    sha256: Sha256 | None = None
    out: str
    # File name in the mirror; defaults to the URL's basename.
    mirror_name: str | None = None
    extract: ZipMember | None = None

    @field_validator("url")
    @classmethod
    def _supported(cls, url: str) -> str:
        location_kind(url)
        return url

    @field_validator("mirror_name")
    @classmethod
    def _relative(cls, name: str | None) -> str | None:
        if name is not None and not is_safe_member(name):
            raise ValueError("must be a relative path inside the mirror, without '..'")
        return name

    @model_validator(mode="after")
    def _verified(self) -> Source:
        if self.sha256 is None and self.extract is None:
            raise ValueError("a source needs sha256, or extract.sha256 for its archive member")
        return self

    def mirror_file(self) -> str:
        return self.mirror_name or unquote(PurePosixPath(urlsplit(self.url).path).name)


def load_sources(data: dict, names: list[str], params_file: str = "params.yaml") -> dict[str, Source]:
    """The validated ``sources`` entries named (all of them when ``names`` is empty)."""
    available = data.get("sources")
    if not isinstance(available, dict) or not available:
        raise ParamsError(f"{params_file}: missing section 'sources'")
    unknown = sorted(set(names) - set(available))
    if unknown:
        raise ParamsError(f"{params_file}: unknown source(s) {unknown}; sources are {sorted(available)}")
    return {name: validate_section(data, f"sources.{name}", Source, params_file) for name in names or available}


def make_session(settings: FetchSettings) -> requests.Session:
    """A session that retries connection errors and transient statuses with exponential backoff."""
    retry = Retry(
        total=settings.retries,
        backoff_factor=settings.backoff_factor,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=frozenset({"GET"}),
    )
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _verify(path: Path, expected: str | None, what: str) -> None:
    if expected is not None and (actual := sha256_file(path)) != expected:
        raise FetchError(f"sha256 mismatch for {what}: expected {expected}, got {actual}")


def _retrieve(location: str, dest: Path, session: requests.Session, settings: FetchSettings) -> None:
    """Copy a local file, or stream a URL, to ``dest``; urllib3 raises if the body is short."""
    if location_kind(location) == "path":
        _copy_local(location, dest)
        return
    try:
        timeout = (settings.connect_timeout_s, settings.read_timeout_s)
        with session.get(location, stream=True, timeout=timeout) as response:
            response.raise_for_status()
            with open(dest, "wb") as handle:
                for chunk in response.iter_content(_CHUNK):
                    handle.write(chunk)
    except requests.RequestException as exc:
        raise FetchError(str(exc)) from exc


def _copy_local(location: str, dest: Path) -> None:
    """Copy a mirror file: a failed read is this location's FetchError (the next one is tried); a
    failed write is an OSError of the output (atomic_path names it): no other location would help."""
    try:
        source = open(location, "rb")
    except OSError as exc:
        raise FetchError(f"cannot read: {exc.strerror or exc}") from exc
    with source, open(dest, "wb") as out:
        while True:
            try:
                block = source.read(_CHUNK)
            except OSError as exc:
                raise FetchError(f"cannot read: {exc.strerror or exc}") from exc
            if not block:
                return
            out.write(block)


def extract_member(archive: Path, spec: ZipMember, dest: Path) -> None:
    """Write ``spec.member`` of ``archive`` to ``dest``, refusing unsafe or oversized archives."""
    try:
        with zipfile.ZipFile(archive) as zf:
            unsafe = [name for name in zf.namelist() if not is_safe_member(name)]
            if unsafe:
                raise FetchError(f"archive has unsafe member paths (absolute or '..'): {unsafe[:3]}")
            try:
                info = zf.getinfo(spec.member)
            except KeyError:
                raise FetchError(f"archive has no member {spec.member!r}; members: {zf.namelist()[:10]}") from None
            if info.file_size > spec.max_bytes:
                raise FetchError(
                    f"member {spec.member!r} is {info.file_size} bytes, over extract.max_bytes={spec.max_bytes}"
                )
            # zipfile stops at the declared size and checks the CRC, so the limit holds while reading.
            with zf.open(info) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
    except zipfile.BadZipFile as exc:
        raise FetchError(f"not a valid zip archive: {exc}") from exc
    _verify(dest, spec.sha256, f"member {spec.member!r}")


def _fetch_from(location: str, source: Source, session: requests.Session, settings: FetchSettings) -> None:
    with atomic_path(source.out) as tmp:
        payload = tmp.with_name(tmp.name + ".download") if source.extract else tmp
        _retrieve(location, payload, session, settings)
        _verify(payload, source.sha256, "download")
        if source.extract:
            extract_member(payload, source.extract, tmp)


def candidate_locations(source: Source, mirror: str | None) -> list[str]:
    """The mirror's copy (when a mirror is set), then the upstream location."""
    if not mirror:
        return [source.url]
    try:
        kind = location_kind(mirror)
    except ValueError as exc:
        raise FetchError(f"{MIRROR_ENV}: {exc}") from None
    name = source.mirror_file()
    if kind == "http":
        return [f"{mirror.rstrip('/')}/{quote(name, safe='/+')}", source.url]
    return [str(Path(mirror) / name), source.url]


def fetch_source(
    name: str,
    source: Source,
    settings: FetchSettings,
    *,
    mirror: str | None = None,
    session: requests.Session | None = None,
) -> Path:
    """Fetch one source from the first location that yields verified bytes; return its path."""
    failures = []
    with contextlib.nullcontext(session) if session else make_session(settings) as http:
        for location in candidate_locations(source, mirror):
            try:
                _fetch_from(location, source, http, settings)
                return Path(source.out)
            except FetchError as exc:
                failures.append(f"{location}: {exc}")
    raise FetchError(f"source {name!r} ({source.url}) failed from every location: " + "; ".join(failures))


def main(argv: list[str] | None = None) -> None:
    def body(args, params: StageParams) -> str:
        data = read_params(args.params)
        settings = params.section("fetch", FetchSettings)
        sources = load_sources(data, args.names, args.params)
        mirror = os.environ.get(MIRROR_ENV) or None
        with make_session(settings) as session:
            fetched = [
                f"{name} -> {fetch_source(name, source, settings, mirror=mirror, session=session)}"
                for name, source in sources.items()
            ]
        return "; ".join(fetched)

    def names(parser) -> None:
        parser.add_argument("names", nargs="*", help="sources to fetch (default: every entry of 'sources')")

    run_stage(
        "fetch",
        "Download the pipeline's inputs (mirror first, then upstream), verified by sha256.",
        body,
        paths={},
        options=names,
        errors=(FetchError,),
        argv=argv,
    )


if __name__ == "__main__":
    main()
