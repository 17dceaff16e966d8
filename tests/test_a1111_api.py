"""A1111's own API payloads, through the handler and the command line on the tiny model: the same pixels as the
native request, A1111's answer, and every field the worker cannot honour refused by name.

The payloads (tests/a1111_payloads.py) are written from A1111's and the ControlNet extension's API documentation,
as clients send them; each runs beside the native request that means the same, in both forms (wrapped and flat),
and the two must give the same pixels. tests/test_http_api.py runs the same set over the local HTTP API.

``parse_infotext`` reads the answer's infotexts as A1111's ``parse_generation_parameters`` does (rewritten here
from its description: the prompt's lines, a ``Negative prompt:`` line, then ``Key: value`` pairs on the last line,
a value JSON-quoted when it holds a comma), so a client that reads A1111's infotexts reads these.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from PIL import Image

import handler
from builder.tiny_model import write_tiny_controlnets, write_tiny_model, write_tiny_models
from builder.tiny_upscalers import write_tiny_upscalers
from src import local
from src.prepare import prepare
from src.run.pipelines import upscale_latents
from src.schema import HIRES_UPSCALER_NAMES, Hires, InputError, read_a1111
from src.settings import Settings, load_settings
from tests.a1111_payloads import (
    CONTROL,
    CONTROLNET,
    CONTROLNET_DIFFUSERS,
    EXTRAS,
    FLAT,
    FLAT_NATIVE,
    GENERATED,
    HIRES,
    IMG2IMG,
    INPAINT,
    NEGATIVE,
    PAYLOADS,
    PICTURE,
    PROMPT,
    SIZE,
    png_base64,
    wrapped,
)
from tests.conftest import noise_image
from tests.stand_ins.spandrel_loader import import_spandrel

# Every payload of the set, by name.
EACH = [pytest.param(endpoint, payload, native, id=name) for name, endpoint, payload, native in PAYLOADS]


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its ControlNets, MODELS_DIR's tiny models and the tiny upscalers."""
    folder = write_tiny_model(tmp_path_factory.mktemp("a1111"))
    write_tiny_controlnets(folder)
    write_tiny_models(folder / "models")
    write_tiny_upscalers(folder / "upscalers")
    return folder


@pytest.fixture
def worker(volume: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import_spandrel()
    for field in Settings.model_fields.values():
        monkeypatch.delenv(str(field.alias), raising=False)
    monkeypatch.setenv("MODEL_ID", str(volume))
    monkeypatch.setenv("MODEL_CONFIG", str(volume))
    monkeypatch.setenv("MODELS_DIR", str(volume / "models"))
    monkeypatch.setenv("CONTROLNET_DIR", str(volume / "controlnets"))
    monkeypatch.setenv("UPSCALER_DIR", str(volume / "upscalers"))
    monkeypatch.setenv("EMBED_PARAMETERS", "true")
    monkeypatch.setattr(handler, "_settings", None)
    monkeypatch.setattr(handler, "_engine", None)


def run(job_input: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(handler.handler({"id": "a1111", "input": job_input}))


def pixels(data: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        return np.asarray(image.convert("RGB"))


def native_pixels(result: dict[str, Any]) -> list[np.ndarray]:
    assert "error" not in result, result["error"]
    return [pixels(item["image"]) for item in result["images"]]


def a1111_pixels(result: dict[str, Any]) -> list[np.ndarray]:
    assert "error" not in result, result["error"]
    assert set(result) >= {"images", "parameters", "info"}, result.keys()
    assert all(isinstance(item, str) for item in result["images"])
    return [pixels(item) for item in result["images"]]


def parse_infotext(text: str) -> dict[str, Any]:
    """An infotext read as A1111's parse_generation_parameters reads one (written from its description)."""
    *lines, last = text.strip().split("\n")
    if not re.findall(r"\s*(\w[\w \-/]+):\s*(\"(?:\\.|[^\\\"])+\"|[^,]*)(?:,|$)", last) or len(lines) == 0:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        in_negative = in_negative or line.startswith("Negative prompt:")
        (negative if in_negative else prompt).append(line.removeprefix("Negative prompt:").strip())
    found: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, raw in re.findall(r"\s*(\w[\w \-/]+):\s*(\"(?:\\.|[^\\\"])+\"|[^,]*)(?:,|$)", last):
        value = raw.strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        size = re.fullmatch(r"(\d+)x(\d+)", value)
        if size:
            found[f"{key}-1"], found[f"{key}-2"] = size.group(1), size.group(2)
        found[key] = value
    return found


def a1111_answer_pixels(result: dict[str, Any]) -> list[np.ndarray]:
    """The pictures of an A1111 answer: ``images``, or Extras' one ``image`` (with its ``html_info``)."""
    assert "error" not in result, result["error"]
    if "html_info" in result:
        assert result["html_info"].startswith("<p>Postprocess upscale")
        return [pixels(result["image"])]
    return a1111_pixels(result)


@pytest.mark.parametrize(("endpoint", "payload", "native"), EACH)
def test_an_a1111_payload_gives_the_native_requests_pixels(
    worker: None, endpoint: str, payload: dict[str, Any], native: dict[str, Any]
) -> None:
    expected = native_pixels(run(native))
    for form in (wrapped(endpoint, payload), payload):
        got = a1111_answer_pixels(run(form))
        assert len(got) == len(expected)
        for index, (ours, theirs) in enumerate(zip(got, expected, strict=True)):
            assert np.array_equal(ours, theirs), f"image {index} differs from the native request's"


@pytest.mark.parametrize("case", [pytest.param(case, id=case[0]) for case in PAYLOADS])
def test_an_a1111_payload_runs_from_the_command_line(
    worker: None,
    case: tuple[str, str, dict[str, Any], dict[str, Any]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``python handler.py --test_input JOB``'s local run (the command line read, runpod's run_job), in this
    process on the worker's tiny model: the images written are the native request's."""
    _name, endpoint, payload, native = case
    job = json.dumps({"id": "cli", "input": wrapped(endpoint, payload)})
    run_args = local.read_command_line(["--test_input", job, "--output_dir", str(tmp_path)], environ={})
    assert run_args is not None
    assert local.run_local(handler.handler, run_args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "COMPLETED" in printed
    written = sorted((tmp_path / "cli").glob("*.png"), key=lambda path: int(path.name.split("-")[0]))
    expected = native_pixels(run(native))
    assert len(written) == len(expected)
    for path, theirs in zip(written, expected, strict=True):
        with Image.open(path) as image:
            assert np.array_equal(np.asarray(image.convert("RGB")), theirs)


def test_the_answer_reads_as_a1111s(worker: None) -> None:
    result = run(wrapped("txt2img", GENERATED))
    assert result["parameters"] == GENERATED
    info = json.loads(result["info"])
    assert info["seed"] == 99
    assert info["all_seeds"] == [99, 100]
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (64, 64, 3, 6.5)
    assert info["sampler_name"] == "DPM++ 2M Karras"
    assert info["batch_size"] == 2
    assert len(info["infotexts"]) == 2
    for seed, text, image in zip((99, 100), info["infotexts"], result["images"], strict=True):
        fields = parse_infotext(text)
        assert fields["Prompt"] == PROMPT
        assert fields["Negative prompt"] == NEGATIVE
        assert (fields["Steps"], fields["Seed"], fields["CFG scale"]) == ("3", str(seed), "6.5")
        assert (fields["Size-1"], fields["Size-2"]) == ("64", "64")
        assert fields["Sampler"] == "DPM++ 2M Karras"
        with Image.open(io.BytesIO(base64.b64decode(image))) as opened:
            assert opened.text["parameters"] == text  # the file carries the same infotext
    assert result["metadata"]["seeds"] == [99, 100]


def test_a_variation_batch_answers_a1111s_seeds_and_subseeds(worker: None) -> None:
    payload = {**GENERATED, "subseed": 12, "subseed_strength": 0.4}
    info = json.loads(run(wrapped("txt2img", payload))["info"])
    assert (info["all_seeds"], info["all_subseeds"], info["subseed"]) == ([99, 99], [12, 13], 12)
    for subseed, text in zip((12, 13), info["infotexts"], strict=True):
        fields = parse_infotext(text)
        variation = (fields["Variation seed"], fields["Variation seed strength"])
        assert (fields["Seed"], *variation) == ("99", str(subseed), "0.4")


def test_img2img_echoes_its_parameters_without_the_images_and_reports_its_strength(worker: None) -> None:
    result = run(wrapped("img2img", IMG2IMG))
    assert result["parameters"]["init_images"] is None
    assert result["parameters"]["prompt"] == PROMPT
    info = json.loads(result["info"])
    assert info["denoising_strength"] == 0.5
    fields = parse_infotext(info["infotexts"][0])
    assert fields["Denoising strength"] == "0.5"


def test_only_masked_returns_the_picture_at_its_own_size_as_a1111(worker: None) -> None:
    """A1111's inpaint_full_res crops at the picture's own resolution and answers the picture at its size."""
    picture = noise_image(160, 96, seed=6)
    mask = Image.new("L", picture.size, 0)
    mask.paste(255, (100, 30, 130, 60))
    payload = {**INPAINT, "init_images": [png_base64(picture)], "mask": png_base64(mask), "inpaint_full_res": True}
    result = run(wrapped("img2img", payload))

    (painted,) = a1111_pixels(result)
    assert painted.shape == (96, 160, 3)
    kept = np.asarray(mask) == 0
    assert np.array_equal(painted[kept], np.asarray(picture)[kept])
    info = json.loads(result["info"])
    assert (info["width"], info["height"]) == (64, 64), "the size the region was painted at"


def test_hires_reports_its_pass_and_a_controlnet_unit_its_fields(worker: None) -> None:
    hires = parse_infotext(json.loads(run(HIRES)["info"])["infotexts"][0])
    assert (hires["Hires upscale"], hires["Hires steps"], hires["Hires upscaler"]) == ("1.5", "2", "Latent")
    assert (hires["Denoising strength"], hires["Clip skip"], hires["Model"]) == ("0.6", "2", "tiny-a")
    result = run(CONTROLNET)
    unit = parse_infotext(json.loads(result["info"])["infotexts"][0])["ControlNet 0"]
    assert "Module: canny" in unit
    assert f"Model: {CONTROLNET_DIFFUSERS}" in unit
    assert "Weight: 0.8" in unit
    assert "Processor Res: 64" in unit
    assert any("args.1: enabled false" in warning for warning in result["metadata"]["warnings"])


def test_pad_cond_uncond_pads_the_shorter_prompt_and_says_so(worker: None) -> None:
    """Two chunks against the negative's one: read apart by default, padded with A1111's pad_cond_uncond, which the
    parameters name, as A1111 writes them, so that its paste sets it again."""
    payload = {**FLAT, "prompt": "a lighthouse BREAK at night", "negative_prompt": "blurry"}
    apart, padded = run(payload), run({**payload, "override_settings": {"pad_cond_uncond": True}})

    assert "Pad conds" not in parse_infotext(json.loads(apart["info"])["infotexts"][0])
    assert parse_infotext(json.loads(padded["info"])["infotexts"][0])["Pad conds"] == "True"
    assert np.abs(pixels(apart["images"][0]).astype(int) - pixels(padded["images"][0])).max() > 1


@pytest.mark.parametrize(
    ("hires", "size"),
    [
        ({"hr_scale": 1.3}, (80, 80)),  # int(64 x 1.3) = 83, which A1111's latents round down to 80
        ({"hr_resize_x": 100}, (96, 96)),
        ({"hr_resize_y": 120, "hr_resize_x": 120}, (120, 120)),
        ({"hr_scale": 1.3, "width": 64, "height": 128}, (80, 160)),  # 83 x 166: 80 x 160, the factor 1.25
    ],
)
def test_a_hires_size_lands_where_a1111s_does(worker: None, hires: dict[str, Any], size: tuple[int, int]) -> None:
    result = run({**FLAT, "enable_hr": True, "hr_second_pass_steps": 1, **hires})

    assert "error" not in result, result["error"]
    assert Image.open(io.BytesIO(base64.b64decode(result["images"][0]))).size == size
    scale = parse_infotext(json.loads(result["info"])["infotexts"][0])["Hires upscale"]
    again = {**FLAT_NATIVE, **{k: v for k, v in hires.items() if k in ("width", "height")}}
    native = asyncio.run(handler.handler({"id": "n", "input": {**again, "hires": {"scale": float(scale), "steps": 1}}}))
    assert Image.open(io.BytesIO(base64.b64decode(native["images"][0]["image"]))).size == size, "its infotext again"


def test_a_hires_size_no_single_factor_reaches_is_refused_naming_the_field(worker: None) -> None:
    result = run({**FLAT, "enable_hr": True, "hr_scale": 1.3, "width": 64, "height": 192})

    assert "hr_scale=1.3: A1111 would make 80x248 of 64x192, which no single factor" in result["error"]
    assert "error" not in run(FLAT)


# A1111's latent_upscale_modes (modules/shared.py): its names, and torch's interpolation for each.
A1111_LATENT_MODES = {
    "Latent": {"mode": "bilinear", "antialias": False},
    "Latent (antialiased)": {"mode": "bilinear", "antialias": True},
    "Latent (bicubic)": {"mode": "bicubic", "antialias": False},
    "Latent (bicubic antialiased)": {"mode": "bicubic", "antialias": True},
    "Latent (nearest)": {"mode": "nearest", "antialias": False},
    "Latent (nearest-exact)": {"mode": "nearest-exact", "antialias": False},
}


@pytest.mark.parametrize("upscaler", list(A1111_LATENT_MODES))
def test_each_latent_upscaler_enlarges_as_a1111s_of_its_name(upscaler: str) -> None:
    latents = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(3))
    hires = read_a1111({"input": {**FLAT, "enable_hr": True, "hr_upscaler": upscaler}})
    assert hires is not None
    name = hires.input["hires"]["upscaler"]
    native = Hires.model_validate({"upscaler": name, "steps": 1}, context={"limits": Settings()}).upscaler

    enlarged = upscale_latents(latents, (144, 96), 8, native)

    expected = torch.nn.functional.interpolate(latents, size=(12, 18), **A1111_LATENT_MODES[upscaler])
    assert torch.equal(enlarged, expected)
    assert HIRES_UPSCALER_NAMES[native] == upscaler, "the infotext names it as A1111 does"


@pytest.mark.parametrize("upscaler", ["Latent (bicubic antialiased)", "Latent (nearest-exact)"])
def test_a1111s_other_latent_upscalers_run_under_either_name_and_are_named_as_a1111_names_them(
    worker: None, upscaler: str
) -> None:
    hires = {**FLAT, "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 1}
    result = run({**hires, "hr_upscaler": upscaler})
    native_name = upscaler.lower().replace(" (", "-").replace(")", "").replace(" ", "-")
    native = run({**hires, "hr_upscaler": native_name})
    plain = run({**hires, "hr_upscaler": "Latent"})

    assert np.array_equal(pixels(result["images"][0]), pixels(native["images"][0]))
    assert not np.array_equal(pixels(result["images"][0]), pixels(plain["images"][0])), "another interpolation"
    assert parse_infotext(json.loads(result["info"])["infotexts"][0])["Hires upscaler"] == upscaler


def test_send_images_false_answers_without_images(worker: None, monkeypatch: pytest.MonkeyPatch) -> None:
    result = run({**FLAT, "send_images": False})
    assert result["images"] == []
    assert json.loads(result["info"])["seed"] == 1234

    # Images that are never sent are no reason to refuse the job, before or after it runs.
    monkeypatch.setenv("MAX_RESPONSE_MB", "0.02")
    monkeypatch.setattr(handler, "_settings", None)
    small = run({**FLAT, "send_images": False, "batch_size": 2})
    assert "error" not in small, small["error"]
    assert small["images"] == []
    refused = run({**FLAT, "batch_size": 2})["error"]
    assert re.search(r"the answer is 0\.\d\d MB \([\d,]+ bytes\) inline .* over MAX_RESPONSE_MB=0\.02", refused), (
        refused
    )


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_an_unknown_endpoint_is_refused_naming_the_known_ones_and_the_next_job_runs(worker: None, method: str) -> None:
    result = run({"api": {"method": method, "endpoint": "/sdapi/v1/progress"}, "payload": {}})
    assert "api.endpoint='/sdapi/v1/progress': not an endpoint this worker answers" in result["error"]
    for known in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/extra-single-image", "/sdapi/v1/sd-models"):
        assert known in result["error"]
    assert "describe" in result["error"]
    assert "error" not in run(FLAT)


REFUSED = [
    pytest.param({"restore_faces": True}, "restore_faces=True: face restoration", id="restore-faces"),
    pytest.param({"script_name": "x/y/z plot"}, "script_name='x/y/z plot'", id="script"),
    pytest.param({"styles": ["cinematic"]}, "styles=['cinematic']", id="styles"),
    pytest.param({"s_churn": 0.5}, "s_churn=0.5", id="churn"),
    pytest.param({"promt": "typo"}, "promt: unknown field", id="unknown-field"),
    pytest.param({"num_inference_steps": 4}, "num_inference_steps and steps: name the same thing", id="both-names"),
    pytest.param({"outpaint": {"left": 64}}, "outpaint: this worker's field", id="native-only-field"),
    pytest.param({"sampler_name": "DPM++ 3M SDE"}, "sampler_name='DPM++ 3M SDE'", id="unknown-sampler"),
    pytest.param({"scheduler": "Exponential"}, "sampler_name='DPM++ 2M Karras': with scheduler", id="schedule"),
    pytest.param({"scheduler": 7}, "scheduler=7: must be a schedule's name", id="schedule-not-a-name"),
    pytest.param({"sampler_name": "DDIM", "eta": 1}, "eta=1: DDIM runs at eta 0 here", id="ddim-eta"),
    pytest.param({"sampler_name": "Euler a", "eta": 0.5}, "eta=0.5: Euler a runs at eta 1 here (or 0", id="eta"),
    pytest.param({"steps": 500}, "steps=500: must be at most", id="steps-over-max"),
    pytest.param({"cfg_scale": "7"}, "cfg_scale='7'", id="cfg-as-string"),
    pytest.param({"alwayson_scripts": {"ADetailer": {"args": []}}}, "alwayson_scripts.ADetailer", id="other-script"),
    pytest.param({"override_settings": {"sd_hypernetwork": "x"}}, "override_settings.sd_hypernetwork", id="override"),
    pytest.param(
        {"override_settings": {"randn_source": "GPU"}},
        "override_settings.randn_source='GPU': this worker draws its noise as A1111's CPU source does: only 'CPU'",
        id="noise-source",
    ),
    pytest.param(
        {"override_settings": {"pad_cond_uncond_v0": True}},
        "override_settings.pad_cond_uncond_v0=True: this worker pads with empty chunks (pad_cond_uncond)",
        id="pad-v0",
    ),
    pytest.param({"enable_hr": True, "hr_upscaler": "SwinIR 4x"}, "hr_upscaler='SwinIR 4x'", id="hr-up"),
    pytest.param({"enable_hr": True, "hr_resize_x": 100, "hr_resize_y": 200}, "hr_resize_x", id="hr-resize"),
    pytest.param({"enable_hr": "true"}, "enable_hr='true': must be true or false", id="hr-switch-text"),
    pytest.param(
        {"enable_hr": True, "hr_upscaler": ["Lanczos"]}, "hr_upscaler=['Lanczos']: must be a valid string", id="hr-list"
    ),
]


@pytest.mark.parametrize(("change", "named"), REFUSED)
def test_a_field_the_worker_cannot_honour_is_refused_by_name_and_the_next_job_runs(
    worker: None, change: dict[str, Any], named: str
) -> None:
    result = run({**FLAT, **change})
    assert set(result) == {"error"}, result
    assert named in result["error"]
    assert "error" not in run(FLAT)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param(
            {}, "steps=50: must be at most 30 (MAX_STEPS) (not sent: A1111's default; send steps)", id="left-out"
        ),
        pytest.param({"steps": 50}, "steps=50: must be at most 30 (MAX_STEPS)", id="sent"),
    ],
)
def test_a_limit_broken_by_a1111s_default_says_the_field_was_not_sent(payload: dict[str, Any], expected: str) -> None:
    def no_catalog() -> Any:
        raise AssertionError("an invalid input never asks for the catalog")

    job = {"id": "a1111", "input": wrapped("txt2img", {"prompt": "a fox", **payload})}
    with pytest.raises(InputError) as refused:
        prepare(job, load_settings({"MAX_STEPS": "30"}), catalog=no_catalog, storage=None)

    assert str(refused.value).endswith(expected)


IMG2IMG_REFUSED = [
    pytest.param({"mask_blur": None, "mask_blur_x": 2, "mask_blur_y": 6}, "mask_blur_x=[2, 6]", id="blur-x-y"),
    pytest.param({"init_images": [PICTURE, PICTURE]}, "init_images=", id="two-images"),
    pytest.param({"resize_mode": 3}, "resize_mode=3", id="latent-resize"),
    pytest.param({"inpainting_fill": 4}, "inpainting_fill=4: 0 (fill), 1 (original), 2 (latent noise)", id="fill-4"),
    pytest.param({"image": PICTURE}, "image and init_images", id="image-and-init-images"),
    pytest.param({"denoising_strength": 0}, "denoising_strength=0", id="strength-zero"),
    pytest.param({"inpainting_fill": [1]}, "inpainting_fill=[1]: 0 (fill), 1 (original)", id="fill-as-a-list"),
    pytest.param({"inpaint_full_res": "false"}, "inpaint_full_res='false': must be true or false", id="switch-text"),
]


@pytest.mark.parametrize(("change", "named"), IMG2IMG_REFUSED)
def test_an_img2img_field_the_worker_cannot_honour_is_refused_by_name(
    worker: None, change: dict[str, Any], named: str
) -> None:
    result = run(wrapped("img2img", {**INPAINT, **change}))
    assert set(result) == {"error"}, result
    assert named in result["error"]


def test_a_controlnet_unit_the_worker_cannot_honour_is_refused_by_name(worker: None) -> None:
    args = CONTROLNET["alwayson_scripts"]["controlnet"]["args"]
    for change, named in (
        ({"module": "openpose"}, "args.0.module='openpose'"),
        ({"effective_region_mask": PICTURE}, "args.0.effective_region_mask"),
        ({"weigth": 1}, "args.0.weigth: unknown field"),
        ({"weight": 3.0}, "args.0.weight=3.0"),
        ({"model": "control_v11p_sd15_openpose [cab727d4]"}, "control_v11p_sd15_openpose"),
    ):
        unit = {**args[0], **change}
        result = run({**CONTROLNET, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
        assert set(result) == {"error"}, (change, result)
        assert named in result["error"], (change, result["error"])


def test_an_extras_field_the_worker_cannot_honour_is_refused_by_name(worker: None) -> None:
    for change, named in (
        ({"gfpgan_visibility": 0.5}, "gfpgan_visibility=0.5"),
        ({"upscaler_2": "Lanczos", "extras_upscaler_2_visibility": 0.3}, "extras_upscaler_2_visibility=0.3"),
        ({"upscaler_1": "None"}, "upscaler_1='None'"),
        ({"upscaler_1": "4x-UltraSharp"}, "upscaler_1"),
        ({"upscaler_1": {"name": "Lanczos"}}, "upscaler_1={'name': 'Lanczos'}: must be a valid string"),
        ({"upscaling_resize": 1}, "upscaling_resize=1"),
    ):
        result = run(wrapped("extra-single-image", {**EXTRAS, **change}))
        assert set(result) == {"error"}, (change, result)
        assert named in result["error"], (change, result["error"])


def test_every_a1111_field_read_is_listed_in_the_docs() -> None:
    """docs/a1111.md's field map names each A1111 field the translation reads."""
    from src.schema.a1111 import A1111_ONLY_FIELDS

    text = (Path(__file__).resolve().parent.parent / "docs" / "a1111.md").read_text()
    missing = sorted(name for name in A1111_ONLY_FIELDS if f"`{name}`" not in text)
    assert not missing, f"docs/a1111.md does not name: {missing}"


@pytest.mark.parametrize(("sent", "rounded"), [({}, True), ({"mask_round": False}, False), ({"mask_round": 1}, True)])
def test_an_a1111_mask_is_rounded_unless_the_payload_says_not(sent: dict[str, Any], rounded: bool) -> None:
    call = read_a1111({"input": {**INPAINT, **sent}})

    assert call is not None
    assert call.input["mask_round"] is rounded


def test_a_native_input_is_not_read_as_a1111s() -> None:
    assert read_a1111({"input": {"prompt": "a fox", "num_inference_steps": 3, "seed": 1}}) is None
    assert read_a1111({"input": {"prompt": "a fox", "width": 64, "tiling": True, "mask_blur": 4}}) is None


def test_the_flat_form_takes_its_endpoint_from_its_fields() -> None:
    def endpoint(payload: dict[str, Any]) -> str:
        call = read_a1111({"input": payload})
        assert call is not None
        return call.endpoint

    assert endpoint({"prompt": "a", "steps": 3}) == "txt2img"
    assert endpoint({"prompt": "a", "init_images": [PICTURE]}) == "img2img"
    assert endpoint({"image": PICTURE, "upscaling_resize": 2, "upscaler_1": "Lanczos"}) == "extra-single-image"


def test_an_endpoint_may_be_named_without_its_prefix() -> None:
    for name in ("txt2img", "/sdapi/v1/txt2img/", "sdapi/v1/txt2img"):
        call = read_a1111({"input": {"api": {"method": "post", "endpoint": name}, "payload": {"prompt": "a"}}})
        assert call is not None
        assert call.endpoint == "txt2img"


def test_a_units_processor_res_is_the_resolution_canny_runs_at() -> None:
    from src.prepare.preprocessors import at_resolution, preprocess

    image = noise_image(96, 64, seed=2)
    direct = preprocess(at_resolution(image, 32), "canny", (100, 200))
    assert direct.size == (48, 32)
    assert np.array_equal(np.asarray(preprocess(image, "canny", (100, 200), 32)), np.asarray(direct))
    assert preprocess(image, "canny", (100, 200)).size == (96, 64)


def test_a_units_resize_mode_is_its_own_and_the_jobs_by_default(worker: None) -> None:
    wide = Image.new("RGB", (128, 64), "black")
    wide.paste((255, 255, 255), (8, 8, 120, 20))
    unit = {"model": CONTROLNET_DIFFUSERS, "image": png_base64(wide), "preprocess": "canny"}
    job = {"prompt": PROMPT, "num_inference_steps": 2, "seed": 5, **SIZE}
    cropped = native_pixels(run({**job, "controlnets": [{**unit, "resize_mode": "crop"}]}))[0]
    stretched = native_pixels(run({**job, "controlnets": [unit]}))[0]
    assert not np.array_equal(cropped, stretched)
    with_image = native_pixels(run({**job, "image": PICTURE, "resize_mode": "crop", "controlnets": [unit]}))[0]
    with_own = native_pixels(
        run({**job, "image": PICTURE, "resize_mode": "crop", "controlnets": [{**unit, "resize_mode": "crop"}]})
    )[0]
    assert np.array_equal(with_image, with_own)


def test_the_docs_complete_example_runs(worker: None) -> None:
    """docs/a1111.md's complete example, read as it is, then run at the tiny model's size with its control image."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "a1111.md").read_text()
    example = json.loads(text.split("<!-- a1111-example:start -->\n```json")[1].split("```")[0])
    assert read_a1111(example) is not None
    payload = example["input"]["payload"]
    unit = payload["alwayson_scripts"]["controlnet"]["args"][0]
    unit.update(image=CONTROL, model=f"{CONTROLNET_DIFFUSERS} [d14c016b]", processor_res=64)
    payload.update(width=64, height=64, steps=3, hr_second_pass_steps=2)
    result = run(example["input"])
    assert len(a1111_pixels(result)) == 1
    assert json.loads(result["info"])["seed"] == 1234


@pytest.mark.parametrize(
    ("fields", "scheduler", "hires_sampler"),
    [
        pytest.param({"sampler_name": "DPM++ 2M", "scheduler": "Karras"}, "DPM++ 2M Karras", None, id="pair"),
        pytest.param({"sampler_index": "Euler a"}, "Euler a", None, id="sampler-index"),
        pytest.param({}, "Euler", None, id="a1111-default"),
        # A1111 1.9 and later: a sampler's own schedule ("Automatic", or none given) is Karras for DPM++ 2M.
        pytest.param({"sampler_name": "DPM++ 2M"}, "DPM++ 2M Karras", None, id="dpm-2m-own-schedule"),
        pytest.param({"sampler_name": "DPM++ 2M", "scheduler": "Automatic"}, "DPM++ 2M Karras", None, id="automatic"),
        pytest.param({"sampler_name": "DPM++ 2M SDE", "scheduler": "Exponential"}, "DPM++ 2M SDE", None, id="exp"),
        pytest.param({"sampler_name": "Euler a", "scheduler": "Uniform"}, "Euler a", None, id="uniform"),
        # DPM2 and DPM2 a: Karras is their own schedule there; Uniform is the plain name here.
        pytest.param({"sampler_name": "DPM2"}, "DPM2 Karras", None, id="dpm2-own-schedule"),
        pytest.param({"sampler_name": "DPM2 a", "scheduler": "Uniform"}, "DPM2 a", None, id="dpm2-a-uniform"),
        pytest.param({"sampler_name": "DPM2 a", "eta": 0}, "DPM2 Karras", None, id="dpm2-a-eta-0"),
        pytest.param({"sampler_name": "DPM2 a", "scheduler": "Uniform", "eta": 0}, "DPM2", None, id="dpm2-a-uni-0"),
        # k-diffusion's ancestral samplers at eta 0 add no noise: they step as their plain sampler.
        pytest.param({"sampler_name": "Euler a", "eta": 0}, "Euler", None, id="euler-a-eta-0"),
        pytest.param({"sampler_name": "Euler a", "eta": 1}, "Euler a", None, id="euler-a-eta-1"),
        pytest.param({"sampler_name": "Euler", "eta": 0.5}, "Euler", None, id="eta-not-read"),
        pytest.param(
            {
                "sampler_name": "DPM++ 2M",
                "scheduler": "Karras",
                "hr_sampler_name": "Euler",
                "hr_scheduler": "Automatic",
            },
            "DPM++ 2M Karras",
            "Euler",
            id="hires-own-schedule",
        ),
        pytest.param(
            {"sampler_name": "LMS", "hr_sampler_name": "Use same sampler", "hr_scheduler": "Karras"},
            "LMS",
            "LMS Karras",
            id="hires-same-sampler-karras",
        ),
        pytest.param({"sampler_name": "DPM++ 2M", "scheduler": "Uniform"}, "DPM++ 2M", None, id="dpm++-2m-uniform"),
        # A1111's aliases name their samplers: their own schedule, and Uniform where it may be named.
        pytest.param({"sampler_name": "k_dpmpp_2m"}, "DPM++ 2M Karras", None, id="alias-own-schedule"),
        pytest.param({"sampler_name": "k_euler", "scheduler": "Uniform"}, "k_euler", None, id="alias-uniform"),
        pytest.param(
            {"sampler_name": "DPM++ 2M", "scheduler": "Karras", "hr_sampler_name": "DPM++ 2M SDE"},
            "DPM++ 2M Karras",
            "DPM++ 2M SDE Karras",
            id="hires-same-schedule",
        ),
    ],
)
def test_samplers_and_schedules_are_read_as_a1111_pairs_them(
    fields: dict[str, Any], scheduler: str, hires_sampler: str | None
) -> None:
    call = read_a1111({"input": {"prompt": "a", "steps": 3, "enable_hr": True, **fields}})
    assert call is not None
    assert call.input["scheduler"] == scheduler
    assert call.input["hires"].get("sampler") == hires_sampler


def test_an_a1111_answer_lists_uploaded_images_by_url(worker: None, bucket: str, s3_server: Any) -> None:
    inline = run(wrapped("txt2img", FLAT))
    assert a1111_pixels(inline), "inline by default, as A1111's answer, though the worker has a bucket"
    result = run(wrapped("txt2img", {**FLAT, "batch_size": 2, "output_type": "s3"}))
    assert "error" not in result, result["error"]
    assert len(result["images"]) == 2
    assert all(url.startswith(s3_server.url) for url in result["images"])
    # The job's folder only: moto keeps one store per process, which earlier tests' objects share.
    folder = urlsplit(result["images"][0]).path.removeprefix(f"/{bucket}/").rsplit("/", 1)[0]
    listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=f"{folder}/")["Contents"]
    assert sorted(item["Key"].rsplit("/", 1)[1] for item in listed) == ["0-1234.png", "1-1235.png"]
    assert json.loads(result["info"])["all_seeds"] == [1234, 1235]


def test_a1111s_token_merging_ratio_is_the_jobs_tome_ratio() -> None:
    call = read_a1111({"input": {"prompt": "a", "steps": 3, "token_merging_ratio": 0.4, "token_merging_ratio_hr": 0.4}})
    assert call is not None
    assert call.input["tome_ratio"] == 0.4
    with pytest.raises(InputError, match=r"token_merging_ratio_hr=0\.2: this worker merges tokens at one ratio"):
        read_a1111({"input": {"prompt": "a", "steps": 3, "token_merging_ratio": 0.4, "token_merging_ratio_hr": 0.2}})


# --- extra-single-image: A1111's sizes and info line, its switches, its errors -------------------------------


def a1111_extras_size(size: tuple[int, int], payload: dict[str, Any]) -> tuple[int, int]:
    """The size A1111's Extras makes, as scripts/postprocessing_upscale.py and modules/upscaler.py compute it:
    the factor (or the larger ratio to the target), each side int(side x factor // 8 * 8); cropped, the target."""
    width, height = size
    if payload.get("resize_mode", 0) == 1:
        target = payload["upscaling_resize_w"], payload["upscaling_resize_h"]
        if payload.get("upscaling_crop", True):
            return target
        upscale_by = max(target[0] / width, target[1] / height)
    else:
        upscale_by = payload["upscaling_resize"]
    return int((width * upscale_by) // 8 * 8), int((height * upscale_by) // 8 * 8)


@pytest.mark.parametrize(
    ("size", "change", "info"),
    [
        pytest.param((100, 75), {"upscaling_resize": 2}, "Postprocess upscale by: 2", id="by-2"),
        pytest.param((133, 100), {"upscaling_resize": 1.5}, "Postprocess upscale by: 1.5", id="by-1.5"),
        pytest.param(
            (150, 100),
            {"resize_mode": 1, "upscaling_resize_w": 300, "upscaling_resize_h": 404, "upscaling_crop": False},
            "Postprocess upscale to: 300x404",
            id="to-uncropped",
        ),
        pytest.param(
            (150, 100),
            {"resize_mode": 1, "upscaling_resize_w": 300, "upscaling_resize_h": 404},
            "Postprocess upscale to: 300x404, Postprocess crop to: 300x404",
            id="to-cropped",
        ),
    ],
)
def test_extras_makes_a1111s_size_and_info_line(
    worker: None, size: tuple[int, int], change: dict[str, Any], info: str
) -> None:
    payload = {**EXTRAS, "upscaler_1": "Lanczos", "image": png_base64(noise_image(*size, seed=3)), **change}

    result = run(wrapped("extra-single-image", payload))

    assert "error" not in result, result["error"]
    image = pixels(result["image"])
    assert (image.shape[1], image.shape[0]) == a1111_extras_size(size, payload)
    assert result["html_info"] == f"<p>{info}, Postprocess upscaler: Lanczos</p>"


def test_extras_answers_its_image_whatever_show_extras_results_says(worker: None) -> None:
    """A1111's single-image answer has its image either way: show_extras_results acts on a batch's results."""
    result = run(wrapped("extra-single-image", {**EXTRAS, "show_extras_results": False}))

    assert "error" not in result, result["error"]
    assert pixels(result["image"]).shape == (128, 128, 3)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        pytest.param(
            {"resize_mode": 1, "upscaling_crop": "false"}, "upscaling_crop='false': must be true or false", id="crop"
        ),
        pytest.param({"show_extras_results": "no"}, "show_extras_results='no': must be true or false", id="show"),
        pytest.param(
            {"resize_mode": 1, "upscaling_resize_w": 64, "upscaling_resize_h": 64},
            "upscaling_resize_w x upscaling_resize_h: 64x64 to 64x64 does not enlarge the image",
            id="not-larger",
        ),
        pytest.param(
            {"resize_mode": 1, "image": png_base64(noise_image(256, 8)), "upscaling_crop": True},
            "upscaling_resize_w x upscaling_resize_h: 256x8 to 512x512 (crop) first enlarges the image to 16384x512",
            id="crop-covering",
        ),
        pytest.param(
            {"image": png_base64(noise_image(260, 260)), "upscaling_resize": 1.1, "upscaler_1": "tiny-esrgan-4x"},
            "upscaling_resize: 260x260 to 280x280 through tiny-esrgan-4x (4x) makes a 1040x1040 image on its way",
            id="model-pass",
        ),
    ],
)
def test_an_extras_refusal_names_a1111s_fields_and_the_next_job_runs(
    worker: None, monkeypatch: pytest.MonkeyPatch, change: dict[str, Any], says: str
) -> None:
    monkeypatch.setenv("MAX_UPSCALE_SIDE", "512")  # no image on its way over 1024x1024 pixels

    result = run(wrapped("extra-single-image", {**EXTRAS, **change}))

    assert set(result) == {"error"}, result
    assert says in result["error"], result["error"]
    assert "error" not in run(wrapped("extra-single-image", EXTRAS))


def test_a_disabled_controlnet_unit_is_not_read_whatever_it_holds() -> None:
    """The extension skips a unit with enabled false before it checks any field: a client's spare unit of a
    preprocessor this worker lacks must not refuse the job."""
    spare = {"enabled": False, "module": "openpose_full", "model": "control_openpose", "hr_option": "Low res only"}
    call = read_a1111({"input": {**FLAT, "alwayson_scripts": {"controlnet": {"args": [spare]}}}})
    assert call is not None
    assert "controlnets" not in call.input
