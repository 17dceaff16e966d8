"""AUTOMATIC1111's own API payloads (``/sdapi/v1/txt2img``, ``img2img``, ``extra-single-image``) read as this
worker's input.

Two forms arrive. The wrapped one, which other RunPod A1111 workers take: ``{"api": {"method": "POST",
"endpoint": "/sdapi/v1/txt2img"}, "payload": {...}}``. The flat one, which RunPod's own A1111 worker takes: the
payload itself as the job's input, known by A1111's field names (``steps``, ``cfg_scale``, ``sampler_name``...).
``read_a1111`` turns either into this worker's input, which ``GenerateRequest`` or ``UpscaleRequest`` then checks
as any other, and an ``A1111Call``: the endpoint to answer as, the payload to echo, and which A1111 field each of
this worker's fields came from, so that an error names the field the client sent.

Every field of A1111's request models is read: translated, honoured, or accepted at a value that changes nothing
(its neutral value, or any value when it only matters behind a switch that is off). Any other value is refused by
name, as is an unknown field: nothing a client sends is silently dropped. Defaults are A1111's own (50 steps,
CFG 7, Euler, 512x512), so that a payload means here what it means there.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from src.schema.a1111_fields import Translation, translate_upscale
from src.schema.core import INVALID_INPUT, InputError
from src.schema.request import joined_problems, shown

# The endpoints a job may name, and what each is here.
A1111_ENDPOINTS: Mapping[str, str] = {
    "/sdapi/v1/txt2img": "txt2img",
    "/sdapi/v1/img2img": "img2img",
    "/sdapi/v1/extra-single-image": "extra-single-image",
}
# The GET endpoints a job may name: A1111's listings of what it serves (and its ControlNet extension's), answered
# from what the worker has, in A1111's shapes (src/run/a1111_listings.py).
A1111_LISTINGS: tuple[str, ...] = (
    "/sdapi/v1/sd-models",
    "/sdapi/v1/sd-vae",
    "/sdapi/v1/samplers",
    "/sdapi/v1/schedulers",
    "/sdapi/v1/upscalers",
    "/sdapi/v1/latent-upscale-modes",
    "/sdapi/v1/loras",
    "/sdapi/v1/embeddings",
    "/sdapi/v1/options",
    "/controlnet/model_list",
    "/controlnet/module_list",
)
# A1111's PNG Info: the parameters an image carries, read as A1111 reads them (src/finish/png_info.py).
A1111_PNG_INFO = "/sdapi/v1/png-info"
# This worker's fields that mean the same in an A1111 payload: the output options, which A1111 lacks.
NATIVE_IN_A1111 = ("output_format", "output_quality", "output_type")


# The field path an error's problem starts with: ``hires.upscaler='x': ...``, ``controlnets.0.image: ...``, or
# the fields it names together: ``width x height: ...``.
_LEADING_FIELD = re.compile(r"([A-Za-z_][\w.]*(?: x [A-Za-z_][\w.]*)*)(?=[=:])")


@dataclass(frozen=True)
class A1111Call:
    """An A1111 request, read: this worker's input, and how to answer in A1111's shape."""

    # ``txt2img``, ``img2img`` or ``extra-single-image``.
    endpoint: str
    # This worker's input made of the payload.
    input: dict[str, Any]
    # The payload as A1111 echoes it in its answer (``parameters``), its images left out.
    parameters: dict[str, Any]
    # A1111's ``send_images``: false answers with no images. An extra-single-image answer always has its image,
    # as A1111's (its ``show_extras_results`` acts on a batch's results only).
    send_images: bool = True
    # This worker's field path -> the A1111 field it came from, for naming fields in errors.
    names: Mapping[str, str] = field(default_factory=dict)
    # What the client should know: a ControlNet unit left out by ``enabled: false``.
    notes: tuple[str, ...] = ()
    # This worker's fields holding A1111's default for a field the payload left out (``steps``: 50).
    defaulted: frozenset[str] = frozenset()

    def renamed(self, message: str) -> str:
        """An input error about this worker's fields, each problem led by the A1111 field the client sent."""
        body = message.removeprefix(INVALID_INPUT)
        problems = []
        for problem in body.split("; "):
            path = _LEADING_FIELD.match(problem)
            if path is None:
                problems.append(problem)
                continue
            native = path.group(1).split(" x ")
            named = [self.names.get(name, name) for name in native]
            problems.append(" x ".join(named) + problem[path.end(1) :])
            if len(native) == 1 and native[0] in self.defaulted:
                problems[-1] += f" (not sent: A1111's default; send {named[0]})"
        return message[: len(message) - len(body)] + "; ".join(problems)


# This worker's fields, by the A1111 field that names the same thing in an A1111 request.
_COUNTERPARTS: Mapping[str, str] = {
    "num_inference_steps": "steps",
    "guidance_scale": "cfg_scale",
    "num_images": "batch_size",
    "strength": "denoising_strength",
    "hires": "enable_hr",
    "inpaint_area": "inpaint_full_res",
    "inpaint_padding": "inpaint_full_res_padding",
    "inpaint_fill": "inpainting_fill",
    "mask_invert": "inpainting_mask_invert",
    "model": "override_settings.sd_model_checkpoint",
    "vae": "override_settings.sd_vae",
    "clip_skip": "override_settings.CLIP_stop_at_last_layers",
    "pad_conds": "override_settings.pad_cond_uncond",
    "controlnets": "alwayson_scripts.controlnet",
    "upscaler": "upscaler_1",
    "scale": "upscaling_resize",
    "task": "api.endpoint",
    "tome_ratio": "token_merging_ratio",
}
# A1111's fields that this worker's own input never has: one of them makes a flat input an A1111 payload.
A1111_ONLY_FIELDS = frozenset(
    {
        "steps", "cfg_scale", "sampler_name", "sampler_index", "batch_size", "n_iter", "denoising_strength",
        "init_images", "enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y",
        "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt",
        "firstphase_width", "firstphase_height", "restore_faces", "styles", "override_settings",
        "override_settings_restore_afterwards", "alwayson_scripts", "script_name", "script_args", "send_images",
        "save_images", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert",
        "mask_blur_x", "mask_blur_y", "initial_noise_multiplier", "latent_mask", "image_cfg_scale",
        "include_init_images", "eta", "s_churn", "s_tmin", "s_tmax", "s_noise", "s_min_uncond",
        "do_not_save_samples", "do_not_save_grid", "refiner_checkpoint", "refiner_switch_at",
        "disable_extra_networks", "firstpass_image", "comments", "force_task_id", "infotext", "seed_enable_extras",
        "token_merging_ratio", "token_merging_ratio_hr", "upscaling_resize", "upscaling_resize_w",
        "upscaling_resize_h", "upscaling_crop", "upscaler_1", "upscaler_2", "extras_upscaler_2_visibility",
        "gfpgan_visibility", "codeformer_visibility", "codeformer_weight", "upscale_first", "show_extras_results",
    }
)  # fmt: skip
_EXTRAS_FIELDS = frozenset(
    name for name in A1111_ONLY_FIELDS if name.startswith(("upscal", "extras_", "gfpgan", "codeformer"))
)


def _endpoint(api: Any) -> str:
    """The endpoint an ``api`` object names, as a key of ``A1111_ENDPOINTS``.

    Raises:
        InputError: ``api`` is not ``{"method": "POST", "endpoint": ...}`` naming a known endpoint.
    """
    known = ", ".join(A1111_ENDPOINTS)
    method, path = _method_and_path(api)
    for name in A1111_ENDPOINTS:
        if path not in (name, name.removeprefix("/sdapi/v1")):
            continue
        if method != "POST":
            raise InputError(
                f"{INVALID_INPUT}api.method={shown(api.get('method'))}: must be POST, the method of {known}"
            )
        return name
    if _listing(path) is not None:
        raise InputError(f"{INVALID_INPUT}api.method={shown(api.get('method'))}: must be GET, the method of {path}")
    raise _unknown(api.get("endpoint"))


def _unknown(endpoint: Any) -> InputError:
    """The refusal of an endpoint this worker does not answer, naming those it does."""
    return InputError(
        f"{INVALID_INPUT}api.endpoint={shown(endpoint)}: not an endpoint this worker answers; it answers POST "
        f"{', '.join(A1111_ENDPOINTS)}, {A1111_PNG_INFO} and GET {', '.join(A1111_LISTINGS)} "
        '(and {"describe": true} lists its models, samplers and upscalers)'
    )


def _method_and_path(api: Any) -> tuple[str | None, str | None]:
    """An ``api`` object's method (upper case; POST when left out) and endpoint (with one leading slash).

    Raises:
        InputError: ``api`` is not an object of ``method`` and ``endpoint``.
    """
    if not isinstance(api, dict) or set(api) - {"method", "endpoint"}:
        raise InputError(f'{INVALID_INPUT}api={shown(api)}: must be {{"method": "POST", "endpoint": ...}}')
    endpoint, method = api.get("endpoint"), api.get("method", "POST")
    path = "/" + endpoint.strip().strip("/") if isinstance(endpoint, str) else None
    return (method.strip().upper() if isinstance(method, str) else None), path


def _listing(path: str | None) -> str | None:
    """The listing (a key of ``A1111_LISTINGS``) an endpoint path names, ``/sdapi/v1`` left out or not."""
    for name in A1111_LISTINGS:
        if path in (name, name.removeprefix("/sdapi/v1")):
            return name
    return None


def parse_a1111_listing(job: Any) -> str | None:
    """The A1111 listing (a GET endpoint of ``A1111_LISTINGS``) a job asks for; None for any other job.

    Raises:
        InputError: a GET request for another endpoint, or one with a payload.
    """
    data = job.get("input") if isinstance(job, dict) else None
    if not isinstance(data, dict) or "api" not in data or not isinstance(data["api"], dict):
        return None
    method, path = _method_and_path(data["api"])
    listing = _listing(path)
    posted = [*A1111_ENDPOINTS, A1111_PNG_INFO]
    if method != "GET" or (listing is None and any(path in (name, name.removeprefix("/sdapi/v1")) for name in posted)):
        return None  # a POST, or a GET of a POST endpoint: read_a1111 answers, or says what is wrong
    if listing is None:
        raise _unknown(data["api"].get("endpoint"))
    if others := sorted(str(name) for name in set(data) - {"api", "payload"}):
        raise InputError(f"{INVALID_INPUT}{', '.join(others)}: an A1111 request has only api and payload")
    if data.get("payload") not in (None, {}):
        raise InputError(f"{INVALID_INPUT}payload={shown(data['payload'])}: a GET request takes none")
    return listing


def parse_a1111_png_info(job: Any) -> str | None:
    """The image (a reference as ``image`` takes one) a request for A1111's PNG Info sends; None for any other job.

    Raises:
        InputError: the request is not a POST, or its payload is not ``{"image": ...}``.
    """
    data = job.get("input") if isinstance(job, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("api"), dict):
        return None
    method, path = _method_and_path(data["api"])
    if path not in (A1111_PNG_INFO, A1111_PNG_INFO.removeprefix("/sdapi/v1")):
        return None
    if method != "POST":
        raise InputError(
            f"{INVALID_INPUT}api.method={shown(data['api'].get('method'))}: must be POST, the method of {path}"
        )
    if others := sorted(str(name) for name in set(data) - {"api", "payload"}):
        raise InputError(f"{INVALID_INPUT}{', '.join(others)}: an A1111 request has only api and payload")
    payload = data.get("payload")
    if not isinstance(payload, dict):
        raise InputError(f'{INVALID_INPUT}payload={shown(payload)}: must be {{"image": ...}}, the image to read')
    if others := sorted(str(name) for name in set(payload) - {"image"}):
        raise InputError(f"{INVALID_INPUT}payload.{others[0]}: not a field of png-info, which takes only image")
    image = payload.get("image")
    if not isinstance(image, str) or not image.strip():
        raise InputError(f"{INVALID_INPUT}payload.image={shown(image)}: must be an image, as base64")
    return image


def _flat_endpoint(data: Mapping[str, Any]) -> str:
    if data.keys() & _EXTRAS_FIELDS:
        return "/sdapi/v1/extra-single-image"
    return "/sdapi/v1/img2img" if "init_images" in data else "/sdapi/v1/txt2img"


def _native_fields(data: Mapping[str, Any], endpoint: str) -> tuple[list[str], set[str]]:
    """This worker's own fields in an A1111 payload, each refused with its A1111 counterpart: the problems and the
    fields they name."""
    problems, named = [], set()
    extras = endpoint.endswith("extra-single-image")
    native = {
        *_COUNTERPARTS,
        "image",
        "loras",
        "outpaint",
        "keep_unmasked",
        "inpaint_area",
        "hires",
        "deepcache_interval",
    }
    for name in sorted(set(data) & native):
        if name == "image" and extras:
            continue
        named.add(name)
        counterpart = "init_images" if name == "image" else _COUNTERPARTS.get(name)
        if counterpart is not None and counterpart.split(".")[0] in data:
            problems.append(
                f"{name} and {counterpart}: name the same thing in two vocabularies, this worker's and A1111's; "
                f"keep {counterpart}, as the payload's other fields are A1111's"
            )
        else:
            instead = f"A1111's is {counterpart}" if counterpart else "send the job in this worker's own form"
            problems.append(f"{name}: this worker's field, in a payload read as A1111's; {instead}")
    return problems, named


def _echo(payload: Mapping[str, Any], endpoint: str) -> dict[str, Any]:
    """The payload as A1111 echoes it in ``parameters``: its input images left out (unless include_init_images)."""
    echo = dict(payload)
    if endpoint == "img2img" and payload.get("include_init_images") is not True:
        echo.update(init_images=None, mask=None)
    if endpoint == "extra-single-image":
        echo["image"] = None
    scripts = echo.get("alwayson_scripts")
    if isinstance(scripts, dict):
        echo["alwayson_scripts"] = {
            name: {"args": [_without_images(unit) if isinstance(unit, dict) else unit for unit in script["args"]]}
            if isinstance(script, dict) and isinstance(script.get("args"), list)
            else script
            for name, script in scripts.items()
        }
    return echo


def _without_images(unit: dict[str, Any]) -> dict[str, Any]:
    """A ControlNet unit as the echo gives it: its images (under every name the extension takes) left out."""
    return {**unit, **{name: None for name in _UNIT_IMAGE_FIELDS if name in unit}, "image": None}


# The names under which the ControlNet extension's API takes a unit's images.
_UNIT_IMAGE_FIELDS = ("image", "input_image", "mask", "mask_image")


def a1111_endpoint(data: Any) -> str | None:
    """The endpoint (``txt2img``, ``img2img``, ``extra-single-image``) an A1111 input names or, flat, implies;
    None for this worker's own input or an endpoint it does not answer."""
    if not names_a1111(data):
        return None
    try:
        path = _endpoint(data["api"]) if "api" in data else _flat_endpoint(data)
    except InputError:
        return None
    return A1111_ENDPOINTS[path]


def names_a1111(data: Any) -> bool:
    """Whether a job's input is an A1111 request: wrapped (``api`` and ``payload``) or flat (A1111's field names)."""
    return isinstance(data, dict) and ("api" in data or bool(data.keys() & A1111_ONLY_FIELDS))


def read_a1111(job: Any) -> A1111Call | None:
    """The job's input read as an A1111 request; None when it is this worker's own.

    Raises:
        InputError: naming every field the worker cannot honour, or an unknown endpoint with the known ones.
    """
    data = job.get("input") if isinstance(job, dict) else None
    if not names_a1111(data):
        return None
    assert isinstance(data, dict)
    if "api" in data:
        if others := sorted(str(name) for name in set(data) - {"api", "payload"}):
            raise InputError(f"{INVALID_INPUT}{', '.join(others)}: an A1111 request has only api and payload")
        endpoint, payload = _endpoint(data["api"]), data.get("payload")
        if not isinstance(payload, dict):
            raise InputError(f"{INVALID_INPUT}payload={shown(payload)}: must be the A1111 request's JSON object")
    else:
        endpoint, payload = _flat_endpoint(data), data
    problems, named = _native_fields(payload, endpoint)
    translation = Translation(A1111_ENDPOINTS[endpoint], payload)
    translation.fields.accept(*NATIVE_IN_A1111, *named)
    if endpoint.endswith("extra-single-image"):
        translate_upscale(translation)
    else:
        translation.generation()
        translation.hires() if endpoint.endswith("txt2img") else translation.img2img()
    # A1111's answer carries its images inline: an upload is asked for by name, whatever the worker's bucket.
    translation.out["output_type"] = "base64"
    for name in NATIVE_IN_A1111:
        if name in payload:
            translation.out[name] = payload[name]
    translation.fields.unknown(f"of A1111's {endpoint} (docs/a1111.md lists the fields read)")
    if problems := problems + translation.fields.problems:
        raise InputError(joined_problems(problems))
    send = True if endpoint.endswith("extra-single-image") else payload.get("send_images", True)
    return A1111Call(
        endpoint=A1111_ENDPOINTS[endpoint],
        input=translation.out,
        parameters=_echo(payload, A1111_ENDPOINTS[endpoint]),
        send_images=send is not False,
        names=translation.names,
        notes=tuple(translation.notes),
        defaulted=frozenset(translation.defaulted),
    )
