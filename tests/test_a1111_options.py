"""A1111's generation options: variation seeds, seed resize and tiling, through the handler on the tiny model.

The variation noise is compared with a re-implementation of A1111's ``ImageRNG.first`` and ``slerp`` written here
from their description in A1111's wiki and source (a seed's noise, drawn at the "resize from" size when one is
given, spherically interpolated towards the variation seed's by the strength, then pasted centred into noise of
the job's size), not with the worker's own code.
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
from PIL import Image

import handler
from src.run.noise import image_noise
from src.settings import Settings

JOB = {"prompt": "a brick wall", "num_inference_steps": 3, "seed": 3, "width": 64, "height": 64}


@pytest.fixture(autouse=True)
def worker(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for field in Settings.model_fields.values():
        monkeypatch.delenv(str(field.alias), raising=False)
    monkeypatch.setenv("MODEL_ID", str(tiny_model_dir))
    monkeypatch.setenv("EMBED_PARAMETERS", "true")
    monkeypatch.setattr(handler, "_settings", None)
    monkeypatch.setattr(handler, "_engine", None)


def run(**fields: Any) -> dict[str, Any]:
    return asyncio.run(handler.handler({"id": "a1111-options", "input": {**JOB, **fields}}))


def pixels(result: dict[str, Any]) -> np.ndarray:
    assert "images" in result, result
    with Image.open(io.BytesIO(base64.b64decode(result["images"][0]["image"]))) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def parameters(result: dict[str, Any]) -> str:
    with Image.open(io.BytesIO(base64.b64decode(result["images"][0]["image"]))) as image:
        return str(image.text["parameters"])


# --- A1111's arithmetic, written from its description -------------------------------------------------------


def a1111_noise(seed: int, subseed: int, strength: float, shape: tuple[int, int, int], resize: tuple[int, int] | None):
    """A1111's first noise for one image with its CPU generator: (C, H, W)."""

    def randn(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
        generator = torch.Generator("cpu")
        generator.manual_seed(seed)
        return torch.randn(shape, generator=generator)

    def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        low_norm = low / torch.norm(low, dim=1, keepdim=True)
        high_norm = high / torch.norm(high, dim=1, keepdim=True)
        dot = (low_norm * high_norm).sum(1)
        if dot.mean() > 0.9995:
            return low * val + high * (1 - val)
        omega = torch.acos(dot)
        so = torch.sin(omega)
        return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(
            1
        ) * high

    noise_shape = shape if resize is None else (shape[0], resize[1] // 8, resize[0] // 8)
    noise = randn(seed, noise_shape)
    if strength != 0:
        noise = slerp(strength, noise, randn(subseed, noise_shape))
    if noise_shape != shape:
        x = randn(seed, shape)
        dx = (shape[2] - noise_shape[2]) // 2
        dy = (shape[1] - noise_shape[1]) // 2
        w = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
        h = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
        tx = 0 if dx < 0 else dx
        ty = 0 if dy < 0 else dy
        dx = max(-dx, 0)
        dy = max(-dy, 0)
        x[:, ty : ty + h, tx : tx + w] = noise[:, dy : dy + h, dx : dx + w]
        noise = x
    return noise


@pytest.mark.parametrize(
    ("strength", "resize"),
    [(0.3, None), (1.0, None), (0.0, (128, 32)), (0.6, (32, 128)), (0.5, (16, 16)), (0.25, (64, 64))],
)
def test_the_noise_is_a1111s(strength: float, resize: tuple[int, int] | None) -> None:
    shape = (4, 8, 8)
    drawn = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(11))  # the seed's, as drawn
    ours = image_noise(drawn, 11, subseed=22, strength=strength, resize_from=resize)

    assert torch.allclose(ours, a1111_noise(11, 22, strength, shape, resize), atol=1e-6)


# --- through the handler -------------------------------------------------------------------------------------


def test_strength_0_gives_the_plain_seeds_bytes_and_1_the_variation_seeds_image() -> None:
    plain = run()
    zero = run(subseed=9, subseed_strength=0)
    full = run(subseed=9, subseed_strength=1)
    nine = run(seed=9)
    half = run(subseed=9, subseed_strength=0.5)

    assert base64.b64decode(zero["images"][0]["image"]) == base64.b64decode(plain["images"][0]["image"])
    assert int(np.abs(pixels(full) - pixels(nine)).max()) <= 2, "all of the variation seed's noise"
    assert int(np.abs(pixels(half) - pixels(plain)).max()) > 10
    assert "Variation seed: 9, Variation seed strength: 0.5" in parameters(half)
    assert "Variation seed" not in parameters(zero)
    assert half["metadata"]["subseed"] == 9
    assert half["metadata"]["subseed_strength"] == 0.5


def test_seed_resize_from_the_jobs_own_size_changes_nothing_and_another_size_changes_the_image() -> None:
    plain = run()
    own = run(seed_resize_from_w=64, seed_resize_from_h=64)
    wider = run(seed_resize_from_w=128, seed_resize_from_h=32)

    assert (pixels(own) == pixels(plain)).all()
    assert int(np.abs(pixels(wider) - pixels(plain)).max()) > 10
    assert "Seed resize from: 128x32" in parameters(wider)


def test_a_variation_seed_acts_on_every_task_and_batch_image() -> None:
    image = base64.b64encode(_png(Image.new("RGB", (64, 64), (120, 80, 40)))).decode()
    for fields in ({"image": image, "strength": 0.8}, {"hires": {"scale": 1.5, "steps": 2}}, {"num_images": 2}):
        plain, varied = run(**fields), run(**fields, subseed=5, subseed_strength=0.7)
        again = run(**fields, subseed=5, subseed_strength=0.7)
        for index in range(len(plain["images"])):
            one, other = _decoded(plain, index), _decoded(varied, index)
            assert int(np.abs(one - other).max()) > 10, fields
        assert varied["images"] == again["images"], "the same variation seed gives the same images"


def test_a_variation_batch_is_a1111s_one_seed_and_subseed_plus_i_each_image_as_asked_for_alone() -> None:
    batch = run(num_images=3, subseed=5, subseed_strength=0.5)

    assert batch["metadata"]["seeds"] == [3, 3, 3], "A1111's all_seeds: the seed for every image"
    assert batch["metadata"]["subseeds"] == [5, 6, 7], "A1111's all_subseeds: subseed + i"
    assert [image["seed"] for image in batch["images"]] == [3, 3, 3]
    images = [_decoded(batch, index) for index in range(3)]
    assert all(int(np.abs(images[0] - other).max()) > 10 for other in images[1:]), "three variations"
    for index in range(3):
        alone = run(subseed=5 + index, subseed_strength=0.5)
        # Within float rounding of a batch (docs/input.md, Seeds).
        assert np.abs(images[index] - pixels(alone)).mean() < 0.5, index
        with Image.open(io.BytesIO(base64.b64decode(batch["images"][index]["image"]))) as image:
            assert "Seed: 3, Size: 64x64" in image.text["parameters"]
            assert f"Variation seed: {5 + index}, Variation seed strength: 0.5" in image.text["parameters"]
    plain = run(num_images=2, subseed=5)
    assert plain["metadata"]["seeds"] == [3, 4], "without a strength, seed + i"
    assert plain["metadata"]["subseeds"] == [5, 6]


def test_the_variation_seeds_wrap_as_the_seeds_do() -> None:
    batch = run(num_images=2, seed=4294967295, subseed=4294967295, subseed_strength=0.25)
    assert batch["metadata"]["seeds"] == [4294967295, 4294967295]
    assert batch["metadata"]["subseeds"] == [4294967295, 0]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _decoded(result: dict[str, Any], index: int) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(result["images"][index]["image"]))) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


# --- tiling -------------------------------------------------------------------------------------------------


def _seam_ratio(image: np.ndarray, axis: int) -> float:
    """How much the wrap-around seam (last row or column against the first) differs, against neighbours inside."""
    inside = np.abs(np.diff(image, axis=axis)).mean()
    seam = np.abs(np.take(image, 0, axis=axis) - np.take(image, -1, axis=axis)).mean()
    return float(seam / inside)


def test_tiling_makes_the_edges_continue_each_other_for_that_job_only() -> None:
    fields = {"width": 128, "height": 128, "num_inference_steps": 4}
    before = run(**fields)
    tiled = run(**fields, tiling=True)
    after = run(**fields)

    for axis in (0, 1):  # top against bottom, left against right
        assert _seam_ratio(pixels(tiled), axis) < 1.2
        assert _seam_ratio(pixels(tiled), axis) < _seam_ratio(pixels(before), axis)
    assert after["images"] == before["images"], "the next job is untiled"
    assert "Tiling: True" in parameters(tiled)
    assert tiled["metadata"]["tiling"] is True
    convolutions = [
        layer for layer in handler.get_engine()._pipeline.unet.modules() if isinstance(layer, torch.nn.Conv2d)
    ]
    assert {layer.padding_mode for layer in convolutions} == {"zeros"}


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"subseed_strength": 1.5}, "subseed_strength=1.5: must be less than or equal to 1"),
        ({"subseed": -5}, "subseed=-5: must be 0 to 4294967295, or -1 or null for a random seed"),
        ({"seed_resize_from_w": 128}, "set both (the size the seed's noise is drawn at), or neither"),
        ({"seed_resize_from_w": 100, "seed_resize_from_h": 64}, "seed_resize_from_w=100: must be a multiple of 8"),
        ({"tiling": "yes"}, "tiling='yes': must be a valid boolean"),
    ],
)
def test_a_bad_value_is_refused_naming_the_field_and_the_next_job_works(fields: dict[str, Any], says: str) -> None:
    error = run(**fields)["error"]

    assert says in error, error
    assert "images" in run()


# --- hires options -----------------------------------------------------------------------------------------

HIRES = {"scale": 1.5, "steps": 2}


def test_the_hires_pass_takes_its_own_sampler_and_prompts() -> None:
    plain = run(hires=HIRES)
    same = run(hires={**HIRES, "sampler": JOB.get("scheduler", "DPM++ 2M Karras"), "prompt": JOB["prompt"]})
    sampler = run(hires={**HIRES, "sampler": "euler_a"})
    prompt = run(hires={**HIRES, "prompt": "a field of red tulips, at noon"})
    negative = run(hires={**HIRES, "negative_prompt": "blurry"})

    assert same["images"] == plain["images"], "the job's own sampler and prompt change nothing"
    for changed in (sampler, prompt, negative):  # the tiny model's text encoder moves pixels a little only
        assert int(np.abs(pixels(changed) - pixels(plain)).max()) > 0
    assert "Hires sampler: Euler a" in parameters(sampler)
    assert 'Hires prompt: "a field of red tulips, at noon"' in parameters(prompt)
    assert "Hires negative prompt: blurry" in parameters(negative)
    assert "Hires sampler" not in parameters(same)
    assert "Hires prompt" not in parameters(same)
    assert sampler["metadata"]["hires"]["sampler"] == "Euler a"


@pytest.mark.parametrize(
    ("hires", "says"),
    [
        ({"sampler": "warp drive"}, "hires.sampler='warp drive': unknown scheduler"),
        ({"prompt": "a fox <lora:tiny:0.5>"}, "hires.prompt="),
        ({"prompt": "[" * 40 + "a" + "]" * 40}, "hires.prompt"),
    ],
)
def test_a_bad_hires_option_is_refused_naming_the_field_and_the_next_job_works(
    hires: dict[str, Any], says: str
) -> None:
    error = run(hires={**HIRES, **hires})["error"]

    assert says in error, error
    assert "images" in run(hires=HIRES)
