"""The wire contract: the request model, the response models, and their errors.

``GenerateRequest`` is the only place where a job's input is checked and where
its defaults are set. Limits that operators configure (``MAX_SIDE``,
``MAX_STEPS``, ...) reach the model through pydantic's validation context, as
any object with the attributes of ``RequestLimits`` (the worker passes its
``Settings``), so that this package imports nothing of the worker's own: nothing
from ``src`` outside ``src.schema``.

Its modules, each importing only those above it:

- ``core``: the limits, the input error, names of closed sets (schedulers, output formats), the core fields;
- ``images``: the input image and mask, resize modes, the inpaint options;
- ``passes``: outpaint and hires;
- ``adapters``: LoRAs (and the prompt's ``<lora:...>`` tags) and ControlNet units;
- ``size``: the job's size checked against the limits, and settled from an input image (``resolve_size``);
- ``request``: ``GenerateRequest``, the rules across field groups, ``parse_input``;
- ``upscale``: ``UpscaleRequest``, an image enlarged with no diffusion, and its size;
- ``response``: the response models;
- ``a1111``: A1111's own API payloads (``/sdapi/v1/txt2img``...) read as this worker's input (``read_a1111``).

Callers import from ``src.schema`` itself, which re-exports every public name.
"""

from src.schema.a1111 import (
    A1111_ENDPOINTS,
    A1111_LISTINGS,
    A1111Call,
    a1111_endpoint,
    names_a1111,
    parse_a1111_listing,
    parse_a1111_png_info,
    read_a1111,
)
from src.schema.a1111_fields import A1111_NOISE_SOURCE
from src.schema.adapters import (
    CONTROL_MODE_ALIASES,
    CONTROL_MODE_LABELS,
    CONTROL_MODES,
    CONTROLNET_SCALE_MAX,
    EXTRA_NETWORK_TAG,
    LORA_SCALE_LIMIT,
    LORA_TAG_KINDS,
    ControlNetUnit,
    LoraRequest,
    ModelDownload,
    lora_tags,
    without_lora_tags,
)
from src.schema.core import (
    CLIP_SKIP_MAX,
    CONFIGURED_DEFAULT,
    CONFIGURED_MAXIMUM,
    GUIDANCE_MAX,
    MAX_PROMPT_CHARS,
    OUTPUT_FORMAT_ALIASES,
    OUTPUT_FORMATS,
    SCHEDULER_ALIASES,
    SCHEDULER_NAMES,
    SECOND_ORDER_SAMPLERS,
    SEED_MAX,
    SIDE_STEP,
    InputError,
    RequestLimits,
    Task,
    canonical_output_format,
    canonical_scheduler,
    check_limits,
)
from src.schema.images import (
    IMAGE_FIELDS,
    INPAINT_PADDING_MAX,
    MASK_BLUR_MAX,
    MASK_FIELDS,
    RESIZE_MODE_ALIASES,
    RESIZE_MODES,
    STRENGTH_CAP,
    STRENGTH_DEFAULT,
    canonical_resize_mode,
)
from src.schema.passes import (
    HIRES_BUILT_IN,
    HIRES_SCALE_MAX,
    HIRES_SCHEDULE_MAX,
    HIRES_SIDE_STEP,
    HIRES_STRENGTH_DEFAULT,
    HIRES_UPSCALER_NAMES,
    LATENT_VARIANTS,
    Hires,
    Outpaint,
    check_outpaint_margins,
)
from src.schema.request import (
    MAX_ERROR_CHARS,
    MAX_PROBLEMS_SHOWN,
    TASK_FIELDS,
    DescribeRequest,
    GenerateRequest,
    describe_errors,
    parse_describe,
    parse_input,
)
from src.schema.response import (
    AppliedControlNet,
    AppliedLora,
    GenerateResponse,
    InlineImage,
    Metadata,
    PromptTokens,
    Timings,
    UploadedImage,
    UpscaleMetadata,
    UpscaleResponse,
)
from src.schema.size import check_size, resolve_size
from src.schema.upscale import (
    UPSCALE_BUILT_IN,
    UPSCALE_SCALE_DEFAULT,
    UPSCALE_SCALE_MAX,
    UpscaleRequest,
    names_upscale,
    parse_upscale,
    resolve_upscale_size,
)

__all__ = [
    "A1111_ENDPOINTS",
    "A1111_LISTINGS",
    "A1111_NOISE_SOURCE",
    "CLIP_SKIP_MAX",
    "CONFIGURED_DEFAULT",
    "CONFIGURED_MAXIMUM",
    "CONTROLNET_SCALE_MAX",
    "CONTROL_MODES",
    "CONTROL_MODE_ALIASES",
    "CONTROL_MODE_LABELS",
    "EXTRA_NETWORK_TAG",
    "GUIDANCE_MAX",
    "HIRES_BUILT_IN",
    "HIRES_SCALE_MAX",
    "HIRES_SCHEDULE_MAX",
    "HIRES_SIDE_STEP",
    "HIRES_STRENGTH_DEFAULT",
    "HIRES_UPSCALER_NAMES",
    "IMAGE_FIELDS",
    "INPAINT_PADDING_MAX",
    "LATENT_VARIANTS",
    "LORA_SCALE_LIMIT",
    "LORA_TAG_KINDS",
    "MASK_BLUR_MAX",
    "MASK_FIELDS",
    "MAX_ERROR_CHARS",
    "MAX_PROBLEMS_SHOWN",
    "MAX_PROMPT_CHARS",
    "OUTPUT_FORMATS",
    "OUTPUT_FORMAT_ALIASES",
    "RESIZE_MODES",
    "RESIZE_MODE_ALIASES",
    "SCHEDULER_ALIASES",
    "SCHEDULER_NAMES",
    "SECOND_ORDER_SAMPLERS",
    "SEED_MAX",
    "SIDE_STEP",
    "STRENGTH_CAP",
    "STRENGTH_DEFAULT",
    "TASK_FIELDS",
    "UPSCALE_BUILT_IN",
    "UPSCALE_SCALE_DEFAULT",
    "UPSCALE_SCALE_MAX",
    "A1111Call",
    "AppliedControlNet",
    "AppliedLora",
    "ControlNetUnit",
    "DescribeRequest",
    "GenerateRequest",
    "GenerateResponse",
    "Hires",
    "InlineImage",
    "InputError",
    "LoraRequest",
    "Metadata",
    "ModelDownload",
    "Outpaint",
    "PromptTokens",
    "RequestLimits",
    "Task",
    "Timings",
    "UploadedImage",
    "UpscaleMetadata",
    "UpscaleRequest",
    "UpscaleResponse",
    "a1111_endpoint",
    "canonical_output_format",
    "canonical_resize_mode",
    "canonical_scheduler",
    "check_limits",
    "check_outpaint_margins",
    "check_size",
    "describe_errors",
    "lora_tags",
    "names_a1111",
    "names_upscale",
    "parse_a1111_listing",
    "parse_a1111_png_info",
    "parse_describe",
    "parse_input",
    "parse_upscale",
    "read_a1111",
    "resolve_size",
    "resolve_upscale_size",
    "without_lora_tags",
]
