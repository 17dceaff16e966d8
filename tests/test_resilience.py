"""Faults injected at real seams on the tiny model: OOM, timeouts, NaN, long runs, threads, safety checker."""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import handler
from src.schema import parse_input
from tests.conftest import decode_png, rss_bytes

pytestmark = pytest.mark.usefixtures("worker")

JOB = {"prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 3, "seed": 21, "num_images": 2}


def run(**fields: object) -> dict[str, Any]:
    return handler.handler({"id": "fault", "input": {**JOB, **fields}})


def images_of(result: dict[str, Any]) -> list[str]:
    assert "images" in result, result
    return [item["image"] for item in result["images"]]


@pytest.fixture
def clean() -> list[str]:
    """The images of JOB from a run with no fault."""
    return images_of(run())


@contextlib.contextmanager
def injected(module: torch.nn.Module, fault: Callable[[int, Any], Any]) -> Iterator[None]:
    """A forward hook on ``module``: ``fault(call_number, output)`` raises, or returns the output to use."""
    calls = [0]

    def forward_hook(_module: torch.nn.Module, _inputs: object, output: Any) -> Any:
        calls[0] += 1
        return fault(calls[0], output)

    handle = module.register_forward_hook(forward_hook)
    try:
        yield
    finally:
        handle.remove()


def oom(on_calls: Callable[[int], bool]) -> Callable[[int, Any], Any]:
    def fault(call: int, output: Any) -> Any:
        if on_calls(call):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return output

    return fault


def unet() -> torch.nn.Module:
    return handler.get_engine()._pipeline.unet


def vae_decoder() -> torch.nn.Module:
    return handler.get_engine()._pipeline.vae.decoder


# --- out of memory ---------------------------------------------------------------------------


def test_oom_once_is_recovered_frugally(clean: list[str]) -> None:
    with injected(unet(), oom(lambda call: call == 1)):
        result = run()

    assert len(result["images"]) == 2
    assert [item["seed"] for item in result["images"]] == [21, 22]
    assert any("ran out of memory" in warning for warning in result["metadata"]["warnings"])
    assert images_of(run()) == clean, "the next job is exactly a clean run"


def test_oom_on_every_try_is_an_error_naming_size_and_memory(clean: list[str]) -> None:
    with injected(unet(), oom(lambda _call: True)):
        result = run()

    assert set(result) == {"error"}
    assert "64x64 x2" in result["error"]
    assert "memory" in result["error"]
    assert images_of(run()) == clean


def test_frugal_switches_are_undone_after_the_retry() -> None:
    pipeline = handler.get_engine()._pipeline
    before = {name: type(processor).__name__ for name, processor in pipeline.unet.attn_processors.items()}

    with injected(unet(), oom(lambda call: call == 1)):
        run()

    after = {name: type(processor).__name__ for name, processor in pipeline.unet.attn_processors.items()}
    assert after == before
    assert (pipeline.vae.use_slicing, pipeline.vae.use_tiling) == (False, False)


# --- timeouts ------------------------------------------------------------------------------------


def test_slow_step_trips_the_timeout_then_the_next_job_works(clean: list[str], configure: Callable[..., None]) -> None:
    configure(GENERATION_TIMEOUT_SECONDS="0.5")

    def slow(_call: int, output: Any) -> Any:
        time.sleep(0.2)
        return output

    started = time.monotonic()
    with injected(unet(), slow):
        result = run(num_inference_steps=50)
    elapsed = time.monotonic() - started

    assert set(result) == {"error"}
    assert "GENERATION_TIMEOUT_SECONDS=0.5" in result["error"]
    assert "step" in result["error"]
    assert " of 50" in result["error"]
    assert elapsed < 5, "stopped at a step, not after all 50"
    assert images_of(run()) == clean


# --- NaN guard ---------------------------------------------------------------------------------------


def test_nan_from_the_vae_is_decoded_again_in_float32(clean: list[str]) -> None:
    with injected(vae_decoder(), lambda call, output: output * float("nan") if call == 1 else output):
        result = run()

    assert any("NaN" in warning and "float32" in warning for warning in result["metadata"]["warnings"])
    # On the CPU the model already runs float32, so the second decode is the clean one.
    assert images_of(result) == clean
    assert images_of(run()) == clean


def test_nan_that_persists_is_an_error_not_a_black_image(clean: list[str]) -> None:
    with injected(vae_decoder(), lambda _call, output: output * float("nan")):
        result = run()

    assert set(result) == {"error"}
    assert "NaN" in result["error"]
    assert images_of(run()) == clean


# --- many jobs, many threads -----------------------------------------------------------------------


def test_fifty_jobs_keep_memory_flat_and_results_identical(clean: list[str]) -> None:
    for _ in range(5):  # warm up allocator and caches
        run()
    baseline = rss_bytes()
    growth = []
    for _ in range(50):
        assert images_of(run()) == clean
        growth.append(rss_bytes() - baseline)

    print(f"RSS after warm-up {baseline / 2**20:.0f} MiB; growth over 50 jobs: max {max(growth) / 2**20:.1f} MiB")
    assert growth[-1] < 64 * 2**20


def test_concurrent_jobs_match_sequential_ones() -> None:
    seeds = [1, 2, 3, 4, 5, 6]
    sequential = {seed: images_of(run(seed=seed, num_images=1)) for seed in seeds}
    concurrent: dict[int, list[str]] = {}

    def job(seed: int) -> None:
        concurrent[seed] = images_of(run(seed=seed, num_images=1))

    threads = [threading.Thread(target=job, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert concurrent == sequential


def test_one_job_at_a_time_holds_the_models() -> None:
    engine = handler.get_engine()
    inside = [0]
    overlap = []

    def count(_call: int, output: Any) -> Any:
        inside[0] += 1
        overlap.append(inside[0])
        time.sleep(0.01)
        inside[0] -= 1
        return output

    with injected(unet(), count):
        threads = [threading.Thread(target=run, kwargs={"seed": seed}) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)

    assert max(overlap) == 1
    assert not engine._lock.locked()


# --- progress ------------------------------------------------------------------------------------------


def test_progress_is_reported_at_most_about_once_a_second() -> None:
    engine = handler.get_engine()
    request = parse_input({"input": {**JOB, "num_inference_steps": 12}}, handler.get_settings())
    reports: list[tuple[float, dict[str, Any]]] = []

    def slow(_call: int, output: Any) -> Any:
        time.sleep(0.25)
        return output

    started = time.monotonic()
    with injected(unet(), slow):
        engine.generate(request, timeout_s=60, on_progress=lambda report: reports.append((time.monotonic(), report)))
    elapsed = time.monotonic() - started

    assert reports[-1][1] == {"step": 12, "total_steps": 12}
    assert 2 <= len(reports) <= elapsed + 2
    # Every report but the last (the final step is always reported) comes a second or more after the previous.
    gaps = [later[0] - earlier[0] for earlier, later in itertools.pairwise(reports[:-1])]
    assert all(gap >= 0.95 for gap in gaps)


def test_without_runpod_no_progress_is_sent() -> None:
    assert handler._send_progress is None
    assert handler._progress_reporter({"id": "x"}) is None


# --- the safety checker ------------------------------------------------------------------------------


@pytest.fixture
def checked_worker(tiny_model_with_checker_dir: Path, configure: Callable[..., None]) -> Iterator[None]:
    """The handler on the tiny model that ships a tiny safety checker, with SAFETY_CHECKER=true."""
    configure(MODEL_ID=str(tiny_model_with_checker_dir), SAFETY_CHECKER="true")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(handler, "_engine", None)
        yield


@pytest.mark.usefixtures("checked_worker")
def test_safety_checker_flags_every_image() -> None:
    result = run()

    assert [item["nsfw"] for item in result["images"]] == [False, False]
    assert handler.get_engine()._pipeline.safety_checker is not None


@pytest.mark.usefixtures("checked_worker")
def test_flagged_images_are_blacked_out_and_reported() -> None:
    checker = handler.get_engine()._pipeline.safety_checker
    # Lower every concept threshold so that any image scores above it: a fault at the model itself.
    saved = checker.concept_embeds_weights.detach().clone()
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-1.0)
    try:
        result = run()
    finally:
        with torch.no_grad():
            checker.concept_embeds_weights.copy_(saved)

    assert [item["nsfw"] for item in result["images"]] == [True, True]
    for item in result["images"]:
        assert np.asarray(decode_png(item["image"])).max() == 0
    assert any("safety checker" in warning for warning in result["metadata"]["warnings"])


def test_safety_checker_is_off_by_default(clean: list[str]) -> None:
    result = run()

    assert images_of(result) == clean
    assert all("nsfw" not in item for item in result["images"])
    assert handler.get_engine()._pipeline.safety_checker is None
    assert result["metadata"]["memory_profile"] == "cpu"


def test_fast_mode_is_ignored_with_a_warning_on_the_cpu(tiny_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    from src.engine import Engine
    from src.settings import load_settings

    with caplog.at_level(logging.WARNING, logger="src.engine"):
        engine = Engine.load(load_settings({"MODEL_ID": str(tiny_model_dir), "FAST_MODE": "true"}))

    assert "FAST_MODE ignored" in caplog.text
    request = parse_input({"input": JOB}, engine.settings)
    generation = engine.generate(request, timeout_s=60)
    assert [image.size for image in generation.images] == [(64, 64), (64, 64)]
