"""ControlNet preprocessors: an input image -> the control map a ControlNet was trained on.

``canny`` is OpenCV's Canny edge detector, run as A1111's ControlNet extension runs
it: on the RGB image at its own resolution, or with its short side brought to the
unit's ``processor_res``, before the map is brought to the job's size. The map is
white edges on black, in three channels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def canny(image: Image.Image, low: int, high: int) -> Image.Image:
    """The Canny edges of ``image`` with hysteresis thresholds ``low`` and ``high`` (0 to 255), as an RGB map."""
    import cv2  # imported here: OpenCV takes a moment to import, and only ControlNet jobs need it

    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)
    return Image.fromarray(edges, mode="L").convert("RGB")


def resolution_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """``size`` with its short side ``resolution`` pixels, its proportions kept."""
    scale = resolution / min(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def at_resolution(image: Image.Image, resolution: int) -> Image.Image:
    """``image`` with its short side ``resolution`` pixels, its proportions kept: OpenCV's area resampling to
    shrink, bicubic to enlarge, as the ControlNet extension resizes before a preprocessor (without its padding to
    multiples of 64)."""
    import cv2

    size = resolution_size(image.size, resolution)
    scale = size[0] / image.width
    if size == image.size:
        return image
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return Image.fromarray(cv2.resize(np.asarray(image.convert("RGB")), size, interpolation=interpolation))


def preprocess(
    image: Image.Image, name: str, thresholds: tuple[int, int], resolution: int | None = None
) -> Image.Image:
    """``image`` through the preprocessor ``name``, at ``resolution`` (its short side) when one is given; ``none``
    returns it as it is (an RGB control map)."""
    if name == "canny":
        return canny(image if resolution is None else at_resolution(image, resolution), *thresholds)
    return image.convert("RGB")
