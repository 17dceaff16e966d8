"""AUTOMATIC1111's parameters text: what A1111 writes into its images, so that its tools read ours.

One line of prompt (LoRA tags included), one of negative prompt when there is one, then the settings as
``Name: value`` pairs in A1111's order, ControlNet units as its ControlNet extension writes them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from src.schema import A1111_NOISE_SOURCE, CONTROL_MODE_LABELS, HIRES_UPSCALER_NAMES, GenerateRequest, lora_tags

if TYPE_CHECKING:
    from src.adapters.loras import Applied

# The ControlNet extension's names for the resize modes (its ResizeMode enum).
_CONTROLNET_RESIZE_MODES = {"resize": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill"}


def a1111_parameters(
    request: GenerateRequest,
    seed: int,
    model: str,
    *,
    model_hash: str | None = None,
    vae: str | None = None,
    vae_hash: str | None = None,
    source_size: tuple[int, int] | None = None,
    embeddings: dict[str, str] | None = None,
    loras: Sequence[Applied] = (),
    control_sizes: Sequence[tuple[int, int]] = (),
    subseed: int | None = None,
    padded_conds: bool = False,
) -> str:
    """The parameters text AUTOMATIC1111 writes into its images, for one image: ``seed`` and ``subseed`` are
    the image's (``subseed`` None: the request's); ``padded_conds``: the job read a prompt and a negative of
    different lengths padded to one (``pad_conds``), which A1111 writes as ``Pad conds: True``.

    Like A1111, it has no "Negative prompt:" line when the negative prompt is empty, and
    names only what the task used: ``Denoising strength`` and ``Mask blur`` with an image,
    ``Hires upscale``, ``Hires steps`` and ``Hires upscaler`` with hires fix. LoRAs are
    ``<lora:name:scale>`` tags in the prompt, as A1111 reads them back: those the prompt
    holds stay as they are, those of the ``loras`` field are added at its end.
    ControlNet units are written as ``controlnet_parameters`` says, with ``control_sizes``, the
    control images' own sizes (``ControlMaps.sources``).
    """
    width, height = request.size
    fields = {
        "Steps": request.num_inference_steps,
        "Sampler": request.scheduler,
        **_schedule_type(request.scheduler),
        "CFG scale": f"{request.guidance_scale:g}",
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model": model,
    }
    # A checkpoint file has A1111's short hash; a diffusers folder or hub id has none.
    named = {"Model hash": model_hash, "VAE": vae, "VAE hash": vae_hash}
    fields.update({name: value for name, value in named.items() if value is not None})
    if request.subseed_strength > 0:
        fields["Variation seed"] = request.subseed if subseed is None else subseed
        fields["Variation seed strength"] = f"{request.subseed_strength:g}"
    if request.seed_resize_from is not None:
        fields["Seed resize from"] = "{}x{}".format(*request.seed_resize_from)
    fields.update(_option_fields(request))
    if padded_conds:  # A1111's paste turns its pad_cond_uncond on from it
        fields["Pad conds"] = "True"
    fields.update(_task_fields(request, source_size))
    if embeddings:
        fields["TI hashes"] = '"' + ", ".join(f"{name}: {digest}" for name, digest in embeddings.items()) + '"'
    if loras:
        fields["Lora hashes"] = '"' + ", ".join(f"{item.name}: {item.short_hash}" for item in loras) + '"'
    fields.update(controlnet_parameters(request, control_sizes))
    tagged = {name for _kind, name in _tag_names(request.prompt)}
    added = "".join(f" <lora:{item.name}:{item.scale:g}>" for item in loras if item.name not in tagged)
    negative = f"Negative prompt: {request.negative_prompt}\n" if request.negative_prompt else ""
    return f"{request.prompt}{added}\n{negative}" + ", ".join(f"{name}: {value}" for name, value in fields.items())


# The samplers whose plain name here runs Uniform where A1111's (1.9 and later) runs another by default: the
# parameters name the schedule, so A1111 replays it. Their other schedule's name says it ("DPM2 Karras").
_UNIFORM_HERE = ("DPM2", "DPM2 a", "DPM++ 2M")


def _schedule_type(sampler: str) -> dict[str, str]:
    return {"Schedule type": "Uniform"} if sampler in _UNIFORM_HERE else {}


def controlnet_parameters(request: GenerateRequest, control_sizes: Sequence[tuple[int, int]] = ()) -> dict[str, str]:
    """Each ControlNet unit as A1111's ControlNet extension writes it (``ControlNetUnit.serialize()``), every
    field in its order, so that A1111 replays the unit: ``ControlNet 0: "Module: canny, ..."``.

    ``control_sizes`` are the control images' own sizes: canny runs on the image as it is, which the extension
    does when its processor resolution is the image's short side. ``none`` has no sliders; the extension writes
    their defaults for it (512, 0.5, 0.5). Without a size, a canny unit's ``Processor Res`` is left out.
    """
    units = {}
    for index, unit in enumerate(request.controlnets):
        if unit.preprocess == "canny":
            low, high = unit.canny_thresholds
            resolution = min(control_sizes[index]) if index < len(control_sizes) else unit.processor_res
            sliders = {"Processor Res": resolution, "Threshold A": float(low), "Threshold B": float(high)}
        else:
            sliders = {"Processor Res": 512, "Threshold A": 0.5, "Threshold B": 0.5}
        fields = {
            "Module": unit.preprocess,
            "Model": unit.model,
            "Weight": float(unit.scale),
            "Resize Mode": _CONTROLNET_RESIZE_MODES[unit.resize_mode or request.resize_mode],
            **sliders,
            "Guidance Start": float(unit.start),
            "Guidance End": float(unit.end),
            "Pixel Perfect": False,
            "Control Mode": CONTROL_MODE_LABELS[unit.control_mode],
        }
        text = ", ".join(f"{name}: {value}" for name, value in fields.items() if value is not None)
        units[f"ControlNet {index}"] = f'"{text}"'
    return units


def _tag_names(prompt: str) -> list[tuple[str, str]]:
    """(kind, name) of each extra-network tag in the prompt."""
    return [(kind, arguments.split(":")[0].strip()) for kind, arguments in lora_tags(prompt)]


def _option_fields(request: GenerateRequest) -> dict[str, Any]:
    """The options that change how any task's images are made, the noise's source among them."""
    fields: dict[str, Any] = {}
    if request.clip_skip != 1:
        fields["Clip skip"] = request.clip_skip
    if request.tome_ratio > 0:
        fields["Token merging ratio"] = f"{request.tome_ratio:g}"
    # The noise is drawn as A1111's CPU source draws it; A1111 writes its source when it is not its default GPU,
    # and its paste sets randn_source from it, so A1111 replays the image with the same noise.
    fields["RNG"] = A1111_NOISE_SOURCE
    if request.tiling:
        fields["Tiling"] = "True"
    if request.deepcache_interval > 1:
        fields["DeepCache interval"] = request.deepcache_interval
    return fields


def _task_fields(request: GenerateRequest, source_size: tuple[int, int] | None) -> dict[str, Any]:
    """The fields of the task that made the image: its input image, mask, outpaint margins and hires pass."""
    fields: dict[str, Any] = {}
    task = request.task
    if task != "txt2img":
        fields["Denoising strength"] = f"{request.strength:g}"
        fields["Resize mode"] = request.resize_mode
        if source_size is not None:
            fields["Source size"] = f"{source_size[0]}x{source_size[1]}"
    if task in ("inpaint", "outpaint"):
        fields.update(_mask_fields(request))
    if request.outpaint is not None:
        margins = request.outpaint
        fields["Outpaint"] = f'"left {margins.left}, right {margins.right}, top {margins.top}, bottom {margins.bottom}"'
    if request.hires is not None:
        fields["Denoising strength"] = f"{request.hires.strength:g}"
        fields["Hires upscale"] = f"{request.hires.scale:.12g}"  # all its digits: run again, it makes the same size
        fields["Hires steps"] = request.hires.steps
        fields["Hires upscaler"] = HIRES_UPSCALER_NAMES.get(request.hires.upscaler, request.hires.upscaler)
        if request.hires.model is not None:
            fields["Hires checkpoint"] = request.hires.model
        if request.hires.sampler is not None and request.hires.sampler != request.scheduler:
            fields["Hires sampler"] = request.hires.sampler
            # Without it, A1111 runs the hires sampler on the first pass's schedule, or on DPM2's own (Karras).
            if request.hires.sampler in _UNIFORM_HERE:
                fields["Hires schedule type"] = "Uniform"
        if request.hires.prompt is not None and request.hires.prompt != request.prompt:
            fields["Hires prompt"] = quote(request.hires.prompt)
        if request.hires.negative_prompt is not None and request.hires.negative_prompt != request.negative_prompt:
            fields["Hires negative prompt"] = quote(request.hires.negative_prompt)
    return fields


def _mask_fields(request: GenerateRequest) -> dict[str, Any]:
    """Inpaint's and outpaint's fields: the mask's blur and mode, the area repainted, what it starts from."""
    fields: dict[str, Any] = {"Mask blur": request.mask_blur}
    if request.mask_invert:
        fields["Mask mode"] = "Inpaint not masked"
    if request.inpaint_fill != "original":
        fields["Masked content"] = request.inpaint_fill.replace("_", " ")  # A1111's labels: "latent noise"
    if request.inpaint_area == "masked":
        fields["Inpaint area"] = "Only masked"
        fields["Masked area padding"] = request.inpaint_padding
    if not request.keep_unmasked:
        fields["Keep unmasked"] = "False"
    return fields


def quote(text: str) -> str:
    """A value as A1111's ``infotext_utils.quote`` writes it: as is, or JSON-quoted when it holds a comma, a
    colon or a line break (which would end the value)."""
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)
