"""Faults injected at real seams on the tiny model, in float32 and in float16 (torch runs both on the CPU).

The seams: forward hooks on the real UNet, VAE decoder and safety checker that raise or
corrupt their output, and the engine's clock, which the tests advance instead of sleeping.
GPU runs are half precision, so every fault path runs in float16 here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import handler
from bench.machine import cpu_name, load_average
from bench.overlap import TimedLock
from src.errors import BadImageError, GenerationTimeoutError, OutOfMemoryError
from src.run.engine import Engine, Generation
from src.schema import SCHEDULER_NAMES, GenerateRequest, parse_input
from src.settings import load_settings
from tests.conftest import held_rss_bytes, split_by_admission

JOB = {"prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 3, "seed": 21, "num_images": 2}
DTYPES = ["float32", "float16"]


class FakeClock:
    """Monotonic seconds that move only when a test moves them."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


_ENGINES: dict[tuple[str, bool], Engine] = {}


def load_engine(model_dir: Path, dtype: str, *, safety_checker: bool = False) -> Engine:
    """One engine per dtype and model for the whole module: loading is the slow part."""
    key = (dtype, safety_checker)
    if key not in _ENGINES:
        variables = {"MODEL_ID": str(model_dir), "DTYPE": dtype, "SAFETY_CHECKER": str(safety_checker).lower()}
        _ENGINES[key] = Engine.load(load_settings(variables))
    engine = _ENGINES[key]
    engine.clock = FakeClock()
    return engine


@pytest.fixture(params=DTYPES)
def engine(request: pytest.FixtureRequest, tiny_model_dir: Path) -> Engine:
    return load_engine(tiny_model_dir, request.param)


@pytest.fixture(params=DTYPES)
def checked_engine(request: pytest.FixtureRequest, tiny_model_with_checker_dir: Path) -> Engine:
    return load_engine(tiny_model_with_checker_dir, request.param, safety_checker=True)


def make_request(engine: Engine, **fields: object) -> GenerateRequest:
    return parse_input({"input": {**JOB, **fields}}, engine.settings)


def generate(engine: Engine, timeout_s: float = 600, **fields: object) -> Generation:
    return engine.generate(make_request(engine, **fields), timeout_s=timeout_s)


def pixels(generation: Generation) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.int16) for image in generation.images]


def same_pixels(generation: Generation, other: Generation) -> bool:
    return all(np.array_equal(a, b) for a, b in zip(pixels(generation), pixels(other), strict=True))


@contextlib.contextmanager
def injected(module: torch.nn.Module, fault: Callable[[int, Any, Any], Any]) -> Iterator[None]:
    """A forward hook on ``module``: ``fault(call_number, inputs, output)`` raises, or returns the output to use."""
    calls = [0]

    def forward_hook(_module: torch.nn.Module, inputs: Any, output: Any) -> Any:
        calls[0] += 1
        return fault(calls[0], inputs, output)

    handle = module.register_forward_hook(forward_hook)
    try:
        yield
    finally:
        handle.remove()


def raises_on(calls: Callable[[int], bool], error: Exception) -> Callable[[int, Any, Any], Any]:
    def fault(call: int, _inputs: Any, output: Any) -> Any:
        if calls(call):
            raise error
        return output

    return fault


CUDA_OOM = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


@pytest.fixture
def clean(engine: Engine) -> Generation:
    """JOB from a run with no fault."""
    return generate(engine)


# --- out of memory ---------------------------------------------------------------------------


def test_oom_once_is_retried_one_image_at_a_time_with_slicing_and_tiling(engine: Engine, clean: Generation) -> None:
    pipeline = engine._pipeline
    seen: list[tuple[int, bool, bool, str]] = []

    def fault(call: int, inputs: Any, output: Any) -> Any:
        if call == 1:
            raise CUDA_OOM
        processor = type(next(iter(pipeline.unet.attn_processors.values()))).__name__
        # The UNet's batch is the classifier-free guidance pair: 2 rows per image.
        seen.append((inputs[0].shape[0], pipeline.vae.use_slicing, pipeline.vae.use_tiling, processor))
        return output

    with injected(pipeline.unet, fault):
        result = generate(engine)

    assert any("ran out of memory" in warning for warning in result.warnings)
    assert result.seeds == [21, 22]
    assert len(seen) == 2 * JOB["num_inference_steps"], "both images, every step, after the failed call"
    assert {batch for batch, *_ in seen} == {2}, "one image (two CFG rows) at a time"
    assert all(slicing and tiling for _, slicing, tiling, _ in seen)
    # No attention slicing: diffusers' sliced processor holds the scores SDPA never does.
    assert {processor for *_, processor in seen} == {"AttnProcessor2_0"}
    # One image at a time is the same arithmetic in another order:
    # equal to the clean run to within two levels of 255, under half a level on average.
    for retried, reference in zip(pixels(result), pixels(clean), strict=True):
        difference = np.abs(retried - reference)
        assert difference.max() <= 2
        assert difference.mean() < 0.5
    assert same_pixels(generate(engine), clean), "the next job is exactly a clean run"


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(CUDA_OOM, id="torch-oom"),
        pytest.param(
            RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), id="cublas"
        ),
        pytest.param(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), id="cudnn"),
        pytest.param(RuntimeError("CUDA error: out of memory"), id="cuda-runtime"),
    ],
)
def test_every_kind_of_gpu_allocation_failure_is_retried(tiny_model_dir: Path, error: Exception) -> None:
    engine = load_engine(tiny_model_dir, "float32")

    with injected(engine._pipeline.unet, raises_on(lambda call: call == 1, error)):
        result = generate(engine, num_images=1)

    assert any("ran out of memory" in warning for warning in result.warnings)


def test_other_runtime_errors_are_not_taken_for_oom(tiny_model_dir: Path) -> None:
    engine = load_engine(tiny_model_dir, "float32")
    error = RuntimeError("mat1 and mat2 shapes cannot be multiplied (injected)")

    with injected(engine._pipeline.unet, raises_on(lambda _call: True, error)), pytest.raises(RuntimeError) as raised:
        generate(engine, num_images=1)

    assert raised.value is error


def test_oom_on_every_try_is_an_error_naming_size_and_memory(engine: Engine, clean: Generation) -> None:
    with (
        injected(engine._pipeline.unet, raises_on(lambda _call: True, CUDA_OOM)),
        pytest.raises(OutOfMemoryError) as raised,
    ):
        generate(engine)

    assert "64x64 x2" in str(raised.value)
    assert "memory" in str(raised.value)
    assert same_pixels(generate(engine), clean)


def test_frugal_switches_are_undone_after_the_retry(engine: Engine) -> None:
    pipeline = engine._pipeline
    before = {name: type(processor).__name__ for name, processor in pipeline.unet.attn_processors.items()}

    with injected(pipeline.unet, raises_on(lambda call: call == 1, CUDA_OOM)):
        generate(engine, num_images=1)

    after = {name: type(processor).__name__ for name, processor in pipeline.unet.attn_processors.items()}
    assert after == before
    assert (pipeline.vae.use_slicing, pipeline.vae.use_tiling) == (False, False)
    assert pipeline.vae.dtype == engine.dtype


def test_vae_tiling_decodes_in_tiles(engine: Engine, clean: Generation) -> None:
    """The frugal retry's VAE tiling, with tiles smaller than the image so that it really tiles."""
    vae = engine._pipeline.vae
    saved = (vae.tile_sample_min_size, vae.tile_latent_min_size)
    vae.tile_sample_min_size, vae.tile_latent_min_size = 32, 4
    decoder_calls: list[tuple[int, ...]] = []
    try:
        with (
            injected(engine._pipeline.unet, raises_on(lambda call: call == 1, CUDA_OOM)),
            injected(vae.decoder, lambda _call, inputs, output: decoder_calls.append(inputs[0].shape) or output),
        ):
            result = generate(engine)
    finally:
        vae.tile_sample_min_size, vae.tile_latent_min_size = saved

    # 64x64 in 32-pixel tiles with a quarter overlap: a 3x3 grid of 4x4 latent tiles, per image.
    assert len(decoder_calls) == 2 * 9
    assert {shape[-2:] for shape in decoder_calls} <= {(4, 4), (4, 2), (2, 4), (2, 2)}
    assert [image.size for image in result.images] == [(64, 64), (64, 64)]
    for tiled, reference in zip(pixels(result), pixels(clean), strict=True):
        assert tiled.std() > 0, "an image, not a flat fill"
        assert np.abs(tiled - reference).mean() < 32, "the same picture, blended at the tile seams"


# --- timeouts ------------------------------------------------------------------------------------


def clock_moves(engine: Engine, seconds_per_call: float, *, from_call: int = 1) -> Callable[[int, Any, Any], Any]:
    """A UNet hook that advances the engine's clock: each denoising step 'takes' that long."""
    clock = engine.clock
    assert isinstance(clock, FakeClock)

    def fault(call: int, _inputs: Any, output: Any) -> Any:
        if call >= from_call:
            clock.advance(seconds_per_call)
        return output

    return fault


def test_a_slow_step_trips_the_timeout_at_that_step_then_the_next_job_works(engine: Engine, clean: Generation) -> None:
    # Steps 1-3 take no time; step 4 takes 100 s against a 60 s limit.
    with (
        injected(engine._pipeline.unet, clock_moves(engine, 100, from_call=4)),
        pytest.raises(GenerationTimeoutError) as raised,
    ):
        generate(engine, timeout_s=60, num_inference_steps=50, num_images=1)

    assert str(raised.value) == (
        "generation stopped: it ran past GENERATION_TIMEOUT_SECONDS=60 at denoising step 4 of 50"
    )
    assert same_pixels(generate(engine), clean)


def test_the_frugal_retry_runs_against_the_same_deadline(tiny_model_dir: Path) -> None:
    engine = load_engine(tiny_model_dir, "float32")
    clock = engine.clock
    assert isinstance(clock, FakeClock)

    def fault(call: int, _inputs: Any, output: Any) -> Any:
        clock.advance(50 if call == 1 else 20)  # the failed try takes 50 s of 60, each retried step 20 s
        if call == 1:
            raise CUDA_OOM
        return output

    with injected(engine._pipeline.unet, fault), pytest.raises(GenerationTimeoutError) as raised:
        generate(engine, timeout_s=60, num_images=1)

    assert str(raised.value).endswith("at denoising step 1 of 3")


@pytest.mark.parametrize("scheduler", ["Heun", "DPM2", "DPM2 a", "PNDM"])
def test_timeout_names_the_requested_step_for_every_kind_of_scheduler(tiny_model_dir: Path, scheduler: str) -> None:
    engine = load_engine(tiny_model_dir, "float32")
    # Every UNet call takes 10 s against a 35 s limit.
    with injected(engine._pipeline.unet, clock_moves(engine, 10)), pytest.raises(GenerationTimeoutError) as raised:
        generate(engine, timeout_s=35, num_inference_steps=10, num_images=1, scheduler=scheduler)

    step = int(str(raised.value).split("denoising step ")[1].split(" of ")[0])
    assert str(raised.value).endswith(" of 10")
    # Four UNet calls: two steps of a second-order scheduler, about four of a first-order one.
    assert 1 <= step <= 4


class WatchedLock(TimedLock):
    """The engine's GPU lock, a real ``threading.Lock``, that also tells a test which threads are about to wait
    on it: ``waiting`` is set once ``waiters`` threads have called ``acquire`` while another thread held it."""

    def __init__(self, waiters: int, waiting: threading.Event | None = None) -> None:
        super().__init__()
        self._waiting_threads: set[int] = set()
        self._count_lock = threading.Lock()
        self._waiters = waiters
        self.waiting = waiting or threading.Event()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if super().acquire(blocking=False):
            return True
        with self._count_lock:
            # A thread may try again and again (a job that polls for its cancellation): counted once.
            self._waiting_threads.add(threading.get_ident())
            if len(self._waiting_threads) >= self._waiters:
                self.waiting.set()
        return super().acquire(blocking, timeout)


def test_waiting_for_the_gpu_does_not_count_against_the_timeout(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = load_engine(tiny_model_dir, "float32")
    clock = engine.clock
    assert isinstance(clock, FakeClock)
    lock = WatchedLock(waiters=1)
    monkeypatch.setattr(engine, "_lock", lock)
    first_inside, release_first = threading.Event(), threading.Event()
    results: dict[str, Any] = {}

    def hold_the_gpu(call: int, _inputs: Any, output: Any) -> Any:
        if call == 1:
            first_inside.set()
            assert release_first.wait(timeout=120)
        return output

    def job(name: str) -> None:
        try:
            results[name] = generate(engine, timeout_s=60, num_images=1)
        except GenerationTimeoutError as error:
            results[name] = error

    with injected(engine._pipeline.unet, hold_the_gpu):
        first = threading.Thread(target=job, args=("first",))
        first.start()
        assert first_inside.wait(timeout=120)
        second = threading.Thread(target=job, args=("second",))
        second.start()
        # The second job has asked for the GPU while the first holds it.
        assert lock.waiting.wait(timeout=120)
        seen_waiting = time.perf_counter()
        clock.advance(600)  # ten times its limit passes while it waits
        released = time.perf_counter()
        release_first.set()
        first.join(timeout=120)
        second.join(timeout=120)

    assert isinstance(results["second"], Generation), results["second"]
    # Its queue time covers at least the stretch in which the test knew it was waiting.
    assert results["second"].queue_ms >= (released - seen_waiting) * 1000


# --- NaN guard ---------------------------------------------------------------------------------------


def nan_on(calls: Callable[[int], bool]) -> Callable[[int, Any, Any], Any]:
    return lambda call, _inputs, output: output * float("nan") if calls(call) else output


def test_nan_from_the_vae_is_decoded_again_in_float32(engine: Engine, clean: Generation) -> None:
    with injected(engine._pipeline.vae.decoder, nan_on(lambda call: call == 1)):
        result = generate(engine)

    assert any("NaN" in warning and "float32" in warning for warning in result.warnings)
    assert engine._pipeline.vae.dtype == engine.dtype, "the VAE is back in the engine's dtype"
    if engine.dtype == torch.float32:
        assert same_pixels(result, clean), "on float32 the second decode is the clean one"
    else:
        # A float32 decode of the same latents: the same picture, to within a level or two.
        for retried, reference in zip(pixels(result), pixels(clean), strict=True):
            assert np.abs(retried - reference).max() <= 3
    assert same_pixels(generate(engine), clean)


def test_nan_that_persists_is_an_error_not_a_black_image(engine: Engine, clean: Generation) -> None:
    with injected(engine._pipeline.vae.decoder, nan_on(lambda _call: True)), pytest.raises(BadImageError) as raised:
        generate(engine)

    assert "NaN" in str(raised.value)
    assert same_pixels(generate(engine), clean)


# --- the safety checker ------------------------------------------------------------------------------


@contextlib.contextmanager
def everything_flagged(engine: Engine) -> Iterator[None]:
    """Lower every concept threshold of the real checker so that any image scores above it."""
    checker = engine._pipeline.safety_checker
    saved = checker.concept_embeds_weights.detach().clone()
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-1.0)
    try:
        yield
    finally:
        with torch.no_grad():
            checker.concept_embeds_weights.copy_(saved)


def test_safety_checker_passes_unflagged_images(checked_engine: Engine) -> None:
    result = generate(checked_engine)

    assert result.nsfw == [False, False]
    assert all(np.asarray(image).max() > 0 for image in result.images)


def test_flagged_images_are_blacked_out_and_reported(checked_engine: Engine) -> None:
    with everything_flagged(checked_engine):
        result = generate(checked_engine)

    assert result.nsfw == [True, True]
    assert all(np.asarray(image).max() == 0 for image in result.images)
    assert any("flagged by the safety checker" in warning for warning in result.warnings)


def test_a_flagged_inpaint_stays_black_without_the_input_pasted_back(checked_engine: Engine) -> None:
    from src.prepare.canvas import prepare
    from src.schema import resolve_size
    from tests.conftest import box_mask, noise_image

    image, mask = noise_image(64, 64), box_mask(64, 64, (16, 16, 48, 48))
    request = make_request(checked_engine, image="eA==", mask="eA==", num_images=1)
    request, _ = resolve_size(request, image.size, checked_engine.settings)
    images, _ = prepare(request, image, mask)
    with everything_flagged(checked_engine):
        result = checked_engine.generate(request, images=images, timeout_s=600)

    assert result.nsfw == [True]
    assert np.asarray(result.images[0]).max() == 0


def test_safety_checker_after_a_float32_redecode_gets_input_in_its_own_dtype(checked_engine: Engine) -> None:
    checker = checked_engine._pipeline.safety_checker
    clip_dtypes: list[torch.dtype] = []

    def record(_module: torch.nn.Module, _args: Any, kwargs: dict[str, Any]) -> None:
        clip_dtypes.append(kwargs["clip_input"].dtype)

    handle = checker.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with (
            injected(checked_engine._pipeline.vae.decoder, nan_on(lambda call: call == 1)),
            everything_flagged(checked_engine),
        ):
            result = generate(checked_engine)
    finally:
        handle.remove()

    assert clip_dtypes == [checker.dtype]
    assert result.nsfw == [True, True]
    assert all(np.asarray(image).max() == 0 for image in result.images)
    assert any("float32" in warning for warning in result.warnings)


def test_admission_counts_the_safety_checker() -> None:
    from src.run.memory import GIB, Profile, estimate_peak_bytes, plan_sub_batch

    without = estimate_peak_bytes(Profile.BALANCED, 512, 512, 1)
    with_checker = estimate_peak_bytes(Profile.BALANCED, 512, 512, 1, safety_checker=True)
    assert 0.55 * GIB < with_checker - without < 0.65 * GIB
    # In the offload profiles the checker stays on the GPU: it still counts.
    for profile in (Profile.LOW, Profile.MINIMAL):
        assert (
            estimate_peak_bytes(profile, 512, 512, 1, safety_checker=True)
            > estimate_peak_bytes(profile, 512, 512, 1) + 0.5 * GIB
        )
    # A card on which four images fit without the checker takes fewer with it.
    budget = int(estimate_peak_bytes(Profile.HIGH, 512, 512, 4) / 0.95) + 1
    assert plan_sub_batch(Profile.HIGH, 512, 512, 4, gpu_bytes=budget).batch == 4
    assert plan_sub_batch(Profile.HIGH, 512, 512, 4, gpu_bytes=budget, safety_checker=True).batch < 4


# --- progress ------------------------------------------------------------------------------------------


def test_progress_is_reported_at_most_once_a_second_and_at_the_last_step(engine: Engine) -> None:
    reports: list[tuple[float, dict[str, Any]]] = []
    clock = engine.clock
    assert isinstance(clock, FakeClock)

    with injected(engine._pipeline.unet, clock_moves(engine, 0.25)):
        engine.generate(
            make_request(engine, num_inference_steps=12, num_images=1),
            timeout_s=600,
            on_progress=lambda report: reports.append((clock(), report)),
        )

    assert [report for _, report in reports] == [
        {"step": 1, "total_steps": 12},
        {"step": 5, "total_steps": 12},
        {"step": 9, "total_steps": 12},
        {"step": 12, "total_steps": 12},
    ]
    gaps = [later[0] - earlier[0] for earlier, later in itertools.pairwise(reports[:-1])]
    assert all(gap >= 1.0 for gap in gaps)


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_progress_counts_the_requested_steps_for_every_scheduler(tiny_model_dir: Path, scheduler: str) -> None:
    engine = load_engine(tiny_model_dir, "float32")
    reports: list[dict[str, Any]] = []

    # Every UNet call "takes" a second, so every step is reported.
    with injected(engine._pipeline.unet, clock_moves(engine, 1.0)):
        engine.generate(
            make_request(engine, num_inference_steps=4, num_images=1, scheduler=scheduler),
            timeout_s=600,
            on_progress=reports.append,
        )

    steps = [report["step"] for report in reports]
    assert reports[-1] == {"step": 4, "total_steps": 4}
    assert steps == sorted(set(steps)), "steps only go forward, each reported once"
    assert max(steps) <= 4


def test_the_retry_reports_what_it_finds_once(tiny_model_dir: Path) -> None:
    # Admission runs images 0 and 1, then 2, which runs out of memory; the retry makes all three again. Every
    # decode comes out black: the first try's warnings about images 0 and 1 were kept beside the retry's own.
    split = split_by_admission(load_engine(tiny_model_dir, "float32"), 64, 64, 3)
    steps = JOB["num_inference_steps"]
    black = injected(split._pipeline.vae.decoder, lambda _call, _inputs, output: torch.full_like(output, -1.0))
    with black, injected(split._pipeline.unet, raises_on(lambda call: call == steps + 1, CUDA_OOM)):
        result = generate(split, num_images=3)

    assert result.warnings == [
        "the GPU ran out of memory; the job was retried one image at a time with VAE tiling",
        "image 0 is entirely black",
        "image 1 is entirely black",
        "image 2 is entirely black",
    ]


def test_progress_spans_sub_batches_and_the_retry(engine: Engine) -> None:
    reports: list[dict[str, Any]] = []
    with injected(engine._pipeline.unet, raises_on(lambda call: call == 1, CUDA_OOM)):
        engine.generate(make_request(engine), timeout_s=600, on_progress=reports.append)

    # The retry runs the two images one after the other: 3 steps each.
    assert reports[-1] == {"step": 6, "total_steps": 6}
    assert all(report["step"] <= report["total_steps"] for report in reports)


def test_without_runpod_no_progress_is_sent() -> None:
    assert handler._send_progress is None
    assert handler._progress_reporter({"id": "x"}) is None


# --- many jobs, many threads, through the handler --------------------------------------------------------


@pytest.mark.usefixtures("worker")
def test_concurrent_jobs_match_sequential_ones() -> None:
    def run(seed: int) -> list[str]:
        result = asyncio.run(handler.handler({"id": "c", "input": {**JOB, "seed": seed, "num_images": 1}}))
        return [item["image"] for item in result["images"]]

    seeds = [1, 2, 3, 4]
    sequential = {seed: run(seed) for seed in seeds}
    concurrent: dict[int, list[str]] = {}
    threads = [threading.Thread(target=lambda s=seed: concurrent.__setitem__(s, run(s))) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert concurrent == sequential


# Where the series goes when RECORD_RESULTS=1; otherwise into the test's own temporary folder.
RSS_SERIES = Path(__file__).resolve().parent.parent / "bench" / "results" / "rss-jobs.json"


@pytest.mark.usefixtures("worker")
def test_fifty_jobs_keep_memory_flat_and_results_identical(tmp_path: Path) -> None:
    """256², 2 images, 50 jobs: a leak of 1 MiB per job would add 40 MiB over the last 40 jobs.

    One step without guidance keeps each job short; what a job allocates and hands back
    (latents, decoded images, PIL images, files, base64) is the same as with more steps.
    """
    job = {
        "id": "rss",
        "input": {**JOB, "width": 256, "height": 256, "num_inference_steps": 1, "guidance_scale": 1.0},
    }
    first = asyncio.run(handler.handler(job))
    for _ in range(9):  # warm up the allocator and caches
        assert asyncio.run(handler.handler(job))["images"] == first["images"]
    series = [held_rss_bytes()]
    for _ in range(40):
        assert asyncio.run(handler.handler(job))["images"] == first["images"]
        series.append(held_rss_bytes())

    growth = [(value - series[0]) / 2**20 for value in series]
    # The slope of a least-squares line through the series: MiB per job.
    slope = float(np.polyfit(range(len(growth)), growth, 1)[0])
    series_file = RSS_SERIES if os.environ.get("RECORD_RESULTS") == "1" else tmp_path / RSS_SERIES.name
    series_file.write_text(
        json.dumps(
            {
                "command": "RECORD_RESULTS=1 python -m pytest tests/test_resilience.py -k fifty_jobs",
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{os.cpu_count()} cores, {cpu_name()}",
                "load_average": load_average(),
                "job": job["input"],
                "warm_up_jobs": 10,
                "rss_mib_after_warm_up": round(series[0] / 2**20, 1),
                "growth_mib_per_job": [round(value, 2) for value in growth],
                "slope_mib_per_job": round(slope, 4),
            },
            indent=1,
        )
        + "\n"
    )
    assert slope < 0.25, f"RSS grows {slope:.2f} MiB per job"
    assert growth[-1] < 20


@pytest.mark.usefixtures("worker")
def test_one_job_at_a_time_holds_the_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Four callers of ``Engine.generate`` from threads of their own: the lock lets one into the models at a time.
    (The handler runs every job's GPU stage on one thread, so its jobs meet the lock one by one anyway.)"""
    engine = handler.get_engine()
    # Set when the three other jobs wait on the GPU lock, or when a second job is inside the UNet at once.
    decided = threading.Event()
    lock = WatchedLock(waiters=3, waiting=decided)
    monkeypatch.setattr(engine, "_lock", lock)
    inside = [0]
    overlap: list[int] = []
    counting = threading.Lock()

    def count(call: int, _inputs: Any, output: Any) -> Any:
        with counting:
            inside[0] += 1
            overlap.append(inside[0])
            if inside[0] > 1:
                decided.set()
        if call == 1:
            # The first job stays in the UNet until the three others wait on the GPU lock, or one of them
            # comes in beside it: either is sure to happen, and which one did is the answer.
            assert decided.wait(timeout=120)
        with counting:
            inside[0] -= 1
        return output

    with injected(engine._pipeline.unet, count):
        threads = [threading.Thread(target=generate, args=(engine,), kwargs={"seed": seed}) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)

    assert max(overlap) == 1
    assert len(overlap) == 4 * JOB["num_inference_steps"]
    assert not engine._lock.locked()


# --- a GPU that cannot go on ---------------------------------------------------------------------------

# As torch words them: the CUDA runtime's message, then the lines torch adds to every CUDA error.
_TORCH_CUDA_NOTE = (
    "\nCUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might "
    "be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1\n"
    "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n"
)
STICKY_ERRORS = [
    pytest.param(
        torch.AcceleratorError("CUDA error: an illegal memory access was encountered" + _TORCH_CUDA_NOTE),
        id="illegal-memory-access",
    ),
    pytest.param(torch.AcceleratorError("CUDA error: device-side assert triggered" + _TORCH_CUDA_NOTE), id="assert"),
    pytest.param(RuntimeError("CUDA error: unspecified launch failure" + _TORCH_CUDA_NOTE), id="launch-failure"),
]


class JobDoneServer:
    """RunPod's job-done endpoint on 127.0.0.1: records each result runpod posts to it."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.posted: list[dict[str, Any]] = []
        posted = self.posted

        class Receive(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                posted.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Receive)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        # runpod fills in $ID and appends "&isStream=...", as it does with RunPod's own URL.
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/job-done?id=$ID"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gpu_state() -> Iterator[None]:
    """The handler's record of a failed GPU is the process's; a test that sets it clears it after."""
    yield
    handler._gpu_failure = None


def handle_job(job: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """One job through runpod's own serverless path (rp_job.handle_job: run the handler, post the result to
    RunPod's job-done URL), against a loopback server; returns what RunPod received."""
    import aiohttp
    from runpod.serverless.modules import rp_http, rp_job

    server = JobDoneServer()
    # runpod reads RUNPOD_WEBHOOK_POST_OUTPUT into this constant at import.
    monkeypatch.setattr(rp_http, "JOB_DONE_URL", server.url)

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            await rp_job.handle_job(session, {"handler": handler.handler}, job)

    try:
        asyncio.run(run())
    finally:
        server.close()
    assert len(server.posted) == 1
    return server.posted[0]


@pytest.mark.usefixtures("worker", "gpu_state")
@pytest.mark.parametrize("error", STICKY_ERRORS)
def test_a_cuda_error_that_breaks_the_gpu_is_answered_and_the_worker_replaced(
    error: Exception, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    engine = handler.get_engine()
    calls: list[int] = []

    with (
        injected(engine._pipeline.unet, raises_on(lambda call: calls.append(call) is None, error)),
        caplog.at_level(logging.ERROR, logger="handler"),
    ):
        posted = handle_job({"id": "sticky-1", "input": {**JOB, "num_images": 1}}, monkeypatch)
    # What RunPod gets: the job FAILED with the error's first line, and stopPod, which makes it replace the worker.
    assert set(posted) == {"error", "stopPod"}, posted
    assert posted["stopPod"] is True
    first_line = str(error).splitlines()[0]
    assert first_line in posted["error"]
    assert "replaced" in posted["error"]
    assert "Traceback" in caplog.text

    # The worker may be handed more jobs before RunPod stops it: each is refused at once, the GPU untouched.
    calls.clear()
    with injected(engine._pipeline.unet, raises_on(lambda call: calls.append(call) is None, AssertionError)):
        later = handle_job({"id": "sticky-2", "input": {**JOB, "num_images": 1}}, monkeypatch)
    assert calls == []
    assert set(later) == {"error", "stopPod"}
    assert first_line in later["error"]


@pytest.mark.usefixtures("worker", "gpu_state")
def test_an_ordinary_failure_keeps_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    error = RuntimeError("mat1 and mat2 shapes cannot be multiplied (injected)")
    engine = handler.get_engine()

    with injected(engine._pipeline.unet, raises_on(lambda _call: True, error)):
        posted = handle_job({"id": "plain-1", "input": {**JOB, "num_images": 1}}, monkeypatch)
    assert set(posted) == {"error"}
    assert "mat1 and mat2" in posted["error"]
    after = asyncio.run(handler.handler({"id": "plain-2", "input": {**JOB, "num_images": 1}}))
    assert "images" in after, "the next job runs"


@pytest.mark.parametrize(
    ("message", "sticky"),
    [
        ("CUDA error: an illegal memory access was encountered", True),
        ("CUDA error: device-side assert triggered", True),
        ("CUDA error: misaligned address", True),
        ("CUDA error: an illegal instruction was encountered", True),
        ("CUDA error: unspecified launch failure", True),
        ("CUDA error: uncorrectable ECC error encountered", True),
        ("CUDA error: the launch timed out and was terminated", True),
        # A compiled kernel's launch: inductor's static launcher, and Triton's own.
        ("CUDA driver error: an illegal memory access was encountered", True),
        ("Triton Error [CUDA]: device-side assert triggered", True),
        ("CUDA driver error: out of memory", False),
        ("CUDA error: out of memory", False),
        ("CUDA out of memory. Tried to allocate 2.00 GiB", False),
        ("CUDA error: invalid configuration argument", False),
        ("mat1 and mat2 shapes cannot be multiplied", False),
    ],
)
def test_which_cuda_errors_break_the_gpu(message: str, sticky: bool) -> None:
    from src.errors import breaks_the_gpu

    assert breaks_the_gpu(torch.AcceleratorError(message)) is sticky
    assert breaks_the_gpu(RuntimeError(message)) is sticky
    # Raised while handling the CUDA error (a cleanup that touched the GPU again): the chain is read.
    wrapped = ValueError("while cleaning up")
    wrapped.__context__ = RuntimeError(message)  # what Python sets on an error raised in an except block
    assert breaks_the_gpu(wrapped) is sticky


# --- settings that change the engine --------------------------------------------------------------------


def test_float16_runs_on_the_cpu_when_asked_and_float32_is_the_default(tiny_model_dir: Path) -> None:
    assert load_engine(tiny_model_dir, "float16").dtype == torch.float16
    assert Engine.load(load_settings({"MODEL_ID": str(tiny_model_dir)})).dtype == torch.float32


def test_bfloat16_runs_on_the_cpu(tiny_model_dir: Path) -> None:
    engine = load_engine(tiny_model_dir, "bfloat16")

    result = generate(engine, num_images=1, num_inference_steps=2)

    assert engine._pipeline.unet.dtype == torch.bfloat16
    assert np.asarray(result.images[0]).std() > 0


def test_fast_mode_is_ignored_with_a_warning_on_the_cpu(tiny_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="src.run.engine"):
        engine = Engine.load(load_settings({"MODEL_ID": str(tiny_model_dir), "FAST_MODE": "true"}))

    assert "FAST_MODE ignored" in caplog.text
    assert [image.size for image in generate(engine).images] == [(64, 64), (64, 64)]
