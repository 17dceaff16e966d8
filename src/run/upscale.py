"""An upscale job under the GPU lock: its image through an upscaler of UPSCALER_DIR, and nothing generated.

``upscale_job`` takes an ``UpscalePlan`` from ``prepare`` and returns the enlarged image, as A1111's Extras tab
makes it: the image goes through the model as many times as its target size needs (at most three), is brought
with Lanczos to its result's size or, with both sides given, to the size that covers the target (``crop``) or
fits inside it (``fill``), then cropped or padded to it. Only the model's
passes hold the GPU lock, with a deadline from the moment they have it and a cancel check before each tile;
``lanczos`` and ``nearest`` run on the CPU without it.
"""

from __future__ import annotations

import gc
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
from src.schema import UPSCALE_BUILT_IN, InputError
from src.schema.core import RequestLimits
from src.schema.upscale import check_model_passes

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
        InputError: the model's passes would make an image over (2 x MAX_UPSCALE_SIDE)² pixels (known once the
            model is read, before they run); named by the fields of the request, A1111's for an A1111 request.
        GenerationTimeoutError, JobCancelledError: it ran past GENERATION_TIMEOUT_SECONDS, or was cancelled.
        OutOfMemoryError: a tile did not fit in GPU memory, even in the retry's smaller tiles; or the model's
            weights did not.
        AdapterError: the upscaler cannot be loaded (named).
    """
    request, staged = plan.request, plan.staged_size
    if request.upscaler in UPSCALE_BUILT_IN:
        started = time.perf_counter()
        image = _at_result_size(plan, plan.image.resize(staged, _RESAMPLE[request.upscaler]))
        return Upscaled(image, None, 0, (time.perf_counter() - started) * 1000, device="cpu", dtype=None)
    upscalers = engine.upscalers
    warnings: list[str] = []
    with engine.gpu(cancelled) as queue_ms:
        started = time.perf_counter()
        between = _deadline(engine.clock, timeout_s, cancelled)
        # The model read first: its scale says how large its passes make the image, checked before they run.
        scale, dtype = _facts(engine, request.upscaler)
        _check_passes(plan, scale, engine.settings)
        enlarged = _enlarged(engine, request.upscaler, plan.image, staged, between, tile=None)
        if enlarged is None:
            # Once more in smaller tiles, as a generation job's frugal retry runs its hires upscaler.
            tile = upscalers.frugal_tile()
            if tile < upscalers.tile:
                warnings.append(f"the GPU ran out of memory; the image was upscaled again in tiles of {tile} pixels")
                log.warning("out of GPU memory upscaling %dx%d; again in tiles of %d", *plan.image.size, tile)
                enlarged = _enlarged(engine, request.upscaler, plan.image, staged, between, tile=tile)
            if enlarged is None:
                raise OutOfMemoryError(
                    f"upscaling {plan.image.size[0]}x{plan.image.size[1]} with {request.upscaler} ran out of GPU "
                    f"memory even in tiles of {tile} pixels: set UPSCALE_TILE lower"
                )
        image, passes = _image(enlarged[0]), enlarged[1]
        inference_ms = (time.perf_counter() - started) * 1000
    image = _at_result_size(plan, image.resize(staged, Image.Resampling.LANCZOS))
    log.info("upscaled %dx%d to %dx%d: %d pass(es) of %s", *plan.image.size, *image.size, passes, request.upscaler)
    dtype_name = str(dtype).removeprefix("torch.")
    return Upscaled(
        image, scale, passes, inference_ms, engine.device.type, dtype_name, queue_ms=queue_ms, warnings=warnings
    )


def _enlarged(
    engine: Engine,
    upscaler: str,
    image: Image.Image,
    staged: tuple[int, int],
    between: Callable[[], None],
    *,
    tile: int | None,
) -> tuple[torch.Tensor, int] | None:
    """``Upscalers.enlarge`` of ``image`` to ``staged`` in tiles of ``tile`` pixels (or UPSCALE_TILE); None when
    the GPU ran out of memory, its cache handed back to the driver."""
    try:
        return engine.upscalers.enlarge(upscaler, _tensor(image), staged, between, tile=tile)
    except RuntimeError as error:  # torch.cuda.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(error):
            raise
    finally:
        if engine.device.type == "cuda":
            torch.cuda.empty_cache()
    _hand_back(engine)  # outside the except block: the error's traceback, and the tiles it held, are gone
    return None


def _facts(engine: Engine, upscaler: str) -> tuple[int, torch.dtype]:
    """``Upscalers.facts``: the upscaler loaded, its scale and dtype.

    Raises:
        OutOfMemoryError: its weights did not fit in GPU memory.
    """
    try:
        return engine.upscalers.facts(upscaler)
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise
    _hand_back(engine)
    raise OutOfMemoryError(f"loading the upscaler {upscaler} ran out of GPU memory")


def _hand_back(engine: Engine) -> None:
    """After an out-of-memory error: what the failed run left collected, the GPU's cache handed to the driver."""
    gc.collect()  # the frames of an out-of-memory error's traceback may hold tensors in a cycle
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()


def _check_passes(plan: UpscalePlan, model_scale: int, limits: RequestLimits) -> None:
    """Refuse the job, before its passes run, when they would make an image over the bound; an A1111 request's
    refusal names its own fields."""
    try:
        check_model_passes(plan.request, plan.image.size, plan.size_fields, model_scale, limits)
    except InputError as error:
        raise InputError(plan.a1111.renamed(str(error)) if plan.a1111 is not None else str(error)) from None


def _at_result_size(plan: UpscalePlan, staged: Image.Image) -> Image.Image:
    """The staged image (``UpscalePlan.staged_size``) at the result's size: cropped or padded for ``crop`` and
    ``fill`` with both sides given, with no second resampling (the staged size is the one they compute); any
    other already is the result."""
    if plan.resize_mode in ("crop", "fill"):
        return fit(staged, *plan.request.output_size, plan.resize_mode)
    return staged


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
    """(1, 3, H, W), values 0 to 1, as an RGB image, each value rounded to the nearest grey level; the float
    copy made once, rounded and clipped in place (the image may be (2 x MAX_UPSCALE_SIDE)² pixels)."""
    levels = (tensor[0].float().cpu() * 255).round_().clamp_(0, 255).to(torch.uint8)
    return Image.fromarray(np.ascontiguousarray(levels.permute(1, 2, 0).numpy()), "RGB")
