"""AUTOMATIC1111 sampler names -> fresh diffusers schedulers.

Each request gets a new scheduler built from the model's own scheduler config,
because diffusers schedulers keep per-run state (timesteps, step index, solver
history) and are not safe to share between concurrent requests.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin


def _model_sigmas(scheduler: Any) -> Any:
    """The model's sigma at each training timestep, 0 to 999 (k-diffusion's ``CompVisDenoiser.sigmas``)."""
    return ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5


class _DiscardsNextToLast:
    """A1111's schedule for DPM2 and DPM2 a (their ``discard_next_to_last_sigma``): its schedule of steps + 1 sigmas,
    the next-to-last (the smallest above 0) dropped, so that ``steps`` steps run and the last goes down to 0 from
    the sigma before it. ``grid`` makes the schedule: Karras's (rho 7 between the model's smallest and largest
    sigma, A1111's for these samplers since 1.9) or Uniform's (the model's sigmas at timesteps linspace(999, 0)).

    diffusers' KDPM2 schedulers build their interleaved second-order tables from the sigmas its Karras conversion
    returns (``use_karras_sigmas``), then take the timesteps from them, rounded: this is that conversion.
    """

    grid = "karras"

    def _convert_to_karras(self, in_sigmas: Any, num_inference_steps: int) -> Any:
        more = num_inference_steps + 1
        # The model's own sigmas, not ``in_sigmas``: at 1 step those are the one sigma at timestep 0.
        table = _model_sigmas(self).numpy()
        if self.grid == "karras":
            sigmas = super()._convert_to_karras(np.array([table[-1], table[0]]), more)  # type: ignore[misc]
        else:
            timesteps = np.linspace(0, len(table) - 1, more)[::-1]
            sigmas = np.interp(timesteps, np.arange(len(table)), table)
        return sigmas[:-1]


class DPM2(_DiscardsNextToLast, KDPM2DiscreteScheduler):
    grid = "uniform"


class DPM2Ancestral(_DiscardsNextToLast, KDPM2AncestralDiscreteScheduler):
    grid = "uniform"


class DPM2Karras(_DiscardsNextToLast, KDPM2DiscreteScheduler):
    grid = "karras"


class DPM2AncestralKarras(_DiscardsNextToLast, KDPM2AncestralDiscreteScheduler):
    grid = "karras"


class _FromTheTopAtOneStep:
    """k-diffusion's schedule at 1 step: its one sigma the model's largest (timestep 999), as A1111 runs it.
    diffusers' ``linspace`` of one timestep is timestep 0, sigma 0.029, from which a step paints nothing but noise."""

    def set_timesteps(self, num_inference_steps: int | None = None, *args: Any, **kwargs: Any) -> None:
        super().set_timesteps(num_inference_steps, *args, **kwargs)  # type: ignore[misc]
        if num_inference_steps == 1:
            table = _model_sigmas(self)
            self.sigmas[0] = table[-1]  # type: ignore[attr-defined]
            self.timesteps[0] = len(table) - 1  # type: ignore[attr-defined]


class Euler(_FromTheTopAtOneStep, EulerDiscreteScheduler):
    pass


class EulerAncestral(_FromTheTopAtOneStep, EulerAncestralDiscreteScheduler):
    pass


class Heun(_FromTheTopAtOneStep, HeunDiscreteScheduler):
    pass


class LMS(_FromTheTopAtOneStep, LMSDiscreteScheduler):
    pass


class DPMPlusPlus2M(DPMSolverMultistepScheduler):
    """DPM++ 2M on A1111's "Uniform" schedule, k-diffusion's own: the model's sigmas at timesteps
    linspace(999, 0, steps), interpolated in log sigma as k-diffusion's CompVisDenoiser does, then 0; the UNet
    given those timesteps, unrounded. diffusers' own spacing for SD 1.5 ("leading") starts at timestep 941 at
    20 steps, on less noise than the latents hold, and at 1 step at 501."""

    def set_timesteps(self, num_inference_steps: int | None = None, *args: Any, **kwargs: Any) -> None:
        super().set_timesteps(num_inference_steps, *args, **kwargs)
        rounded: torch.Tensor = self.timesteps  # type: ignore[has-type]
        table = np.log(_model_sigmas(self).numpy().astype(np.float64))
        timesteps = np.linspace(len(table) - 1, 0, len(rounded))
        sigmas = np.exp(np.interp(timesteps, np.arange(len(table)), table))
        self.sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))
        self.timesteps = torch.from_numpy(timesteps.astype(np.float32)).to(rounded.device)


class UniPC(UniPCMultistepScheduler):
    """A1111's UniPC (its timestep sampler, at its default options: variant bh1, order 3, lower orders at the end,
    "time_uniform" steps): the model's continuous time from 1 to 1/1000 in equal steps, given to the UNet as the
    timestep (t - 1/1000) x 1000, linspace(999, 0) unrounded, at noise levels read off the model's log alphas by
    linear interpolation, down to the noise of timestep 0. diffusers' solver is the same one (from UniPC's
    authors); its own schedule rounds the timesteps and, from SD 1.5's config, starts at 941 ("leading"), on less
    noise than the latents hold."""

    def set_timesteps(self, num_inference_steps: int | None = None, *args: Any, **kwargs: Any) -> None:
        super().set_timesteps(num_inference_steps, *args, **kwargs)
        rounded: torch.Tensor = self.timesteps  # type: ignore[has-type]
        last = len(self.alphas_cumprod) - 1
        timesteps = np.linspace(last, 0, len(rounded) + 1)
        log_alphas = 0.5 * np.log(self.alphas_cumprod.numpy().astype(np.float64))
        alphas = np.exp(np.interp(timesteps, np.arange(last + 1), log_alphas))
        self.sigmas = torch.from_numpy((np.sqrt(1 - alphas**2) / alphas).astype(np.float32))
        self.timesteps = torch.from_numpy(timesteps[:-1].astype(np.float32)).to(rounded.device)


_KARRAS = {"use_karras_sigmas": True}
_SDE = {"algorithm_type": "sde-dpmsolver++"}
# k-diffusion's own schedule (A1111's "Uniform": sigmas at timesteps linspace(999, 0)). SD 1.5's config says
# "leading", which k-diffusion's samplers never used: from it they started at t=951, under-noised (11.0, not 14.6).
_UNIFORM = {"timestep_spacing": "linspace", "steps_offset": 0}
# The DPM2 schedules are made in diffusers' Karras conversion, over the model's sigmas at k-diffusion's timesteps.
_DISCARDING = {**_UNIFORM, **_KARRAS}

# Canonical name (src.schema.SCHEDULER_NAMES) -> (class, config overrides). The overrides follow the diffusers docs'
# table of A1111 equivalents.
SCHEDULERS: Mapping[str, tuple[type[SchedulerMixin], dict[str, Any]]] = MappingProxyType(
    {
        # A1111's "Uniform" for it; its own default (1.9 and later) is Karras, by name here.
        "DPM++ 2M": (DPMPlusPlus2M, {"final_sigmas_type": "zero"}),
        "DPM++ 2M Karras": (DPMSolverMultistepScheduler, _KARRAS),
        # A1111's (1.9 and later) own schedule for it, its "Automatic": Exponential.
        "DPM++ 2M SDE": (DPMSolverMultistepScheduler, {**_SDE, "use_exponential_sigmas": True}),
        "DPM++ 2M SDE Karras": (DPMSolverMultistepScheduler, {**_SDE, **_KARRAS}),
        # A1111's own, with its next-to-last sigma dropped: Karras by default there, Uniform by name.
        "DPM2": (DPM2, _DISCARDING),
        "DPM2 Karras": (DPM2Karras, _DISCARDING),
        "DPM2 a": (DPM2Ancestral, _DISCARDING),
        "DPM2 a Karras": (DPM2AncestralKarras, _DISCARDING),
        "Euler": (Euler, _UNIFORM),
        "Euler a": (EulerAncestral, _UNIFORM),
        "Heun": (Heun, _UNIFORM),
        "LMS": (LMS, _UNIFORM),
        "LMS Karras": (LMS, {**_UNIFORM, **_KARRAS}),
        # SD 1.5's config says clip_sample=False, but a config without the key
        # would get DDIM's default (True), which clips latents and ruins images.
        "DDIM": (DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": False}),
        "PNDM": (PNDMScheduler, {"skip_prk_steps": True}),
        "UniPC": (UniPC, {"solver_type": "bh1", "solver_order": 3, "lower_order_final": True}),
        # For the LCM-LoRA (or an LCM-distilled checkpoint): 4 to 8 steps at guidance 1 to 2.
        "LCM": (LCMScheduler, {}),
    }
)

# The schedulers whose sample is k-diffusion's x = x0 + sigma * eps (their model input is it scaled down); the
# others' sample is diffusers' variance-preserving one.
K_DIFFUSION_SCHEDULERS = (
    EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    LMSDiscreteScheduler,
)
# The samplers A1111 runs as timestep samplers (its sd_samplers_timesteps: DDIM, PLMS, UniPC); the others run
# through k-diffusion. The two blend an inpaint's kept part differently (``src.run.inpaint``).
TIMESTEP_SAMPLERS = frozenset({"DDIM", "PNDM", "UniPC"})


def make_scheduler(name: str, base_config: Mapping[str, Any]) -> SchedulerMixin:
    """Build a new scheduler ``name`` (a canonical name from the schema) from a model's config."""
    scheduler_class, overrides = SCHEDULERS[name]
    return scheduler_class.from_config(dict(base_config), **overrides)
