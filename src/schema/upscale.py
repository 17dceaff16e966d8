"""``UpscaleRequest``: an image enlarged by an upscaler, with no diffusion (A1111's Extras tab), and its size.

An upscale job is ``{"task": "upscale", "image": ..., "upscaler": ..., "scale": 2}``, or a target size in place
of the factor (``width``, ``height``, or both with ``resize_mode``). Its size is settled once its image is read
(``resolve_upscale_size``); its outputs are those of every job (format, quality, inline or S3).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

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

from src.schema.core import InputError, OutputFormat, OutputQuality, OutputType, RequestLimits, request_limits
from src.schema.images import canonical_resize_mode
from src.schema.passes import built_in_in_any_case, upscaler_name
from src.schema.request import describe_errors

# The upscalers that need no model file, as A1111's Extras names them in lower case.
UPSCALE_BUILT_IN = ("lanczos", "nearest")
UPSCALE_SCALE_MAX = 8.0
UPSCALE_SCALE_DEFAULT = 2.0


class UpscaleRequest(BaseModel):
    """One upscale job: ``image`` enlarged by ``upscaler`` to ``scale`` times its size, or to a target size.

    Each field's description is its rule as the README states it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # One image in, one out: what the delivery checks count.
    num_images: ClassVar[int] = 1

    task: Literal["upscale"] = Field(
        description="`upscale`: the image is enlarged by an upscaler and nothing is generated (A1111's Extras)."
    )
    image: StrictStr = Field(
        description="The image to enlarge: base64 (a `data:image/...;base64,` prefix is fine), an `https://` or "
        "`http://` URL, or `s3://BUCKET_NAME/key`. PNG, JPEG or WebP. A1111's `image`."
    )
    upscaler: StrictStr = Field(
        min_length=1,
        max_length=255,
        description="An upscaler of `UPSCALER_DIR` by name (such as `RealESRGAN_x4plus`; a `describe` job lists "
        "them), or `lanczos` or `nearest`, in any case. A model runs as many times as its scale needs to reach "
        "the target (at most 3, as A1111), then Lanczos brings the image to the exact size. A1111's `upscaler_1`.",
    )
    scale: float | None = Field(
        None,
        strict=True,
        gt=1.0,
        le=UPSCALE_SCALE_MAX,
        allow_inf_nan=False,
        description=f"Enlarge by this factor, above 1 and at most {UPSCALE_SCALE_MAX:g}: the result is "
        f"int(side x scale) a side. A1111's `upscaling_resize`. Not with `width` or `height`; with none of the "
        f"three, {UPSCALE_SCALE_DEFAULT:g}.",
        json_schema_extra={"shown_default": f"`{UPSCALE_SCALE_DEFAULT:g}` without `width` and `height`"},
    )
    width: StrictInt | None = Field(
        None,
        ge=1,
        description="The result's width in pixels, at most `MAX_UPSCALE_SIDE` (A1111's `upscaling_resize_w`); "
        "with only one of width and height, the other keeps the image's proportions.",
    )
    height: StrictInt | None = Field(
        None,
        ge=1,
        description="The result's height in pixels, at most `MAX_UPSCALE_SIDE` (A1111's `upscaling_resize_h`).",
    )
    resize_mode: Literal["resize", "crop", "fill"] = Field(
        "crop",
        description="With both `width` and `height`, when their proportions are not the image's: `crop` enlarges "
        "to cover them and crops the centre (A1111's `upscaling_crop`, its default), `resize` stretches, `fill` "
        "fits and pads with the stretched edges. A1111's 0, 1 and 2 are accepted.",
    )
    output_format: OutputFormat = "png"
    output_quality: OutputQuality = 90
    output_type: OutputType = "auto"

    @field_validator("upscaler", mode="before")
    @classmethod
    def _built_in_names_in_any_case(cls, value: Any) -> Any:
        return built_in_in_any_case(value, UPSCALE_BUILT_IN)

    @field_validator("upscaler")
    @classmethod
    def _a_name_not_a_path(cls, value: str, info: ValidationInfo) -> str:
        return upscaler_name(value, UPSCALE_BUILT_IN, request_limits(info))

    @field_validator("resize_mode", mode="before")
    @classmethod
    def _known_resize_mode(cls, value: Any) -> Any:
        return canonical_resize_mode(value)

    @field_validator("width", "height")
    @classmethod
    def _within_max_upscale_side(cls, value: int | None, info: ValidationInfo) -> int | None:
        most = request_limits(info).max_upscale_side
        if value is not None and value > most:
            raise ValueError(f"must be at most {most} (MAX_UPSCALE_SIDE)")
        return value

    @model_validator(mode="after")
    def _a_factor_or_a_size(self) -> UpscaleRequest:
        given = self.model_fields_set
        sized = sorted({"width", "height"} & given)
        if "scale" in given and sized:
            raise ValueError(f"scale: not with {' and '.join(sized)}: give a factor or a target size, not both")
        if "resize_mode" in given and len(sized) < 2:
            raise ValueError("resize_mode: needs both width and height (with one, the other keeps the proportions)")
        return self

    @property
    def output_size(self) -> tuple[int, int]:
        """The result's width x height, once resolved (``resolve_upscale_size``)."""
        if self.width is None or self.height is None:
            raise RuntimeError("an upscale job's size is known once its image is read: use resolve_upscale_size()")
        return self.width, self.height


def resolve_upscale_size(request: UpscaleRequest, image_size: tuple[int, int], limits: RequestLimits) -> UpscaleRequest:
    """``request`` with its result's width and height, and its factor, settled from the image's size.

    ``scale`` becomes the factor the image is enlarged by before any crop: with both sides given and ``crop``,
    the larger of the two ratios; with ``fill``, the smaller; with ``resize``, the larger (the model's pass covers
    both sides, then the image is stretched).

    Raises:
        InputError: the result is over MAX_UPSCALE_SIDE, or would not be larger than the image.
    """
    image_width, image_height = image_size
    if request.width is not None and request.height is not None:
        width, height = request.width, request.height
        ratios = (width / image_width, height / image_height)
        scale = min(ratios) if request.resize_mode == "fill" else max(ratios)
    elif request.width is not None:
        width, scale = request.width, request.width / image_width
        height = max(1, round(image_height * scale))
    elif request.height is not None:
        height, scale = request.height, request.height / image_height
        width = max(1, round(image_width * scale))
    else:
        scale = request.scale if request.scale is not None else UPSCALE_SCALE_DEFAULT
        width, height = int(image_width * scale), int(image_height * scale)
    shown = f"{image_width}x{image_height} to {width}x{height}"
    fields = "scale" if request.width is None and request.height is None else "width x height"
    if max(width, height) > limits.max_upscale_side:
        raise InputError(
            f"invalid input: {fields}: {shown}: each side must be at most {limits.max_upscale_side} (MAX_UPSCALE_SIDE)"
        )
    if scale <= 1 or (width <= image_width and height <= image_height):
        raise InputError(f"invalid input: {fields}: {shown} does not enlarge the image: an upscale job makes it larger")
    return request.model_copy(update={"width": width, "height": height, "scale": scale})


def names_upscale(job: Any) -> bool:
    """Whether ``job``'s input names the upscale task (``"task": "upscale"``)."""
    data = job.get("input") if isinstance(job, dict) else None
    return isinstance(data, dict) and data.get("task") == "upscale"


def parse_upscale(job: Any, limits: RequestLimits) -> UpscaleRequest:
    """Validate an upscale job's ``input`` into an ``UpscaleRequest`` (its size still to settle).

    Raises:
        InputError: the input breaks the contract; the message names each field.
    """
    try:
        return UpscaleRequest.model_validate(job["input"], context={"limits": limits})
    except ValidationError as error:
        raise InputError(describe_errors(error, UpscaleRequest)) from None
