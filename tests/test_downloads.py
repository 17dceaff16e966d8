"""LoRAs and checkpoints by URL (src/prepare/downloads.py), from real HTTP servers on 127.0.0.1.

The worker is told DOWNLOAD_HOSTS=127.0.0.1 and DOWNLOAD_ALLOW_PRIVATE=127.0.0.1 (that address only, as a
private mirror would be allowed), so a redirect to 127.0.0.2 is a redirect to a private address it refuses,
and one to ``localhost`` a redirect to a host it was not given. The servers count every request, serve
``Range`` requests, and can cut a body part way, answer 401/403/404, or redirect. Each refusal is followed by
a job that works.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import io
import os
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import handler
from builder.tiny_lora import write_test_loras
from builder.tiny_model import write_tiny_models
from src.errors import JobCancelledError
from src.prepare.downloads import Downloads, Lease
from src.prepare.http import system_resolve
from src.schema import InputError
from src.settings import Settings, SettingsError, load_settings

TOKEN = "tok-never-shown-3c1d"
JOB = {"prompt": "a lighthouse", "num_inference_steps": 2, "seed": 7, "width": 64, "height": 64}
CHUNK = 64 * 1024
# safetensors headers the safetensors loader refuses, each with 4 bytes of data: refused when downloaded.
MALFORMED_HEADERS = {
    "shape-null": b'{"unet.x.lora_down.weight": {"dtype": "F32", "shape": null, "data_offsets": [0, 4]}}',
    "shape-text": b'{"unet.x.lora_down.weight": {"dtype": "F32", "shape": ["x"], "data_offsets": [0, 4]}}',
    "no-shape": b'{"unet.x.lora_down.weight": {"dtype": "F32", "data_offsets": [0, 4]}}',
    "nested": b'{"unet.x.lora_down.weight": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}


# --- a real HTTP server ------------------------------------------------------------------------------


@dataclass
class Server:
    """What the server serves (path -> bytes), what it was asked, and how it misbehaves."""

    host: str
    port: int = 0
    files: dict[str, bytes] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    authorizations: list[str | None] = field(default_factory=list)
    ranges: list[str | None] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    partner: str = ""  # where /to-other redirects
    dripped: int = 0  # header lines /drip-headers/ sent before the client went
    gone: threading.Event = field(default_factory=threading.Event)  # a client left /crawl/ or /drip-headers/
    stalled: threading.Event = field(default_factory=threading.Event)  # /stall-*/ went silent
    release: threading.Event = field(default_factory=threading.Event)  # /stall-*/ may end

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def requests(self, path: str) -> int:
        return self.counts[path]


def _handler(state: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            del format, args

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            with state.lock:
                state.counts[path] += 1
                count = state.counts[path]
                state.authorizations.append(self.headers.get("Authorization"))
                state.ranges.append(self.headers.get("Range"))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.route(path, count)

        def route(self, path: str, count: int) -> None:
            name = path.rsplit("/", 1)[-1]
            data = state.files.get(name, b"")
            authorized = self.headers.get("Authorization") == f"Bearer {TOKEN}"
            routes: dict[str, Callable[[], None]] = {
                "/status/": lambda: self.send_empty(int(name)),
                # /redirect/<url-encoded target without scheme>
                "/redirect/": lambda: self.send_empty(302, location="http://" + path.removeprefix("/redirect/")),
                "/bad-location/": lambda: self.send_empty(302, location="http://[::1/x"),
                # Civitai: the name only in Content-Disposition
                "/api/download/": lambda: self.send_file(
                    data, disposition=f'attachment; filename="{name}.safetensors"'
                ),
                "/cut-once/": lambda: self.send_file(data, cut=count == 1),
                # No ETag, no Last-Modified: nothing to resume against.
                "/cut-once-plain/": lambda: self.send_file(data, cut=count == 1, validator=False),
                "/cut-always/": lambda: self.send_file(data, cut=True),
                "/slow/": lambda: self.send_file(data, delay=0.05),
                "/crawl/": lambda: self.send_file(data, delay=0.2, chunk=256),
                "/chunked/": lambda: self.send_chunked(data),
                "/drip-headers/": self.drip_headers,
                "/stall-head/": lambda: self.stall(data, head=True),
                "/stall-body/": lambda: self.stall(data, head=False),
                "/odd-length/": lambda: self.send_odd_length(data),
                "/private/": lambda: self.send_file(data) if authorized else self.send_empty(401),
            }
            answer = next((answer for prefix, answer in routes.items() if path.startswith(prefix)), None)
            if answer is not None:
                answer()
            elif name in state.files:
                self.send_file(data)
            else:
                self.send_empty(404)

        def send_empty(self, status: int, location: str = "") -> None:
            self.send_response(status)
            if location:
                self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def send_odd_length(self, data: bytes) -> None:
            """A Content-Length of a digit no int() reads: the length is unknown, the body ends with the connection."""
            self.send_response(200)
            self.send_header("Content-Length", "\u00b2")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
            self.close_connection = True

        def send_file(
            self,
            data: bytes,
            *,
            cut: bool = False,
            delay: float = 0,
            disposition: str = "",
            validator: bool = True,
            chunk: int = CHUNK,
        ) -> None:
            start = 0
            asked = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if asked:
                start = int(asked.group(1))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(data) - start))
            if validator:
                self.send_header("ETag", '"v1"')
            if disposition:
                self.send_header("Content-Disposition", disposition)
            self.end_headers()
            body = data[start:]
            if cut:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            try:
                for offset in range(0, len(body), chunk):
                    self.wfile.write(body[offset : offset + chunk])
                    self.wfile.flush()
                    time.sleep(delay)
            except OSError:
                state.gone.set()

        def drip_headers(self) -> None:
            """A status line, then a header line every 0.2 s for a minute: each read gets bytes in time."""
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            try:
                for number in range(300):
                    self.wfile.write(f"X-Drip-{number}: a\r\n".encode())
                    self.wfile.flush()
                    state.dripped += 1
                    time.sleep(0.2)
            except OSError:
                state.gone.set()

        def stall(self, data: bytes, *, head: bool) -> None:
            """Silent before the status line (``head``), or after the headers, until released: a client waits for
            bytes that do not come, whenever it is cancelled."""
            if not head:
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.flush()
            state.stalled.set()
            state.release.wait(60)

        def send_chunked(self, data: bytes) -> None:
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for offset in range(0, len(data), CHUNK):
                piece = data[offset : offset + CHUNK]
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")

    return Handler


@contextlib.contextmanager
def serving(host: str) -> Iterator[Server]:
    state = Server(host)
    server = ThreadingHTTPServer((host, 0), _handler(state))
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()


# --- the files it serves -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny LoRA (also in LORA_DIR), a tiny checkpoint (also in MODELS_DIR), an SDXL LoRA, a pickle."""
    root = tmp_path_factory.mktemp("served")
    lora = write_test_loras(tiny_model_dir, root / "loras", count=1)[0]
    models = write_tiny_models(root / "models")
    sdxl = root / "sdxl-lora.safetensors"
    save_file(
        {
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4),
        },
        sdxl,
    )
    pickle = root / "old.ckpt"
    pickle.write_bytes(b"PK\x03\x04" + b"\0" * 4096)
    return {"lora": lora, "model": models / "tiny-a.safetensors", "sdxl": sdxl, "pickle": pickle}


@pytest.fixture
def server(files: dict[str, Path]) -> Iterator[Server]:
    with serving("127.0.0.1") as main, serving("127.0.0.2") as other:
        for state in (main, other):
            state.files = {
                "detail.safetensors": files["lora"].read_bytes(),
                "detail": files["lora"].read_bytes(),
                "style.safetensors": files["model"].read_bytes(),
                "style": files["model"].read_bytes(),
                "xl.safetensors": files["sdxl"].read_bytes(),
                "old.ckpt": files["pickle"].read_bytes(),
                **{
                    f"{name}.safetensors": len(header).to_bytes(8, "little") + header + bytes(4)
                    for name, header in MALFORMED_HEADERS.items()
                },
            }
        main.partner = other.url
        yield main


@pytest.fixture
def start(
    tiny_model_dir: Path, files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Path]:
    """Start a fresh worker that downloads from 127.0.0.1; its cache folder."""

    def start_worker(**variables: str | None) -> Path:
        for item in Settings.model_fields.values():
            monkeypatch.delenv(str(item.alias), raising=False)
        cache = tmp_path / "downloads"
        defaults: dict[str, str | None] = {
            "MODEL_ID": str(tiny_model_dir),
            "MODEL_CONFIG": str(tiny_model_dir),
            "LORA_DIR": str(files["lora"].parent),
            "MODELS_DIR": str(files["model"].parent),
            "DOWNLOAD_HOSTS": "127.0.0.1",
            "DOWNLOAD_ALLOW_PRIVATE": "127.0.0.1",
            "DOWNLOAD_CACHE_DIR": str(cache),
            "EMBED_PARAMETERS": "false",
        }
        for name, value in {**defaults, **variables}.items():
            if value is not None:
                monkeypatch.setenv(name, value)
        for name in ("_settings", "_engine", "_downloads"):
            monkeypatch.setattr(handler, name, None)
        return cache

    return start_worker


def run(**fields: Any) -> dict[str, Any]:
    return asyncio.run(handler.handler({"id": "downloads-test", "input": {**JOB, **fields}}))


def pixels(result: dict[str, Any]) -> bytes:
    assert "images" in result, result
    with Image.open(io.BytesIO(base64.b64decode(result["images"][0]["image"]))) as image:
        return image.convert("RGB").tobytes()


def kept(cache: Path) -> list[str]:
    """The files in the cache and in its scratch folder."""
    return sorted(path.name for sub in ("files", ".partial") for path in (cache / sub).glob("*"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_in(folder: Path, model_config: Path) -> Downloads:
    """A worker's download cache in ``folder``, taking files from 127.0.0.1."""
    variables = {"DOWNLOAD_HOSTS": "127.0.0.1", "DOWNLOAD_ALLOW_PRIVATE": "true", "DOWNLOAD_CACHE_DIR": str(folder)}
    return Downloads(load_settings({**variables, "MODEL_CONFIG": str(model_config)}), system_resolve)


# --- LoRAs and models by URL ----------------------------------------------------------------------------


def test_a_lora_by_url_is_downloaded_once_and_draws_as_the_same_file_in_lora_dir(
    start: Callable[..., Path], server: Server, files: dict[str, Path]
) -> None:
    start()
    url = f"{server.url}/loras/detail.safetensors?token=abc"
    first = run(loras=[{"url": url, "scale": 0.8}])
    second = run(loras=[{"url": url, "scale": 0.8, "sha256": sha256(files["lora"])}])
    named = run(loras=[{"name": files["lora"].stem, "scale": 0.8}])

    assert server.requests("/loras/detail.safetensors") == 1, "the second job read no network"
    assert pixels(first) == pixels(second) == pixels(named)
    applied = first["metadata"]["loras"][0]
    assert applied["name"] == "detail"
    assert applied["url"] == f"{server.url}/loras/detail.safetensors", "the query is never shown"
    assert applied["hash"] == named["metadata"]["loras"][0]["hash"]
    assert "token=abc" not in str(first)


def test_a_model_by_url_draws_as_the_same_checkpoint_in_models_dir(
    start: Callable[..., Path], server: Server, files: dict[str, Path]
) -> None:
    start(MODELS_DIR=None)
    by_string = run(model=f"{server.url}/api/download/style")
    by_object = run(model={"url": f"{server.url}/api/download/style", "sha256": sha256(files["model"])})
    start(MODEL_ID=str(files["model"]), MODELS_DIR=None)
    fresh = run()

    assert server.requests("/api/download/style") == 1
    assert pixels(by_string) == pixels(by_object) == pixels(fresh)
    metadata = by_string["metadata"]
    assert metadata["model"] == "style", "named by its file name, from Content-Disposition"
    assert metadata["model_hash"] == sha256(files["model"])[:10]
    assert metadata["model_url"] == f"{server.url}/api/download/style"
    assert "images" in run(), "the default model is back for a job that names none"


def test_two_jobs_asking_for_one_url_at_once_download_it_once(start: Callable[..., Path], server: Server) -> None:
    start(CONCURRENCY="2")
    job = {**JOB, "loras": [{"url": f"{server.url}/slow/detail.safetensors"}]}
    downloads = handler.get_downloads()
    url_lock, download = downloads._url_lock, downloads._download
    both_asked = threading.Barrier(2, timeout=30)
    downloaded: list[str] = []

    @contextlib.contextmanager
    def lock_once_both_asked(url: str, stop: Any) -> Iterator[None]:
        both_asked.wait()  # neither job has the file yet: both found the cache empty
        with url_lock(url, stop):
            yield

    def counted(url: str, *args: Any) -> Any:
        downloaded.append(url)
        return download(url, *args)

    downloads._url_lock = lock_once_both_asked  # type: ignore[method-assign]
    downloads._download = counted  # type: ignore[method-assign]

    async def both() -> list[dict[str, Any]]:
        return await asyncio.gather(*(handler.handler({"id": f"job-{n}", "input": job}) for n in range(2)))

    results = asyncio.run(both())

    assert all("images" in result for result in results), results
    assert len(downloaded) == 1, "the second found the file the first downloaded"
    assert server.requests("/slow/detail.safetensors") == 1


# --- cut connections, checksums, sizes ----------------------------------------------------------------


def test_a_cut_connection_resumes_where_it_stopped(
    start: Callable[..., Path], server: Server, files: dict[str, Path]
) -> None:
    cache = start()
    result = run(loras=[{"url": f"{server.url}/cut-once/detail.safetensors", "sha256": sha256(files["lora"])}])

    assert "images" in result, result
    assert server.requests("/cut-once/detail.safetensors") == 2
    assert str(server.ranges[-1]).startswith("bytes="), "the rest only"
    assert kept(cache) == [f"{sha256(files['lora'])}.safetensors"]


def test_a_cut_connection_without_a_validator_is_downloaded_again_whole(
    start: Callable[..., Path], server: Server, files: dict[str, Path]
) -> None:
    # No ETag, no Last-Modified: a file changed between the two requests could not be told apart, and the rest
    # of another version would be spliced onto this one's start.
    start()
    result = run(loras=[{"url": f"{server.url}/cut-once-plain/detail.safetensors", "sha256": sha256(files["lora"])}])

    assert "images" in result, result
    assert server.requests("/cut-once-plain/detail.safetensors") == 2
    assert server.ranges[-2:] == [None, None], "no Range without If-Range"


def test_a_connection_cut_every_time_fails_and_keeps_nothing(start: Callable[..., Path], server: Server) -> None:
    cache = start()
    error = run(loras=[{"url": f"{server.url}/cut-always/detail.safetensors"}])["error"]

    assert error.startswith(f"loras.0.url: {server.url}/cut-always/detail.safetensors: the connection failed")
    assert server.requests("/cut-always/detail.safetensors") == 3
    assert kept(cache) == []
    assert "images" in run()


def test_a_wrong_checksum_refuses_the_job_and_keeps_nothing(start: Callable[..., Path], server: Server) -> None:
    cache = start()
    error = run(loras=[{"url": f"{server.url}/loras/detail.safetensors", "sha256": "0" * 64}])["error"]

    assert "its SHA-256 is" in error
    assert f"not the {'0' * 64} the request gave; nothing was kept" in error
    assert kept(cache) == []
    assert list((cache / "index").glob("*")) == []
    assert "images" in run(loras=[{"url": f"{server.url}/loras/detail.safetensors"}])


@pytest.mark.parametrize("route", ["loras", "chunked"], ids=["content-length", "no-length"])
def test_a_file_over_the_cap_is_stopped_at_the_cap(
    start: Callable[..., Path], server: Server, files: dict[str, Path], route: str
) -> None:
    size = files["lora"].stat().st_size
    cache = start(MAX_LORA_DOWNLOAD_MB=str(size / 2 / 1e6))
    error = run(loras=[{"url": f"{server.url}/{route}/detail.safetensors"}])["error"]

    if route == "loras":
        assert f"it is {size} bytes, over MAX_LORA_DOWNLOAD_MB=" in error, "refused before the body is read"
    else:
        assert "it grew past MAX_LORA_DOWNLOAD_MB=" in error
        assert "stopped there" in error
    assert kept(cache) == []
    assert "images" in run()


def test_a_server_dripping_its_headers_is_cut_at_the_deadline(start: Callable[..., Path], server: Server) -> None:
    # Every read gets a header line well within the socket's timeout: only the deadline itself can end it.
    cache = start(DOWNLOAD_TIMEOUT_SECONDS="1")
    error = run(loras=[{"url": f"{server.url}/drip-headers/detail.safetensors"}])["error"]

    assert error == (
        f"loras.0.url: {server.url}/drip-headers/detail.safetensors: "
        "timed out: not done within DOWNLOAD_TIMEOUT_SECONDS=1"
    )
    assert server.gone.wait(30), "the connection was shut"
    assert server.dripped < 300, "long before the server was done"
    assert kept(cache) == []


def test_a_cancelled_job_stops_its_download(server: Server, tmp_path: Path, tiny_model_dir: Path) -> None:
    downloads = cache_in(tmp_path / "cache", tiny_model_dir)
    cancelled = threading.Event()
    raised: list[BaseException] = []

    def fetch() -> None:
        try:
            downloads.fetch(
                f"{server.url}/crawl/detail.safetensors",  # 256 bytes every 0.2 s: minutes for the file
                kind="lora",
                sha256=None,
                field="loras.0.url",
                deadline=time.monotonic() + 600,
                lease=Lease(),
                cancelled=cancelled,
            )
        except BaseException as error:  # what the test checks
            raised.append(error)

    thread = threading.Thread(target=fetch)
    thread.start()
    for _ in range(300):
        if server.requests("/crawl/detail.safetensors"):
            break
        time.sleep(0.1)
    cancelled.set()
    thread.join(60)

    assert not thread.is_alive()
    assert [type(error).__name__ for error in raised] == ["JobCancelledError"]
    assert "cancelled; it stopped downloading" in str(raised[0])
    assert server.gone.wait(30), "the connection was closed"
    assert kept(tmp_path / "cache") == []


@pytest.mark.parametrize("route", ["stall-head", "stall-body"])
def test_a_cancelled_job_stops_a_download_whose_server_went_silent(
    server: Server, tmp_path: Path, tiny_model_dir: Path, route: str
) -> None:
    variables = {"DOWNLOAD_HOSTS": "127.0.0.1", "DOWNLOAD_ALLOW_PRIVATE": "true", "MAX_DOWNLOADS": "1"}
    settings = load_settings({**variables, "DOWNLOAD_CACHE_DIR": str(tmp_path), "MODEL_CONFIG": str(tiny_model_dir)})
    downloads = Downloads(settings, system_resolve)
    cancelled = threading.Event()
    threading.Thread(target=lambda: server.stalled.wait(60) and cancelled.set(), daemon=True).start()
    lease = Lease()

    def fetch(path: str, deadline: float) -> Any:
        return downloads.fetch(
            f"{server.url}/{path}",
            kind="lora",
            sha256=None,
            field="loras.0.url",
            deadline=deadline,
            lease=lease,
            cancelled=cancelled if path.startswith("stall") else None,
        )

    # Cancelled while nothing arrives: unless its connection is shut then, it waits for its deadline.
    deadline = time.monotonic() + 30
    with pytest.raises(JobCancelledError, match=r"^the job was cancelled; it stopped downloading$"):
        fetch(f"{route}/detail.safetensors", deadline)
    stopped_before_the_deadline = time.monotonic() < deadline
    after = fetch("loras/detail.safetensors", time.monotonic() + 60)
    lease.release()

    assert server.stalled.is_set()
    assert stopped_before_the_deadline
    assert kept(tmp_path) == [after.path.name], "the one slot was given back; nothing of the stalled file was kept"


def test_bad_headers_from_a_server_fail_the_job_naming_the_field(start: Callable[..., Path], server: Server) -> None:
    start()
    error = run(loras=[{"url": f"{server.url}/bad-location/detail.safetensors"}])["error"]
    unknown_length = run(loras=[{"url": f"{server.url}/odd-length/detail.safetensors"}])

    assert error == f"loras.0.url: {server.url}/bad-location/detail.safetensors: HTTP 302 redirect to an invalid URL"
    assert "images" in unknown_length, "a length no one can read is no length: the body is read to its end"


# --- hosts, addresses, tokens --------------------------------------------------------------------------


def test_a_redirect_to_a_host_not_allowed_is_refused(start: Callable[..., Path], server: Server) -> None:
    start()
    target = f"localhost:{server.port}/loras/detail.safetensors"
    error = run(loras=[{"url": f"{server.url}/redirect/{target}"}])["error"]

    assert error == (
        f"loras.0.url: {server.url}/redirect/{target} (redirected to http://{target}): "
        "the host localhost is not in DOWNLOAD_HOSTS (127.0.0.1)"
    )
    assert "images" in run()


def test_a_url_off_the_list_is_refused_before_any_connection(start: Callable[..., Path], server: Server) -> None:
    start(DOWNLOAD_HOSTS="civitai.com")
    error = run(model=f"{server.url}/style.safetensors")["error"]

    assert error.endswith("the host 127.0.0.1 is not in DOWNLOAD_HOSTS (civitai.com)")
    assert server.requests("/style.safetensors") == 0
    assert "images" in run()


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("127.0.0.2:{port}/style.safetensors", "127.0.0.2 is a loopback address"),
        ("169.254.169.254/latest/meta-data", "169.254.169.254 is the cloud metadata address"),
        ("10.1.2.3/style.safetensors", "10.1.2.3 is a private address"),
    ],
)
def test_a_redirect_to_a_private_address_is_refused(
    start: Callable[..., Path], server: Server, target: str, says: str
) -> None:
    start(DOWNLOAD_HOSTS="127.0.0.1,127.0.0.2,169.254.169.254,10.1.2.3")
    partner_port = urlsplit(server.partner).port
    error = run(model=f"{server.url}/redirect/{target.format(port=partner_port)}")["error"]

    assert error.endswith(f"{says}; set DOWNLOAD_ALLOW_PRIVATE (it allows 127.0.0.1/32) to allow"), error
    assert "images" in run()


def test_a_url_off_the_list_is_refused_even_when_its_checksum_is_cached(
    start: Callable[..., Path], server: Server, files: dict[str, Path]
) -> None:
    start()
    digest = sha256(files["lora"])
    assert "images" in run(loras=[{"url": f"{server.url}/loras/detail.safetensors", "sha256": digest}])
    error = run(loras=[{"url": f"http://localhost:{server.port}/loras/detail.safetensors", "sha256": digest}])

    assert error["error"].endswith("the host localhost is not in DOWNLOAD_HOSTS (127.0.0.1)"), error


def test_private_addresses_are_refused_unless_allowed(start: Callable[..., Path], server: Server) -> None:
    start(DOWNLOAD_ALLOW_PRIVATE=None)
    error = run(model=f"{server.url}/style.safetensors")["error"]

    assert error.endswith("127.0.0.1 is a loopback address; set DOWNLOAD_ALLOW_PRIVATE=true to allow")
    assert server.requests("/style.safetensors") == 0


@pytest.mark.parametrize(
    ("status", "says"),
    [
        (401, "refused; the token for its host"),
        (403, "the token for its host (HF_TOKEN, CIVITAI_TOKEN, DOWNLOAD_TOKENS) is wrong"),
        (404, "no such file"),
    ],
)
def test_an_error_status_is_named_and_the_token_never_shown(
    start: Callable[..., Path], server: Server, status: int, says: str
) -> None:
    start(DOWNLOAD_TOKENS=f"127.0.0.1={TOKEN}")
    error = run(loras=[{"url": f"{server.url}/status/{status}?token={TOKEN}"}])["error"]

    assert f"HTTP {status}" in error
    assert says in error
    assert TOKEN not in error
    assert server.authorizations[-1] == f"Bearer {TOKEN}"
    assert "images" in run()


@pytest.mark.parametrize(
    ("tokens", "path", "says"),
    [
        ("", "status/401", "HTTP 401 Unauthorized: refused; no token is sent to its host: does it need one"),
        (
            f"127.0.0.1={TOKEN}",
            "redirect/127.0.0.2:{port}/status/403",
            "HTTP 403 Forbidden: refused by the file host, which is sent no token: an expired or single-use link?",
        ),
    ],
    ids=["no-token", "after-a-redirect"],
)
def test_a_refusal_blames_a_token_only_where_one_was_sent(
    start: Callable[..., Path], server: Server, tokens: str, path: str, says: str
) -> None:
    start(DOWNLOAD_HOSTS="127.0.0.1,127.0.0.2", DOWNLOAD_ALLOW_PRIVATE="true", DOWNLOAD_TOKENS=tokens or None)
    error = run(model=f"{server.url}/{path.format(port=urlsplit(server.partner).port)}")["error"]

    assert says in error, error
    assert "token for its host" not in error


def test_a_token_goes_to_its_host_only_never_past_a_redirect(start: Callable[..., Path], server: Server) -> None:
    start(DOWNLOAD_HOSTS="127.0.0.1,localhost", DOWNLOAD_TOKENS=f"127.0.0.1={TOKEN}")
    own = run(loras=[{"url": f"{server.url}/private/detail.safetensors"}])
    elsewhere = run(model=f"{server.url}/redirect/localhost:{server.port}/style.safetensors")

    assert "images" in own, own
    assert "images" in elsewhere, elsewhere
    assert server.authorizations[-2:] == [f"Bearer {TOKEN}", None], "the redirect's host got no token"


# --- files that are not what the request says ---------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "name", "says"),
    [
        ("loras", "xl.safetensors", "the file xl cannot be used: it is a LoRA for SDXL, not SD 1.5"),
        ("loras", "old.ckpt", "it is a zip archive: a pickled PyTorch file (.ckpt, .pt, .pth), which is never opened"),
        ("model", "detail.safetensors", "the file detail cannot be used: a LoRA"),
        *(
            ("loras", f"{name}.safetensors", f"the file {name} cannot be used: not a safetensors file (its header")
            for name in MALFORMED_HEADERS
        ),
        # A header nested past what json reads is no safetensors header, for a model as for a LoRA.
        (
            "model",
            "nested.safetensors",
            "the file nested cannot be used: not a safetensors file (its header is not JSON)",
        ),
    ],
)
def test_a_file_that_is_not_what_the_field_takes_is_refused_and_not_kept(
    start: Callable[..., Path], server: Server, field: str, name: str, says: str
) -> None:
    cache = start()
    url = f"{server.url}/files/{name}"
    error = run(**({"loras": [{"url": url}]} if field == "loras" else {"model": url}))["error"]

    assert error.startswith(f"{'loras.0.url' if field == 'loras' else 'model'}: {url}: "), error
    assert says in error, error
    assert kept(cache) == []
    assert "images" in run()


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"loras": [{"name": "a", "url": "http://127.0.0.1/a.safetensors"}]}, "its url, one of the two"),
        ({"loras": [{"name": "a", "sha256": "0" * 64}]}, "sha256 goes with url"),
        ({"loras": [{"url": "ftp://127.0.0.1/a.safetensors"}]}, "must be an http:// or https:// URL"),
        ({"model": {"url": "http://127.0.0.1/m.safetensors", "sha256": "xyz"}}, "sha256"),
    ],
)
def test_a_malformed_download_field_is_refused_by_the_schema(
    start: Callable[..., Path], fields: dict[str, Any], says: str
) -> None:
    start()
    error = run(**fields)["error"]

    assert error.startswith("invalid input:"), error
    assert says in error, error


def test_urls_are_refused_when_downloads_are_off(start: Callable[..., Path], server: Server) -> None:
    start(DOWNLOAD_HOSTS=None)
    lora = run(loras=[{"url": f"{server.url}/detail.safetensors"}])["error"]
    model = run(model=f"{server.url}/style.safetensors")["error"]

    assert "loras.0.url: this worker downloads no files: DOWNLOAD_HOSTS is not set" in lora
    assert "this worker downloads no files: DOWNLOAD_HOSTS is not set" in model
    assert server.requests("/detail.safetensors") == server.requests("/style.safetensors") == 0


# --- the cache's budget ---------------------------------------------------------------------------------


def test_eviction_keeps_the_cache_in_its_budget_and_never_removes_a_file_in_use(
    server: Server, files: dict[str, Path], tmp_path: Path, tiny_model_dir: Path
) -> None:
    lora_size = files["lora"].stat().st_size
    settings = load_settings(
        {
            "DOWNLOAD_HOSTS": "127.0.0.1",
            "DOWNLOAD_ALLOW_PRIVATE": "true",
            "DOWNLOAD_CACHE_DIR": str(tmp_path / "cache"),
            "DOWNLOAD_CACHE_GB": str(lora_size * 1.5 / 1e9),  # room for one LoRA
            "MODEL_CONFIG": str(tiny_model_dir),
        }
    )
    downloads = Downloads(settings, system_resolve)
    write_test_loras(tiny_model_dir, tmp_path / "more", count=2, seed=5)
    served = sorted((tmp_path / "more").glob("*.safetensors"))
    server.files["b.safetensors"], server.files["c.safetensors"] = (path.read_bytes() for path in served)
    deadline = time.monotonic() + 60

    def fetch(name: str, lease: Lease) -> Path:
        return downloads.fetch(
            f"{server.url}/{name}", kind="lora", sha256=None, field="loras.0.url", deadline=deadline, lease=lease
        ).path

    in_use = Lease()
    a = fetch("detail.safetensors", in_use)
    done = Lease()
    b = fetch("b.safetensors", done)
    done.release()
    assert a.exists(), "a is in use"
    assert b.exists(), "b is the file just asked for"
    holding_c = Lease()
    c = fetch("c.safetensors", holding_c)
    assert a.exists()
    assert c.exists()
    assert not b.exists(), "b, least recently used and not in use, went"
    in_use.release()
    holding_c.release()
    holding_b = Lease()
    fetch("b.safetensors", holding_b)
    holding_b.release()
    assert not a.exists(), "a, released, goes in its turn"
    assert server.requests("/b.safetensors") == 2, "an evicted file is downloaded again"


def test_the_same_bytes_from_a_second_url_leave_the_held_file_in_place(
    server: Server, tmp_path: Path, tiny_model_dir: Path
) -> None:
    downloads = cache_in(tmp_path / "cache", tiny_model_dir)

    def fetch(path: str, lease: Lease) -> Path:
        url = f"{server.url}{path}"
        return downloads.fetch(
            url, kind="lora", sha256=None, field="loras.0.url", deadline=time.monotonic() + 60, lease=lease
        ).path

    holding = Lease()
    first = fetch("/detail.safetensors", holding)
    held = first.stat().st_ino
    also = Lease()
    second = fetch("/loras/detail.safetensors", also)

    assert second == first
    assert first.stat().st_ino == held, "the file a job holds is the one in the cache, which eviction must lock first"
    holding.release()
    also.release()


def test_parts_left_by_a_worker_that_died_are_swept_and_parts_being_written_are_not(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    cache = tmp_path / "cache"
    (cache / ".partial").mkdir(parents=True)
    left, writing, fresh = (cache / ".partial" / f"{name}.safetensors" for name in ("left", "writing", "fresh"))
    for path in (left, writing, fresh):
        path.write_bytes(b"\0" * 1000)
    for path in (left, writing):
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    settings = load_settings(
        {"DOWNLOAD_HOSTS": "127.0.0.1", "DOWNLOAD_CACHE_DIR": str(cache), "MODEL_CONFIG": str(tiny_model_dir)}
    )

    with writing.open("rb") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # as a download in another worker holds its part
        Downloads(settings, system_resolve)

        assert sorted(path.name for path in (cache / ".partial").iterdir()) == [fresh.name, writing.name]


def test_a_refused_download_names_the_field_when_called_directly(server: Server, tmp_path: Path) -> None:
    settings = load_settings(
        {"DOWNLOAD_HOSTS": "127.0.0.1", "DOWNLOAD_ALLOW_PRIVATE": "true", "DOWNLOAD_CACHE_DIR": str(tmp_path)}
    )
    with pytest.raises(InputError, match=r"^model: .*/missing.safetensors: HTTP 404"):
        Downloads(settings, system_resolve).fetch(
            f"{server.url}/missing.safetensors",
            kind="model",
            sha256=None,
            field="model",
            deadline=time.monotonic() + 30,
            lease=Lease(),
        )
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.parametrize(
    ("variables", "says"),
    [
        ({"DOWNLOAD_HOSTS": "https://civitai.com"}, "DOWNLOAD_HOSTS='https://civitai.com': 'https://civitai.com' is"),
        ({"DOWNLOAD_HOSTS": "civitai.com/models"}, "is not a host name"),
        ({"DOWNLOAD_ALLOW_PRIVATE": "sometimes"}, "'sometimes' is not true, false, an address or a network"),
        ({"MAX_DOWNLOADS": "0"}, "MAX_DOWNLOADS"),
    ],
)
def test_download_settings_are_checked_at_startup(variables: dict[str, str], says: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(says)):
        load_settings(variables)


def test_a_cache_folder_that_cannot_be_written_stops_the_start(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    settings = load_settings({"DOWNLOAD_HOSTS": "civitai.com", "DOWNLOAD_CACHE_DIR": str(blocked / "cache")})

    with pytest.raises(SettingsError, match=r"DOWNLOAD_CACHE_DIR=.*: cannot be written"):
        Downloads(settings, system_resolve)
