"""A1111's inpaint blend on every sampler: the latent mask, and the blend at each step of each kind of scheduler.

tests/test_tasks.py compares whole inpaint jobs with A1111's loop written out (tests/a1111_inpaint.py) for Euler,
DPM++ 2M and DDIM; here every other sampler is held to what A1111's blend means for it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, LCMScheduler

import handler
from src.models.schedulers import SCHEDULERS, TIMESTEP_SAMPLERS
from src.run.inpaint import blend_each_step, latent_mask, masked_start
from src.run.pipelines import pipeline_for
from tests.a1111_inpaint import latent_mask as a1111_latent_mask
from tests.conftest import box_mask, noise_image

pytestmark = pytest.mark.usefixtures("worker")

IMAGE = noise_image(64, 64, seed=8)
MASK = box_mask(64, 64, (16, 8, 48, 40))  # edges off the 8-pixel grid: the latent mask's edge is grey
STEPS = 6


def base() -> Any:
    engine = handler.get_engine()
    if engine._pipeline is None:  # loaded on the first job
        asyncio.run(handler.handler({"id": "load", "input": {"prompt": "a fox", "num_inference_steps": 1}}))
    return handler.get_engine()._pipeline


@pytest.mark.parametrize("rounded", [False, True])
@pytest.mark.parametrize("size", [(8, 8), (5, 3)])
def test_latent_mask_is_a1111s(rounded: bool, size: tuple[int, int]) -> None:
    blurred = noise_image(40, 24, seed=2).convert("L")
    assert torch.equal(latent_mask(blurred, size, rounded=rounded), a1111_latent_mask(blurred, size, rounded))


def predictions(scheduler: Any) -> list[torch.Tensor]:
    """The clean latents ``scheduler`` predicts at each model evaluation, as its own step computes them: its
    ``pred_original_sample``, DPM-Solver's converted model output, LCM's denoised latents before their boundary
    scaling."""
    seen: list[torch.Tensor] = []
    if isinstance(scheduler, DPMSolverMultistepScheduler):
        convert = scheduler.convert_model_output

        def converted(*args: Any, **kwargs: Any) -> torch.Tensor:
            seen.append(convert(*args, **kwargs))
            return seen[-1]

        scheduler.convert_model_output = converted
        return seen
    step = scheduler.step

    def stepped(output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        as_tuple = kwargs.pop("return_dict", True) is False
        result = step(output, timestep, sample, *args, return_dict=True, **kwargs)
        if isinstance(scheduler, LCMScheduler):
            c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(timestep)
            seen.append((result.denoised - c_skip * sample) / c_out)
        else:
            seen.append(result.pred_original_sample)
        return (result.prev_sample,) if as_tuple else result

    scheduler.step = stepped
    return seen


def run(name: str, *, strength: float = 1.0) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], Any]:
    """An inpaint with sampler ``name`` (at the tiny model's size): the latents the pipeline returns (before the
    final blend), the clean latents its scheduler predicted at each step, the UNet's inputs, and the start."""
    pipeline = pipeline_for(base(), name, "inpaint")
    masked = masked_start(pipeline, IMAGE, MASK, seeds=[3, 4], fill="original", rounded=True)
    before = name in TIMESTEP_SAMPLERS
    predicted = [] if before else predictions(pipeline.scheduler)
    blend_each_step(pipeline.scheduler, masked, before=before)
    inputs: list[torch.Tensor] = []
    hook = pipeline.unet.register_forward_pre_hook(lambda _module, args: inputs.append(args[0].clone()))
    embeds = torch.zeros(1, 77, pipeline.text_encoder.config.hidden_size)
    try:
        with torch.no_grad():
            latents = pipeline(
                prompt_embeds=embeds + 0.1,
                negative_prompt_embeds=embeds,
                image=masked.image,
                strength=strength,
                num_inference_steps=STEPS,
                num_images_per_prompt=2,
                generator=[torch.Generator().manual_seed(seed) for seed in (3, 4)],
                output_type="latent",
            ).images
    finally:
        hook.remove()
    return latents, predicted, inputs, masked


AFTER = sorted(name for name in SCHEDULERS if name not in TIMESTEP_SAMPLERS)


@pytest.mark.parametrize("name", AFTER)
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_k_diffusion_samplers_predict_the_image_in_the_kept_part_at_every_step(name: str, strength: float) -> None:
    """A1111's CFGDenoiser blends the guided prediction of the clean latents: wherever the model is evaluated (a
    second-order sampler's midpoints too), the scheduler's prediction is the image's latents in the kept part."""
    latents, predicted, _inputs, masked = run(name, strength=strength)

    assert len(predicted) >= int(STEPS * strength)
    kept = (masked.mask == 0).expand_as(latents)
    for index, clean in enumerate(predicted):
        assert torch.allclose(clean[kept], masked.image[kept], atol=1e-4), f"{name}: evaluation {index}"
        assert (clean - masked.image)[~kept].abs().mean() > 0.01, "the masked part is predicted by the model"


@pytest.mark.parametrize("name", sorted(TIMESTEP_SAMPLERS))
def test_timestep_samplers_give_the_unet_the_image_in_the_kept_part(name: str) -> None:
    """A1111's timestep samplers (mask_before_denoising): the UNet sees the image's latents, clean, in the kept part;
    the sampler's own latents go on unblended until the end."""
    latents, _predicted, inputs, masked = run(name, strength=0.5)

    assert inputs, "the UNet ran"
    doubled = masked.image.repeat(2, 1, 1, 1)  # under guidance, the latents twice
    kept = (masked.mask == 0).expand_as(doubled)
    for given in inputs:
        assert torch.equal(given[kept], doubled[kept].to(given))
    assert not torch.allclose(latents[kept[:2]], masked.image[kept[:2]], atol=1e-3), "not blended until the end"


@pytest.mark.parametrize("name", ["Euler", "DPM++ 2M Karras"])
def test_half_precision_latents_are_blended_in_float32_and_stay_half(name: str) -> None:
    """A1111's k-diffusion blends in float32: the kept part's prediction is the image's to float32's precision,
    not moved by sigma x half precision's rounding, and the latents stay in half precision for the UNet."""
    from builder.tiny_model import SD15_SCHEDULER_CONFIG
    from src.models.schedulers import make_scheduler
    from src.run.inpaint import Masked

    scheduler = make_scheduler(name, SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(4)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 4, 8, 8, generator=generator).half()
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:] = 1
    predicted = predictions(scheduler)
    blend_each_step(scheduler, Masked(image=image, mask=mask), before=False)
    sample = (image.float() + scheduler.sigmas[0] * torch.randn(1, 4, 8, 8, generator=generator)).half()
    for timestep in scheduler.timesteps[:2]:
        output = torch.randn(1, 4, 8, 8, generator=generator).half()
        sample = scheduler.step(output, timestep, sample, return_dict=False)[0]
        assert sample.dtype == torch.float16

    for clean in predicted:
        assert (clean.float() - image.float())[..., :4].abs().max() < 2e-4  # half precision: up to 1e-2
