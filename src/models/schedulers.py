"""AUTOMATIC1111 sampler names -> fresh diffusers schedulers.

Each request gets a new scheduler built from the model's own scheduler config,
because diffusers schedulers keep per-run state (timesteps, step index, solver
history) and are not safe to share between concurrent requests.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

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

_KARRAS = {"use_karras_sigmas": True}
_SDE = {"algorithm_type": "sde-dpmsolver++"}
# k-diffusion's own schedule (A1111's "Uniform": sigmas at timesteps linspace(999, 0)). SD 1.5's config says
# "leading", which k-diffusion's samplers never used: from it they started at t=951, under-noised (11.0, not 14.6).
_UNIFORM = {"timestep_spacing": "linspace", "steps_offset": 0}

# Canonical name (src.schema.SCHEDULER_NAMES) -> (class, config overrides). The overrides follow the diffusers docs'
# table of A1111 equivalents.
SCHEDULERS: Mapping[str, tuple[type[SchedulerMixin], dict[str, Any]]] = MappingProxyType(
    {
        "DPM++ 2M": (DPMSolverMultistepScheduler, {}),
        "DPM++ 2M Karras": (DPMSolverMultistepScheduler, _KARRAS),
        # A1111's (1.9 and later) own schedule for it, its "Automatic": Exponential.
        "DPM++ 2M SDE": (DPMSolverMultistepScheduler, {**_SDE, "use_exponential_sigmas": True}),
        "DPM++ 2M SDE Karras": (DPMSolverMultistepScheduler, {**_SDE, **_KARRAS}),
        "DPM2": (KDPM2DiscreteScheduler, _UNIFORM),
        "DPM2 a": (KDPM2AncestralDiscreteScheduler, _UNIFORM),
        "Euler": (EulerDiscreteScheduler, _UNIFORM),
        "Euler a": (EulerAncestralDiscreteScheduler, _UNIFORM),
        "Heun": (HeunDiscreteScheduler, _UNIFORM),
        "LMS": (LMSDiscreteScheduler, _UNIFORM),
        "LMS Karras": (LMSDiscreteScheduler, {**_UNIFORM, **_KARRAS}),
        # SD 1.5's config says clip_sample=False, but a config without the key
        # would get DDIM's default (True), which clips latents and ruins images.
        "DDIM": (DDIMScheduler, {"clip_sample": False, "set_alpha_to_one": False}),
        "PNDM": (PNDMScheduler, {"skip_prk_steps": True}),
        "UniPC": (UniPCMultistepScheduler, {}),
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
