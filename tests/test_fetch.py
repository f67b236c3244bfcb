"""steps.fetch against a real HTTP server on 127.0.0.1 and the offline mirror; no other network."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from llmpipe.params import ParamsError, validate_section
from steps.fetch import (
    FetchError,
    FetchSettings,
    Source,
    ZipMember,
    extract_member,
    fetch_source,
    location_kind,
    main,
)
from tests.params_values import params_for

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("LLMPIPE_MIRROR") or REPO.parent / "shared" / "data")
VERDICT_SHA256 = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"
SPAM_MEMBER_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
FAST = params_for(FetchSettings, connect_timeout_s=2, read_timeout_s=2, retries=2, backoff_factor=0)

pytestmark = pytest.mark.skipif(not MIRROR.is_dir(), reason=f"offline mirror {MIRROR} not found")


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep requests to 127.0.0.1 off any proxy configured in the environment."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


class Server:
    """A local HTTP server; ``routes`` maps a path to a list of responses served in turn."""

    def __init__(self) -> None:
        self.routes: dict[str, list[tuple[int, bytes, dict[str, str]]]] = {}
        self.hits: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits.append(self.path)
                responses = outer.routes.get(self.path) or [(404, b"not found", {})]
                status, body, headers = responses.pop(0) if len(responses) > 1 else responses[0]
                self.send_response(status)
                headers = {"Content-Length": str(len(body)), **headers}
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_port}"

    def serve(self, path: str, body: bytes, status: int = 200, **headers: str) -> str:
        self.routes[path] = [(status, body, headers)]
        return self.base + path


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    thread = threading.Thread(target=srv.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture(scope="module")
def verdict() -> bytes:
    return (MIRROR / "the-verdict.txt").read_bytes()


def corpus_source(url: str, out: Path, sha256: str = VERDICT_SHA256) -> Source:
    return Source(url=url, sha256=sha256, out=str(out))


def assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert list(out.parent.iterdir()) == [], "temp files left beside the output"


def test_http_mirror_is_tried_first(server: Server, verdict: bytes, tmp_path: Path) -> None:
    server.serve("/mirror/the-verdict.txt", verdict)
    upstream = server.serve("/upstream/the-verdict.txt", verdict)
    out = tmp_path / "raw" / "corpus.txt"
    path = fetch_source("corpus", corpus_source(upstream, out), FAST, mirror=server.base + "/mirror/")
    assert path == out and out.read_bytes() == verdict
    assert server.hits == ["/mirror/the-verdict.txt"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["corpus.txt"]


def test_falls_back_to_upstream_when_the_mirror_lacks_the_file(server: Server, verdict: bytes, tmp_path: Path) -> None:
    upstream = server.serve("/upstream/the-verdict.txt", verdict)
    empty_mirror = tmp_path / "mirror"
    empty_mirror.mkdir()
    out = tmp_path / "raw" / "corpus.txt"
    fetch_source("corpus", corpus_source(upstream, out), FAST, mirror=str(empty_mirror))
    assert out.read_bytes() == verdict
    assert server.hits == ["/upstream/the-verdict.txt"]


def test_a_tampered_mirror_copy_falls_back_to_upstream(server: Server, verdict: bytes, tmp_path: Path) -> None:
    server.serve("/mirror/the-verdict.txt", verdict.replace(b"Gisburn", b"Gisbury"))
    upstream = server.serve("/upstream/the-verdict.txt", verdict)
    out = tmp_path / "raw" / "corpus.txt"
    fetch_source("corpus", corpus_source(upstream, out), FAST, mirror=server.base + "/mirror")
    assert out.read_bytes() == verdict


def test_checksum_mismatch_everywhere_leaves_nothing(server: Server, verdict: bytes, tmp_path: Path) -> None:
    upstream = server.serve("/upstream/the-verdict.txt", verdict + b"extra")
    out = tmp_path / "raw" / "corpus.txt"
    with pytest.raises(FetchError) as err:
        fetch_source("corpus", corpus_source(upstream, out), FAST, mirror=str(MIRROR / "nonexistent"))
    message = str(err.value)
    assert "source 'corpus'" in message and upstream in message
    assert "sha256 mismatch" in message and "No such file" in message
    assert_nothing_left(out)


def test_truncated_response_is_detected(server: Server, verdict: bytes, tmp_path: Path) -> None:
    # Content-Length promises the whole file; the body stops half way and the connection closes.
    upstream = server.serve("/upstream/the-verdict.txt", verdict[:10000], **{"Content-Length": str(len(verdict))})
    out = tmp_path / "raw" / "corpus.txt"
    with pytest.raises(FetchError, match=r"IncompleteRead\(10000 bytes read, 10479 more expected\)") as err:
        fetch_source("corpus", corpus_source(upstream, out), FAST)
    assert upstream in str(err.value)
    assert_nothing_left(out)


def test_http_error_names_the_status(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "raw" / "corpus.txt"
    with pytest.raises(FetchError, match="404 Client Error"):
        fetch_source("corpus", corpus_source(server.base + "/missing.txt", out), FAST)
    assert_nothing_left(out)


def test_transient_errors_are_retried(server: Server, verdict: bytes, tmp_path: Path) -> None:
    server.routes["/flaky.txt"] = [(503, b"busy", {}), (200, verdict, {})]
    out = tmp_path / "corpus.txt"
    fetch_source("corpus", corpus_source(server.base + "/flaky.txt", out), FAST)
    assert out.read_bytes() == verdict
    assert server.hits == ["/flaky.txt", "/flaky.txt"]


def test_retries_are_bounded(server: Server, tmp_path: Path) -> None:
    server.serve("/down.txt", b"busy", status=503)
    with pytest.raises(FetchError, match="too many 503 error responses"):
        fetch_source("corpus", corpus_source(server.base + "/down.txt", tmp_path / "c.txt"), FAST)
    assert len(server.hits) == FAST.retries + 1


def test_local_path_as_upstream(tmp_path: Path, verdict: bytes) -> None:
    out = tmp_path / "corpus.txt"
    fetch_source("corpus", corpus_source(str(MIRROR / "the-verdict.txt"), out), FAST)
    assert out.read_bytes() == verdict


@pytest.mark.parametrize("url", ["ftp://example.com/the-verdict.txt", "file:///etc/passwd", "s3://bucket/x"])
def test_non_http_schemes_are_rejected(url: str) -> None:
    with pytest.raises(ParamsError, match=r"sources\.corpus\.url: .*unsupported scheme"):
        validate_section(
            {"sources": {"corpus": {"url": url, "sha256": VERDICT_SHA256, "out": "x"}}}, "sources.corpus", Source
        )
    with pytest.raises(ValueError, match="unsupported scheme"):
        location_kind(url)


def test_non_http_mirror_is_rejected(tmp_path: Path) -> None:
    source = corpus_source(str(MIRROR / "the-verdict.txt"), tmp_path / "c.txt")
    with pytest.raises(FetchError, match="LLMPIPE_MIRROR: unsupported scheme 'ftp'"):
        fetch_source("corpus", source, FAST, mirror="ftp://mirror.example.com/data")


def test_a_source_must_be_verifiable() -> None:
    with pytest.raises(ValueError, match="needs sha256"):
        Source(url="https://example.com/x.txt", out="x")
    with pytest.raises(ValueError, match="sha256"):
        Source(url="https://example.com/x.txt", sha256="abc", out="x")


# ---- zip extraction


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def member_spec(data: bytes, max_bytes: int = 1000) -> ZipMember:
    return ZipMember(member="data.txt", sha256=hashlib.sha256(data).hexdigest(), max_bytes=max_bytes)


@pytest.mark.parametrize("evil", ["../evil.txt", "/etc/evil.txt", "a/../../evil.txt", "..\\evil.txt", "C:/evil"])
def test_zip_slip_members_are_rejected(tmp_path: Path, evil: str) -> None:
    archive = make_zip(tmp_path / "a.zip", {"data.txt": b"hello", evil: b"pwned"})
    with pytest.raises(FetchError, match="unsafe member paths"):
        extract_member(archive, member_spec(b"hello"), tmp_path / "out.txt")
    assert not (tmp_path / "out.txt").exists()


def test_oversized_members_are_rejected(tmp_path: Path) -> None:
    data = b"x" * 5000  # compresses to a few bytes: the declared size is what counts
    archive = make_zip(tmp_path / "a.zip", {"data.txt": data})
    with pytest.raises(FetchError, match="5000 bytes, over extract.max_bytes=1000"):
        extract_member(archive, member_spec(data, max_bytes=1000), tmp_path / "out.txt")


def test_member_checksum_and_presence_are_checked(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "a.zip", {"data.txt": b"hello"})
    with pytest.raises(FetchError, match="sha256 mismatch for member 'data.txt'"):
        extract_member(archive, member_spec(b"other"), tmp_path / "out.txt")
    with pytest.raises(FetchError, match="no member 'other.txt'"):
        extract_member(archive, ZipMember(member="other.txt", sha256="0" * 64, max_bytes=10), tmp_path / "o")
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(FetchError, match="not a valid zip archive"):
        extract_member(tmp_path / "bad.zip", member_spec(b"hello"), tmp_path / "out.txt")


def test_unsafe_member_name_in_params_is_rejected() -> None:
    with pytest.raises(ValueError, match="without '..'"):
        ZipMember(member="../SMSSpamCollection", sha256=SPAM_MEMBER_SHA256, max_bytes=10)


def test_spam_zip_over_http_extracts_the_verified_member(server: Server, tmp_path: Path) -> None:
    server.serve("/m/sms+spam+collection.zip", (MIRROR / "sms+spam+collection.zip").read_bytes())
    source = Source(
        url="https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
        out=str(tmp_path / "raw" / "SMSSpamCollection"),
        extract=ZipMember(member="SMSSpamCollection", sha256=SPAM_MEMBER_SHA256, max_bytes=10_000_000),
    )
    fetch_source("spam", source, FAST, mirror=server.base + "/m")
    out = tmp_path / "raw" / "SMSSpamCollection"
    assert hashlib.sha256(out.read_bytes()).hexdigest() == SPAM_MEMBER_SHA256
    assert [p.name for p in out.parent.iterdir()] == ["SMSSpamCollection"]


def test_spam_member_over_the_size_limit_leaves_nothing(tmp_path: Path) -> None:
    source = Source(
        url=str(MIRROR / "sms+spam+collection.zip"),
        out=str(tmp_path / "raw" / "SMSSpamCollection"),
        extract=ZipMember(member="SMSSpamCollection", sha256=SPAM_MEMBER_SHA256, max_bytes=1000),
    )
    with pytest.raises(FetchError, match="source 'spam'.*over extract.max_bytes=1000"):
        fetch_source("spam", source, FAST)
    assert_nothing_left(tmp_path / "raw" / "SMSSpamCollection")


# ---- params.yaml and the CLI


def test_every_params_source_is_in_the_mirror_and_fetches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real params.yaml, run offline through the mirror, with outputs redirected to tmp_path."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, entry in params["sources"].items():
        entry["out"] = str(tmp_path / "raw" / name)
        assert (MIRROR / Source(**entry).mirror_file()).is_file(), name
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    monkeypatch.setenv("LLMPIPE_MIRROR", str(MIRROR))
    main(["--params", str(params_file)])
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(params["sources"])
    assert (tmp_path / "raw" / "corpus").stat().st_size == 20_479


def test_cli_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params_file = tmp_path / "params.yaml"
    upstream = str(tmp_path / "upstream" / "the-verdict.txt")  # absent: the mirror copy is the only one
    source = {"url": upstream, "sha256": "f" * 64, "out": str(tmp_path / "c")}
    fast = FAST.model_dump()
    params_file.write_text(yaml.safe_dump({"fetch": fast, "sources": {"corpus": source}}))
    with pytest.raises(SystemExit, match=r"^fetch: error: .*unknown source\(s\) \['nope'\]"):
        main(["--params", str(params_file), "nope"])
    monkeypatch.setenv("LLMPIPE_MIRROR", str(MIRROR))
    with pytest.raises(SystemExit) as exc:
        main(["--params", str(params_file), "corpus"])
    message = str(exc.value)
    assert message.startswith(f"fetch: error: source 'corpus' ({upstream}) failed from every location")
    assert "sha256 mismatch" in message and "No such file" in message and "\n" not in message
    params_file.write_text(yaml.safe_dump({"fetch": {**fast, "retries": -1}, "sources": {"corpus": source}}))
    with pytest.raises(SystemExit, match=r"fetch\.retries"):
        main(["--params", str(params_file)])


def test_a_local_write_failure_stops_instead_of_trying_upstream(
    server: Server, verdict: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Disk full while copying the mirror's file: the error names the output (never the mirror file
    being read), and neither the upstream URL nor anything half-written is left to chance."""
    import builtins
    import errno

    upstream = server.serve("/upstream/the-verdict.txt", verdict)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "the-verdict.txt").write_bytes(verdict)
    real_open = builtins.open

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")  # as file.write raises it: no file name

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    def full_disk_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return FullDisk(handle) if "w" in mode and "raw" in str(file) else handle

    monkeypatch.setattr(builtins, "open", full_disk_open)
    out = tmp_path / "raw" / "corpus.txt"
    with pytest.raises(OSError, match="No space left") as caught:
        fetch_source("corpus", corpus_source(upstream, out), FAST, mirror=str(mirror))
    assert caught.value.filename == str(out)  # the output, not the mirror's file
    assert server.hits == []  # the network was not tried for a local disk problem
    assert_nothing_left(out)

    from llmpipe.cli import run_stage

    def body(args, params):
        fetch_source("corpus", corpus_source(upstream, out), FAST, mirror=str(mirror))

    with pytest.raises(SystemExit) as exc:
        run_stage("fetch", "test", body, paths={}, argv=["--params", str(tmp_path / "none.yaml")])
    assert str(exc.value.code) == f"fetch: error: {out}: cannot write: No space left on device"


def test_a_full_disk_for_real_names_the_output(
    small_disk: Path, server: Server, verdict: bytes, tmp_path: Path
) -> None:
    """A 64 KiB tmpfs (needs root): a 200 KB file cannot fit."""
    upstream = server.serve("/upstream/the-verdict.txt", verdict * 10)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "the-verdict.txt").write_bytes(verdict * 10)
    out = small_disk / "raw" / "corpus.txt"
    source = Source(url=upstream, sha256=hashlib.sha256(verdict * 10).hexdigest(), out=str(out))
    with pytest.raises(OSError) as caught:
        fetch_source("corpus", source, FAST, mirror=str(mirror))
    assert caught.value.filename == str(out) and "No space left on device" in caught.value.strerror
    assert server.hits == [] and list(small_disk.rglob("*.txt")) == []
