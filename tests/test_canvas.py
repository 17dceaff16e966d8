"""Input images brought to the job's size (src/prepare/canvas.py): resize modes, masks, the outpaint canvas, the crop.

Pure PIL and diffusers' image processor: no model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFilter

from src.prepare.canvas import TaskImages, fit, paste_back, prepare
from src.schema import GenerateRequest, InputError, parse_input, resolve_size
from src.settings import load_settings
from tests.conftest import box_mask, noise_image

LIMITS = load_settings({})


def request(**fields: Any) -> GenerateRequest:
    return parse_input({"input": {"prompt": "a fox", "image": "aGVsbG8=", **fields}}, LIMITS)


def prepared(image: Image.Image, mask: Image.Image | None = None, **fields: Any) -> tuple[TaskImages, list[str]]:
    if mask is not None:
        fields["mask"] = "bWFzaw=="  # the reference; the mask itself is the image given here
    resolved, _ = resolve_size(request(**fields), image.size, LIMITS)
    return prepare(resolved, image, mask)


@pytest.mark.parametrize(
    ("mode", "corner"),
    [
        # Stretched: the corner pixel is the image's own corner, blended by Lanczos.
        pytest.param("resize", None, id="resize"),
        # Cropped: a 2:1 image into 1:1 loses its sides, so the left column is from the middle third.
        pytest.param("crop", "inside", id="crop"),
        # Filled: the image fits in the middle, the bands above and below repeat its edges.
        pytest.param("fill", "band", id="fill"),
    ],
)
def test_resize_modes_are_a1111s(mode: str, corner: str | None) -> None:
    left, right = Image.new("RGB", (128, 128), (255, 0, 0)), Image.new("RGB", (128, 128), (0, 0, 255))
    image = Image.new("RGB", (256, 128))
    image.paste(left, (0, 0))
    image.paste(right, (128, 0))

    fitted = fit(image, 128, 128, mode)

    assert fitted.size == (128, 128)
    top_left = fitted.getpixel((0, 0))
    if mode == "resize":
        assert top_left[0] > 200, "stretched: the red half still covers the left"
    elif mode == "crop":
        assert min(top_left[0], fitted.getpixel((127, 64))[2]) > 200, "the centre, red then blue"
    else:
        assert fitted.getpixel((64, 0)) == fitted.getpixel((64, 31)), "the band above repeats the edge"


def test_an_image_at_the_size_is_not_touched() -> None:
    image = noise_image(192, 128)
    assert fit(image, 192, 128, "resize") is image


def test_stretching_out_of_proportion_is_said() -> None:
    _, warnings = prepared(noise_image(256, 128), width=256, height=256)
    assert any("stretched to 256x256, out of its proportions" in warning for warning in warnings)
    _, warnings = prepared(noise_image(256, 128), width=256, height=256, resize_mode="crop")
    assert warnings == []


def test_a_mask_of_another_size_names_both_sizes() -> None:
    with pytest.raises(InputError) as raised:
        prepared(noise_image(192, 128), Image.new("L", (128, 128), 255))
    assert str(raised.value) == (
        "mask: is 128x128 and the image is 192x128: they must be the same size (after EXIF rotation)"
    )


def test_an_all_black_mask_is_refused() -> None:
    with pytest.raises(InputError, match="mask: is all black"):
        prepared(noise_image(128, 128), Image.new("L", (128, 128), 0))


def test_inpaint_keeps_every_unmasked_pixel_exactly() -> None:
    image, mask = noise_image(192, 128), box_mask(192, 128, (64, 32, 128, 96))
    images, _ = prepared(image, mask, mask_blur=8)
    painted = noise_image(192, 128, seed=1)

    resolved, _ = resolve_size(request(mask="bWFzaw==", mask_blur=8), image.size, LIMITS)
    result = np.asarray(paste_back(resolved, images, painted))

    kept = np.asarray(mask) == 0
    assert (result[kept] == np.asarray(image)[kept]).all(), "outside the mask: the input's bytes"
    inside = np.asarray(mask) == 255
    assert (result[inside] != np.asarray(image)[inside]).any(), "inside: the painted pixels"
    assert images.mask is not None
    assert images.mask.getextrema() == (0, 255)


def test_keep_unmasked_false_returns_the_painted_image() -> None:
    image, mask = noise_image(128, 128), box_mask(128, 128, (32, 32, 96, 96))
    resolved, _ = resolve_size(request(mask="bWFzaw==", keep_unmasked=False), image.size, LIMITS)
    images, _ = prepare(resolved, image, mask)
    painted = noise_image(128, 128, seed=2)
    assert paste_back(resolved, images, painted) is painted


def test_the_mask_blur_feathers_inwards() -> None:
    image, mask = noise_image(128, 128), box_mask(128, 128, (32, 32, 96, 96))
    images, _ = prepared(image, mask, mask_blur=6)

    assert images.overlay is not None
    assert images.mask is not None
    overlay, blurred = np.asarray(images.overlay), np.asarray(images.mask)
    assert overlay[64, 64] == 255, "full inside"
    assert 0 < overlay[32, 64] < 255, "partial on the edge"
    assert overlay[31, 64] == 0, "the overlay stops at the mask"
    assert blurred[31, 64] > 0, "the pipeline's mask reaches out"


def test_masked_area_crops_the_region_and_pastes_it_back() -> None:
    image, mask = noise_image(256, 256), box_mask(256, 256, (160, 160, 192, 192))
    resolved, _ = resolve_size(
        request(mask="bWFzaw==", inpaint_area="masked", inpaint_padding=16, mask_blur=0), image.size, LIMITS
    )
    images, _ = prepare(resolved, image, mask)

    assert images.crop == (144, 144, 208, 208), "the mask's box and 16 px around it, square like the job"
    assert images.image.size == (256, 256), "the crop is painted at the job's size"
    painted = noise_image(256, 256, seed=3)
    result = np.asarray(paste_back(resolved, images, painted))
    assert (result[:144] == np.asarray(image)[:144]).all(), "outside the crop: untouched"
    assert (result[170, 170] != np.asarray(image)[170, 170]).any()


def test_masked_area_without_keep_unmasked_pastes_the_whole_crop() -> None:
    image, mask = noise_image(256, 256), box_mask(256, 256, (160, 160, 192, 192))
    resolved, _ = resolve_size(
        request(mask="bWFzaw==", inpaint_area="masked", inpaint_padding=16, keep_unmasked=False), image.size, LIMITS
    )
    images, _ = prepare(resolved, image, mask)
    result = np.asarray(paste_back(resolved, images, noise_image(256, 256, seed=3)))

    assert images.crop is not None
    assert (result[:100] == np.asarray(image)[:100]).all(), "outside the crop: the input"
    x1, y1, _, _ = images.crop
    assert (result[y1 + 1, x1 + 1] != np.asarray(image)[y1 + 1, x1 + 1]).any(), "the crop's corner: painted"


def test_masked_area_of_a_larger_image_is_cropped_at_the_images_own_size() -> None:
    image, mask = noise_image(512, 384), box_mask(512, 384, (300, 100, 340, 140))
    images, warnings = prepared(
        image, mask, width=128, height=64, inpaint_area="masked", inpaint_padding=16, mask_blur=0
    )

    assert images.original is image, "the input itself, not brought to width x height"
    assert images.crop == (248, 84, 392, 156), "the box and 16 px around it (72x72), widened to 2:1"
    assert images.mask is not None
    assert images.image.size == images.mask.size == (128, 64), "painted at the job's size"
    assert warnings == [], "nothing is stretched"
    resolved, _ = resolve_size(
        request(mask="bWFzaw==", width=128, height=64, inpaint_area="masked", inpaint_padding=16, mask_blur=0),
        image.size,
        LIMITS,
    )
    result = np.asarray(paste_back(resolved, images, noise_image(128, 64, seed=5)))
    assert result.shape == (384, 512, 3), "the image comes back at its own size"
    kept = np.asarray(mask) == 0
    assert (result[kept] == np.asarray(image)[kept]).all()
    assert (result[120, 320] != np.asarray(image)[120, 320]).any(), "inside the mask: painted"


def test_the_mask_is_blurred_at_the_images_own_size_as_a1111() -> None:
    image, mask = noise_image(256, 256), box_mask(256, 256, (64, 64, 192, 192))
    images, _ = prepared(image, mask, width=128, height=128, mask_blur=8)

    # A1111 blurs the mask before it meets width x height: 8 px of the image are 4 px of the job.
    expected = fit(mask.filter(ImageFilter.GaussianBlur(8)), 128, 128, "resize").convert("L")
    assert images.mask is not None
    assert np.array_equal(np.asarray(images.mask), np.asarray(expected))


def test_resize_mode_without_effect_on_an_only_masked_inpaint_is_said() -> None:
    image, mask = noise_image(256, 128), box_mask(256, 128, (64, 32, 128, 96))
    _, warnings = prepared(image, mask, width=128, height=128, inpaint_area="masked", resize_mode="crop")
    assert warnings == [
        "resize_mode: 'crop' has no effect with inpaint_area 'masked': the masked region is cropped from the image "
        "at its own size, in width x height's proportions"
    ]
    _, warnings = prepared(image, mask, width=128, height=128, inpaint_area="masked")
    assert warnings == [], "the default says nothing, and nothing is stretched"


def test_outpaint_grows_the_canvas_and_masks_the_new_area() -> None:
    image = noise_image(128, 128)
    images, _ = prepared(image, outpaint={"left": 64, "bottom": 64}, mask_blur=4)

    assert images.image.size == (192, 192)
    canvas = np.asarray(images.image)
    assert (canvas[:128, 64:] == np.asarray(image)).all(), "the image sits where it was"
    assert (canvas[:128, 0] == np.asarray(image)[:, 0]).all(), "the new area repeats the image's edge"
    assert images.mask is not None
    assert images.overlay is not None
    overlay = np.asarray(images.overlay)
    assert (overlay[100, 10], overlay[180, 100]) == (255, 255), "the new area is painted"
    assert (overlay[60, 64 + 4 + 1], overlay[128 - 4 - 2, 100]) == (0, 0), "the image, beyond the seam, is kept"
    assert overlay[60, 64] > 0, "the mask reaches mask_blur pixels into the image, over the seam"


@pytest.mark.parametrize("mode", ["resize", "crop", "fill"])
def test_the_mask_follows_the_image_in_every_resize_mode(mode: str) -> None:
    image, mask = noise_image(192, 128), box_mask(192, 128, (80, 40, 112, 88))
    images, _ = prepared(image, mask, resize_mode=mode, width=128, height=128)

    assert images.mask is not None
    assert images.overlay is not None
    assert (images.mask.mode, images.overlay.mode) == ("L", "L")
    assert images.mask.size == images.image.size == (128, 128)
    assert np.asarray(images.overlay)[64, 64] > 200, "the centre of the box is still painted"
    with pytest.raises(InputError, match="mask: is all black"):
        prepared(image, Image.new("L", (192, 128), 0), resize_mode=mode, width=128, height=128)


def test_mask_invert_repaints_the_black_as_an_inverted_mask_would() -> None:
    image = noise_image(64, 64)
    mask = box_mask(64, 64, (16, 16, 48, 48))
    inverted, _ = prepared(image, mask, mask_invert=True, width=64, height=64)
    by_hand, _ = prepared(image, Image.eval(mask, lambda value: 255 - value), width=64, height=64)
    assert inverted.mask is not None
    assert by_hand.mask is not None
    assert np.array_equal(np.asarray(inverted.mask), np.asarray(by_hand.mask))


def test_fill_paints_the_masked_area_from_its_surroundings_and_keeps_the_rest() -> None:
    # Red on the left half, blue on the right; the mask covers a band across the middle of both.
    image = Image.new("RGB", (64, 64), (255, 0, 0))
    image.paste((0, 0, 255), (32, 0, 64, 64))
    image.paste((0, 255, 0), (0, 24, 64, 40))  # what was under the mask: green, which fill must not keep
    mask = box_mask(64, 64, (0, 24, 64, 40))
    filled, _ = prepared(image, mask, inpaint_fill="fill", mask_blur=0, width=64, height=64)
    original, _ = prepared(image, mask, mask_blur=0, width=64, height=64)
    start, kept = np.asarray(filled.image).astype(int), np.asarray(original.image).astype(int)
    unmasked = np.asarray(mask) == 0
    assert np.array_equal(start[unmasked], kept[unmasked])
    assert start[32, 8, 1] < 40, "the green under the mask is replaced"
    assert start[32, 8, 0] > 200, "by the red around it on the left"
    assert start[32, 56, 2] > 200, "and the blue on the right"
    assert np.array_equal(np.asarray(filled.original), np.asarray(original.image)), "the paste-back keeps the image"


def test_fill_applies_to_the_masked_crop() -> None:
    image, mask = noise_image(64, 64), box_mask(64, 64, (24, 24, 40, 40))
    filled, _ = prepared(image, mask, inpaint_fill="fill", inpaint_area="masked", width=64, height=64)
    plain, _ = prepared(image, mask, inpaint_area="masked", width=64, height=64)
    assert filled.crop == plain.crop
    assert not np.array_equal(np.asarray(filled.image), np.asarray(plain.image))


@pytest.mark.parametrize("area", ["whole", "masked"])
def test_a_mask_too_small_to_survive_its_blur_is_refused_naming_both(area: str) -> None:
    """PIL's blur of radius 11 leaves a 1-pixel mask black: the crop box would be empty (an internal error)."""
    image = noise_image(128, 128)
    with pytest.raises(InputError) as raised:
        prepared(image, box_mask(128, 128, (60, 60, 61, 61)), inpaint_area=area, mask_blur=30)
    assert str(raised.value).startswith("mask: its white area is too small to survive mask_blur=30")


def test_crop_of_an_image_far_from_the_targets_proportions_resizes_only_the_kept_part() -> None:
    """diffusers' crop would enlarge an 8x2048 image to 256x65536 first (50 MB here, 800 MB for 8x8192 to
    512x512): the worker resizes the centre alone, to the same picture."""
    image = Image.fromarray(np.repeat(np.linspace(0, 255, 2048, dtype=np.uint8)[:, None, None], 8, axis=1).repeat(3, 2))
    fitted = fit(image, 256, 256, "crop")

    from diffusers.image_processor import VaeImageProcessor

    theirs = VaeImageProcessor().resize(image, height=256, width=256, resize_mode="crop")
    assert fitted.size == (256, 256)
    difference = np.abs(np.asarray(fitted, dtype=np.int16) - np.asarray(theirs, dtype=np.int16))
    assert difference.max() <= 2, "the same centre of the same gradient"


def test_an_only_masked_inpaint_without_a_size_says_where_it_paints_not_that_the_image_shrank() -> None:
    image = noise_image(1100, 700)
    _, warnings = resolve_size(request(mask="bWFzaw==", inpaint_area="masked"), image.size, LIMITS)
    assert warnings == [
        "image: 1100x700: without width and height the masked region is painted at 1024x640, the image's size "
        f"fitted to MAX_SIDE={LIMITS.max_side} and MAX_PIXELS={LIMITS.max_pixels} and rounded down to multiples of "
        "64; the image comes back at its own size"
    ]
