"""What runs for each task: which diffusers pipeline, built from the shared components, with which arguments.

A job is one or two passes. Text-to-image, img2img, inpaint and outpaint are
one pass each; hires fix adds an img2img pass at the larger size that starts
from the first pass's result. With ControlNet units every pass runs the task's
ControlNet pipeline instead, with the units' maps at that pass's size. The
engine runs the passes inside its guard rails (lock, admission, deadline, OOM
retry, NaN guard); nothing here touches them, nor torch: passes are planned in ``prepare``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from PIL import Image

from src.prepare.canvas import ControlMaps, TaskImages
from src.prompts.syntax import Span
from src.schema import SECOND_ORDER_SAMPLERS, GenerateRequest

# The kind of diffusers pipeline a pass calls; ``run`` builds it (and its ControlNet variant) from the shared models.
PipelineKind = Literal["txt2img", "img2img", "inpaint"]
# Each task's kind of pipeline: outpainting is inpainting on a larger canvas.
PIPELINES: dict[str, PipelineKind] = {
    "txt2img": "txt2img",
    "img2img": "img2img",
    "inpaint": "inpaint",
    "outpaint": "inpaint",
}
# The argument each kind's ControlNet pipeline takes the control maps in (text-to-image's takes them as `image`).
CONTROL_ARGUMENTS: dict[PipelineKind, str] = {
    "txt2img": "image",
    "img2img": "control_image",
    "inpaint": "control_image",
}


@dataclass(frozen=True)
class Pass:
    """One call of a diffusers pipeline: its kind, run with the job's ControlNet units when ``controlled``."""

    pipeline: PipelineKind
    # num_inference_steps as given to the pipeline, and the steps it runs (fewer at a low strength).
    steps: int
    denoising_steps: int
    # The steps its prompt editing counts over, as A1111 counts them.
    prompt_span: Span
    # The task's own arguments (size, image, strength).
    arguments: dict[str, Any] = field(default_factory=dict)
    # Hires: the image comes from the previous pass, enlarged to this size by this upscaler.
    upscale_to: tuple[int, int] | None = None
    upscaler: str = "latent"
    # Inpaint: the blurred mask at the pass's size (white repaints), which ``run`` blends the pass under.
    mask: Image.Image | None = None
    # Whether the pass runs the job's ControlNet units (its class is then a ControlNet pipeline).
    controlled: bool = False
    # Hires: its own model (a MODELS_DIR name), scheduler, prompt and negative prompt (None: the job's).
    model: str | None = None
    scheduler: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None


def plan_passes(request: GenerateRequest, images: TaskImages | None, controls: ControlMaps | None = None) -> list[Pass]:
    """The passes of ``request``, whose size is resolved and whose images (and control maps) are at that size."""
    plain = _passes(request, images)
    if not request.controlnets:
        return plain
    assert controls is not None, "a job with ControlNet units needs their maps"
    maps = [controls.first, controls.hires or []]
    return [_controlled(request, step, maps[index]) for index, step in enumerate(plain)]


def _controlled(request: GenerateRequest, step: Pass, maps: list[Image.Image]) -> Pass:
    """``step`` as its ControlNet pipeline runs it, with the units' maps, scales and guidance windows."""
    argument = CONTROL_ARGUMENTS[step.pipeline]
    units = request.controlnets
    arguments = {
        **step.arguments,
        argument: maps,
        "controlnet_conditioning_scale": [unit.scale for unit in units],
        "control_guidance_start": [unit.start for unit in units],
        "control_guidance_end": [unit.end for unit in units],
    }
    return replace(step, arguments=arguments, controlled=True)


def _calls(steps: int, sampler: str) -> int:
    """The model calls A1111's prompt editing counts over ``steps`` steps of ``sampler``."""
    return steps * (2 if sampler in SECOND_ORDER_SAMPLERS else 1)


def _passes(request: GenerateRequest, images: TaskImages | None) -> list[Pass]:
    width, height = request.size
    task = request.task
    calls = _calls(request.num_inference_steps, request.scheduler)
    if task == "txt2img":
        first = Pass(
            "txt2img",
            steps=request.num_inference_steps,
            denoising_steps=request.num_inference_steps,
            prompt_span=Span(calls),
            arguments={"width": width, "height": height},
        )
        if request.hires is None:
            return [first]
        hires = request.hires
        # A1111's sample_hr_pass runs exactly `Hires steps`: setup_img2img_steps stretches the schedule to
        # int(steps / strength) steps and starts where `steps` of them are left.
        schedule = hires.schedule_steps
        second = Pass(
            "img2img",
            steps=schedule,
            denoising_steps=hires.steps,
            prompt_span=Span(_calls(hires.steps, hires.sampler or request.scheduler), after=calls),
            arguments={"strength": strength_for(schedule, hires.steps)},
            upscale_to=request.output_size,
            upscaler=hires.upscaler,
            model=hires.model,
            scheduler=hires.sampler,
            prompt=hires.prompt,
            negative_prompt=hires.negative_prompt,
        )
        return [first, second]
    assert images is not None, f"a {task} job needs its images"
    # A1111's count of steps (``denoising_steps``), which diffusers runs at this strength.
    strength = strength_for(request.num_inference_steps, request.denoising_steps)
    return [
        Pass(
            PIPELINES[task],
            steps=request.num_inference_steps,
            denoising_steps=request.denoising_steps,
            # As A1111's img2img: editing counts over all the steps asked for, from the first step that runs.
            prompt_span=Span(calls),
            arguments={"image": images.image, "strength": strength},
            mask=images.mask,
        )
    ]


def strength_for(steps: int, runs: int) -> float:
    """The img2img ``strength`` with which diffusers runs the last ``runs`` of ``steps`` steps.

    diffusers runs int(steps x strength) of them; runs / steps in floating point can land a hair below
    the integer (int(3 x (1 / 3)) is 0), so it is raised to the next float until it does not.
    """
    strength = runs / steps
    while int(steps * strength) < runs:
        strength = math.nextafter(strength, math.inf)
    return strength
