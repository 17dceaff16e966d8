"""A set of A1111 API payloads, each beside this worker's native request that means the same.

Written from A1111's API documentation (its ``/docs`` page, generated from ``StableDiffusionProcessingTxt2Img``/
``Img2Img`` and ``ExtrasSingleImageRequest``) and the ControlNet extension's API wiki, as clients send them:
RunPod's own A1111 worker's flat form, a client generated from the docs that sends every field (most at their
neutral value), hires fix with overrides, variation seeds, img2img, inpaint, ControlNet units, Extras. The tiny
model's sizes keep each job short. Shared by the handler's tests (tests/test_a1111_api.py), the local HTTP API's
and the command line's.
"""

from __future__ import annotations

import base64
import io
from typing import Any

from PIL import Image

from builder.tiny_model import CONTROLNET_DIFFUSERS
from tests.conftest import box_mask, noise_image

__all__ = ["CONTROLNET_DIFFUSERS"]


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def wrapped(endpoint: str, payload: dict[str, Any]) -> dict[str, Any]:
    """A payload as other RunPod A1111 workers take it: ``{"api": {...}, "payload": ...}``."""
    return {"api": {"method": "POST", "endpoint": f"/sdapi/v1/{endpoint}"}, "payload": payload}


SIZE = {"width": 64, "height": 64}
PROMPT = "a lighthouse on a cliff, (storm:1.2)"
NEGATIVE = "blurry"


PICTURE = png_base64(noise_image(64, 64, seed=4))
MASK = png_base64(box_mask(64, 64, (16, 16, 48, 48)))
# A control image of shapes, so that canny finds edges.
_shapes = Image.new("RGB", (64, 64), "black")
_shapes.paste((255, 255, 255), (12, 20, 40, 52))
CONTROL = png_base64(_shapes)


# RunPod's own A1111 worker: the txt2img payload itself as the job's input.
FLAT = {
    "prompt": PROMPT,
    "negative_prompt": NEGATIVE,
    "steps": 3,
    "cfg_scale": 7,
    "sampler_name": "DPM++ 2M Karras",
    "seed": 1234,
    **SIZE,
}
FLAT_NATIVE = {
    "prompt": PROMPT,
    "negative_prompt": NEGATIVE,
    "num_inference_steps": 3,
    "guidance_scale": 7.0,
    "scheduler": "DPM++ 2M Karras",
    "seed": 1234,
    **SIZE,
}

# A client generated from A1111's /docs: every field, most at their neutral value.
GENERATED = {
    "prompt": PROMPT,
    "negative_prompt": NEGATIVE,
    "styles": [],
    "seed": 99,
    "subseed": -1,
    "subseed_strength": 0,
    "seed_resize_from_h": -1,
    "seed_resize_from_w": -1,
    "sampler_name": "DPM++ 2M",
    "scheduler": "Karras",
    "batch_size": 2,
    "n_iter": 1,
    "steps": 3,
    "cfg_scale": 6.5,
    **SIZE,
    "restore_faces": False,
    "tiling": False,
    "do_not_save_samples": False,
    "do_not_save_grid": False,
    "eta": 0,
    "denoising_strength": 0,
    "s_min_uncond": 0,
    "s_churn": 0,
    "s_tmax": 0,
    "s_tmin": 0,
    "s_noise": 0,
    "override_settings": {},
    "override_settings_restore_afterwards": True,
    "refiner_checkpoint": "",
    "refiner_switch_at": 0,
    "disable_extra_networks": False,
    "firstpass_image": "",
    "comments": {},
    "enable_hr": False,
    "firstphase_width": 0,
    "firstphase_height": 0,
    "hr_scale": 2,
    "hr_upscaler": "string",
    "hr_second_pass_steps": 0,
    "hr_resize_x": 0,
    "hr_resize_y": 0,
    "hr_checkpoint_name": "string",
    "hr_sampler_name": "string",
    "hr_scheduler": "string",
    "hr_prompt": "",
    "hr_negative_prompt": "",
    "force_task_id": "string",
    "sampler_index": "Euler",
    "script_name": "",
    "script_args": [],
    "send_images": True,
    "save_images": False,
    "alwayson_scripts": {},
    "infotext": "",
}
GENERATED_NATIVE = {
    "prompt": PROMPT,
    "negative_prompt": NEGATIVE,
    "seed": 99,
    "scheduler": "DPM++ 2M Karras",
    "num_images": 2,
    "num_inference_steps": 3,
    "guidance_scale": 6.5,
    **SIZE,
}

HIRES = {
    "prompt": PROMPT,
    "steps": 2,
    "seed": 7,
    **SIZE,
    "sampler_name": "Euler a",
    "enable_hr": True,
    "hr_scale": 1.5,
    "hr_upscaler": "Latent",
    "hr_second_pass_steps": 2,
    "denoising_strength": 0.6,
    "hr_sampler_name": "Euler",
    "hr_prompt": "a lighthouse at night",
    # As A1111's paste sends an image's parameters: its RNG (randn_source) with them.
    "override_settings": {
        "CLIP_stop_at_last_layers": 2,
        "pad_cond_uncond": True,
        "pad_cond_uncond_v0": False,
        "sd_model_checkpoint": "tiny-a.safetensors [0123456789]",
        "randn_source": "CPU",
        "eta_noise_seed_delta": 0,
    },
}
HIRES_NATIVE = {
    "prompt": PROMPT,
    "num_inference_steps": 2,
    "guidance_scale": 7.0,
    "seed": 7,
    **SIZE,
    "scheduler": "Euler a",
    "clip_skip": 2,
    "pad_conds": True,
    "model": "tiny-a",
    "hires": {
        "scale": 1.5,
        "upscaler": "latent",
        "steps": 2,
        "strength": 0.6,
        "sampler": "Euler",
        "prompt": "a lighthouse at night",
    },
}

VARIATION = {
    "prompt": PROMPT,
    "steps": 2,
    "seed": 11,
    "subseed": 12,
    "subseed_strength": 0.4,
    "seed_resize_from_w": 48,
    "seed_resize_from_h": 48,
    "tiling": True,
    "sampler_name": "Euler",
    **SIZE,
}
VARIATION_NATIVE = {
    "prompt": PROMPT,
    "num_inference_steps": 2,
    "guidance_scale": 7.0,
    "seed": 11,
    "subseed": 12,
    "subseed_strength": 0.4,
    "seed_resize_from_w": 48,
    "seed_resize_from_h": 48,
    "tiling": True,
    "scheduler": "Euler",
    **SIZE,
}

IMG2IMG = {
    "init_images": [PICTURE],
    "prompt": PROMPT,
    "denoising_strength": 0.5,
    "resize_mode": 1,
    "steps": 4,
    "seed": 21,
    "sampler_name": "Euler",
    "width": 64,
    "height": 128,
    "include_init_images": False,
}
IMG2IMG_NATIVE = {
    "image": PICTURE,
    "prompt": PROMPT,
    "strength": 0.5,
    "resize_mode": "crop",
    "num_inference_steps": 4,
    "guidance_scale": 7.0,
    "seed": 21,
    "scheduler": "Euler",
    "width": 64,
    "height": 128,
}

INPAINT = {
    "init_images": [PICTURE],
    "mask": MASK,
    "prompt": PROMPT,
    "denoising_strength": 0.75,
    "mask_blur": 2,
    "inpainting_fill": 1,
    "inpaint_full_res": False,
    "inpaint_full_res_padding": 32,
    "inpainting_mask_invert": 0,
    "steps": 4,
    "seed": 31,
    "sampler_name": "Euler",
    **SIZE,
}
INPAINT_NATIVE = {
    "image": PICTURE,
    "mask": MASK,
    "prompt": PROMPT,
    "strength": 0.75,
    "mask_blur": 2,
    "mask_round": True,  # A1111's default: the blurred mask is rounded at the latents' size
    "num_inference_steps": 4,
    "guidance_scale": 7.0,
    "seed": 31,
    "scheduler": "Euler",
    **SIZE,
}

# A1111's API defaults for inpaint: masked content "fill", only the masked area, padding 0; here inverted.
INPAINT_DEFAULTS = {
    "init_images": [PICTURE],
    "mask": MASK,
    "prompt": PROMPT,
    "inpainting_mask_invert": 1,
    "steps": 4,
    "seed": 32,
    "mask_blur_x": 3,
    "mask_blur_y": 3,
    **SIZE,
}
INPAINT_DEFAULTS_NATIVE = {
    "image": PICTURE,
    "mask": MASK,
    "prompt": PROMPT,
    "strength": 0.75,
    "mask_blur": 3,
    "inpaint_fill": "fill",
    "inpaint_area": "masked",
    "inpaint_padding": 0,
    "mask_invert": True,
    "mask_round": True,
    "num_inference_steps": 4,
    "guidance_scale": 7.0,
    "seed": 32,
    "scheduler": "Euler",
    **SIZE,
}

# The ControlNet extension's API: a unit in alwayson_scripts.controlnet.args, its model named with its hash.
CONTROLNET = {
    "prompt": PROMPT,
    "steps": 2,
    "seed": 41,
    **SIZE,
    "sampler_name": "Euler",
    "alwayson_scripts": {
        "controlnet": {
            "args": [
                {
                    "enabled": True,
                    "input_image": CONTROL,
                    "module": "canny",
                    "model": f"{CONTROLNET_DIFFUSERS} [a1b2c3d4]",
                    "weight": 0.8,
                    "resize_mode": "Crop and Resize",
                    "low_vram": False,
                    "processor_res": 64,
                    "threshold_a": 50,
                    "threshold_b": 150,
                    "guidance_start": 0.0,
                    "guidance_end": 0.5,
                    "control_mode": "My prompt is more important",
                    "pixel_perfect": False,
                    "hr_option": "Both",
                    "save_detected_map": True,
                },
                {"enabled": False, "image": CONTROL, "module": "none", "model": "None"},
            ]
        }
    },
}
CONTROLNET_NATIVE = {
    "prompt": PROMPT,
    "num_inference_steps": 2,
    "guidance_scale": 7.0,
    "seed": 41,
    **SIZE,
    "scheduler": "Euler",
    "controlnets": [
        {
            "model": CONTROLNET_DIFFUSERS,
            "image": CONTROL,
            "preprocess": "canny",
            "low": 50,
            "high": 150,
            "processor_res": 64,
            "scale": 0.8,
            "start": 0.0,
            "end": 0.5,
            "control_mode": "prompt",
            "resize_mode": "crop",
        }
    ],
}

EXTRAS = {
    "resize_mode": 0,
    "show_extras_results": True,
    "gfpgan_visibility": 0,
    "codeformer_visibility": 0,
    "codeformer_weight": 0,
    "upscaling_resize": 2,
    "upscaling_resize_w": 512,
    "upscaling_resize_h": 512,
    "upscaling_crop": True,
    "upscaler_1": "tiny-compact-2x",
    "upscaler_2": "None",
    "extras_upscaler_2_visibility": 0,
    "upscale_first": False,
    "image": PICTURE,
}
EXTRAS_NATIVE = {"task": "upscale", "image": PICTURE, "upscaler": "tiny-compact-2x", "scale": 2.0}
EXTRAS_TO_SIZE = {
    "resize_mode": 1,
    "upscaling_resize_w": 160,
    "upscaling_resize_h": 96,
    "upscaling_crop": True,
    "upscaler_1": "Lanczos",
    "image": PICTURE,
}
EXTRAS_TO_SIZE_NATIVE = {
    "task": "upscale",
    "image": PICTURE,
    "upscaler": "lanczos",
    "width": 160,
    "height": 96,
    "resize_mode": "crop",
}

# (name, endpoint, payload, native request): every payload of the set.
PAYLOADS: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    ("flat", "txt2img", FLAT, FLAT_NATIVE),
    ("generated-client", "txt2img", GENERATED, GENERATED_NATIVE),
    ("hires-model-clip-skip", "txt2img", HIRES, HIRES_NATIVE),
    ("variation-seed-resize-tiling", "txt2img", VARIATION, VARIATION_NATIVE),
    ("img2img", "img2img", IMG2IMG, IMG2IMG_NATIVE),
    ("inpaint", "img2img", INPAINT, INPAINT_NATIVE),
    ("inpaint-a1111-defaults-inverted", "img2img", INPAINT_DEFAULTS, INPAINT_DEFAULTS_NATIVE),
    (
        "inpaint-latent-noise",
        "img2img",
        {**INPAINT, "inpainting_fill": 2},
        {**INPAINT_NATIVE, "inpaint_fill": "latent_noise"},
    ),
    ("controlnet", "txt2img", CONTROLNET, CONTROLNET_NATIVE),
    ("extras-by-factor-model", "extra-single-image", EXTRAS, EXTRAS_NATIVE),
    ("extras-to-size-lanczos", "extra-single-image", EXTRAS_TO_SIZE, EXTRAS_TO_SIZE_NATIVE),
]
