"""A1111's inpaint, written here from its source, to compare the worker's with: its img2img ``init`` (the image's
latents at the VAE's mean, the latent mask, masked content "latent noise" and "latent nothing"), ``sample_img2img``
(the last int(steps x min(strength, 0.999)) + 1 steps, the noise added to the image's latents) and ``CFGDenoiser``'s
blend (a k-diffusion sampler's guided prediction of the clean latents, or a timestep sampler's input), then the
blend after the last step.

The sampler runs on the worker's weights with its scheduler's sigmas and timesteps: k-diffusion's ``sample_euler``
or ``sample_dpmpp_2m`` written out, or diffusers' DDIM step with the k-diffusion samplers' count of steps (A1111's
own DDIM counts img2img's steps otherwise, which the worker does not follow), so that only the inpaint's blend
differs from a plain img2img.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from src.models.schedulers import make_scheduler


def latent_mask(mask: Image.Image, size: tuple[int, int], rounded: bool) -> torch.Tensor:
    """A1111's ``latmask``: ``init_mask.convert('RGB').resize(...)``, channel 0 over 255, ``np.around`` with
    ``mask_round``."""
    latmask = np.moveaxis(np.array(mask.convert("RGB").resize(size), dtype=np.float32), 2, 0) / 255
    latmask = latmask[0]
    if rounded:
        latmask = np.around(latmask)
    return torch.asarray(latmask)[None, None]


def a1111_inpaint(
    base: Any,
    image: Image.Image,
    mask: Image.Image,
    *,
    seeds: Sequence[int],
    steps: int = 4,
    strength: float = 0.75,
    cfg: float = 7.5,
    sampler: str = "Euler",
    fill: str = "original",
    rounded: bool = False,
    controlnet: Any = None,
    control_image: Image.Image | None = None,
) -> list[Image.Image]:
    """The images A1111's inpaint of ``image`` under ``mask`` (both at the job's size) gives for prompt "a fox"."""
    with torch.no_grad():
        cond, uncond = base.encode_prompt("a fox", torch.device("cpu"), 1, True)
        pixels = base.image_processor.preprocess(image)
        init = base.vae.encode(pixels).latent_dist.mode() * base.vae.config.scaling_factor
        init = init.repeat(len(seeds), 1, 1, 1)
        nmask = latent_mask(mask, (init.shape[3], init.shape[2]), rounded)
        kept = 1.0 - nmask
        if fill == "latent_noise":
            noise = torch.stack(
                [torch.randn(init.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds]
            )
            init = init * kept + noise * nmask
        elif fill == "latent_nothing":
            init = init * kept
        scheduler = make_scheduler(sampler, base.scheduler.config)
        scheduler.set_timesteps(steps)
        t_enc = int(min(strength, 0.999) * steps)
        start = steps - t_enc - 1
        noise = torch.stack([torch.randn(init.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
        control = None
        if controlnet is not None:
            control = torch.from_numpy(np.asarray(control_image.convert("RGB"), dtype=np.float32) / 255)
            control = control.permute(2, 0, 1)[None].repeat(2 * len(seeds), 1, 1, 1)

        def guided(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            doubled = torch.cat([x_in, x_in])
            texts = torch.cat([uncond.repeat(len(seeds), 1, 1), cond.repeat(len(seeds), 1, 1)])
            residuals: dict[str, Any] = {}
            if controlnet is not None:
                down, mid = controlnet(
                    doubled, t, encoder_hidden_states=texts, controlnet_cond=control, return_dict=False
                )
                residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            eps_uncond, eps_cond = base.unet(doubled, t, encoder_hidden_states=texts, **residuals).sample.chunk(2)
            return eps_uncond + cfg * (eps_cond - eps_uncond)

        if sampler == "DDIM":  # a timestep sampler: the UNet's input blended, the sampler's own latents not
            x = scheduler.add_noise(init, noise, scheduler.timesteps[start : start + 1])
            for t in scheduler.timesteps[start:]:
                x = scheduler.step(guided(init * kept + nmask * x, t), t, x).prev_sample
        else:  # k-diffusion's sample_euler or sample_dpmpp_2m, with CFGDenoiser's blend of the denoised latents
            sigmas = scheduler.sigmas
            x = init + noise * sigmas[start]
            previous = None
            for index in range(start, steps):
                sigma, sigma_next = sigmas[index], sigmas[index + 1]
                eps = guided(x / (sigma**2 + 1) ** 0.5, scheduler.timesteps[index])
                denoised = init * kept + nmask * (x - sigma * eps)
                if sampler == "Euler":
                    x = x + (x - denoised) / sigma * (sigma_next - sigma)
                    continue
                h = sigma.log() - sigma_next.log() if sigma_next > 0 else None
                if previous is None or sigma_next == 0:
                    x = denoised if h is None else (sigma_next / sigma) * x - (-h).expm1() * denoised
                else:
                    r = (sigmas[index - 1].log() - sigma.log()) / h
                    blended = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous
                    x = (sigma_next / sigma) * x - (-h).expm1() * blended
                previous = denoised
        x = x * nmask + init * kept
        decoded = base.vae.decode(x / base.vae.config.scaling_factor).sample
    return base.image_processor.postprocess(decoded, output_type="pil")
