"""The passes beyond a plain one: outpaint (the canvas grown around the image) and hires (a second, larger pass)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from src.schema.core import (
    EXTRA_NETWORK_TAG,
    LORA_TAG_KINDS,
    MAX_PROMPT_CHARS,
    SIDE_STEP,
    RequestLimits,
    canonical_scheduler,
    request_limits,
)
from src.schema.images import STRENGTH_CAP, ImageInputs

HIRES_STRENGTH_DEFAULT = 0.5
HIRES_SCALE_MAX = 2.0
# The hires pass's stretched schedule may not pass SD 1.5's training timesteps (diffusers' schedulers refuse it).
HIRES_SCHEDULE_MAX = 1000
# The size a job runs at is a multiple of this; hires' second pass only needs the latent grid's 8.
HIRES_SIDE_STEP = 8
# The hires upscalers that need no model file: A1111's "Latent" and "Lanczos".
HIRES_BUILT_IN = ("latent", "lanczos")
# A1111's other latent upscalers (its latent_upscale_modes), which enlarge the latents as ``latent`` does with
# another interpolation; A1111's own spellings ("Latent (nearest-exact)") are taken too.
LATENT_VARIANTS = (
    "latent-antialiased",
    "latent-bicubic",
    "latent-bicubic-antialiased",
    "latent-nearest",
    "latent-nearest-exact",
)
# A1111's names for the built-in hires upscalers, as its parameters and its latent-upscale-modes list them.
HIRES_UPSCALER_NAMES: Mapping[str, str] = {
    "latent": "Latent",
    "latent-antialiased": "Latent (antialiased)",
    "latent-bicubic": "Latent (bicubic)",
    "latent-bicubic-antialiased": "Latent (bicubic antialiased)",
    "latent-nearest": "Latent (nearest)",
    "latent-nearest-exact": "Latent (nearest-exact)",
    "lanczos": "Lanczos",
}


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


def built_in_in_any_case(value: Any, built_in: tuple[str, ...]) -> Any:
    """``value`` in lower case when it names one of the ``built_in`` upscalers in any case; else as it came."""
    if isinstance(value, str) and value.strip().lower() in built_in:
        return value.strip().lower()
    return value


def upscaler_name(value: str, built_in: tuple[str, ...], limits: RequestLimits) -> str:
    """``value`` when it is one of ``built_in`` or may name an upscaler of UPSCALER_DIR (whether it does is
    the catalog's to say).

    Raises:
        ValueError: there is no UPSCALER_DIR, or ``value`` is a path or a URL.
    """
    if value in built_in:
        return value
    names = f"{', '.join(built_in[:-1])} or {built_in[-1]}"
    if limits.upscaler_dir is None:
        raise ValueError(f"must be {names}: this worker has no other upscaler (UPSCALER_DIR is not set)")
    if "://" in value or "\\" in value or any(part in ("", ".", "..") for part in value.split("/")):
        raise ValueError(
            f"must be {names.replace(' or ', ', ')} or an upscaler's name in UPSCALER_DIR, not a path or a URL"
        )
    return value


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
    upscaler: StrictStr = Field(
        "latent",
        min_length=1,
        max_length=255,
        description="`latent`: the latents are enlarged, bilinear (A1111's Latent); A1111's other latent "
        "upscalers too: `latent-antialiased`, `latent-bicubic`, `latent-bicubic-antialiased`, `latent-nearest`, "
        "`latent-nearest-exact` (or A1111's names, such as `Latent (bicubic)`). `lanczos`: the image is decoded, "
        "enlarged with Lanczos and encoded again. Or an upscaler of `UPSCALER_DIR` by name (such as "
        "`RealESRGAN_x4plus`): the decoded image goes through it, is resized to the hires size and encoded again.",
    )

    model: StrictStr | None = Field(
        None,
        min_length=1,
        max_length=255,
        description="The second pass's model (A1111's `hr_checkpoint_name`): a model of `MODELS_DIR` by name, "
        "swapped in for that pass and given its prompts encoded by its own text encoder. Unset: the job's "
        "`model`. Not with `loras`.",
        json_schema_extra={"shown_default": "`model`"},
    )
    sampler: StrictStr | None = Field(
        None,
        description="The second pass's scheduler (A1111's `hr_sampler_name`), any name `scheduler` takes. "
        "Unset: `scheduler`.",
        json_schema_extra={"shown_default": "`scheduler`"},
    )
    prompt: StrictStr | None = Field(
        None,
        max_length=MAX_PROMPT_CHARS,
        description="The second pass's prompt (A1111's `hr_prompt`), with the same syntax as `prompt` but "
        "`<lora:...>` tags: the prompt's own may be repeated, all of them as they are (as clients that copy the "
        "prompt send them), and change nothing. Unset or empty: `prompt`.",
        json_schema_extra={"shown_default": "`prompt`"},
    )
    negative_prompt: StrictStr | None = Field(
        None,
        max_length=MAX_PROMPT_CHARS,
        description="The second pass's negative prompt (A1111's `hr_negative_prompt`). Unset or empty: "
        "`negative_prompt`.",
        json_schema_extra={"shown_default": "`negative_prompt`"},
    )

    @field_validator("upscaler", mode="before")
    @classmethod
    def _built_in_names_in_any_case(cls, value: Any) -> Any:
        if isinstance(value, str):  # A1111's "Latent (bicubic antialiased)" is latent-bicubic-antialiased
            variant = re.sub(r"\s*\(\s*(.*?)\s*\)\s*$", r"-\1", value.strip().lower()).replace(" ", "-")
            if variant in LATENT_VARIANTS:
                return variant
        return built_in_in_any_case(value, HIRES_BUILT_IN)

    @field_validator("upscaler")
    @classmethod
    def _a_name_not_a_path(cls, value: str, info: ValidationInfo) -> str:
        return value if value in LATENT_VARIANTS else upscaler_name(value, HIRES_BUILT_IN, request_limits(info))

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, value: str | None) -> str | None:
        return None if value is None else canonical_scheduler(value)

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _no_lora_tags(cls, value: str | None) -> str | None:
        if value is not None and any(kind.lower() in LORA_TAG_KINDS for kind, _ in EXTRA_NETWORK_TAG.findall(value)):
            raise ValueError(
                "<lora:...> tags are read only in prompt; a LoRA applies to the whole job (a hires prompt may "
                "repeat the prompt's tags, all of them, as they are)"
            )
        return value or None

    @field_validator("steps")
    @classmethod
    def _within_max_steps(cls, value: int, info: ValidationInfo) -> int:
        maximum = request_limits(info).max_steps
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
        return int(self.steps / min(self.strength, STRENGTH_CAP))


_MARGIN_NAMES = {"width": ("left", "right"), "height": ("top", "bottom")}


def describe_margins(outpaint: Outpaint, side: str) -> str:
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
                f"outpaint: {describe_margins(outpaint, side)} adds {added} pixels to the {side}; with at least "
                f"{SIDE_STEP} of image that is {added + SIDE_STEP}, over MAX_SIDE={limits.max_side}: "
                f"{' + '.join(_MARGIN_NAMES[side])} may add at most {limits.max_side - SIDE_STEP}"
            )


class PassOptions(ImageInputs):
    """The fields that add a pass: ``outpaint`` grows the image's canvas, ``hires`` enlarges a text-to-image job."""

    outpaint: Outpaint | None = Field(
        None,
        description="`{left, right, top, bottom}` pixels, multiples of 64, added around the image; "
        "the new area is painted. The grown canvas obeys `MAX_SIDE` and `MAX_PIXELS`, so left + right and "
        "top + bottom are each at most `MAX_SIDE` - 64. Needs `image`, not `mask`.",
    )
    hires: Hires | None = Field(
        None,
        description="Text-to-image in two passes, as A1111's hires fix: `{scale, steps, strength, upscaler, "
        "sampler, prompt, negative_prompt}`; see below. Not with `image`.",
    )
