"""An upscale job made ready, on the CPU before the GPU lock: its input checked, its image read, its size settled.

``prepare_upscale`` does for an upscale job what ``prepare`` does for a generation: everything a bad input can
break fails here, before the job waits for the GPU, and what comes out is one immutable ``UpscalePlan``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import ExifTags, Image

from src.prepare.delivery import check_inline_fits
from src.prepare.images import load_image
from src.schema import A1111Call, InputError, UpscaleRequest, parse_upscale, resolve_upscale_size
from src.schema.upscale import staged_size

if TYPE_CHECKING:
    from src.adapters.catalog import Catalog
    from src.settings import Settings
    from src.storage import S3Storage


@dataclass(frozen=True)
class UpscalePlan:
    """One upscale job as the GPU stage runs it and the finish stage reports it."""

    # The request with its result's size and factor settled.
    request: UpscaleRequest
    # The input image, read and checked, in RGB.
    image: Image.Image
    # The size fields the request gave (``width``, ``height``), before the size was settled; none for a factor.
    size_fields: frozenset[str] = frozenset()
    # The width x height asked for, when both were given: the result's size, but with ``cover``.
    target: tuple[int, int] | None = None
    # The input's A1111 parameters (its PNG ``parameters`` text), carried into the result as A1111's Extras does.
    parameters: str | None = None
    warnings: list[str] = field(default_factory=list)
    read_ms: float = 0.0
    # The A1111 request (extra-single-image) the job came as; None for this worker's own.
    a1111: A1111Call | None = None

    @property
    def source_size(self) -> tuple[int, int]:
        return self.image.size

    @property
    def staged_size(self) -> tuple[int, int]:
        """The size the upscaler brings the image to before a crop or a pad (``schema.upscale.staged_size``)."""
        return staged_size(self.request, self.image.size, self.size_fields)

    @property
    def resize_mode(self) -> str | None:
        """How the image met a target size of both sides; None when it was enlarged by a factor or one side."""
        return self.request.resize_mode if len(self.size_fields) == 2 else None

    def release(self) -> None:
        """The job has ended (an upscale job holds no downloaded file)."""


def prepare_upscale(
    job: Any,
    settings: Settings,
    *,
    catalog: Callable[[], Catalog],
    storage: S3Storage | None,
) -> UpscalePlan:
    """An upscale job's input, checked, its image read and its size settled.

    Raises:
        InputError: the input breaks the contract, names an upscaler the worker does not have, holds an image
            that cannot be read, or asks for a size that is not larger, is over MAX_UPSCALE_SIDE, or would stage
            the image on its way at more than (2 x MAX_UPSCALE_SIDE)² pixels (``resolve_upscale_size``).
        ResponseTooLargeError: the answer could not fit inline.
    """
    request = parse_upscale(job, settings)
    problem = catalog().upscaler_problem(request.upscaler, "upscaler")
    if problem:
        raise InputError(f"invalid input: {problem}")
    started = time.perf_counter()
    loaded = load_image(request.image, "image", settings, storage)
    size_fields = frozenset({"width", "height"} & request.model_fields_set)
    target = (request.width, request.height) if request.width is not None and request.height is not None else None
    request = resolve_upscale_size(request, loaded.image.size, settings)
    check_inline_fits(request, settings)
    parameters = parameters_of(loaded.image)
    return UpscalePlan(
        request=request,
        image=loaded.image,
        size_fields=size_fields,
        target=target,
        parameters=parameters,
        warnings=list(loaded.warnings),
        read_ms=(time.perf_counter() - started) * 1000,
    )


def parameters_of(image: Image.Image) -> str | None:
    """The generation parameters a picture carries, as A1111's ``read_info_from_image`` reads them: a PNG's
    ``parameters`` text, else a JPEG's or WebP's EXIF UserComment (its character code, then the text)."""
    text = image.info.get("parameters")
    if isinstance(text, str):
        return text
    try:
        comment = image.getexif().get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.UserComment)
    except Exception:  # noqa: BLE001 - a picture's broken EXIF carries no parameters; the job goes on
        return None
    if not isinstance(comment, bytes):
        return None
    code, body = comment[:8], comment[8:]
    if code == b"UNICODE\x00":
        text = body.decode("utf-16-be", errors="ignore")
    elif code == b"ASCII\x00\x00\x00":
        text = body.decode("ascii", errors="ignore")
    else:
        text = comment.decode("utf-8", errors="ignore")
    return text or None
