"""ControlNet preprocessors: an input image -> the control map a ControlNet was trained on.

``canny`` is OpenCV's Canny edge detector, run as A1111's ControlNet extension runs
it: on the RGB image at its own resolution, before the map is brought to the job's
size. The map is white edges on black, in three channels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def canny(image: Image.Image, low: int, high: int) -> Image.Image:
    """The Canny edges of ``image`` with hysteresis thresholds ``low`` and ``high`` (0 to 255), as an RGB map."""
    import cv2  # imported here: OpenCV takes a moment to import, and only ControlNet jobs need it

    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)
    return Image.fromarray(edges, mode="L").convert("RGB")


def preprocess(image: Image.Image, name: str, thresholds: tuple[int, int]) -> Image.Image:
    """``image`` through the preprocessor ``name``: ``none`` returns it as it is (an RGB control map)."""
    if name == "canny":
        return canny(image, *thresholds)
    return image.convert("RGB")
