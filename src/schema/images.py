"""Image inputs: the input image and mask, how an image meets the job's size, and the inpaint options."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, StrictBool, StrictInt, StrictStr, field_validator

from src.schema.core import RequestCore, canonical_name, names_by_key

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
# A1111's setup_img2img_steps caps the strength at this: at 1, img2img runs every step, a hires schedule stretches a
# little.
STRENGTH_CAP = 0.999
MASK_BLUR_MAX = 64
INPAINT_PADDING_MAX = 256
_RESIZE_MODES_BY_KEY = names_by_key(RESIZE_MODES, RESIZE_MODE_ALIASES)
# Fields that mean something only for some tasks; asking for one elsewhere is an error, never ignored.
IMAGE_FIELDS = ("mask", "strength", "resize_mode", "outpaint")
MASK_FIELDS = (
    "mask_blur",
    "inpaint_area",
    "inpaint_padding",
    "inpaint_fill",
    "mask_invert",
    "mask_round",
    "keep_unmasked",
)


def canonical_resize_mode(value: Any) -> Any:
    """``resize``, ``crop`` or ``fill`` for that name, A1111's number (0, 1, 2) or A1111's label, in any case.

    Raises:
        ValueError: the name is unknown; the message suggests the closest one and lists them all.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return value  # pydantic refuses it with its own message
    return canonical_name(str(value), _RESIZE_MODES_BY_KEY, "resize mode", RESIZE_MODES)


class ImageInputs(RequestCore):
    """The fields of a job that starts from an image: img2img, inpaint (with a mask) and outpaint."""

    image: StrictStr | None = Field(
        None,
        description="An input image: base64 (a `data:image/...;base64,` prefix is fine), an `https://` or "
        "`http://` URL, or `s3://BUCKET_NAME/key`. PNG, JPEG or WebP. With it the job is img2img, "
        "inpaint (with `mask`) or outpaint (with `outpaint`).",
    )
    mask: StrictStr | None = Field(
        None,
        description="Where to paint, in the forms `image` takes, the image's size: white repaints, "
        "black keeps, grey is partial; a colour mask with transparency is its alpha (opaque repaints), as A1111 "
        "reads one. Needs `image`.",
    )
    strength: float = Field(
        STRENGTH_DEFAULT,
        strict=True,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="How much of the image is repainted (A1111's denoising strength), above 0 and at most 1. "
        "It runs the last int(num_inference_steps x min(strength, 0.999)) + 1 steps of the schedule, as A1111's "
        "k-diffusion samplers: 16 of 20 at 0.75, all of them at 1. Needs `image`.",
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
        description=f"Pixels of Gaussian blur on the mask's edge, in the image's pixels (as A1111 blurs it), 0 to "
        f"{MASK_BLUR_MAX}. With `mask` or `outpaint`.",
    )
    inpaint_area: Literal["whole", "masked"] = Field(
        "whole",
        description="`whole` repaints the image brought to width x height; `masked` crops the masked region from "
        "the image at its own size, repaints it enlarged to width x height, and pastes it back, so the image comes "
        'back at its own size (A1111\'s "only masked"). With `mask` or `outpaint`.',
    )
    inpaint_padding: StrictInt = Field(
        32,
        ge=0,
        le=INPAINT_PADDING_MAX,
        description=f"Pixels around the masked region with `inpaint_area` `masked`, 0 to {INPAINT_PADDING_MAX}.",
    )
    inpaint_fill: Literal["original", "fill", "latent_noise", "latent_nothing"] = Field(
        "original",
        description="What the model starts from inside the mask: `original`, the image's pixels there; `fill`, "
        'the colours around the mask spread into it (A1111\'s masked content "fill", its `inpainting_fill` 0); '
        "`latent_noise`, the seed's noise in place of the image's latents there, and `latent_nothing`, zero "
        "latents (A1111's 2 and 3). With `mask` or `outpaint`.",
    )
    mask_invert: StrictBool = Field(
        False,
        description="`true` repaints the mask's black and keeps its white (A1111's `inpainting_mask_invert`). "
        "With `mask`.",
    )
    mask_round: StrictBool = Field(
        False,
        description="`true` rounds the mask to black and white as A1111 does (its `mask_round`, on there by "
        "default, and so for an A1111 payload): a mask with transparency (its alpha) before the blur, above 128 "
        "being white, and then the blurred mask at the latents' size, so each latent pixel is kept or repainted. "
        "`false` leaves both grey: a grey latent pixel is repainted in part at every step. With `mask`.",
    )
    keep_unmasked: StrictBool = Field(
        True,
        description="Pixels outside the mask come back exactly as they were in the image (brought to the job's "
        "size). `false` returns what the model drew everywhere. With `mask` or `outpaint`.",
    )

    @field_validator("resize_mode", mode="before")
    @classmethod
    def _known_resize_mode(cls, value: Any) -> Any:
        return canonical_resize_mode(value)

    @field_validator("inpaint_area", "inpaint_fill", mode="before")
    @classmethod
    def _inpaint_area_case(cls, value: Any) -> Any:
        # A1111's UI labels ("latent noise") name the same fills.
        return value.strip().lower().replace(" ", "_") if isinstance(value, str) else value

    @field_validator("image", "mask")
    @classmethod
    def _not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty: give base64, a data: URI, an http(s):// URL or an s3:// URL")
        return value
