"""The worker's start: device, dtype and memory profile resolved, the model loaded and placed, its adapters.

``load_parts`` does what ``Engine.load`` needs once per process: the model from wherever the settings say
(``models.loader``), the profile's CPU offload or the device, the textual-inversion embeddings, the LoRAs
and ControlNets of their folders, and FAST_MODE's speed-ups where they apply.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline

from src.adapters.controlnets import ControlNets, scan_controlnets
from src.adapters.embeddings import Embedding, load_embeddings
from src.adapters.loras import Loras, scan_loras
from src.models.loader import ModelIdentity, load_model, resolve_device, resolve_dtype
from src.run.compile_cache import CompileCache, open_cache
from src.run.fast_path import apply_fast_mode
from src.run.memory import GIB, Profile, choose_profile
from src.settings import Settings

log = logging.getLogger(__name__)

# The profiles that keep the models in host memory, with accelerate's hooks moving them to the GPU.
OFFLOADING = (Profile.LOW, Profile.MINIMAL)


@dataclass(frozen=True)
class Parts:
    """What a loaded worker is made of."""

    pipeline: Any
    device: torch.device
    dtype: torch.dtype
    profile: Profile
    gpu_bytes: int | None
    identity: ModelIdentity
    embeddings: dict[str, Embedding]
    loras: Loras
    controlnets: ControlNets
    # FAST_MODE applies here (a CUDA GPU, Volta or newer, no offload), and was applied.
    fast: bool
    # FAST_MODE's compiled kernels kept between workers (COMPILE_CACHE_DIR); None: not kept.
    compile_cache: CompileCache | None = None


def load_parts(settings: Settings) -> Parts:
    """Resolve device, dtype and memory profile, load the model and place it, with its adapters.

    Raises:
        ModelLoadError: the model cannot be loaded; the message says what to do.
        AdapterError: a file in EMBEDDINGS_DIR cannot be used; the message names it.
    """
    started = time.perf_counter()
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    gpu_bytes = _gpu_bytes(settings) if device.type == "cuda" else None
    profile = choose_profile(device.type, gpu_bytes, settings.memory_profile, dtype.itemsize)
    pipeline, identity = load_model(settings, dtype)
    _drop_long_prompt_warnings()
    if profile in OFFLOADING:
        apply_offload(pipeline, profile, device)
    else:
        # On the CPU in half precision diffusers warns that it "will fail"; torch 2.13 runs it.
        pipeline.to(device, silence_dtype_warnings=True)
    embeddings = load_embeddings(settings.embeddings_dir, int(pipeline.text_encoder.config.hidden_size))
    fast = settings.fast_mode and _fast_mode_applies(device, profile)
    loras = _loras(pipeline, settings, device, profile, fast=fast)
    controlnets = ControlNets(
        pipeline,
        scan_controlnets(settings.controlnet_dir),
        device=device,
        dtype=dtype,
        cache_bytes=int(settings.controlnet_cache_mb * 1e6),
        offload=profile in OFFLOADING,
    )
    controlnets.preload(settings.controlnet_preload_names)
    compile_cache = None
    if settings.compile_cache_dir is not None and not fast:
        log.warning(
            "COMPILE_CACHE_DIR=%s unused: it keeps FAST_MODE's compiled kernels, and FAST_MODE is off here",
            settings.compile_cache_dir,
        )
    if fast:
        # Loaded before anything compiles: the warm-up then finds the kernels instead of making them.
        # CUDA graphs keep their memory pools beside what admission counts: only where memory is plenty.
        graphs = profile is Profile.HIGH
        apply_fast_mode(pipeline, loras, graphs=graphs)
        shape = {"compiled": "unet+decoder, dynamic", "lora_slots": loras.slot_shape, "graphs": graphs}
        compile_cache = open_cache(settings.compile_cache_dir, pipeline.unet, dtype, shape)
    log.info(
        "loaded %s on %s (%s, %s profile%s) in %.1f s",
        identity.name,
        device,
        str(dtype).removeprefix("torch."),
        profile.value,
        f", {gpu_bytes / GIB:.1f} GiB" if gpu_bytes else "",
        time.perf_counter() - started,
    )
    return Parts(
        pipeline, device, dtype, profile, gpu_bytes, identity, embeddings, loras, controlnets, fast, compile_cache
    )


def _loras(pipeline: Any, settings: Settings, device: torch.device, profile: Profile, *, fast: bool) -> Loras:
    """The LoRAs of LORA_DIR on this pipeline, kept as the profile and FAST_MODE need."""
    # Between jobs, cached LoRAs wait in host memory; offloading profiles move weights themselves.
    offload_to = device if device.type == "cuda" and profile in (Profile.HIGH, Profile.BALANCED) else None
    return Loras(
        pipeline,
        scan_loras(settings.lora_dir),
        cache_bytes=int(settings.lora_cache_mb * 1e6),
        offload_to=offload_to,
        slots=settings.max_loras if fast else 0,
        # Sequential offload keeps weights off the device, where they cannot be merged into.
        merge=profile is not Profile.MINIMAL,
        offload=functools.partial(apply_offload, pipeline, profile, device) if profile in OFFLOADING else None,
        # Model offload moves a model whole onto the GPU, with every adapter cached in it.
        cache_rides_along=device.type == "cuda" and profile is Profile.LOW,
    )


def apply_offload(pipeline: DiffusionPipeline, profile: Profile, device: torch.device) -> None:
    """The CPU offload of ``profile`` on ``pipeline``, onto ``device``: the models in host memory and
    accelerate's hooks on them, model by model (low) or layer by layer (minimal). Called again, it
    rebuilds the hooks and sends every model back to host memory."""
    if profile is Profile.LOW:
        pipeline.enable_model_cpu_offload(device=device)
    elif profile is Profile.MINIMAL:
        pipeline.enable_sequential_cpu_offload(device=device)


@contextlib.contextmanager
def models_offloaded_after(pipeline: Any) -> Iterator[None]:
    """With model offload (low), every model back in host memory after the job, however it ends.

    A diffusers pipeline does it at the end of its call (``maybe_free_model_hooks``), but the hooks
    belong to the shared pipeline, never to the per-request ones that run: without this, the last
    model a job ran (the VAE, or the UNet or text encoder after a timeout) would stay on the GPU
    through the next job, beside what admission counts.
    """
    try:
        yield
    finally:
        # Each hook of enable_model_cpu_offload moves its model to host memory; sequential offload
        # (minimal) moves each layer back after its forward itself, and has none of these.
        for hook in getattr(pipeline, "_all_hooks", None) or []:
            hook.offload()


def _fast_mode_applies(device: torch.device, profile: Profile) -> bool:
    """Whether FAST_MODE's speed-ups help here; says why not in the log.

    Pascal has no tensor cores and Triton does not support it, so it never gets them;
    offloaded models cannot be compiled in place.
    """
    if device.type != "cuda":
        log.warning("FAST_MODE ignored: it needs a CUDA GPU, and this worker runs on %s", device.type)
        return False
    capability = torch.cuda.get_device_capability(device)
    if capability < (7, 0):
        log.warning("FAST_MODE ignored on compute capability %d.%d (Pascal or older)", *capability)
        return False
    if profile in OFFLOADING:
        log.warning("FAST_MODE ignored with the %s profile: CPU offload and compilation do not mix", profile.value)
        return False
    return True


def _gpu_bytes(settings: Settings) -> int:
    """The GPU memory this worker may use: the card's, or GPU_MEMORY_GB, which also caps the process."""
    total = torch.cuda.get_device_properties(0).total_memory
    if settings.gpu_memory_gb is None:
        return int(total)
    allowed = min(int(settings.gpu_memory_gb * GIB), total)
    torch.cuda.set_per_process_memory_fraction(allowed / total)
    return allowed


class _LongPromptWarningFilter(logging.Filter):
    """Drops transformers' warning that a token sequence is longer than CLIP's 77.

    src/prompts/ tokenizes a long prompt whole and encodes it in chunks of 75, so
    nothing is cut, and the warning would tell the log the opposite.
    """

    MESSAGE = "Token indices sequence length is longer than the specified maximum"

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.MESSAGE)


_LONG_PROMPT_FILTER = _LongPromptWarningFilter()
_LONG_PROMPT_LOGGERS = ("transformers.tokenization_utils_base",)


def _drop_long_prompt_warnings() -> None:
    for name in _LONG_PROMPT_LOGGERS:
        logger = logging.getLogger(name)
        if _LONG_PROMPT_FILTER not in logger.filters:
            logger.addFilter(_LONG_PROMPT_FILTER)
