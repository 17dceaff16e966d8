"""What every part of the request shares, and the request's core fields.

The limits the worker configures (``RequestLimits``, reached through pydantic's validation context), the
input error, the folding of names for closed sets (schedulers, output formats, and the resize and control
modes of the other modules), and ``RequestCore``: the prompt, size, steps, guidance, seed, scheduler and
output fields that every job has, which the other modules' field groups extend.
"""

from __future__ import annotations

import difflib
import re
import secrets
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal, Protocol

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

MAX_PROMPT_CHARS = 2000
# A1111's extra-network tags, as its re_extra_net reads them: <lora:name> or <lora:name:scale>.
EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")
# The tag kinds that name a LoRA: A1111 reads <lyco:...> as <lora:...>.
LORA_TAG_KINDS = ("lora", "lyco")
SEED_MAX = 2**32 - 1
SIDE_STEP = 64
# Pixels a latent stands for, a side (the VAE's factor).
SIDE_STEP_LATENT = 8
GUIDANCE_MAX = 30.0
DEEPCACHE_INTERVAL_MAX = 10
TOME_RATIO_MAX = 0.75
# Every input error's message starts with this.
INVALID_INPUT = "invalid input: "

# AUTOMATIC1111's sampler names; src/models/schedulers.py maps each to diffusers.
SCHEDULER_NAMES: tuple[str, ...] = (
    "DPM++ 2M",
    "DPM++ 2M Karras",
    "DPM++ 2M SDE",
    "DPM++ 2M SDE Karras",
    "DPM2",
    "DPM2 Karras",
    "DPM2 a",
    "DPM2 a Karras",
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
# The samplers A1111 marks second_order (two model calls a step, one at the last): its prompt editing counts
# their calls, twice the steps (its SamplerData.total_steps).
SECOND_ORDER_SAMPLERS = frozenset({"Heun", "DPM2", "DPM2 a", "DPM2 Karras", "DPM2 a Karras"})
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
    "k_dpm_2_ka": "DPM2 Karras",
    "dpm_2_karras": "DPM2 Karras",
    "k_dpm_2_a_ka": "DPM2 a Karras",
    "dpm_2_ancestral_karras": "DPM2 a Karras",
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
}
Task = Literal["txt2img", "img2img", "inpaint", "outpaint"]
OUTPUT_FORMATS: tuple[str, ...] = ("png", "jpeg", "webp")
OUTPUT_FORMAT_ALIASES: Mapping[str, str] = {"jpg": "jpeg", "jpe": "jpeg"}
_SEPARATORS = re.compile(r"[\s_:()-]+")


def _name_key(name: str) -> str:
    # Separators fold to one space, never to nothing, so "DPM2 a" and "DPM2" stay apart.
    return _SEPARATORS.sub(" ", name.casefold()).strip()


def names_by_key(canonical: Iterable[str], aliases: Mapping[str, str]) -> dict[str, str]:
    names = {_name_key(alias): target for alias, target in aliases.items()}
    names.update({_name_key(name): name for name in canonical})
    return names


_SCHEDULERS_BY_KEY = names_by_key(SCHEDULER_NAMES, SCHEDULER_ALIASES)
_FORMATS_BY_KEY = names_by_key(OUTPUT_FORMATS, OUTPUT_FORMAT_ALIASES)


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
    def max_upscale_side(self) -> int: ...
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
    @property
    def models_dir(self) -> str | None: ...
    @property
    def vae_dir(self) -> str | None: ...
    @property
    def downloads_on(self) -> bool: ...
    @property
    def upscaler_dir(self) -> str | None: ...


def canonical_name(name: str, names_by_key: Mapping[str, str], kind: str, listed: Iterable[str]) -> str:
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
    return canonical_name(name, _SCHEDULERS_BY_KEY, "scheduler", SCHEDULER_NAMES)


def canonical_output_format(name: str) -> str:
    """``png``, ``jpeg`` or ``webp`` for that name or an alias such as ``jpg``, in any case.

    Raises:
        ValueError: the name is unknown; the message suggests the closest one and lists them all.
    """
    return canonical_name(name, _FORMATS_BY_KEY, "output format", OUTPUT_FORMATS)


def check_limits(limits: RequestLimits) -> None:
    """Check the configured defaults against the contract, at startup.

    Raises:
        ValueError: naming the setting, its value and the rule.
    """
    try:
        canonical_scheduler(limits.default_scheduler)
    except ValueError as error:
        raise ValueError(f"DEFAULT_SCHEDULER={limits.default_scheduler!r}: {error}") from None


def request_limits(info: ValidationInfo) -> RequestLimits:
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


def _known_output_format(value: Any) -> Any:
    return canonical_output_format(value) if isinstance(value, str) else value


def _case_insensitive(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _s3_needs_a_bucket(value: str, info: ValidationInfo) -> str:
    if value == "s3" and not request_limits(info).bucket_configured:
        raise ValueError("needs a bucket, and none is configured: set BUCKET_NAME, or use 'base64'")
    return value


# The output fields, the same for every kind of job (generation and upscale).
OutputFormat = Annotated[
    Literal["png", "jpeg", "webp"],
    BeforeValidator(_known_output_format),
    Field(
        description="`png`, `jpeg` (`jpg` accepted) or `webp`; case does not matter. Each file carries its parameters."
    ),
]
OutputQuality = Annotated[
    StrictInt, Field(ge=1, le=100, description="1 to 100, for `jpeg` and `webp`; lower is smaller. PNG is lossless.")
]
OutputType = Annotated[
    Literal["auto", "s3", "base64"],
    BeforeValidator(_case_insensitive),
    AfterValidator(_s3_needs_a_bucket),
    Field(
        description="`base64`: inline. `s3`: upload, return URLs (needs `BUCKET_NAME`). "
        "`auto`: `s3` when a bucket is configured, else `base64`."
    ),
]


class RequestCore(BaseModel):
    """The fields every job has: what to draw, at which size, how, and in which form it comes back.

    ``ImageInputs``, ``PassOptions`` and ``AdapterOptions`` extend it in turn, and ``GenerateRequest`` is the
    last of them: pydantic puts a base's fields before its subclass's, so the chain keeps the fields (and the
    README's input table) in the order of the wire contract.
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
            "Image i uses seed + i (mod 2^32), returned with each image; with `subseed_strength` above 0, every "
            "image uses the seed (as A1111)."
        ),
    )
    subseed: StrictInt | None = Field(
        None,
        validate_default=True,
        description=f"A1111's variation seed: 0 to {SEED_MAX}; null or -1 picks a random one. Image i mixes its "
        "seed's noise with that of subseed + i (mod 2^32), by `subseed_strength`, as A1111.",
        json_schema_extra={"shown_default": "random"},
    )
    subseed_strength: float = Field(
        0.0,
        strict=True,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="A1111's variation strength, 0 to 1: how far the noise moves from the seed's towards the "
        "variation seed's (spherical interpolation); 0 is the seed alone.",
    )
    seed_resize_from_w: StrictInt = Field(
        0,
        ge=-1,
        description="A1111's Seed resize from, with `seed_resize_from_h`: the noise a seed gives at this width "
        "(a multiple of 8, at most `MAX_SIDE`), centred in the job's; 0 or -1 is off.",
    )
    seed_resize_from_h: StrictInt = Field(
        0, ge=-1, description="The height for `seed_resize_from_w`; 0 or -1 is off. Set both, or neither."
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
    pad_conds: StrictBool = Field(
        False,
        description="A prompt and a negative prompt of different numbers of chunks (75 tokens each): `false` "
        "guides with each read alone, as A1111 does by default; `true` pads the shorter with empty chunks, as "
        'A1111\'s "Pad prompt/negative prompt" option (its `pad_cond_uncond`) does, and the image differs.',
    )
    tiling: StrictBool = Field(
        False,
        description="`true`: the image tiles seamlessly, its left edge continuing its right and its top its bottom "
        "(A1111's `tiling`: circular padding in the UNet's and VAE's convolutions, for this job only).",
    )
    deepcache_interval: StrictInt = Field(
        1,
        ge=1,
        le=DEEPCACHE_INTERVAL_MAX,
        description=f"DeepCache-style feature reuse, 1 (off) to {DEEPCACHE_INTERVAL_MAX}: every Nth UNet evaluation "
        "runs whole and keeps its deep features; those between run only the UNet's first down block and last up "
        "block on them. Faster the higher N, at a cost in fine detail that grows with N: the images differ from "
        "the default's (2 or 3 keeps most of it). Not with `controlnets`.",
    )
    tome_ratio: float = Field(
        0.0,
        strict=True,
        ge=0.0,
        le=TOME_RATIO_MAX,
        allow_inf_nan=False,
        description=f"Token merging (ToMe for SD), 0 (off) to {TOME_RATIO_MAX:g}: this fraction of the image tokens "
        "at the UNet's full latent resolution is merged before self-attention and unmerged after. Faster the "
        "larger the image, at a cost in fine detail that grows with the ratio: the images differ from the "
        "default's (0.3 to 0.5 is usual). With `FAST_MODE` the job runs the UNet uncompiled.",
    )
    output_format: OutputFormat = "png"
    output_quality: OutputQuality = 90
    output_type: OutputType = "auto"

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
        maximum = getattr(request_limits(info), setting)
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

    @field_validator("subseed")
    @classmethod
    def _resolve_subseed(cls, value: int | None) -> int:
        return cls._resolve_seed(value)

    @field_validator("seed_resize_from_w", "seed_resize_from_h")
    @classmethod
    def _seed_resize_side(cls, value: int, info: ValidationInfo) -> int:
        if value <= 0:
            return 0
        maximum = request_limits(info).max_side
        if value % 8 or value > maximum:
            raise ValueError(f"must be a multiple of 8 up to {maximum} (MAX_SIDE), or 0 for off")
        return value

    @model_validator(mode="after")
    def _seed_resize_both_or_neither(self) -> RequestCore:
        if (self.seed_resize_from_w > 0) != (self.seed_resize_from_h > 0):
            raise ValueError(
                f"seed_resize_from_w={self.seed_resize_from_w} and seed_resize_from_h={self.seed_resize_from_h}: "
                "set both (the size the seed's noise is drawn at), or neither"
            )
        if self.subseed_strength > 0 and 0 < self.seed_resize_from_h < 2 * SIDE_STEP_LATENT:
            # One row of latents: A1111's slerp, which takes its norms along the rows, divides by zero.
            raise ValueError(
                f"seed_resize_from_h={self.seed_resize_from_h} with subseed_strength={self.subseed_strength:g}: "
                f"must be at least {2 * SIDE_STEP_LATENT} (two rows of latents) for the variation seed's blend"
            )
        return self

    @property
    def seed_resize_from(self) -> tuple[int, int] | None:
        """A1111's Seed resize from, as (width, height); None when off."""
        return (self.seed_resize_from_w, self.seed_resize_from_h) if self.seed_resize_from_w > 0 else None

    @property
    def varies_noise(self) -> bool:
        """Whether the initial noise is other than the seed's own: a variation seed, or a seed resize."""
        return self.subseed_strength > 0 or self.seed_resize_from is not None

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        return canonical_scheduler(value)
