"""img2img, inpaint, outpaint and hires fix on the tiny real pipeline, through handler.handler.

Each task end to end, the same bytes twice, the unmasked pixels kept, the same
pictures as bare diffusers' own pipelines, one copy of the weights for every
task, and bad inputs answered with the field while the next job runs.
"""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageFilter

import handler
from src.models.schedulers import make_scheduler
from src.prepare.canvas import fill_masked
from tests.a1111_inpaint import a1111_inpaint
from tests.a1111_unipc import a1111_unipc
from tests.conftest import box_mask, decode_png, encoding_at_the_vae_mean, noise_image
from tests.test_resilience import CUDA_OOM, injected, raises_on

pytestmark = pytest.mark.usefixtures("worker")

FAST = {"num_inference_steps": 4, "seed": 11}


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


IMAGE = noise_image(128, 64)
MASK = box_mask(128, 64, (32, 16, 96, 48))


def run(**fields: Any) -> dict[str, Any]:
    return asyncio.run(handler.handler({"id": "task-job", "input": {"prompt": "a fox", **FAST, **fields}}))


def ok(**fields: Any) -> dict[str, Any]:
    result = run(**fields)
    assert "error" not in result, result["error"]
    return result


def images_of(result: dict[str, Any]) -> list[Image.Image]:
    return [decode_png(item["image"]) for item in result["images"]]


def array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def engine() -> Any:
    return handler.get_engine()


# --- each task, end to end --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "task", "size"),
    [
        pytest.param({"image": png_base64(IMAGE)}, "img2img", (128, 64), id="img2img"),
        pytest.param({"image": png_base64(IMAGE), "mask": png_base64(MASK)}, "inpaint", (128, 64), id="inpaint"),
        pytest.param(
            {"image": png_base64(IMAGE), "mask": png_base64(MASK), "inpaint_area": "masked"},
            "inpaint",
            (128, 64),
            id="inpaint-masked",
        ),
        pytest.param(
            {"image": png_base64(IMAGE), "outpaint": {"left": 64, "top": 64}}, "outpaint", (192, 128), id="outpaint"
        ),
        pytest.param({"width": 64, "height": 64, "hires": {"scale": 2.0}}, "txt2img", (128, 128), id="hires-latent"),
        pytest.param(
            {"width": 64, "height": 64, "hires": {"scale": 1.5, "upscaler": "lanczos", "steps": 3}},
            "txt2img",
            (96, 96),
            id="hires-lanczos",
        ),
    ],
)
def test_each_task_runs_end_to_end(fields: dict[str, Any], task: str, size: tuple[int, int]) -> None:
    result = ok(**fields, num_images=2)

    assert result["metadata"]["task"] == task
    assert [image.size for image in images_of(result)] == [size, size]
    assert [item["seed"] for item in result["images"]] == [11, 12]
    parameters = images_of(result)[0].text["parameters"]
    if task == "txt2img":
        assert "Hires upscale: " in parameters
        assert "Hires steps: " in parameters
        assert "Hires upscaler: " in parameters
        assert "Source size" not in parameters
    else:
        assert "Denoising strength: 0.75" in parameters
        assert "Source size: 128x64" in parameters
        assert result["metadata"]["source_width"] == 128
        assert result["metadata"]["source_height"] == 64
        assert result["metadata"]["timings_ms"]["inputs"] >= 0
    if task in ("inpaint", "outpaint"):
        assert "Mask blur: 4" in parameters


def test_the_metadata_names_what_ran_and_only_that() -> None:
    img2img = ok(image=png_base64(IMAGE), strength=0.5)["metadata"]
    assert (img2img["task"], img2img["strength"], img2img["resize_mode"]) == ("img2img", 0.5, "resize")
    assert "mask_blur" not in img2img
    assert "hires" not in img2img

    txt2img = ok(width=64, height=64)["metadata"]
    assert txt2img["task"] == "txt2img"
    assert not {"strength", "resize_mode", "mask_blur", "source_width", "hires"} & set(txt2img)
    assert "inputs" not in txt2img["timings_ms"]

    hires = ok(width=64, height=64, hires={"scale": 1.5})["metadata"]
    assert hires["hires"] == {"scale": 1.5, "steps": 4, "strength": 0.5, "upscaler": "latent"}
    assert (hires["width"], hires["height"]) == (64, 64), "the first pass, as A1111's Size"


def test_an_image_without_a_size_keeps_its_own_and_a_large_one_is_fitted() -> None:
    assert images_of(ok(image=png_base64(noise_image(192, 128))))[0].size == (192, 128)

    result = ok(image=png_base64(noise_image(1100, 700)), num_inference_steps=1, strength=1.0)
    assert images_of(result)[0].size == (1024, 640)
    assert any("1100x700 was brought to 1024x640" in warning for warning in result["metadata"]["warnings"])


def test_the_same_request_twice_gives_the_same_bytes() -> None:
    for fields in (
        {"image": png_base64(IMAGE)},
        {"image": png_base64(IMAGE), "mask": png_base64(MASK)},
        {"width": 64, "height": 64, "hires": {"scale": 1.5, "upscaler": "lanczos"}},
    ):
        first, second = ok(**fields), ok(**fields)
        assert [item["image"] for item in first["images"]] == [item["image"] for item in second["images"]]


def assert_same_within_a_level(batched: np.ndarray, alone: np.ndarray) -> None:
    """A batch of 2 runs other float kernels than a batch of 1: a value may land one grey level apart."""
    assert np.abs(batched - alone).max() <= 1


def test_image_i_is_its_own_seed_alone() -> None:
    batch = ok(image=png_base64(IMAGE), num_images=2)
    alone = ok(image=png_base64(IMAGE), seed=12)
    assert_same_within_a_level(array(images_of(batch)[1]), array(images_of(alone)[0]))


def test_inpaint_keeps_the_unmasked_pixels_byte_for_byte() -> None:
    result = ok(image=png_base64(IMAGE), mask=png_base64(MASK), mask_blur=6)

    painted, source = array(images_of(result)[0]), array(IMAGE)
    kept = np.asarray(MASK) == 0
    assert np.array_equal(painted[kept], source[kept])
    assert not np.array_equal(painted[~kept], source[~kept])

    free = ok(image=png_base64(IMAGE), mask=png_base64(MASK), mask_blur=6, keep_unmasked=False)
    assert not np.array_equal(array(images_of(free)[0])[kept], source[kept]), "without it, the model's pixels"


def test_outpaint_keeps_the_image_and_paints_around_it() -> None:
    result = ok(image=png_base64(IMAGE), outpaint={"right": 64, "bottom": 64}, mask_blur=4)
    painted = array(images_of(result)[0])
    assert painted.shape == (128, 192, 3)
    assert np.array_equal(painted[: 64 - 4 - 1, : 128 - 4 - 1], array(IMAGE)[: 64 - 4 - 1, : 128 - 4 - 1])
    # The new area is painted: not the stretched edges the canvas was filled with before denoising.
    filled = np.pad(array(IMAGE), ((0, 64), (0, 64), (0, 0)), mode="edge")
    new_area = np.ones(painted.shape[:2], dtype=bool)
    new_area[:64, :128] = False
    difference = np.abs(painted[new_area] - filled[new_area])
    assert difference.mean() > 10, f"the new area is the fill, mean difference {difference.mean():.1f}"
    assert painted[new_area].std() > 0, "a picture, not a flat colour"


# --- the same pictures as bare diffusers ----------------------------------------------------------


def bare(pipeline_class: type, scheduler: str = "DPM++ 2M Karras") -> Any:
    """Bare diffusers' ``pipeline_class`` on the worker's weights, its input image encoded at the VAE's mean."""
    base = engine()._pipeline
    components = {**base.components, "scheduler": make_scheduler(scheduler, base.scheduler.config)}
    pipeline = encoding_at_the_vae_mean(pipeline_class)(**components, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.mark.parametrize("scheduler", ["DPM++ 2M Karras", "Euler a", "DDIM"])
def test_img2img_matches_bare_diffusers(scheduler: str) -> None:
    """At A1111's count of steps: strength 0.6 of 4 runs int(4 x 0.6) + 1 = 3, from the schedule's second step on,
    as A1111's sample_img2img (its sigmas[steps - t_enc - 1:]); diffusers runs those at strength 0.75."""
    result = ok(image=png_base64(IMAGE), strength=0.6, scheduler=scheduler, num_images=2)

    reference = bare(StableDiffusionImg2ImgPipeline, scheduler)(
        "a fox",
        image=IMAGE,
        strength=0.75,
        num_inference_steps=4,
        guidance_scale=7.5,
        num_images_per_prompt=2,
        generator=[torch.Generator().manual_seed(seed) for seed in (11, 12)],
    ).images
    for ours, theirs in zip(images_of(result), reference, strict=True):
        assert np.abs(array(ours) - array(theirs)).max() <= 1


def test_unipc_text_to_image_is_a1111s() -> None:
    """UniPC as A1111 samples with it (tests/a1111_unipc.py), the worker's UNet guided as diffusers guides it."""
    result = ok(scheduler="UniPC", num_inference_steps=5, width=64, height=64, num_images=2)

    base = engine()._pipeline
    with torch.no_grad():
        cond, uncond = base.encode_prompt("a fox", torch.device("cpu"), 2, True)
        texts = torch.cat([uncond, cond])

        def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            noise = base.unet(torch.cat([x, x]).float(), t.float(), encoder_hidden_states=texts).sample
            unguided, guided = noise.chunk(2)
            return unguided + 7.5 * (guided - unguided)

        noise = torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(s)) for s in (11, 12)])
        latents = a1111_unipc(eps, noise, base.scheduler.alphas_cumprod, 5).float()
        decoded = base.vae.decode(latents / base.vae.config.scaling_factor).sample
    for ours, theirs in zip(images_of(result), base.image_processor.postprocess(decoded), strict=True):
        assert np.abs(array(ours) - array(theirs)).max() <= 1


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M Karras", "DDIM"])
@pytest.mark.parametrize("rounded", [False, True])
def test_inpaint_is_a1111s(sampler: str, rounded: bool) -> None:
    """A1111's latent mask (rounded with mask_round), its blend of a k-diffusion sampler's denoised latents or a
    timestep sampler's input at every step, and after the last; an A1111 payload's blurred mask has grey edges."""
    fields = {"image": png_base64(IMAGE), "mask": png_base64(MASK), "mask_blur": 6, "keep_unmasked": False}
    result = ok(**fields, scheduler=sampler, mask_round=rounded, num_images=2)

    blurred = MASK.filter(ImageFilter.GaussianBlur(6))
    reference = a1111_inpaint(engine()._pipeline, IMAGE, blurred, seeds=(11, 12), sampler=sampler, rounded=rounded)
    for ours, theirs in zip(images_of(result), reference, strict=True):
        assert np.abs(array(ours) - array(theirs)).max() <= 1


def test_only_masked_paints_a_larger_image_at_its_own_size_as_diffusers_padding_mask_crop() -> None:
    """A1111's "only masked" on an image larger than the job: the region is cropped from the image at its own
    resolution and the image comes back at its size, as diffusers' ``padding_mask_crop`` crops, fills and pastes
    (``get_crop_region``, resize mode "fill", ``apply_overlay``), the crop painted as A1111 paints."""
    image, mask = noise_image(320, 192, seed=4), box_mask(320, 192, (200, 40, 260, 90))
    result = ok(
        image=png_base64(image),
        mask=png_base64(mask),
        width=128,
        height=64,
        inpaint_area="masked",
        inpaint_padding=8,
        mask_blur=0,
        scheduler="Euler",
    )

    ours = array(images_of(result)[0])
    assert ours.shape == (192, 320, 3), "the input image's own size"
    assert result["metadata"]["width"] == 128, "the job ran at width x height"
    kept = np.asarray(mask) == 0
    assert np.array_equal(ours[kept], array(image)[kept]), "outside the mask: the input's bytes, at full resolution"
    base = engine()._pipeline
    crop = VaeImageProcessor.get_crop_region(mask, 128, 64, pad=8)
    region, region_mask = (base.image_processor.resize(i.crop(crop), 64, 128, "fill") for i in (image, mask))
    [painted] = a1111_inpaint(base, region, region_mask, seeds=(11,))
    reference = base.image_processor.apply_overlay(mask, image, painted, crop)
    assert np.abs(ours - array(reference)).max() <= 1


def test_mask_round_makes_a_masks_alpha_black_and_white_before_its_blur_as_a1111() -> None:
    # A1111's create_binary_mask: an RGBA mask's alpha, rounded (above 128 is white); an opaque mask's grey as it is.
    grey = Image.new("L", IMAGE.size, 0)
    grey.paste(100, (0, 0, 64, 64))  # at or under 128: black, kept
    grey.paste(200, (64, 0, 128, 64))  # above 128: white, repainted whole
    alpha = Image.new("RGBA", IMAGE.size, (255, 0, 0, 0))
    alpha.putalpha(grey)  # a red stroke, its alpha the grey above
    fields = {"image": png_base64(IMAGE), "strength": 0.9, "mask_blur": 2}

    rounded = ok(**fields, mask=png_base64(alpha), mask_round=True)
    # An opaque mask's grey is not rounded; its blurred mask at the latents' size is, as for any mask.
    by_hand = ok(**fields, mask=png_base64(grey.point(lambda value: 255 if value > 128 else 0)), mask_round=True)
    soft = ok(**fields, mask=png_base64(alpha))

    assert rounded["metadata"]["mask_round"] is True
    assert soft["metadata"]["mask_round"] is False
    assert np.array_equal(array(images_of(rounded)[0]), array(images_of(by_hand)[0]))
    left = (slice(0, 64), slice(0, 60))  # the half at 100, clear of the blurred edge
    assert np.array_equal(array(images_of(rounded)[0])[left], array(IMAGE)[left]), "kept, byte for byte"
    assert np.abs(array(images_of(soft)[0])[left] - array(IMAGE)[left]).max() > 2, "partly repainted"
    outpainted = run(image=png_base64(IMAGE), outpaint={"left": 64}, mask_round=True)
    assert "mask_round: needs a mask; outpaint paints its new area" in outpainted["error"]


@pytest.mark.parametrize("fill", ["latent_noise", "latent_nothing"])
def test_inpaint_from_latent_noise_or_nothing_is_a1111s_and_keeps_the_unmasked_pixels(fill: str) -> None:
    # At 0.5, the last 3 of the 4 steps: from the full noise (0.75 runs all 4), the image's latents hardly show.
    fields = {
        "image": png_base64(IMAGE),
        "mask": png_base64(MASK),
        "mask_blur": 0,
        "scheduler": "Euler",
        "strength": 0.5,
    }
    result = ok(**fields, inpaint_fill=fill, keep_unmasked=False)

    # A1111 paints its masked content "fill" first for every fill but "original" (its img2img init).
    base = engine()._pipeline
    [reference] = a1111_inpaint(base, fill_masked(IMAGE, MASK), MASK, seeds=(11,), strength=0.5, fill=fill)
    assert np.abs(array(images_of(result)[0]) - array(reference)).max() <= 1
    original = ok(**fields, keep_unmasked=False)
    inside = np.asarray(MASK) > 0
    # More than float rounding apart inside the mask (which moves a pixel by a level at most).
    assert np.abs(array(images_of(result)[0]) - array(images_of(original)[0]))[inside].mean() > 1

    kept = ok(**fields, inpaint_fill=fill.replace("_", " "), num_images=2)
    assert kept["metadata"]["inpaint_fill"] == fill
    for image in images_of(kept):
        assert np.array_equal(array(image)[~inside], array(IMAGE)[~inside])
        assert f"Masked content: {fill.replace('_', ' ')}" in image.text["parameters"]
    alone = ok(**fields, inpaint_fill=fill, seed=12)
    assert_same_within_a_level(array(images_of(kept)[1]), array(images_of(alone)[0]))


# --- one copy of the weights --------------------------------------------------------------------


def test_every_task_runs_on_the_same_weights() -> None:
    pipeline = engine()._pipeline
    seen: list[set[int]] = []

    def record(module: torch.nn.Module, _inputs: Any) -> None:
        seen.append({parameter.data_ptr() for parameter in module.parameters()})

    loaded = {parameter.data_ptr() for parameter in pipeline.unet.parameters()}
    handle = pipeline.unet.register_forward_pre_hook(record)
    try:
        ok(width=64, height=64, num_inference_steps=1)
        ok(width=64, height=64, num_inference_steps=2, hires={"scale": 1.5})
        ok(image=png_base64(IMAGE), num_inference_steps=2, strength=0.5)
        ok(image=png_base64(IMAGE), mask=png_base64(MASK), num_inference_steps=2, strength=0.5)
        ok(image=png_base64(IMAGE), outpaint={"left": 64}, num_inference_steps=2, strength=0.5)
    finally:
        handle.remove()
    # The hires pass runs its 2 steps exactly; strength 0.5 of 2 steps runs int(2 x 0.5) + 1 = 2, as A1111.
    assert len(seen) == 1 + 2 + 2 + 2 + 2 + 2
    assert all(pointers == loaded for pointers in seen)


# --- guard rails: progress, OOM retry ------------------------------------------------------------


def progress_of(fields: dict[str, Any]) -> list[dict[str, int]]:
    from src.schema import parse_input

    request = parse_input({"input": {"prompt": "a fox", **FAST, **fields}}, handler.get_settings())
    from src.prepare.inputs import prepare_inputs

    inputs = prepare_inputs(request, handler.get_settings(), None)
    reports: list[dict[str, int]] = []
    engine().generate(inputs.request, images=inputs.images, timeout_s=600, on_progress=reports.append)
    return reports


def test_progress_counts_the_steps_that_run() -> None:
    # img2img at strength 0.5 runs int(8 x 0.5) + 1 = 5 steps; hires runs 8, then exactly its 6 (A1111's counts).
    assert progress_of({"image": png_base64(IMAGE), "num_inference_steps": 8, "strength": 0.5})[-1] == {
        "step": 5,
        "total_steps": 5,
    }
    hires = progress_of({"width": 64, "height": 64, "num_inference_steps": 8, "hires": {"scale": 1.5, "steps": 6}})
    assert hires[-1] == {"step": 14, "total_steps": 14}


@pytest.mark.parametrize(
    ("fields", "task"),
    [
        pytest.param({"image": png_base64(IMAGE)}, "img2img", id="img2img"),
        pytest.param({"image": png_base64(IMAGE), "mask": png_base64(MASK)}, "inpaint", id="inpaint"),
    ],
)
def test_an_oom_in_an_image_task_is_retried_and_gives_the_same_picture(fields: dict[str, Any], task: str) -> None:
    fields = {**fields, "num_images": 2}
    clean = ok(**fields)
    with injected(engine()._pipeline.unet, raises_on(lambda call: call == 1, CUDA_OOM)):
        retried = ok(**fields)

    assert retried["metadata"]["task"] == task
    assert any("ran out of memory" in warning for warning in retried["metadata"]["warnings"])
    for first, second in zip(images_of(clean), images_of(retried), strict=True):
        assert np.abs(array(first) - array(second)).max() <= 2


# --- bad inputs ----------------------------------------------------------------------------------


def gif() -> str:
    buffer = io.BytesIO()
    noise_image(64, 64).save(buffer, format="GIF")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


BAD = [
    pytest.param({"image": png_base64(IMAGE)[:200]}, "image", id="truncated-base64"),
    pytest.param({"image": base64.b64encode(b"just some text, no picture").decode()}, "image", id="text-file"),
    pytest.param({"image": ""}, "image", id="empty"),
    pytest.param({"image": png_base64(IMAGE), "mask": png_base64(box_mask(64, 64, (0, 0, 8, 8)))}, "mask", id="size"),
    pytest.param({"image": png_base64(IMAGE), "strength": 0}, "strength", id="strength-0"),
    pytest.param({"image": png_base64(IMAGE), "strength": 1.5}, "strength", id="strength-1.5"),
    pytest.param(
        {"image": png_base64(IMAGE), "outpaint": {"left": 2048, "right": 2048}},
        "outpaint: left=2048 + right=2048 adds 4096 pixels to the width",
        id="outpaint-past-max-side",
    ),
    pytest.param({"width": 512, "height": 512, "num_images": 4, "hires": {"scale": 2.0}}, "MAX_PIXELS", id="hires"),
    pytest.param({"image": gif()}, "image", id="gif"),
    pytest.param({"image": png_base64(noise_image(1, 1))}, "image", id="1x1"),
]


@pytest.mark.parametrize(("fields", "named"), BAD)
def test_bad_inputs_name_the_field_and_the_next_job_runs(fields: dict[str, Any], named: str) -> None:
    result = run(**fields)

    assert set(result) == {"error"}
    assert named in result["error"]
    assert len(result["error"]) < 2100, "no payload echoed back"
    ok(width=64, height=64, num_inference_steps=1)


# --- s3:// input ---------------------------------------------------------------------------------


def test_an_image_from_the_configured_bucket(bucket: str, s3_server: Any) -> None:
    s3_server.client().put_object(Bucket=bucket, Key="inputs/fox.png", Body=base64.b64decode(png_base64(IMAGE)))

    result = ok(image=f"s3://{bucket}/inputs/fox.png", output_type="base64")
    assert result["metadata"]["task"] == "img2img"
    assert images_of(result)[0].size == IMAGE.size

    missing = run(image=f"s3://{bucket}/inputs/nothing.png", output_type="base64")
    assert "image" in missing["error"]
    assert "inputs/nothing.png" in missing["error"]


def test_inpaint_image_i_is_its_own_seed_alone() -> None:
    fields = {"image": png_base64(IMAGE), "mask": png_base64(MASK)}
    batch = ok(**fields, num_images=2)
    alone = ok(**fields, seed=12)
    assert_same_within_a_level(array(images_of(batch)[1]), array(images_of(alone)[0]))
