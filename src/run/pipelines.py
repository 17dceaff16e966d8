"""A job's work on the shared models: its prompts encoded, its passes in sub-batches (each pass's
denoising, the hires upscale), the VAE decode with its NaN guard, and the safety checker.

Each call builds a light pipeline object of the pass's kind around the shared models, with a fresh
scheduler, so nothing shared is mutated per request. Everything here runs under the engine's GPU lock.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)
from PIL import Image

from src.adapters.embeddings import Embedding
from src.errors import BadImageError
from src.models.schedulers import TIMESTEP_SAMPLERS, make_scheduler
from src.prepare.canvas import hidden, paste_back
from src.prepare.passes import Pass, PipelineKind
from src.prompts.encoding import Schedule, encode_schedule
from src.prompts.syntax import PromptError, TextPlan
from src.run.brownian import brownian_step_noise
from src.run.cross_attention import KeyMask, own_tokens
from src.run.fast_path import uncompiled
from src.run.feature_reuse import feature_reuse
from src.run.inpaint import Masked, blend_each_step, masked_start
from src.run.job import JobState, PromptSwitch
from src.run.memory import Plan, Profile, Setup, setup_for, sub_batches
from src.run.noise import encoded_at_mean, initial_noise, job_noise
from src.run.token_merging import token_merging
from src.schema import InputError

log = logging.getLogger(__name__)

# The diffusers pipeline of each kind of pass, plain and with ControlNet units. An inpaint pass is img2img from
# latents made here, blended under its mask as A1111 blends (``src.run.inpaint``), not diffusers' inpaint pipeline.
PIPELINES: dict[PipelineKind, type[DiffusionPipeline]] = {
    "txt2img": StableDiffusionPipeline,
    "img2img": StableDiffusionImg2ImgPipeline,
    "inpaint": StableDiffusionImg2ImgPipeline,
}
CONTROLNET_PIPELINES: dict[PipelineKind, type[DiffusionPipeline]] = {
    "txt2img": StableDiffusionControlNetPipeline,
    "img2img": StableDiffusionControlNetImg2ImgPipeline,
    "inpaint": StableDiffusionControlNetImg2ImgPipeline,
}
# The hires pass's latent upscalers: torch's interpolation and antialias for each, as A1111's
# latent_upscale_modes (in its modules/shared.py) give them.
LATENT_MODES: Mapping[str, tuple[str, bool]] = {
    "latent": ("bilinear", False),
    "latent-antialiased": ("bilinear", True),
    "latent-bicubic": ("bicubic", False),
    "latent-bicubic-antialiased": ("bicubic", True),
    "latent-nearest": ("nearest", False),
    "latent-nearest-exact": ("nearest-exact", False),
}


def encode_prompts(
    base: Any, texts: TextPlan, job: JobState, *, max_chunks: int, embeddings: Mapping[str, Embedding]
) -> Schedule:
    """Both prompts' embeddings for each step of each pass, A1111's syntax read, each distinct text
    once; a prompt that cannot be encoded is an input error, and the deadline is checked after each text.

    Raises:
        InputError: a prompt is longer than ``max_chunks`` chunks of 75 tokens.
    """
    try:
        schedule = encode_schedule(
            texts,
            tokenizer=base.tokenizer,
            text_encoder=base.text_encoder,
            device=base._execution_device,
            clip_skip=job.request.clip_skip,
            pad_conds=job.request.pad_conds,
            max_chunks=max_chunks,
            embeddings=embeddings,
            on_encoded=job.texts_encoded,
        )
    except PromptError as error:
        raise InputError(f"invalid input: {error}") from None
    job.phase_ended("text_encoding")
    return schedule


def run_passes(
    base: Any,
    job: JobState,
    plan: Plan,
    *,
    profile: Profile,
    frugal: bool,
    device: torch.device,
    dtype: torch.dtype,
    show_progress: bool = False,
) -> tuple[list[Image.Image], list[bool] | None]:
    """Denoise and decode the job in sub-batches, as admission planned, pass after pass; the painted part
    pasted back onto the input image, and the safety checker's flags (None when it is off)."""
    request = job.request
    width, height = request.output_size
    results: list[Image.Image] = []
    flags: list[bool] = []
    for chunk in sub_batches(request.num_images, plan.batch):
        indices = list(chunk)
        setup = setup_for(profile, width, height, len(indices), frugal=frugal, tiling=plan.vae_tiling)
        with _switches(base.vae, setup):
            latents: torch.Tensor | None = None
            for index in range(len(job.passes)):
                latents = denoise(
                    base, job, index, latents, indices=indices, tile=plan.upscale_tile, show_progress=show_progress
                )
            assert latents is not None
            decoded = decode(base, latents, indices, job.warnings)
            job.phase_ended("decoding")
        chunk_images, chunk_flags = checked_pictures(base, decoded, indices, job.warnings, device=device, dtype=dtype)
        job.phase_ended("to_images")
        chunk_flags = chunk_flags or [False] * len(indices)
        # A flagged image stays black: nothing of the input is pasted onto it.
        results += [
            hidden(job.images, image) if flagged else paste_back(request, job.images, image)
            for image, flagged in zip(chunk_images, chunk_flags, strict=True)
        ]
        flags += chunk_flags
    return results, (flags if base.safety_checker is not None else None)


@contextlib.contextmanager
def circular_padding(models: Sequence[Any], on: bool) -> Iterator[None]:
    """With ``on``, every 2D convolution of ``models`` pads circularly for the ``with`` block, as A1111's tiling
    does, so the image tiles seamlessly; their own padding back after it, however it ends. FAST_MODE's compiled
    modules run as written meanwhile: compiled again for a rare option, a job would wait for the compiler."""
    if not on:
        yield
        return
    modules = [module for model in models for module in model.modules()]
    layers = [layer for layer in modules if isinstance(layer, torch.nn.Conv2d)]
    modes = [layer.padding_mode for layer in layers]
    try:
        for layer in layers:
            layer.padding_mode = "circular"
        with uncompiled(*(module for module in modules if module._compiled_call_impl is not None)):
            yield
    finally:
        for layer, mode in zip(layers, modes, strict=True):
            layer.padding_mode = mode


@contextlib.contextmanager
def _switches(vae: Any, setup: Setup) -> Iterator[None]:
    """Apply a profile's switches to the shared VAE for one run, and undo them after.

    Safe because the caller holds the lock: no other request sees them.
    """
    vae.use_slicing, vae.use_tiling = setup.vae_slicing, setup.vae_tiling
    try:
        yield
    finally:
        vae.use_slicing = vae.use_tiling = False


def pipeline_for(
    base: Any,
    scheduler_name: str,
    kind: PipelineKind = "txt2img",
    controlnet: Any = None,
    *,
    show_progress: bool = False,
) -> Any:
    """A new pipeline object of ``kind`` sharing ``base``'s models, with a fresh scheduler.

    Building it costs about a millisecond; it copies no weights. Every kind takes the same components,
    so one copy of the weights serves them all; with ``controlnet``, the kind's ControlNet pipeline.
    """
    scheduler = make_scheduler(scheduler_name, base.scheduler.config)
    components = {**base.components, "scheduler": scheduler}
    pipeline_class = PIPELINES[kind]
    if controlnet is not None:
        components["controlnet"] = controlnet
        pipeline_class = CONTROLNET_PIPELINES[kind]
    pipeline = pipeline_class(**components, requires_safety_checker=base.safety_checker is not None)
    pipeline.set_progress_bar_config(disable=not show_progress, file=sys.stderr)
    return pipeline


def denoise(
    base: Any,
    job: JobState,
    pass_index: int,
    previous: torch.Tensor | None,
    *,
    indices: list[int],
    tile: int | None = None,
    show_progress: bool = False,
) -> torch.Tensor:
    """One pipeline call (the pass ``pass_index``) for the images ``indices``; returns its latents.

    A fresh generator per image and pass, seeded with its seed, as A1111's new ``ImageRNG`` for a hires pass: the
    noise is the seed's first draw (an input image encoded at the VAE's mean draws nothing), step noise next.
    """
    request, step = job.request, job.passes[pass_index]
    arguments = dict(step.arguments)
    if step.upscale_to is not None:
        assert previous is not None, "an upscaling pass follows another"
        arguments["image"] = upscaled(base, previous, step, indices, job.warnings, upscalers=job.upscalers, tile=tile)
        job.phase_ended("hires_upscale")
    if job.before_pass is not None:
        job.before_pass(pass_index)  # the pass's own model, once the previous pass's image is decoded
    schedule = job.schedule
    assert schedule is not None, "the prompts are encoded before the first pass"
    encoded = schedule.at(pass_index, 0)
    switches = len(schedule.passes[pass_index]) > 1
    controlnet = job.controlnet if step.controlled else None
    scheduler = step.scheduler or request.scheduler
    pipeline = pipeline_for(base, scheduler, step.pipeline, controlnet, show_progress=show_progress)
    job.run_started(step.denoising_steps)
    seeds = [request.seeds[index] for index in indices]
    brownian_step_noise(pipeline.scheduler, seeds)
    masked = _masked(pipeline, step, scheduler, arguments, seeds=seeds, request=request)
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
    mask = None
    if schedule.masked(pass_index):
        mask = KeyMask(schedule.attended[pass_index], schedule.length, len(indices), pipeline._execution_device)
    with _noise_and_speedups(pipeline, request, indices, seeds), own_tokens(_attending(pipeline), mask):
        latents = pipeline(
            prompt_embeds=encoded.prompt_embeds,
            negative_prompt_embeds=encoded.negative_prompt_embeds,
            num_inference_steps=step.steps,
            guidance_scale=request.guidance_scale,
            num_images_per_prompt=len(indices),
            generator=generators,
            output_type="latent",
            callback_on_step_end=PromptSwitch(job, pass_index, len(indices)) if switches else job.on_step_end,
            callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"] if switches else ["latents"],
            **arguments,
        ).images
    latents = masked.final(latents) if masked is not None else latents  # A1111's blend after the last step
    job.run_finished()
    job.phase_ended("denoising")
    return latents


@contextlib.contextmanager
def _noise_and_speedups(pipeline: Any, request: Any, indices: list[int], seeds: list[int]) -> Iterator[None]:
    """The noise of the images ``indices`` (their ``seeds``), and the UNet's feature reuse and token merging, for
    one pipeline call."""
    with (
        encoded_at_mean(pipeline),
        initial_noise(pipeline, _variation(request, indices, seeds)),
        feature_reuse(pipeline.unet, request.deepcache_interval),
        # The job's first seed, not the sub-batch's: ToMe draws one merge pattern for the whole batch, so each
        # image keeps its pixels however admission or the out-of-memory retry splits the job.
        token_merging(pipeline.unet, request.tome_ratio, seed=request.seeds[0], device=pipeline._execution_device),
    ):
        yield


def _attending(pipeline: Any) -> list[torch.nn.Module]:
    """The modules whose cross-attention reads the prompts: the UNet and each of the job's ControlNets."""
    controlnet = getattr(pipeline, "controlnet", None)
    return [pipeline.unet, *(controlnet.nets if controlnet is not None else [])]


def _masked(
    pipeline: Any, step: Pass, scheduler: str, arguments: dict[str, Any], *, seeds: list[int], request: Any
) -> Masked | None:
    """For a pass with a mask, A1111's inpaint: the pipeline starts from the image's latents (in ``arguments``) and
    its scheduler blends the kept part back at each step; the start, whose ``final`` blends the result. Else None."""
    if step.mask is None:
        return None
    masked = masked_start(
        pipeline, arguments["image"], step.mask, seeds=seeds, fill=request.inpaint_fill, rounded=request.mask_round
    )
    arguments["image"] = masked.image
    blend_each_step(pipeline.scheduler, masked, before=scheduler in TIMESTEP_SAMPLERS)
    return masked


def _variation(request: Any, indices: list[int], seeds: list[int]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The job's noise from the seed noise of its images ``indices`` (whose seeds are ``seeds``), with a
    variation seed or a seed resize; else None."""
    if not request.varies_noise:
        return None
    subseeds = request.subseeds
    return job_noise(
        seeds,
        subseeds=[subseeds[index] for index in indices],
        strength=request.subseed_strength,
        resize_from=request.seed_resize_from,
    )


def upscaled(
    base: Any,
    latents: torch.Tensor,
    step: Pass,
    indices: list[int],
    warnings: list[str],
    *,
    upscalers: Any = None,
    tile: int | None = None,
) -> torch.Tensor | list[Image.Image]:
    """The previous pass's result at the hires size: latents enlarged, or images decoded and enlarged (with
    Lanczos, or through an upscaler of ``upscalers`` in tiles of ``tile`` pixels, or UPSCALE_TILE, and then
    Lanczos)."""
    assert step.upscale_to is not None
    if step.upscaler in LATENT_MODES:
        return upscale_latents(latents, step.upscale_to, base.vae_scale_factor, step.upscaler)
    decoded = decode(base, latents, indices, warnings)
    if step.upscaler != "lanczos":
        # As A1111: through the model (as many times as reach the hires size), then resized to it.
        assert upscalers is not None, "the engine gives a job its upscalers"
        pictures = (decoded.float() / 2 + 0.5).clamp(0, 1)
        enlarged, _passes = upscalers.enlarge(step.upscaler, pictures, step.upscale_to, tile=tile)
        decoded = (enlarged * 2 - 1).to(decoded.dtype)
    images = base.image_processor.postprocess(decoded, output_type="pil")
    return [image.resize(step.upscale_to, Image.Resampling.LANCZOS) for image in images]


def upscale_latents(
    latents: torch.Tensor, size: tuple[int, int], scale_factor: int, upscaler: str = "latent"
) -> torch.Tensor:
    """Latents enlarged for the hires pass, as A1111's latent upscaler of that name (``LATENT_MODES``)."""
    width, height = size
    mode, antialias = LATENT_MODES[upscaler]
    return torch.nn.functional.interpolate(
        latents, size=(height // scale_factor, width // scale_factor), mode=mode, antialias=antialias
    )


def decode(base: Any, latents: torch.Tensor, indices: list[int], warnings: list[str]) -> torch.Tensor:
    """Latents -> images in [-1, 1]; a float32 decode again when fp16 overflowed to NaN or inf.

    Raises:
        BadImageError: the images hold NaN even after the float32 decode.
    """
    vae = base.vae
    scaled = latents / vae.config.scaling_factor
    decoded = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
    if bool(torch.isfinite(decoded).all()):
        return decoded
    dtype = str(vae.dtype).removeprefix("torch.")
    warnings.append(
        f"the VAE decode of image(s) {_listed(indices)} gave NaN or infinity in {dtype} "
        "(black images on some cards); they were decoded again in float32"
    )
    log.warning("NaN in the VAE decode of images %s; decoding again in float32", indices)
    original = vae.dtype
    # torch's own Module.to: diffusers' override warns on every cast about fp32 modules the VAE does not have.
    # FAST_MODE's compiled decoder would compile again for float32, for a rare decode: it runs as written.
    try:
        with uncompiled(vae.decoder):
            torch.nn.Module.to(vae, dtype=torch.float32)
            decoded = vae.decode(scaled.to(torch.float32), return_dict=False)[0]
    finally:
        torch.nn.Module.to(vae, dtype=original)
    if not bool(torch.isfinite(decoded).all()):
        raise BadImageError(
            f"image(s) {_listed(indices)} hold NaN or infinity even after a float32 VAE decode; "
            "try another seed or scheduler"
        )
    return decoded


def checked_pictures(
    base: Any,
    decoded: torch.Tensor,
    indices: list[int],
    warnings: list[str],
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[list[Image.Image], list[bool] | None]:
    """Run the safety checker when it is on, and turn the tensors into PIL images."""
    # The checker's own dtype: after a float32 re-decode the images are float32, the checker is not.
    checker = base.safety_checker
    checker_dtype = checker.dtype if checker is not None else dtype
    checked, flags = base.run_safety_checker(decoded, device, checker_dtype)
    if flags is None:
        images = base.image_processor.postprocess(decoded, output_type="pil")
    else:
        flags = [bool(flag) for flag in flags]
        # Flagged images were zeroed by the checker; not denormalizing them keeps them black.
        images = base.image_processor.postprocess(
            checked, output_type="pil", do_denormalize=[not flag for flag in flags]
        )
        flagged = [index for index, flag in zip(indices, flags, strict=True) if flag]
        if flagged:
            warnings.append(f"image(s) {_listed(flagged)} flagged by the safety checker and blacked out")
    for index, image, flag in zip(indices, images, flags or [False] * len(indices), strict=True):
        if not flag and image.getextrema() in (((0, 0),) * 3, ((0, 0),)):
            warnings.append(f"image {index} is entirely black")
    return images, flags


def _listed(indices: list[int]) -> str:
    return ", ".join(str(index) for index in indices)
