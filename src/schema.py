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

# AUTOMATIC1111's sampler names; src/schedulers.py maps each to diffusers.
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
    def bucket_configured(self) -> bool: ...


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
CONFIGURED_DEFAULT = {"num_inference_steps": "default_steps", "scheduler": "default_scheduler"}


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
    width: StrictInt = Field(
        512,
        ge=SIDE_STEP,
        multiple_of=SIDE_STEP,
        description=f"Pixels. A multiple of {SIDE_STEP}, from {SIDE_STEP} to `MAX_SIDE`.",
    )
    height: StrictInt = Field(
        512,
        ge=SIDE_STEP,
        multiple_of=SIDE_STEP,
        description=f"Pixels. A multiple of {SIDE_STEP}, from {SIDE_STEP} to `MAX_SIDE`.",
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

    @model_validator(mode="before")
    @classmethod
    def _configured_defaults(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict):
            limits = _limits(info)
            defaults = {name: getattr(limits, setting) for name, setting in CONFIGURED_DEFAULT.items()}
            data = {**defaults, **data}
        return data

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
    def _within_configured_maximum(cls, value: int, info: ValidationInfo) -> int:
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

    @model_validator(mode="after")
    def _within_max_pixels(self, info: ValidationInfo) -> GenerateRequest:
        max_pixels = _limits(info).max_pixels
        pixels = self.width * self.height * self.num_images
        if pixels > max_pixels:
            raise ValueError(
                f"width x height x num_images = {self.width} x {self.height} x {self.num_images} "
                f"= {pixels} pixels: must be at most {max_pixels} (MAX_PIXELS); "
                "ask for fewer or smaller images"
            )
        return self

    @property
    def seeds(self) -> list[int]:
        """The seed of each image: seed + i, wrapped into 0..2^32-1 so each can be asked for alone."""
        assert self.seed is not None  # resolved by _resolve_seed
        return [(self.seed + index) % (SEED_MAX + 1) for index in range(self.num_images)]


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


def describe_errors(error: ValidationError) -> str:
    """One line naming each bad field, the value received and the rule it broke.

    At most ``MAX_PROBLEMS_SHOWN`` problems are spelled out, and the line stays within
    ``MAX_ERROR_CHARS``: an input with thousands of unknown keys still gets a readable answer.
    The allowed fields are listed once, when a field is unknown.
    """
    problems = []
    unknown_field = False
    for item in error.errors(include_url=False):
        field = _field_name(".".join(str(part) for part in item["loc"])) or "input"
        kind = item["type"]
        message = item["msg"].removeprefix("Value error, ")
        message = message.replace("Input should be", "must be").replace("String should have", "must have")
        if kind == "extra_forbidden":
            unknown_field = True
            message = "unknown field"
        if kind == "missing":
            problems.append(f"{field}: required")
        elif field == "input":
            problems.append(message)
        else:
            problems.append(f"{field}={_shown(item['input'])}: {message}")
    fields_note = f"; the fields are: {', '.join(GenerateRequest.model_fields)}" if unknown_field else ""
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

    queue: float = Field(description="Waiting for the GPU while other jobs held it (with `CONCURRENCY` above 1).")
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


class Metadata(BaseModel):
    """What was generated and how; enough to reproduce every image."""

    prompt: str = Field(description="The prompt, as given.")
    negative_prompt: str = Field(description="The negative prompt, as given.")
    width: int = Field(description="Image width in pixels.")
    height: int = Field(description="Image height in pixels.")
    num_inference_steps: int = Field(description="Denoising steps run.")
    guidance_scale: float = Field(description="Classifier-free guidance used.")
    scheduler: str = Field(description="The canonical name of the scheduler used.")
    seeds: list[int] = Field(description="The seed of each image, in order.")
    model: str = Field(description="`MODEL_ID`, with `@MODEL_REVISION` when one is set.")
    device: str = Field(description="`cuda` or `cpu`.")
    dtype: str = Field(description="The torch dtype the model ran in, such as `float16`.")
    memory_profile: str = Field(description="`high`, `balanced`, `low`, `minimal` or `cpu`; see Memory.")
    output_format: str = Field(description="`png`, `jpeg` or `webp`.")
    timings_ms: Timings = Field(description="Milliseconds per stage; see below.")
    version: str = Field(description="The worker's version.")
    warnings: list[str] = Field(
        default_factory=list,
        description="What the user should know about this result, such as a prompt longer than CLIP reads.",
    )


class GenerateResponse(BaseModel):
    """A successful job's output."""

    images: list[InlineImage | UploadedImage] = Field(
        description="One entry per image, in seed order: inline, or uploaded (or inline after a failed upload)."
    )
    metadata: Metadata
