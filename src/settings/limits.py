"""The limits and defaults of a request: its largest size, steps and batch, and the defaults it takes."""

from __future__ import annotations

from pydantic import BaseModel, Field


class LimitSettings(BaseModel):
    """The request limits' variables: ``MAX_SIDE`` to ``DEFAULT_CLIP_SKIP``."""

    max_side: int = Field(
        1024,
        alias="MAX_SIDE",
        ge=512,
        le=4096,
        multiple_of=64,
        description="Largest width or height a request may ask; a multiple of 64, from 512 (the default size) to 4096.",
    )
    max_steps: int = Field(
        150, alias="MAX_STEPS", ge=1, le=1000, description="Largest `num_inference_steps`; 1 to 1000."
    )
    max_images: int = Field(
        4, alias="MAX_IMAGES", ge=1, le=64, description="Largest `num_images` per request; 1 to 64."
    )
    max_pixels: int = Field(
        1_048_576,
        alias="MAX_PIXELS",
        ge=512 * 512,
        description="Largest width x height x num_images per request; at least 262144 (one default 512x512 image).",
    )
    max_upscale_side: int = Field(
        4096,
        alias="MAX_UPSCALE_SIDE",
        ge=512,
        le=16384,
        description="Largest width or height an `upscale` job may return, 512 to 16384.",
    )
    default_steps: int = Field(
        25,
        alias="DEFAULT_STEPS",
        ge=1,
        description="`num_inference_steps` when a request gives none; at most `MAX_STEPS`.",
    )
    default_scheduler: str = Field(
        "DPM++ 2M Karras",
        alias="DEFAULT_SCHEDULER",
        min_length=1,
        description="`scheduler` when a request gives none; one of the `scheduler` names.",
    )
    default_clip_skip: int = Field(
        1,
        alias="DEFAULT_CLIP_SKIP",
        ge=1,
        le=12,
        description="`clip_skip` when a request gives none, 1 to 12; 2 for most anime checkpoints.",
    )
