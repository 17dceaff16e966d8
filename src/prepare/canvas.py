"""Input images brought to the job's size: A1111's resize modes, the outpaint canvas, the mask, the crop.

Everything here runs on the CPU before the job takes the GPU. The geometry is
diffusers' own (``VaeImageProcessor.resize``, ``get_crop_region`` and
``apply_overlay``, which copy AUTOMATIC1111's), so the worker and bare
diffusers see the same pixels.

The one place the worker goes further: with ``keep_unmasked``, a pixel the
mask leaves black comes back byte for byte as it was. The blurred edge feathers
inwards only, where diffusers' overlay would also blend a few pixels outside
the mask.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageChops, ImageFilter, ImageOps

from src.schema import GenerateRequest, InputError

if TYPE_CHECKING:
    from diffusers.image_processor import VaeImageProcessor


# diffusers' names for A1111's resize modes 0, 1 and 2.
_DIFFUSERS_RESIZE_MODES = {"resize": "default", "crop": "crop", "fill": "fill"}


@functools.cache
def _processor() -> VaeImageProcessor:
    # Only its PIL geometry is used, which does not depend on the VAE. Imported here: diffusers takes
    # seconds to import, and `import handler` stays cheap.
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor()


@dataclass(frozen=True)
class TaskImages:
    """The images of one job, at the size the pipeline works at."""

    # What the pipeline starts from, at width x height (for inpaint_area "masked": the crop, enlarged).
    image: Image.Image
    # Where it paints (L, blurred), the same size as ``image``; None for img2img.
    mask: Image.Image | None = None
    # The whole image at the job's size, onto which the painted part is pasted back.
    original: Image.Image | None = None
    # Where the painted pixels show when pasted back (L); black is the original, untouched.
    overlay: Image.Image | None = None
    # The region of ``original`` that was painted, for inpaint_area "masked".
    crop: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class ControlMaps:
    """Each ControlNet unit's control map at the job's size, and at the hires pass's size when there is one."""

    first: list[Image.Image]
    hires: list[Image.Image] | None = None
    # How each control image was brought to the job's size, when that changed its proportions.
    resized: list[str | None] = field(default_factory=list)
    # Each control map's size as its preprocessor made it (the image's own size), before it met the job's.
    sources: list[tuple[int, int]] = field(default_factory=list)


# What each resize mode does to an image whose proportions are not the job's.
_RESIZE_NOTES = {"resize": "stretched", "crop": "cropped", "fill": "padded"}


def proportions_changed(size: tuple[int, int], target: tuple[int, int], resize_mode: str) -> str | None:
    """How ``resize_mode`` changed an image of ``size`` brought to ``target``, when the proportions differ by
    more than 1%; else None."""
    (width, height), (target_width, target_height) = size, target
    if abs((target_width / target_height) / (width / height) - 1) <= 0.01:
        return None
    return (
        f"{width}x{height} was {_RESIZE_NOTES[resize_mode]} to {target_width}x{target_height} "
        f"(resize_mode {resize_mode!r}), which changed its proportions"
    )


# diffusers' crop enlarges the whole image to cover the target, then crops: for an image far from the target's
# proportions (8x8192 to 512x512 covers 512x524288, 800 MB) the worker resizes the kept part alone instead.
_COVER_MOST = 4


def fit(image: Image.Image, width: int, height: int, resize_mode: str) -> Image.Image:
    """``image`` at ``width`` x ``height`` as A1111's resize mode does it; untouched when it already is."""
    if image.size == (width, height):
        return image
    if resize_mode == "crop" and _covering_area(image.size, width, height) > _COVER_MOST * width * height:
        return _crop_resized(image, width, height)
    resized = _processor().resize(image, height=height, width=width, resize_mode=_DIFFUSERS_RESIZE_MODES[resize_mode])
    assert isinstance(resized, Image.Image)
    return resized


def _covering_area(size: tuple[int, int], width: int, height: int) -> int:
    """The area of ``size`` enlarged to cover ``width`` x ``height`` (diffusers' crop, before it crops)."""
    scale = max(width / size[0], height / size[1])
    return round(size[0] * scale) * round(size[1] * scale)


def _crop_resized(image: Image.Image, width: int, height: int) -> Image.Image:
    """The centre of ``image`` in ``width`` x ``height``'s proportions, resized to it from the image itself."""
    scale = max(width / image.width, height / image.height)
    kept_width, kept_height = width / scale, height / scale
    left, top = (image.width - kept_width) / 2, (image.height - kept_height) / 2
    box = (left, top, left + kept_width, top + kept_height)
    return image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS, box=box)


def prepare(request: GenerateRequest, image: Image.Image, mask: Image.Image | None) -> tuple[TaskImages, list[str]]:
    """Bring ``image`` (and ``mask``) to the request's size for its task.

    ``request`` has its size resolved (``schema.resolve_size``). As in A1111, the mask is blurred at the image's
    own size; with ``inpaint_area`` ``masked`` the region is cropped from the image at its own size too, and the
    painted region goes back into it, so the job returns the image at its own size.

    Raises:
        InputError: the mask is not the image's size, or is all black.
    """
    width, height = request.size
    warnings = _resize_warnings(request, image)
    if request.task == "img2img":
        return TaskImages(image=fit(image, width, height, request.resize_mode)), warnings
    if request.outpaint is not None:
        original, painted = _outpaint_canvas(request, image)
        blurred = _blurred(painted, request.mask_blur)
    else:
        assert mask is not None  # the task is inpaint
        painted = _checked_mask(request, image, mask)
        blurred = _not_black(_blurred(painted, request.mask_blur), blurred_by=request.mask_blur)
        original = image
        if request.inpaint_area == "whole":
            # diffusers' crop and fill modes return RGB; the mask stays greyscale.
            original = fit(image, width, height, request.resize_mode)
            painted = _not_black(fit(painted, width, height, request.resize_mode).convert("L"))
            blurred = fit(blurred, width, height, request.resize_mode).convert("L")
    # The overlay is the blurred mask, but black wherever the mask was black: those pixels stay exact.
    overlay = ImageChops.darker(blurred, painted.point(lambda value: 255 if value else 0))
    # As A1111: every masked content but "original" starts from the filled pixels (the latent ones, from there).
    if request.inpaint_area == "whole":
        start = fill_masked(original, blurred) if request.inpaint_fill != "original" else original
        return TaskImages(image=start, mask=blurred, original=original, overlay=overlay), warnings
    # The crop is widened to the job's proportions within ``original``, then enlarged to the job's size.
    crop = _processor().get_crop_region(blurred, width, height, pad=request.inpaint_padding)
    region = fit(original.crop(crop), width, height, "fill")
    region_mask = fit(blurred.crop(crop), width, height, "fill").convert("L")
    return (
        TaskImages(
            image=fill_masked(region, region_mask) if request.inpaint_fill != "original" else region,
            mask=region_mask,
            original=original,
            overlay=overlay,
            crop=crop,
        ),
        warnings,
    )


def _checked_mask(request: GenerateRequest, image: Image.Image, mask: Image.Image) -> Image.Image:
    """The mask as greyscale, inverted with ``mask_invert``.

    Raises:
        InputError: it is not the image's size, or is all black.
    """
    if mask.size != image.size:
        raise InputError(
            f"mask: is {mask.size[0]}x{mask.size[1]} and the image is {image.size[0]}x{image.size[1]}: "
            "they must be the same size (after EXIF rotation)"
        )
    mask = mask.convert("L")
    return _not_black(ImageOps.invert(mask) if request.mask_invert else mask)


def _not_black(mask: Image.Image, blurred_by: int = 0) -> Image.Image:
    """``mask`` (L) when any of it is white or grey.

    Raises:
        InputError: it is all black (after a blur of ``blurred_by`` pixels, which a mask of a few pixels
            does not survive).
    """
    if mask.getextrema()[1] == 0:
        if blurred_by:
            raise InputError(
                f"mask: its white area is too small to survive mask_blur={blurred_by}, so nothing would be "
                "repainted; paint a larger area or lower mask_blur"
            )
        raise InputError("mask: is all black, so nothing would be repainted; paint white where the image changes")
    return mask


def _blurred(mask: Image.Image, radius: int) -> Image.Image:
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius else mask


# Gaussian radii, coarse to fine, and how many times each layer is laid: A1111's masked content "fill".
_FILL_LAYERS = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """``image`` with its masked area painted from the colours around it, as A1111's masked content "fill".

    The unmasked pixels, weighted by how unmasked they are (premultiplied alpha), are blurred at each radius of
    ``_FILL_LAYERS`` and laid over one another, coarse first: far from the edge the colour is the wide blur's,
    near it the fine blur's, and the unmasked pixels end as they were.
    """
    weighted = Image.new("RGBa", image.size)
    weighted.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    layered = Image.new("RGBA", image.size)
    for radius, times in _FILL_LAYERS:
        layer = weighted.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(times):
            layered.alpha_composite(layer)
    return layered.convert("RGB")


def _outpaint_canvas(request: GenerateRequest, image: Image.Image) -> tuple[Image.Image, Image.Image]:
    """The grown canvas, its new area filled with the image's stretched edges, and the mask of what is painted.

    The mask reaches ``mask_blur`` pixels into the image, so that the seam is painted over and blended.
    """
    assert request.outpaint is not None
    margins = request.outpaint
    width, height = request.size
    added_width, added_height = margins.added
    part = fit(image, width - added_width, height - added_height, request.resize_mode)
    pixels = np.pad(
        np.asarray(part), ((margins.top, margins.bottom), (margins.left, margins.right), (0, 0)), mode="edge"
    )
    canvas = Image.fromarray(pixels, mode="RGB")
    mask = Image.new("L", (width, height), 255)
    reach = request.mask_blur
    kept = (
        margins.left + reach if margins.left else 0,
        margins.top + reach if margins.top else 0,
        width - margins.right - reach if margins.right else width,
        height - margins.bottom - reach if margins.bottom else height,
    )
    if kept[0] < kept[2] and kept[1] < kept[3]:
        mask.paste(0, kept)
    return canvas, mask


def _resize_warnings(request: GenerateRequest, image: Image.Image) -> list[str]:
    """A warning when ``resize`` stretches the image out of its proportions by more than 1%, or when
    ``resize_mode`` has nothing to resize (an only-masked inpaint crops at the image's own size)."""
    if request.task == "inpaint" and request.inpaint_area == "masked":
        # ControlNet units without their own resize_mode take the request's.
        if request.resize_mode == "resize" or any(unit.resize_mode is None for unit in request.controlnets):
            return []
        return [
            f"resize_mode: {request.resize_mode!r} has no effect with inpaint_area 'masked': the masked region "
            "is cropped from the image at its own size, in width x height's proportions"
        ]
    if request.resize_mode != "resize":
        return []
    width, height = request.size
    if request.outpaint is not None:
        width, height = width - request.outpaint.added[0], height - request.outpaint.added[1]
    ratio = (width / height) / (image.width / image.height)
    if abs(ratio - 1) <= 0.01:
        return []
    return [
        f"image: {image.width}x{image.height} was stretched to {width}x{height}, out of its proportions "
        "(resize_mode 'resize'); 'crop' or 'fill' keep them"
    ]


def hidden(images: TaskImages | None, picture: Image.Image) -> Image.Image:
    """A picture the safety checker flagged: black, at the size the job returns; nothing of the input shows."""
    size = images.original.size if images is not None and images.original is not None else picture.size
    return picture if picture.size == size else Image.new(picture.mode, size)


def paste_back(request: GenerateRequest, images: TaskImages | None, painted: Image.Image) -> Image.Image:
    """The painted result on the original: unmasked pixels kept, or the crop pasted where it came from."""
    if images is None or images.original is None or images.overlay is None:
        return painted
    if request.keep_unmasked:
        return _processor().apply_overlay(images.overlay, images.original, painted, images.crop)
    if images.crop is None:
        return painted
    # Not keeping the unmasked pixels still puts the painted crop back where it came from, whole.
    region = Image.new("L", images.original.size, 0)
    region.paste(255, images.crop)
    return _processor().apply_overlay(region, images.original, painted, images.crop)
