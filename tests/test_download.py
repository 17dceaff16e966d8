"""builder/download.py against real HTTP servers on 127.0.0.1: resume, retries, redirects, tokens, checksums.

Each failure is a route of a tiny server: one that drops the connection half way, one without Range support, one
that answers 503 once, one that stalls until the test ends, a CDN that refuses any Authorization header. Tests
assert the bytes on disk, the requests the server saw and the message a user reads, never how long anything took.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import random
import re
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypedDict
from urllib.parse import urlsplit

import pytest

from builder.download import DownloadError, download_file, download_to_folder, file_name_from, sha256_of

DATA = random.Random(0).randbytes(3 * 1024 * 1024 + 123)
DIGEST = hashlib.sha256(DATA).hexdigest()
TOKEN = "tok-never-shown-5e2a"
SIGNATURE = "sig-never-shown-91b7"
CIVITAI_NAME = "dreamshaper_8.safetensors"


class Options(TypedDict):
    backoff_s: float
    timeout_s: float


FAST = Options(backoff_s=0, timeout_s=5)  # backoff 0: retries never sleep


# --- a real HTTP server on 127.0.0.1 ---------------------------------------------------------------


@dataclass
class Seen:
    path: str  # with its query
    headers: dict[str, str]


@dataclass
class Server:
    url: str
    stop: threading.Event
    partner: str = ""  # the other server, where redirects "to the CDN" go
    requests: list[Seen] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def seen(self, path: str) -> list[Seen]:
        return [request for request in self.requests if urlsplit(request.path).path == path]

    def ranges(self, path: str) -> list[str | None]:
        return [request.headers.get("Range") for request in self.seen(path)]


def make_handler(state: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            del format, args

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            with state.lock:
                state.requests.append(Seen(self.path, dict(self.headers)))
                state.counts[path] += 1
                first = state.counts[path] == 1
            # The client hangs up on a stalled body, as it should.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.route(path, first)

        def route(self, path: str, first: bool) -> None:  # noqa: PLR0912 - one branch per fixture
            authorization = self.headers.get("Authorization")
            if path in ("/model.safetensors", "/files/v1-5%20pruned.safetensors"):
                self.send_data()
            elif path == "/drop-once":  # half the body, then the connection closes
                self.send_data(cut=first)
            elif path == "/drop-always":
                self.send_data(cut=True, cut_at=256 * 1024)
            elif path == "/no-range":  # never a 206; the first answer is cut short too
                self.send_data(ranges=False, cut=first)
            elif path == "/stall-once":  # half the body, then silence until the test ends
                self.send_data(stall=first)
            elif path.startswith("/flaky/"):
                if first:
                    self.send_status(int(path.rsplit("/", 1)[1]))
                else:
                    self.send_data()
            elif path == "/always-503":
                self.send_status(503)
            elif path == "/private":
                if authorization == f"Bearer {TOKEN}":
                    self.send_data()
                else:
                    self.send_status(401)
            elif path == "/basic":
                if authorization == "Basic " + base64.b64encode(b"user:pass word").decode():
                    self.send_data()
                else:
                    self.send_status(401)
            elif path == "/to-private":  # the same host: the token goes along
                self.redirect("/private")
            elif path == "/private-to-cdn":  # Civitai: the API checks the token, a presigned CDN URL serves
                if authorization == f"Bearer {TOKEN}":
                    self.redirect(f"{state.partner}/cdn/model.safetensors?X-Amz-Signature={SIGNATURE}")
                else:
                    self.send_status(401)
            elif path == "/to-forbidden-cdn":
                self.redirect(f"{state.partner}/cdn/forbidden?X-Amz-Signature={SIGNATURE}")
            elif path == "/cdn/model.safetensors":  # like S3: a presigned URL refuses a second credential
                if authorization is None:
                    self.send_data()
                else:
                    self.send_status(400)
            elif path == "/cdn/forbidden":
                self.send_status(403)
            elif path == "/api/download/models/123":
                self.send_data(headers={"Content-Disposition": f'attachment; filename="{CIVITAI_NAME}"'})
            elif path == "/loop":
                self.redirect("/loop")
            elif path == "/gone":
                self.send_status(410)
            else:
                self.send_status(404)

        def send_data(
            self,
            *,
            ranges: bool = True,
            cut: bool = False,
            cut_at: int | None = None,
            stall: bool = False,
            headers: dict[str, str] | None = None,
        ) -> None:
            """DATA, or the part a ``Range: bytes=N-`` asks for; cut short or stalled half way on request."""
            start = 0
            asked = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if ranges and asked:
                start = int(asked.group(1))
                if start >= len(DATA):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(DATA)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(DATA) - 1}/{len(DATA)}")
            else:
                self.send_response(200)
                self.send_header("Accept-Ranges", "bytes" if ranges else "none")
            body = DATA[start:]
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            if cut or stall:
                self.wfile.write(body[: cut_at or len(body) // 2])
                self.wfile.flush()
                if stall:
                    state.stop.wait()
                self.close_connection = True
                return
            self.wfile.write(body)

        def send_status(self, status: int) -> None:
            body = b"no\n"
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def redirect(self, location: str) -> None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


@contextlib.contextmanager
def serve() -> Iterator[Server]:
    state = Server("", threading.Event())
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    httpd.daemon_threads = True
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), name="test-download-server", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.stop.set()  # releases a stalled answer
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def server() -> Iterator[Server]:
    with serve() as state:
        yield state


@pytest.fixture
def cdn(server: Server) -> Iterator[Server]:
    """The server's partner: another port, so another origin."""
    with serve() as other:
        server.partner = other.url
        yield other


def failure(url: str, destination: Path, **options: Any) -> str:
    with pytest.raises(DownloadError) as error:
        download_file(url, destination, **{**FAST, **options})
    return str(error.value)


def part_of(destination: Path) -> Path:
    return destination.with_name(destination.name + ".part")


def resumed_from(range_header: str | None) -> int:
    """N from ``Range: bytes=N-``."""
    assert range_header is not None
    match = re.fullmatch(r"bytes=(\d+)-", range_header)
    assert match is not None, range_header
    return int(match.group(1))


# --- downloads that succeed -----------------------------------------------------------------------


def test_plain_download(server: Server, tmp_path: Path) -> None:
    destination = tmp_path / "models" / "sd15" / "model.safetensors"  # the folders do not exist yet

    digest = download_file(f"{server.url}/model.safetensors", destination, **FAST)

    assert destination.read_bytes() == DATA
    assert digest == DIGEST
    assert sha256_of(destination, chunk_bytes=1000) == DIGEST
    assert not part_of(destination).exists()
    assert server.ranges("/model.safetensors") == [None]
    assert server.seen("/model.safetensors")[0].headers["User-Agent"].startswith("sd15-worker-builder/")


def test_a_dropped_connection_resumes_with_a_range(
    server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    destination = tmp_path / "model.safetensors"

    with caplog.at_level(logging.WARNING, logger="builder.download"):
        assert download_file(f"{server.url}/drop-once", destination, **FAST) == DIGEST

    first, second = server.ranges("/drop-once")
    assert first is None
    assert 0 < resumed_from(second) < len(DATA)
    assert destination.read_bytes() == DATA
    assert "attempt 1 of 5 failed: the connection broke" in caplog.text


def test_a_server_without_range_support_starts_over(server: Server, tmp_path: Path) -> None:
    destination = tmp_path / "model.safetensors"

    assert download_file(f"{server.url}/no-range", destination, **FAST) == DIGEST

    assert [value is not None for value in server.ranges("/no-range")] == [False, True]  # asked, got a 200
    assert destination.read_bytes() == DATA


def test_a_stalled_server_is_cut_at_the_timeout_and_resumed(server: Server, tmp_path: Path) -> None:
    destination = tmp_path / "model.safetensors"

    assert download_file(f"{server.url}/stall-once", destination, backoff_s=0, timeout_s=2) == DIGEST

    first, second, *_ = server.ranges("/stall-once")
    assert first is None
    assert 0 < resumed_from(second) < len(DATA)
    assert destination.read_bytes() == DATA


def test_a_part_file_from_an_earlier_run_is_resumed(server: Server, tmp_path: Path) -> None:
    destination = tmp_path / "model.safetensors"
    part_of(destination).write_bytes(DATA[:1000])

    assert download_file(f"{server.url}/model.safetensors", destination, **FAST) == DIGEST

    assert server.ranges("/model.safetensors") == ["bytes=1000-"]
    assert destination.read_bytes() == DATA
    assert not part_of(destination).exists()


def test_a_part_file_larger_than_the_file_starts_over(server: Server, tmp_path: Path) -> None:
    destination = tmp_path / "model.safetensors"
    part_of(destination).write_bytes(DATA + b"left over from something else")

    assert download_file(f"{server.url}/model.safetensors", destination, **FAST) == DIGEST

    assert server.ranges("/model.safetensors") == [f"bytes={len(DATA) + 29}-", None]
    assert destination.read_bytes() == DATA


def test_a_complete_part_file_is_only_checked_and_renamed(server: Server, tmp_path: Path) -> None:
    destination = tmp_path / "model.safetensors"
    part_of(destination).write_bytes(DATA)

    assert download_file(f"{server.url}/model.safetensors", destination, sha256=DIGEST, **FAST) == DIGEST

    assert server.ranges("/model.safetensors") == [f"bytes={len(DATA)}-"]  # answered 416, with the size
    assert destination.read_bytes() == DATA


@pytest.mark.parametrize("status", [503, 500, 429])
def test_a_transient_status_is_retried(server: Server, tmp_path: Path, status: int) -> None:
    destination = tmp_path / "model.safetensors"

    assert download_file(f"{server.url}/flaky/{status}", destination, **FAST) == DIGEST

    assert server.counts[f"/flaky/{status}"] == 2


def test_the_expected_digest_may_be_in_any_case_with_spaces(server: Server, tmp_path: Path) -> None:
    destination = tmp_path / "model.safetensors"

    digest = download_file(f"{server.url}/model.safetensors", destination, sha256=f" {DIGEST.upper()}\n", **FAST)

    assert digest == DIGEST


# --- tokens and redirects ---------------------------------------------------------------------------


def test_the_token_goes_to_the_url_s_host_and_not_past_a_redirect_to_another(
    server: Server, cdn: Server, tmp_path: Path
) -> None:
    destination = tmp_path / "model.safetensors"

    assert download_file(f"{server.url}/private-to-cdn", destination, token=TOKEN, **FAST) == DIGEST

    assert [request.headers.get("Authorization") for request in server.requests] == [f"Bearer {TOKEN}"]
    assert [request.headers.get("Authorization") for request in cdn.requests] == [None]
    assert cdn.requests[0].path == f"/cdn/model.safetensors?X-Amz-Signature={SIGNATURE}"
    assert destination.read_bytes() == DATA


def test_the_token_follows_a_redirect_on_the_same_host(server: Server, tmp_path: Path) -> None:
    destination = tmp_path / "model.safetensors"

    assert download_file(f"{server.url}/to-private", destination, token=TOKEN, **FAST) == DIGEST

    assert [request.headers.get("Authorization") for request in server.requests] == [f"Bearer {TOKEN}"] * 2


def test_credentials_in_the_url_are_sent_as_basic_auth_and_never_shown(server: Server, tmp_path: Path) -> None:
    host = server.url.removeprefix("http://")

    assert download_file(f"http://user:pass%20word@{host}/basic", tmp_path / "model.safetensors", **FAST) == DIGEST

    message = failure(f"http://user:pass%20word@{host}/missing", tmp_path / "other.safetensors")
    assert message == f"http://{host}/missing: HTTP 404 Not Found: check the URL"


def test_too_many_redirects(server: Server, tmp_path: Path) -> None:
    message = failure(f"{server.url}/loop", tmp_path / "model.safetensors")

    assert message.endswith("more than 10 redirects")
    assert server.counts["/loop"] == 11


# --- downloads that fail ------------------------------------------------------------------------------


def test_a_checksum_mismatch_deletes_the_file(server: Server, tmp_path: Path) -> None:
    destination = tmp_path / "model.safetensors"
    wrong = "0123abcd" * 8

    message = failure(f"{server.url}/model.safetensors", destination, sha256=wrong)

    assert message == (
        f"{server.url}/model.safetensors: the file's SHA-256 is {DIGEST}, not the expected {wrong}; "
        "it was deleted. Check the URL and the expected digest"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_malformed_expected_digest_is_refused_before_any_request(server: Server, tmp_path: Path) -> None:
    message = failure(f"{server.url}/model.safetensors", tmp_path / "model.safetensors", sha256="abc123")

    assert message == "sha256='abc123': expected 64 hexadecimal digits (a SHA-256 digest)"
    assert server.requests == []


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/missing", "/missing: HTTP 404 Not Found: check the URL"),
        ("/gone", "/gone: HTTP 410 Gone"),
    ],
)
def test_a_client_error_is_not_retried(server: Server, tmp_path: Path, path: str, expected: str) -> None:
    message = failure(f"{server.url}{path}", tmp_path / "model.safetensors")

    assert message == f"{server.url}{expected}"
    assert server.counts[path] == 1


def test_401_says_how_to_pass_a_token(server: Server, tmp_path: Path) -> None:
    message = failure(f"{server.url}/private", tmp_path / "model.safetensors")

    assert message.startswith(f"{server.url}/private: HTTP 401 Unauthorized: the URL needs a token. ")
    assert "docker build --secret id=download_token,env=DOWNLOAD_TOKEN" in message
    assert server.counts["/private"] == 1


def test_a_refused_token_is_named_but_never_shown(
    server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="builder.download"):
        message = failure(f"{server.url}/private", tmp_path / "model.safetensors", token="wrong-" + TOKEN)

    assert "the token given was refused" in message
    assert "DOWNLOAD_TOKEN" in message
    assert TOKEN not in message
    assert TOKEN not in caplog.text


def test_secrets_in_the_url_and_the_redirect_are_never_shown(
    server: Server, cdn: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="builder.download"):
        missing = failure(f"{server.url}/missing?token=secret-in-query", tmp_path / "model.safetensors")
        forbidden = failure(f"{server.url}/to-forbidden-cdn", tmp_path / "model.safetensors", token=TOKEN)

    assert missing == f"{server.url}/missing?<hidden>: HTTP 404 Not Found: check the URL"
    assert forbidden == (
        f"{server.url}/to-forbidden-cdn (redirected to {cdn.url}/cdn/forbidden?<hidden>): HTTP 403 Forbidden: "
        "refused by the host it redirects to, which is sent no token; a presigned link may have expired"
    )
    for secret in ("secret-in-query", SIGNATURE, TOKEN):
        assert secret not in missing + forbidden + caplog.text


def test_giving_up_keeps_the_part_file_for_the_next_run(
    server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    destination = tmp_path / "model.safetensors"
    url = f"{server.url}/drop-always?token=secret-in-query"

    with caplog.at_level(logging.WARNING, logger="builder.download"):
        message = failure(url, destination, attempts=3)

    kept = part_of(destination).stat().st_size
    assert kept == 3 * 256 * 1024  # each attempt added what it got
    assert message.startswith(
        f"{server.url}/drop-always?<hidden>: failed 3 attempts; the last error: the connection broke: "
    )
    assert message.endswith(
        f"The {kept} bytes received so far are kept in {part_of(destination)}, so a new build resumes from there"
    )
    assert len([record for record in caplog.records if record.levelno == logging.WARNING]) == 3
    assert "secret-in-query" not in message + caplog.text
    assert not destination.exists()

    assert download_file(f"{server.url}/model.safetensors", destination, sha256=DIGEST, **FAST) == DIGEST
    assert server.ranges("/model.safetensors") == [f"bytes={kept}-"]


def test_a_server_that_stays_down_fails_after_the_attempts(server: Server, tmp_path: Path) -> None:
    message = failure(f"{server.url}/always-503", tmp_path / "model.safetensors", attempts=2)

    assert message == (
        f"{server.url}/always-503: failed 2 attempts; the last error: HTTP 503 Service Unavailable. "
        "No bytes were received; check the URL and the network"
    )
    assert server.counts["/always-503"] == 2


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/model.safetensors", "file:///etc/passwd", "model.safetensors"])
def test_only_http_and_https(tmp_path: Path, url: str) -> None:
    message = failure(url, tmp_path / "model.safetensors")

    scheme = urlsplit(url).scheme
    assert message == f"{url}: the scheme {scheme!r} is not supported; use an http:// or https:// URL"


# --- file names ------------------------------------------------------------------------------------------


def test_download_to_folder_takes_the_name_from_content_disposition(server: Server, tmp_path: Path) -> None:
    path, digest = download_to_folder(f"{server.url}/api/download/models/123?token=x", tmp_path / "loras", **FAST)

    assert path == tmp_path / "loras" / CIVITAI_NAME
    assert digest == DIGEST
    assert path.read_bytes() == DATA


def test_download_to_folder_falls_back_to_the_url_s_name(server: Server, tmp_path: Path) -> None:
    path, _ = download_to_folder(f"{server.url}/files/v1-5%20pruned.safetensors", tmp_path, **FAST)

    assert path == tmp_path / "v1-5 pruned.safetensors"
    assert path.read_bytes() == DATA


def test_download_to_folder_resumes_a_part_file_once_it_knows_the_name(server: Server, tmp_path: Path) -> None:
    (tmp_path / f"{CIVITAI_NAME}.part").write_bytes(DATA[:5000])

    path, digest = download_to_folder(f"{server.url}/api/download/models/123", tmp_path, **FAST)

    assert (path, digest) == (tmp_path / CIVITAI_NAME, DIGEST)
    assert server.ranges("/api/download/models/123") == [None, "bytes=5000-"]
    assert path.read_bytes() == DATA


@pytest.mark.parametrize(
    ("url", "content_disposition", "expected"),
    [
        (
            "https://civitai.com/api/download/models/123",
            'attachment; filename="dreamshaper_8.safetensors"',
            CIVITAI_NAME,
        ),
        ("https://x.org/a", "attachment; filename=plain.ckpt", "plain.ckpt"),
        ("https://x.org/a", r'attachment; filename="quo\"ted.safetensors"', 'quo"ted.safetensors'),
        ("https://x.org/a", "attachment; filename*=UTF-8''m%C3%BCller%20v2.safetensors", "müller v2.safetensors"),
        (
            "https://x.org/a",
            "attachment; filename=\"fallback.safetensors\"; filename*=utf-8''pr%C3%A9f%C3%A9r%C3%A9.safetensors",
            "préféré.safetensors",
        ),
        ("https://x.org/a", 'attachment; filename="../../etc/passwd"', "passwd"),
        ("https://x.org/a", "attachment; filename=C:\\models\\win.safetensors", "win.safetensors"),
        ("https://x.org/dir/v1-5%20pruned.safetensors?download=true", None, "v1-5 pruned.safetensors"),
        ("https://x.org/dir/sneaky%2F..%2Fup.safetensors", "inline", "up.safetensors"),
        ("https://x.org/a.safetensors", 'attachment; filename=".."', "a.safetensors"),
        ("https://x.org/", None, "model.safetensors"),
        ("https://x.org", "", "model.safetensors"),
        ("https://x.org/..", None, "model.safetensors"),
    ],
)
def test_file_name_from(url: str, content_disposition: str | None, expected: str) -> None:
    assert file_name_from(url, content_disposition) == expected
