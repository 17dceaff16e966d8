"""The wire contract: the request model, the response models, and their errors.

``GenerateRequest`` is the only place where a job's input is checked and where
its defaults are set. Limits that operators configure (``MAX_SIDE``,
``MAX_STEPS``, ...) reach the model through pydantic's validation context, as
any object with the attributes of ``RequestLimits`` (the worker passes its
``Settings``), so that this module imports nothing of the worker's own.
"""

from __future__ import annotations

import difflib
import re
import secrets
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Protocol

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

MAX_PROMPT_CHARS = 2000
SEED_MAX = 2**32 - 1
SIDE_STEP = 64
GUIDANCE_MAX = 30.0
# An input error names at most this many problems (one per request field), in at most this many characters.
MAX_PROBLEMS_SHOWN = 12
MAX_ERROR_CHARS = 2048
_INVALID = "invalid input: "

# AUTOMATIC1111's sampler names; src/models/schedulers.py maps each to diffusers.
SCHEDULER_NAMES: tuple[str, ...] = (
    "DPM++ 2M",
    "DPM++ 2M Karras",
    "DPM++ 2M SDE",
    "DPM++ 2M SDE Karras",
    "DPM2",
    "DPM2 a",
    "Euler",
    "Euler a",
    "Heun",
    "LMS",
    "LMS Karras",
    "DDIM",
    "PNDM",
    "UniPC",
    "LCM",
)
# Other spellings of each: A1111's k-diffusion names and ComfyUI's sampler_name values, alone
# or joined to ComfyUI's scheduler "karras". Case, spaces, underscores, hyphens, colons and
# brackets do not matter (see _name_key), so "dpmpp_2m karras" and "DPM++ 2M (Karras)" need no entry.
SCHEDULER_ALIASES: Mapping[str, str] = {
    "k_euler_a": "Euler a",
    "euler_ancestral": "Euler a",
    "k_euler_ancestral": "Euler a",
    "k_euler": "Euler",
    "k_heun": "Heun",
    "dpm_2": "DPM2",
    "k_dpm_2": "DPM2",
    "dpm_2_a": "DPM2 a",
    "k_dpm_2_a": "DPM2 a",
    "dpm_2_ancestral": "DPM2 a",
    "k_dpm_2_ancestral": "DPM2 a",
    "k_lms": "LMS",
    "k_lms_karras": "LMS Karras",
    "k_lms_ka": "LMS Karras",
    "dpmpp_2m": "DPM++ 2M",
    "k_dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "k_dpmpp_2m_karras": "DPM++ 2M Karras",
    "k_dpmpp_2m_ka": "DPM++ 2M Karras",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "k_dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras",
    "k_dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras",
    "k_dpmpp_2m_sde_ka": "DPM++ 2M SDE Karras",
    "plms": "PNDM",
    "uni_pc": "UniPC",
    "uni_pc_bh2": "UniPC",
}
# How an input image meets width x height, as AUTOMATIC1111's resize modes 0, 1 and 2.
RESIZE_MODES: tuple[str, ...] = ("resize", "crop", "fill")
RESIZE_MODE_ALIASES: Mapping[str, str] = {
    "0": "resize",
    "1": "crop",
    "2": "fill",
    "just resize": "resize",
    "stretch": "resize",
    "crop and resize": "crop",
    "resize and fill": "fill",
}
STRENGTH_DEFAULT = 0.75
HIRES_STRENGTH_DEFAULT = 0.5
HIRES_SCALE_MAX = 2.0
# A1111's setup_img2img_steps divides by the strength capped at this, so a strength of 1 still stretches a little.
HIRES_STRENGTH_CAP = 0.999
# The hires pass's stretched schedule may not pass SD 1.5's training timesteps (diffusers' schedulers refuse it).
HIRES_SCHEDULE_MAX = 1000
MASK_BLUR_MAX = 64
INPAINT_PADDING_MAX = 256
# The size a job runs at is a multiple of this; hires' second pass only needs the latent grid's 8.
HIRES_SIDE_STEP = 8
Task = Literal["txt2img", "img2img", "inpaint", "outpaint"]
LORA_SCALE_LIMIT = 4.0
# A1111's extra-network tags, as its re_extra_net reads them: <lora:name> or <lora:name:scale>.
EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")
# The tag kinds that name a LoRA: A1111 reads <lyco:...> as <lora:...>.
LORA_TAG_KINDS = ("lora", "lyco")
OUTPUT_FORMATS: tuple[str, ...] = ("png", "jpeg", "webp")
OUTPUT_FORMAT_ALIASES: Mapping[str, str] = {"jpg": "jpeg", "jpe": "jpeg"}
_SEPARATORS = re.compile(r"[\s_:()-]+")


def _name_key(name: str) -> str:
    # Separators fold to one space, never to nothing, so "DPM2 a" and "DPM2" stay apart.
    return _SEPARATORS.sub(" ", name.casefold()).strip()


def _names_by_key(canonical: Iterable[str], aliases: Mapping[str, str]) -> dict[str, str]:
    names = {_name_key(alias): target for alias, target in aliases.items()}
    names.update({_name_key(name): name for name in canonical})
    return names


_SCHEDULERS_BY_KEY = _names_by_key(SCHEDULER_NAMES, SCHEDULER_ALIASES)
_FORMATS_BY_KEY = _names_by_key(OUTPUT_FORMATS, OUTPUT_FORMAT_ALIASES)
_RESIZE_MODES_BY_KEY = _names_by_key(RESIZE_MODES, RESIZE_MODE_ALIASES)


class InputError(ValueError):
    """A job's input breaks the contract. The message names every bad field."""


class RequestLimits(Protocol):
    """What the request model needs from the worker's configuration (read-only)."""

    @property
    def max_side(self) -> int: ...
    @property
    def max_steps(self) -> int: ...
    @property
    def max_images(self) -> int: ...
    @property
    def max_pixels(self) -> int: ...
    @property
    def default_steps(self) -> int: ...
    @property
    def default_scheduler(self) -> str: ...
    @property
    def default_clip_skip(self) -> int: ...
    @property
    def bucket_configured(self) -> bool: ...
    @property
    def lora_dir(self) -> str | None: ...
    @property
    def max_loras(self) -> int: ...
    @property
    def controlnet_dir(self) -> str | None: ...
    @property
    def max_controlnets(self) -> int: ...


def _canonical(name: str, names_by_key: Mapping[str, str], kind: str, listed: Iterable[str]) -> str:
    key = _name_key(name)
    if key in names_by_key:
        return names_by_key[key]
    close = difflib.get_close_matches(key, names_by_key, n=1)
    suggestion = f"did you mean {names_by_key[close[0]]!r}? " if close else ""
    raise ValueError(f"unknown {kind}; {suggestion}The {kind}s are: {', '.join(listed)}")


def canonical_scheduler(name: str) -> str:
    """The canonical (A1111) name of a scheduler given by that name or an alias, in any case.

    Raises:
        ValueError: the name is unknown; the message suggests the closest one and lists them all.
    """
    return _canonical(name, _SCHEDULERS_BY_KEY, "scheduler", SCHEDULER_NAMES)


def canonical_output_format(name: str) -> str:
    """``png``, ``jpeg`` or ``webp`` for that name or an alias such as ``jpg``, in any case.

    Raises:
        ValueError: the name is unknown; the message suggests the closest one and lists them all.
    """
    return _canonical(name, _FORMATS_BY_KEY, "output format", OUTPUT_FORMATS)


def check_limits(limits: RequestLimits) -> None:
    """Check the configured defaults against the contract, at startup.

    Raises:
        ValueError: naming the setting, its value and the rule.
    """
    try:
        canonical_scheduler(limits.default_scheduler)
    except ValueError as error:
        raise ValueError(f"DEFAULT_SCHEDULER={limits.default_scheduler!r}: {error}") from None


def _limits(info: ValidationInfo) -> RequestLimits:
    limits = (info.context or {}).get("limits")
    if limits is None:
        raise RuntimeError("GenerateRequest needs context={'limits': ...}; use parse_input()")
    return limits


# Fields whose upper bound or default is configured, and the setting that holds it.
CONFIGURED_MAXIMUM = {
    "width": "max_side",
    "height": "max_side",
    "num_inference_steps": "max_steps",
    "num_images": "max_images",
}
CONFIGURED_DEFAULT = {
    "num_inference_steps": "default_steps",
    "scheduler": "default_scheduler",
    "clip_skip": "default_clip_skip",
}
CLIP_SKIP_MAX = 12


def canonical_resize_mode(value: Any) -> Any:
    """``resize``, ``crop`` or ``fill`` for that name, A1111's number (0, 1, 2) or A1111's label, in any case.

    Raises:
        ValueError: the name is unknown; the message suggests the closest one and lists them all.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return value  # pydantic refuses it with its own message
    return _canonical(str(value), _RESIZE_MODES_BY_KEY, "resize mode", RESIZE_MODES)


class Outpaint(BaseModel):
    """Pixels added on each side of the input image; the new area is painted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    left: StrictInt = Field(0, ge=0, multiple_of=SIDE_STEP, description=f"Pixels, a multiple of {SIDE_STEP}.")
    right: StrictInt = Field(0, ge=0, multiple_of=SIDE_STEP, description=f"Pixels, a multiple of {SIDE_STEP}.")
    top: StrictInt = Field(0, ge=0, multiple_of=SIDE_STEP, description=f"Pixels, a multiple of {SIDE_STEP}.")
    bottom: StrictInt = Field(0, ge=0, multiple_of=SIDE_STEP, description=f"Pixels, a multiple of {SIDE_STEP}.")

    @model_validator(mode="after")
    def _grows(self) -> Outpaint:
        if not (self.left or self.right or self.top or self.bottom):
            raise ValueError("must add pixels on at least one side: left, right, top or bottom")
        return self

    @property
    def added(self) -> tuple[int, int]:
        """Pixels added to the width and to the height."""
        return self.left + self.right, self.top + self.bottom


class Hires(BaseModel):
    """A1111's hires fix: a second, img2img pass at a larger size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scale: float = Field(
        2.0,
        strict=True,
        ge=1.0,
        le=HIRES_SCALE_MAX,
        allow_inf_nan=False,
        description=f"1.0 to {HIRES_SCALE_MAX:g}: the second pass runs at width x scale by height x scale, "
        f"which must be multiples of {HIRES_SIDE_STEP} within `MAX_SIDE` and `MAX_PIXELS`.",
    )
    steps: StrictInt = Field(
        ge=1,
        description="Steps the second pass runs, exactly, as A1111's Hires steps: 1 to `MAX_STEPS`; 0 is "
        "`num_inference_steps`, as in A1111. The schedule is stretched to int(steps / strength) steps "
        f"(strength at most 0.999; at most {HIRES_SCHEDULE_MAX}) and the pass runs its last `steps`.",
        json_schema_extra={"shown_default": "`num_inference_steps`"},
    )
    strength: float = Field(
        HIRES_STRENGTH_DEFAULT,
        strict=True,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description=f"Denoising strength of the second pass, above 0 and at most 1; default {HIRES_STRENGTH_DEFAULT}.",
    )
    upscaler: Literal["latent", "lanczos"] = Field(
        "latent",
        description="`latent`: the latents are enlarged (A1111's Latent). "
        "`lanczos`: the image is decoded, enlarged with Lanczos and encoded again.",
    )

    @field_validator("upscaler", mode="before")
    @classmethod
    def _case_insensitive(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("steps")
    @classmethod
    def _within_max_steps(cls, value: int, info: ValidationInfo) -> int:
        maximum = _limits(info).max_steps
        if value > maximum:
            raise ValueError(f"must be at most {maximum} (MAX_STEPS)")
        return value

    @model_validator(mode="after")
    def _schedule_within_the_timesteps(self) -> Hires:
        if self.schedule_steps > HIRES_SCHEDULE_MAX:
            raise ValueError(
                f"steps / strength = {self.steps} / {self.strength:g} stretches the second pass's schedule to "
                f"{self.schedule_steps} steps: at most {HIRES_SCHEDULE_MAX}, the model's training timesteps; "
                "lower steps or raise strength"
            )
        return self

    @property
    def schedule_steps(self) -> int:
        """The steps of the stretched schedule whose last ``steps`` the pass runs: A1111's setup_img2img_steps."""
        return int(self.steps / min(self.strength, HIRES_STRENGTH_CAP))


class LoraRequest(BaseModel):
    """One LoRA for the job: a file of LORA_DIR by name, and its scale."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: StrictStr = Field(
        min_length=1,
        max_length=255,
        description="A LoRA's name: its file name in `LORA_DIR` without `.safetensors` (`sub/name` in a subfolder).",
    )
    scale: float = Field(
        1.0,
        strict=True,
        ge=-LORA_SCALE_LIMIT,
        le=LORA_SCALE_LIMIT,
        allow_inf_nan=False,
        description=f"A finite number from {-LORA_SCALE_LIMIT:g} to {LORA_SCALE_LIMIT:g}; 0 leaves the model as it is.",
    )

    @field_validator("name")
    @classmethod
    def _a_name_not_a_path(cls, value: str) -> str:
        parts = value.split("/")
        if "://" in value or "\\" in value or any(part in ("", ".", "..") for part in parts):
            raise ValueError(
                "must be a LoRA's name: its file name in LORA_DIR without .safetensors (sub/name in a subfolder), "
                "not a path or a URL"
            )
        return value


CONTROL_MODES: tuple[str, ...] = ("balanced", "prompt", "controlnet")
# A1111's labels and numbers for its control modes.
CONTROL_MODE_ALIASES: Mapping[str, str] = {
    "0": "balanced",
    "1": "prompt",
    "2": "controlnet",
    "my prompt is more important": "prompt",
    "controlnet is more important": "controlnet",
}
CONTROL_MODE_LABELS: Mapping[str, str] = {
    "balanced": "Balanced",
    "prompt": "My prompt is more important",
    "controlnet": "ControlNet is more important",
}
_CONTROL_MODES_BY_KEY = _names_by_key(CONTROL_MODES, CONTROL_MODE_ALIASES)
CONTROLNET_SCALE_MAX = 2.0


class ControlNetUnit(BaseModel):
    """One ControlNet unit: a model of CONTROLNET_DIR, its control image, and how strongly and when it acts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: StrictStr = Field(
        min_length=1,
        max_length=255,
        description="A ControlNet's name: its folder or file name in `CONTROLNET_DIR`, without `.safetensors`.",
    )
    image: StrictStr = Field(
        min_length=1,
        description="The control image, in every form `image` takes (base64, data URI, URL, `s3://`), with the same "
        "limits; brought to the job's size by `resize_mode`.",
    )
    preprocess: Literal["none", "canny"] = Field(
        "none",
        description="`none`: the image is already a control map. `canny`: OpenCV's Canny edges of the image, with "
        "the thresholds `low` and `high`.",
    )
    low: StrictInt | None = Field(None, ge=0, le=255, description="Canny's low threshold, 0 to 255; default 100.")
    high: StrictInt | None = Field(None, ge=0, le=255, description="Canny's high threshold, 0 to 255; default 200.")
    scale: float = Field(
        1.0,
        strict=True,
        ge=0.0,
        le=CONTROLNET_SCALE_MAX,
        allow_inf_nan=False,
        description=f"How strongly it guides (A1111's weight), 0 to {CONTROLNET_SCALE_MAX:g}.",
    )
    start: float = Field(
        0.0,
        strict=True,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="The fraction of the steps where it starts acting (A1111's guidance start), 0 to 1.",
    )
    end: float = Field(
        1.0,
        strict=True,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="The fraction of the steps where it stops (A1111's guidance end), 0 to 1, above `start`.",
    )
    control_mode: Literal["balanced", "prompt", "controlnet"] = Field(
        "balanced",
        description='`balanced`; `prompt` (A1111\'s "My prompt is more important": the control fades towards the '
        "UNet's outer layers); `controlnet` (\"ControlNet is more important\": the same, on the prompt's side of "
        "guidance only, as diffusers' guess mode). A1111's labels and 0, 1, 2 are accepted.",
    )

    @field_validator("model")
    @classmethod
    def _a_name_not_a_path(cls, value: str) -> str:
        if "://" in value or "/" in value or "\\" in value or value in (".", "..") or value.startswith("."):
            raise ValueError("must be a ControlNet's name in CONTROLNET_DIR (folder or file name), not a path or a URL")
        return value

    @field_validator("preprocess", mode="before")
    @classmethod
    def _preprocess_case(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("control_mode", mode="before")
    @classmethod
    def _known_control_mode(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return value
        return _canonical(str(value), _CONTROL_MODES_BY_KEY, "control mode", CONTROL_MODES)

    @model_validator(mode="after")
    def _consistent(self) -> ControlNetUnit:
        problems = []
        if self.start >= self.end:
            problems.append(f"start={self.start:g}, end={self.end:g}: start must be below end")
        if self.preprocess != "canny":
            given = [name for name in ("low", "high") if getattr(self, name) is not None]
            problems += [f"{name}: only with preprocess 'canny'" for name in given]
        elif self.canny_thresholds[0] > self.canny_thresholds[1]:
            low, high = self.canny_thresholds
            problems.append(f"low={low}, high={high}: low must not be above high")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def canny_thresholds(self) -> tuple[int, int]:
        """Canny's (low, high), with their defaults, 100 and 200."""
        return (100 if self.low is None else self.low, 200 if self.high is None else self.high)


def lora_tags(text: str) -> list[tuple[str, str]]:
    """A1111's extra-network tags in ``text``: (kind, arguments) for each ``<kind:arguments>``."""
    return [(match.group(1), match.group(2)) for match in EXTRA_NETWORK_TAG.finditer(text)]


def without_lora_tags(text: str) -> str:
    """``text`` with its ``<lora:...>`` tags removed, as A1111 removes them before encoding."""
    return EXTRA_NETWORK_TAG.sub(lambda match: "" if match.group(1).lower() in LORA_TAG_KINDS else match.group(0), text)


def _loras_from_tags(prompt: str) -> list[dict[str, Any]]:
    """The LoRAs the prompt's ``<lora:name:scale>`` tags ask for.

    Raises:
        ValueError: a tag that is not a LoRA tag, or whose scale is not a number within the bounds.
    """
    found = []
    for kind, arguments in lora_tags(prompt):
        tag = f"<{kind}:{arguments}>"
        if kind.lower() not in LORA_TAG_KINDS:
            raise ValueError(
                f"prompt: {tag}: only <lora:name> and <lora:name:scale> tags are read; <{kind}:...> is not"
            )
        name, *rest = arguments.split(":")
        if len(rest) > 1:
            raise ValueError(
                f"prompt: {tag}: a LoRA tag takes a name and at most one scale, <lora:name:scale>; "
                "separate text-encoder and UNet scales are not supported"
            )
        scale = 1.0
        if rest:
            try:
                scale = float(rest[0])
            except ValueError:
                scale = float("nan")
            if not -LORA_SCALE_LIMIT <= scale <= LORA_SCALE_LIMIT:
                raise ValueError(
                    f"prompt: {tag}: the scale {rest[0]!r} must be a finite number from "
                    f"{-LORA_SCALE_LIMIT:g} to {LORA_SCALE_LIMIT:g}"
                )
        found.append({"name": name.strip(), "scale": scale})
    return found


def _merge_lora_tags(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the prompt's ``<lora:...>`` tags added to ``loras``, after the ones listed there.

    Raises:
        ValueError: a bad tag, a tag in the negative prompt, or a LoRA named both ways.
    """
    negative = data.get("negative_prompt")
    if isinstance(negative, str) and any(kind.lower() in LORA_TAG_KINDS for kind, _ in lora_tags(negative)):
        raise ValueError("negative_prompt: <lora:...> tags are read only in prompt; a LoRA applies to the whole job")
    prompt = data.get("prompt")
    if not isinstance(prompt, str):
        return data
    tagged = _loras_from_tags(prompt)
    if not tagged:
        return data
    listed = data.get("loras") or []
    if not isinstance(listed, list):
        return data  # pydantic refuses it with its own message
    listed_names = {item.get("name") for item in listed if isinstance(item, dict)}
    for item in tagged:
        if item["name"] in listed_names:
            raise ValueError(
                f"loras: {item['name']!r} is named in loras and as a <lora:{item['name']}> tag in prompt; name it once"
            )
    return {**data, "loras": [*listed, *tagged]}


# Fields that mean something only for some tasks; asking for one elsewhere is an error, never ignored.
IMAGE_FIELDS = ("mask", "strength", "resize_mode", "outpaint")
MASK_FIELDS = ("mask_blur", "inpaint_area", "inpaint_padding", "keep_unmasked")
# The fields each task reports in its metadata, beyond those every job has.
TASK_FIELDS: Mapping[str, tuple[str, ...]] = {
    "txt2img": ("hires",),
    "img2img": ("strength", "resize_mode"),
    "inpaint": ("strength", "resize_mode", *MASK_FIELDS),
    "outpaint": ("strength", "resize_mode", *MASK_FIELDS, "outpaint"),
}


class GenerateRequest(BaseModel):
    """One text-to-image job. Unknown fields are errors, so typos fail loudly.

    Each field's description is its rule as the README states it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: StrictStr = Field(
        max_length=MAX_PROMPT_CHARS,
        description=f"What to draw. Not blank; at most {MAX_PROMPT_CHARS} characters.",
    )
    negative_prompt: StrictStr = Field(
        "",
        max_length=MAX_PROMPT_CHARS,
        description=f"What to steer away from. At most {MAX_PROMPT_CHARS} characters.",
    )
    width: StrictInt | None = Field(
        None,
        ge=SIDE_STEP,
        multiple_of=SIDE_STEP,
        description=f"Pixels. A multiple of {SIDE_STEP}, from {SIDE_STEP} to `MAX_SIDE`. With an `image`: the size "
        f"of the result; unset, the image's, scaled to fit `MAX_SIDE` and `MAX_PIXELS` and rounded down to "
        f"multiples of {SIDE_STEP} (plus the `outpaint` margins); with only one of width and height, the other "
        "keeps the image's proportions.",
        json_schema_extra={"shown_default": "`512`; with an `image`, its size"},
    )
    height: StrictInt | None = Field(
        None,
        ge=SIDE_STEP,
        multiple_of=SIDE_STEP,
        description=f"Pixels. A multiple of {SIDE_STEP}, from {SIDE_STEP} to `MAX_SIDE`. With an `image`: as `width`.",
        json_schema_extra={"shown_default": "`512`; with an `image`, its size"},
    )
    num_inference_steps: StrictInt = Field(ge=1, description="Denoising steps, 1 to `MAX_STEPS`.")
    guidance_scale: float = Field(
        7.5,
        strict=True,
        ge=0.0,
        le=GUIDANCE_MAX,
        allow_inf_nan=False,
        description=f"A finite number from 0 to {GUIDANCE_MAX:g}. At 1 or less, guidance is off.",
    )
    seed: StrictInt | None = Field(
        None,
        validate_default=True,
        description=(
            f"0 to {SEED_MAX}; null or -1 picks a random 32-bit seed. "
            "Image i uses seed + i (mod 2^32), returned with each image."
        ),
    )
    num_images: StrictInt = Field(
        1,
        ge=1,
        description="1 to `MAX_IMAGES`, and width x height x num_images at most `MAX_PIXELS`.",
    )
    scheduler: StrictStr = Field(
        description=f"One of {', '.join(SCHEDULER_NAMES)}; case does not matter, and k-diffusion and ComfyUI "
        "names such as `euler_ancestral` or `dpmpp_2m_karras` are accepted too.",
    )
    clip_skip: StrictInt = Field(
        ge=1,
        le=CLIP_SKIP_MAX,
        description=f"1 to {CLIP_SKIP_MAX}, as A1111 counts: 1 reads CLIP's last layer, 2 the one before it "
        "(through the final layer norm), and so on.",
    )
    output_format: Literal["png", "jpeg", "webp"] = Field(
        "png",
        description="`png`, `jpeg` (`jpg` accepted) or `webp`; case does not matter. Each file carries its parameters.",
    )
    output_quality: StrictInt = Field(
        90, ge=1, le=100, description="1 to 100, for `jpeg` and `webp`; lower is smaller. PNG is lossless."
    )
    output_type: Literal["auto", "s3", "base64"] = Field(
        "auto",
        description="`base64`: inline. `s3`: upload, return URLs (needs `BUCKET_NAME`). "
        "`auto`: `s3` when a bucket is configured, else `base64`.",
    )
    image: StrictStr | None = Field(
        None,
        description="An input image: base64 (a `data:image/...;base64,` prefix is fine), an `https://` or "
        "`http://` URL, or `s3://BUCKET_NAME/key`. PNG, JPEG or WebP. With it the job is img2img, "
        "inpaint (with `mask`) or outpaint (with `outpaint`).",
    )
    mask: StrictStr | None = Field(
        None,
        description="Where to paint, in the forms `image` takes, the image's size: white repaints, "
        "black keeps, grey is partial. Needs `image`.",
    )
    strength: float = Field(
        STRENGTH_DEFAULT,
        strict=True,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="How much of the image is repainted (A1111's denoising strength), above 0 and at most 1. "
        "It runs int(num_inference_steps x strength) steps, at least 1. Needs `image`.",
    )
    resize_mode: Literal["resize", "crop", "fill"] = Field(
        "resize",
        description="How the image (and each ControlNet unit's image) meets width x height: `resize` stretches, "
        "`crop` fills and crops the centre, `fill` fits and pads with its stretched edges; A1111's 0, 1 and 2 are "
        "accepted. Needs `image` or `controlnets`.",
    )
    mask_blur: StrictInt = Field(
        4,
        ge=0,
        le=MASK_BLUR_MAX,
        description=f"Pixels of Gaussian blur on the mask's edge, 0 to {MASK_BLUR_MAX}. With `mask` or `outpaint`.",
    )
    inpaint_area: Literal["whole", "masked"] = Field(
        "whole",
        description="`whole` repaints at the image's size; `masked` repaints only the masked region, "
        'enlarged to width x height, and pastes it back (A1111\'s "only masked"). With `mask` or `outpaint`.',
    )
    inpaint_padding: StrictInt = Field(
        32,
        ge=0,
        le=INPAINT_PADDING_MAX,
        description=f"Pixels around the masked region with `inpaint_area` `masked`, 0 to {INPAINT_PADDING_MAX}.",
    )
    keep_unmasked: StrictBool = Field(
        True,
        description="Pixels outside the mask come back exactly as they were in the image (brought to the job's "
        "size). `false` returns what the model drew everywhere. With `mask` or `outpaint`.",
    )
    outpaint: Outpaint | None = Field(
        None,
        description="`{left, right, top, bottom}` pixels, multiples of 64, added around the image; "
        "the new area is painted. The grown canvas obeys `MAX_SIDE` and `MAX_PIXELS`, so left + right and "
        "top + bottom are each at most `MAX_SIDE` - 64. Needs `image`, not `mask`.",
    )
    hires: Hires | None = Field(
        None,
        description="Text-to-image in two passes, as A1111's hires fix: `{scale, steps, strength, upscaler}`; "
        "see below. Not with `image`.",
    )
    loras: list[LoraRequest] = Field(
        default_factory=list,
        description="LoRAs for this job, `[{name, scale}]`, at most `MAX_LORAS` with the prompt's "
        f"`<lora:name:scale>` tags, each name once; scale {-LORA_SCALE_LIMIT:g} to {LORA_SCALE_LIMIT:g}, default 1. "
        "Needs `LORA_DIR`; see LoRA.",
        json_schema_extra={"shown_default": "none"},
    )

    controlnets: list[ControlNetUnit] = Field(
        default_factory=list,
        description="ControlNet units for this job, at most `MAX_CONTROLNETS`: `[{model, image, preprocess, low, "
        "high, scale, start, end, control_mode}]`; see ControlNet. Every task takes them. Needs `CONTROLNET_DIR`.",
        json_schema_extra={"shown_default": "none"},
    )

    @model_validator(mode="before")
    @classmethod
    def _configured_defaults(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict):
            limits = _limits(info)
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
            data = _merge_lora_tags(data)
        return data

    @field_validator("resize_mode", mode="before")
    @classmethod
    def _known_resize_mode(cls, value: Any) -> Any:
        return canonical_resize_mode(value)

    @field_validator("inpaint_area", mode="before")
    @classmethod
    def _inpaint_area_case(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("output_format", mode="before")
    @classmethod
    def _known_output_format(cls, value: Any) -> Any:
        return canonical_output_format(value) if isinstance(value, str) else value

    @field_validator("output_type", mode="before")
    @classmethod
    def _case_insensitive(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("output_type")
    @classmethod
    def _s3_needs_a_bucket(cls, value: str, info: ValidationInfo) -> str:
        if value == "s3" and not _limits(info).bucket_configured:
            raise ValueError("needs a bucket, and none is configured: set BUCKET_NAME, or use 'base64'")
        return value

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator(*CONFIGURED_MAXIMUM)
    @classmethod
    def _within_configured_maximum(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None:  # null width or height: the image's size; _fields_fit_the_task refuses it without one
            return value
        setting = CONFIGURED_MAXIMUM[str(info.field_name)]
        maximum = getattr(_limits(info), setting)
        if value > maximum:
            raise ValueError(f"must be at most {maximum} ({setting.upper()})")
        return value

    @field_validator("seed")
    @classmethod
    def _resolve_seed(cls, value: int | None) -> int:
        # Drawn here, once, so that the seed in the response is the one that was used.
        if value is None or value == -1:
            return secrets.randbelow(SEED_MAX + 1)
        if not 0 <= value <= SEED_MAX:
            raise ValueError(f"must be 0 to {SEED_MAX}, or -1 or null for a random seed")
        return value

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        return canonical_scheduler(value)

    @field_validator("image", "mask")
    @classmethod
    def _not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty: give base64, a data: URI, an http(s):// URL or an s3:// URL")
        return value

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
            if self.mask is None and self.outpaint is None:
                problems += [f"{name}: needs a mask or outpaint" for name in MASK_FIELDS if name in given]
            if int(self.num_inference_steps * self.strength) < 1:
                problems.append(
                    f"num_inference_steps x strength = {self.num_inference_steps} x {self.strength:g} runs "
                    f"int({self.num_inference_steps * self.strength:g}) = 0 denoising steps: it must run at "
                    "least 1; raise num_inference_steps or strength"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _loras_allowed(self, info: ValidationInfo) -> GenerateRequest:
        if not self.loras:
            return self
        limits = _limits(info)
        if limits.lora_dir is None:
            raise ValueError("loras: LoRA is off on this worker: LORA_DIR is not set")
        if len(self.loras) > limits.max_loras:
            raise ValueError(
                f"loras: {len(self.loras)} LoRAs asked for, with the prompt's <lora:...> tags: "
                f"at most {limits.max_loras} (MAX_LORAS)"
            )
        seen: set[str] = set()
        for index, lora in enumerate(self.loras):
            if lora.name in seen:
                raise ValueError(f"loras.{index}.name={lora.name!r}: named twice; name each LoRA once")
            seen.add(lora.name)
        return self

    @model_validator(mode="after")
    def _controlnets_allowed(self, info: ValidationInfo) -> GenerateRequest:
        if not self.controlnets:
            return self
        limits = _limits(info)
        if limits.controlnet_dir is None:
            raise ValueError("controlnets: ControlNet is off on this worker: CONTROLNET_DIR is not set")
        if len(self.controlnets) > limits.max_controlnets:
            raise ValueError(
                f"controlnets: {len(self.controlnets)} units asked for: at most {limits.max_controlnets} "
                "(MAX_CONTROLNETS)"
            )
        return self

    @model_validator(mode="after")
    def _within_limits(self, info: ValidationInfo) -> GenerateRequest:
        if self.outpaint is not None:
            check_outpaint_margins(self.outpaint, _limits(info))
        if self.width is not None and self.height is not None:
            check_size(self, self.width, self.height, _limits(info))
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
        """Steps of the first pass as the pipeline runs them: img2img runs int(steps x strength)."""
        if self.image is None:
            return self.num_inference_steps
        return int(self.num_inference_steps * self.strength)

    def task_fields(self) -> dict[str, Any]:
        """The task and the fields it used, for the metadata."""
        # The values themselves, not dumps: hires and outpaint pass into the metadata without a second validation.
        used = {name: getattr(self, name) for name in TASK_FIELDS[self.task]}
        return {"task": self.task, **{name: value for name, value in used.items() if value is not None}}

    @property
    def seeds(self) -> list[int]:
        """The seed of each image: seed + i, wrapped into 0..2^32-1 so each can be asked for alone."""
        assert self.seed is not None  # resolved by _resolve_seed
        return [(self.seed + index) % (SEED_MAX + 1) for index in range(self.num_images)]


_MARGIN_NAMES = {"width": ("left", "right"), "height": ("top", "bottom")}


def _margins(outpaint: Outpaint, side: str) -> str:
    """The two margins that grow ``side``, as the request gave them: ``left=2048 + right=2048``."""
    return " + ".join(f"{name}={getattr(outpaint, name)}" for name in _MARGIN_NAMES[side])


def check_outpaint_margins(outpaint: Outpaint, limits: RequestLimits) -> None:
    """Check that the margins leave room for the image within MAX_SIDE, before any image is read.

    Raises:
        ValueError: naming ``outpaint``, the margins, the side they grow and MAX_SIDE.
    """
    for side, added in zip(("width", "height"), outpaint.added, strict=True):
        if added + SIDE_STEP > limits.max_side:
            raise ValueError(
                f"outpaint: {_margins(outpaint, side)} adds {added} pixels to the {side}; with at least "
                f"{SIDE_STEP} of image that is {added + SIDE_STEP}, over MAX_SIDE={limits.max_side}: "
                f"{' + '.join(_MARGIN_NAMES[side])} may add at most {limits.max_side - SIDE_STEP}"
            )


def check_size(request: GenerateRequest, width: int, height: int, limits: RequestLimits) -> None:
    """Check a job's size, its outpaint canvas and its hires pass against the limits.

    Raises:
        ValueError: naming the fields, the sizes and the rule.
    """
    max_pixels, max_side = limits.max_pixels, limits.max_side
    pixels = width * height * request.num_images
    if pixels > max_pixels:
        raise ValueError(
            f"width x height x num_images = {width} x {height} x {request.num_images} "
            f"= {pixels} pixels: must be at most {max_pixels} (MAX_PIXELS); "
            "ask for fewer or smaller images"
        )
    if request.outpaint is not None:
        added_width, added_height = request.outpaint.added
        if width - added_width < SIDE_STEP or height - added_height < SIDE_STEP:
            raise ValueError(
                f"outpaint: a {width}x{height} result with {added_width} and {added_height} pixels added leaves "
                f"{width - added_width}x{height - added_height} for the image: each side must be at least {SIDE_STEP}"
            )
    if request.hires is not None:
        target_width, target_height = int(width * request.hires.scale), int(height * request.hires.scale)
        target = f"{width}x{height} x {request.hires.scale:g} = {target_width}x{target_height}"
        if target_width % HIRES_SIDE_STEP or target_height % HIRES_SIDE_STEP:
            raise ValueError(f"hires.scale: {target}: both sides must be multiples of {HIRES_SIDE_STEP}")
        if max(target_width, target_height) > max_side:
            raise ValueError(f"hires.scale: {target}: each side must be at most {max_side} (MAX_SIDE)")
        target_pixels = target_width * target_height * request.num_images
        if target_pixels > max_pixels:
            raise ValueError(
                f"hires.scale: {target} x {request.num_images} images = {target_pixels} pixels: "
                f"must be at most {max_pixels} (MAX_PIXELS)"
            )


def _floor_to_side_step(value: float) -> int:
    return max(SIDE_STEP, int(value) // SIDE_STEP * SIDE_STEP)


def resolve_size(
    request: GenerateRequest, image_size: tuple[int, int], limits: RequestLimits
) -> tuple[GenerateRequest, list[str]]:
    """The request with its size settled from its input image, and a warning when the image is resized.

    Without ``width`` and ``height``, the image keeps its size, scaled down to fit ``MAX_SIDE``
    and ``MAX_PIXELS`` (with the outpaint margins and every image of the batch) and rounded
    down to multiples of 64; with one of them, the other follows the image's aspect ratio.

    Raises:
        InputError: the grown canvas or the hires pass breaks a limit.
    """
    image_width, image_height = image_size
    added_width, added_height = request.outpaint.added if request.outpaint is not None else (0, 0)
    warnings = []
    if request.width is not None and request.height is not None:
        width, height = request.width, request.height
    elif request.width is not None:
        width = request.width
        height = _floor_to_side_step((width - added_width) * image_height / image_width) + added_height
    elif request.height is not None:
        height = request.height
        width = _floor_to_side_step((height - added_height) * image_width / image_height) + added_width
    else:
        scale = min(
            1.0,
            (limits.max_side - added_width) / image_width,
            (limits.max_side - added_height) / image_height,
        )
        while True:
            part_width, part_height = (
                _floor_to_side_step(image_width * scale),
                _floor_to_side_step(image_height * scale),
            )
            width, height = part_width + added_width, part_height + added_height
            if width * height * request.num_images <= limits.max_pixels or part_width == part_height == SIDE_STEP:
                break
            scale *= 0.98
        if (part_width, part_height) != image_size:
            warnings.append(
                f"image: {image_width}x{image_height} was brought to {part_width}x{part_height}: without width and "
                f"height the job takes the image's size, fitted to MAX_SIDE={limits.max_side} and "
                f"MAX_PIXELS={limits.max_pixels} and rounded down to multiples of {SIDE_STEP}"
            )
    problems = []
    for name, value, added in (("width", width, added_width), ("height", height, added_height)):
        if value > limits.max_side:
            # The margins are named when they took the side there, so the user knows which field to change.
            grown = (
                f": {value - added} for the image plus outpaint {_margins(request.outpaint, name)}"
                if request.outpaint is not None and added
                else ""
            )
            problems.append(f"{name}={value}: must be at most {limits.max_side} (MAX_SIDE){grown}")
    if not problems:
        try:
            check_size(request, width, height, limits)
        except ValueError as error:
            problems.append(str(error))
    if problems:
        source = f"the image is {image_width}x{image_height}"
        raise InputError(f"{_INVALID}{'; '.join(problems)} ({source})")
    return request.model_copy(update={"width": width, "height": height}), warnings


def _shown(value: Any, limit: int = 60) -> str:
    """``value`` as it came in, abbreviated when long so an error stays readable."""
    text = repr(value)
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


def _fields_note(parent: str) -> str:
    """The fields of the request, or of its nested object ``parent``."""
    model = _NESTED_MODELS.get(parent)
    if model is None:
        return f"; the fields are: {', '.join(GenerateRequest.model_fields)}"
    return f"; the fields of {parent} are: {', '.join(model.model_fields)}"


def describe_errors(error: ValidationError) -> str:
    """One line naming each bad field, the value received and the rule it broke.

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
            problems.append(f"{field}={_shown(item['input'])}: {message}")
    fields_note = "".join(_fields_note(parent) for parent in unknown_in)
    # Room for "; ... and 99999 more problems" as well.
    budget = MAX_ERROR_CHARS - len(_INVALID) - len(fields_note) - 40
    shown: list[str] = []
    for problem in problems[:MAX_PROBLEMS_SHOWN]:
        budget -= len(problem) + 2
        if budget < 0 and shown:
            break
        shown.append(problem)
    if len(problems) > len(shown):
        shown.append(f"... and {len(problems) - len(shown)} more problems")
    return _INVALID + "; ".join(shown) + fields_note


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
            f"input={_shown(data)}: must be an object of generation parameters "
            f'such as {{"prompt": "a fox"}}, got {type(data).__name__ if data is not None else "null"}'
        )
    try:
        return GenerateRequest.model_validate(data, context={"limits": limits})
    except ValidationError as error:
        raise InputError(describe_errors(error)) from None


class Timings(BaseModel):
    """Milliseconds spent in each stage of the job."""

    inputs: float | None = Field(
        None, description="Reading the input images (download, decode, resize); present when the job had any."
    )
    queue: float = Field(
        description="Waiting for the GPU while other jobs held it: about 0 under runpod, which runs one job at "
        "a time; more when a caller runs `handler` from several threads."
    )
    inference: float = Field(
        description="Text encoding, denoising and VAE decoding, from the moment the job had the GPU."
    )
    encode: float = Field(description="Writing the image files.")
    upload: float | None = Field(None, description="Uploading to S3; present only when the job uploaded.")
    total: float = Field(description="The whole job, from input to response.")


class InlineImage(BaseModel):
    """One image returned inline."""

    image: str = Field(description="Base64 of the image file, with no `data:` prefix.")
    seed: int = Field(description="The seed that regenerates this image alone.")
    nsfw: bool | None = Field(
        None,
        description="Flagged by the safety checker; present only when `SAFETY_CHECKER` is on, "
        "for inline and uploaded images alike.",
    )


class UploadedImage(BaseModel):
    """One image uploaded to S3."""

    url: str = Field(description="Presigned GET URL, valid for `URL_EXPIRY_SECONDS`.")
    bucket: str = Field(description="The bucket it is in.")
    key: str = Field(
        description="Its key: `{BUCKET_PREFIX}{job id}/{index}-{seed}.{ext}`; a job without an id gets "
        "one random `job-...` folder for all its images."
    )
    seed: int = Field(description="The seed that regenerates this image alone.")
    format: str = Field(description="`png`, `jpeg` or `webp`.")
    nsfw: bool | None = Field(None, description="As for inline images.")


class PromptTokens(BaseModel):
    """How long one prompt was, as CLIP read it."""

    tokens: int = Field(description="Tokens of the prompt, its start and end tokens not counted.")
    chunks: int = Field(description="Chunks of 75 tokens it was encoded in, each read by CLIP alone.")


class AppliedLora(BaseModel):
    """A LoRA a job ran with."""

    name: str = Field(description="Its name in `LORA_DIR`.")
    scale: float = Field(description="The scale it ran at.")
    hash: str = Field(description="A1111's short hash of the file (its `Lora hashes` value).")


class AppliedControlNet(BaseModel):
    """A ControlNet unit a job ran with, as A1111 describes it."""

    model: str = Field(description="Its name in `CONTROLNET_DIR`.")
    module: str = Field(description="The preprocessor: `none` or `canny`.")
    weight: float = Field(description="Its scale.")
    guidance_start: float = Field(description="The fraction of the steps where it started acting.")
    guidance_end: float = Field(description="The fraction of the steps where it stopped.")
    control_mode: str = Field(description="`balanced`, `prompt` or `controlnet`.")
    resized: str | None = Field(
        None, description="How the control image was brought to the job's size, when that changed its proportions."
    )


class Metadata(BaseModel):
    """What was generated and how; enough to reproduce every image."""

    prompt: str = Field(description="The prompt, as given.")
    negative_prompt: str = Field(description="The negative prompt, as given.")
    task: Task = Field(description="`txt2img`, `img2img`, `inpaint` or `outpaint`.")
    width: int = Field(description="Width the job ran at; with `hires`, its first pass.")
    height: int = Field(description="Height the job ran at; with `hires`, its first pass.")
    num_inference_steps: int = Field(
        description="Steps asked for; img2img, inpaint and outpaint run int(steps x strength) of them."
    )
    guidance_scale: float = Field(description="Classifier-free guidance used.")
    scheduler: str = Field(description="The canonical name of the scheduler used.")
    clip_skip: int = Field(description="The CLIP layer read, counted from the last as A1111 counts it.")
    embeddings: dict[str, str] | None = Field(
        None,
        description="The textual-inversion embeddings the prompts named, each with A1111's short hash of its "
        "file; present when there were any.",
    )
    loras: list[AppliedLora] | None = Field(
        None,
        description="The LoRAs the job ran with: `name`, `scale` and A1111's short `hash` of each file; "
        "present when there were any.",
    )
    controlnets: list[AppliedControlNet] | None = Field(
        None, description="The ControlNet units the job ran with; present when there were any."
    )
    prompt_tokens: dict[str, PromptTokens] = Field(
        description="For `prompt` and `negative_prompt`: its tokens and the chunks of 75 they were encoded in."
    )
    seeds: list[int] = Field(description="The seed of each image, in order.")
    model: str = Field(
        description="A checkpoint's file name without its extension, as A1111's `Model`; otherwise `MODEL_ID`, "
        "with `@MODEL_REVISION` when one is set."
    )
    model_hash: str | None = Field(
        None, description="A checkpoint's A1111 `Model hash`: the first 10 hex digits of its file's SHA-256."
    )
    vae: str | None = Field(None, description="With `VAE_ID` or `VAE_URL`: the VAE's file or folder name.")
    vae_hash: str | None = Field(None, description="A VAE file's A1111 `VAE hash`, as `model_hash`.")
    device: str = Field(description="`cuda` or `cpu`.")
    dtype: str = Field(description="The torch dtype the model ran in, such as `float16`.")
    memory_profile: str = Field(description="`high`, `balanced`, `low`, `minimal` or `cpu`; see Memory.")
    output_format: str = Field(description="`png`, `jpeg` or `webp`.")
    source_width: int | None = Field(None, description="The input image's width, after EXIF rotation.")
    source_height: int | None = Field(None, description="The input image's height, after EXIF rotation.")
    strength: float | None = Field(None, description="With an image: the denoising strength used.")
    resize_mode: str | None = Field(None, description="With an image: how it met width x height.")
    mask_blur: int | None = Field(None, description="Inpaint and outpaint: the mask blur used.")
    inpaint_area: str | None = Field(None, description="Inpaint and outpaint: `whole` or `masked`.")
    inpaint_padding: int | None = Field(None, description="Inpaint and outpaint: the padding used.")
    keep_unmasked: bool | None = Field(None, description="Inpaint and outpaint: whether unmasked pixels were kept.")
    outpaint: Outpaint | None = Field(None, description="Outpaint: the pixels added on each side.")
    hires: Hires | None = Field(None, description="Hires fix: scale, steps, strength and upscaler, as run.")
    timings_ms: Timings = Field(description="Milliseconds per stage; see below.")
    version: str = Field(description="The worker's version.")
    warnings: list[str] = Field(
        default_factory=list,
        description="What the user should know about this result, such as an input image that was resized.",
    )


class GenerateResponse(BaseModel):
    """A successful job's output."""

    images: list[InlineImage | UploadedImage] = Field(
        description="One entry per image, in seed order: inline, or uploaded (or inline after a failed upload)."
    )
    metadata: Metadata
