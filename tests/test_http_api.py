"""runpod's local HTTP API, started as a real subprocess the way the README says."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from tests.a1111_payloads import FLAT, PAYLOADS, wrapped
from tests.conftest import ROOT, SPANDREL_SITE, decode_png, free_port, noise_image, wait_for_port

# One process runs this module's tests (``--dist loadgroup``): they share one server.
pytestmark = pytest.mark.xdist_group("http-api")


@dataclass
class Server:
    """The local API's address, and everything the process has printed so far."""

    url: str
    lines: list[str] = field(default_factory=list)

    def wait_for_output(self, text: str, deadline_s: float = 60) -> str:
        """The output once it holds ``text``; the process prints it before it answers, so this is a formality."""
        deadline = time.monotonic() + deadline_s
        while text not in (output := "".join(self.lines)):
            if time.monotonic() > deadline:
                pytest.fail(f"{text!r} not in the output within {deadline_s} s:\n{output[-3000:]}")
            time.sleep(0.1)
        return output


@pytest.fixture(scope="module")
def server(offline_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from builder.tiny_lora import write_test_loras
    from builder.tiny_model import write_tiny_controlnets, write_tiny_models
    from builder.tiny_upscalers import write_tiny_upscalers

    loras = tmp_path_factory.mktemp("loras")
    write_test_loras(offline_env["MODEL_ID"], loras, count=1)
    upscalers = write_tiny_upscalers(tmp_path_factory.mktemp("upscalers"))
    # The tiny ControlNets, copied from the served model's UNet (write_tiny_controlnets reads its unet/).
    controlnet_source = tmp_path_factory.mktemp("controlnet-source")
    (controlnet_source / "unet").symlink_to(Path(offline_env["MODEL_ID"]) / "unet")
    controlnets = write_tiny_controlnets(controlnet_source)
    models = write_tiny_models(tmp_path_factory.mktemp("models"))
    # The server imports spandrel at start with torchvision's stand-in (tests/stand_ins/spandrel_loader.py).
    python_path = os.pathsep.join([str(SPANDREL_SITE), offline_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "handler.py"),
            "--rp_serve_api",
            "--rp_api_host",
            "127.0.0.1",
            "--rp_api_port",
            str(port),
        ],
        cwd=Path(tmp_path_factory.mktemp("api")),
        env={
            **offline_env,
            "LORA_DIR": str(loras),
            "UPSCALER_DIR": str(upscalers),
            "CONTROLNET_DIR": str(controlnets),
            "MODELS_DIR": str(models),
            "MODEL_CONFIG": offline_env["MODEL_ID"],
            "PYTHONPATH": python_path,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    served = Server(f"http://127.0.0.1:{port}")
    try:
        wait_for_port(port, process)
        # Drained in a thread: the tests read it, and a full pipe would stall the server.
        assert process.stdout is not None
        threading.Thread(target=lambda: served.lines.extend(process.stdout or []), daemon=True).start()
        yield served
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def api_url(server: Server) -> str:
    return server.url


def post(api_url: str, payload: dict) -> dict:
    response = requests.post(f"{api_url}/runsync", json=payload, timeout=120)
    response.raise_for_status()
    return response.json()


def test_runsync_completes_with_images(api_url: str) -> None:
    body = post(api_url, {"input": {"prompt": "a fox", "width": 128, "height": 64, "num_inference_steps": 2}})

    assert body["status"] == "COMPLETED"
    [item] = body["output"]["images"]
    assert decode_png(item["image"]).size == (128, 64)
    assert body["output"]["metadata"]["seeds"] == [item["seed"]]


def test_runsync_bad_input_fails_then_the_next_job_completes(api_url: str) -> None:
    bad = post(api_url, {"input": {"prompt": "", "guidance_scale": 99}})
    assert bad["status"] == "FAILED"
    assert "prompt" in bad["error"]
    assert "guidance_scale=99" in bad["error"]

    good = post(api_url, {"input": {"prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 1}})
    assert good["status"] == "COMPLETED"


def test_the_log_tells_each_job_s_end(server: Server) -> None:
    good = post(server.url, {"input": {"prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 1}})
    bad = post(server.url, {"input": {"prompt": "a fox", "width": 500}})

    output = server.wait_for_output(f"job {bad['id']} FAILED in ")
    assert re.search(rf"INFO handler: job {good['id']} COMPLETED in \d+ ms$", output, re.MULTILINE)
    failed = rf"INFO handler: job {bad['id']} FAILED in \d+ ms: invalid input: width=500: must be a multiple of 64$"
    assert re.search(failed, output, re.MULTILINE)
    assert "iVBOR" not in output, "no base64 in the log"


def test_every_image_task_over_http(api_url: str) -> None:
    """img2img, inpaint, outpaint and hires fix through runpod's local API, with a base64 image and mask."""
    buffer = io.BytesIO()
    Image.new("RGB", (128, 64), (200, 120, 40)).save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    buffer = io.BytesIO()
    mask = Image.new("L", (128, 64), 0)
    mask.paste(255, (32, 16, 96, 48))
    mask.save(buffer, format="PNG")
    mask_b64 = base64.b64encode(buffer.getvalue()).decode()
    jobs = {
        "img2img": ({"image": f"data:image/png;base64,{image}"}, (128, 64)),
        "inpaint": ({"image": image, "mask": mask_b64}, (128, 64)),
        "outpaint": ({"image": image, "outpaint": {"left": 64}}, (192, 64)),
        "txt2img": ({"width": 64, "height": 64, "hires": {"scale": 1.5}}, (96, 96)),
    }
    for task, (fields, size) in jobs.items():
        body = post(api_url, {"input": {"prompt": "a fox", "num_inference_steps": 2, **fields}})
        assert body["status"] == "COMPLETED", body
        assert body["output"]["metadata"]["task"] == task
        [item] = body["output"]["images"]
        assert decode_png(item["image"]).size == size


def test_a1111_generation_options_over_http(api_url: str) -> None:
    """Variation seed, tiling and the hires pass's own sampler and prompts through runpod's local API; a bad
    value, then a good job."""
    fields = {"width": 64, "height": 64, "subseed": 5, "subseed_strength": 0.5, "tiling": True}
    fields["hires"] = {"scale": 1.5, "steps": 1, "sampler": "Euler a", "prompt": "a red fox", "negative_prompt": "dull"}
    body = post(api_url, {"input": {"prompt": "a fox", "num_inference_steps": 2, "seed": 1, **fields}})
    assert body["status"] == "COMPLETED", body
    metadata = body["output"]["metadata"]
    assert (metadata["subseed"], metadata["subseed_strength"], metadata["tiling"]) == (5, 0.5, True)
    assert (metadata["hires"]["sampler"], metadata["hires"]["prompt"]) == ("Euler a", "a red fox")

    refused = post(api_url, {"input": {"prompt": "a fox", "seed_resize_from_w": 100, "seed_resize_from_h": 64}})
    assert refused["status"] == "FAILED"
    assert "seed_resize_from_w=100: must be a multiple of 8" in refused["error"]
    assert post(api_url, {"input": {"prompt": "a fox", "num_inference_steps": 2}})["status"] == "COMPLETED"


def test_esrgan_upscalers_over_http(api_url: str) -> None:
    """A hires pass through an ESRGAN model, an upscale job, a bad upscale job, then a good one."""
    hires = {"scale": 2, "steps": 1, "upscaler": "tiny-esrgan-4x"}
    body = post(
        api_url, {"input": {"prompt": "a fox", "num_inference_steps": 2, "width": 64, "height": 64} | {"hires": hires}}
    )
    assert body["status"] == "COMPLETED", body
    assert "Hires upscaler: tiny-esrgan-4x" in decode_png(body["output"]["images"][0]["image"]).text["parameters"]

    buffer = io.BytesIO()
    noise_image(48, 32).save(buffer, "PNG")
    photo = base64.b64encode(buffer.getvalue()).decode("ascii")
    upscale = {"task": "upscale", "image": photo, "upscaler": "tiny-compact-2x"}
    body = post(api_url, {"input": {**upscale, "width": 96}})
    assert body["status"] == "COMPLETED", body
    [item] = body["output"]["images"]
    assert decode_png(item["image"]).size == (96, 64)
    assert body["output"]["metadata"]["upscaler_passes"] == 1

    refused = post(api_url, {"input": {**upscale, "scale": 2, "height": 64}})
    assert refused["status"] == "FAILED"
    assert "scale: not with height" in refused["error"]
    assert post(api_url, {"input": upscale})["status"] == "COMPLETED"


def test_a_hires_pass_on_another_model_over_http(api_url: str) -> None:
    """hires.model (A1111's hr_checkpoint_name), then one the worker lacks, then a plain job."""
    job = {"prompt": "a fox", "num_inference_steps": 2, "width": 64, "height": 64, "model": "tiny-a"}
    body = post(api_url, {"input": {**job, "hires": {"scale": 2, "steps": 1, "model": "tiny-c"}}})
    assert body["status"] == "COMPLETED", body
    assert body["output"]["metadata"]["hires"]["model"] == "tiny-c"
    assert "Hires checkpoint: tiny-c" in decode_png(body["output"]["images"][0]["image"]).text["parameters"]

    refused = post(api_url, {"input": {**job, "hires": {"scale": 2, "model": "tiny-z"}}})
    assert refused["status"] == "FAILED"
    assert "hires.model='tiny-z': not a model in MODELS_DIR" in refused["error"]
    assert post(api_url, {"input": job})["status"] == "COMPLETED"


def test_a_long_weighted_prompt_over_http(api_url: str) -> None:
    prompt = "(a red fox:1.3), [blurry], ((snow)), " * 6 + "BREAK a forest at dawn, \\(morning\\)"
    body = post(
        api_url, {"input": {"prompt": prompt, "width": 64, "height": 64, "num_inference_steps": 2, "clip_skip": 2}}
    )

    assert body["status"] == "COMPLETED", body
    metadata = body["output"]["metadata"]
    assert metadata["warnings"] == []
    assert metadata["clip_skip"] == 2
    assert metadata["prompt_tokens"]["prompt"]["chunks"] >= 3
    assert "Clip skip: 2" in decode_png(body["output"]["images"][0]["image"]).text["parameters"]


def test_a_lora_by_tag_then_an_unknown_one_then_a_plain_job(api_url: str) -> None:
    job = {"prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 5}
    plain = post(api_url, {"input": job})
    tagged = post(api_url, {"input": {**job, "prompt": "a fox <lora:tiny-peft-0:0.8>"}})
    unknown = post(api_url, {"input": {**job, "loras": [{"name": "nope"}]}})
    again = post(api_url, {"input": job})

    assert tagged["status"] == "COMPLETED"
    [lora] = tagged["output"]["metadata"]["loras"]
    assert (lora["name"], lora["scale"]) == ("tiny-peft-0", 0.8)
    assert unknown["status"] == "FAILED"
    assert "loras.0.name='nope': not a LoRA in LORA_DIR; the LoRAs are: tiny-peft-0" in unknown["error"]
    assert again["output"]["images"][0]["image"] == plain["output"]["images"][0]["image"]


@pytest.mark.parametrize("case", [pytest.param(case, id=case[0]) for case in PAYLOADS])
def test_each_a1111_payload_over_http(api_url: str, case: tuple[str, str, dict[str, Any], dict[str, Any]]) -> None:
    """Each payload of the A1111 set (tests/a1111_payloads.py), wrapped, gives the native request's pixels in
    A1111's answer."""
    _name, endpoint, payload, native = case
    body = post(api_url, {"input": wrapped(endpoint, payload)})
    assert body["status"] == "COMPLETED", body
    answer = body["output"]
    pictures = [answer["image"]] if "html_info" in answer else answer["images"]
    expected = post(api_url, {"input": native})
    assert expected["status"] == "COMPLETED", expected
    assert len(pictures) == len(expected["output"]["images"])
    for ours, theirs in zip(pictures, expected["output"]["images"], strict=True):
        assert decode_png(ours).tobytes() == decode_png(theirs["image"]).tobytes()


def test_an_a1111_field_the_worker_cannot_honour_over_http_then_a_job(api_url: str) -> None:
    refused = post(api_url, {"input": {**FLAT, "restore_faces": True}})
    assert refused["status"] == "FAILED"
    assert "restore_faces=True" in refused["error"]
    unknown = post(api_url, {"input": {"api": {"method": "POST", "endpoint": "/sdapi/v1/interrogate"}, "payload": {}}})
    assert unknown["status"] == "FAILED"
    assert "/sdapi/v1/txt2img, /sdapi/v1/img2img, /sdapi/v1/extra-single-image" in unknown["error"]
    assert post(api_url, {"input": FLAT})["status"] == "COMPLETED"


def test_png_info_over_http_reads_back_an_images_parameters(api_url: str) -> None:
    made = post(api_url, {"input": FLAT})
    assert made["status"] == "COMPLETED", made

    png_info = {
        "api": {"method": "POST", "endpoint": "/sdapi/v1/png-info"},
        "payload": {"image": made["output"]["images"][0]},
    }
    read = post(api_url, {"input": png_info})

    assert read["status"] == "COMPLETED", read
    assert read["output"]["info"] == json.loads(made["output"]["info"])["infotexts"][0]
    assert read["output"]["parameters"]["Prompt"] == FLAT["prompt"]
    assert read["output"]["parameters"]["Seed"] == str(FLAT["seed"])


def test_a1111_listings_over_http_answer_as_a1111s_get_endpoints(api_url: str) -> None:
    # As RunPod's A1111 workers pass a GET on: the output is A1111's answer itself, a list or an object.
    def listing(endpoint: str) -> Any:
        body = post(api_url, {"input": {"api": {"method": "GET", "endpoint": endpoint}, "payload": {}}})
        assert body["status"] == "COMPLETED", body
        return body["output"]

    models = listing("/sdapi/v1/sd-models")
    assert isinstance(models, list)
    assert models[0]["model_name"] == listing("/sdapi/v1/options")["sd_model_checkpoint"]
    assert "Euler a" in [sampler["name"] for sampler in listing("/sdapi/v1/samplers")]
