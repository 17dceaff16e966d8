"""The ``upscale`` task (A1111's Extras): an image enlarged by an upscaler, nothing generated, through the handler.

The upscalers are the builder's tiny ESRGAN (RRDB, 4x) and compact (SRVGG, 2x) models, run by the real spandrel
(tests/test_upscalers.py says how it imports here). Each result is compared with the same steps done by hand: the
model's passes on the whole image, then Lanczos, then the crop, as A1111 does them.
"""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

import handler
from src.adapters.upscalers import read_upscaler
from src.finish.outputs import encode_image
from src.prepare.canvas import fit
from tests.test_resilience import injected
from tests.test_upscalers import larger_than, small_tiles, upscaler_dir, worker

__all__ = ["small_tiles", "upscaler_dir", "worker"]  # the fixtures, shared with tests/test_upscalers.py

PHOTO_SIZE = (40, 30)


def photo(size: tuple[int, int] = PHOTO_SIZE) -> Image.Image:
    """A noisy RGB picture."""
    pixels = np.random.default_rng(7).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def as_base64(image: Image.Image, parameters: str | None = None) -> str:
    buffer = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    image.save(buffer, "PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def upscale(image: Image.Image | None = None, **fields: Any) -> dict[str, Any]:
    job = {"task": "upscale", "image": as_base64(image or photo()), **fields}
    return asyncio.run(handler.handler({"id": "upscale-job", "input": job}))


def result_image(result: dict[str, Any]) -> Image.Image:
    assert "images" in result, result
    [item] = result["images"]
    assert "seed" not in item, "an upscaled image has no seed"
    with Image.open(io.BytesIO(base64.b64decode(item["image"]))) as image:
        image.load()
        return image


def by_hand(folder: Path, name: str, image: Image.Image, passes: int) -> Image.Image:
    """The image through the model file ``passes`` times, whole (no tiles), as an RGB image."""
    model = read_upscaler(next(folder.glob(f"{name}.*")))
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1).unsqueeze(0)
    with torch.inference_mode():
        for _ in range(passes):
            tensor = model(tensor).float().clamp(0, 1)
    pixels = (tensor[0].permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


@pytest.mark.usefixtures("worker")
def test_a_4x_model_asked_for_2x_runs_once_then_lanczos_as_a1111(upscaler_dir: Path) -> None:
    result = upscale(upscaler="tiny-esrgan-4x", scale=2)

    expected = by_hand(upscaler_dir, "tiny-esrgan-4x", photo(), passes=1).resize((80, 60), Image.Resampling.LANCZOS)
    image = result_image(result)
    assert image.size == (80, 60)
    assert image.tobytes() == expected.tobytes()
    assert image.text["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: tiny-esrgan-4x"
    metadata = result["metadata"]
    assert metadata["task"] == "upscale"
    assert (metadata["upscaler_scale"], metadata["upscaler_passes"], metadata["scale"]) == (4, 1, 2.0)
    assert (metadata["width"], metadata["height"], metadata["source_width"], metadata["source_height"]) == (
        80,
        60,
        40,
        30,
    )
    assert (metadata["device"], metadata["dtype"]) == ("cpu", "float32")
    assert "resize_mode" not in metadata
    assert set(metadata["timings_ms"]) >= {"inputs", "queue", "inference", "encode", "total"}


@pytest.mark.usefixtures("worker")
def test_a_2x_model_asked_for_3x_runs_twice_and_the_default_factor_is_2(upscaler_dir: Path) -> None:
    thrice = upscale(upscaler="tiny-compact-2x", scale=3)
    default = upscale(upscaler="tiny-compact-2x")

    expected = by_hand(upscaler_dir, "tiny-compact-2x", photo(), passes=2).resize((120, 90), Image.Resampling.LANCZOS)
    assert result_image(thrice).tobytes() == expected.tobytes()
    assert thrice["metadata"]["upscaler_passes"] == 2
    assert result_image(default).size == (80, 60)
    assert (default["metadata"]["scale"], default["metadata"]["upscaler_passes"]) == (2.0, 1)


@pytest.mark.usefixtures("worker")
def test_a_target_size_is_covered_then_cropped_and_one_side_keeps_the_proportions(upscaler_dir: Path) -> None:
    cropped = upscale(upscaler="tiny-compact-2x", width=100, height=50)
    tall = upscale(upscaler="tiny-compact-2x", height=90)

    # Covering 100x50 from 40x30 takes 2.5x (100x75), through two 2x passes; then the centre's 100x50.
    enlarged = by_hand(upscaler_dir, "tiny-compact-2x", photo(), passes=2)
    expected = fit(enlarged.resize((100, 75), Image.Resampling.LANCZOS), 100, 50, "crop")
    assert result_image(cropped).tobytes() == expected.tobytes()
    assert (cropped["metadata"]["resize_mode"], cropped["metadata"]["scale"]) == ("crop", 2.5)
    assert result_image(cropped).text["postprocessing"].startswith("Postprocess upscale to: 100x50, ")
    assert result_image(tall).size == (120, 90)
    assert "resize_mode" not in tall["metadata"]


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize(("mode", "scale"), [("resize", 2.5), ("fill", 1.6667), ("2", 1.6667)])
def test_the_other_resize_modes_stretch_or_pad(mode: str, scale: float) -> None:
    result = upscale(upscaler="lanczos", width=100, height=50, resize_mode=mode)

    assert result_image(result).size == (100, 50)
    assert result["metadata"]["scale"] == scale
    assert result["metadata"]["resize_mode"] in {"resize", "fill"}


@pytest.mark.usefixtures("worker")
def test_lanczos_and_nearest_need_no_model() -> None:
    nearest = upscale(upscaler="Nearest", scale=2)
    lanczos = upscale(upscaler="LANCZOS", scale=2.5, output_format="webp")

    assert result_image(nearest).tobytes() == photo().resize((80, 60), Image.Resampling.NEAREST).tobytes()
    assert result_image(lanczos).size == (100, 75)
    metadata = nearest["metadata"]
    assert (metadata["upscaler"], metadata["upscaler_passes"], metadata["device"]) == ("nearest", 0, "cpu")
    assert "upscaler_scale" not in metadata
    assert "dtype" not in metadata
    assert result_image(nearest).text["postprocessing"].endswith("Postprocess upscaler: Nearest")


@pytest.mark.usefixtures("worker")
def test_the_inputs_a1111_parameters_are_kept_beside_the_postprocessing_line() -> None:
    parameters = "a lighthouse\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 40x30"
    result = upscale(photo(), upscaler="tiny-compact-2x")
    kept = asyncio.run(
        handler.handler({"input": {"task": "upscale", "image": as_base64(photo(), parameters), "upscaler": "nearest"}})
    )

    assert "parameters" not in result_image(result).text
    assert result_image(kept).text["parameters"] == parameters
    assert result_image(kept).text["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: Nearest"
    # A picture with transparency is flattened onto white; its parameters go with it.
    clear = photo().convert("RGBA")
    clear.putalpha(128)
    flattened = asyncio.run(
        handler.handler({"input": {"task": "upscale", "image": as_base64(clear, parameters), "upscaler": "nearest"}})
    )
    assert result_image(flattened).text["parameters"] == parameters


@pytest.mark.usefixtures("worker")
def test_output_quality_for_a_png_is_said_to_change_nothing() -> None:
    # As a generation job says it: nothing a user asks for is dropped without a word.
    result = upscale(upscaler="nearest", output_quality=50)

    assert "output_quality=50 has no effect on png: it is lossless" in result["metadata"]["warnings"]
    jpeg = upscale(upscaler="nearest", output_format="jpeg", output_quality=50)["metadata"]
    assert not any("output_quality" in warning for warning in jpeg.get("warnings", []))


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize("file_format", ["jpeg", "webp"])
def test_a_jpegs_or_webps_parameters_are_kept_as_a_pngs(file_format: str) -> None:
    # As A1111's extras read them (read_info_from_image): from the EXIF UserComment the worker's own files carry.
    parameters = "a lighthouse ü\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 40x30"
    picture = base64.b64encode(encode_image(photo(), file_format, 90, parameters)).decode("ascii")
    kept = asyncio.run(handler.handler({"input": {"task": "upscale", "image": picture, "upscaler": "nearest"}}))

    assert result_image(kept).text["parameters"] == parameters
    assert result_image(kept).text["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: Nearest"


@pytest.mark.usefixtures("worker")
def test_an_upscaled_image_goes_to_s3_and_can_be_read_back_as_an_input(bucket: str) -> None:
    result = upscale(upscaler="tiny-compact-2x", output_type="s3")

    [item] = result["images"]
    assert item["key"] == "test/upscale-job/0-upscaled.png"
    assert "seed" not in item
    read_back = asyncio.run(
        handler.handler({"input": {"task": "upscale", "image": f"s3://{bucket}/{item['key']}", "upscaler": "nearest"}})
    )
    assert read_back["metadata"]["source_width"] == 80, read_back


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"scale": 2, "width": 100}, "scale: not with width: give a factor or a target size, not both"),
        ({"resize_mode": "crop", "width": 100}, "resize_mode: needs both width and height"),
        ({"scale": 1}, "scale=1: must be greater than 1"),
        ({"scale": 2, "upscaler": "tiny-esrgan"}, "upscaler='tiny-esrgan': neither lanczos, nearest nor an upscaler"),
        ({"upscaler": "../x"}, "upscaler='../x': must be lanczos, nearest or an upscaler's name in UPSCALER_DIR"),
        ({"upscaler": "bad/restoration-1x"}, "restoration-1x.safetensors is not an image super-resolution model"),
        ({"upscaler": "bad/scripted"}, "upscaler='bad/scripted': scripted.pt cannot be used: a .pt file"),
        ({"width": 5000}, "width=5000: must be at most 4096 (MAX_UPSCALE_SIDE)"),
        ({"scale": 8, "image_size": (600, 40)}, "scale: 600x40 to 4800x320: each side must be at most 4096"),
        ({"width": 40, "height": 30}, "width x height: 40x30 to 40x30 does not enlarge the image"),
        ({"prompt": "a fox"}, "prompt='a fox': unknown field; the fields are: task, image, upscaler, scale,"),
        ({"image": "not an image"}, "image: "),
        ({"output_type": "s3"}, "output_type='s3': needs a bucket, and none is configured"),
    ],
    ids=lambda value: str(value)[:40] if isinstance(value, dict) else None,
)
def test_a_bad_upscale_job_is_refused_naming_the_field_and_the_next_job_works(
    fields: dict[str, Any], says: str
) -> None:
    job = {
        "task": "upscale",
        "upscaler": "tiny-compact-2x",
        "image": as_base64(photo(fields.pop("image_size", PHOTO_SIZE))),
    }
    error = asyncio.run(handler.handler({"input": {**job, **fields}}))["error"]

    assert says in error, error
    assert result_image(upscale(upscaler="tiny-compact-2x")).size == (80, 60)


@pytest.mark.usefixtures("worker")
def test_a_generation_job_naming_a_task_is_told_to_leave_it_out() -> None:
    job = {"input": {"task": "txt2img", "prompt": "a fox", "num_inference_steps": 2}}

    error = asyncio.run(handler.handler(job))["error"]
    assert "task='txt2img': must be 'upscale', the one task named" in error


@pytest.mark.usefixtures("worker")
def test_the_deadline_stops_an_upscale_between_tiles_and_the_next_job_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPSCALE_TILE", "64")
    monkeypatch.setenv("UPSCALE_TILE_OVERLAP", "8")
    monkeypatch.setenv("GENERATION_TIMEOUT_SECONDS", "30")
    engine = handler.get_engine()
    now = [0.0]

    def clock() -> float:
        now[0] += 20  # each reading 20 s later: the third tile starts past the deadline
        return now[0]

    monkeypatch.setattr(engine, "clock", clock)
    late = upscale(photo((160, 100)), upscaler="tiny-compact-2x")
    assert "ran past GENERATION_TIMEOUT_SECONDS=30 before its next tile" in late["error"], late

    monkeypatch.setattr(engine, "clock", lambda: 0.0)
    assert result_image(upscale(photo((160, 100)), upscaler="tiny-compact-2x")).size == (320, 200)


@pytest.mark.usefixtures("small_tiles")
def test_an_upscale_out_of_memory_in_its_tiles_runs_again_in_tiles_half_as_large() -> None:
    picture = photo((120, 90))
    whole = result_image(upscale(picture, upscaler="tiny-compact-2x"))
    model = handler.get_engine().upscalers._model("tiny-compact-2x").model

    with injected(model, larger_than(64)):
        retried = upscale(picture, upscaler="tiny-compact-2x")
    assert retried["metadata"]["warnings"] == [
        "the GPU ran out of memory; the image was upscaled again in tiles of 64 pixels"
    ]
    difference = np.abs(np.asarray(result_image(retried), np.int16) - np.asarray(whole, np.int16))
    assert difference.max() <= 1, "tiles give the whole image's upscale"

    with injected(model, larger_than(0)):
        failed = upscale(picture, upscaler="tiny-compact-2x")
    assert failed["error"] == (
        "upscaling 120x90 with tiny-compact-2x ran out of GPU memory even in tiles of 64 pixels: set UPSCALE_TILE lower"
    )
    assert result_image(upscale(picture, upscaler="tiny-compact-2x")).size == (240, 180), "the next job runs"


@pytest.mark.usefixtures("worker")
def test_the_describe_job_lists_the_upscalers_and_the_largest_result() -> None:
    described = asyncio.run(handler.handler({"input": {"describe": True}}))["describe"]

    assert described["upscalers"][:2] == ["lanczos", "nearest"]
    assert {"tiny-esrgan-4x", "tiny-compact-2x"} <= set(described["upscalers"])
    assert described["limits"]["max_upscale_side"] == 4096
    assert {"kind": "upscaler", "name": "bad/scripted"} in [
        {key: item[key] for key in ("kind", "name")} for item in described["refused"]
    ]


@pytest.mark.usefixtures("worker")
def test_parameters_too_long_for_a_jpegs_exif_are_left_out_with_a_warning() -> None:
    long_text = "a lighthouse, " * 2500 + "\nSteps: 2, Seed: 1"  # 35000 characters: 70 KB in UTF-16
    job = {"task": "upscale", "image": as_base64(photo(), long_text), "upscaler": "lanczos", "output_format": "jpeg"}
    result = asyncio.run(handler.handler({"id": "long", "input": job}))

    assert "images" in result, result
    assert any("are not in the jpeg file" in warning for warning in result["metadata"]["warnings"])
    webp = asyncio.run(handler.handler({"id": "long", "input": {**job, "output_format": "webp"}}))
    assert not any("are not in" in warning for warning in webp["metadata"].get("warnings", []))


# --- sizes: the factor's result straight, cover, multiple_of, and what a job may make on its way -------------------


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize(("size", "scale", "result"), [((333, 250), 1.5, (499, 375)), ((75, 75), 1.3, (97, 97))])
def test_a_factor_resizes_straight_to_int_side_x_scale(
    size: tuple[int, int], scale: float, result: tuple[int, int], upscaler_dir: Path
) -> None:
    """No covering size a pixel larger, then cropped: the whole image, resampled once to the result."""
    lanczos = upscale(photo(size), upscaler="lanczos", scale=scale)
    model = upscale(photo(size), upscaler="tiny-compact-2x", scale=scale)

    assert result_image(lanczos).tobytes() == photo(size).resize(result, Image.Resampling.LANCZOS).tobytes()
    expected = by_hand(upscaler_dir, "tiny-compact-2x", photo(size), passes=1).resize(result, Image.Resampling.LANCZOS)
    assert result_image(model).tobytes() == expected.tobytes()


@pytest.mark.usefixtures("worker")
def test_cover_keeps_the_proportions_uncropped_and_multiple_of_rounds_the_sides_worked_out(
    upscaler_dir: Path,
) -> None:
    covered = upscale(upscaler="tiny-compact-2x", width=100, height=50, resize_mode="cover")
    rounded = upscale(upscaler="lanczos", width=100, height=50, resize_mode="cover", multiple_of=8)
    by_factor = upscale(upscaler="lanczos", scale=2.5, multiple_of=8)
    one_side = upscale(upscaler="lanczos", width=100, multiple_of=8)

    # 40x30 covering 100x50: 100x75, its width the target's; nothing cropped or stretched.
    enlarged = by_hand(upscaler_dir, "tiny-compact-2x", photo(), passes=2)
    assert result_image(covered).tobytes() == enlarged.resize((100, 75), Image.Resampling.LANCZOS).tobytes()
    assert covered["metadata"]["resize_mode"] == "cover"
    assert result_image(covered).text["postprocessing"] == (
        "Postprocess upscale to: 100x50, Postprocess upscaler: tiny-compact-2x"
    )
    assert result_image(rounded).tobytes() == photo().resize((96, 72), Image.Resampling.LANCZOS).tobytes()
    assert result_image(by_factor).size == (96, 72)
    assert result_image(one_side).size == (100, 72), "a side given is kept; the one worked out is rounded"


@pytest.mark.usefixtures("worker")
def test_a_crop_says_so_in_the_postprocessing_line_as_a1111() -> None:
    cropped = upscale(upscaler="lanczos", width=100, height=50)

    assert result_image(cropped).text["postprocessing"] == (
        "Postprocess upscale to: 100x50, Postprocess crop to: 100x50, Postprocess upscaler: Lanczos"
    )


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize(
    ("image_size", "fields", "says"),
    [
        pytest.param(
            (200, 8),
            {"upscaler": "lanczos", "width": 512, "height": 512},
            "width x height: 200x8 to 512x512 (crop) first enlarges the image to 12800x512, over "
            "the 1024x1024 pixels an upscale may make on its way ((2 x MAX_UPSCALE_SIDE)²)",
            id="crop-covering",
        ),
        pytest.param(
            (260, 260),
            {"upscaler": "tiny-esrgan-4x", "scale": 1.1},
            "scale: 260x260 to 286x286 through tiny-esrgan-4x (4x) makes a 1040x1040 image on its way, over the "
            "1024x1024 pixels an upscale may make ((2 x MAX_UPSCALE_SIDE)²): use an upscaler of a smaller scale",
            id="model-pass",
        ),
        pytest.param(
            (8, 8),
            {"upscaler": "lanczos", "scale": 1.5, "multiple_of": 16},
            "scale: 8x8 to 0x0: a side rounded down to a multiple of 16 (multiple_of) has no pixels left",
            id="no-pixels",
        ),
        pytest.param(
            (40, 30),
            {"upscaler": "lanczos", "width": 100, "height": 50, "multiple_of": 8},
            "multiple_of: rounds the sides the worker works out, and with width, height and resize_mode crop it "
            "works out none",
            id="multiple-of-with-crop",
        ),
    ],
)
def test_a_job_whose_image_on_its_way_would_be_too_large_is_refused_before_it_is_made(
    monkeypatch: pytest.MonkeyPatch, image_size: tuple[int, int], fields: dict[str, Any], says: str
) -> None:
    """At MAX_UPSCALE_SIDE=512, no image a job makes (the one a crop cuts from, a model's pass) may hold more than
    1024x1024 pixels: refused by the fields that set the size, and the next job works."""
    monkeypatch.setenv("MAX_UPSCALE_SIDE", "512")
    job = {"task": "upscale", "image": as_base64(photo(image_size)), **fields}

    error = asyncio.run(handler.handler({"input": job}))["error"]

    assert says in error, error
    assert result_image(upscale(upscaler="tiny-esrgan-4x", scale=2)).size == (80, 60)
