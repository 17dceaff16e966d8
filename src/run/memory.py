"""Memory profiles by GPU size (in GiB, 2^30 bytes), and admission: will this request fit, and in what sub-batches?

The estimates are deliberately simple and conservative: SD 1.5's fp16 weights,
plus activations that grow with the latent area for the UNet and with the
image area for the VAE decoder. They were set from the published figures for
SD 1.5 in fp16 with PyTorch's SDPA attention and are checked on a real GPU by
``bench/gpu_check.py``. Their job is to keep a request from running out of
memory halfway through, not to predict the peak to the megabyte.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from src.errors import AdmissionError

GIB = 1024**3


class Profile(enum.StrEnum):
    """How the pipeline is set up for the memory the device has."""

    HIGH = "high"  # 10 GiB or more: everything on the GPU, nothing traded for memory
    BALANCED = "balanced"  # 5.5 to 10 GiB: VAE slicing for batches, VAE tiling above 768²
    LOW = "low"  # 4 to 5.5 GiB: as balanced, plus model CPU offload
    MINIMAL = "minimal"  # under 4 GiB: sequential CPU offload
    CPU = "cpu"  # no GPU: float32 on the CPU


# From the most memory to the least, as ``auto`` steps down them.
GPU_PROFILES = (Profile.HIGH, Profile.BALANCED, Profile.LOW, Profile.MINIMAL)
# The job ``auto`` makes sure a profile takes: SD 1.5's own size, one image.
DEFAULT_SIDE = 512


def choose_profile(device_type: str, gpu_bytes: int | None, setting: str = "auto", dtype_bytes: int = 2) -> Profile:
    """The profile for a device: ``setting`` when not ``auto``; else by the GPU's memory, stepping down to the
    first profile whose admission takes one 512² image in ``dtype_bytes`` a value (float32 doubles the weights:
    a 6 GiB card in float32, or one capped under 3.85 GiB, would have refused every default job)."""
    if device_type != "cuda":
        return Profile.CPU
    if setting != "auto":
        return Profile(setting)
    gib = (gpu_bytes or 0) / GIB
    if gib >= 10:
        by_size = Profile.HIGH
    elif gib >= 5.5:  # a "6 GB" GTX 1060 reports 5.93 GiB
        by_size = Profile.BALANCED
    elif gib >= 4:  # low's admission takes one 512² image from 3.86 GiB
        by_size = Profile.LOW
    else:
        by_size = Profile.MINIMAL
    for profile in GPU_PROFILES[GPU_PROFILES.index(by_size) :]:
        try:
            plan_sub_batch(profile, DEFAULT_SIDE, DEFAULT_SIDE, 1, gpu_bytes=gpu_bytes, dtype_bytes=dtype_bytes)
        except AdmissionError:
            continue
        return profile
    return Profile.MINIMAL  # the least memory there is; admission says what does not fit


@dataclass(frozen=True)
class Setup:
    """The pipeline switches a profile implies for one run."""

    vae_slicing: bool
    vae_tiling: bool


# Above this side, the VAE decodes in tiles on small cards: its activations grow with the image area.
TILING_ABOVE_SIDE = 768


def setup_for(
    profile: Profile, width: int, height: int, batch: int, *, frugal: bool = False, tiling: bool = False
) -> Setup:
    """The switches for a run of ``batch`` images.

    ``frugal`` is the retry after an out-of-memory error; ``tiling`` forces VAE
    tiling, which admission asks for when an image does not fit without it.

    There is no attention slicing, not even in the retry: diffusers' sliced processor
    materialises the attention scores (4 GiB per slice of a 1024² image's first
    self-attention), which SDPA's memory-efficient kernels never hold. Under a
    6 GiB cap it turned a recoverable 1024² OOM into a failed retry
    (``python -m bench.gpu_check``, H200 capped at 6 GiB).
    """
    small_card = profile in (Profile.BALANCED, Profile.LOW, Profile.MINIMAL)
    return Setup(
        vae_slicing=frugal or (small_card and batch > 1),
        vae_tiling=frugal or tiling or (small_card and max(width, height) > TILING_ABOVE_SIDE),
    )


# --- the estimate ------------------------------------------------------------------------------

# SD 1.5's weights in fp16: UNet 1.72 GB, text encoder 0.25 GB, VAE 0.17 GB.
WEIGHTS_FP16 = {"unet": 1.72e9, "text_encoder": 0.25e9, "vae": 0.17e9}
# The safety checker (CLIP ViT-L/14 vision tower and projection, 304 M parameters) in fp16. diffusers
# keeps it on the GPU in both offload profiles too (it is excluded from CPU offload).
SAFETY_CHECKER_FP16 = 0.61e9
# CUDA context, cuDNN/cuBLAS workspaces and the allocator's slack.
OVERHEAD = 0.6e9
# UNet activations per latent pixel per image in the CFG batch (the batch is doubled), fp16, SDPA.
UNET_BYTES_PER_LATENT_PIXEL = 75e3
# VAE decoder activations per output pixel for one image, fp16; a decode in tiles of 512² caps it.
VAE_BYTES_PER_PIXEL = 5.5e3
VAE_TILE_PIXELS = 512 * 512
# A ControlNet unit's activations, as a fraction of the UNet's.
CONTROLNET_ACTIVATIONS = 0.4


def estimate_peak_bytes(
    profile: Profile,
    width: int,
    height: int,
    batch: int,
    dtype_bytes: int = 2,
    *,
    tiling: bool = False,
    safety_checker: bool = False,
    adapter_bytes: int = 0,
    control_units: int = 0,
    prompt_bytes: int = 0,
) -> float:
    """Estimated peak GPU memory for generating ``batch`` images of ``width`` x ``height`` at once,
    with the safety checker's weights when it is loaded, the job's LoRA and ControlNet weights
    (``adapter_bytes``), the activations of its ``control_units`` ControlNet units, and its prompts'
    embeddings (``prompt_bytes``: every text prompt editing makes is encoded before the first step)."""
    scale = dtype_bytes / 2
    weights = sum(WEIGHTS_FP16.values()) * scale
    if profile is Profile.LOW:
        # Model offload: the UNet on the GPU while it denoises, and the VAE beside it in a task that
        # encodes an input image first (img2img, inpaint, a hires pass from decoded pixels): a model
        # leaves the GPU only when the one after it in the pipeline's order (text encoder, UNet, VAE)
        # starts, and the engine sends them all back after each job.
        weights = (WEIGHTS_FP16["unet"] + WEIGHTS_FP16["vae"]) * scale
    elif profile is Profile.MINIMAL:  # sequential offload: one layer at a time
        weights = 0.2e9 * scale
    if safety_checker:
        weights += SAFETY_CHECKER_FP16 * scale
    weights += adapter_bytes + prompt_bytes
    latent_pixels = (width // 8) * (height // 8)
    unet = UNET_BYTES_PER_LATENT_PIXEL * latent_pixels * 2 * batch * scale
    # Each ControlNet unit runs about 40% of the UNet's work (its encoder half) and keeps its residuals.
    unet *= 1 + CONTROLNET_ACTIVATIONS * control_units
    setup = setup_for(profile, width, height, batch, tiling=tiling)
    decoded_at_once = 1 if setup.vae_slicing else batch
    pixels = min(width * height, VAE_TILE_PIXELS) if setup.vae_tiling else width * height
    vae = VAE_BYTES_PER_PIXEL * pixels * decoded_at_once * scale
    return OVERHEAD + weights + max(unet, vae)


@dataclass(frozen=True)
class Plan:
    """How a request runs: images per sub-batch, whether VAE tiling is forced to make it fit, and the hires
    upscaler's tile side when not UPSCALE_TILE (the frugal retry's smaller one)."""

    batch: int
    vae_tiling: bool = False
    upscale_tile: int | None = None


def plan_sub_batch(
    profile: Profile,
    width: int,
    height: int,
    num_images: int,
    *,
    gpu_bytes: int | None,
    dtype_bytes: int = 2,
    safety_checker: bool = False,
    adapter_bytes: int = 0,
    adapter_parts: Mapping[str, int] | None = None,
    control_units: int = 0,
    prompt_bytes: int = 0,
) -> Plan:
    """The largest sub-batch whose estimate fits the GPU; with VAE tiling when nothing fits without it.

    On the CPU there is no GPU budget and the whole request runs at once. ``adapter_parts`` splits
    ``adapter_bytes`` by kind (LoRA, ControlNet, upscaler) for the refusal's message.

    Raises:
        AdmissionError: not even one image fits, tiled; the message names the size and the memory.
    """
    if profile is Profile.CPU or gpu_bytes is None:
        return Plan(num_images)
    budget = gpu_bytes * 0.95

    def estimate(batch: int, tiling: bool) -> float:
        return estimate_peak_bytes(
            profile,
            width,
            height,
            batch,
            dtype_bytes,
            tiling=tiling,
            safety_checker=safety_checker,
            adapter_bytes=adapter_bytes,
            control_units=control_units,
            prompt_bytes=prompt_bytes,
        )

    # Tiling is the last resort: it is slower, so every untiled sub-batch size is tried first.
    for tiling in (False, True):
        for batch in range(num_images, 0, -1):
            if estimate(batch, tiling) <= budget:
                return Plan(batch, vae_tiling=tiling)
    need = estimate(1, True)
    checker = ", safety checker included" if safety_checker else ""
    if adapter_parts:
        parts = [f"{size / 1e6:.0f} MB of {kind}" for kind, size in adapter_parts.items() if size]
        checker += f", {', '.join(parts)} weights included" if parts else ""
    elif adapter_bytes:
        kinds = "LoRA and ControlNet" if control_units else "LoRA"
        checker += f", {adapter_bytes / 1e6:.0f} MB of {kinds} weights included"
    if control_units:
        checker += f", {control_units} ControlNet unit(s)"
    raise AdmissionError(
        f"{width}x{height} needs about {need / GIB:.1f} GiB of GPU memory even one image at a time "
        f"with VAE tiling ({profile.value} profile{checker}), and this GPU has {gpu_bytes / GIB:.1f} GiB: "
        "ask for a smaller size"
    )


def sub_batches(count: int, size: int) -> list[range]:
    """``range(count)`` cut into consecutive pieces of at most ``size``."""
    return [range(start, min(start + size, count)) for start in range(0, count, max(size, 1))]
