"""ControlNet per request, on the tiny model and tiny ControlNets (``builder.tiny_model --controlnet``).

Through the worker's own handler: every task with units, the same pictures as bare diffusers'
ControlNet pipelines, the cache, the refusals, and no state left on the shared models.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetPipeline,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from PIL import Image

import handler
from builder.tiny_lora import write_test_loras
from builder.tiny_model import CHECKPOINT_FILE, write_tiny_controlnets, write_tiny_model
from src.models.schedulers import make_scheduler
from src.settings import Settings
from tests.a1111_guidance import a1111_txt2img
from tests.a1111_inpaint import a1111_inpaint
from tests.conftest import encoding_at_the_vae_mean, noise_image, rss_bytes

JOB = {"prompt": "a fox", "num_inference_steps": 4, "seed": 11, "width": 64, "height": 64}
NET, NET_FILE, NET_B = "tiny-controlnet", "tiny-controlnet-file", "tiny-controlnet-b"


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def shapes_image(width: int = 64, height: int = 64) -> Image.Image:
    """A control image with edges: a white square and a grey disc on black."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = 255
    yy, xx = np.mgrid[:height, :width]
    pixels[(yy - 3 * height // 4) ** 2 + (xx - 3 * width // 4) ** 2 < (min(width, height) // 6) ** 2] = 128
    return Image.fromarray(pixels)


CONTROL = shapes_image()
IMAGE = noise_image(64, 64, seed=3)


@pytest.fixture(scope="session")
def tiny_with_controlnets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its ControlNets in ``controlnets/``, as ``builder.tiny_model DIR --controlnet`` writes."""
    folder = write_tiny_model(tmp_path_factory.mktemp("tiny-controlnet"), single_file=True)
    write_tiny_controlnets(folder)
    return folder


@pytest.fixture
def start(monkeypatch: pytest.MonkeyPatch, tiny_with_controlnets: Path) -> Callable[..., None]:
    """Start a fresh worker (loaded on its first job) with the tiny model, its ControlNets and these variables."""

    def begin(**variables: str) -> None:
        for field in Settings.model_fields.values():
            monkeypatch.delenv(str(field.alias), raising=False)
        monkeypatch.setenv("MODEL_ID", str(tiny_with_controlnets))
        monkeypatch.setenv("CONTROLNET_DIR", str(tiny_with_controlnets / "controlnets"))
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(handler, "_settings", None)
        monkeypatch.setattr(handler, "_engine", None)

    return begin


@pytest.fixture
def worker(start: Callable[..., None]) -> None:
    start()


def run(**fields: Any) -> dict[str, Any]:
    return asyncio.run(handler.handler({"id": "controlnet-test", "input": {**JOB, **fields}}))


def ok(**fields: Any) -> dict[str, Any]:
    result = run(**fields)
    assert "error" not in result, result["error"]
    return result


def unit(model: str = NET, image: Image.Image = CONTROL, **fields: Any) -> dict[str, Any]:
    return {"model": model, "image": png_base64(image), **fields}


def pixels(result: dict[str, Any], index: int = 0) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(result["images"][index]["image"]))) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def parameters(result: dict[str, Any]) -> str:
    with Image.open(io.BytesIO(base64.b64decode(result["images"][0]["image"]))) as image:
        return str(image.text["parameters"])


def bare(pipeline_class: type, *names: str, scheduler: str = "DPM++ 2M Karras") -> Any:
    """Bare diffusers' ControlNet pipeline on the worker's shared components and freshly loaded ControlNets, its input
    image encoded at the VAE's mean."""
    base = handler.get_engine()._pipeline
    folder = Path(handler.get_settings().controlnet_dir or "")
    nets = [ControlNetModel.from_pretrained(folder / name) for name in names]
    components = {**base.components, "scheduler": make_scheduler(scheduler, base.scheduler.config)}
    controlnet = nets[0] if len(nets) == 1 else MultiControlNetModel(nets)
    pipeline = encoding_at_the_vae_mean(pipeline_class)(
        **components, controlnet=controlnet, requires_safety_checker=False
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# --- the same pictures as bare diffusers ----------------------------------------------------------


def bare_images(pipeline_class: type, *names: str, seeds: tuple[int, ...] = (11,), **arguments: Any) -> list[Any]:
    """``bare``'s pictures of JOB's prompt, steps and guidance, one per seed, with ``arguments``."""
    return bare(pipeline_class, *names)(
        "a fox",
        num_inference_steps=4,
        guidance_scale=7.5,
        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
        **arguments,
    ).images


@pytest.mark.usefixtures("worker")
def test_text_to_image_matches_bare_diffusers() -> None:
    result = ok(num_images=2, controlnets=[unit(scale=0.8, start=0.1, end=0.9)])

    reference = bare_images(
        StableDiffusionControlNetPipeline,
        NET,
        seeds=(11, 12),
        image=CONTROL,
        width=64,
        height=64,
        num_images_per_prompt=2,
        controlnet_conditioning_scale=0.8,
        control_guidance_start=0.1,
        control_guidance_end=0.9,
    )
    for index, theirs in enumerate(reference):
        assert np.abs(pixels(result, index) - np.asarray(theirs, dtype=np.int16)).max() <= 1


@pytest.mark.usefixtures("worker")
def test_a_longer_prompt_reaches_the_controlnet_as_a1111_guides_it() -> None:
    """A prompt and a negative of different lengths: each ControlNet call, like the UNet's, reads each text's own
    tokens, as A1111 runs the two apart."""
    long = "a red fox, in the snow, under a pale winter sky, with pine trees and a frozen lake behind it, at dawn"
    result = ok(prompt=long, negative_prompt="blurry", scheduler="Euler", num_images=2, controlnets=[unit()])

    net = ControlNetModel.from_pretrained(Path(handler.get_settings().controlnet_dir or "") / NET)
    reference = a1111_txt2img(
        handler.get_engine()._pipeline, [long], "blurry", seeds=(11, 12), controlnet=net, control_image=CONTROL
    )
    for index, theirs in enumerate(reference):
        assert np.abs(pixels(result, index) - np.asarray(theirs, dtype=np.int16)).max() <= 1


@pytest.mark.usefixtures("worker")
def test_img2img_matches_bare_diffusers() -> None:
    result = ok(image=png_base64(IMAGE), strength=0.6, controlnets=[unit(scale=1.2)])

    # A1111 runs int(4 x 0.6) + 1 = 3 of the 4 steps, which diffusers runs at 0.75.
    [reference] = bare_images(
        StableDiffusionControlNetImg2ImgPipeline,
        NET,
        image=IMAGE,
        control_image=CONTROL,
        strength=0.75,
        controlnet_conditioning_scale=1.2,
    )
    assert np.abs(pixels(result) - np.asarray(reference, dtype=np.int16)).max() <= 1


@pytest.mark.usefixtures("worker")
def test_only_masked_on_a_larger_image_crops_the_control_image_there_as_diffusers() -> None:
    """The control image meets the input image's own size and is cropped with it, as diffusers'
    ``padding_mask_crop`` and the ControlNet extension's inpaint_crop_input_image do; the crop is painted as A1111
    paints it, the ControlNet's residuals added to the UNet's."""
    image, control = noise_image(192, 128, seed=5), shapes_image(192, 128)
    mask = Image.new("L", (192, 128), 0)
    mask.paste(255, (120, 20, 160, 60))
    result = ok(
        image=png_base64(image),
        mask=png_base64(mask),
        inpaint_area="masked",
        inpaint_padding=8,
        mask_blur=0,
        controlnets=[unit(image=control)],
    )

    assert pixels(result).shape == (128, 192, 3)
    base = handler.get_engine()._pipeline
    crop = VaeImageProcessor.get_crop_region(mask, 64, 64, pad=8)
    region, region_mask, region_control = (
        base.image_processor.resize(i.crop(crop), 64, 64, "fill") for i in (image, mask, control)
    )
    net = ControlNetModel.from_pretrained(Path(handler.get_settings().controlnet_dir or "") / NET)
    [painted] = a1111_inpaint(
        base, region, region_mask, seeds=(11,), sampler="DPM++ 2M Karras", controlnet=net, control_image=region_control
    )
    reference = base.image_processor.apply_overlay(mask, image, painted, crop)
    assert np.abs(pixels(result) - np.asarray(reference, dtype=np.int16)).max() <= 1


@pytest.mark.usefixtures("worker")
def test_controlnet_mode_matches_diffusers_guess_mode() -> None:
    result = ok(controlnets=[unit(control_mode="controlnet")])

    [reference] = bare_images(
        StableDiffusionControlNetPipeline, NET, image=CONTROL, width=64, height=64, guess_mode=True
    )
    assert np.abs(pixels(result) - np.asarray(reference, dtype=np.int16)).max() <= 1


def test_a_controlnet_that_pools_its_conditions_keeps_every_images_control(
    start: Callable[..., None], tiny_with_controlnets: Path, tmp_path: Path
) -> None:
    """A ControlNet whose config pools its conditions (A1111's shuffle) runs in diffusers' guess mode, where the
    pipeline gives it the prompt's rows alone and leaves the negative half without control itself."""
    folder = tmp_path / "controlnets"
    shutil.copytree(tiny_with_controlnets / "controlnets" / NET, folder / "pooled")
    config = json.loads((folder / "pooled" / "config.json").read_text())
    (folder / "pooled" / "config.json").write_text(json.dumps({**config, "global_pool_conditions": True}))
    start(CONTROLNET_DIR=str(folder))
    result = ok(num_images=2, controlnets=[unit("pooled", control_mode="controlnet")])

    reference = bare_images(
        StableDiffusionControlNetPipeline,
        "pooled",
        seeds=(11, 12),
        image=CONTROL,
        width=64,
        height=64,
        num_images_per_prompt=2,
    )
    for index, theirs in enumerate(reference):
        assert np.abs(pixels(result, index) - np.asarray(theirs, dtype=np.int16)).max() <= 1


# --- what each field does -----------------------------------------------------------------------------


@pytest.mark.usefixtures("worker")
def test_scale_zero_gives_the_pixels_of_no_controlnet() -> None:
    plain = ok()
    zero = ok(controlnets=[unit(scale=0)])

    assert np.array_equal(pixels(zero), pixels(plain))


@pytest.mark.usefixtures("worker")
def test_units_change_the_image_and_two_differ_from_each_alone() -> None:
    plain, first = ok(), ok(controlnets=[unit(NET)])
    second = ok(controlnets=[unit(NET_B, image=IMAGE)])
    both = ok(controlnets=[unit(NET), unit(NET_B, image=IMAGE)])

    assert not np.array_equal(pixels(first), pixels(plain))
    assert not np.array_equal(pixels(both), pixels(first))
    assert not np.array_equal(pixels(both), pixels(second))


@pytest.mark.usefixtures("worker")
def test_the_guidance_window_and_the_control_mode_change_the_result() -> None:
    whole = pixels(ok(controlnets=[unit()]))

    assert not np.array_equal(pixels(ok(controlnets=[unit(start=0.5)])), whole)
    assert not np.array_equal(pixels(ok(controlnets=[unit(end=0.5)])), whole)
    prompt = pixels(ok(controlnets=[unit(control_mode="prompt")]))
    controlnet = pixels(ok(controlnets=[unit(control_mode="ControlNet is more important")]))
    assert not np.array_equal(prompt, whole)
    assert not np.array_equal(controlnet, prompt)


@pytest.mark.usefixtures("worker")
def test_canny_equals_the_same_canny_map_given_as_is() -> None:
    import cv2

    photo = noise_image(96, 80, seed=5)
    edges = Image.fromarray(cv2.Canny(np.asarray(photo), 60, 180)).convert("RGB")

    preprocessed = ok(controlnets=[unit(image=photo, preprocess="canny", low=60, high=180)])
    given = ok(controlnets=[unit(image=edges)])

    assert np.array_equal(pixels(preprocessed), pixels(given))
    assert preprocessed["metadata"]["controlnets"][0]["module"] == "canny"


@pytest.mark.usefixtures("worker")
def test_the_single_file_controlnet_equals_its_folder() -> None:
    assert np.array_equal(pixels(ok(controlnets=[unit(NET_FILE)])), pixels(ok(controlnets=[unit(NET)])))


@pytest.mark.usefixtures("worker")
def test_every_task_takes_units() -> None:
    control = [unit()]
    for fields in (
        {"image": png_base64(IMAGE)},
        {"image": png_base64(IMAGE), "mask": png_base64(shapes_image())},
        {"image": png_base64(IMAGE), "outpaint": {"right": 64}, "width": 128},
        {"hires": {"scale": 1.5}},
        {"image": png_base64(IMAGE), "mask": png_base64(shapes_image()), "inpaint_area": "masked"},
    ):
        plain, guided = ok(**fields), ok(**fields, controlnets=control)
        assert not np.array_equal(pixels(plain), pixels(guided)), fields
        assert guided["metadata"]["controlnets"][0]["model"] == NET


@pytest.mark.usefixtures("worker")
def test_metadata_and_parameters_describe_each_unit_as_a1111() -> None:
    result = ok(
        resize_mode="crop",
        controlnets=[
            unit(image=shapes_image(96, 80), preprocess="canny", low=50, high=150, scale=0.75, start=0.1, end=0.8),
            unit(NET_B, image=shapes_image(96, 64), control_mode="prompt"),
        ],
    )

    # Every field, in the order and the wording of sd-webui-controlnet's ControlNetUnit.serialize(), so that
    # A1111 replays the unit: its canny ran at the control image's own short side (Processor Res), with the
    # request's thresholds; "none" has no sliders, and the extension writes their defaults for it.
    assert (
        'ControlNet 0: "Module: canny, Model: tiny-controlnet, Weight: 0.75, Resize Mode: Crop and Resize, '
        "Processor Res: 80, Threshold A: 50.0, Threshold B: 150.0, Guidance Start: 0.1, Guidance End: 0.8, "
        'Pixel Perfect: False, Control Mode: Balanced"'
    ) in parameters(result)
    assert (
        'ControlNet 1: "Module: none, Model: tiny-controlnet-b, Weight: 1.0, Resize Mode: Crop and Resize, '
        "Processor Res: 512, Threshold A: 0.5, Threshold B: 0.5, Guidance Start: 0.0, Guidance End: 1.0, "
        'Pixel Perfect: False, Control Mode: My prompt is more important"'
    ) in parameters(result)
    units = result["metadata"]["controlnets"]
    assert units[0].pop("resized").startswith("96x80 was cropped to 64x64")
    assert units[0] == {
        "model": NET,
        "module": "canny",
        "weight": 0.75,
        "guidance_start": 0.1,
        "guidance_end": 0.8,
        "control_mode": "balanced",
    }
    assert "96x64 was cropped to 64x64" in units[1]["resized"]
    assert any(warning.startswith("controlnets.1.image: 96x64") for warning in result["metadata"]["warnings"])


@pytest.mark.usefixtures("worker")
def test_a_plain_job_after_controlnet_jobs_matches_a_fresh_workers(start: Callable[..., None]) -> None:
    ok(controlnets=[unit(), unit(NET_B, control_mode="controlnet")])
    ok(image=png_base64(IMAGE), controlnets=[unit(control_mode="prompt")])
    after = ok()

    start()
    fresh = ok()

    assert after["images"][0]["image"] == fresh["images"][0]["image"]
    engine = handler.get_engine()
    assert not hasattr(engine._pipeline, "controlnet"), "the shared pipeline never holds a ControlNet"


# --- refusals ------------------------------------------------------------------------------------


@pytest.fixture
def crowded_folder(tiny_with_controlnets: Path, tmp_path: Path) -> Path:
    """The ControlNets, plus a LoRA and a base checkpoint where ControlNets should be."""
    folder = tmp_path / "controlnets"
    shutil.copytree(tiny_with_controlnets / "controlnets", folder)
    write_test_loras(tiny_with_controlnets, tmp_path / "loras")
    shutil.copy(sorted((tmp_path / "loras").glob("*.safetensors"))[0], folder / "a-lora.safetensors")
    shutil.copy(tiny_with_controlnets / CHECKPOINT_FILE, folder / "a-checkpoint.safetensors")
    cut = folder / "cut-short"
    shutil.copytree(folder / NET, cut)
    weights = cut / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    return folder


@pytest.mark.parametrize(
    ("units", "expected"),
    [
        ([unit("../x")], r"controlnets\.0\.model='\.\./x': must be a ControlNet's name"),
        ([unit("nope")], r"controlnets\.0\.model='nope': not a ControlNet in CONTROLNET_DIR; the ControlNets are: "),
        (
            [unit("a-lora")],
            r"controlnets\.0\.model='a-lora': a-lora\.safetensors cannot be used: not a ControlNet: a LoRA",
        ),
        (
            [unit("a-checkpoint")],
            r"controlnets\.0\.model='a-checkpoint': a-checkpoint\.safetensors cannot be used: a base SD 1\.5",
        ),
        ([unit("cut-short")], r"controlnets\.0\.model='cut-short': cut-short cannot be used: .*the file is cut short"),
        ([unit(), unit(), unit()], r"controlnets: 3 units asked for: at most 2 \(MAX_CONTROLNETS\)"),
        ([unit(start=0.6, end=0.6)], r"start=0\.6, end=0\.6: start must be below end"),
        ([unit(scale=-1)], r"controlnets\.0\.scale=-1: must be greater than or equal to 0"),
        ([unit(scale=3)], r"controlnets\.0\.scale=3: must be less than or equal to 2"),
        ([{"model": NET, "image": base64.b64encode(b"not an image at all").decode()}], r"controlnets\.0\.image"),
        ([unit(low=10)], r"controlnets\.0.*low: only with preprocess 'canny'"),
    ],
)
def test_bad_units_are_refused_naming_the_field_and_the_worker_goes_on(
    units: list[dict[str, Any]], expected: str, start: Callable[..., None], crowded_folder: Path
) -> None:
    start(CONTROLNET_DIR=str(crowded_folder))

    result = run(controlnets=units)

    assert "error" in result
    import re

    assert re.search(expected, result["error"]), result["error"]
    assert "images" in ok(controlnets=[unit()])


def test_units_are_refused_when_controlnet_is_off(start: Callable[..., None], monkeypatch: pytest.MonkeyPatch) -> None:
    start()
    monkeypatch.delenv("CONTROLNET_DIR")

    assert run(controlnets=[unit()])["error"].endswith("ControlNet is off on this worker: CONTROLNET_DIR is not set")


# --- loading and the cache ------------------------------------------------------------------------


def tiny_net_mb(folder: Path) -> float:
    net = ControlNetModel.from_pretrained(folder / "controlnets" / NET)
    return sum(parameter.numel() * 4 for parameter in net.parameters()) / 1e6


def test_preloaded_controlnets_are_loaded_at_startup(start: Callable[..., None]) -> None:
    start(CONTROLNET_PRELOAD=f"{NET}, {NET_B}")

    assert handler.get_engine().controlnets.loaded == [NET, NET_B]


def test_the_startup_log_names_the_controlnets_found(
    tiny_with_controlnets: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from src.adapters.controlnets import scan_controlnets

    folder = tmp_path / "controlnets"
    shutil.copytree(tiny_with_controlnets / "controlnets", folder)
    (folder / "old-net.pth").write_bytes(b"never opened")

    with caplog.at_level(logging.INFO, logger="src.adapters.controlnets"):
        scan_controlnets(str(folder))

    logged = [record.getMessage() for record in caplog.records if record.name == "src.adapters.controlnets"]
    assert f"CONTROLNET_DIR={folder}: 4 ControlNets: old-net, {NET}, {NET_B}, {NET_FILE}" in logged
    assert any(line.startswith("CONTROLNET_DIR: old-net (old-net.pth) cannot be used: a pickle") for line in logged)


def test_the_cache_keeps_the_most_recently_used_within_its_budget(
    start: Callable[..., None], tiny_with_controlnets: Path
) -> None:
    # Room for two on the CPU's one tier: the third pushes out the least recently used.
    start(CONTROLNET_CACHE_MB=str(2.5 * tiny_net_mb(tiny_with_controlnets)))
    for name in (NET, NET_B, NET, NET_FILE):
        ok(controlnets=[unit(name)])

    assert handler.get_engine().controlnets.loaded == [NET, NET_FILE]


def test_rss_stays_flat_over_30_jobs_cycling_3_controlnets_with_a_cache_of_2(
    start: Callable[..., None], tiny_with_controlnets: Path
) -> None:
    start(CONTROLNET_CACHE_MB=str(2.5 * tiny_net_mb(tiny_with_controlnets)))
    names = [NET, NET_B, NET_FILE]
    fields = {"num_inference_steps": 1, "width": 64, "height": 64}
    for index in range(6):
        ok(**fields, controlnets=[unit(names[index % 3])])
    gc.collect()
    warm = rss_bytes()

    for index in range(30):
        ok(**fields, controlnets=[unit(names[index % 3])])
    gc.collect()

    assert rss_bytes() - warm < 50e6
    assert len(handler.get_engine().controlnets.loaded) == 2


# --- admission --------------------------------------------------------------------------------------


def test_admission_counts_controlnet_weights_and_each_units_activations(tiny_with_controlnets: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from src.adapters.controlnets import ControlNets, scan_controlnets
    from src.run.memory import (
        CONTROLNET_ACTIVATIONS,
        GIB,
        UNET_BYTES_PER_LATENT_PIXEL,
        Profile,
        estimate_peak_bytes,
        plan_sub_batch,
    )

    # Four images on a small card: the UNet's activations are the peak (the VAE decodes one image at a time).
    def peak(units: int) -> float:
        return estimate_peak_bytes(Profile.BALANCED, 512, 512, 4, control_units=units)

    assert peak(0) < peak(1) < peak(2)
    unet_activations = UNET_BYTES_PER_LATENT_PIXEL * 64 * 64 * 2 * 4
    assert peak(1) - peak(0) == pytest.approx(CONTROLNET_ACTIVATIONS * unet_activations)
    budget = int(6 * GIB)
    plain = plan_sub_batch(Profile.BALANCED, 512, 512, 4, gpu_bytes=budget)
    guided = plan_sub_batch(Profile.BALANCED, 512, 512, 4, gpu_bytes=budget, control_units=2, adapter_bytes=int(1.5e9))
    assert guided.batch < plain.batch

    # What a GPU worker would count: the job's ControlNets, and those its cache keeps on the card.
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_with_controlnets, safety_checker=None)
    entries = scan_controlnets(str(tiny_with_controlnets / "controlnets"))
    gpu = ControlNets(pipeline, entries, device=torch.device("cuda"), dtype=torch.float16, cache_bytes=10**9)
    one = gpu.gpu_bytes([_Unit(NET)])
    assert one > 0
    assert gpu.gpu_bytes([_Unit(NET), _Unit(NET_B)]) == 2 * one
    assert gpu.gpu_bytes([_Unit(NET), _Unit(NET)]) == one, "one model, named twice, is on the card once"
    cpu = ControlNets(pipeline, entries, device=torch.device("cpu"), dtype=torch.float32, cache_bytes=10**9)
    assert cpu.gpu_bytes([_Unit(NET)]) == 0


@pytest.mark.usefixtures("worker")
def test_controlnets_a_gpu_cache_keeps_never_shrink_or_refuse_a_job_that_fits_without_them() -> None:
    """Admission counted every ControlNet the cache keeps on the card: after two ControlNet jobs a 6 GiB card
    refused a plain hires job a fresh worker ran. A job that fits whole only without them runs without them."""
    from src.adapters.controlnets import ControlNets, scan_controlnets
    from src.errors import AdmissionError
    from src.prepare import prepare
    from src.run.engine import _admit, _plan
    from src.run.memory import Plan, Profile

    engine = handler.get_engine()
    settings = engine.settings
    plan = prepare({"input": {**JOB, "num_images": 2}}, settings, catalog=lambda: engine.catalog, storage=None)
    # What a GPU worker in the balanced profile counts: the ControlNets its cache keeps on the card.
    gpu = ControlNets(
        engine._pipeline,
        scan_controlnets(settings.controlnet_dir),
        device=torch.device("cuda"),
        dtype=torch.float32,
        cache_bytes=10**9,
    )
    kept = engine.controlnets
    engine.controlnets, engine.profile = gpu, Profile.BALANCED

    def whole() -> bool:
        try:
            return _admit(engine, plan) == (Plan(2), False)
        except AdmissionError:
            return False

    try:
        # The least memory in which the fresh worker runs the two images at once.
        low, high = 1, 64 * 2**30
        while high - low > 1:
            engine.gpu_bytes = (low + high) // 2
            low, high = (low, engine.gpu_bytes) if whole() else (engine.gpu_bytes, high)
        engine.gpu_bytes = high
        gpu._get(NET)  # an earlier job's ControlNet, kept
        with pytest.raises(AdmissionError):  # counted beside it, as before, the job is refused: 1 image costs what 2 do
            _plan(engine, plan, cached=True)
        assert _admit(engine, plan) == (Plan(2), True), "it runs whole, the cached ControlNet off the card"
        gpu.to_host([])  # what the job does first, under the GPU lock
        assert _admit(engine, plan) == (Plan(2), False), "it waits in host memory: no longer counted"

        engine.gpu_bytes = 2**30
        with pytest.raises(AdmissionError) as refused:
            _admit(engine, plan)
        assert "ControlNet" not in str(refused.value), "the job has no unit: no ControlNet weights are its own"
    finally:
        engine.controlnets, engine.profile, engine.gpu_bytes = kept, Profile.CPU, None


class _Unit:
    def __init__(self, model: str) -> None:
        self.model = model
        self.control_mode = "balanced"


@pytest.mark.usefixtures("worker")
def test_a_processor_res_that_would_blow_a_thin_image_up_is_refused_naming_it() -> None:
    """canny's short side brought to processor_res takes the long side with it: 2048 on 8x4096 is 2048x1048576."""
    result = run(controlnets=[unit(image=shapes_image(8, 4096), preprocess="canny", processor_res=2048)])
    assert result["error"].startswith("invalid input: controlnets.0.processor_res=2048: brings the 8x4096 image")
    assert "error" not in run(controlnets=[unit()])


def test_only_masked_runs_canny_on_the_crop_as_the_extension_and_keeps_its_edges_one_pixel_wide(
    tiny_with_controlnets: Path,
) -> None:
    """The extension's inpaint_crop_input_image crops the control image, enlarges the crop to the job's size,
    then runs its preprocessor: the map is canny's own, black and white. Canny on the whole image, then the
    crop enlarged, gave grey, thick edges."""
    from src.prepare.inputs import prepare_inputs
    from src.schema import parse_input
    from src.settings import load_settings

    settings = load_settings({"CONTROLNET_DIR": str(tiny_with_controlnets / "controlnets")})
    photo = shapes_image(512, 512)
    mask = Image.new("L", photo.size, 0)
    mask.paste(255, (100, 100, 140, 140))
    job = {
        **JOB,
        "image": png_base64(photo),
        "mask": png_base64(mask),
        "inpaint_area": "masked",
        "controlnets": [unit(image=photo, preprocess="canny")],
    }
    inputs = prepare_inputs(parse_input({"input": job}, settings), settings, None)

    assert inputs.controls is not None
    control_map = np.asarray(inputs.controls.first[0])
    assert control_map.shape == (64, 64, 3)
    assert set(np.unique(control_map)) <= {0, 255}, "canny's edges, not an enlarged crop of them"
    assert control_map.max() == 255, "the crop holds the square's edge"


@pytest.mark.usefixtures("worker")
def test_a_unit_without_an_image_takes_the_jobs_image_as_the_extensions_img2img_units() -> None:
    """The ControlNet extension's img2img unit without an image of its own takes the img2img image; a
    text-to-image unit without one is refused naming it."""
    fields = {"image": png_base64(IMAGE), "strength": 0.6}
    own = ok(**fields, controlnets=[unit(image=IMAGE)])
    taken = ok(**fields, controlnets=[{"model": NET}])
    assert np.array_equal(pixels(own), pixels(taken))

    refused = run(controlnets=[{"model": NET}])
    assert "controlnets.0.image: a text-to-image unit needs its control image" in refused["error"]


@pytest.mark.usefixtures("worker")
def test_an_outpaint_unit_without_an_image_takes_the_grown_canvas_so_its_map_lines_up() -> None:
    canvas_fields = {"image": png_base64(IMAGE), "outpaint": {"left": 64}, "width": 128}
    taken = ok(**canvas_fields, controlnets=[{"model": NET}])
    # The canvas: the image on the right, its left edge stretched over the new 64 columns.
    canvas = Image.fromarray(np.pad(np.asarray(IMAGE), ((0, 0), (64, 0), (0, 0)), mode="edge"))
    given = ok(**canvas_fields, controlnets=[unit(image=canvas)])
    assert np.array_equal(pixels(taken), pixels(given))
