"""``GenerateRequest``, the rules across its field groups, and ``parse_input``, which turns a job into one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, model_validator

from src.schema.adapters import (
    AdapterOptions,
    ControlNetUnit,
    LoraRequest,
    check_controlnets,
    check_loras,
    check_model,
    lora_tag_list,
    merge_lora_tags,
    without_comments,
    without_lora_tags,
    without_secrets,
)
from src.schema.core import CONFIGURED_DEFAULT, INVALID_INPUT, SEED_MAX, InputError, RequestLimits, Task, request_limits
from src.schema.images import IMAGE_FIELDS, MASK_FIELDS, STRENGTH_CAP
from src.schema.passes import Hires, Outpaint, check_outpaint_margins
from src.schema.size import check_size

# An input error names at most this many problems (one per request field), in at most this many characters.
MAX_PROBLEMS_SHOWN = 12
MAX_ERROR_CHARS = 2048
# The fields each task reports in its metadata, beyond those every job has.
TASK_FIELDS: Mapping[str, tuple[str, ...]] = {
    "txt2img": ("hires",),
    "img2img": ("strength", "resize_mode"),
    "inpaint": ("strength", "resize_mode", *MASK_FIELDS),
    "outpaint": ("strength", "resize_mode", *MASK_FIELDS, "outpaint"),
}


def _without_comments(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with A1111's ``#`` comments removed from its prompts and the hires pass's, before their
    ``<lora:...>`` tags are read: a tag in a comment is not read."""

    def stripped(fields: dict[str, Any]) -> dict[str, Any]:
        prompts = ("prompt", "negative_prompt")
        return {
            name: without_comments(value) if name in prompts and isinstance(value, str) else value
            for name, value in fields.items()
        }

    data = stripped(data)
    if isinstance(data.get("hires"), dict):
        data["hires"] = stripped(data["hires"])
    return data


def _hires_prompt_untagged(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with a hires prompt that repeats the prompt's ``<lora:...>`` tags exactly (as clients that copy
    A1111's prompt into ``hr_prompt`` send it) without them: they ask for what the job's LoRAs do in both passes
    already. A hires prompt that is then the prompt itself is dropped, as one not given. Other tags are left for
    the hires fields to refuse."""
    hires, prompt = data.get("hires"), data.get("prompt")
    if not isinstance(hires, dict) or not isinstance(prompt, str) or not isinstance(hires.get("prompt"), str):
        return data
    tags = lora_tag_list(hires["prompt"])
    if not tags or tags != lora_tag_list(prompt):
        return data
    untagged = without_lora_tags(hires["prompt"])
    hires = {name: value for name, value in hires.items() if name != "prompt"}
    return {**data, "hires": hires if untagged == without_lora_tags(prompt) else {**hires, "prompt": untagged}}


class GenerateRequest(AdapterOptions):
    """One text-to-image job. Unknown fields are errors, so typos fail loudly.

    Each field's description is its rule as the README states it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The model validators that compare field groups stay here, in this order: pydantic runs after-validators
    # in the order they are declared, a base's first, and the first that fails is the one reported.
    @model_validator(mode="before")
    @classmethod
    def _configured_defaults(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict):
            limits = request_limits(info)
            defaults = {name: getattr(limits, setting) for name, setting in CONFIGURED_DEFAULT.items()}
            if data.get("image") is None:
                # With an image, the size comes from it: see resolve_size.
                defaults.update(width=512, height=512)
            data = {**defaults, **data}
            hires = data.get("hires")
            # Unset or 0 (A1111's hr_second_pass_steps=0): as many as the first pass.
            if isinstance(hires, dict) and (
                "steps" not in hires or (type(hires["steps"]) is int and hires["steps"] == 0)
            ):
                data["hires"] = {**hires, "steps": data["num_inference_steps"]}
            data = merge_lora_tags(_hires_prompt_untagged(_without_comments(data)))
        return data

    @model_validator(mode="after")
    def _fields_fit_the_task(self) -> GenerateRequest:
        """A field another task uses is an error, never silently ignored."""
        given = self.model_fields_set
        problems = []
        if self.image is None:
            problems += [
                f"{name}=None: must be a valid integer (null takes the size of an `image`, and there is none)"
                for name in ("width", "height")
                if getattr(self, name) is None
            ]
            needs_image = [name for name in IMAGE_FIELDS if not (name == "resize_mode" and self.controlnets)]
            problems += [f"{name}: needs an image (set `image`)" for name in needs_image if name in given]
            problems += [f"{name}: needs an image and a mask or outpaint" for name in MASK_FIELDS if name in given]
        else:
            if self.hires is not None:
                problems.append("hires: is for text-to-image; with an image, `strength` sets how much is repainted")
            if self.mask is not None and self.outpaint is not None:
                problems.append("mask: not with outpaint, whose new area is the mask")
            if self.outpaint is not None:
                problems += [
                    f"{name}: needs a mask; outpaint paints its new area"
                    for name in ("mask_invert", "mask_round")
                    if name in given
                ]
            if self.mask is None and self.outpaint is None:
                problems += [f"{name}: needs a mask or outpaint" for name in MASK_FIELDS if name in given]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _model_allowed(self, info: ValidationInfo) -> GenerateRequest:
        check_model(self.model, self.vae, request_limits(info))
        hires_model = self.hires.model if self.hires is not None else None
        if hires_model is not None and request_limits(info).models_dir is None:
            raise ValueError(
                f"hires.model={hires_model!r}: this worker serves its default model only: MODELS_DIR is not set"
            )
        if hires_model is not None and self.loras:
            raise ValueError(
                f"hires.model={hires_model!r}: not with loras: a job's LoRAs apply to its model for both passes; "
                "leave out hires.model or the loras"
            )
        return self

    @model_validator(mode="after")
    def _loras_allowed(self, info: ValidationInfo) -> GenerateRequest:
        check_loras(self.loras, request_limits(info))
        return self

    @model_validator(mode="after")
    def _controlnets_allowed(self, info: ValidationInfo) -> GenerateRequest:
        check_controlnets(self.controlnets, request_limits(info))
        if self.image is None:
            for index, unit in enumerate(self.controlnets):
                if unit.image is None:
                    raise ValueError(
                        f"controlnets.{index}.image: a text-to-image unit needs its control image (an img2img, "
                        "inpaint or outpaint unit without one takes the job's image)"
                    )
        if self.controlnets and self.deepcache_interval > 1:
            raise ValueError(
                f"deepcache_interval={self.deepcache_interval}: not with controlnets, whose residuals enter the "
                "UNet's deep blocks at every step; leave it at 1"
            )
        return self

    @model_validator(mode="after")
    def _within_limits(self, info: ValidationInfo) -> GenerateRequest:
        if self.outpaint is not None:
            check_outpaint_margins(self.outpaint, request_limits(info))
        if self.width is not None and self.height is not None:
            check_size(self, self.width, self.height, request_limits(info))
        return self

    @property
    def prompt_text(self) -> str:
        """The prompt as it is encoded: its ``<lora:...>`` tags, which ``loras`` holds, removed."""
        return without_lora_tags(self.prompt)

    @property
    def task(self) -> Task:
        """What the job does: txt2img, img2img, inpaint or outpaint."""
        if self.image is None:
            return "txt2img"
        if self.mask is not None:
            return "inpaint"
        return "outpaint" if self.outpaint is not None else "img2img"

    @property
    def size(self) -> tuple[int, int]:
        """width x height, once resolved (with an image: by resolve_size)."""
        if self.width is None or self.height is None:
            raise RuntimeError("the size of an image job is known once its image is read: use resolve_size()")
        return self.width, self.height

    @property
    def output_size(self) -> tuple[int, int]:
        """The size of the images the job returns: the hires pass's size, or width x height."""
        width, height = self.size
        if self.hires is None:
            return width, height
        return int(width * self.hires.scale), int(height * self.hires.scale)

    @property
    def denoising_steps(self) -> int:
        """Steps of the first pass as the pipeline runs them.

        With an image, A1111's img2img count (its ``setup_img2img_steps`` and ``sample_img2img``): the last
        int(steps x min(strength, 0.999)) + 1 of the ``num_inference_steps``-step schedule.
        """
        if self.image is None:
            return self.num_inference_steps
        return int(self.num_inference_steps * min(self.strength, STRENGTH_CAP)) + 1

    def task_fields(self) -> dict[str, Any]:
        """The task and the fields it used, for the metadata."""
        # The values themselves, not dumps: hires and outpaint pass into the metadata without a second validation.
        used = {name: getattr(self, name) for name in TASK_FIELDS[self.task]}
        return {"task": self.task, **{name: value for name, value in used.items() if value is not None}}

    @property
    def seeds(self) -> list[int]:
        """The seed of each image: seed + i, wrapped into 0..2^32-1 so each can be asked for alone; with a
        variation strength above 0, the seed itself for every image, as A1111 (its ``all_seeds``)."""
        assert self.seed is not None  # resolved by _resolve_seed
        step = 0 if self.subseed_strength > 0 else 1
        return [(self.seed + step * index) % (SEED_MAX + 1) for index in range(self.num_images)]

    @property
    def subseeds(self) -> list[int]:
        """The variation seed of each image: subseed + i, wrapped as the seeds are (A1111's ``all_subseeds``)."""
        assert self.subseed is not None  # resolved by _resolve_subseed
        return [(self.subseed + index) % (SEED_MAX + 1) for index in range(self.num_images)]


def shown(value: Any, limit: int = 60) -> str:
    """``value`` as it came in, abbreviated when long so an error stays readable, and any URL in it without its
    query or credentials (``without_secrets``): an error goes to the log and the response."""
    text = repr(without_secrets(value)) if isinstance(value, str) else without_secrets(repr(value))
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, str) else f"{len(text)} characters as text"
    return f"{text[: limit - 20]}... ({size})"


def _field_name(name: str, limit: int = 40) -> str:
    """A field name as it came in, abbreviated when long: unknown keys can be of any length."""
    if len(name) <= limit:
        return name
    return f"{name[: limit - 20]}... ({len(name)} characters)"


# The request's nested objects, by field, for naming their fields when one is unknown.
_NESTED_MODELS: Mapping[str, type[BaseModel]] = {
    "loras": LoraRequest,
    "controlnets": ControlNetUnit,
    "outpaint": Outpaint,
    "hires": Hires,
}


def _fields_note(parent: str, top: type[BaseModel]) -> str:
    """The fields of the request (a ``top``), or of its nested object ``parent``."""
    model = _NESTED_MODELS.get(parent)
    if model is None:
        return f"; the fields are: {', '.join(top.model_fields)}"
    return f"; the fields of {parent} are: {', '.join(model.model_fields)}"


def describe_errors(error: ValidationError, top: type[BaseModel] = GenerateRequest) -> str:
    """One line naming each bad field of a ``top`` request, the value received and the rule it broke.

    At most ``MAX_PROBLEMS_SHOWN`` problems are spelled out, and the line stays within
    ``MAX_ERROR_CHARS``: an input with thousands of unknown keys still gets a readable answer.
    The allowed fields are listed once, when a field is unknown.
    """
    problems = []
    # Where unknown fields were found: the request itself ("") or one of its nested objects.
    unknown_in: list[str] = []
    for item in error.errors(include_url=False):
        field = _field_name(".".join(str(part) for part in item["loc"])) or "input"
        kind = item["type"]
        message = item["msg"].removeprefix("Value error, ")
        message = message.replace("Input should be", "must be").replace("String should have", "must have")
        if kind == "extra_forbidden":
            parent = str(item["loc"][0]) if len(item["loc"]) > 1 else ""
            if parent not in unknown_in:
                unknown_in.append(parent)
            message = "unknown field"
        if kind == "missing":
            problems.append(f"{field}: required")
        elif field == "input":
            problems.append(message)
        else:
            problems.append(f"{field}={shown(item['input'])}: {message}")
    fields_note = "".join(_fields_note(parent, top) for parent in unknown_in)
    return joined_problems(problems, fields_note)


def joined_problems(problems: list[str], note: str = "") -> str:
    """An input error of one line: the first ``MAX_PROBLEMS_SHOWN`` ``problems``, within ``MAX_ERROR_CHARS`` with
    the ``note`` that ends it."""
    # Room for "; ... and 99999 more problems" as well.
    budget = MAX_ERROR_CHARS - len(INVALID_INPUT) - len(note) - 40
    shown_problems: list[str] = []
    for problem in problems[:MAX_PROBLEMS_SHOWN]:
        budget -= len(problem) + 2
        if budget < 0 and shown_problems:
            break
        shown_problems.append(problem)
    if len(problems) > len(shown_problems):
        shown_problems.append(f"... and {len(problems) - len(shown_problems)} more problems")
    return INVALID_INPUT + "; ".join(shown_problems) + note


class DescribeRequest(BaseModel):
    """A job that asks what the worker has, ``{"describe": true}``: answered without the GPU."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    describe: Literal[True] = Field(
        description="`true`: the answer lists the worker's models, VAEs, LoRAs, ControlNets, embeddings, "
        "schedulers, hires upscalers, limits and memory profile, and no image is made. No other field."
    )


def parse_describe(job: Any) -> DescribeRequest | None:
    """The job as a ``DescribeRequest`` when its input names ``describe``; None for any other job.

    Raises:
        InputError: ``describe`` is not ``true``, or comes with other fields.
    """
    data = job.get("input") if isinstance(job, dict) else None
    if not isinstance(data, dict) or "describe" not in data:
        return None
    if data["describe"] is not True:
        raise InputError(f"invalid input: describe={shown(data['describe'])}: must be true")
    if others := sorted(str(name) for name in data if name != "describe"):
        raise InputError(f"invalid input: describe: a describe job takes no other field; got {', '.join(others)}")
    return DescribeRequest.model_validate(data)


def parse_input(job: Any, limits: RequestLimits) -> GenerateRequest:
    """Validate a RunPod job's ``input`` into a ``GenerateRequest``.

    Raises:
        InputError: the job or its input breaks the contract; the message says where.
    """
    if not isinstance(job, dict):
        raise InputError(f"job: must be an object with an 'input' field, got {type(job).__name__}")
    if "input" not in job:
        raise InputError("input: required; the job must carry an 'input' object with at least a 'prompt'")
    data = job["input"]
    if not isinstance(data, dict):
        raise InputError(
            f"input={shown(data)}: must be an object of generation parameters "
            f'such as {{"prompt": "a fox"}}, got {type(data).__name__ if data is not None else "null"}'
        )
    if "task" in data:  # an upscale job is parsed by parse_upscale; a generation's task follows from its fields
        raise InputError(
            f"invalid input: task={shown(data['task'])}: must be 'upscale', the one task named; text-to-image, "
            "img2img, inpaint and outpaint follow from the fields (image, mask, outpaint): leave task out"
        )
    try:
        return GenerateRequest.model_validate(data, context={"limits": limits})
    except ValidationError as error:
        raise InputError(describe_errors(error)) from None
