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

A URL is fetched by ``http``: every address its host resolves to checked, the connection pinned to a checked
address, each redirect checked the same way, one deadline (IMAGE_FETCH_TIMEOUT_SECONDS) for them all.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import io
import itertools
import logging
import re
import struct
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import ExifTags, Image, ImageOps

from src.errors import StorageError, clipped, first_line
from src.prepare.http import (
    FetchError,
    Resolve,
    Rules,
    chunks,
    content_length,
    opened,
    shown,
    system_resolve,
)
from src.schema import InputError
from src.settings import Settings

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
_GREY_ALPHA_MODES = ("LA", "La")
# With mask_round, a mask's alpha above this is white and the rest black, as A1111's create_binary_mask rounds it.
ALPHA_ROUNDS_ABOVE = 128

_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_CHUNK_BYTES = 64 * 1024


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
    reference: str,
    field: str,
    settings: Settings,
    storage: S3Storage | None,
    *,
    rounded: bool = False,
    resolve: Resolve = system_resolve,
) -> LoadedImage:
    """Read, check and decode an inpainting mask, as L: white (255) is repainted, black kept, grey in between.

    As A1111's ``create_binary_mask`` reads one: a colour mask with transparency is its alpha channel (opaque is
    repainted whatever its colour, transparent kept), ``rounded`` to black and white (above 128 is white); any
    other mask is its grey. Arguments and errors as for ``load_image``.
    """
    data, source = _read(reference, field, settings, storage, resolve)
    image, warnings = _decode(data, field, source, settings)
    image, more = _to_l(image, field, rounded=rounded)
    return LoadedImage(image=image, warnings=warnings + more, source=source)


def load_as_sent(
    reference: str, field: str, settings: Settings, storage: S3Storage | None, *, resolve: Resolve = system_resolve
) -> LoadedImage:
    """Read, check and decode an image as it was sent, its mode and metadata (``info``: a PNG's text chunks, EXIF)
    kept, for A1111's PNG Info. Arguments and errors as for ``load_image``."""
    data, source = _read(reference, field, settings, storage, resolve)
    image, warnings = _decode(data, field, source, settings)
    return LoadedImage(image=image, warnings=warnings, source=source)


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
                f"{field}: {shown(text)}: URLs are not accepted (IMAGE_URLS=false); send base64 or s3:// instead"
            )
        return _fetch(text, field, settings, limit, resolve), shown(text)
    if head.startswith("s3://"):
        return _from_s3(text, field, storage, limit)
    if _URL_SCHEME.match(text):
        scheme = text.split(":", 1)[0]
        raise InputError(
            f"{field}: {shown(text)}: the scheme {scheme!r} is not supported: "
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


def _fetch(url: str, field: str, settings: Settings, limit: int, resolve: Resolve) -> bytes:
    """GET ``url`` within IMAGE_FETCH_TIMEOUT_SECONDS, following at most MAX_REDIRECTS redirects."""
    rules = Rules(
        allow_private=settings.image_urls_allow_private,
        private_setting="IMAGE_URLS_ALLOW_PRIVATE",
        timeout_setting=f"IMAGE_FETCH_TIMEOUT_SECONDS={settings.image_fetch_timeout_seconds:g}",
        accept="image/png,image/jpeg,image/webp,*/*;q=0.8",
        max_redirects=MAX_REDIRECTS,
    )
    deadline = time.monotonic() + settings.image_fetch_timeout_seconds
    current = url
    try:
        with opened(url, rules, deadline, resolve) as answer:
            current = answer.url
            length = content_length(answer.response)
            if length is not None and length > limit:
                raise FetchError(f"its Content-Length, {length} bytes, is over {_limit_text(settings)}")
            data = bytearray()
            for chunk in chunks(answer.response, deadline, rules, _CHUNK_BYTES):
                data += chunk
                if len(data) > limit:
                    raise FetchError(f"its body grew past {_limit_text(settings)}; stopped reading")
            return bytes(data)
    except FetchError as refused:
        current = refused.url or current
        hop = f" (redirected to {shown(current)})" if current != url else ""
        raise InputError(f"{field}: {shown(url)}{hop}: {refused}") from None


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
    max_side, max_area = size_limits(settings)
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
        raise InputError(f"{where}: cannot be read as {kind}: {first_line(error)}") from None
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
        raise InputError(f"{where}: the {kind} data is truncated or corrupt: {first_line(error)}") from None
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


def size_limits(settings: Settings) -> tuple[int, int]:
    """(largest side, largest area) of an input image."""
    return SIDE_FACTOR * settings.max_side, AREA_FACTOR * max(settings.max_pixels, settings.max_side**2)


def _to_rgb(image: Image.Image, field: str) -> tuple[Image.Image, list[str]]:
    image = _eight_bit(image)
    if not _has_alpha(image):
        return (image if image.mode == "RGB" else image.convert("RGB")), []
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    warnings = [f"{field}: its transparency was flattened onto white"] if _transparent(rgba) else []
    flattened = Image.alpha_composite(white, rgba).convert("RGB")
    # A1111's parameters text goes with the pixels (an upscale job carries it into its result, as A1111 does).
    if isinstance(image.info.get("parameters"), str):
        flattened.info["parameters"] = image.info["parameters"]
    return flattened, warnings


def _to_l(image: Image.Image, field: str, *, rounded: bool) -> tuple[Image.Image, list[str]]:
    image = _eight_bit(image)
    # A1111 takes the alpha of an RGBA mask (a palette or RGB one with a transparent colour is RGBA there too), not
    # of a grey one with alpha, which is its grey.
    rgba = image.convert("RGBA") if _has_alpha(image) and image.mode not in _GREY_ALPHA_MODES else None
    if rgba is None or not _transparent(rgba):
        return (image if image.mode == "L" else image.convert("L")), []
    alpha = rgba.getchannel("A")
    warning = f"{field}: it has transparency, so its alpha is the mask (opaque repaints, transparent keeps)"
    if rounded:
        return alpha.point(lambda value: 255 if value > ALPHA_ROUNDS_ABOVE else 0), [f"{warning}, rounded, as in A1111"]
    return alpha, [f"{warning}, as in A1111"]


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


def _abbreviate(text: str) -> str:
    """At most 40 characters of a possibly huge input, and its length."""
    if len(text) <= 40:
        return repr(text)
    return f"{text[:40]!r}... ({len(text)} characters)"
