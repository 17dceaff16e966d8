"""A1111's guidance of a prompt and a negative prompt of different lengths, written here from its ``CFGDenoiser``
(modules/sd_samplers_cfg_denoiser.py), to compare the worker's with.

Each text is encoded alone, to its own number of chunks (the worker's encoding, held to A1111's elsewhere); the
texts prompt editing makes of the prompt are padded with empty chunks to the longest of them, as A1111 encodes
them in one batch (``get_learned_conditioning``). When the prompt's tokens and the negative's differ in number,
A1111 by default runs the UNet on the prompt's rows, then on the negative's, each with its own text; with
``pad_cond_uncond`` on it pads the shorter with the empty prompt's encoding (``cond_stage_model_empty_prompt``)
and runs the two as one batch.

The sampler is k-diffusion's ``sample_euler`` on the worker's scheduler's sigmas, from the seed's CPU noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from src.models.schedulers import make_scheduler
from src.prompts.encoding import encode_prompts


def encoded(base: Any, text: str) -> torch.Tensor:
    """``text``'s own embeddings: its chunks, no more."""
    both = encode_prompts(
        text, text, tokenizer=base.tokenizer, text_encoder=base.text_encoder, device=torch.device("cpu")
    )
    return both.prompt_embeds


def a1111_txt2img(
    base: Any,
    prompts: Sequence[str],
    negative: str,
    *,
    seeds: Sequence[int],
    size: tuple[int, int] = (64, 64),
    steps: int = 4,
    cfg: float = 7.5,
    pad_cond_uncond: bool = False,
    switch_after: Sequence[int] = (),
    controlnet: Any = None,
    control_image: Image.Image | None = None,
) -> list[Image.Image]:
    """A1111's txt2img with Euler: ``prompts[i]`` serves from the step index ``switch_after[i - 1] + 1`` on."""
    with torch.no_grad():
        empty = encoded(base, "")
        conds = [encoded(base, text) for text in prompts]
        longest = max(cond.shape[1] for cond in conds)
        conds = [torch.cat([cond, empty.repeat(1, (longest - cond.shape[1]) // 77, 1)], dim=1) for cond in conds]
        uncond = encoded(base, negative)
        images = len(seeds)
        width, height = size
        shape = (4, height // 8, width // 8)
        x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds])
        scheduler = make_scheduler("Euler", base.scheduler.config)
        scheduler.set_timesteps(steps)
        sigmas = scheduler.sigmas
        x = x * sigmas[0]
        control = None
        if controlnet is not None:
            assert control_image is not None
            control = torch.from_numpy(np.asarray(control_image.convert("RGB"), dtype=np.float32) / 255)
            control = control.permute(2, 0, 1)[None].repeat(images, 1, 1, 1)

        def model(x_in: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
            texts = text.repeat(x_in.shape[0] // text.shape[0], 1, 1)
            residuals: dict[str, Any] = {}
            if controlnet is not None:
                assert control is not None
                hint = control.repeat(x_in.shape[0] // images, 1, 1, 1)
                down, mid = controlnet(x_in, t, encoder_hidden_states=texts, controlnet_cond=hint, return_dict=False)
                residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            return base.unet(x_in, t, encoder_hidden_states=texts, **residuals).sample

        for index in range(steps):
            cond = conds[sum(index > last for last in switch_after)]
            sigma, t = sigmas[index], scheduler.timesteps[index]
            x_in = x / (sigma**2 + 1) ** 0.5
            negative_text = uncond
            if pad_cond_uncond and cond.shape[1] != negative_text.shape[1]:
                repeats = (cond.shape[1] - negative_text.shape[1]) // empty.shape[1]
                if repeats > 0:
                    negative_text = torch.cat([negative_text, empty.repeat(1, repeats, 1)], dim=1)
                else:
                    cond = torch.cat([cond, empty.repeat(1, -repeats, 1)], dim=1)
            if cond.shape[1] == negative_text.shape[1]:
                batch = torch.cat([cond.repeat(images, 1, 1), negative_text.repeat(images, 1, 1)])
                eps_cond, eps_uncond = model(torch.cat([x_in, x_in]), t, batch).chunk(2)
            else:  # apart, as A1111 runs them by default
                eps_cond, eps_uncond = model(x_in, t, cond), model(x_in, t, negative_text)
            eps = eps_uncond + cfg * (eps_cond - eps_uncond)
            denoised = x - sigma * eps
            x = x + (x - denoised) / sigma * (sigmas[index + 1] - sigma)
        decoded = base.vae.decode(x / base.vae.config.scaling_factor).sample
    return base.image_processor.postprocess(decoded, output_type="pil")
