"""A1111's PNG Info (``POST /sdapi/v1/png-info``): an image's parameters, read and parsed as A1111 1.10 does.

The expected dictionaries are worked out by hand from A1111's ``parse_generation_parameters`` (its
infotext_utils.py), ``restore_old_hires_fix_params`` and ``infotext_versions.backcompat``; the worker's own images
go through the handler and come back with the values the job ran with.
"""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

import pytest
from PIL import Image, PngImagePlugin

import handler
from src.finish.png_info import parse_parameters, read_info

# What A1111 fills in for a text that names none of it (its defaults, in its order).
DEFAULTS: dict[str, Any] = {
    "Clip skip": "1",
    "Hires resize-1": 0,
    "Hires resize-2": 0,
    "Hires sampler": "Use same sampler",
    "Hires schedule type": "Use same scheduler",
    "Hires checkpoint": "Use same checkpoint",
    "Hires prompt": "",
    "Hires negative prompt": "",
    "Mask mode": "Inpaint masked",
    "Masked content": "original",
    "Inpaint area": "Whole picture",
    "Masked area padding": 32,
    "RNG": "GPU",
    "Schedule type": "Automatic",
    "Schedule max sigma": 0,
    "Schedule min sigma": 0,
    "Schedule rho": 0,
    "VAE Encoder": "Full",
    "VAE Decoder": "Full",
    "FP8 weight": "Disable",
    "Refiner switch by sampling steps": False,
}


def test_a1111s_own_example_parses_as_a1111_parses_it() -> None:
    """The example of parse_generation_parameters' docstring, prompt over two lines."""
    text = (
        "girl with an artist's beret, determined,\nblue eyes, desert scene\n"
        "Negative prompt: ugly, (((deformed))), [blurry]\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x768, Model hash: 45dee52b"
    )
    assert parse_parameters(text) == {
        "Prompt": "girl with an artist's beret, determined,\nblue eyes, desert scene",
        "Negative prompt": "ugly, (((deformed))), [blurry]",
        "Steps": "20",
        "Sampler": "Euler a",
        "CFG scale": "7",
        "Seed": "965400086",
        "Size-1": "512",
        "Size-2": "768",
        "Model hash": "45dee52b",
        **DEFAULTS,
        "Emphasis": "Original",  # the prompts weigh words: A1111's emphasis, for texts that do not name one
    }


def test_quoted_values_empty_values_and_a_text_without_fields() -> None:
    parsed = parse_parameters(
        'a fox\nSteps: 4, Sampler: DPM2, Schedule type: Uniform, Lora hashes: "tiny: 1a2b, other: 3c4d", '
        'ControlNet 0: "Module: canny, Model: net [0123abcd], Weight: 0.8", Empty: , Clip skip: 2'
    )
    assert parsed["Lora hashes"] == "tiny: 1a2b, other: 3c4d"
    assert parsed["ControlNet 0"] == "Module: canny, Model: net [0123abcd], Weight: 0.8"
    assert (parsed["Schedule type"], parsed["Clip skip"]) == ("Uniform", "2")
    assert "Empty" not in parsed, "A1111's parse fails on an empty value and leaves it out"
    # Fewer than three fields on the last line: it is the prompt's.
    assert parse_parameters("a fox\nin the snow, Steps: 4")["Prompt"] == "a fox\nin the snow, Steps: 4"
    assert parse_parameters("") == {"Prompt": "", "Negative prompt": "", **DEFAULTS}
    assert "Emphasis" not in parse_parameters("a fox BREAK in the snow\nSteps: 4, Seed: 1, Size: 64x64")
    # The prompts are set after the fields, as A1111 sets them: a field cannot replace them.
    assert parse_parameters("a fox\nSteps: 1, Seed: 1, Prompt: other")["Prompt"] == "a fox"
    # Sizes that are not sizes are kept as they came, not a failure.
    broken = parse_parameters("a\nSteps: 1, Size: 0x0, First pass size: 0x0, Seed: 1")
    assert (broken["Size-1"], broken["First pass size-1"]) == ("0", "0")


def test_hires_prompts_the_same_as_the_jobs_are_empty_as_a1111_reads_them() -> None:
    fields = 'Steps: 1, Seed: 1, Hires prompt: a fox, Hires negative prompt: "dark"'
    parsed = parse_parameters(f"a fox\nNegative prompt: blurry\n{fields}")
    assert (parsed["Hires prompt"], parsed["Hires negative prompt"]) == ("", "dark")
    old = parse_parameters("a fox\nSteps: 1, Seed: 1, Hires prompt: a fox, Version: v1.8.0")
    assert old["Hires prompt"] == "a fox", "before 1.8.0-139, A1111 keeps it"


def test_an_old_first_pass_size_and_an_old_version_are_read_as_a1111_reads_them() -> None:
    old = parse_parameters(
        "a [cat:dog:0.5]\nSteps: 20, Sampler: DDIM, Size: 1024x768, First pass size: 0x0, Version: v1.5.1"
    )
    # The old algorithm's first pass: about 512² pixels, in multiples of 64.
    assert (old["Size-1"], old["Size-2"], old["Hires resize-1"], old["Hires resize-2"]) == (640, 448, 1024, 768)
    assert old["Old prompt editing timelines"] is True
    assert old["Pad conds v0"] is True
    assert old["Downcast alphas_cumprod"] is True
    recent = parse_parameters("a fox\nSteps: 20, Sampler: DDIM, Size: 512x512, Version: v1.10.1")
    assert "Downcast alphas_cumprod" not in recent
    assert "Pad conds v0" not in recent


def png_info(image_base64: str, **api: Any) -> Any:
    job = {
        "id": "png-info",
        "input": {
            "api": {"method": "POST", "endpoint": "/sdapi/v1/png-info", **api},
            "payload": {"image": image_base64},
        },
    }
    return asyncio.run(handler.handler(job))


def generated(output_format: str) -> tuple[str, dict[str, Any]]:
    """A worker image (base64) and the metadata of the job that made it."""
    job = {
        "prompt": "a (red:1.2) fox",
        "negative_prompt": "blurry",
        "num_inference_steps": 2,
        "width": 64,
        "height": 64,
        "seed": 5,
        "scheduler": "Euler a",
        "output_format": output_format,
    }
    result = asyncio.run(handler.handler({"id": "made", "input": job}))
    assert "error" not in result, result
    return result["images"][0]["image"], result["metadata"]


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
def test_the_workers_images_give_back_their_parameters(output_format: str) -> None:
    """A PNG's parameters chunk, a JPEG's or WebP's EXIF UserComment: the text written, parsed."""
    image, metadata = generated(output_format)

    answer = png_info(image)

    assert set(answer) == {"info", "items", "parameters"}
    assert answer["info"].startswith("a (red:1.2) fox\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a")
    parameters = answer["parameters"]
    assert (parameters["Prompt"], parameters["Negative prompt"]) == ("a (red:1.2) fox", "blurry")
    assert (parameters["Steps"], parameters["Sampler"], parameters["Seed"]) == ("2", "Euler a", "5")
    assert (parameters["Size-1"], parameters["Size-2"], parameters["RNG"]) == ("64", "64", "CPU")
    assert parameters["Model"] == metadata["model"]
    assert not {"exif", "parameters"} & set(answer["items"])


@pytest.mark.usefixtures("worker")
def test_other_text_chunks_are_items_and_an_image_without_parameters_parses_to_the_defaults() -> None:
    chunks = PngImagePlugin.PngInfo()
    chunks.add_text("Software", "some editor")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buffer, format="PNG", pnginfo=chunks, dpi=(72, 72))

    answer = png_info(base64.b64encode(buffer.getvalue()).decode())

    assert answer == {
        "info": "",
        "items": {"Software": "some editor"},
        "parameters": {"Prompt": "", "Negative prompt": "", **DEFAULTS},
    }


@pytest.mark.usefixtures("worker")
def test_a_parameters_text_too_long_to_read_is_refused() -> None:
    chunks = PngImagePlugin.PngInfo()
    chunks.add_text("parameters", "a" * 70_000)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG", pnginfo=chunks)

    answer = png_info(base64.b64encode(buffer.getvalue()).decode())

    assert "payload.image: its parameters text is 70000 characters, over the 65536" in answer["error"]


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize(
    ("job", "message"),
    [
        pytest.param(
            {"api": {"method": "GET", "endpoint": "/sdapi/v1/png-info"}},
            "api.method='GET': must be POST, the method of /sdapi/v1/png-info",
            id="get",
        ),
        pytest.param(
            {"api": {"endpoint": "png-info"}, "payload": {}},
            "payload.image=None: must be an image, as base64",
            id="no-image",
        ),
        pytest.param(
            {"api": {"endpoint": "png-info"}, "payload": {"image": "aGVsbG8=", "imgae": 1}},
            "payload.imgae: not a field of png-info, which takes only image",
            id="unknown-field",
        ),
        pytest.param(
            {"api": {"endpoint": "png-info"}, "payload": {"image": "aGVsbG8="}},
            "payload.image: not an image",
            id="not-an-image",
        ),
    ],
)
def test_a_bad_png_info_request_names_its_field(job: dict[str, Any], message: str) -> None:
    result = asyncio.run(handler.handler({"id": "bad", "input": job}))
    assert message in result["error"]


def test_read_info_keeps_an_exif_user_comment_over_a_parameters_chunk() -> None:
    """As A1111's read_info_from_image: EXIF wins, and what its piexif cannot decode is read as UTF-8."""
    image = Image.new("RGB", (8, 8))
    exif = image.getexif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + "from exif".encode("utf_16_be")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    with Image.open(buffer) as loaded:
        loaded.info["parameters"] = "from the chunk"
        text, items = read_info(loaded)
    assert text == "from exif"
    assert not {"exif", "jfif"} & set(items)
