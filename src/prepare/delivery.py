"""Where a job's answer goes and what it may weigh: the output formats, inline or S3, and the size guard.

Decided in ``prepare``, before the job waits for the GPU: a request that can only be answered inline and
could not fit under MAX_RESPONSE_MB whatever its images look like is refused there. ``finish`` encodes
with these formats and checks the real size against the same limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from src.errors import ResponseTooLargeError
from src.settings import Settings


class Delivered(Protocol):
    """What the delivery needs of a request (a generation's or an upscale's): its images' size, count and form."""

    @property
    def output_size(self) -> tuple[int, int]: ...
    @property
    def num_images(self) -> int: ...
    @property
    def output_format(self) -> str: ...
    @property
    def output_type(self) -> str: ...


@dataclass(frozen=True)
class ImageFormat:
    """How one output format is written."""

    pil_name: str
    extension: str
    content_type: str
    lossy: bool
    # A floor on bytes per pixel for a real image, used to refuse, before any work,
    # a request whose answer could not fit inline whatever the images look like.
    min_bytes_per_pixel: float


FORMATS = {
    "png": ImageFormat("PNG", "png", "image/png", lossy=False, min_bytes_per_pixel=0.5),
    "jpeg": ImageFormat("JPEG", "jpg", "image/jpeg", lossy=True, min_bytes_per_pixel=0.02),
    "webp": ImageFormat("WEBP", "webp", "image/webp", lossy=True, min_bytes_per_pixel=0.01),
}

BASE64_GROWTH = 4 / 3


def _megabytes(size: float) -> str:
    """``size`` in MB with its bytes: rounded alone, 20,040,000 bytes read as 20.0 MB, over a limit of 20."""
    return f"{size / 1_000_000:.2f} MB ({size:,.0f} bytes)"


def too_large(
    request: Delivered, size: float, limit: float, when: str, *, upload_failed: str | None = None
) -> ResponseTooLargeError:
    """The refusal of an answer over MAX_RESPONSE_MB; ``upload_failed``, why the images meant for the bucket came
    back inline instead, when they did."""
    failed = f" The images came back inline because their upload failed: {upload_failed}." if upload_failed else ""
    return ResponseTooLargeError(
        f"the answer {when} {_megabytes(size)} inline ({request.num_images} x {_size(request)} "
        f"{request.output_format}, base64), over MAX_RESPONSE_MB={limit / 1_000_000:g}.{failed} Ways out: "
        "output_format 'jpeg' or 'webp', fewer or smaller images, or S3 (set BUCKET_NAME and use output_type 's3')"
    )


def _size(request: Delivered) -> str:
    width, height = request.output_size
    return f"{width}x{height}"


def check_inline_fits(request: Delivered, settings: Settings) -> None:
    """Refuse, before generating, a request that can only be answered inline and cannot fit.

    Raises:
        ResponseTooLargeError: even the smallest plausible files would be over ``MAX_RESPONSE_MB``.
    """
    if goes_to_s3(request, settings):
        return
    width, height = request.output_size
    pixels = width * height * request.num_images
    smallest = pixels * FORMATS[request.output_format].min_bytes_per_pixel * BASE64_GROWTH
    limit = settings.max_response_mb * 1_000_000
    if smallest > limit:
        raise too_large(request, smallest, limit, "would be at least")


def goes_to_s3(request: Delivered, settings: Settings) -> bool:
    return request.output_type == "s3" or (request.output_type == "auto" and settings.bucket_configured)
