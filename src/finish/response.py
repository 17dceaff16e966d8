"""The response: every image encoded with its parameters, delivered inline or to S3, with its metadata.

Where each image goes follows ``output_type``; an upload that fails under ``auto`` comes back inline with
a warning, so an image is never lost. The answer's size is checked against MAX_RESPONSE_MB last.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from src import __version__
from src.errors import JobCancelledError, StorageError
from src.finish.outputs import EncodedImage, embeddable, encode_image
from src.finish.parameters import a1111_parameters
from src.prepare.delivery import FORMATS, Delivered, goes_to_s3, too_large
from src.schema import (
    TASK_FIELDS,
    AppliedControlNet,
    AppliedLora,
    GenerateRequest,
    GenerateResponse,
    InlineImage,
    Metadata,
    Timings,
    UploadedImage,
    UpscaleRequest,
    UpscaleResponse,
)

if TYPE_CHECKING:
    from src.prepare.inputs import Inputs
    from src.run.engine import Generation
    from src.settings import Settings
    from src.storage import S3Storage

log = logging.getLogger(__name__)

# The request fields every job's metadata repeats, as the request resolved them (defaults filled in);
# the fields of one task come from GenerateRequest.task_fields, the LoRAs (with their hashes) from the engine,
# the ControlNet units with how their images were resized.
_TASK_FIELDS = {name for names in TASK_FIELDS.values() for name in names}
_ECHOED = set(Metadata.model_fields) & set(GenerateRequest.model_fields)
# The model and VAE are reported as they ran (names and hashes), not as asked.
_ECHOED_FIELDS = _ECHOED - _TASK_FIELDS - {"loras", "controlnets", "model", "vae"}


@dataclass(frozen=True)
class Route:
    """Where a job's files go: the worker's settings, its S3 client (None without a bucket), the job's id (its
    folder in the bucket), and the job's cancellation, after which no upload starts."""

    settings: Settings
    storage: S3Storage | None
    job_id: str
    cancelled: threading.Event | None = None


def encode_response(
    request: GenerateRequest,
    generation: Generation,
    route: Route,
    *,
    started: float,
    inputs: Inputs | None = None,
    measured: bool = True,
) -> GenerateResponse:
    """Encode every image, deliver it inline or to S3 by ``route``, and wrap the lot with its metadata.

    ``started`` is the ``time.perf_counter()`` reading taken when the job arrived; ``inputs``
    are the job's input images as read, when it had any. ``measured`` false: the caller measures the answer it
    makes of this one (an A1111 answer, which may leave the images out).

    Raises:
        StorageError: an upload failed and the request asked for ``s3`` explicitly.
        ResponseTooLargeError: the inline answer is over ``MAX_RESPONSE_MB``.
    """
    warnings = [*(inputs.warnings if inputs is not None else []), *generation.warnings]
    if (unused := quality_unused(request)) is not None:
        warnings.append(unused)

    # 1. Encode, with the parameters inside each file.
    encode_started = time.perf_counter()
    settings = route.settings
    encoded = _encoded(request, generation, settings, inputs, warnings)
    timings = {"encode": (time.perf_counter() - encode_started) * 1000}

    # 2. Deliver: to S3 when asked or configured, inline otherwise or as the fallback.
    delivered: Delivered = inputs if inputs is not None else request
    images = deliver(delivered, encoded, route, warnings=warnings, timings=timings)
    timings["total"] = (time.perf_counter() - started) * 1000
    response = GenerateResponse(
        images=images, metadata=_metadata(request, generation, inputs, timings=timings, warnings=warnings)
    )

    # 3. The size guard: RunPod refuses answers over its limit, so say so ourselves, clearly.
    if measured:
        check_response_size(response, delivered, settings)
    return response


def quality_unused(request: GenerateRequest | UpscaleRequest) -> str | None:
    """The warning for an ``output_quality`` given for a lossless format, which it cannot change; None otherwise."""
    if "output_quality" in request.model_fields_set and not FORMATS[request.output_format].lossy:
        return f"output_quality={request.output_quality} has no effect on {request.output_format}: it is lossless"
    return None


def deliver(
    request: Delivered, encoded: list[EncodedImage], route: Route, *, warnings: list[str], timings: dict[str, float]
) -> list[InlineImage | UploadedImage]:
    """Each file to S3 when asked or configured (its time in ``timings["upload"]``), inline otherwise or as the
    fallback. Once ``cancelled`` is set no upload starts: a cancelled job leaves nothing in the bucket.

    Raises:
        JobCancelledError: the job was cancelled before its files were uploaded.
    """
    if not goes_to_s3(request, route.settings):
        return [_inline(item) for item in encoded]
    if route.cancelled is not None and route.cancelled.is_set():
        raise JobCancelledError("the job was cancelled; none of its images was uploaded")
    upload_started = time.perf_counter()
    images = _upload(request, encoded, route, warnings)
    timings["upload"] = (time.perf_counter() - upload_started) * 1000
    return images


def check_answer_size(answer: dict[str, Any], request: Delivered, settings: Settings) -> dict[str, Any]:
    """``answer`` (an A1111 answer, which echoes the payload it came with) when it fits, measured whole as JSON.

    Raises:
        ResponseTooLargeError: the answer, as JSON, is over MAX_RESPONSE_MB.
    """
    size = len(json.dumps(answer, ensure_ascii=False).encode())
    limit = settings.max_response_mb * 1_000_000
    if size > limit:
        raise too_large(request, size, limit, "is")
    return answer


def check_response_size(response: GenerateResponse | UpscaleResponse, request: Delivered, settings: Settings) -> None:
    """RunPod refuses answers over its limit, so say so ourselves, clearly: with why the images came back inline
    when they were meant for the bucket.

    Raises:
        ResponseTooLargeError: the answer, as JSON, is over MAX_RESPONSE_MB.
    """
    # The JSON is pydantic's own, written in Rust; the base64 strings dominate it.
    size = len(response.model_dump_json(exclude_none=True))
    limit = settings.max_response_mb * 1_000_000
    if size > limit:
        failed = next((warning for warning in response.metadata.warnings if NOT_UPLOADED in warning), None)
        raise too_large(request, size, limit, "is", upload_failed=failed)


def _encoded(
    request: GenerateRequest, generation: Generation, settings: Settings, inputs: Inputs | None, warnings: list[str]
) -> list[EncodedImage]:
    """Each image as a file of the request's format, with A1111's parameters inside unless turned off (or too long
    for the format, which ``warnings`` then says)."""
    made: list[str | None] = [*infotexts(request, generation, inputs)] if settings.embed_parameters else []
    texts = embeddable(request.output_format, made, warnings) if made else [None] * len(generation.images)
    return [
        EncodedImage(
            data=encode_image(image, request.output_format, request.output_quality, text),
            seed=seed,
            format=request.output_format,
            nsfw=None if generation.nsfw is None else generation.nsfw[index],
        )
        for index, (image, seed, text) in enumerate(zip(generation.images, generation.seeds, texts, strict=True))
    ]


def infotexts(request: GenerateRequest, generation: Generation, inputs: Inputs | None) -> list[str]:
    """A1111's parameters text of each image, in seed order: what its files carry and A1111's ``infotexts``."""
    source_size = inputs.source_size if inputs is not None else None
    control_sizes = inputs.controls.sources if inputs is not None and inputs.controls is not None else []
    model = generation.model
    return [
        a1111_parameters(
            request,
            seed,
            model.name,
            model_hash=model.model_hash,
            vae=model.vae,
            vae_hash=model.vae_hash,
            source_size=source_size,
            embeddings=generation.embeddings,
            loras=generation.loras,
            control_sizes=control_sizes,
            subseed=subseed,
            padded_conds=generation.padded_conds,
        )
        for seed, subseed in zip(generation.seeds, request.subseeds, strict=True)
    ]


def _metadata(
    request: GenerateRequest,
    generation: Generation,
    inputs: Inputs | None,
    *,
    timings: dict[str, float],
    warnings: list[str],
) -> Metadata:
    """What the job was and what made it: the request as resolved, seeds, adapters, model, device, timings."""
    source_size = inputs.source_size if inputs is not None else None
    model = generation.model
    upload = timings.get("upload")
    return Metadata(
        **request.model_dump(include=_ECHOED_FIELDS),
        **request.task_fields(),
        source_width=source_size[0] if source_size else None,
        source_height=source_size[1] if source_size else None,
        seeds=generation.seeds,
        subseeds=request.subseeds,
        prompt_tokens=generation.prompt_tokens,
        embeddings=generation.embeddings or None,
        loras=[
            AppliedLora(name=item.name, scale=item.scale, hash=item.short_hash, url=item.url)
            for item in generation.loras
        ]
        or None,
        controlnets=_applied_controlnets(request, inputs),
        model=model.name,
        model_hash=model.model_hash,
        model_url=model.url,
        vae=model.vae,
        vae_hash=model.vae_hash,
        device=generation.device,
        dtype=generation.dtype,
        memory_profile=generation.memory_profile,
        timings_ms=Timings(
            inputs=None if inputs is None or inputs.read_ms is None else round(inputs.read_ms, 1),
            queue=round(generation.queue_ms, 1),
            inference=round(generation.inference_ms, 1),
            encode=round(timings["encode"], 1),
            upload=None if upload is None else round(upload, 1),
            total=round(timings["total"], 1),
        ),
        phases_ms=generation.phases_ms or None,
        version=__version__,
        warnings=warnings,
    )


# How a warning says that an image meant for the bucket came back inline.
NOT_UPLOADED = "was not uploaded and is returned inline"


def _inline(item: EncodedImage) -> InlineImage:
    return InlineImage(image=base64.b64encode(item.data).decode("ascii"), seed=item.seed, nsfw=item.nsfw)


def _upload(
    request: Delivered, encoded: list[EncodedImage], route: Route, warnings: list[str]
) -> list[InlineImage | UploadedImage]:
    """Upload every image; under ``auto`` a failed one comes back inline, with a warning.

    Raises:
        JobCancelledError: the job was cancelled while its images were uploaded (the rest were not).
    """
    storage, job_id, cancelled = route.storage, route.job_id, route.cancelled
    if storage is None:  # the schema refuses output_type 's3' without a bucket; this is a wiring bug
        raise StorageError("output_type 's3' needs BUCKET_NAME to be set")
    results = storage.upload_all(
        job_id,
        [
            (item.data, item.label, FORMATS[item.format].extension, FORMATS[item.format].content_type)
            for item in encoded
        ],
        cancelled=cancelled,
    )
    if cancelled is not None and cancelled.is_set():
        raise JobCancelledError("the job was cancelled while its images were uploaded; the rest were not")
    images: list[InlineImage | UploadedImage] = []
    for index, (item, result) in enumerate(zip(encoded, results, strict=True)):
        if isinstance(result, StorageError):
            if request.output_type == "s3":
                raise result
            log.warning("job %s: image %d returned inline: %s", job_id, index, result)
            warnings.append(f"image {index} ({item.label}) {NOT_UPLOADED}: {result}")
            images.append(_inline(item))
        else:
            images.append(
                UploadedImage(
                    url=result.url,
                    bucket=result.bucket,
                    key=result.key,
                    seed=item.seed,
                    format=item.format,
                    nsfw=item.nsfw,
                )
            )
    return images


def _applied_controlnets(request: GenerateRequest, inputs: Inputs | None) -> list[AppliedControlNet] | None:
    """The job's ControlNet units for the metadata, with how each control image was resized."""
    if not request.controlnets:
        return None
    resized = inputs.controls.resized if inputs is not None and inputs.controls is not None else []
    return [
        AppliedControlNet(
            model=unit.model,
            module=unit.preprocess,
            weight=unit.scale,
            guidance_start=unit.start,
            guidance_end=unit.end,
            control_mode=unit.control_mode,
            resized=resized[index] if index < len(resized) else None,
        )
        for index, unit in enumerate(request.controlnets)
    ]
