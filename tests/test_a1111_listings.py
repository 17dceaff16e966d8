"""A1111's GET endpoints: answered in A1111's shapes, and what they list is what an A1111 payload takes.

The worker is tests/test_a1111_api.py's: the tiny model, MODELS_DIR's tiny checkpoints, its ControlNets and the
tiny upscalers. Each listed name goes back into a payload as A1111's clients send it (a checkpoint's title in
``override_settings``, a sampler with its schedule, an upscaler, a ControlNet model, the options themselves).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import handler
from src.schema import A1111_LISTINGS, read_a1111
from tests.a1111_payloads import CONTROL, FLAT, PICTURE
from tests.test_a1111_api import volume, worker

__all__ = ["volume", "worker"]  # the fixtures, shared with tests/test_a1111_api.py

pytestmark = pytest.mark.usefixtures("worker")


def get(endpoint: str, **more: Any) -> Any:
    job = {"id": "listing", "input": {"api": {"method": "GET", "endpoint": endpoint}, **more}}
    return asyncio.run(handler.handler(job))


def taken(payload: dict[str, Any], endpoint: str = "/sdapi/v1/txt2img") -> dict[str, Any]:
    """This worker's input an A1111 payload is read as; an InputError when it is refused."""
    call = read_a1111({"input": {"api": {"method": "POST", "endpoint": endpoint}, "payload": payload}})
    assert call is not None
    return call.input


# The keys of each listing's items, as A1111 1.10's API models (modules/api/models.py) and its ControlNet
# extension answer them; None for a listing that is an object.
SHAPES: dict[str, set[str] | None] = {
    "/sdapi/v1/sd-models": {"title", "model_name", "hash", "sha256", "filename", "config"},
    "/sdapi/v1/sd-vae": {"model_name", "filename"},
    "/sdapi/v1/samplers": {"name", "aliases", "options"},
    "/sdapi/v1/schedulers": {"name", "label", "aliases", "default_rho", "need_inner_model"},
    "/sdapi/v1/upscalers": {"name", "model_name", "model_path", "model_url", "scale"},
    "/sdapi/v1/latent-upscale-modes": {"name"},
    "/sdapi/v1/loras": {"name", "alias", "path", "metadata"},
    "/sdapi/v1/embeddings": None,
    "/sdapi/v1/options": None,
    "/controlnet/model_list": None,
    "/controlnet/module_list": None,
}


@pytest.mark.parametrize("endpoint", A1111_LISTINGS)
def test_each_listing_answers_in_a1111s_shape(endpoint: str) -> None:
    answer = get(endpoint)

    keys = SHAPES[endpoint]
    if keys is None:
        assert isinstance(answer, dict), answer
        assert "error" not in answer, answer["error"]
    else:
        assert isinstance(answer, list), answer
        assert all(set(item) == keys for item in answer), answer
    assert get(endpoint.removeprefix("/sdapi/v1")) == answer, "named without its prefix, as a POST endpoint may be"


def test_a_checkpoint_listed_runs_by_its_title_and_the_options_name_the_default() -> None:
    models = get("/sdapi/v1/sd-models")
    assert [model["model_name"] for model in models][1:] == ["styles/tiny-b", "tiny-a", "tiny-c"]
    assert get("/sdapi/v1/options")["sd_model_checkpoint"] == models[0]["title"]
    # Its hash is not known until it is read, as in A1111: its title is its file's name.
    assert models[2]["title"] == "tiny-a.safetensors"
    assert models[2]["hash"] is None

    payload = {**FLAT, "steps": 1, "batch_size": 1, "override_settings": {"sd_model_checkpoint": models[2]["title"]}}
    result = asyncio.run(handler.handler({"id": "by-title", "input": payload}))
    assert "error" not in result, result["error"]
    tiny_a = get("/sdapi/v1/sd-models")[2]
    assert tiny_a["title"] == f"tiny-a.safetensors [{tiny_a['hash']}]", "A1111's title: the file and its short hash"
    assert tiny_a["sha256"].startswith(tiny_a["hash"])
    assert f"Model: tiny-a, Model hash: {tiny_a['hash']}" in result["info"]
    rerun = {**payload, "override_settings": {"sd_model_checkpoint": tiny_a["title"]}}
    assert "error" not in asyncio.run(handler.handler({"id": "by-title-and-hash", "input": rerun}))


def test_every_sampler_schedule_upscaler_and_controlnet_listed_is_taken_by_a_payload() -> None:
    samplers = get("/sdapi/v1/samplers")
    assert {"DPM++ 2M", "DPM++ 2M SDE", "Euler a", "PLMS", "LCM"} <= {sampler["name"] for sampler in samplers}
    for sampler in samplers:
        schedule = sampler["options"].get("scheduler", "Automatic")
        assert taken({"prompt": "a", "sampler_name": sampler["name"], "scheduler": schedule})["scheduler"]
    schedules = {schedule["label"] for schedule in get("/sdapi/v1/schedulers")}
    pairs = {"Automatic": "Euler", "Uniform": "Euler", "Karras": "DPM++ 2M", "Exponential": "DPM++ 2M SDE"}
    assert schedules == set(pairs)
    for label, sampler in pairs.items():
        assert taken({"prompt": "a", "sampler_name": sampler, "scheduler": label})["scheduler"].startswith(sampler)

    for upscaler in get("/sdapi/v1/upscalers"):
        extras = {"image": PICTURE, "upscaler_1": upscaler["name"], "upscaling_resize": 2}
        assert taken(extras, "/sdapi/v1/extra-single-image")["upscaler"]
        assert taken({"prompt": "a", "enable_hr": True, "hr_upscaler": upscaler["name"]})["hires"]["upscaler"]
    for mode in get("/sdapi/v1/latent-upscale-modes"):
        assert taken({"prompt": "a", "enable_hr": True, "hr_upscaler": mode["name"]})["hires"]["upscaler"]

    [model] = get("/controlnet/model_list")["model_list"][:1]
    modules = get("/controlnet/module_list")["module_list"]
    assert modules == ["none", "canny"]
    for module in modules:
        unit = {"model": model, "module": module, "image": CONTROL}
        scripts = {"controlnet": {"args": [unit]}}
        assert taken({"prompt": "a", "alwayson_scripts": scripts})["controlnets"][0]["model"] == model


def test_the_options_go_back_as_override_settings() -> None:
    options = get("/sdapi/v1/options")

    assert options["randn_source"] == "CPU"
    assert taken({"prompt": "a", "override_settings": options})["clip_skip"] == 1


@pytest.mark.parametrize(
    ("api", "more", "says"),
    [
        pytest.param(
            {"method": "GET", "endpoint": "/sdapi/v1/sd-models"},
            {"payload": {"x": 1}},
            "payload={'x': 1}: a GET request takes none",
            id="payload",
        ),
        pytest.param(
            {"method": "POST", "endpoint": "/sdapi/v1/sd-models"},
            {"payload": {}},
            "api.method='POST': must be GET, the method of /sdapi/v1/sd-models",
            id="post-a-listing",
        ),
        pytest.param(
            {"method": "GET", "endpoint": "/sdapi/v1/txt2img"},
            {"payload": {}},
            "api.method='GET': must be POST",
            id="get-a-generation",
        ),
    ],
)
def test_a_listing_asked_for_wrongly_is_refused_and_the_next_job_runs(
    api: dict[str, str], more: dict[str, Any], says: str
) -> None:
    result = asyncio.run(handler.handler({"id": "wrong", "input": {"api": api, **more}}))

    assert says in result["error"], result
    assert isinstance(get("/sdapi/v1/samplers"), list)
