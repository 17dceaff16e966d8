"""DPM++ 2M SDE steps as A1111's k-diffusion does, with its Brownian-tree noise seeded by each image's seed.

The reference is k-diffusion's ``sample_dpmpp_2m_sde`` (eta 1, midpoint) and its ``BrownianTreeNoiseSampler``
over a batch of seeds, as A1111 calls them, written here from k-diffusion's sampling.py; both sides run the same
denoiser, so the final latents differ by float rounding alone when the steps and their noise are k-diffusion's.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torchsde

import handler
from builder.tiny_model import SD15_SCHEDULER_CONFIG
from src.models.schedulers import make_scheduler
from src.run.brownian import brownian_step_noise

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]


def denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A smooth, nonlinear stand-in for the UNet's denoised estimate at ``sigma`` (k-diffusion's VE form)."""
    return torch.tanh(x / (1 + sigma)) * 0.8 + 0.05 * torch.sin(3 * x)


def k_diffusion_dpmpp_2m_sde(
    x: torch.Tensor, sigmas: torch.Tensor, seeds: list[int], model: Denoiser, schedule: torch.Tensor
) -> torch.Tensor:
    """k-diffusion's sample_dpmpp_2m_sde(eta=1, s_noise=1, solver_type='midpoint') over ``sigmas`` with A1111's
    noise sampler: BrownianTreeNoiseSampler(x, sigma_min, sigma_max, seed=seeds), a BatchedBrownianTree of one tree
    per seed, over the whole ``schedule`` (A1111's sample_img2img samples its end, and gives the sampler all of it)."""
    sigma_min, sigma_max = schedule[schedule > 0].min(), schedule.max()
    trees = [torchsde.BrownianTree(sigma_min, torch.zeros_like(x)[0], sigma_max, entropy=seed) for seed in seeds]

    def noise_sampler(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        low, high, sign = (sigma, sigma_next, 1) if sigma < sigma_next else (sigma_next, sigma, -1)
        return torch.stack([tree(low, high) for tree in trees]) * sign / (sigma_next - sigma).abs().sqrt()

    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, float(sigmas[i]))
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            x = sigmas[i + 1] / sigmas[i] * (-h).exp() * x + (-2 * h).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                x = x + 0.5 * (-2 * h).expm1().neg() * (1 / r) * (denoised - old_denoised)
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h).expm1().neg().sqrt()
            h_last = h
        old_denoised = denoised
    return x


def diffusers_steps(scheduler: Any, x: torch.Tensor, begin: int, model: Denoiser) -> torch.Tensor:
    """The scheduler from its step ``begin`` (as diffusers' img2img pipelines set it) on ``x``, k-diffusion's VE
    latents at that sigma: its VP sample is x times alpha, and the denoised estimate reaches it as epsilon."""
    scheduler.set_begin_index(begin)
    sigmas = scheduler.sigmas
    sample = x / math.sqrt(1 + float(sigmas[begin]) ** 2)
    for index, timestep in enumerate(scheduler.timesteps[begin:], start=begin):
        sigma = float(sigmas[index])
        x_ve = sample * math.sqrt(1 + sigma**2)
        epsilon = (x_ve - model(x_ve, sigma)) / sigma
        sample = scheduler.step(epsilon, timestep, sample).prev_sample
    return sample


@pytest.mark.parametrize("name", ["DPM++ 2M SDE", "DPM++ 2M SDE Karras"])
@pytest.mark.parametrize("begin", [0, 4], ids=["txt2img", "img2img"])
def test_dpmpp_2m_sde_adds_a1111s_brownian_noise_and_steps_as_k_diffusion(name: str, begin: int) -> None:
    seeds = [7, 8]
    scheduler = make_scheduler(name, SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(10)
    brownian_step_noise(scheduler, seeds)
    sigmas = scheduler.sigmas[begin:].float()
    start = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1)) * sigmas[0]

    ours = diffusers_steps(scheduler, start.clone(), begin, denoiser)
    theirs = k_diffusion_dpmpp_2m_sde(start.clone(), sigmas, seeds, denoiser, scheduler.sigmas.float())

    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    # The noise is the seeds': other seeds, another image. Without it the steps would draw from the generators.
    other = make_scheduler(name, SD15_SCHEDULER_CONFIG)
    other.set_timesteps(10)
    brownian_step_noise(other, [9, 10])
    assert (diffusers_steps(other, start.clone(), begin, denoiser) - theirs).abs().max() > 0.05


def test_a_scheduler_whose_steps_add_no_noise_is_left_as_it_is() -> None:
    scheduler = make_scheduler("DPM++ 2M Karras", SD15_SCHEDULER_CONFIG)
    step = scheduler.step

    brownian_step_noise(scheduler, [1])

    assert scheduler.step == step


@pytest.fixture
def trees_made(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, float, int, tuple[int, ...]]]:
    """Each Brownian tree the worker makes: (its first time, its last, its entropy, its shape); the trees are
    torchsde's own."""
    made: list[tuple[float, float, int, tuple[int, ...]]] = []
    tree_class = torchsde.BrownianTree

    def recording(t0: float, w0: torch.Tensor, t1: float, **kwargs: Any) -> Any:
        made.append((t0, t1, kwargs["entropy"], tuple(w0.shape)))
        return tree_class(t0, w0, t1, **kwargs)

    monkeypatch.setattr(torchsde, "BrownianTree", recording)
    return made


@pytest.mark.usefixtures("worker")
def test_a_job_and_its_hires_pass_draw_their_step_noise_from_a_tree_per_image_seed(
    trees_made: list[tuple[float, float, int, tuple[int, ...]]],
) -> None:
    job = {
        "prompt": "a fox",
        "seed": 40,
        "num_images": 2,
        "num_inference_steps": 3,
        "width": 64,
        "height": 64,
        "scheduler": "DPM++ 2M SDE Karras",
        "hires": {"scale": 1.5, "upscaler": "latent", "steps": 2, "strength": 0.5},
    }
    result = asyncio.run(handler.handler({"id": "sde", "input": job}))
    assert "error" not in result, result["error"]

    def trees(steps: int, side: int) -> list[tuple[float, float, int, tuple[int, ...]]]:
        """A pass's trees over its whole schedule of ``steps``, as A1111's: one per image seed, at its size."""
        scheduler = make_scheduler("DPM++ 2M SDE Karras", SD15_SCHEDULER_CONFIG)
        scheduler.set_timesteps(steps)
        sigma_min, sigma_max = float(scheduler.sigmas[-2]), float(scheduler.sigmas[0])
        return [(sigma_min, sigma_max, seed, (4, side, side)) for seed in (40, 41)]

    # The hires pass runs the last 2 steps of a schedule of 2 / 0.5 = 4; its trees span all 4.
    assert trees_made == pytest.approx(trees(3, 8) + trees(4, 12))
