"""``UpscaleRequest``: an image enlarged by an upscaler, with no diffusion (A1111's Extras tab), and its size.

An upscale job is ``{"task": "upscale", "image": ..., "upscaler": ..., "scale": 2}``, or a target size in place
of the factor (``width``, ``height``, or both with ``resize_mode``). Its size is settled once its image is read
(``resolve_upscale_size``), with the size the upscaler brings the image to before a crop or a pad
(``staged_size``); its outputs are those of every job (format, quality, inline or S3).

No image a job makes on its way, neither that staged image nor a model's pass, may hold more than
(2 x MAX_UPSCALE_SIDE)² pixels (``max_upscale_pixels``): what a job takes in memory is bounded by the settings,
whatever the image's proportions and the model's scale.
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

from src.schema.core import (
    InputError,
    OutputFormat,
    OutputQuality,
    OutputType,
    RequestLimits,
    canonical_name,
    names_by_key,
    request_limits,
)
from src.schema.images import RESIZE_MODE_ALIASES, RESIZE_MODES
from src.schema.passes import built_in_in_any_case, upscaler_name
from src.schema.request import describe_errors

# The upscalers that need no model file, as A1111's Extras names them in lower case.
UPSCALE_BUILT_IN = ("lanczos", "nearest")
UPSCALE_SCALE_MAX = 8.0
UPSCALE_SCALE_DEFAULT = 2.0
# Most times an image goes through a model to reach its size, as A1111's ``Upscaler.upscale``.
UPSCALE_MAX_PASSES = 3
# The img2img resize modes, and ``cover``: enlarged to cover the target, in the image's proportions, uncropped.
UPSCALE_RESIZE_MODES = (*RESIZE_MODES, "cover")
UPSCALE_MULTIPLE_MAX = 64
_UPSCALE_RESIZE_MODES_BY_KEY = names_by_key(UPSCALE_RESIZE_MODES, RESIZE_MODE_ALIASES)


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
        f"int(side x scale) a side (rounded down to a multiple of `multiple_of`). A1111's `upscaling_resize`, "
        f"whose result A1111 rounds down to a multiple of 8 (an A1111 payload gets A1111's size). Not with `width` "
        f"or `height`; with none of the three, {UPSCALE_SCALE_DEFAULT:g}.",
        json_schema_extra={"shown_default": f"`{UPSCALE_SCALE_DEFAULT:g}` without `width` and `height`"},
    )
    width: StrictInt | None = Field(
        None,
        ge=1,
        description="The result's width in pixels (with `cover`, the width it covers), at most "
        "`MAX_UPSCALE_SIDE` (A1111's `upscaling_resize_w`); with only one of width and height, the other keeps "
        "the image's proportions.",
    )
    height: StrictInt | None = Field(
        None,
        ge=1,
        description="The result's height in pixels (with `cover`, the height it covers), at most "
        "`MAX_UPSCALE_SIDE` (A1111's `upscaling_resize_h`).",
    )
    resize_mode: Literal["resize", "crop", "fill", "cover"] = Field(
        "crop",
        description="With both `width` and `height`, when their proportions are not the image's: `crop` enlarges "
        "to cover them and crops the centre (A1111's `upscaling_crop`, its default), `resize` stretches, `fill` "
        "fits and pads with the stretched edges, `cover` enlarges to cover them and crops nothing: the result "
        "keeps the image's proportions, one side the target's and the other larger (A1111's `upscaling_crop` "
        "false). A1111's 0, 1 and 2 are accepted.",
    )
    multiple_of: StrictInt = Field(
        1,
        ge=1,
        le=UPSCALE_MULTIPLE_MAX,
        description="Each side the worker works out (by `scale`, by the image's proportions from one of `width` "
        "and `height`, or by `cover`) is rounded down to a multiple of this; a side given is kept. A1111's "
        "Extras rounds to 8, which its payloads ask for. Not with both sides and `crop`, `resize` or `fill`.",
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
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return value  # pydantic refuses it with its own message
        return canonical_name(str(value), _UPSCALE_RESIZE_MODES_BY_KEY, "resize mode", UPSCALE_RESIZE_MODES)

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
        if "multiple_of" in given and len(sized) == 2 and self.resize_mode != "cover":
            raise ValueError(
                f"multiple_of: rounds the sides the worker works out, and with width, height and resize_mode "
                f"{self.resize_mode} it works out none: leave it out, or use resize_mode cover"
            )
        return self

    @property
    def output_size(self) -> tuple[int, int]:
        """The result's width x height, once resolved (``resolve_upscale_size``)."""
        if self.width is None or self.height is None:
            raise RuntimeError("an upscale job's size is known once its image is read: use resolve_upscale_size()")
        return self.width, self.height


def resolve_upscale_size(request: UpscaleRequest, image_size: tuple[int, int], limits: RequestLimits) -> UpscaleRequest:
    """``request`` with its result's width and height, and its factor, settled from the image's size.

    ``scale`` becomes the factor the image is enlarged by before any crop: with both sides given, the larger of
    the two ratios (``crop``, ``resize``, ``cover``) or the smaller (``fill``). The sides the worker works out
    are int(side x scale) by a factor, round(side x ratio) in proportion to one side given, and for ``cover`` the
    target's on the side of the larger ratio and the other in the image's proportions, rounded down; each then
    rounded down to a multiple of ``multiple_of``.

    Raises:
        InputError: the result is over MAX_UPSCALE_SIDE, has a side of no pixels, would not be larger than the
            image, or the image staged on its way (``staged_size``) would be over ``max_upscale_pixels``.
    """
    image_width, image_height = image_size
    sized = {"width", "height"} & request.model_fields_set
    width, height, scale = _result_size(request, image_size)
    shown = f"{image_width}x{image_height} to {width}x{height}"
    fields = upscale_size_fields(frozenset(sized))
    most = limits.max_upscale_side
    if max(width, height) > most:
        raise InputError(f"invalid input: {fields}: {shown}: each side must be at most {most} (MAX_UPSCALE_SIDE)")
    if min(width, height) < 1:
        raise InputError(
            f"invalid input: {fields}: {shown}: a side rounded down to a multiple of {request.multiple_of} "
            "(multiple_of) has no pixels left"
        )
    if scale <= 1 or (width <= image_width and height <= image_height):
        raise InputError(f"invalid input: {fields}: {shown} does not enlarge the image: an upscale job makes it larger")
    resolved = request.model_copy(update={"width": width, "height": height, "scale": scale})
    staged = staged_size(resolved, image_size, frozenset(sized))
    if staged[0] * staged[1] > max_upscale_pixels(limits):
        raise InputError(
            f"invalid input: {fields}: {shown} ({request.resize_mode}) first enlarges the image to "
            f"{staged[0]}x{staged[1]}, over the {_pixels_shown(limits)} pixels an upscale may make on its way "
            "((2 x MAX_UPSCALE_SIDE)²): choose a size nearer the image's proportions"
        )
    return resolved


def _result_size(request: UpscaleRequest, image_size: tuple[int, int]) -> tuple[int, int, float]:
    """The result's width, height and factor, before any check (``resolve_upscale_size`` says the rules)."""
    image_width, image_height = image_size
    step = request.multiple_of
    if request.width is not None and request.height is not None:
        width, height = request.width, request.height
        ratios = (width / image_width, height / image_height)
        scale = min(ratios) if request.resize_mode == "fill" else max(ratios)
        if request.resize_mode == "cover":
            width, height = _covering(image_size, (width, height))
            return width // step * step, height // step * step, scale
        return width, height, scale
    if request.width is not None:
        scale = request.width / image_width
        return request.width, max(1, round(image_height * scale)) // step * step, scale
    if request.height is not None:
        scale = request.height / image_height
        return max(1, round(image_width * scale)) // step * step, request.height, scale
    scale = request.scale if request.scale is not None else UPSCALE_SCALE_DEFAULT
    return int(image_width * scale) // step * step, int(image_height * scale) // step * step, scale


def _covering(image_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The image's proportions, covering ``target``: one side the target's, the other rounded down (as
    diffusers' and A1111's crop compute it, in whole numbers, so that it never falls short of the target)."""
    (image_width, image_height), (width, height) = image_size, target
    if width * image_height >= height * image_width:
        return width, image_height * width // image_width
    return image_width * height // image_height, height


def _inside(image_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The image's proportions, inside ``target``: one side the target's, the other rounded down."""
    (image_width, image_height), (width, height) = image_size, target
    if width * image_height <= height * image_width:
        return width, image_height * width // image_width
    return image_width * height // image_height, height


def staged_size(request: UpscaleRequest, image_size: tuple[int, int], sized: frozenset[str]) -> tuple[int, int]:
    """The size the upscaler brings the image to, before it meets the result's: the result itself, but with
    both sides given (``sized``) and ``crop`` the size that covers it, and with ``fill`` the size inside it,
    computed as the crop or the pad (``src.prepare.canvas.fit``) computes it, so that it resamples no more.
    ``request`` has its size resolved."""
    result = request.output_size
    if len(sized) < 2 or request.resize_mode not in ("crop", "fill"):
        return result
    return _covering(image_size, result) if request.resize_mode == "crop" else _inside(image_size, result)


def max_upscale_pixels(limits: RequestLimits) -> int:
    """The most pixels an image an upscale job makes on its way may hold: (2 x MAX_UPSCALE_SIDE)²."""
    return (2 * limits.max_upscale_side) ** 2


def _pixels_shown(limits: RequestLimits) -> str:
    side = 2 * limits.max_upscale_side
    return f"{side}x{side}"


def upscale_size_fields(sized: frozenset[str]) -> str:
    """The fields that set an upscale job's size (``sized``: those of width and height it gave), as its errors
    name them: ``scale``, ``width``, ``height`` or ``width x height``."""
    given = [name for name in ("width", "height") if name in sized]
    return " x ".join(given) if given else "scale"


def model_pass_size(image_size: tuple[int, int], staged: tuple[int, int], model_scale: int) -> tuple[int, int]:
    """The size of a model's last pass: the image through it until it covers ``staged``, at most
    ``UPSCALE_MAX_PASSES`` times, as A1111's ``Upscaler.upscale``."""
    width, height = image_size
    for _ in range(UPSCALE_MAX_PASSES):
        if width >= staged[0] and height >= staged[1]:
            break
        width, height = width * model_scale, height * model_scale
    return width, height


def check_model_passes(
    request: UpscaleRequest,
    image_size: tuple[int, int],
    sized: frozenset[str],
    model_scale: int,
    limits: RequestLimits,
) -> None:
    """Refuse a job whose model's passes would make an image over ``max_upscale_pixels``, before they run.
    ``request`` has its size resolved; ``sized`` holds those of width and height it gave.

    Raises:
        InputError: naming the size's fields, the model's scale and the image its last pass would make.
    """
    width, height = model_pass_size(image_size, staged_size(request, image_size, sized), model_scale)
    if width * height <= max_upscale_pixels(limits):
        return
    raise InputError(
        f"invalid input: {upscale_size_fields(sized)}: {image_size[0]}x{image_size[1]} to "
        f"{request.output_size[0]}x{request.output_size[1]} through {request.upscaler} ({model_scale}x) makes a "
        f"{width}x{height} image on its way, over the {_pixels_shown(limits)} pixels an upscale may make "
        "((2 x MAX_UPSCALE_SIDE)²): use an upscaler of a smaller scale, lanczos, or a smaller image"
    )


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
