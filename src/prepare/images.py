"""Image inputs: a reference from a request -> a checked, EXIF-oriented PIL image or mask.

The mirror of ``outputs.py``. A reference is, recognised in this order:

1. a data URI, ``data:image/png;base64,...`` (the declared type is ignored: the content decides);
2. an ``http://`` or ``https://`` URL, fetched when ``IMAGE_URLS`` is on;
3. ``s3://BUCKET/KEY`` in the worker's own bucket, read with its own S3 client;
4. plain base64.

Every input is hostile until proven otherwise. The file may hold at most ``MAX_INPUT_IMAGE_MB``; it must be a
PNG, JPEG or WebP by its first bytes, never by its name or content type; its width and height are read from the
header and checked before a single pixel is decoded, so a small file that would decode to gigabytes (a
decompression bomb) costs nothing. Every failure is an ``InputError`` whose message starts with the request field.

A URL's host is resolved and every address it resolves to is checked; the connection then goes to a checked
address, the hostname travelling only in the Host header, the TLS server name and the certificate check. A DNS
answer that changes between the check and the connection (DNS rebinding) therefore cannot reach a private
address. Redirects are followed here, each hop checked the same way, and one deadline covers them all.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import io
import ipaddress
import itertools
import logging
import re
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote, urljoin, urlsplit

import urllib3
from PIL import ExifTags, Image, ImageOps

from src import __version__
from src.errors import StorageError, clipped
from src.schema import InputError
from src.settings import Settings, redact_url

if TYPE_CHECKING:
    from src.storage import S3Storage

log = logging.getLogger(__name__)

MB = 1_000_000
# An input may be larger than any image the worker makes: the engine scales it down. Each side may be up to
# SIDE_FACTOR x MAX_SIDE and the area up to AREA_FACTOR x the larger of MAX_PIXELS and MAX_SIDE². With the
# defaults that is 8192 a side and 16,777,216 pixels (4096²): a 12 MP phone photo (4032x3024) or a 2048² render
# passes, a 20000x20000 bomb does not, and one decoded RGBA copy stays under 68 MB. Pillow's own guard
# (Image.MAX_IMAGE_PIXELS, left at its default) still refuses more than 2 x 89,478,485 pixels whatever the settings.
SIDE_FACTOR = 8
AREA_FACTOR = 16
MIN_SIDE = 8
MAX_REDIRECTS = 3
USER_AGENT = f"sd15-worker/{__version__}"

_ACCEPTED = ("PNG", "JPEG", "WEBP")
_EXPECTED = "PNG, JPEG or WebP expected"
# First bytes of the accepted formats, and of refused ones so that the message can say what was sent.
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"%PDF", "PDF"),
    (b"8BPS", "PSD"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"qoif", "QOI"),
)
_HEIF_BRANDS = {b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF"}
# What Pillow raises on a broken or hostile file; anything else is a bug and keeps its traceback.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK_BYTES = 64 * 1024
_CLOUD_METADATA = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# A host name and port -> its addresses as text, in the resolver's preferred order; raises OSError (such as
# socket.gaierror) when the name has none.
Resolve = Callable[[str, int], list[str]]


def system_resolve(host: str, port: int) -> list[str]:
    """``host``'s addresses from the system resolver (getaddrinfo), in its order: what the worker uses.

    Raises:
        OSError: socket.gaierror when the name does not resolve.
    """
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


@dataclass(frozen=True)
class LoadedImage:
    """An input image, decoded and checked.

    ``image`` is fully loaded, in mode RGB (``load_image``) or L (``load_mask``), with its EXIF orientation
    applied. ``warnings`` say what was changed on the way (each starts with the field); ``source`` is a short
    description for logs: ``base64``, the URL without its query, or ``s3://bucket/key``.
    """

    image: Image.Image
    warnings: list[str]
    source: str


def load_image(
    reference: str, field: str, settings: Settings, storage: S3Storage | None, *, resolve: Resolve = system_resolve
) -> LoadedImage:
    """Read, check and decode the image ``reference`` gives, as RGB.

    Transparency is flattened onto white, 16-bit channels become 8-bit, an animation gives its first frame.

    Args:
        reference: base64, a ``data:`` URI, an http(s) URL or ``s3://BUCKET/KEY``.
        field: the request field it came from, such as ``image``; every message starts with it.
        settings: the limits (``MAX_INPUT_IMAGE_MB``, ``MAX_SIDE``, ``MAX_PIXELS``) and the URL rules.
        storage: the worker's S3 client, or None when no bucket is configured.
        resolve: how a URL's host name becomes addresses, each then checked; the system resolver unless a
            test gives names of its own.

    Raises:
        InputError: the reference cannot be read, is too large or too small, or is not a PNG, JPEG or WebP.
    """
    data, source = _read(reference, field, settings, storage, resolve)
    image, warnings = _decode(data, field, source, settings)
    image, more = _to_rgb(image, field)
    return LoadedImage(image=image, warnings=warnings + more, source=source)


def load_mask(
    reference: str, field: str, settings: Settings, storage: S3Storage | None, *, resolve: Resolve = system_resolve
) -> LoadedImage:
    """Read, check and decode an inpainting mask, as L: white (255) is repainted, black kept, grey in between.

    A mask with transparency is composited onto black first, so a transparent pixel is kept.
    Arguments and errors as for ``load_image``.
    """
    data, source = _read(reference, field, settings, storage, resolve)
    image, warnings = _decode(data, field, source, settings)
    image, more = _to_l(image, field)
    return LoadedImage(image=image, warnings=warnings + more, source=source)


def address_problem(address: IPAddress) -> str | None:
    """Why the worker must not fetch from ``address`` (such as ``a loopback address``); None for a public one."""
    if address in _CLOUD_METADATA:
        return "the cloud metadata address"
    if isinstance(address, ipaddress.IPv6Address):
        # An IPv4 address carried inside IPv6 reaches that IPv4 host: judge the IPv4 one.
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            problem = address_problem(embedded)
            return f"{problem} ({embedded} inside IPv6)" if problem else None
    kinds = (
        (address.is_loopback, "a loopback address"),
        (address.is_unspecified, "an unspecified address"),
        (address.is_link_local, "a link-local address"),
        (address.is_multicast, "a multicast address"),
        (address in _SHARED, "a shared (carrier-grade NAT) address"),
        (address.is_private, "a private address"),
        (address.is_reserved, "a reserved address"),
        (not address.is_global, "not a public address"),
    )
    return next((kind for matches, kind in kinds if matches), None)


# --- reading: reference -> bytes -----------------------------------------------------------------


def _read(
    reference: str, field: str, settings: Settings, storage: S3Storage | None, resolve: Resolve
) -> tuple[bytes, str]:
    """The file's bytes and a short description of where they came from."""
    text = reference.strip()
    if not text:
        raise InputError(f"{field}: must not be empty")
    limit = _limit_bytes(settings)
    head = text[:8].lower()
    if head.startswith("data:"):
        header, comma, payload = text.partition(",")
        if not comma or ";base64" not in header.lower():
            raise InputError(f"{field}: {_abbreviate(text)}: a data URI must be base64, data:image/png;base64,...")
        return _from_base64(payload, field, settings, limit), "base64"
    if head.startswith(("http://", "https://")):
        if not settings.image_urls:
            raise InputError(
                f"{field}: {_shown(text)}: URLs are not accepted (IMAGE_URLS=false); send base64 or s3:// instead"
            )
        return _fetch(text, field, settings, limit, resolve), _shown(text)
    if head.startswith("s3://"):
        return _from_s3(text, field, storage, limit)
    if _URL_SCHEME.match(text):
        scheme = text.split(":", 1)[0]
        raise InputError(
            f"{field}: {_shown(text)}: the scheme {scheme!r} is not supported: "
            "send base64, a data: URI, an http(s):// URL or s3://BUCKET/KEY"
        )
    return _from_base64(text, field, settings, limit), "base64"


def _from_base64(text: str, field: str, settings: Settings, limit: int) -> bytes:
    compact = "".join(text.split())
    if not compact:
        raise InputError(f"{field}: must not be empty")
    # Checked on the encoded length, so that an oversized input is never decoded.
    if len(compact) * 3 // 4 > limit:
        size = len(compact) * 3 // 4
        raise InputError(f"{field}: {_abbreviate(compact)} decodes to about {size} bytes, over {_limit_text(settings)}")
    compact += "=" * (-len(compact) % 4)  # tolerate missing padding
    # The URL-safe alphabet (base64url: "-" and "_" for "+" and "/") is what some clients send.
    altchars = b"-_" if ("-" in compact or "_" in compact) and not ("+" in compact or "/" in compact) else None
    try:
        return base64.b64decode(compact, altchars=altchars, validate=True)
    except binascii.Error as error:
        raise InputError(f"{field}: not valid base64 ({error}): {_abbreviate(compact)}") from None


def _from_s3(text: str, field: str, storage: S3Storage | None, limit: int) -> tuple[bytes, str]:
    bucket, _, key = text[len("s3://") :].partition("/")
    source = clipped(f"s3://{bucket}/{key}")
    if not bucket or not key:
        raise InputError(f"{field}: {_abbreviate(text)}: must be s3://BUCKET/KEY")
    if storage is None:
        raise InputError(f"{field}: {source}: BUCKET_NAME is not set, so the worker reads no s3:// inputs")
    if bucket != storage.bucket:
        raise InputError(
            f"{field}: {source}: the bucket {bucket!r} is not the worker's bucket {storage.bucket!r} "
            "(BUCKET_NAME); only that one can be read"
        )
    try:
        return storage.read(key, limit), source
    except StorageError as error:
        raise InputError(f"{field}: {error}") from None


# --- fetching a URL -----------------------------------------------------------------------------


class _FetchError(Exception):
    """Why a fetch failed; ``_fetch`` adds the field and the URL."""


@dataclass(frozen=True)
class _Target:
    """One URL, split into what a connection pinned to a checked address needs."""

    scheme: str
    host: str  # ASCII (IDNA), lower case, without brackets: for DNS, SNI and the certificate check
    port: int
    host_header: str
    path: str  # path and query, percent-encoded


def _fetch(url: str, field: str, settings: Settings, limit: int, resolve: Resolve) -> bytes:
    """GET ``url`` within IMAGE_FETCH_TIMEOUT_SECONDS, following at most MAX_REDIRECTS redirects."""
    deadline = time.monotonic() + settings.image_fetch_timeout_seconds
    context: ssl.SSLContext | None = None
    current = url
    try:
        for _ in range(1 + MAX_REDIRECTS):
            target = _target(current)
            addresses = _allowed_addresses(target, settings, deadline, resolve)
            if target.scheme == "https" and context is None:
                context = ssl.create_default_context()
            pool, response = _request(target, addresses, deadline, context, settings)
            try:
                if response.status in _REDIRECT_STATUSES:
                    location = response.headers.get("Location", "").strip()
                    if not location:
                        raise _FetchError(f"HTTP {response.status} redirect without a Location")
                    current = urljoin(current, location)
                    continue
                if not 200 <= response.status < 300:
                    raise _FetchError(f"HTTP {response.status} {response.reason or ''}".rstrip())
                return _read_body(response, deadline, settings, limit)
            except (urllib3.exceptions.HTTPError, OSError) as error:
                raise _FetchError(_connection_problem(error, settings)) from None
            finally:
                response.close()
                pool.close()
        raise _FetchError(f"more than {MAX_REDIRECTS} redirects")
    except _FetchError as refused:
        hop = f" (redirected to {_shown(current)})" if current != url else ""
        raise InputError(f"{field}: {_shown(url)}{hop}: {refused}") from None


def _target(url: str) -> _Target:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise _FetchError("is not a valid URL: its host or port cannot be read") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _FetchError(f"the scheme {scheme!r} is not http or https")
    if "@" in parts.netloc:
        raise _FetchError("credentials in the URL (user:password@) are not supported")
    if not parts.hostname:
        raise _FetchError("names no host")
    try:
        host = parts.hostname.encode("idna").decode("ascii")
    except UnicodeError:
        raise _FetchError(f"the host {parts.hostname!r} is not a valid name") from None
    shown_host = f"[{host}]" if ":" in host else host
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        path += "?" + quote(parts.query, safe="/?%:@!$&'()*+,;=-._~")
    return _Target(
        scheme=scheme,
        host=host,
        port=port or (443 if scheme == "https" else 80),
        host_header=shown_host if port is None else f"{shown_host}:{port}",
        path=path,
    )


def _allowed_addresses(target: _Target, settings: Settings, deadline: float, resolve: Resolve) -> list[IPAddress]:
    """The addresses to connect to: all of them checked, unless IMAGE_URLS_ALLOW_PRIVATE is on."""
    try:
        addresses = [ipaddress.ip_address(target.host)]
        literal = True
    except ValueError:
        addresses = _resolve(target.host, target.port, _remaining(deadline, settings), resolve)
        literal = False
    if settings.image_urls_allow_private:
        return addresses
    for address in addresses:
        problem = address_problem(address)
        if problem is not None:
            what = f"{address} is" if literal else f"{target.host} resolves to {address},"
            raise _FetchError(f"{what} {problem}; set IMAGE_URLS_ALLOW_PRIVATE=true to allow")
    return addresses


def _resolve(host: str, port: int, timeout: float, resolve: Resolve) -> list[IPAddress]:
    """``host``'s addresses, in the resolver's order; getaddrinfo has no timeout, so it runs in a thread
    that is left to finish on its own when the deadline passes first."""
    answers: list[list[IPAddress] | str] = []

    def lookup() -> None:
        try:
            answers.append(list(dict.fromkeys(ipaddress.ip_address(address) for address in resolve(host, port))))
        except OSError as error:
            answers.append(error.strerror or str(error))
        except (UnicodeError, ValueError) as error:  # a name the resolver cannot even encode
            answers.append(str(error))

    thread = threading.Thread(target=lookup, name="image-url-resolve", daemon=True)
    thread.start()
    thread.join(timeout)
    if not answers:
        raise _FetchError(f"cannot resolve the host {host!r}: no answer within {timeout:.3g} s")
    answer = answers[0]
    if isinstance(answer, str):
        raise _FetchError(f"cannot resolve the host {host!r}: {answer}")
    if not answer:
        raise _FetchError(f"cannot resolve the host {host!r}: no address")
    return answer


def _request(
    target: _Target,
    addresses: list[IPAddress],
    deadline: float,
    context: ssl.SSLContext | None,
    settings: Settings,
) -> tuple[urllib3.HTTPConnectionPool, urllib3.BaseHTTPResponse]:
    """Send the GET to the first checked address that accepts a connection."""
    headers = {
        "Host": target.host_header,
        "User-Agent": USER_AGENT,
        "Accept": "image/png,image/jpeg,image/webp,*/*;q=0.8",
        # The body's size is checked as it arrives; a compressed body would grow once decoded.
        "Accept-Encoding": "identity",
    }
    failures: list[tuple[IPAddress, str]] = []
    for address in addresses:
        remaining = _remaining(deadline, settings)
        timeout = urllib3.Timeout(connect=remaining, read=remaining)
        pool: urllib3.HTTPConnectionPool
        if target.scheme == "https":
            pool = urllib3.HTTPSConnectionPool(
                str(address),
                target.port,
                timeout=timeout,
                retries=False,
                maxsize=1,
                ssl_context=context,
                server_hostname=target.host,
                assert_hostname=target.host,
            )
        else:
            pool = urllib3.HTTPConnectionPool(str(address), target.port, timeout=timeout, retries=False, maxsize=1)
        try:
            response = pool.urlopen(
                "GET",
                target.path,
                headers=headers,
                retries=False,
                redirect=False,
                assert_same_host=False,
                preload_content=False,
            )
        except urllib3.exceptions.ConnectTimeoutError as error:  # NewConnectionError included
            pool.close()
            failures.append((address, _connection_problem(error, settings)))
            continue
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as error:
            pool.close()
            raise _FetchError(_connection_problem(error, settings)) from None
        return pool, response
    if len(failures) == 1:
        reasons = failures[0][1]
    else:
        reasons = "; ".join(f"{address}: {problem}" for address, problem in failures)
    raise _FetchError(f"cannot connect to {target.host} port {target.port}: {reasons}")


def _read_body(response: urllib3.BaseHTTPResponse, deadline: float, settings: Settings, limit: int) -> bytes:
    """The body, read as it arrives; refused as soon as it passes ``limit`` or the deadline."""
    length = response.headers.get("Content-Length", "").strip()
    if length.isdigit() and int(length) > limit:
        raise _FetchError(f"its Content-Length, {length} bytes, is over {_limit_text(settings)}")
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise _FetchError(f"it came with Content-Encoding: {encoding}; an image is expected as is")
    data = bytearray()
    sock = getattr(getattr(response, "connection", None), "sock", None)
    while True:
        # The clock is checked between chunks, so a server that drips bytes is cut at the deadline; the
        # socket's timeout follows the deadline down, so one that goes silent is cut at it too.
        remaining = _remaining(deadline, settings)
        if sock is not None:
            sock.settimeout(remaining)
        chunk = response.read1(_CHUNK_BYTES, decode_content=False)
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > limit:
            raise _FetchError(f"its body grew past {_limit_text(settings)}; stopped reading")


def _remaining(deadline: float, settings: Settings) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _FetchError(
            f"timed out: not done within IMAGE_FETCH_TIMEOUT_SECONDS={settings.image_fetch_timeout_seconds:g}"
        )
    return remaining


def _connection_problem(error: Exception, settings: Settings) -> str:
    """What went wrong talking to the server, in a few words."""
    timeout = f"IMAGE_FETCH_TIMEOUT_SECONDS={settings.image_fetch_timeout_seconds:g}"
    if isinstance(error, urllib3.exceptions.NewConnectionError):
        cause = error.__cause__
        return (cause.strerror if isinstance(cause, OSError) else None) or str(cause or error)
    if isinstance(error, urllib3.exceptions.ConnectTimeoutError):
        return f"timed out connecting ({timeout})"
    if isinstance(error, (urllib3.exceptions.ReadTimeoutError, TimeoutError)):
        return f"timed out waiting for the server ({timeout})"
    if isinstance(error, urllib3.exceptions.SSLError):
        return f"TLS failed: {_first_line(error)}"
    if isinstance(error, urllib3.exceptions.ProtocolError):
        return f"the connection failed: {_first_line(error)}"
    return f"{type(error).__name__}: {_first_line(error)}"


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [""])[0][:300]


# --- decoding: bytes -> checked image -----------------------------------------------------------


def _decode(data: bytes, field: str, source: str, settings: Settings) -> tuple[Image.Image, list[str]]:
    """The first frame, loaded and EXIF-oriented, after the format and size checks; and its warnings."""
    where = field if source == "base64" else f"{field}: {source}"
    if not data:
        raise InputError(f"{where}: is empty (0 bytes)")
    kind = _sniff(data)
    if kind not in _ACCEPTED:
        if kind:
            raise InputError(f"{where}: {kind} is not accepted: {_EXPECTED}")
        raise InputError(f"{where}: not an image: {_EXPECTED}; it looks like {_looks_like(data)}")
    max_side, max_area = _size_limits(settings)
    bound = (
        f"at most {max_side} pixels a side and {max_area} pixels in all "
        f"({SIDE_FACTOR} x MAX_SIDE, {AREA_FACTOR} x the larger of MAX_PIXELS and MAX_SIDE²)"
    )
    try:
        # Reads the header only: no pixel is decoded before the size is known.
        opened = Image.open(io.BytesIO(data), formats=[kind])
    except Image.DecompressionBombError as error:
        raise InputError(f"{where}: too large to decode ({error}); inputs may be {bound}") from None
    except _DECODE_ERRORS as error:
        raise InputError(f"{where}: cannot be read as {kind}: {_first_line(error)}") from None
    width, height = opened.size
    if width > max_side or height > max_side or width * height > max_area:
        raise InputError(f"{where}: {width}x{height} is too large: inputs may be {bound}")
    if width < MIN_SIDE or height < MIN_SIDE:
        raise InputError(f"{where}: {width}x{height} is too small: at least {MIN_SIDE}x{MIN_SIDE}")
    warnings = []
    frames = getattr(opened, "n_frames", 1)
    try:
        opened.load()
    except _DECODE_ERRORS as error:
        raise InputError(f"{where}: the {kind} data is truncated or corrupt: {_first_line(error)}") from None
    if frames > 1:
        warnings.append(f"{field}: it holds {frames} frames; the first is used")
    image: Image.Image = opened
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except _DECODE_ERRORS:
        orientation = 1
        warnings.append(f"{field}: its EXIF data cannot be read; its orientation is not applied")
    if orientation in range(2, 9):
        image = ImageOps.exif_transpose(image)
        warnings.append(f"{field}: rotated per its EXIF orientation")
    log.debug("%s: %s, %s %dx%d %s", field, source, kind, width, height, image.mode)
    return image, warnings


def _sniff(data: bytes) -> str:
    """The format ``data`` holds, by its first bytes: PNG, JPEG, WEBP, a refused one's name, or ''."""
    head = data[:1024].lstrip().lower()
    checks = (
        (data[:4] == b"RIFF" and data[8:12] == b"WEBP", "WEBP"),
        (data[:2] == b"BM" and data[6:10] == b"\x00\x00\x00\x00", "BMP"),
        (data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS, _HEIF_BRANDS.get(data[8:12], "")),
        (head.startswith((b"<!doctype html", b"<html")), "HTML"),
        (b"<svg" in head, "SVG"),
    )
    by_magic = (name for magic, name in _MAGIC if data.startswith(magic))
    by_check = (name for matches, name in checks if matches)
    return next(itertools.chain(by_magic, by_check), "")


def _looks_like(data: bytes) -> str:
    """What a file that is no known format holds, in a word: JSON, XML, text or unknown binary data.

    Only the kind is ever shown, never a byte: the file may be a URL's or an S3 object's, and its first
    bytes could be a secret.
    """
    try:
        # Incremental, so that a character cut at the end of the first 512 bytes is not an error.
        text = codecs.getincrementaldecoder("utf-8")().decode(data[:512])
    except UnicodeDecodeError:
        return "unknown binary data"
    if not all(char.isprintable() or char in "\t\n\r\f\ufeff" for char in text):
        return "unknown binary data"
    start = text.lstrip("\ufeff \t\n\r\f")
    if start.startswith(("{", "[")):
        return "JSON"
    if start.startswith("<"):
        return "XML"
    return "text"


def _size_limits(settings: Settings) -> tuple[int, int]:
    """(largest side, largest area) of an input image."""
    return SIDE_FACTOR * settings.max_side, AREA_FACTOR * max(settings.max_pixels, settings.max_side**2)


def _to_rgb(image: Image.Image, field: str) -> tuple[Image.Image, list[str]]:
    image = _eight_bit(image)
    if not _has_alpha(image):
        return (image if image.mode == "RGB" else image.convert("RGB")), []
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    warnings = [f"{field}: its transparency was flattened onto white"] if _transparent(rgba) else []
    return Image.alpha_composite(white, rgba).convert("RGB"), warnings


def _to_l(image: Image.Image, field: str) -> tuple[Image.Image, list[str]]:
    image = _eight_bit(image)
    if not _has_alpha(image):
        return (image if image.mode == "L" else image.convert("L")), []
    rgba = image.convert("RGBA")
    black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    warnings = (
        [f"{field}: its transparency was composited onto black (transparent is kept)"] if _transparent(rgba) else []
    )
    return Image.alpha_composite(black, rgba).convert("L"), warnings


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale scaled to 8 bits; Pillow's own conversion would clip everything above 255 to white."""
    if image.mode not in _SIXTEEN_BIT_MODES:
        return image
    eight_bit = image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
    # A 16-bit transparent grey (PNG tRNS) means nothing once scaled; such files are too rare to scale it too.
    eight_bit.info.pop("transparency", None)
    return eight_bit


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def _transparent(rgba: Image.Image) -> bool:
    lowest_alpha = rgba.getchannel("A").getextrema()[0]
    return isinstance(lowest_alpha, (int, float)) and lowest_alpha < 255


# --- messages -----------------------------------------------------------------------------------


def _limit_bytes(settings: Settings) -> int:
    return int(settings.max_input_image_mb * MB)


def _limit_text(settings: Settings) -> str:
    return f"MAX_INPUT_IMAGE_MB={settings.max_input_image_mb:g} ({_limit_bytes(settings)} bytes)"


def _shown(url: str) -> str:
    """``url`` as ``redact_url`` shows it, and not too long: safe for messages and logs."""
    return clipped(redact_url(url))


def _abbreviate(text: str) -> str:
    """At most 40 characters of a possibly huge input, and its length."""
    if len(text) <= 40:
        return repr(text)
    return f"{text[:40]!r}... ({len(text)} characters)"
