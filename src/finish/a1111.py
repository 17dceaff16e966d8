"""An A1111 request's answer in A1111's own shape, made of this worker's answer.

``/sdapi/v1/txt2img`` and ``img2img`` answer ``{"images": [base64, ...], "parameters": {the request},
"info": "{JSON: seed, all_seeds, infotexts, ...}"}``; ``/sdapi/v1/extra-single-image`` answers ``{"image":
base64, "html_info": "..."}``, as A1111's API does. An image uploaded to S3 is its URL in place of its base64.
The worker's own ``metadata`` comes beside them: a client written for A1111 reads past a key it does not know.
"""

from __future__ import annotations

import html
import json
import time
from typing import TYPE_CHECKING, Any

from src import __version__
from src.finish.response import infotexts
from src.finish.upscaled import postprocessing_line
from src.schema import GenerateResponse, InlineImage, UploadedImage, UpscaleResponse

if TYPE_CHECKING:
    from src.prepare import JobPlan, UpscalePlan
    from src.run.engine import Generation
    from src.schema import A1111Call


def picture(image: InlineImage | UploadedImage) -> str:
    """One image as A1111 lists it: its base64; or, uploaded, its URL."""
    return image.image if isinstance(image, InlineImage) else image.url


def a1111_upscale_answer(call: A1111Call, plan: UpscalePlan, response: UpscaleResponse) -> dict[str, Any]:
    """``/sdapi/v1/extra-single-image``'s answer: the image and A1111's html_info line. The image is always
    there, as in A1111's (its ``show_extras_results`` is read, and acts on a batch's results only)."""
    return {
        "html_info": f"<p>{html.escape(postprocessing_line(plan))}</p>",
        "image": picture(response.images[0]),
        "metadata": response.metadata.model_dump(exclude_none=True),
    }


def a1111_answer(call: A1111Call, plan: JobPlan, generation: Generation, response: GenerateResponse) -> dict[str, Any]:
    """``/sdapi/v1/txt2img``'s or ``img2img``'s answer: the images, the request echoed, and A1111's info."""
    metadata = response.metadata
    return {
        "images": [picture(image) for image in response.images] if call.send_images else [],
        "parameters": call.parameters,
        "info": json.dumps(_info(call, plan, generation, response), ensure_ascii=False),
        "metadata": {**metadata.model_dump(exclude_none=True), "warnings": [*metadata.warnings, *call.notes]},
    }


def _info(call: A1111Call, plan: JobPlan, generation: Generation, response: GenerateResponse) -> dict[str, Any]:
    """A1111's ``info`` object (its ``Processed.js()``), with the values this job ran with."""
    request, metadata = plan.request, response.metadata
    count = len(metadata.seeds)
    width, height = request.size
    strength = request.hires.strength if request.hires is not None else None
    batch_size = call.parameters.get("batch_size")
    return {
        "prompt": request.prompt,
        "all_prompts": [request.prompt] * count,
        "negative_prompt": request.negative_prompt,
        "all_negative_prompts": [request.negative_prompt] * count,
        "seed": metadata.seeds[0],
        "all_seeds": metadata.seeds,
        "subseed": request.subseed,
        "all_subseeds": metadata.subseeds,
        "subseed_strength": request.subseed_strength,
        "width": width,
        "height": height,
        "sampler_name": request.scheduler,
        "cfg_scale": request.guidance_scale,
        "steps": request.num_inference_steps,
        "batch_size": batch_size if isinstance(batch_size, int) else 1,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": metadata.model,
        "sd_model_hash": metadata.model_hash,
        "sd_vae_name": metadata.vae,
        "sd_vae_hash": metadata.vae_hash,
        "seed_resize_from_w": request.seed_resize_from_w or -1,
        "seed_resize_from_h": request.seed_resize_from_h or -1,
        "denoising_strength": request.strength if request.image is not None else strength,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": infotexts(request, generation, plan.inputs),
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": request.clip_skip,
        "is_using_inpainting_conditioning": False,
        "version": f"sd15-worker {__version__}",
    }
