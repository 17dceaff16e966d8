"""The step noise of DPM++ 2M SDE as A1111 draws it: from a Brownian tree per image, seeded by the image's seed.

A1111 gives k-diffusion's ``sample_dpmpp_2m_sde`` a ``BrownianTreeNoiseSampler`` (``create_noise_sampler`` in
its ``sd_samplers_kdiffusion``): one ``torchsde.BrownianTree`` per image, its entropy the image's seed, spanning
the smallest nonzero and the largest sigma the sampler runs, on the latents' device in float32. The noise a step
from sigma to sigma_next adds is the tree's increment over that interval, divided by the square root of its length.
So an image's noise depends on its seed and its schedule alone, not on the batch it was drawn in.

diffusers' ``DPMSolverMultistepScheduler`` (``sde-dpmsolver++``) takes a step's noise as ``variance_noise``, in the
same units (its VP form of the update is k-diffusion's times alpha); ``brownian_step_noise`` has a scheduler's
``step`` pass the tree's noise there, and zeros where sigma_next is 0 (where k-diffusion adds none and diffusers
multiplies its noise by 0), so the images' generators give it nothing. The trees span the scheduler's whole
schedule, for an img2img or hires pass that runs only its end too: A1111's ``sample_img2img`` gives
``create_noise_sampler`` the full sigmas, not the shortened ones it samples.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

# The scheduler's algorithm whose steps add noise.
SDE_ALGORITHM = "sde-dpmsolver++"


def brownian_step_noise(scheduler: Any, seeds: Sequence[int]) -> None:
    """Have ``scheduler`` (a fresh one, for one pipeline call over the images of ``seeds``) add A1111's Brownian
    noise at each step; nothing for a scheduler whose steps add no noise."""
    if getattr(scheduler.config, "algorithm_type", None) != SDE_ALGORITHM:
        return
    step = scheduler.step
    trees: BrownianTrees | None = None

    def step_with_tree_noise(model_output: Any, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        nonlocal trees
        if scheduler.step_index is None:
            scheduler._init_step_index(timestep)  # as ``step`` itself does first
        sigmas = scheduler.sigmas
        sigma, sigma_next = float(sigmas[scheduler.step_index]), float(sigmas[scheduler.step_index + 1])
        if trees is None:
            # Over the whole schedule, as A1111's create_noise_sampler is given it, an img2img pass's too.
            sigma_min, sigma_max = float(sigmas[sigmas > 0].min()), float(sigmas.max())
            trees = BrownianTrees(seeds, sample.shape[1:], sample.device, sigma_min=sigma_min, sigma_max=sigma_max)
        noise = trees.noise(sigma, sigma_next) if sigma_next > 0 else torch.zeros(sample.shape)
        # In float32, as k-diffusion adds it (diffusers' step computes in float32 whatever the latents' dtype).
        kwargs["variance_noise"] = noise.to(device=sample.device)
        return step(model_output, timestep, sample, *args, **kwargs)

    scheduler.step = step_with_tree_noise


class BrownianTrees:
    """k-diffusion's ``BrownianTreeNoiseSampler`` over a batch (its ``BatchedBrownianTree``): one tree per seed."""

    def __init__(
        self, seeds: Sequence[int], shape: Sequence[int], device: torch.device, *, sigma_min: float, sigma_max: float
    ) -> None:
        import torchsde  # here: only DPM++ 2M SDE needs it, and the GPU kit's machine lacks it

        # torchsde warns when a query reaches past the tree's ends by a float's rounding, and clamps it, as it does
        # under A1111 (whose console shows "Should have tb<=t1"): expected, and no news to an operator.
        warnings.filterwarnings("ignore", message="Should have t", category=UserWarning, module="torchsde")
        start = torch.zeros(tuple(shape), dtype=torch.float32, device=device)
        self.trees = [torchsde.BrownianTree(sigma_min, start, sigma_max, entropy=seed) for seed in seeds]

    def noise(self, sigma: float, sigma_next: float) -> torch.Tensor:
        """The noise of the step from ``sigma`` down to ``sigma_next``: (B, C, H, W), unit variance."""
        low, high = torch.tensor(sigma_next), torch.tensor(sigma)  # float32, as k-diffusion's sigmas
        increments = torch.stack([tree(low, high) for tree in self.trees])
        return -increments / (high - low).abs().sqrt().to(increments.device)
