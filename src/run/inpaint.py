"""Inpaint as A1111 paints it: the image's latents, its masked content filled in them, and the kept part blended
back at every step.

A1111 (its img2img ``init``, ``CFGDenoiser`` and ``sample``) works with the image's latents (``init_latent``) and a
latent mask: the blurred mask brought to the latents' size by PIL's default filter (bicubic) and, with
``mask_round``, rounded to 0 and 1. Its k-diffusion samplers' denoiser blends its guided prediction of the clean
latents with the image's after each evaluation (``denoised = init_latent * mask + nmask * denoised``); its timestep
samplers (DDIM, PLMS, UniPC) blend the latents the UNet is given before it sees them instead. After the last step
the result is blended once more. It starts, at any strength, from the image's latents with the noise added.

diffusers' inpaint pipeline differs on each point: it mixes the image's latents, noised again, into the latents
after each step, under the mask binarized at 0.5 and sampled at each 8x8 block's corner, and starts from pure noise
at strength 1. So an inpaint pass runs diffusers' img2img pipeline on latents made here (``masked_start``), with
A1111's blend around its scheduler (``blend_each_step``) and after it (``Masked.final``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, LCMScheduler
from PIL import Image

from src.models.schedulers import K_DIFFUSION_SCHEDULERS
from src.run.noise import randn

# A1111's masked content "latent noise" and "latent nothing" (its ``inpainting_fill`` 2 and 3).
LATENT_FILLS = ("latent_noise", "latent_nothing")


@dataclass(frozen=True)
class Masked:
    """A masked pass's start, for a batch: the image's latents (A1111's ``init_latent``, its masked content
    filled), (B, C, h, w), and the latent mask (its ``nmask``: 1 repaints, 0 keeps), (1, 1, h, w)."""

    image: torch.Tensor
    mask: torch.Tensor

    def final(self, latents: torch.Tensor) -> torch.Tensor:
        """A1111's blend after the last step: ``samples * nmask + init_latent * mask``."""
        return latents * self.mask.to(latents) + self.image.to(latents) * (1 - self.mask.to(latents))


def latent_mask(mask: Image.Image, size: tuple[int, int], *, rounded: bool) -> torch.Tensor:
    """The mask at the latents' ``size`` (width, height), (1, 1, h, w) in [0, 1], as A1111's img2img ``init``
    makes its ``latmask``: resized as RGB with PIL's default filter, its first channel over 255, rounded (half to
    even, numpy's) with ``rounded``."""
    small = np.asarray(mask.convert("RGB").resize(size), dtype=np.float32)[..., 0] / 255
    if rounded:
        small = np.around(small)
    return torch.from_numpy(small)[None, None]


def masked_start(
    pipeline: Any, image: Image.Image, mask: Image.Image, *, seeds: Sequence[int], fill: str, rounded: bool
) -> Masked:
    """``image`` encoded at the VAE's mean, one copy per image of ``seeds``, and the latent mask of ``mask``.

    With ``fill`` "latent_noise" or "latent_nothing", the latents under the mask are image i's seed noise (drawn
    on the CPU: A1111's ``create_random_tensors``) or zero, as A1111's ``init`` makes them from its mask.
    """
    vae = pipeline.vae
    # The execution device, not the VAE's: offloaded, its weights wait in host memory (or on "meta") until it runs.
    pixels = pipeline.image_processor.preprocess(image).to(device=pipeline._execution_device, dtype=vae.dtype)
    encoded = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
    width, height = encoded.shape[-1], encoded.shape[-2]
    nmask = latent_mask(mask, (width, height), rounded=rounded).to(encoded)
    latents = encoded.expand(len(seeds), -1, -1, -1)
    if fill in LATENT_FILLS:
        kept = latents * (1 - nmask)
        if fill == "latent_noise":
            noise = torch.stack([randn(seed, encoded.shape[1:]) for seed in seeds]).to(encoded)
            kept = kept + noise * nmask
        latents = kept
    return Masked(image=latents.contiguous(), mask=nmask)


def blend_each_step(scheduler: Any, masked: Masked, *, before: bool) -> None:
    """Have ``scheduler`` (a fresh one, for one pipeline call) blend the kept part back at each step, as A1111.

    ``before`` (A1111's timestep samplers): the latents the UNet is given, kept part from the image's latents. Else
    (its k-diffusion samplers): the guided model output, so that the clean latents the scheduler predicts from it
    are the image's in the kept part.
    """
    if before:
        scale = scheduler.scale_model_input

        def blended_input(sample: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            scaled = scale(sample, *args, **kwargs)
            image = masked.image.to(scaled).repeat(scaled.shape[0] // masked.image.shape[0], 1, 1, 1)
            mask = masked.mask.to(scaled)
            return image * (1 - mask) + scaled * mask

        scheduler.scale_model_input = blended_input
        return
    step = scheduler.step

    def step_blended(model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if getattr(scheduler, "step_index", 0) is None:
            scheduler._init_step_index(timestep)  # as ``step`` itself does first
        kept = _kept_output(scheduler, timestep, sample.float(), masked.image.float())
        mask = masked.mask.float()
        # In float32, as A1111's k-diffusion blends (half precision would move the kept part's prediction by up to
        # sigma x its rounding); the latents come back in their own dtype, as the scheduler returns them.
        result = step(model_output.float() * mask + kept * (1 - mask), timestep, sample, *args, **kwargs)
        if isinstance(result, tuple):
            return (result[0].to(sample.dtype), *result[1:])
        result.prev_sample = result.prev_sample.to(sample.dtype)
        return result

    scheduler.step = step_blended


def _kept_output(scheduler: Any, timestep: Any, sample: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """The model output from which ``scheduler`` predicts ``image`` as the clean latents of ``sample``."""
    scale, noise = _levels(scheduler, timestep)  # sample = scale * clean + noise * eps
    eps = (sample - scale * image) / noise
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        return eps
    if prediction == "sample":
        return image
    # v_prediction: v = alpha * eps - sigma * clean, in the variance-preserving form of the sample.
    norm = math.hypot(scale, noise)
    return (scale / norm) * eps - (noise / norm) * image


def _levels(scheduler: Any, timestep: Any) -> tuple[float, float]:
    """(scale, noise) of the sample ``scheduler`` steps from now: sample = scale x clean + noise x eps."""
    if isinstance(scheduler, K_DIFFUSION_SCHEDULERS):
        return 1.0, _model_sigma(scheduler)
    if isinstance(scheduler, DPMSolverMultistepScheduler):
        sigma = float(scheduler.sigmas[scheduler.step_index])
        alpha = 1 / math.sqrt(sigma**2 + 1)
        return alpha, sigma * alpha
    if isinstance(scheduler, LCMScheduler):
        alpha_prod = float(scheduler.alphas_cumprod[int(timestep)])
        return math.sqrt(alpha_prod), math.sqrt(1 - alpha_prod)
    raise AssertionError(f"{type(scheduler).__name__} blends before the UNet, as A1111's timestep samplers")


def _model_sigma(scheduler: Any) -> float:
    """The sigma the model was evaluated at, as the scheduler's ``scale_model_input`` took it."""
    index = scheduler.step_index
    if getattr(scheduler, "state_in_first_order", True):
        return float(scheduler.sigmas[index])
    if isinstance(scheduler, KDPM2AncestralDiscreteScheduler):
        return float(scheduler.sigmas_interpol[index - 1])
    if isinstance(scheduler, KDPM2DiscreteScheduler):
        return float(scheduler.sigmas_interpol[index])
    return float(scheduler.sigmas[index])  # Heun's second evaluation, at the step's end
