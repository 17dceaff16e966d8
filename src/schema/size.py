"""The size a job runs at: checked against the limits and, for a job with an image, settled from the image."""

from __future__ import annotations

from typing import TypeVar

from src.schema.core import INVALID_INPUT, SIDE_STEP, InputError, RequestLimits
from src.schema.passes import HIRES_SIDE_STEP, PassOptions, describe_margins

# Any request with the size fields and the passes' (GenerateRequest, in the worker).
_Request = TypeVar("_Request", bound=PassOptions)


def check_size(request: PassOptions, width: int, height: int, limits: RequestLimits) -> None:
    """Check a job's size, its outpaint canvas and its hires pass against the limits.

    Raises:
        ValueError: naming the fields, the sizes and the rule.
    """
    max_pixels, max_side = limits.max_pixels, limits.max_side
    pixels = width * height * request.num_images
    if pixels > max_pixels:
        raise ValueError(
            f"width x height x num_images = {width} x {height} x {request.num_images} "
            f"= {pixels} pixels: must be at most {max_pixels} (MAX_PIXELS); "
            "ask for fewer or smaller images"
        )
    if request.outpaint is not None:
        added_width, added_height = request.outpaint.added
        if width - added_width < SIDE_STEP or height - added_height < SIDE_STEP:
            raise ValueError(
                f"outpaint: a {width}x{height} result with {added_width} and {added_height} pixels added leaves "
                f"{width - added_width}x{height - added_height} for the image: each side must be at least {SIDE_STEP}"
            )
    if request.hires is not None:
        target_width, target_height = int(width * request.hires.scale), int(height * request.hires.scale)
        target = f"{width}x{height} x {request.hires.scale:g} = {target_width}x{target_height}"
        if target_width % HIRES_SIDE_STEP or target_height % HIRES_SIDE_STEP:
            raise ValueError(f"hires.scale: {target}: both sides must be multiples of {HIRES_SIDE_STEP}")
        if max(target_width, target_height) > max_side:
            raise ValueError(f"hires.scale: {target}: each side must be at most {max_side} (MAX_SIDE)")
        target_pixels = target_width * target_height * request.num_images
        if target_pixels > max_pixels:
            raise ValueError(
                f"hires.scale: {target} x {request.num_images} images = {target_pixels} pixels: "
                f"must be at most {max_pixels} (MAX_PIXELS)"
            )


def _floor_to_side_step(value: float) -> int:
    return max(SIDE_STEP, int(value) // SIDE_STEP * SIDE_STEP)


def _fitted_image_size(request: PassOptions, image_size: tuple[int, int], limits: RequestLimits) -> tuple[int, int]:
    """The image's size scaled down until the job, with its outpaint margins and every image of the batch, fits
    ``MAX_SIDE`` and ``MAX_PIXELS``, in multiples of ``SIDE_STEP`` (at least one)."""
    image_width, image_height = image_size
    added_width, added_height = request.outpaint.added if request.outpaint is not None else (0, 0)
    scale = min(
        1.0,
        (limits.max_side - added_width) / image_width,
        (limits.max_side - added_height) / image_height,
    )
    while True:
        part_width, part_height = (
            _floor_to_side_step(image_width * scale),
            _floor_to_side_step(image_height * scale),
        )
        width, height = part_width + added_width, part_height + added_height
        if width * height * request.num_images <= limits.max_pixels or part_width == part_height == SIDE_STEP:
            return part_width, part_height
        scale *= 0.98


def _sides_over_max_side(request: PassOptions, width: int, height: int, limits: RequestLimits) -> list[str]:
    """A problem for ``width`` and for ``height`` when it is over ``MAX_SIDE``."""
    added_width, added_height = request.outpaint.added if request.outpaint is not None else (0, 0)
    problems = []
    for name, value, added in (("width", width, added_width), ("height", height, added_height)):
        if value > limits.max_side:
            # The margins are named when they took the side there, so the user knows which field to change.
            grown = (
                f": {value - added} for the image plus outpaint {describe_margins(request.outpaint, name)}"
                if request.outpaint is not None and added
                else ""
            )
            problems.append(f"{name}={value}: must be at most {limits.max_side} (MAX_SIDE){grown}")
    return problems


def resolve_size(request: _Request, image_size: tuple[int, int], limits: RequestLimits) -> tuple[_Request, list[str]]:
    """The request with its size settled from its input image, and a warning when the image is resized.

    Without ``width`` and ``height``, the image keeps its size, scaled down to fit ``MAX_SIDE``
    and ``MAX_PIXELS`` (with the outpaint margins and every image of the batch) and rounded
    down to multiples of 64; with one of them, the other follows the image's aspect ratio.

    Raises:
        InputError: the grown canvas or the hires pass breaks a limit.
    """
    image_width, image_height = image_size
    added_width, added_height = request.outpaint.added if request.outpaint is not None else (0, 0)
    warnings = []
    if request.width is not None and request.height is not None:
        width, height = request.width, request.height
    elif request.width is not None:
        width = request.width
        height = _floor_to_side_step((width - added_width) * image_height / image_width) + added_height
    elif request.height is not None:
        height = request.height
        width = _floor_to_side_step((height - added_height) * image_width / image_height) + added_width
    else:
        part_width, part_height = _fitted_image_size(request, image_size, limits)
        width, height = part_width + added_width, part_height + added_height
        if (part_width, part_height) != image_size:
            fitted = (
                f"fitted to MAX_SIDE={limits.max_side} and MAX_PIXELS={limits.max_pixels} and rounded down to "
                f"multiples of {SIDE_STEP}"
            )
            # An only-masked inpaint paints its crop at that size and returns the image at its own.
            masked = getattr(request, "inpaint_area", "") == "masked"
            only_masked = masked and getattr(request, "mask", None) is not None
            warnings.append(
                f"image: {image_width}x{image_height}: without width and height the masked region is painted at "
                f"{part_width}x{part_height}, the image's size {fitted}; the image comes back at its own size"
                if only_masked
                else f"image: {image_width}x{image_height} was brought to {part_width}x{part_height}: without width "
                f"and height the job takes the image's size, {fitted}"
            )
    problems = _sides_over_max_side(request, width, height, limits)
    if not problems:
        try:
            check_size(request, width, height, limits)
        except ValueError as error:
            problems.append(str(error))
    if problems:
        source = f"the image is {image_width}x{image_height}"
        raise InputError(f"{INVALID_INPUT}{'; '.join(problems)} ({source})")
    return request.model_copy(update={"width": width, "height": height}), warnings
