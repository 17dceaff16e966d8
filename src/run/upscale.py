"""An upscale job under the GPU lock: its image through an upscaler of UPSCALER_DIR, and nothing generated.

``upscale_job`` takes an ``UpscalePlan`` from ``prepare`` and returns the enlarged image, as A1111's Extras tab
makes it: the image goes through the model as many times as its target size needs (at most three), is brought
to the size that covers the target with Lanczos, then meets the target by ``resize_mode``. Only the model's
passes hold the GPU lock, with a deadline from the moment they have it and a cancel check before each tile;
``lanczos`` and ``nearest`` run on the CPU without it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from src.errors import GenerationTimeoutError, JobCancelledError, OutOfMemoryError
from src.prepare import UpscalePlan
from src.prepare.canvas import fit
from src.run.engine import Engine, is_out_of_memory
from src.schema import UPSCALE_BUILT_IN

log = logging.getLogger(__name__)

_RESAMPLE = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}


@dataclass(frozen=True)
class Upscaled:
    """What one upscale job produced, and what produced it."""

    image: Image.Image
    # The model's own factor and the passes it made; None and 0 for lanczos and nearest.
    upscaler_scale: int | None
    passes: int
    inference_ms: float
    device: str
    # The dtype the model ran in; None for lanczos and nearest.
    dtype: str | None
    queue_ms: float = 0.0
    warnings: list[str] = field(default_factory=list)


def upscale_job(
    engine: Engine, plan: UpscalePlan, *, timeout_s: float, cancelled: threading.Event | None = None
) -> Upscaled:
    """The plan's image enlarged to its request's size. ``timeout_s`` bounds the model's passes from when the
    job gets the GPU; once ``cancelled`` is set, the job stops waiting for it, or before its next tile.

    Raises:
        GenerationTimeoutError, JobCancelledError: it ran past GENERATION_TIMEOUT_SECONDS, or was cancelled.
        OutOfMemoryError: a tile did not fit in GPU memory.
        AdapterError: the upscaler cannot be loaded (named).
    """
    request = plan.request
    covering = _covering_size(plan.image.size, request.scale or 1.0)
    if request.upscaler in UPSCALE_BUILT_IN:
        started = time.perf_counter()
        image = fit(plan.image.resize(covering, _RESAMPLE[request.upscaler]), *request.output_size, request.resize_mode)
        return Upscaled(image, None, 0, (time.perf_counter() - started) * 1000, device="cpu", dtype=None)
    upscalers = engine.upscalers
    with engine.gpu(cancelled) as queue_ms:
        started = time.perf_counter()
        between = _deadline(engine.clock, timeout_s, cancelled)
        try:
            enlarged, passes = upscalers.enlarge(request.upscaler, _tensor(plan.image), covering, between)
            image = _image(enlarged)
        except RuntimeError as error:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(error):
                raise
            raise OutOfMemoryError(
                f"upscaling {plan.image.size[0]}x{plan.image.size[1]} with {request.upscaler} ran out of GPU memory "
                f"in tiles of {upscalers.tile} pixels: set UPSCALE_TILE lower"
            ) from None
        finally:
            if engine.device.type == "cuda":
                torch.cuda.empty_cache()
        inference_ms = (time.perf_counter() - started) * 1000
        scale, dtype = upscalers.facts(request.upscaler)
    image = fit(image.resize(covering, Image.Resampling.LANCZOS), *request.output_size, request.resize_mode)
    log.info("upscaled %dx%d to %dx%d: %d pass(es) of %s", *plan.image.size, *image.size, passes, request.upscaler)
    return Upscaled(
        image, scale, passes, inference_ms, engine.device.type, str(dtype).removeprefix("torch."), queue_ms=queue_ms
    )


def _covering_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """The image's size enlarged by ``scale``: the target itself, or (with both sides given) a size covering it
    (``crop``, ``resize``) or inside it (``fill``)."""
    width, height = size
    return max(1, round(width * scale)), max(1, round(height * scale))


def _deadline(clock: Callable[[], float], timeout_s: float, cancelled: threading.Event | None) -> Callable[[], None]:
    """A check, made before each tile, that stops the job once it is cancelled or past its deadline."""
    deadline = clock() + timeout_s

    def check() -> None:
        if cancelled is not None and cancelled.is_set():
            raise JobCancelledError("the job was cancelled; it stopped before its next upscale tile")
        if clock() > deadline:
            raise GenerationTimeoutError(
                f"the upscale stopped: it ran past GENERATION_TIMEOUT_SECONDS={timeout_s:g} before its next tile"
            )

    return check


def _tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as (1, 3, H, W), values 0 to 1."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1).unsqueeze(0)


def _image(tensor: torch.Tensor) -> Image.Image:
    """(1, 3, H, W), values 0 to 1, as an RGB image, each value rounded to the nearest grey level."""
    pixels = (tensor[0].permute(1, 2, 0).float().cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")
