"""The three names spandrel imports; calling any of them is a test failure, never a silent result."""

from __future__ import annotations

import enum
from typing import Any


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


def _not_here(name: str) -> Any:
    def called(*args: Any, **kwargs: Any) -> Any:
        del args, kwargs
        raise NotImplementedError(f"torchvision.transforms.functional.{name}: the tests' stand-in; not for use")

    return called


rotate = _not_here("rotate")
normalize = _not_here("normalize")
