"""A job's input images read and brought to its size: the image and mask, and each ControlNet unit's map.

``prepare_inputs`` reads the images (``images``), settles the job's size from the image (``schema``'s
``resolve_size``), brings image and mask to it (``canvas``) and makes each unit's control map
(``preprocessors``, then ``canvas`` again for its size). All of it on the CPU, before the GPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from PIL import Image

from src.prepare.canvas import ControlMaps, TaskImages, fit, prepare, proportions_changed
from src.prepare.images import load_image, load_mask, size_limits
from src.prepare.preprocessors import preprocess, resolution_size
from src.schema import ControlNetUnit, GenerateRequest, InputError, resolve_size

if TYPE_CHECKING:
    from src.settings import Settings
    from src.storage import S3Storage


@dataclass(frozen=True)
class Inputs:
    """A job ready for the GPU: its request with the size settled, and its images at that size."""

    request: GenerateRequest
    images: TaskImages | None = None
    # The input image's size after EXIF rotation.
    source_size: tuple[int, int] | None = None
    warnings: list[str] = field(default_factory=list)
    # Reading (downloading, decoding) and preparing the images.
    read_ms: float | None = None
    # The ControlNet units' control maps, when the job has units.
    controls: ControlMaps | None = None

    # What the delivery needs (``prepare.delivery.Delivered``): the returned images' size, count and form.
    @property
    def output_size(self) -> tuple[int, int]:
        """The size of the images the job returns: the request's, but an only-masked inpaint returns the input
        image at its own size, the painted region pasted back into it."""
        if self.images is not None and self.images.original is not None:
            return self.images.original.size
        return self.request.output_size

    @property
    def num_images(self) -> int:
        return self.request.num_images

    @property
    def output_format(self) -> str:
        return self.request.output_format

    @property
    def output_type(self) -> str:
        return self.request.output_type


def prepare_inputs(request: GenerateRequest, settings: Settings, storage: S3Storage | None) -> Inputs:
    """Read the request's image and mask, settle its size and bring them to it: all before the GPU.

    Raises:
        InputError: an image cannot be read, or does not fit the request; the message names the field.
    """
    if request.image is None and not request.controlnets:
        return Inputs(request=request)
    started = time.perf_counter()
    resolved, images, source_size, warnings, picture = request, None, None, [], None
    if request.image is not None:
        image = load_image(request.image, "image", settings, storage)
        picture = image.image
        mask = None
        if request.mask is not None:
            mask = load_mask(request.mask, "mask", settings, storage, rounded=request.mask_round)
        resolved, sized = resolve_size(request, image.image.size, settings)
        images, more = prepare(resolved, image.image, mask.image if mask else None)
        source_size = image.image.size
        warnings = [*image.warnings, *(mask.warnings if mask else []), *sized, *more]
    controls = None
    if request.controlnets:
        controls, more = control_maps(resolved, images, settings, storage, picture=picture)
        warnings += more
    return Inputs(
        request=resolved,
        images=images,
        source_size=source_size,
        warnings=warnings,
        read_ms=(time.perf_counter() - started) * 1000,
        controls=controls,
    )


def control_maps(
    request: GenerateRequest,
    images: TaskImages | None,
    settings: Settings,
    storage: S3Storage | None,
    *,
    picture: Image.Image | None = None,
) -> tuple[ControlMaps, list[str]]:
    """Read each unit's control image, preprocess it at its own size, and bring the map to the job's size by
    ``resize_mode`` (and to the hires pass's size); with ``inpaint_area`` ``masked``, bring it to the input
    image's size and crop it as the image is, before its preprocessor runs (``_cropped_map``). A unit without an
    image takes the job's ``picture`` (the input image as read), or for an outpaint the grown canvas.

    Raises:
        InputError: a control image cannot be read; the message names its field.
    """
    width, height = request.size
    crop = images.crop if images is not None else None
    # With a crop, each map meets the picture the crop is taken from (the input image at its own size, as the
    # ControlNet extension's inpaint_crop_input_image), then is cropped as it is.
    target = images.original.size if images is not None and images.original is not None and crop else (width, height)
    first, hires, resized, sources, warnings = [], [], [], [], []
    for index, unit in enumerate(request.controlnets):
        field_name = f"controlnets.{index}.image"
        if unit.image is not None:
            loaded = load_image(unit.image, field_name, settings, storage)
            source = loaded.image
            warnings += loaded.warnings
        else:
            source = _job_picture(request, images, picture)
        _check_resolution(source.size, unit.processor_res, index, settings)
        resize_mode = unit.resize_mode or request.resize_mode
        if crop is not None:
            control, fitted = _cropped_map(source, unit, resize_mode, target=target, crop=crop, size=(width, height))
        else:
            control = preprocess(source, unit.preprocess, unit.canny_thresholds, unit.processor_res)
            fitted = fit(control, *target, resize_mode)
        sources.append(control.size)
        first.append(fitted)
        if request.hires is not None:
            hires.append(fit(control, *request.output_size, resize_mode))
        note = proportions_changed(source.size if crop else control.size, target, resize_mode)
        resized.append(note)
        if note:
            warnings.append(f"{field_name}: {note}")
    hires_maps = hires if request.hires is not None else None
    return ControlMaps(first=first, hires=hires_maps, resized=resized, sources=sources), warnings


def _job_picture(request: GenerateRequest, images: TaskImages | None, picture: Image.Image | None) -> Image.Image:
    """The control image of a unit that gives none: the job's input image, or its outpaint canvas (where the
    image sits among the margins, so that the map lines up with it)."""
    if request.outpaint is not None and images is not None and images.original is not None:
        return images.original
    assert picture is not None, "the schema refuses a unit without an image in a text-to-image job"
    return picture


def _cropped_map(
    image: Image.Image,
    unit: ControlNetUnit,
    resize_mode: str,
    *,
    target: tuple[int, int],
    crop: tuple[int, int, int, int],
    size: tuple[int, int],
) -> tuple[Image.Image, Image.Image]:
    """A unit's map for an only-masked inpaint, as the ControlNet extension's inpaint_crop_input_image makes it:
    the control image brought to the input image's size (``target``), cropped as it is, enlarged to the job's
    ``size``, and only then preprocessed (canny's edges stay one pixel wide); the preprocessor's map, and the map
    at ``size``."""
    region = fit(fit(image, *target, resize_mode).crop(crop), *size, "fill")
    control = preprocess(region, unit.preprocess, unit.canny_thresholds, unit.processor_res)
    return control, fit(control, *size, "resize")


def _check_resolution(size: tuple[int, int], resolution: int | None, index: int, settings: Settings) -> None:
    """Refuse a ``processor_res`` that would enlarge the control image past what an input image may be: a
    short side brought to it takes the long side with it (2048 on an 8x512 image is 2048x131072, 800 MB).

    Raises:
        InputError: naming the unit's ``processor_res``.
    """
    if resolution is None:
        return
    width, height = resolution_size(size, resolution)
    most = size_limits(settings)[1]
    if width * height > most:
        raise InputError(
            f"invalid input: controlnets.{index}.processor_res={resolution}: brings the {size[0]}x{size[1]} image "
            f"to {width}x{height}, over the {most} pixels an input image may have; lower it, or send an image "
            "nearer the job's proportions"
        )
