"""builder/download.py against real HTTP servers on 127.0.0.1: resume, retries, redirects, tokens, checksums.

Each failure is a route of a tiny server: one that drops the connection half way, one without Range support, one
that answers 503 once, one that stalls until the test ends, a CDN that refuses any Authorization header, a file
that changes between two builds. Tests assert the bytes on disk, the requests the server saw (and the
Authorization header each got) and the message a user reads, never how long anything took.
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

from builder import cache_model
from builder.download import (
    DownloadError,
    download_file,
    download_to_folder,
    file_name_from,
    served_name,
    sha256_of,
)
from src.settings import HostToken, Settings, SettingsError, load_settings

DATA = random.Random(0).randbytes(3 * 1024 * 1024 + 123)
DIGEST = hashlib.sha256(DATA).hexdigest()
# Another file of the same size: what a different URL, or the same URL after an update, serves.
OTHER = random.Random(1).randbytes(len(DATA))
OTHER_DIGEST = hashlib.sha256(OTHER).hexdigest()
ETAG = '"etag-of-data"'
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
    updated: bool = False  # /updated and /updated-ignores-if-range serve OTHER, with another ETag, once set

    def authorizations(self) -> list[str | None]:
        return [request.headers.get("Authorization") for request in self.requests]

    def if_ranges(self, path: str) -> list[str | None]:
        return [request.headers.get("If-Range") for request in self.seen(path)]

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
            if path in ("/model.safetensors", "/files/v1-5%20pruned.safetensors", "/a/model.safetensors"):
                self.send_data()
            elif path == "/b/model.safetensors":  # another file of the same name
                self.send_data(data=OTHER, etag='"etag-of-other"')
            elif path == "/a/drop-always/model.safetensors":
                self.send_data(cut=True, cut_at=256 * 1024)
            elif path in ("/updated", "/updated-ignores-if-range"):  # cut short until updated, then OTHER whole
                if state.updated:
                    self.send_data(data=OTHER, etag='"etag-of-other"', if_range=path == "/updated")
                else:
                    self.send_data(cut=True, cut_at=256 * 1024)
            elif path == "/no-validator":  # no ETag, no Last-Modified: nothing to resume by
                self.send_data(cut=first, etag=None)
            elif path == "/last-modified-only":
                self.send_data(cut=first, etag=None, last_modified="Tue, 01 Dec 2026 10:00:00 GMT")
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
            elif path == "/api/download/models/456":  # named only in its first, whole answer
                self.send_data(
                    cut=first,
                    headers={"Content-Disposition": f'attachment; filename="{CIVITAI_NAME}"'} if first else None,
                )
            elif path == "/login":  # a page served with 200 where the file was expected
                self.send_data(
                    data=b"<html><body>Log in</body></html>", headers={"Content-Type": "text/html; charset=utf-8"}
                )
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
            data: bytes = DATA,
            etag: str | None = ETAG,
            last_modified: str | None = None,
            if_range: bool = True,
        ) -> None:
            """``data``, or the part a ``Range: bytes=N-`` asks for; cut short or stalled half way on request.

            An ``If-Range`` that is not this file's ETag (or Last-Modified) gets the whole file, as RFC 9110 says,
            unless ``if_range`` is False (a server that ignores the header)."""
            start = 0
            asked = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            condition = self.headers.get("If-Range")
            if if_range and condition is not None and condition not in (etag, last_modified):
                asked = None
            if ranges and asked:
                start = int(asked.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
                self.send_header("Accept-Ranges", "bytes" if ranges else "none")
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            if etag is not None:
                self.send_header("ETag", etag)
            if last_modified is not None:
                self.send_header("Last-Modified", last_modified)
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


def scoped(server: Server, token: str = TOKEN) -> list[HostToken]:
    """A token for the server's host and port only, as DOWNLOAD_TOKENS gives it."""
    return [HostToken(server.url.removeprefix("http://"), token, "DOWNLOAD_TOKENS")]


def failure(url: str, destination: Path, **options: Any) -> str:
    with pytest.raises(DownloadError) as error:
        download_file(url, destination, **{**FAST, **options})
    return str(error.value)


def interrupted(url: str, destination: Path) -> Path:
    """Run one attempt of a download that the server cuts short, as a failed build does; the part it leaves."""
    failure(url, destination, attempts=1)
    [part] = destination.parent.glob(".*.part")
    return part


def leftovers(folder: Path) -> list[str]:
    """What a download left in its folder besides finished files: parts and their records."""
    return sorted(path.name for path in folder.glob(".*"))


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
    assert leftovers(destination.parent) == []
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


def test_a_part_file_from_an_earlier_run_is_resumed_if_the_file_is_the_same(server: Server, tmp_path: Path) -> None:
    destination = tmp_path / "model.safetensors"
    kept = interrupted(f"{server.url}/drop-once", destination).stat().st_size

    assert download_file(f"{server.url}/drop-once", destination, **FAST) == DIGEST

    assert server.ranges("/drop-once") == [None, f"bytes={kept}-"]
    assert server.if_ranges("/drop-once") == [None, ETAG]
    assert destination.read_bytes() == DATA
    assert leftovers(tmp_path) == []


def test_a_part_file_larger_than_the_file_starts_over(server: Server, tmp_path: Path) -> None:
    destination = tmp_path / "model.safetensors"
    part = interrupted(f"{server.url}/drop-once", destination)
    part.write_bytes(DATA + b"left over from something else")

    assert download_file(f"{server.url}/drop-once", destination, **FAST) == DIGEST

    assert server.ranges("/drop-once")[1:] == [f"bytes={len(DATA) + 29}-", None]
    assert destination.read_bytes() == DATA


def test_a_complete_part_file_is_only_checked_and_renamed(server: Server, tmp_path: Path) -> None:
    destination = tmp_path / "model.safetensors"
    interrupted(f"{server.url}/drop-once", destination).write_bytes(DATA)

    assert download_file(f"{server.url}/drop-once", destination, sha256=DIGEST, **FAST) == DIGEST

    assert server.ranges("/drop-once")[1:] == [f"bytes={len(DATA)}-"]  # answered 416, with the size
    assert destination.read_bytes() == DATA


# --- a part is resumed only for its own URL, and only while the server's file is the same ----------------------


def test_a_part_of_another_url_with_the_same_file_name_is_never_resumed(server: Server, tmp_path: Path) -> None:
    destination = tmp_path / "model.safetensors"
    interrupted(f"{server.url}/a/drop-always/model.safetensors", destination)

    assert download_file(f"{server.url}/b/model.safetensors", destination, **FAST) == OTHER_DIGEST

    assert server.ranges("/b/model.safetensors") == [None]
    assert destination.read_bytes() == OTHER
    # The other URL's part stays, for a build of that URL.
    assert len(list(tmp_path.glob(".*.part"))) == 1


def test_two_urls_of_one_file_name_into_one_folder_keep_their_own_parts(server: Server, tmp_path: Path) -> None:
    folder = tmp_path / ".downloads"
    for url in (f"{server.url}/a/drop-always/model.safetensors", f"{server.url}/drop-always"):
        with pytest.raises(DownloadError):
            download_to_folder(url, folder, attempts=1, **FAST)

    path, digest = download_to_folder(f"{server.url}/b/model.safetensors", folder, **FAST)

    assert (path, digest) == (folder / "model.safetensors", OTHER_DIGEST)
    assert path.read_bytes() == OTHER
    assert len(list(folder.glob(".*.part"))) == 2


@pytest.mark.parametrize("route", ["/updated", "/updated-ignores-if-range"])
def test_a_file_that_changed_on_the_server_since_the_part_starts_over(
    server: Server, tmp_path: Path, route: str
) -> None:
    destination = tmp_path / "model.safetensors"
    kept = interrupted(f"{server.url}{route}", destination).stat().st_size
    server.updated = True

    assert download_file(f"{server.url}{route}", destination, **FAST) == OTHER_DIGEST

    assert destination.read_bytes() == OTHER
    assert server.ranges(route)[1] == f"bytes={kept}-"
    assert server.if_ranges(route)[1] == ETAG
    if route == "/updated-ignores-if-range":  # a range of the new file, with its new ETag: refused, then whole
        assert server.ranges(route)[2:] == [None]


def test_a_part_without_a_validator_is_started_over(server: Server, tmp_path: Path) -> None:
    destination = tmp_path / "model.safetensors"
    interrupted(f"{server.url}/no-validator", destination)

    assert download_file(f"{server.url}/no-validator", destination, **FAST) == DIGEST

    assert server.ranges("/no-validator") == [None, None]
    assert destination.read_bytes() == DATA


def test_last_modified_is_the_validator_when_there_is_no_etag(server: Server, tmp_path: Path) -> None:
    destination = tmp_path / "model.safetensors"
    kept = interrupted(f"{server.url}/last-modified-only", destination).stat().st_size

    assert download_file(f"{server.url}/last-modified-only", destination, **FAST) == DIGEST

    assert server.ranges("/last-modified-only") == [None, f"bytes={kept}-"]
    assert server.if_ranges("/last-modified-only") == [None, "Tue, 01 Dec 2026 10:00:00 GMT"]


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

    assert download_file(f"{server.url}/private-to-cdn", destination, tokens=scoped(server), **FAST) == DIGEST

    assert [request.headers.get("Authorization") for request in server.requests] == [f"Bearer {TOKEN}"]
    assert [request.headers.get("Authorization") for request in cdn.requests] == [None]
    assert cdn.requests[0].path == f"/cdn/model.safetensors?X-Amz-Signature={SIGNATURE}"
    assert destination.read_bytes() == DATA


def test_the_token_follows_a_redirect_on_the_same_host(server: Server, tmp_path: Path) -> None:
    destination = tmp_path / "model.safetensors"

    assert download_file(f"{server.url}/to-private", destination, tokens=scoped(server), **FAST) == DIGEST

    assert [request.headers.get("Authorization") for request in server.requests] == [f"Bearer {TOKEN}"] * 2


def test_credentials_in_the_url_are_sent_as_basic_auth_and_never_shown(server: Server, tmp_path: Path) -> None:
    host = server.url.removeprefix("http://")

    assert download_file(f"http://user:pass%20word@{host}/basic", tmp_path / "model.safetensors", **FAST) == DIGEST

    message = failure(f"http://user:pass%20word@{host}/missing", tmp_path / "other.safetensors")
    assert message == f"http://<hidden>@{host}/missing: HTTP 404 Not Found: check the URL"


@pytest.fixture
def other(server: Server) -> Iterator[Server]:
    """A second download host: another port of 127.0.0.1."""
    with serve() as second:
        yield second


def bake_settings(**env: str) -> Settings:
    return load_settings({"MODEL_DIR": "/nonexistent/sd15", **env})


def test_each_host_is_sent_its_own_token_and_no_other(server: Server, other: Server, tmp_path: Path) -> None:
    """The README's case: a model from one host, a VAE from another, each with a token of its own."""
    first, second = server.url.removeprefix("http://"), other.url.removeprefix("http://")
    settings = bake_settings(
        MODEL_URL=f"{server.url}/private",
        VAE_URL=f"{other.url}/model.safetensors",
        DOWNLOAD_TOKENS=f"{first}={TOKEN}, {second}=token-of-the-second",
        HF_TOKEN="hf-token-never-sent",
        CIVITAI_TOKEN="civitai-token-never-sent",
    )

    for name, url in (("model", settings.model_url), ("vae", settings.vae_url)):
        assert url is not None
        cache_model._fetch(settings, url, tmp_path / name, None)

    assert server.authorizations() == [f"Bearer {TOKEN}"]
    assert other.authorizations() == ["Bearer token-of-the-second"]


def test_download_token_alone_goes_to_model_url_s_host_only(server: Server, other: Server, tmp_path: Path) -> None:
    settings = bake_settings(
        MODEL_URL=f"{server.url}/private",
        VAE_URL=f"{other.url}/model.safetensors",
        CONTROLNETS=f"{other.url}/files/v1-5%20pruned.safetensors",
        CONTROLNET_DIR=str(tmp_path / "controlnets"),
        DOWNLOAD_TOKEN=TOKEN,
    )

    cache_model._fetch(settings, f"{server.url}/private", tmp_path / "model", None)
    cache_model._fetch(settings, f"{other.url}/model.safetensors", tmp_path / "vae", None)
    cache_model._fetch(settings, f"{other.url}/files/v1-5%20pruned.safetensors", tmp_path / "controlnets", None)

    assert server.authorizations() == [f"Bearer {TOKEN}"]
    assert other.authorizations() == [None, None]


def test_a_token_for_a_host_and_any_port_goes_to_that_host_only(server: Server, tmp_path: Path) -> None:
    port = server.url.rsplit(":", 1)[1]
    settings = bake_settings(DOWNLOAD_TOKENS=f"127.0.0.1={TOKEN},localhost=token-for-localhost")

    cache_model._fetch(settings, f"{server.url}/model.safetensors", tmp_path / "a", None)
    cache_model._fetch(settings, f"http://localhost:{port}/model.safetensors", tmp_path / "b", None)

    assert server.authorizations() == [f"Bearer {TOKEN}", "Bearer token-for-localhost"]


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        pytest.param(
            {"DOWNLOAD_TOKEN": TOKEN},
            "DOWNLOAD_TOKEN is sent to MODEL_URL's host only, and MODEL_URL is not set; give each host its token: "
            "HF_TOKEN, CIVITAI_TOKEN or DOWNLOAD_TOKENS=host=token",
            id="download-token-without-model-url",
        ),
        pytest.param(
            {"HF_TOKEN": TOKEN, "DOWNLOAD_TOKENS": "huggingface.co:443=another-" + TOKEN},
            "HF_TOKEN and DOWNLOAD_TOKENS give different tokens for huggingface.co; give one",
            id="two-tokens-for-one-host",
        ),
        pytest.param(
            {"MODEL_URL": "https://civitai.com/api/download/models/1", "DOWNLOAD_TOKEN": TOKEN, "CIVITAI_TOKEN": "x"},
            "CIVITAI_TOKEN and DOWNLOAD_TOKEN give different tokens for civitai.com; give one",
            id="download-token-and-the-host-s-own",
        ),
        pytest.param(
            {"DOWNLOAD_TOKENS": f"example.com={TOKEN},{TOKEN}"},
            "DOWNLOAD_TOKENS=<hidden>: item 2 is not host=token",
            id="an-item-without-a-host",
        ),
        pytest.param(
            {"DOWNLOAD_TOKENS": f"https://example.com={TOKEN}"},
            "DOWNLOAD_TOKENS=<hidden>: item 1: the part before '=' is not a host, nor host:port",
            id="a-url-for-a-host",
        ),
    ],
)
def test_tokens_that_could_go_astray_are_refused_without_showing_them(env: dict[str, str], problem: str) -> None:
    with pytest.raises(SettingsError) as caught:
        bake_settings(**env)

    assert problem in str(caught.value)
    assert TOKEN not in str(caught.value)


def test_hf_token_and_civitai_token_are_for_their_hosts_exactly() -> None:
    tokens = bake_settings(HF_TOKEN="h", CIVITAI_TOKEN="c").host_tokens

    def sent(url: str) -> list[str]:
        return [token.variable for token in tokens if token.applies_to(url)]

    assert sent("https://huggingface.co/org/repo/resolve/main/model.safetensors") == ["HF_TOKEN"]
    assert sent("https://hf.co/org/repo/resolve/main/model.safetensors") == ["HF_TOKEN"]
    assert sent("https://civitai.com/api/download/models/1") == ["CIVITAI_TOKEN"]
    # Where Hugging Face redirects to, and look-alikes: no token.
    for url in (
        "https://cdn-lfs.huggingface.co/repos/x",
        "https://cas-bridge.xethub.hf.co/x",
        "https://huggingface.co.evil.example/x",
        "https://evil-huggingface.co/x",
        "https://image.civitai.com/x",
        # Plain HTTP, where anyone on the way reads the header: these hosts serve HTTPS only.
        "http://huggingface.co/org/repo/resolve/main/model.safetensors",
        "http://civitai.com:8080/api/download/models/1",
    ):
        assert sent(url) == [], url


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

    host = server.url.removeprefix("http://").split(":")[0]
    assert message == (
        f"{server.url}/private: HTTP 401 Unauthorized: the URL needs a token. Pass one for {host} in "
        f"DOWNLOAD_TOKENS={host}=TOKEN: `docker build --secret id=download_tokens,env=DOWNLOAD_TOKENS ...`"
    )
    assert server.counts["/private"] == 1


@pytest.mark.parametrize(
    ("url", "hint"),
    [
        ("https://huggingface.co/org/repo/resolve/main/x.safetensors", "HF_TOKEN: `docker build --secret id=hf_token"),
        ("https://civitai.com/api/download/models/1", "CIVITAI_TOKEN: `docker build --secret id=civitai_token"),
    ],
)
def test_the_hint_names_the_host_s_own_variable(url: str, hint: str) -> None:
    from builder.download import token_hint

    assert hint in token_hint(url)


def test_a_refused_token_is_named_but_never_shown(
    server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="builder.download"):
        message = failure(
            f"{server.url}/private", tmp_path / "model.safetensors", tokens=scoped(server, "wrong-" + TOKEN)
        )

    scope = server.url.removeprefix("http://")
    assert message.endswith(
        f"HTTP 401 Unauthorized: the token DOWNLOAD_TOKENS gives for {scope} was refused "
        "(wrong, expired, or without access to this file)"
    )
    assert TOKEN not in message
    assert TOKEN not in caplog.text


def test_secrets_in_the_url_and_the_redirect_are_never_shown(
    server: Server, cdn: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="builder.download"):
        missing = failure(f"{server.url}/missing?token=secret-in-query", tmp_path / "model.safetensors")
        forbidden = failure(f"{server.url}/to-forbidden-cdn", tmp_path / "model.safetensors", tokens=scoped(server))

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

    [part] = tmp_path.glob(".*.part")
    kept = part.stat().st_size
    assert kept == 3 * 256 * 1024  # each attempt added what it got
    assert message.startswith(
        f"{server.url}/drop-always?<hidden>: failed 3 attempts; the last error: the connection broke: "
    )
    assert message.endswith(
        f"The {kept} bytes received so far are kept in {part}, so a new build of this URL resumes from there"
    )
    assert len([record for record in caplog.records if record.levelno == logging.WARNING]) == 3
    assert "secret-in-query" not in message + caplog.text
    assert not destination.exists()

    failure(url, destination, attempts=1)
    assert server.ranges("/drop-always")[3:] == [f"bytes={kept}-"]


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


def test_download_to_folder_resumes_a_part_under_the_name_its_first_answer_gave(server: Server, tmp_path: Path) -> None:
    url = f"{server.url}/api/download/models/456"
    with pytest.raises(DownloadError):
        download_to_folder(url, tmp_path, attempts=1, **FAST)

    path, digest = download_to_folder(url, tmp_path, **FAST)

    assert (path, digest) == (tmp_path / CIVITAI_NAME, DIGEST)
    assert server.ranges("/api/download/models/456") == [None, f"bytes={len(DATA) // 2}-"]
    assert path.read_bytes() == DATA
    assert leftovers(tmp_path) == []


def test_download_to_folder_names_the_file_after_the_url_it_was_redirected_to(
    server: Server, cdn: Server, tmp_path: Path
) -> None:
    """Civitai's download URL names no file; the presigned URL it redirects to does."""
    path, digest = download_to_folder(f"{server.url}/private-to-cdn", tmp_path, tokens=scoped(server), **FAST)

    assert (path, digest) == (tmp_path / "model.safetensors", DIGEST)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("url", "final_url", "content_disposition", "expected"),
    [
        pytest.param(
            "https://civitai.com/api/download/models/128713?type=Model",
            "https://bucket.example.com/files/dreamshaper_8.safetensors?X-Amz-Signature=s",
            None,
            CIVITAI_NAME,
            id="civitai-names-no-file",
        ),
        pytest.param(
            "https://huggingface.co/o/r/resolve/main/vae.safetensors",
            "https://cas-bridge.xethub.hf.co/xet-bridge-us/0123abcd",
            None,
            "vae.safetensors",
            id="hugging-face-redirects-to-a-hash",
        ),
        pytest.param(
            "https://civitai.com/api/download/models/128713",
            "https://bucket.example.com/0123abcd",
            None,
            "128713",
            id="nothing-names-it",
        ),
        pytest.param(
            "https://civitai.com/api/download/models/128713",
            "https://bucket.example.com/x.bin",
            'attachment; filename="named.safetensors"',
            "named.safetensors",
            id="content-disposition-first",
        ),
    ],
)
def test_served_name(url: str, final_url: str, content_disposition: str | None, expected: str) -> None:
    assert served_name(url, final_url, content_disposition) == expected


def test_an_html_page_is_refused_before_its_body_and_nothing_is_kept(server: Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as raised:
        download_to_folder(f"{server.url}/login?token=secret", tmp_path, **FAST)

    host = server.url.removeprefix("http://").split(":")[0]
    assert str(raised.value) == (
        f"{server.url}/login?<hidden>: the server sent an HTML page (Content-Type text/html), not the file: a login "
        f"or error page? Check that the URL downloads the file. Pass one for {host} in DOWNLOAD_TOKENS={host}=TOKEN: "
        "`docker build --secret id=download_tokens,env=DOWNLOAD_TOKENS ...`"
    )
    assert server.counts["/login"] == 1
    assert list(tmp_path.iterdir()) == []


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
