"""Images -> the response: encoding with embedded parameters, inline or S3, size guard.

Every image file carries its generation parameters in AUTOMATIC1111's format
(a PNG text chunk ``parameters``, or EXIF UserComment for JPEG and WebP), so
tools that read A1111 metadata show them. Where each image goes follows
``output_type``; an upload that fails under ``auto`` comes back inline with a
warning, so an image is never lost.
"""

from __future__ import annotations

import base64
import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import ExifTags, Image, PngImagePlugin

from src import __version__
from src.errors import ResponseTooLargeError, StorageError
from src.schema import (
    CONTROL_MODE_LABELS,
    TASK_FIELDS,
    AppliedControlNet,
    AppliedLora,
    GenerateRequest,
    GenerateResponse,
    InlineImage,
    Metadata,
    Timings,
    UploadedImage,
    lora_tags,
)

if TYPE_CHECKING:
    from src.adapters.loras import Applied
    from src.prepare.canvas import Inputs
    from src.run.engine import Engine, Generation
    from src.settings import Settings
    from src.storage import S3Storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageFormat:
    """How one output format is written."""

    pil_name: str
    extension: str
    content_type: str
    lossy: bool
    # A floor on bytes per pixel for a real image, used to refuse, before any work,
    # a request whose answer could not fit inline whatever the images look like.
    min_bytes_per_pixel: float


FORMATS = {
    "png": ImageFormat("PNG", "png", "image/png", lossy=False, min_bytes_per_pixel=0.5),
    "jpeg": ImageFormat("JPEG", "jpg", "image/jpeg", lossy=True, min_bytes_per_pixel=0.02),
    "webp": ImageFormat("WEBP", "webp", "image/webp", lossy=True, min_bytes_per_pixel=0.01),
}

# Chosen with bench/encode.py (figures in the README). PNG: zlib level 1 encodes a
# 1024² image in 87 ms against 376 ms at Pillow's default 6, for a file 18% larger.
# WebP: libwebp effort 2 of 6 halves the time of Pillow's default 4 for files 2-4% larger.
PNG_COMPRESS_LEVEL = 1
WEBP_METHOD = 2
_BASE64_GROWTH = 4 / 3
# The request fields every job's metadata repeats, as the request resolved them (defaults filled in);
# the fields of one task come from GenerateRequest.task_fields, the LoRAs (with their hashes) from the engine,
# the ControlNet units with how their images were resized.
_TASK_FIELDS = {name for names in TASK_FIELDS.values() for name in names}
_ECHOED = set(Metadata.model_fields) & set(GenerateRequest.model_fields)
_ECHOED_FIELDS = _ECHOED - _TASK_FIELDS - {"loras", "controlnets"}
# A1111's names for the hires upscalers.
_HIRES_UPSCALER_NAMES = {"latent": "Latent", "lanczos": "Lanczos"}
# The ControlNet extension's names for the resize modes (its ResizeMode enum).
_CONTROLNET_RESIZE_MODES = {"resize": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill"}
_USER_COMMENT_UNICODE = b"UNICODE\x00"  # EXIF 2.3 character code for UTF-16 text, as A1111 writes it


@dataclass(frozen=True)
class EncodedImage:
    """One image file, ready to send."""

    data: bytes
    seed: int
    format: str
    nsfw: bool | None = None


def a1111_parameters(
    request: GenerateRequest,
    seed: int,
    model: str,
    *,
    model_hash: str | None = None,
    vae: str | None = None,
    vae_hash: str | None = None,
    source_size: tuple[int, int] | None = None,
    embeddings: dict[str, str] | None = None,
    loras: Sequence[Applied] = (),
    control_sizes: Sequence[tuple[int, int]] = (),
) -> str:
    """The parameters text AUTOMATIC1111 writes into its images, for one image.

    Like A1111, it has no "Negative prompt:" line when the negative prompt is empty, and
    names only what the task used: ``Denoising strength`` and ``Mask blur`` with an image,
    ``Hires upscale``, ``Hires steps`` and ``Hires upscaler`` with hires fix. LoRAs are
    ``<lora:name:scale>`` tags in the prompt, as A1111 reads them back: those the prompt
    holds stay as they are, those of the ``loras`` field are added at its end.
    ControlNet units are written as ``controlnet_parameters`` says, with ``control_sizes``, the
    control images' own sizes (``ControlMaps.sources``).
    """
    width, height = request.size
    fields = {
        "Steps": request.num_inference_steps,
        "Sampler": request.scheduler,
        "CFG scale": f"{request.guidance_scale:g}",
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model": model,
    }
    # A checkpoint file has A1111's short hash; a diffusers folder or hub id has none.
    named = {"Model hash": model_hash, "VAE": vae, "VAE hash": vae_hash}
    fields.update({name: value for name, value in named.items() if value is not None})
    if request.clip_skip != 1:
        fields["Clip skip"] = request.clip_skip
    task = request.task
    if task != "txt2img":
        fields["Denoising strength"] = f"{request.strength:g}"
        fields["Resize mode"] = request.resize_mode
        if source_size is not None:
            fields["Source size"] = f"{source_size[0]}x{source_size[1]}"
    if task in ("inpaint", "outpaint"):
        fields["Mask blur"] = request.mask_blur
        if request.inpaint_area == "masked":
            fields["Inpaint area"] = "Only masked"
            fields["Masked area padding"] = request.inpaint_padding
        if not request.keep_unmasked:
            fields["Keep unmasked"] = "False"
    if request.outpaint is not None:
        margins = request.outpaint
        fields["Outpaint"] = f'"left {margins.left}, right {margins.right}, top {margins.top}, bottom {margins.bottom}"'
    if request.hires is not None:
        fields["Denoising strength"] = f"{request.hires.strength:g}"
        fields["Hires upscale"] = f"{request.hires.scale:g}"
        fields["Hires steps"] = request.hires.steps
        fields["Hires upscaler"] = _HIRES_UPSCALER_NAMES[request.hires.upscaler]
    if embeddings:
        fields["TI hashes"] = '"' + ", ".join(f"{name}: {digest}" for name, digest in embeddings.items()) + '"'
    if loras:
        fields["Lora hashes"] = '"' + ", ".join(f"{item.name}: {item.short_hash}" for item in loras) + '"'
    fields.update(controlnet_parameters(request, control_sizes))
    tagged = {name for _kind, name in _tag_names(request.prompt)}
    added = "".join(f" <lora:{item.name}:{item.scale:g}>" for item in loras if item.name not in tagged)
    negative = f"Negative prompt: {request.negative_prompt}\n" if request.negative_prompt else ""
    return f"{request.prompt}{added}\n{negative}" + ", ".join(f"{name}: {value}" for name, value in fields.items())


def controlnet_parameters(request: GenerateRequest, control_sizes: Sequence[tuple[int, int]] = ()) -> dict[str, str]:
    """Each ControlNet unit as A1111's ControlNet extension writes it (``ControlNetUnit.serialize()``), every
    field in its order, so that A1111 replays the unit: ``ControlNet 0: "Module: canny, ..."``.

    ``control_sizes`` are the control images' own sizes: canny runs on the image as it is, which the extension
    does when its processor resolution is the image's short side. ``none`` has no sliders; the extension writes
    their defaults for it (512, 0.5, 0.5). Without a size, a canny unit's ``Processor Res`` is left out.
    """
    units = {}
    for index, unit in enumerate(request.controlnets):
        if unit.preprocess == "canny":
            low, high = unit.canny_thresholds
            resolution = min(control_sizes[index]) if index < len(control_sizes) else None
            sliders = {"Processor Res": resolution, "Threshold A": float(low), "Threshold B": float(high)}
        else:
            sliders = {"Processor Res": 512, "Threshold A": 0.5, "Threshold B": 0.5}
        fields = {
            "Module": unit.preprocess,
            "Model": unit.model,
            "Weight": float(unit.scale),
            "Resize Mode": _CONTROLNET_RESIZE_MODES[request.resize_mode],
            **sliders,
            "Guidance Start": float(unit.start),
            "Guidance End": float(unit.end),
            "Pixel Perfect": False,
            "Control Mode": CONTROL_MODE_LABELS[unit.control_mode],
        }
        text = ", ".join(f"{name}: {value}" for name, value in fields.items() if value is not None)
        units[f"ControlNet {index}"] = f'"{text}"'
    return units


def _tag_names(prompt: str) -> list[tuple[str, str]]:
    """(kind, name) of each extra-network tag in the prompt."""
    return [(kind, arguments.split(":")[0].strip()) for kind, arguments in lora_tags(prompt)]


def encode_image(image: Image.Image, output_format: str, quality: int, parameters: str | None) -> bytes:
    """``image`` as a file of ``output_format``, with ``parameters`` embedded when given."""
    spec = FORMATS[output_format]
    buffer = io.BytesIO()
    options: dict[str, Any] = {}
    if spec.pil_name == "PNG":
        options["compress_level"] = PNG_COMPRESS_LEVEL
        if parameters is not None:
            # add_text writes tEXt, or iTXt when the text is not Latin-1.
            info = PngImagePlugin.PngInfo()
            info.add_text("parameters", parameters)
            options["pnginfo"] = info
    else:
        options["quality"] = quality
        if spec.pil_name == "WEBP":
            options["method"] = WEBP_METHOD
        if parameters is not None:
            exif = Image.Exif()
            exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = _USER_COMMENT_UNICODE + parameters.encode(
                "utf-16-be"
            )
            options["exif"] = exif
    image.save(buffer, format=spec.pil_name, **options)
    return buffer.getvalue()


def _megabytes(size: float) -> str:
    return f"{size / 1_000_000:.1f} MB"


def _too_large(request: GenerateRequest, size: float, limit: float, when: str) -> ResponseTooLargeError:
    return ResponseTooLargeError(
        f"the answer {when} {_megabytes(size)} inline ({request.num_images} x {_size(request)} "
        f"{request.output_format}, base64), over MAX_RESPONSE_MB={limit / 1_000_000:g}. Ways out: "
        "output_format 'jpeg' or 'webp', fewer or smaller images, or S3 (set BUCKET_NAME and use output_type 's3')"
    )


def _size(request: GenerateRequest) -> str:
    width, height = request.output_size
    return f"{width}x{height}"


def check_inline_fits(request: GenerateRequest, settings: Settings) -> None:
    """Refuse, before generating, a request that can only be answered inline and cannot fit.

    Raises:
        ResponseTooLargeError: even the smallest plausible files would be over ``MAX_RESPONSE_MB``.
    """
    if _goes_to_s3(request, settings):
        return
    width, height = request.output_size
    pixels = width * height * request.num_images
    smallest = pixels * FORMATS[request.output_format].min_bytes_per_pixel * _BASE64_GROWTH
    limit = settings.max_response_mb * 1_000_000
    if smallest > limit:
        raise _too_large(request, smallest, limit, "would be at least")


def _goes_to_s3(request: GenerateRequest, settings: Settings) -> bool:
    return request.output_type == "s3" or (request.output_type == "auto" and settings.bucket_configured)


def encode_response(
    request: GenerateRequest,
    generation: Generation,
    engine: Engine,
    *,
    settings: Settings,
    storage: S3Storage | None,
    job_id: str,
    started: float,
    inputs: Inputs | None = None,
) -> GenerateResponse:
    """Encode every image, deliver it inline or to S3, and wrap the lot with its metadata.

    ``started`` is the ``time.perf_counter()`` reading taken when the job arrived; ``inputs``
    are the job's input images as read, when it had any.

    Raises:
        StorageError: an upload failed and the request asked for ``s3`` explicitly.
        ResponseTooLargeError: the inline answer is over ``MAX_RESPONSE_MB``.
    """
    source_size = inputs.source_size if inputs is not None else None
    control_sizes = inputs.controls.sources if inputs is not None and inputs.controls is not None else []
    warnings = [*(inputs.warnings if inputs is not None else []), *generation.warnings]
    if "output_quality" in request.model_fields_set and not FORMATS[request.output_format].lossy:
        warnings.append(
            f"output_quality={request.output_quality} has no effect on {request.output_format}: it is lossless"
        )

    # 1. Encode, with the parameters inside each file.
    encode_started = time.perf_counter()
    encoded = [
        EncodedImage(
            data=encode_image(
                image,
                request.output_format,
                request.output_quality,
                a1111_parameters(
                    request,
                    seed,
                    engine.identity.name,
                    model_hash=engine.identity.model_hash,
                    vae=engine.identity.vae,
                    vae_hash=engine.identity.vae_hash,
                    source_size=source_size,
                    embeddings=generation.embeddings,
                    loras=generation.loras,
                    control_sizes=control_sizes,
                )
                if settings.embed_parameters
                else None,
            ),
            seed=seed,
            format=request.output_format,
            nsfw=None if generation.nsfw is None else generation.nsfw[index],
        )
        for index, (image, seed) in enumerate(zip(generation.images, generation.seeds, strict=True))
    ]
    encode_ms = (time.perf_counter() - encode_started) * 1000

    # 2. Deliver: to S3 when asked or configured, inline otherwise or as the fallback.
    upload_ms = None
    images: list[InlineImage | UploadedImage] = []
    if _goes_to_s3(request, settings):
        upload_started = time.perf_counter()
        images = _upload(request, encoded, storage, job_id, warnings)
        upload_ms = (time.perf_counter() - upload_started) * 1000
    else:
        images = [_inline(item) for item in encoded]

    finished = time.perf_counter()
    response = GenerateResponse(
        images=images,
        metadata=Metadata(
            **request.model_dump(include=_ECHOED_FIELDS),
            **request.task_fields(),
            source_width=source_size[0] if source_size else None,
            source_height=source_size[1] if source_size else None,
            seeds=generation.seeds,
            prompt_tokens=generation.prompt_tokens,
            embeddings=generation.embeddings or None,
            loras=[AppliedLora(name=item.name, scale=item.scale, hash=item.short_hash) for item in generation.loras]
            or None,
            controlnets=_applied_controlnets(request, inputs),
            model=engine.identity.name,
            model_hash=engine.identity.model_hash,
            vae=engine.identity.vae,
            vae_hash=engine.identity.vae_hash,
            device=engine.device.type,
            dtype=engine.dtype_name,
            memory_profile=engine.profile.value,
            timings_ms=Timings(
                inputs=None if inputs is None or inputs.read_ms is None else round(inputs.read_ms, 1),
                queue=round(generation.queue_ms, 1),
                inference=round(generation.inference_ms, 1),
                encode=round(encode_ms, 1),
                upload=None if upload_ms is None else round(upload_ms, 1),
                total=round((finished - started) * 1000, 1),
            ),
            version=__version__,
            warnings=warnings,
        ),
    )

    # 3. The size guard: RunPod refuses answers over its limit, so say so ourselves, clearly.
    # The JSON is pydantic's own, written in Rust; the base64 strings dominate it.
    size = len(response.model_dump_json(exclude_none=True))
    limit = settings.max_response_mb * 1_000_000
    if size > limit:
        raise _too_large(request, size, limit, "is")
    return response


def _inline(item: EncodedImage) -> InlineImage:
    return InlineImage(image=base64.b64encode(item.data).decode("ascii"), seed=item.seed, nsfw=item.nsfw)


def _upload(
    request: GenerateRequest,
    encoded: list[EncodedImage],
    storage: S3Storage | None,
    job_id: str,
    warnings: list[str],
) -> list[InlineImage | UploadedImage]:
    """Upload every image; under ``auto`` a failed one comes back inline, with a warning."""
    if storage is None:  # the schema refuses output_type 's3' without a bucket; this is a wiring bug
        raise StorageError("output_type 's3' needs BUCKET_NAME to be set")
    results = storage.upload_all(
        job_id,
        [(item.data, item.seed, FORMATS[item.format].extension, FORMATS[item.format].content_type) for item in encoded],
    )
    images: list[InlineImage | UploadedImage] = []
    for index, (item, result) in enumerate(zip(encoded, results, strict=True)):
        if isinstance(result, StorageError):
            if request.output_type == "s3":
                raise result
            log.warning("job %s: image %d returned inline: %s", job_id, index, result)
            warnings.append(f"image {index} (seed {item.seed}) was not uploaded and is returned inline: {result}")
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
