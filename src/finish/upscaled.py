"""An upscale job's answer: its image encoded, delivered inline or to S3 as a generation's are, and its metadata.

The file carries A1111's Extras line (``Postprocess upscale by: 2, Postprocess upscaler: ...``) in a PNG's
``postprocessing`` text, and the input's own ``parameters``, when it had them, as A1111 keeps them.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from src import __version__
from src.finish.outputs import EncodedImage, embeddable, encode_image
from src.finish.response import Route, check_response_size, deliver, quality_unused
from src.schema import Timings, UpscaleMetadata, UpscaleResponse

if TYPE_CHECKING:
    from src.prepare import UpscalePlan
    from src.run.upscale import Upscaled

# A1111's names for the built-in upscalers.
_A1111_NAMES = {"lanczos": "Lanczos", "nearest": "Nearest"}


def encode_upscale_response(
    plan: UpscalePlan,
    upscaled: Upscaled,
    route: Route,
    *,
    started: float,
) -> UpscaleResponse:
    """Encode the enlarged image, deliver it inline or to S3 by ``route``, and wrap it with its metadata.

    Raises:
        StorageError: the upload failed and the request asked for ``s3`` explicitly.
        ResponseTooLargeError: the inline answer is over ``MAX_RESPONSE_MB``.
    """
    request, settings = plan.request, route.settings
    warnings = [*plan.warnings, *upscaled.warnings]
    if (unused := quality_unused(request)) is not None:
        warnings.append(unused)
    encode_started = time.perf_counter()
    [parameters] = embeddable(request.output_format, [plan.parameters if settings.embed_parameters else None], warnings)
    data = encode_image(
        upscaled.image,
        request.output_format,
        request.output_quality,
        parameters,
        postprocessing=postprocessing_line(plan) if settings.embed_parameters else None,
    )
    encoded = [EncodedImage(data=data, seed=None, format=request.output_format)]
    timings = {"encode": (time.perf_counter() - encode_started) * 1000}
    images = deliver(request, encoded, route, warnings=warnings, timings=timings)
    upload = timings.get("upload")
    width, height = request.output_size
    metadata = UpscaleMetadata(
        task="upscale",
        upscaler=request.upscaler,
        upscaler_scale=upscaled.upscaler_scale,
        upscaler_passes=upscaled.passes,
        scale=round(request.scale or 1.0, 4),
        width=width,
        height=height,
        resize_mode=plan.resize_mode,
        source_width=plan.source_size[0],
        source_height=plan.source_size[1],
        device=upscaled.device,
        dtype=upscaled.dtype,
        output_format=request.output_format,
        timings_ms=Timings(
            inputs=round(plan.read_ms, 1),
            queue=round(upscaled.queue_ms, 1),
            inference=round(upscaled.inference_ms, 1),
            encode=round(timings["encode"], 1),
            upload=None if upload is None else round(upload, 1),
            total=round((time.perf_counter() - started) * 1000, 1),
        ),
        version=__version__,
        warnings=warnings,
    )
    response = UpscaleResponse(images=images, metadata=metadata)
    check_response_size(response, request, settings)
    return response


def postprocessing_line(plan: UpscalePlan) -> str:
    """A1111's Extras line for the job, its keys in A1111's order (scripts/postprocessing_upscale.py):
    ``Postprocess upscale by: 2, Postprocess upscaler: RealESRGAN_x4plus``; for a target size
    ``Postprocess upscale to: 1024x768`` (the size asked for, which ``cover`` exceeds on one side), then, cropped
    to it, ``Postprocess crop to: 1024x768``."""
    request = plan.request
    parts = []
    if plan.size_fields:
        width, height = plan.target or request.output_size
        parts.append(f"Postprocess upscale to: {width}x{height}")
        if plan.resize_mode == "crop":
            cropped_width, cropped_height = request.output_size
            parts.append(f"Postprocess crop to: {cropped_width}x{cropped_height}")
    else:
        parts.append(f"Postprocess upscale by: {request.scale:g}")
    parts.append(f"Postprocess upscaler: {_A1111_NAMES.get(request.upscaler, request.upscaler)}")
    return ", ".join(parts)
