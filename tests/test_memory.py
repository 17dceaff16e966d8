"""Memory profiles and admission (src/run/memory.py): which profile a card gets, what it switches on,
how much a request is estimated to need, and how a request is cut into sub-batches or refused.

Pure arithmetic: no model, no torch, no mocks.
"""

from __future__ import annotations

import itertools

import pytest

from src.errors import AdmissionError
from src.run.memory import (
    GIB,
    Plan,
    Profile,
    Setup,
    choose_profile,
    estimate_peak_bytes,
    plan_sub_batch,
    setup_for,
    sub_batches,
)

# A "6 GB" GTX 1060 reports 5.93 GiB.
GTX_1060 = 6_370_000_000
GPU_PROFILES = [Profile.HIGH, Profile.BALANCED, Profile.LOW, Profile.MINIMAL]
SMALL_CARD_PROFILES = [Profile.BALANCED, Profile.LOW, Profile.MINIMAL]
NOTHING = Setup(vae_slicing=False, vae_tiling=False)
EVERYTHING = Setup(vae_slicing=True, vae_tiling=True)


# --- choose_profile ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpu_bytes", "setting"),
    [
        pytest.param(None, "auto", id="no-memory-auto"),
        pytest.param(80 * GIB, "auto", id="80gib-auto"),
        pytest.param(GTX_1060, "auto", id="1060-auto"),
        pytest.param(2 * GIB, "auto", id="2gib-auto"),
        pytest.param(80 * GIB, "high", id="80gib-high"),
        pytest.param(None, "balanced", id="no-memory-balanced"),
        pytest.param(GTX_1060, "low", id="1060-low"),
        pytest.param(None, "minimal", id="no-memory-minimal"),
    ],
)
def test_cpu_device_is_the_cpu_profile_whatever_the_memory_or_setting(gpu_bytes: int | None, setting: str) -> None:
    assert choose_profile("cpu", gpu_bytes, setting) is Profile.CPU


@pytest.mark.parametrize(
    ("gpu_bytes", "expected"),
    [
        pytest.param(80 * GIB, Profile.HIGH, id="80gib-high"),
        pytest.param(24 * GIB, Profile.HIGH, id="24gib-high"),
        pytest.param(10 * GIB, Profile.HIGH, id="10gib-high"),
        pytest.param(8 * GIB, Profile.BALANCED, id="8gib-balanced"),
        pytest.param(GTX_1060, Profile.BALANCED, id="gtx1060-5.93gib-balanced"),
        pytest.param(int(4.5 * GIB), Profile.LOW, id="4.5gib-low"),
        pytest.param(3 * GIB, Profile.MINIMAL, id="3gib-minimal"),
        pytest.param(2 * GIB, Profile.MINIMAL, id="2gib-minimal"),
    ],
)
def test_auto_profile_follows_gpu_memory(gpu_bytes: int, expected: Profile) -> None:
    assert choose_profile("cuda", gpu_bytes) is expected
    assert choose_profile("cuda", gpu_bytes, "auto") is expected


def test_gtx_1060_reports_under_six_gib() -> None:
    assert 5.9 < GTX_1060 / GIB < 5.95


@pytest.mark.parametrize(
    ("gpu_bytes", "setting", "expected"),
    [
        pytest.param(80 * GIB, "low", Profile.LOW, id="80gib-low"),
        pytest.param(80 * GIB, "minimal", Profile.MINIMAL, id="80gib-minimal"),
        pytest.param(24 * GIB, "balanced", Profile.BALANCED, id="24gib-balanced"),
        pytest.param(GTX_1060, "high", Profile.HIGH, id="1060-high"),
        pytest.param(2 * GIB, "high", Profile.HIGH, id="2gib-high"),
        pytest.param(None, "balanced", Profile.BALANCED, id="no-memory-balanced"),
    ],
)
def test_explicit_setting_wins_on_cuda(gpu_bytes: int | None, setting: str, expected: Profile) -> None:
    assert choose_profile("cuda", gpu_bytes, setting) is expected


# --- setup_for -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "batch"),
    [
        pytest.param(512, 512, 1, id="512x512x1"),
        pytest.param(512, 512, 4, id="512x512x4"),
        pytest.param(1024, 1024, 1, id="1024x1024x1"),
        pytest.param(1024, 512, 8, id="1024x512x8"),
        pytest.param(2048, 2048, 4, id="2048x2048x4"),
    ],
)
def test_high_never_slices_or_tiles(width: int, height: int, batch: int) -> None:
    assert setup_for(Profile.HIGH, width, height, batch) == NOTHING


@pytest.mark.parametrize("profile", SMALL_CARD_PROFILES, ids=str)
@pytest.mark.parametrize(
    ("width", "height", "batch", "expected"),
    [
        pytest.param(512, 512, 1, NOTHING, id="512x512x1-nothing"),
        pytest.param(512, 512, 2, Setup(True, False), id="512x512x2-slicing"),
        pytest.param(512, 512, 4, Setup(True, False), id="512x512x4-slicing"),
        pytest.param(768, 768, 1, NOTHING, id="768x768x1-nothing"),
        pytest.param(768, 512, 3, Setup(True, False), id="768x512x3-slicing"),
        pytest.param(832, 832, 1, Setup(False, True), id="832x832x1-tiling"),
        pytest.param(1024, 512, 1, Setup(False, True), id="1024x512x1-tiling"),
        pytest.param(512, 1024, 1, Setup(False, True), id="512x1024x1-tiling"),
        pytest.param(1024, 1024, 2, Setup(True, True), id="1024x1024x2-slicing-tiling"),
    ],
)
def test_small_cards_slice_batches_and_tile_above_768(
    profile: Profile, width: int, height: int, batch: int, expected: Setup
) -> None:
    assert setup_for(profile, width, height, batch) == expected


@pytest.mark.parametrize("profile", GPU_PROFILES, ids=str)
@pytest.mark.parametrize(
    ("width", "height", "batch"),
    [
        pytest.param(512, 512, 1, id="512x512x1"),
        pytest.param(768, 768, 4, id="768x768x4"),
        pytest.param(1024, 512, 1, id="1024x512x1"),
    ],
)
def test_frugal_turns_everything_on(profile: Profile, width: int, height: int, batch: int) -> None:
    assert setup_for(profile, width, height, batch, frugal=True) == EVERYTHING


# --- estimate_peak_bytes -------------------------------------------------------------------------


def test_512_single_image_on_high_is_in_sd15_fp16_range() -> None:
    peak = estimate_peak_bytes(Profile.HIGH, 512, 512, 1)
    assert 3 * GIB < peak < 5 * GIB


@pytest.mark.parametrize(
    ("profile", "sides"),
    [
        pytest.param(Profile.HIGH, [256, 384, 512, 640, 768, 832, 1024, 1536, 2048], id="high-all-sizes"),
        # On small cards the VAE tiles above 768, which caps its share: monotonic on each side of that line.
        pytest.param(Profile.BALANCED, [256, 384, 512, 640, 768], id="balanced-untiled"),
        pytest.param(Profile.BALANCED, [776, 832, 1024, 1536, 2048], id="balanced-tiled"),
        pytest.param(Profile.LOW, [256, 384, 512, 640, 768], id="low-untiled"),
        pytest.param(Profile.LOW, [776, 832, 1024, 1536, 2048], id="low-tiled"),
        pytest.param(Profile.MINIMAL, [256, 384, 512, 640, 768], id="minimal-untiled"),
        pytest.param(Profile.MINIMAL, [776, 832, 1024, 1536, 2048], id="minimal-tiled"),
    ],
)
def test_estimate_grows_with_area(profile: Profile, sides: list[int]) -> None:
    peaks = [estimate_peak_bytes(profile, side, side, 1) for side in sides]
    assert peaks == sorted(peaks)
    assert peaks[0] < peaks[-1]


@pytest.mark.parametrize(
    ("small", "large"),
    [
        pytest.param((512, 512), (768, 512), id="512x512-768x512"),
        pytest.param((512, 512), (512, 768), id="512x512-512x768"),
        pytest.param((1024, 512), (1024, 1024), id="1024x512-1024x1024"),
    ],
)
def test_estimate_grows_with_one_side_on_high(small: tuple[int, int], large: tuple[int, int]) -> None:
    assert estimate_peak_bytes(Profile.HIGH, *small, 1) < estimate_peak_bytes(Profile.HIGH, *large, 1)


@pytest.mark.parametrize("profile", GPU_PROFILES, ids=str)
@pytest.mark.parametrize(
    ("width", "height"),
    [
        pytest.param(512, 512, id="512x512"),
        pytest.param(768, 768, id="768x768"),
        pytest.param(1024, 1024, id="1024x1024"),
    ],
)
def test_estimate_grows_with_batch(profile: Profile, width: int, height: int) -> None:
    peaks = [estimate_peak_bytes(profile, width, height, batch) for batch in range(1, 9)]
    assert peaks == sorted(peaks)
    assert peaks[0] < peaks[-1]


@pytest.mark.parametrize(
    ("width", "height"),
    [pytest.param(512, 512, id="512x512"), pytest.param(1024, 1024, id="1024x1024")],
)
def test_estimate_grows_strictly_with_batch_on_high(width: int, height: int) -> None:
    peaks = [estimate_peak_bytes(Profile.HIGH, width, height, batch) for batch in range(1, 9)]
    assert all(a < b for a, b in itertools.pairwise(peaks))


@pytest.mark.parametrize(
    ("width", "height", "batch"),
    [
        pytest.param(512, 512, 1, id="512x512x1"),
        pytest.param(512, 512, 4, id="512x512x4"),
        pytest.param(768, 768, 1, id="768x768x1"),
        pytest.param(1024, 1024, 2, id="1024x1024x2"),
    ],
)
def test_offloading_profiles_estimate_less(width: int, height: int, batch: int) -> None:
    balanced = estimate_peak_bytes(Profile.BALANCED, width, height, batch)
    low = estimate_peak_bytes(Profile.LOW, width, height, batch)
    minimal = estimate_peak_bytes(Profile.MINIMAL, width, height, batch)
    assert minimal < low < balanced


@pytest.mark.parametrize("profile", GPU_PROFILES, ids=str)
@pytest.mark.parametrize(
    ("width", "height", "batch"),
    [pytest.param(512, 512, 1, id="512x512x1"), pytest.param(1024, 768, 3, id="1024x768x3")],
)
def test_fp32_estimates_more_than_fp16(profile: Profile, width: int, height: int, batch: int) -> None:
    fp16 = estimate_peak_bytes(profile, width, height, batch, dtype_bytes=2)
    fp32 = estimate_peak_bytes(profile, width, height, batch, dtype_bytes=4)
    assert fp32 > fp16
    assert estimate_peak_bytes(profile, width, height, batch) == fp16


# --- plan_sub_batch ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("profile", "gpu_bytes", "width", "height", "num_images"),
    [
        pytest.param(Profile.CPU, None, 512, 512, 4, id="cpu-no-memory"),
        pytest.param(Profile.CPU, 1 * GIB, 2048, 2048, 8, id="cpu-with-tiny-memory"),
        pytest.param(Profile.HIGH, None, 2048, 2048, 8, id="high-no-memory"),
        pytest.param(Profile.MINIMAL, None, 1024, 1024, 3, id="minimal-no-memory"),
    ],
)
def test_no_gpu_budget_runs_the_request_whole(
    profile: Profile, gpu_bytes: int | None, width: int, height: int, num_images: int
) -> None:
    assert plan_sub_batch(profile, width, height, num_images, gpu_bytes=gpu_bytes) == Plan(num_images)


def test_gtx_1060_fits_one_512_image() -> None:
    assert plan_sub_batch(Profile.BALANCED, 512, 512, 1, gpu_bytes=GTX_1060) == Plan(1)


@pytest.mark.parametrize(
    ("width", "height", "num_images"),
    [
        pytest.param(512, 512, 4, id="512x512x4"),
        pytest.param(512, 512, 8, id="512x512x8"),
        pytest.param(768, 768, 4, id="768x768x4"),
        pytest.param(1024, 1024, 4, id="1024x1024x4"),
    ],
)
def test_gtx_1060_sub_batch_is_the_largest_that_fits(width: int, height: int, num_images: int) -> None:
    plan = plan_sub_batch(Profile.BALANCED, width, height, num_images, gpu_bytes=GTX_1060)
    batch = plan.batch
    assert not plan.vae_tiling or max(width, height) > 768
    budget = GTX_1060 * 0.95
    assert 1 <= batch <= num_images
    assert estimate_peak_bytes(Profile.BALANCED, width, height, batch) <= budget
    if batch < num_images:
        assert estimate_peak_bytes(Profile.BALANCED, width, height, batch + 1) > budget


@pytest.mark.parametrize(
    ("width", "height", "num_images"),
    [
        pytest.param(512, 512, 4, id="512x512x4"),
        pytest.param(1024, 1024, 4, id="1024x1024x4"),
    ],
)
def test_80gib_card_runs_the_request_whole(width: int, height: int, num_images: int) -> None:
    gpu_bytes = 80 * GIB
    profile = choose_profile("cuda", gpu_bytes)
    assert plan_sub_batch(profile, width, height, num_images, gpu_bytes=gpu_bytes) == Plan(num_images)


@pytest.mark.parametrize(
    ("profile", "gpu_bytes", "size", "num_images", "memory"),
    [
        pytest.param(Profile.BALANCED, 2 * GIB, (2048, 2048), 1, "2.0", id="2048x2048-balanced-2gib"),
        pytest.param(Profile.BALANCED, 2 * GIB, (2048, 2048), 4, "2.0", id="2048x2048x4-balanced-2gib"),
        pytest.param(Profile.MINIMAL, 1 * GIB, (1024, 1024), 1, "1.0", id="1024x1024-minimal-1gib"),
        pytest.param(Profile.BALANCED, GTX_1060, (2048, 2048), 1, "5.9", id="2048x2048-gtx1060"),
        pytest.param(Profile.HIGH, 10 * GIB, (4096, 4096), 1, "10.0", id="4096x4096-high-10gib"),
    ],
)
def test_too_large_even_for_one_image_is_refused(
    profile: Profile, gpu_bytes: int, size: tuple[int, int], num_images: int, memory: str
) -> None:
    width, height = size
    with pytest.raises(AdmissionError) as caught:
        plan_sub_batch(profile, width, height, num_images, gpu_bytes=gpu_bytes)
    message = str(caught.value)
    assert f"{width}x{height}" in message
    assert "GiB" in message
    assert f"{memory} GiB" in message


def test_1gib_card_is_minimal_and_refuses_1024() -> None:
    gpu_bytes = 1 * GIB
    profile = choose_profile("cuda", gpu_bytes)
    assert profile is Profile.MINIMAL
    with pytest.raises(AdmissionError, match=r"1024x1024.*1\.0 GiB"):
        plan_sub_batch(profile, 1024, 1024, 1, gpu_bytes=gpu_bytes)


@pytest.mark.parametrize(
    ("profile", "gpu_bytes"),
    [
        pytest.param(Profile.LOW, 5 * GIB, id="low-5gib"),
        pytest.param(Profile.BALANCED, int(5.5 * GIB), id="balanced-5.5gib"),
        pytest.param(Profile.HIGH, 10 * GIB, id="high-10gib"),
    ],
)
def test_an_image_that_only_fits_tiled_runs_tiled_instead_of_being_refused(profile: Profile, gpu_bytes: int) -> None:
    """Admission never refuses a size while admitting a larger one: tiling is its last resort."""
    sizes = [(768, 768), (1024, 1024), (2048, 1536)] if profile is Profile.HIGH else [(768, 768), (1024, 1024)]
    for width, height in sizes:
        plan = plan_sub_batch(profile, width, height, 1, gpu_bytes=gpu_bytes)
        assert plan.batch == 1
        assert estimate_peak_bytes(profile, width, height, 1, tiling=plan.vae_tiling) <= gpu_bytes * 0.95


def test_768_on_a_5gib_card_is_tiled() -> None:
    assert plan_sub_batch(Profile.LOW, 768, 768, 1, gpu_bytes=5 * GIB) == Plan(1, vae_tiling=True)


# --- sub_batches ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "size", "expected"),
    [
        pytest.param(4, 4, [range(0, 4)], id="4-by-4"),
        pytest.param(4, 3, [range(0, 3), range(3, 4)], id="4-by-3"),
        pytest.param(5, 2, [range(0, 2), range(2, 4), range(4, 5)], id="5-by-2"),
        pytest.param(1, 1, [range(0, 1)], id="1-by-1"),
        pytest.param(3, 8, [range(0, 3)], id="3-by-8"),
    ],
)
def test_sub_batches(count: int, size: int, expected: list[range]) -> None:
    pieces = sub_batches(count, size)
    assert pieces == expected
    assert [index for piece in pieces for index in piece] == list(range(count))
    assert all(1 <= len(piece) <= size for piece in pieces)


def test_the_low_profile_counts_the_vae_beside_the_unet() -> None:
    """Model offload moves a model off the GPU only when the next one in the pipeline's order starts: in a
    task that encodes an input image, the VAE stays beside the UNet through the denoising."""
    from src.run.memory import WEIGHTS_FP16

    low = estimate_peak_bytes(Profile.LOW, 512, 512, 1)
    minimal = estimate_peak_bytes(Profile.MINIMAL, 512, 512, 1)
    assert low - minimal == pytest.approx(WEIGHTS_FP16["unet"] + WEIGHTS_FP16["vae"] - 0.2e9)


@pytest.mark.parametrize(
    ("gpu_bytes", "dtype_bytes", "expected"),
    [
        pytest.param(GTX_1060, 2, Profile.BALANCED, id="gtx1060-fp16"),
        pytest.param(GTX_1060, 4, Profile.MINIMAL, id="gtx1060-fp32"),
        pytest.param(12 * GIB, 4, Profile.HIGH, id="12gib-fp32"),
        pytest.param(8 * GIB, 4, Profile.BALANCED, id="8gib-fp32"),
        pytest.param(int(4.5 * GIB), 2, Profile.LOW, id="4.5gib-fp16"),
    ],
)
def test_auto_takes_a_512_image_in_the_workers_dtype(gpu_bytes: int, dtype_bytes: int, expected: Profile) -> None:
    # By memory alone a 6 GiB card in float32 got `balanced`, whose admission refused every 512² job.
    profile = choose_profile("cuda", gpu_bytes, dtype_bytes=dtype_bytes)

    assert profile is expected
    assert plan_sub_batch(profile, 512, 512, 1, gpu_bytes=gpu_bytes, dtype_bytes=dtype_bytes) == Plan(1)
