"""Image inputs (src/prepare/images.py): base64, URLs from a real local HTTP(S) server, s3:// from a real S3 server.

Every hostile input is a tiny fixture: a redirect chain, a server that drips one byte at a time, an endless
body, a 20000x20000 PNG of a few KB. Tests assert the message a user sees, never how long anything took.
moto and cryptography are imported inside the tests that use them: the GPU machine has neither.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import io
import ipaddress
import socket
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from PIL import Image, ImageFile

from src.prepare.http import address_problem
from src.prepare.images import load_image, load_mask
from src.schema import InputError
from src.settings import Settings, load_settings
from tests.conftest import ACCESS_KEY, SECRET, S3Server, free_port

DEFAULTS = load_settings({})
PRIVATE_OK = load_settings({"IMAGE_URLS_ALLOW_PRIVATE": "true"})


# --- files ---------------------------------------------------------------------------------------


def encode(image: Image.Image, file_format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, file_format, **options)
    return buffer.getvalue()


def halves(size: tuple[int, int] = (64, 32)) -> Image.Image:
    """Left half red, right half blue: shows which way an image was turned."""
    image = Image.new("RGB", size, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
    return image


def bomb_png(width: int, height: int) -> bytes:
    """A 1-bit greyscale PNG of zeros: a few KB here, width x height pixels once decoded.

    Written chunk by chunk, a zero row at a time through one zlib stream, since Pillow would have to
    allocate the whole image to save it.
    """

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = bytes(1 + (width + 7) // 8)  # filter byte, then 1 bit per pixel
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def exif_orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


PNG = encode(halves(), "PNG")
JPEG_ROTATED = encode(halves(), "JPEG", quality=95, exif=exif_orientation(6))  # 6: shown turned 90° clockwise
WEBP = encode(halves(), "WEBP", lossless=True)
GIF = encode(halves(), "GIF")
RGBA = Image.new("RGBA", (16, 16), (255, 0, 0, 255))
RGBA.paste((0, 0, 0, 0), (0, 0, 8, 16))  # left half fully transparent
RGBA_PNG = encode(RGBA, "PNG")
BOMB = bomb_png(20000, 20000)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def pixel(loaded_image: Image.Image, xy: tuple[int, int]) -> Any:
    return loaded_image.getpixel(xy)


# --- a real HTTP server on 127.0.0.1 ---------------------------------------------------------------


@dataclass
class Server:
    url: str
    stop: threading.Event
    headers: dict[str, dict[str, str]] = field(default_factory=dict)


def make_handler(stop: threading.Event, seen: dict[str, dict[str, str]]) -> type[BaseHTTPRequestHandler]:
    files = {
        "/cat.png": (PNG, "image/png"),
        "/rotated.jpg": (JPEG_ROTATED, "image/jpeg"),
        "/pic.webp": (WEBP, "image/webp"),
        "/alpha.png": (RGBA_PNG, "image/png"),
        "/bomb.png": (BOMB, "image/png"),
        "/anim.gif": (GIF, "image/gif"),
        "/notes.txt": (b"just some text, not an image\n" * 10, "text/plain"),
        "/mislabelled": (PNG, "text/plain"),  # the content decides, not the type
        "/truncated.png": (PNG[: len(PNG) // 2], "image/png"),
    }

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            del format, args

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            seen[path] = dict(self.headers)
            # The client hangs up on an endless or dripping body, as it should.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.route(path)

        def route(self, path: str) -> None:
            if path in files:
                body, content_type = files[path]
                self.send(200, body, content_type)
            elif path.startswith("/redirect/"):
                hops = int(path.rsplit("/", 1)[1])
                target = "/cat.png" if hops == 1 else f"/redirect/{hops - 1}"
                # Odd hops give an absolute Location, even ones a relative one ("1" from /redirect/2).
                location = f"http://{self.headers['Host']}{target}" if hops % 2 else str(hops - 1)
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif path == "/to-ftp":
                self.send_response(301)
                self.send_header("Location", "ftp://127.0.0.1/cat.png")
                self.end_headers()
            elif path == "/drip":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                while not stop.wait(0.5):
                    self.wfile.write(b"\x89")
                    self.wfile.flush()
            elif path == "/silent":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                self.wfile.write(PNG[:16])
                self.wfile.flush()
                stop.wait()  # then nothing more, until the test server stops
            elif path == "/endless":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                self.wfile.write(PNG[:16])
                while not stop.is_set():
                    self.wfile.write(bytes(64 * 1024))
            elif path == "/huge-length":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(10**9))
                self.end_headers()
                self.wfile.write(PNG)
            else:
                self.send(404, b"not found", "text/plain")

        def send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def serve(wrap: Callable[[ThreadingHTTPServer], None] | None = None) -> Iterator[Server]:
    stop = threading.Event()
    seen: dict[str, dict[str, str]] = {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(stop, seen))
    httpd.daemon_threads = True
    if wrap is not None:
        wrap(httpd)
    thread = threading.Thread(target=httpd.serve_forever, name="test-image-server", daemon=True)
    thread.start()
    scheme = "http" if wrap is None else "https"
    try:
        yield Server(f"{scheme}://127.0.0.1:{httpd.server_address[1]}", stop, seen)
    finally:
        stop.set()  # ends the drip and the endless body if a client is still there
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    yield from serve()


def fetch(url: str, **variables: str) -> Any:
    settings = load_settings({"IMAGE_URLS_ALLOW_PRIVATE": "true", **variables})
    return load_image(url, "image", settings, None)


def fetch_error(url: str, **variables: str) -> str:
    with pytest.raises(InputError) as error:
        fetch(url, **variables)
    return str(error.value)


# --- the address classifier (no network) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("127.0.0.1", "a loopback address"),
        ("10.0.0.1", "a private address"),
        ("192.168.1.20", "a private address"),
        ("169.254.169.254", "the cloud metadata address"),
        ("169.254.10.1", "a link-local address"),
        ("::1", "a loopback address"),
        ("fd00:ec2::254", "the cloud metadata address"),
        ("fd12::1", "a private address"),
        ("fe80::1", "a link-local address"),
        ("::ffff:127.0.0.1", "a loopback address (127.0.0.1 inside IPv6)"),
        ("::ffff:169.254.169.254", "the cloud metadata address (169.254.169.254 inside IPv6)"),
        ("64:ff9b::a00:1", "a private address (10.0.0.1 inside IPv6)"),
        ("2002:7f00:1::1", "a loopback address (127.0.0.1 inside IPv6)"),
        ("100.64.0.1", "a shared (carrier-grade NAT) address"),
        ("0.0.0.0", "an unspecified address"),
        ("224.0.0.1", "a multicast address"),
        ("240.0.0.1", "a private address"),
        ("8.8.8.8", None),
        ("2001:4860:4860::8888", None),
        ("::ffff:8.8.8.8", None),
    ],
)
def test_address_classifier(address: str, problem: str | None) -> None:
    assert address_problem(ipaddress.ip_address(address)) == problem


# --- URLs ----------------------------------------------------------------------------------------


def test_png_from_a_url(server: Server) -> None:
    loaded = fetch(f"{server.url}/cat.png?token=SECRET-TOKEN")

    assert loaded.image.mode == "RGB"
    assert loaded.image.size == (64, 32)
    assert pixel(loaded.image, (0, 0)) == (255, 0, 0)
    assert loaded.warnings == []
    assert loaded.source == f"{server.url}/cat.png?<hidden>"
    assert server.headers["/cat.png"]["User-Agent"].startswith("sd15-worker/")
    assert server.headers["/cat.png"]["Host"] == server.url.removeprefix("http://")


def test_jpeg_is_turned_per_its_exif_orientation(server: Server) -> None:
    loaded = fetch(f"{server.url}/rotated.jpg")

    assert loaded.image.size == (32, 64)
    red, _, blue = pixel(loaded.image, (16, 8))  # the red left half is now on top
    assert red > 200
    assert blue < 60
    assert loaded.warnings == ["image: rotated per its EXIF orientation"]


def test_webp_from_a_url(server: Server) -> None:
    loaded = fetch(f"{server.url}/pic.webp")

    assert (loaded.image.mode, loaded.image.size) == ("RGB", (64, 32))
    assert pixel(loaded.image, (63, 0)) == (0, 0, 255)


def test_transparency_is_flattened_onto_white(server: Server) -> None:
    loaded = fetch(f"{server.url}/alpha.png")

    assert loaded.image.mode == "RGB"
    assert pixel(loaded.image, (0, 0)) == (255, 255, 255)
    assert pixel(loaded.image, (15, 0)) == (255, 0, 0)
    assert loaded.warnings == ["image: its transparency was flattened onto white"]


def test_the_content_decides_not_the_content_type(server: Server) -> None:
    assert fetch(f"{server.url}/mislabelled").image.size == (64, 32)


@pytest.mark.parametrize("hops", [1, 3])
def test_redirects_are_followed_up_to_three(server: Server, hops: int) -> None:
    loaded = fetch(f"{server.url}/redirect/{hops}")

    assert loaded.image.size == (64, 32)
    assert loaded.source == f"{server.url}/redirect/{hops}"


def test_a_fourth_redirect_is_refused(server: Server) -> None:
    message = fetch_error(f"{server.url}/redirect/4?sig=abc")

    assert message.startswith(f"image: {server.url}/redirect/4?<hidden> (redirected to {server.url}/cat.png): ")
    assert message.endswith("more than 3 redirects")
    assert "sig=abc" not in message


def test_a_redirect_to_another_scheme_is_refused(server: Server) -> None:
    message = fetch_error(f"{server.url}/to-ftp")

    assert (
        message
        == f"image: {server.url}/to-ftp (redirected to ftp://127.0.0.1/cat.png): the scheme 'ftp' is not http or https"
    )


def test_http_error_names_the_status_and_the_url_without_its_query(server: Server) -> None:
    message = fetch_error(f"{server.url}/missing.png?X-Amz-Signature=SECRET")

    assert message == f"image: {server.url}/missing.png?<hidden>: HTTP 404 Not Found"


def test_a_dripping_server_is_cut_at_the_deadline(server: Server) -> None:
    message = fetch_error(f"{server.url}/drip", IMAGE_FETCH_TIMEOUT_SECONDS="1")

    assert message.startswith(f"image: {server.url}/drip: timed out")
    assert "IMAGE_FETCH_TIMEOUT_SECONDS=1" in message


def test_a_server_that_goes_silent_mid_body_is_cut_at_the_deadline(server: Server) -> None:
    message = fetch_error(f"{server.url}/silent", IMAGE_FETCH_TIMEOUT_SECONDS="1")

    assert message.startswith(f"image: {server.url}/silent: timed out")


def test_an_endless_body_is_cut_at_the_byte_limit(server: Server) -> None:
    message = fetch_error(f"{server.url}/endless", MAX_INPUT_IMAGE_MB="0.01")

    assert message == (
        f"image: {server.url}/endless: its body grew past MAX_INPUT_IMAGE_MB=0.01 (10000 bytes); stopped reading"
    )


def test_a_content_length_over_the_limit_is_refused_before_reading(server: Server) -> None:
    message = fetch_error(f"{server.url}/huge-length")

    assert message == (
        f"image: {server.url}/huge-length: its Content-Length, 1000000000 bytes, "
        "is over MAX_INPUT_IMAGE_MB=20 (20000000 bytes)"
    )


def test_text_is_not_an_image(server: Server) -> None:
    message = fetch_error(f"{server.url}/notes.txt")

    assert message == f"image: {server.url}/notes.txt: not an image: PNG, JPEG or WebP expected; it looks like text"
    assert "just" not in message.split(": ", 2)[2], "no byte of the body is echoed"


def test_gif_is_refused_by_name(server: Server) -> None:
    assert (
        fetch_error(f"{server.url}/anim.gif")
        == f"image: {server.url}/anim.gif: GIF is not accepted: PNG, JPEG or WebP expected"
    )


def test_a_bomb_from_a_url_is_refused_before_decoding(server: Server) -> None:
    message = fetch_error(f"{server.url}/bomb.png")

    assert message.startswith(f"image: {server.url}/bomb.png: too large to decode")


def test_a_truncated_png_from_a_url_is_refused(server: Server) -> None:
    message = fetch_error(f"{server.url}/truncated.png")

    assert message.startswith(f"image: {server.url}/truncated.png: the PNG data is truncated or corrupt")


def test_loopback_is_refused_by_default(server: Server) -> None:
    with pytest.raises(InputError) as error:
        load_image(f"{server.url}/cat.png", "image", DEFAULTS, None)

    assert str(error.value) == (
        f"image: {server.url}/cat.png: 127.0.0.1 is a loopback address; set IMAGE_URLS_ALLOW_PRIVATE=true to allow"
    )


def test_a_name_that_resolves_to_loopback_is_refused_by_default(server: Server) -> None:
    port = urlsplit(server.url).port
    with pytest.raises(InputError, match=r"localhost resolves to (127\.0\.0\.1|::1), a loopback address; set IMAGE"):
        load_image(f"http://localhost:{port}/cat.png", "mask", DEFAULTS, None)


def test_a_name_that_resolves_to_loopback_is_fetched_when_allowed(server: Server) -> None:
    # localhost may resolve to ::1 first, where nothing listens: the next address is tried.
    port = urlsplit(server.url).port
    loaded = fetch(f"http://localhost:{port}/pic.webp")

    assert loaded.image.size == (64, 32)
    assert server.headers["/pic.webp"]["Host"] == f"localhost:{port}"


def test_urls_can_be_switched_off(server: Server) -> None:
    message = fetch_error(f"{server.url}/cat.png?a=b", IMAGE_URLS="false")

    assert (
        message
        == f"image: {server.url}/cat.png?<hidden>: URLs are not accepted (IMAGE_URLS=false); send base64 or s3:// "
        "instead"
    )


def test_connection_refused() -> None:
    url = f"http://127.0.0.1:{free_port()}/cat.png"

    assert (
        fetch_error(url) == f"image: {url}: cannot connect to 127.0.0.1 port {urlsplit(url).port}: Connection refused"
    )


def resolver(answers: dict[str, list[str]], asked: list[tuple[str, int]]) -> Callable[[str, int], list[str]]:
    """A resolver that knows only ``answers``; any other name fails as getaddrinfo fails for an unknown one."""

    def resolve(host: str, port: int) -> list[str]:
        asked.append((host, port))
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return answers[host]

    return resolve


def test_a_name_that_does_not_resolve() -> None:
    asked: list[tuple[str, int]] = []

    with pytest.raises(InputError) as error:
        load_image("https://no-such-host.invalid/cat.png", "image", DEFAULTS, None, resolve=resolver({}, asked))

    assert str(error.value) == (
        "image: https://no-such-host.invalid/cat.png: "
        "cannot resolve the host 'no-such-host.invalid': Name or service not known"
    )
    assert asked == [("no-such-host.invalid", 443)]


def test_every_address_a_name_resolves_to_is_checked() -> None:
    # The public address comes first; the private one behind it is still found, before any connection.
    resolve = resolver({"cdn.example.com": ["93.184.216.34", "10.0.0.7"]}, [])

    with pytest.raises(InputError) as error:
        load_image("http://cdn.example.com/cat.png", "image", DEFAULTS, None, resolve=resolve)

    assert str(error.value) == (
        "image: http://cdn.example.com/cat.png: cdn.example.com resolves to 10.0.0.7, a private address; "
        "set IMAGE_URLS_ALLOW_PRIVATE=true to allow"
    )


def test_a_name_is_fetched_from_the_address_it_resolved_to(server: Server) -> None:
    # The name exists only in the test's resolver: the connection goes to the address it gave.
    port = urlsplit(server.url).port
    resolve = resolver({"images.test": ["127.0.0.1"]}, [])

    loaded = load_image(f"http://images.test:{port}/cat.png", "image", PRIVATE_OK, None, resolve=resolve)

    assert loaded.image.size == (64, 32)
    assert server.headers["/cat.png"]["Host"] == f"images.test:{port}"


def test_credentials_in_a_url_are_refused_and_never_shown() -> None:
    message = fetch_error("https://user:hunter2@example.com/cat.png")

    assert message == (
        "image: https://<hidden>@example.com/cat.png: credentials in the URL (user:password@) are not supported"
    )


# --- HTTPS: the connection is pinned to the checked address, the name still checked ----------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for the name ``localhost`` only, and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


@pytest.fixture
def tls_server(tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    """An HTTPS server on 127.0.0.1 whose certificate the worker trusts (through SSL_CERT_FILE)."""
    import ssl

    cert_file, key_file = tls_files
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))

    def wrap(httpd: ThreadingHTTPServer) -> None:
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)

    yield from serve(wrap)


def test_https_to_a_name_connects_to_its_checked_address_and_checks_the_name(tls_server: Server) -> None:
    port = urlsplit(tls_server.url).port
    loaded = fetch(f"https://localhost:{port}/cat.png")

    assert loaded.image.size == (64, 32)
    assert tls_server.headers["/cat.png"]["Host"] == f"localhost:{port}"


def test_https_certificate_must_match_the_name_in_the_url(tls_server: Server) -> None:
    # The certificate names localhost, not 127.0.0.1.
    message = fetch_error(f"{tls_server.url}/cat.png")

    assert message.startswith(f"image: {tls_server.url}/cat.png: TLS failed: ")
    assert "127.0.0.1" in message.split("TLS failed: ")[1]


# --- base64 --------------------------------------------------------------------------------------


def decode(reference: str, settings: Settings = DEFAULTS) -> Any:
    return load_image(reference, "image", settings, None)


def decode_error(reference: str, settings: Settings = DEFAULTS, field_name: str = "image") -> str:
    with pytest.raises(InputError) as error:
        load_image(reference, field_name, settings, None)
    return str(error.value)


@pytest.mark.parametrize(
    "reference",
    [
        pytest.param(b64(PNG), id="plain"),
        pytest.param("data:image/png;base64," + b64(PNG), id="data-uri"),
        pytest.param("data:image/jpeg;base64," + b64(PNG), id="data-uri-type-ignored"),
        pytest.param("\n".join(b64(PNG)[i : i + 76] for i in range(0, len(b64(PNG)), 76)) + "\n", id="newlines"),
        pytest.param(b64(PNG).rstrip("="), id="no-padding"),
        pytest.param(b64(WEBP), id="webp"),
    ],
)
def test_base64_forms(reference: str) -> None:
    loaded = decode(reference)

    assert (loaded.image.mode, loaded.image.size, loaded.source) == ("RGB", (64, 32), "base64")
    assert loaded.warnings == []


@pytest.mark.parametrize("reference", ["", "   ", "\n"])
def test_empty_is_refused(reference: str) -> None:
    assert decode_error(reference) == "image: must not be empty"


def test_an_empty_data_uri_is_refused() -> None:
    assert decode_error("data:image/png;base64,") == "image: must not be empty"


def test_a_data_uri_must_be_base64() -> None:
    assert decode_error("data:image/svg+xml,<svg/>") == (
        "image: 'data:image/svg+xml,<svg/>': a data URI must be base64, data:image/png;base64,..."
    )


def test_truncated_base64_is_refused_and_abbreviated() -> None:
    text = b64(PNG)[:-3]  # one character past a 4-character group: no padding can fix it

    message = decode_error(text)

    assert message.startswith("image: not valid base64 (")
    assert message.endswith(f"{text[:40]!r}... ({len(text) + 3} characters)")


def test_characters_outside_the_base64_alphabet_are_refused() -> None:
    assert decode_error("iVBORw0K*GgoAAAANSUhEUg").startswith("image: not valid base64 (")


def test_base64_cut_at_a_group_boundary_is_a_truncated_png() -> None:
    message = decode_error(b64(PNG)[: len(b64(PNG)) // 8 * 4])

    assert message.startswith("image: the PNG data is truncated or corrupt:")


def test_a_message_never_carries_a_whole_input() -> None:
    text = "A" * 100_000 + "!"

    message = decode_error(text)

    assert len(message) < 200
    assert "(100004 characters)" in message


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        pytest.param(b"AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG\n", "text", id="env-file"),
        pytest.param("Grüße, 東京 \u2014 text\n".encode(), "text", id="utf-8-text"),
        pytest.param(b'\xef\xbb\xbf  {"error": "AccessDenied"}', "JSON", id="json"),
        pytest.param(b'<?xml version="1.0"?><Error><Code>AccessDenied</Code></Error>', "XML", id="xml"),
        pytest.param(bytes(range(256)), "unknown binary data", id="binary"),
        pytest.param(b"SECRET\x00\x01\x02" * 4, "unknown binary data", id="text-with-nul"),
    ],
)
def test_what_is_not_an_image_is_described_never_echoed(data: bytes, kind: str) -> None:
    message = decode_error(b64(data))

    assert message == f"image: not an image: PNG, JPEG or WebP expected; it looks like {kind}"


@pytest.mark.parametrize(
    ("data", "name"),
    [
        pytest.param(GIF, "GIF", id="gif"),
        pytest.param(encode(halves(), "BMP"), "BMP", id="bmp"),
        pytest.param(encode(halves(), "TIFF"), "TIFF", id="tiff"),
        pytest.param(b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "SVG", id="svg"),
        pytest.param(b"<!DOCTYPE html><html><body>Sign in</body></html>", "HTML", id="html"),
        pytest.param(b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00", "AVIF", id="avif"),
    ],
)
def test_other_formats_are_refused_by_name(data: bytes, name: str) -> None:
    assert decode_error(b64(data), field_name="mask") == f"mask: {name} is not accepted: PNG, JPEG or WebP expected"


def test_a_file_over_the_byte_limit_is_refused_before_decoding() -> None:
    settings = load_settings({"MAX_INPUT_IMAGE_MB": "0.001"})

    text = b64(PNG + bytes(2000))

    message = decode_error(text, settings)

    assert message.endswith(f"decodes to about {len(text) * 3 // 4} bytes, over MAX_INPUT_IMAGE_MB=0.001 (1000 bytes)")
    assert f"({len(text)} characters)" in message


def test_unsupported_schemes_are_named() -> None:
    assert decode_error("file:///etc/passwd") == (
        "image: file:///etc/passwd: the scheme 'file' is not supported: "
        "send base64, a data: URI, an http(s):// URL or s3://BUCKET/KEY"
    )


@pytest.mark.parametrize("size", [(1, 1), (7, 64), (64, 7)])
def test_a_tiny_image_is_refused(size: tuple[int, int]) -> None:
    message = decode_error(b64(encode(Image.new("RGB", size), "PNG")))

    assert message == f"image: {size[0]}x{size[1]} is too small: at least 8x8"


@pytest.mark.parametrize(
    ("width", "height", "start"),
    [
        pytest.param(20000, 20000, "image: too large to decode", id="20000x20000-pillow-guard"),
        pytest.param(9000, 64, "image: 9000x64 is too large: inputs may be at most 8192 pixels a side", id="side"),
        pytest.param(5000, 5000, "image: 5000x5000 is too large: inputs may be at most 8192 pixels a side", id="area"),
    ],
)
def test_a_bomb_is_refused_from_its_header(width: int, height: int, start: str) -> None:
    message = decode_error(b64(bomb_png(width, height)))

    assert message.startswith(start)
    assert message.endswith(
        "at most 8192 pixels a side and 16777216 pixels in all "
        "(8 x MAX_SIDE, 16 x the larger of MAX_PIXELS and MAX_SIDE²)"
    )


@pytest.mark.parametrize("size", [(2048, 2048), (4032, 3024)], ids=["2048-square", "12mp-photo"])
def test_large_photos_within_the_bound_are_accepted(size: tuple[int, int]) -> None:
    assert decode(b64(encode(Image.new("L", size, 128), "PNG"))).image.size == size


def test_the_bound_follows_max_side() -> None:
    settings = load_settings({"MAX_SIDE": "512", "MAX_PIXELS": "262144"})

    assert decode_error(b64(bomb_png(4097, 8)), settings).startswith(
        "image: 4097x8 is too large: inputs may be at most 4096"
    )


def test_truncated_images_stay_refused() -> None:
    jpeg = encode(Image.effect_noise((128, 128), 64).convert("RGB"), "JPEG")

    assert decode_error(b64(jpeg[: len(jpeg) * 2 // 3])).startswith("image: the JPEG data is truncated or corrupt")
    assert decode_error(b64(jpeg[:300])) == "image: cannot be read as JPEG: Truncated File Read"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    ("image", "options", "corner"),
    [
        pytest.param(Image.new("L", (16, 16), 200), {}, (200, 200, 200), id="L"),
        pytest.param(Image.new("1", (16, 16), 1), {}, (255, 255, 255), id="1-bit"),
        pytest.param(halves((16, 16)).convert("P"), {}, (255, 0, 0), id="P"),
        pytest.param(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), {}, (255, 0, 0), id="CMYK-jpeg"),
        pytest.param(Image.new("I;16", (16, 16), 32768), {}, (128, 128, 128), id="16-bit-grey"),
        pytest.param(Image.new("LA", (16, 16), (90, 255)), {}, (90, 90, 90), id="LA-opaque"),
    ],
)
def test_modes_become_rgb(image: Image.Image, options: dict[str, Any], corner: tuple[int, ...]) -> None:
    file_format = "JPEG" if image.mode == "CMYK" else "PNG"
    loaded = decode(b64(encode(image, file_format, **options)))

    assert loaded.image.mode == "RGB"
    assert all(abs(a - b) <= 3 for a, b in zip(pixel(loaded.image, (0, 0)), corner, strict=True))
    assert loaded.warnings == []


def test_a_palette_with_a_transparent_colour_is_flattened() -> None:
    image = halves((16, 16)).convert("P")
    transparent = image.getpixel((0, 0))

    loaded = decode(b64(encode(image, "PNG", transparency=transparent)))

    assert pixel(loaded.image, (0, 0)) == (255, 255, 255)
    assert pixel(loaded.image, (15, 0)) == (0, 0, 255)
    assert loaded.warnings == ["image: its transparency was flattened onto white"]


@pytest.mark.parametrize("file_format", ["PNG", "WEBP"])
def test_an_animation_gives_its_first_frame(file_format: str) -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], file_format, save_all=True, append_images=frames[1:], duration=100, lossless=True)

    loaded = decode(b64(data))

    assert pixel(loaded.image, (8, 8)) == (255, 0, 0)
    assert loaded.warnings == ["image: it holds 3 frames; the first is used"]


# --- masks ---------------------------------------------------------------------------------------


def mask_of(data: bytes, *, rounded: bool = False) -> Any:
    return load_mask(b64(data), "mask", DEFAULTS, None, rounded=rounded)


def test_an_rgb_mask_becomes_l() -> None:
    image = Image.new("RGB", (24, 16), (0, 0, 0))
    image.paste((255, 255, 255), (12, 0, 24, 16))

    loaded = mask_of(encode(image, "PNG"))

    assert (loaded.image.mode, loaded.image.size) == ("L", (24, 16))
    assert (pixel(loaded.image, (0, 0)), pixel(loaded.image, (23, 0))) == (0, 255)
    assert loaded.warnings == []


def test_a_mask_with_transparency_is_its_alpha_as_a1111_reads_one() -> None:
    image = Image.new("RGBA", (32, 16), (255, 255, 255, 0))  # transparent: kept
    image.paste((255, 255, 255, 255), (8, 0, 16, 16))  # opaque white: repainted
    image.paste((255, 255, 255, 128), (16, 0, 24, 16))  # half: partly repainted
    image.paste((200, 0, 0, 255), (24, 0, 32, 16))  # an opaque red stroke: repainted, whatever its colour

    loaded = mask_of(encode(image, "PNG"))

    assert (loaded.image.mode, loaded.image.size) == ("L", (32, 16))
    assert [pixel(loaded.image, (x, 0)) for x in (0, 8, 16, 24)] == [0, 255, 128, 255]
    assert loaded.warnings == [
        "mask: it has transparency, so its alpha is the mask (opaque repaints, transparent keeps), as in A1111"
    ]
    opaque = Image.new("RGBA", (16, 16), (255, 255, 255, 255))
    opaque.paste((0, 0, 0, 255), (0, 0, 8, 16))
    assert [pixel(mask_of(encode(opaque, "PNG")).image, (x, 0)) for x in (0, 8)] == [0, 255], "no transparency: grey"
    rounded = mask_of(encode(image, "PNG"), rounded=True)
    assert [pixel(rounded.image, (x, 0)) for x in (0, 8, 16, 24)] == [0, 255, 0, 255], "128 is not above 128"
    assert rounded.warnings == [
        "mask: it has transparency, so its alpha is the mask (opaque repaints, transparent keeps), rounded, as in A1111"
    ]
    grey_with_alpha = Image.new("LA", (16, 16), (77, 0))
    assert pixel(mask_of(encode(grey_with_alpha, "PNG")).image, (3, 3)) == 77, "a grey mask's alpha: not A1111's"


def test_a_grey_mask_keeps_its_values() -> None:
    loaded = mask_of(encode(Image.new("L", (16, 16), 77), "PNG"))

    assert (loaded.image.mode, pixel(loaded.image, (3, 3))) == ("L", 77)


def test_a_mask_error_names_the_mask() -> None:
    with pytest.raises(InputError, match=r"^controlnets\.0\.image: must not be empty$"):
        load_mask("", "controlnets.0.image", DEFAULTS, None)


# --- s3:// through a real S3 server ----------------------------------------------------------------

SECRET_FILE = b"AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"


def s3_settings(s3_server: S3Server, **variables: str) -> Settings:
    return load_settings(
        {
            "BUCKET_NAME": "media",
            "BUCKET_ENDPOINT_URL": s3_server.url,
            "BUCKET_ACCESS_KEY_ID": ACCESS_KEY,
            "BUCKET_SECRET_ACCESS_KEY": SECRET,
            "BUCKET_PREFIX": "out/",
            **variables,
        }
    )


def s3_load(s3_server: S3Server, reference: str, sent: list[str] | None = None, **variables: str) -> Any:
    """Load ``reference`` with a new S3Storage; each request its client sends is added to ``sent``.

    The seam is boto3's own event system, on the client that reads the input.
    """
    from src.storage import S3Storage

    settings = s3_settings(s3_server, **variables)
    storage = S3Storage(settings)
    if sent is not None:
        storage._client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.url))
    return load_image(reference, "image", settings, storage)


def s3_error(s3_server: S3Server, reference: str, sent: list[str] | None = None, **variables: str) -> str:
    with pytest.raises(InputError) as error:
        s3_load(s3_server, reference, sent, **variables)
    return str(error.value)


@pytest.fixture
def s3_inputs(s3_server: S3Server) -> S3Server:
    client = s3_server.client()
    client.create_bucket(Bucket="media")
    for key, body in {
        "inputs/cat.png": PNG,
        "inputs/notes.txt": SECRET_FILE,
        "other/secret.env": SECRET_FILE,
        "other/cat.png": PNG,
        "out/job-7/0-5.png": PNG,  # an earlier result of the worker (BUCKET_PREFIX out/)
        "out/job-7/notes.txt": SECRET_FILE,
        "out/cat.png": PNG,
    }.items():
        client.put_object(Bucket="media", Key=key, Body=body)
    return s3_server


def test_an_image_from_the_workers_bucket(s3_inputs: S3Server) -> None:
    loaded = s3_load(s3_inputs, "s3://media/inputs/cat.png")

    assert (loaded.image.mode, loaded.image.size, loaded.source) == ("RGB", (64, 32), "s3://media/inputs/cat.png")


def test_an_earlier_result_of_the_worker_can_be_fed_back(s3_inputs: S3Server) -> None:
    loaded = s3_load(s3_inputs, "s3://media/out/job-7/0-5.png")

    assert loaded.image.size == (64, 32)


def test_the_input_prefix_is_configured(s3_inputs: S3Server) -> None:
    s3_inputs.client().put_object(Bucket="media", Key="uploads/2026/cat.png", Body=PNG)

    assert s3_load(s3_inputs, "s3://media/uploads/2026/cat.png", BUCKET_INPUT_PREFIX="uploads/").image.size == (64, 32)
    assert "BUCKET_INPUT_PREFIX='uploads/'" in s3_error(
        s3_inputs, "s3://media/inputs/cat.png", BUCKET_INPUT_PREFIX="uploads/"
    )


OUTSIDE = (
    "only keys under BUCKET_INPUT_PREFIX='inputs/' and the worker's own results, "
    "BUCKET_PREFIX='out/' + JOB/INDEX-SEED.png or JOB/INDEX-upscaled.png (or .jpg, .webp), can be read"
)


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("other/secret.env", id="exists"),
        pytest.param("other/no-such.env", id="missing"),
        pytest.param("other/cat.png", id="an-image-elsewhere"),
        pytest.param("out/cat.png", id="not-shaped-like-a-result"),
        pytest.param("out/job-7/notes.txt", id="beside-a-result"),
        pytest.param("inputs", id="the-prefix-without-its-slash"),
        pytest.param("inputs-old/cat.png", id="a-longer-folder-name"),
        pytest.param("INPUTS/cat.png", id="another-case"),
    ],
)
def test_a_key_outside_the_allowed_prefixes_is_refused_before_any_s3_call(s3_inputs: S3Server, key: str) -> None:
    sent: list[str] = []

    message = s3_error(s3_inputs, f"s3://media/{key}", sent)

    # The same words whether the object exists or not: neither its existence nor its size shows.
    assert message == f"image: s3://media/{key}: {OUTSIDE}"
    assert sent == []


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("inputs/../other/secret.env", id="dot-dot"),
        pytest.param("inputs/./cat.png", id="dot"),
        pytest.param("inputs//cat.png", id="empty-part"),
        pytest.param("/inputs/cat.png", id="leading-slash"),
        pytest.param("inputs/", id="the-folder-itself"),
        pytest.param("inputs/%2e%2e/other/secret.env", id="percent-encoded-dot-dot"),
        pytest.param("inputs/%2E%2E%2Fother%2Fsecret.env", id="percent-encoded-slash"),
        pytest.param("inputs\\..\\other\\secret.env", id="backslashes"),
        pytest.param("inputs/\uff0e\uff0e/other/secret.env", id="fullwidth-dots"),
        pytest.param("inputs/cat.png?versionId=1", id="query"),
        pytest.param("inputs/cat.png#x", id="fragment"),
        pytest.param("inputs/cat\x00.png", id="nul"),
        pytest.param("inputs/" + "a" * 1020, id="over-1024-bytes"),
        pytest.param("out/job-7/../../other/secret.env", id="dot-dot-under-the-results"),
    ],
)
def test_a_key_with_tricks_is_refused_before_any_s3_call(s3_inputs: S3Server, key: str) -> None:
    sent: list[str] = []

    message = s3_error(s3_inputs, f"s3://media/{key}", sent)

    assert message.endswith(
        ": a key is at most 1024 characters in parts joined by '/', each of A-Z a-z 0-9 and ! - _ . * ' ( ), "
        "none empty, '.' or '..'"
    )
    assert sent == []


def test_an_object_that_is_not_an_image_is_described_not_echoed(s3_inputs: S3Server) -> None:
    message = s3_error(s3_inputs, "s3://media/inputs/notes.txt")

    assert message == "image: s3://media/inputs/notes.txt: not an image: PNG, JPEG or WebP expected; it looks like text"


def test_another_bucket_is_refused(s3_inputs: S3Server) -> None:
    sent: list[str] = []

    assert s3_error(s3_inputs, "s3://someone-else/inputs/cat.png", sent) == (
        "image: s3://someone-else/inputs/cat.png: the bucket 'someone-else' is not the worker's bucket 'media' "
        "(BUCKET_NAME); only that one can be read"
    )
    assert sent == []


def test_a_missing_key_names_the_object(s3_inputs: S3Server) -> None:
    message = s3_error(s3_inputs, "s3://media/inputs/nope.png")

    assert message.startswith(f"image: reading s3://media/inputs/nope.png at {s3_inputs.url} failed: NoSuchKey")
    assert SECRET not in message


def test_an_object_over_the_byte_limit_is_refused(s3_inputs: S3Server) -> None:
    message = s3_error(s3_inputs, "s3://media/inputs/cat.png", MAX_INPUT_IMAGE_MB="0.0001")

    assert (
        message
        == f"image: s3://media/inputs/cat.png at {s3_inputs.url} holds more than 100 bytes, the limit; stopped reading"
    )


def test_s3_without_a_bucket_is_refused() -> None:
    with pytest.raises(InputError) as error:
        load_image("s3://media/inputs/cat.png", "image", DEFAULTS, None)

    assert (
        str(error.value)
        == "image: s3://media/inputs/cat.png: BUCKET_NAME is not set, so the worker reads no s3:// inputs"
    )


def test_an_s3_reference_needs_a_key() -> None:
    assert decode_error("s3://media") == "image: 's3://media': must be s3://BUCKET/KEY"


def test_the_url_safe_base64_alphabet_is_accepted() -> None:
    buffer = io.BytesIO()
    Image.effect_noise((64, 32), 60).convert("RGB").save(buffer, format="PNG")
    standard, url_safe = base64.b64encode(buffer.getvalue()), base64.urlsafe_b64encode(buffer.getvalue())
    assert standard != url_safe, "the file's base64 holds + or /"

    loaded = decode(url_safe.decode())

    assert loaded.image.size == (64, 32)
