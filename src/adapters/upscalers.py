"""Upscaler models of UPSCALER_DIR: ESRGAN-family super-resolution models, read with spandrel.

At startup ``scan_upscalers`` lists the folder's ``.pth`` and ``.safetensors`` files by name (the path below
the folder, without the extension); other files (``.pt``, ``.ckpt``: TorchScript or pickles) are listed as
refused. A file is read on first use: a ``.pth`` only with torch's ``weights_only`` loader (tensors and plain
containers; no object of the file's choosing is ever built), a ``.safetensors`` with safetensors. spandrel then
recognises the architecture from the tensors' names and shapes (ESRGAN, Real-ESRGAN and its compact models,
SwinIR, and the others it knows); a file it does not recognise, or a model that is not an image
super-resolution model (a face restorer, a 1x restoration model), is refused by name.

``Upscalers`` keeps the loaded models, least recently used dropped first past UPSCALER_CACHE_MB, and runs one
on images in tiles of UPSCALE_TILE pixels overlapping by UPSCALE_TILE_OVERLAP, each tile's border dropped where
it overlaps the next, under the GPU lock. A model runs in the worker's half precision when spandrel says its
architecture supports it, else in float32 (spandrel's ``supports_half``: most of the ESRGAN family run in
float16; those that overflow in it, such as some transformer models, do not).
"""

from __future__ import annotations

import logging
import pickle
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from src.adapters.folders import named_files
from src.errors import AdapterError, first_line
from src.schema.upscale import UPSCALE_MAX_PASSES

log = logging.getLogger(__name__)

SUFFIXES = (".pth", ".safetensors")
REFUSED_SUFFIXES = (".pt", ".ckpt", ".bin")
# Most times an image goes through a model to reach its size, as A1111's ``Upscaler.upscale``.
MAX_PASSES = UPSCALE_MAX_PASSES
# The channels of the images a model takes and makes: RGB (a greyscale or RGBA model cannot be used).
CHANNELS = 3
# The smallest tile a retry after an out-of-memory error goes down to: UPSCALE_TILE's least.
MIN_TILE = 64


@dataclass(frozen=True)
class UpscalerEntry:
    """An upscaler file of UPSCALER_DIR: its name, its path, and why it cannot be used (None when it may be)."""

    name: str
    path: Path
    problem: str | None = None


def scan_upscalers(folder: str | None) -> dict[str, UpscalerEntry]:
    """Every upscaler file under ``folder``, by name; files of other kinds of model listed as refused.

    Raises:
        AdapterError: the folder does not exist.
    """
    if folder is None:
        return {}
    entries: dict[str, UpscalerEntry] = {}
    for name, path in named_files(folder, "UPSCALER_DIR", SUFFIXES + REFUSED_SUFFIXES).items():
        problem = None
        if path.suffix.lower() in REFUSED_SUFFIXES:
            problem = f"a {path.suffix.lower()} file: only .pth (read as tensors only) and .safetensors files are read"
            log.warning("UPSCALER_DIR: %s is not served: %s", path.name, problem)
        entries[name] = UpscalerEntry(name, path, problem)
    log.info("upscalers in %s: %s", folder, ", ".join(name for name, e in entries.items() if not e.problem) or "none")
    return entries


def read_upscaler(path: Path) -> Any:
    """The super-resolution model in ``path``, as spandrel's ``ImageModelDescriptor``, on the CPU in float32.

    Raises:
        AdapterError: the file cannot be read as tensors, spandrel does not recognise it, or it is not an image
            super-resolution model; the message says which.
    """
    from safetensors.torch import load_file
    from spandrel import ImageModelDescriptor, ModelLoader, UnsupportedModelError, canonicalize_state_dict

    try:
        state: Any
        if path.suffix.lower() == ".safetensors":
            state = load_file(path)
        else:
            with warnings.catch_warnings():  # a newer pickle protocol: read all the same, or refused below
                warnings.simplefilter("ignore", UserWarning)
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise AdapterError(
            f"{path.name} holds Python objects besides tensors, which are never built (weights-only loading)"
        ) from None
    except Exception as error:  # noqa: BLE001 - whatever the file holds, it is refused by name
        problem = f"{type(error).__name__}: {first_line(error)}"
        raise AdapterError(f"{path.name} cannot be read as tensors: {problem}") from None
    if isinstance(state, dict) and isinstance(state.get("params_ema") or state.get("params"), dict):
        state = state.get("params_ema") or state["params"]  # BasicSR's training checkpoints
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise AdapterError(f"{path.name} does not hold a model's tensors by name")
    try:
        model = ModelLoader().load_from_state_dict(canonicalize_state_dict(state))
    except UnsupportedModelError:
        raise AdapterError(f"{path.name}: spandrel does not recognise its architecture") from None
    except Exception as error:  # noqa: BLE001 - a recognised architecture whose tensors do not fit it
        raise AdapterError(f"{path.name} cannot be loaded: {type(error).__name__}: {first_line(error)}") from None
    if not isinstance(model, ImageModelDescriptor) or model.purpose != "SR" or model.scale < 2:
        kind = f"{model.architecture.name}, {getattr(model, 'purpose', 'not an image model')}, scale {model.scale}"
        raise AdapterError(f"{path.name} is not an image super-resolution model (spandrel reads it as {kind})")
    if (model.input_channels, model.output_channels) != (CHANNELS, CHANNELS):
        raise AdapterError(
            f"{path.name} takes {model.input_channels}-channel images and makes {model.output_channels}-channel "
            f"ones ({model.architecture.name}); the worker upscales RGB images: only a 3-channel model is used"
        )
    return model.eval()


def tiled(
    run: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    scale: int,
    tile: int,
    overlap: int,
    *,
    between: Callable[[], None] | None = None,
) -> torch.Tensor:
    """``run`` (an upscaler) on ``images`` (B, C, H, W) in tiles of at most ``tile`` pixels a side overlapping
    by ``overlap``; each tile's output keeps only its part up to the middle of each overlap. ``between`` is
    called before each tile (a job's deadline and cancel check: it may raise).

    The result is in float32 on the CPU, each tile copied there as it is made: the device holds one tile's
    input and output at a time, whatever the image's size."""
    _, _, height, width = images.shape
    if height <= tile and width <= tile:
        if between is not None:
            between()
        return run(images).float().cpu()
    output: torch.Tensor | None = None
    for top, bottom, keep_top, keep_bottom in _spans(height, tile, overlap):
        for left, right, keep_left, keep_right in _spans(width, tile, overlap):
            if between is not None:
                between()
            part = run(images[:, :, top:bottom, left:right])
            if output is None:  # every pixel is written: the kept parts abut and cover the image
                output = torch.empty((*part.shape[:2], height * scale, width * scale), dtype=torch.float32)
            kept = part[
                :,
                :,
                (keep_top - top) * scale : (keep_bottom - top) * scale,
                (keep_left - left) * scale : (keep_right - left) * scale,
            ]
            output[:, :, keep_top * scale : keep_bottom * scale, keep_left * scale : keep_right * scale] = kept.cpu()
    assert output is not None
    return output


def _spans(size: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Tiles along one side: (start, end, first kept, last kept + 1), the kept parts abutting."""
    if size <= tile:
        return [(0, size, 0, size)]
    starts = [0]
    while starts[-1] + tile < size:
        starts.append(min(starts[-1] + tile - overlap, size - tile))
    spans: list[tuple[int, int, int, int]] = []
    for index, start in enumerate(starts):
        end = start + tile
        keep_start = 0 if index == 0 else spans[-1][3]
        keep_end = size if index == len(starts) - 1 else end - overlap // 2
        spans.append((start, end, keep_start, keep_end))
    return spans


class Upscalers:
    """UPSCALER_DIR's models, loaded on first use and kept on the device, least recently used dropped first past
    UPSCALER_CACHE_MB; every method under the GPU lock."""

    def __init__(
        self,
        entries: dict[str, UpscalerEntry],
        *,
        device: torch.device,
        dtype: torch.dtype,
        cache_bytes: int,
        tile: int,
        overlap: int,
    ) -> None:
        self.entries = entries
        self.device, self.dtype = device, dtype
        self.cache_bytes, self.tile, self.overlap = cache_bytes, tile, overlap
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self.reads = 0

    @property
    def names(self) -> list[str]:
        return [name for name, entry in self.entries.items() if entry.problem is None]

    @property
    def cached(self) -> list[str]:
        return list(self._cache)

    def frugal_tile(self) -> int:
        """The tile side of a retry after the GPU ran out of memory: half of UPSCALE_TILE, at least 64 pixels
        (UPSCALE_TILE's least); UPSCALE_TILE when it cannot be smaller. Such tiles overlap by a quarter of their
        side at most (``upscale``), so they advance by three quarters whatever UPSCALE_TILE_OVERLAP says."""
        return min(self.tile, max(self.tile // 2, MIN_TILE))

    def upscale(
        self,
        name: str,
        images: torch.Tensor,
        between: Callable[[], None] | None = None,
        *,
        tile: int | None = None,
    ) -> torch.Tensor:
        """``images`` (B, 3, H, W, values 0 to 1) enlarged by upscaler ``name``'s scale, in float32 on the CPU
        (``tiled``: each tile runs on the device, ``tile`` pixels a side, or UPSCALE_TILE); ``between`` is called
        before each tile.

        Raises:
            AdapterError: the upscaler cannot be loaded; the message names the file and why.
        """
        model = self._model(name)
        dtype = model.dtype
        with torch.inference_mode():
            # One image at a time: the memory a tile takes does not grow with the batch (``gpu_bytes``).
            return torch.cat(
                [
                    tiled(
                        lambda part: model(part.to(self.device, dtype)).float().clamp(0, 1),
                        image.unsqueeze(0).float(),
                        model.scale,
                        tile or self.tile,
                        self.overlap if tile is None else min(self.overlap, tile // 4),
                        between=between,
                    )
                    for image in images
                ]
            )

    def enlarge(
        self,
        name: str,
        image: torch.Tensor,
        size: tuple[int, int],
        between: Callable[[], None] | None = None,
        *,
        tile: int | None = None,
    ) -> tuple[torch.Tensor, int]:
        """``image`` (1, 3, H, W, values 0 to 1) through upscaler ``name`` until it covers ``size`` (width,
        height), as A1111 does: as many passes as that takes, at most ``MAX_PASSES``; and the passes made.
        ``tile``: as ``upscale``'s.

        Raises:
            AdapterError: the upscaler cannot be loaded; the message names the file and why.
        """
        passes = 0
        while passes < MAX_PASSES and (image.shape[-1] < size[0] or image.shape[-2] < size[1]):
            image = self.upscale(name, image, between, tile=tile)
            passes += 1
        return image, passes

    def facts(self, name: str) -> tuple[int, torch.dtype]:
        """Upscaler ``name``'s own factor and the dtype it runs in (it is loaded, as it is once it has run)."""
        model = self._model(name)
        return int(model.scale), model.dtype

    def gpu_bytes(self, name: str | None, dtype_bytes: int, *, cached: bool = True) -> int:
        """The GPU memory upscaler ``name`` takes at its peak, for admission: its weights (its file's size until
        it is loaded) and one tile's widest features, at the output's resolution: the ESRGAN family's last
        layers hold 64 channels at scale x the tile, three such tensors alive at once (scale 4, and ``dtype_bytes``
        per value, until loaded: once loaded, its own, float32 for the architectures spandrel runs in no other).
        On a GPU, the other upscalers the cache keeps there count too, with or without ``name`` (``_kept_bytes``),
        unless ``cached`` is false."""
        entry = self.entries.get(name or "")
        if entry is None or entry.problem is not None:
            return self._kept_bytes(None) if cached else 0
        model = self._cache.get(entry.name)
        scale, value_bytes = (int(model.scale), model.dtype.itemsize) if model is not None else (4, dtype_bytes)
        weights = entry.path.stat().st_size if entry.path.exists() else 0
        kept = self._kept_bytes(entry.name) if cached else 0
        return weights + 3 * 64 * (self.tile * scale) ** 2 * value_bytes + kept

    def drop_others(self, name: str | None) -> None:
        """Drop the cached upscalers other than ``name`` from the device, to make room for a job that would not fit
        beside them (a later job reads them again). Under the GPU lock."""
        for cached in [cached for cached in self._cache if cached != name]:
            log.info("upscaler %s dropped from the cache, for room on the GPU", cached)
            del self._cache[cached]

    def _kept_bytes(self, name: str | None) -> int:
        """The bytes of the cached upscalers other than ``name``, which wait on the GPU while it runs. All count,
        though loading ``name`` may drop some from the cache: what a file takes once loaded is known only then (a
        float32 file run in half precision takes about half its size), and too much is safe where too little is
        not; at most UPSCALER_CACHE_MB too much, while a new upscaler loads into a full cache."""
        if self.device.type != "cuda":
            return 0
        return sum(_model_bytes(model) for cached, model in self._cache.items() if cached != name)

    def preload(self, names: list[str]) -> None:
        """Load ``names`` now (UPSCALER_PRELOAD).

        Raises:
            AdapterError: one is unknown or cannot be loaded; the message names the setting.
        """
        for name in names:
            try:
                self._model(name)
            except AdapterError as error:
                raise AdapterError(f"UPSCALER_PRELOAD names {name!r}: {error}") from None

    def _model(self, name: str) -> Any:
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        entry = self.entries.get(name)
        if entry is None:
            raise AdapterError(f"{name!r} is not an upscaler in UPSCALER_DIR")
        if entry.problem is not None:
            raise AdapterError(f"{entry.path.name} cannot be used: {entry.problem}")
        started = time.perf_counter()
        model = read_upscaler(entry.path)
        # The worker's half precision where the architecture runs in it; float32 where it does not.
        half = self.dtype in (torch.float16, torch.bfloat16)
        supported = model.supports_half if self.dtype == torch.float16 else model.supports_bfloat16
        model.to(self.device, dtype=self.dtype if half and supported else torch.float32)
        self.reads += 1
        self._cache[name] = model
        log.info(
            "upscaler %s (%s, %dx, %s) loaded in %.2f s",
            name,
            model.architecture.name,
            model.scale,
            str(model.dtype).removeprefix("torch."),
            time.perf_counter() - started,
        )
        while len(self._cache) > 1 and self._bytes() > self.cache_bytes:
            dropped, _ = self._cache.popitem(last=False)
            log.info("upscaler %s dropped from the cache (UPSCALER_CACHE_MB)", dropped)
        return model

    def _bytes(self) -> int:
        return sum(_model_bytes(model) for model in self._cache.values())


def _model_bytes(model: Any) -> int:
    """A loaded upscaler's weights, in bytes, in the dtype it runs in."""
    return sum(tensor.numel() * tensor.element_size() for tensor in model.model.state_dict().values())


def upscalers_from(settings: Any, device: torch.device, dtype: torch.dtype) -> Upscalers:
    """UPSCALER_DIR's upscalers (none when it is unset), with the settings' cache and tiles, and UPSCALER_PRELOAD's
    loaded.

    Raises:
        AdapterError: UPSCALER_DIR is not a folder, or a preloaded upscaler is unknown or cannot be loaded.
    """
    upscalers = Upscalers(
        scan_upscalers(settings.upscaler_dir),
        device=device,
        dtype=dtype,
        cache_bytes=int(settings.upscaler_cache_mb * 1e6),
        tile=settings.upscale_tile,
        overlap=settings.upscale_tile_overlap,
    )
    upscalers.preload(settings.upscaler_preload_names)
    return upscalers
