"""handler.handler on the tiny real pipeline: the wire contract, seeds, determinism, failures."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import handler
from src.run.engine import Engine
from src.schema import SCHEDULER_NAMES, parse_input
from src.settings import load_settings
from tests.conftest import ROOT, decode_png

pytestmark = pytest.mark.usefixtures("worker")

FAST = {"width": 64, "height": 64, "num_inference_steps": 2}


def run(**fields: object) -> dict:
    return asyncio.run(handler.handler({"id": "test-job", "input": {"prompt": "a fox", **FAST, **fields}}))


def pixels(item: dict) -> np.ndarray:
    return np.asarray(decode_png(item["image"]), dtype=np.float64)


def test_response_has_the_documented_shape() -> None:
    result = run(seed=7, width=128, height=192, negative_prompt="blurry", guidance_scale=6)

    assert set(result) == {"images", "metadata"}
    assert [set(item) for item in result["images"]] == [{"image", "seed"}]
    metadata = result["metadata"]
    assert {
        "prompt",
        "negative_prompt",
        "width",
        "height",
        "num_inference_steps",
        "guidance_scale",
        "scheduler",
        "seeds",
        "model",
        "device",
        "dtype",
        "timings_ms",
        "version",
    } <= set(metadata)
    assert set(metadata["timings_ms"]) == {"queue", "inference", "encode", "total"}
    assert metadata["timings_ms"]["queue"] >= 0
    assert metadata["prompt"] == "a fox"
    assert metadata["negative_prompt"] == "blurry"
    assert (metadata["width"], metadata["height"]) == (128, 192)
    assert metadata["num_inference_steps"] == 2
    assert metadata["guidance_scale"] == 6.0
    assert metadata["scheduler"] == "DPM++ 2M Karras"
    assert metadata["seeds"] == [7]
    assert (metadata["device"], metadata["dtype"]) == ("cpu", "float32")
    assert metadata["timings_ms"]["total"] >= metadata["timings_ms"]["inference"] > 0


def test_image_is_a_png_of_the_requested_size() -> None:
    result = run(width=128, height=192)

    image = decode_png(result["images"][0]["image"])
    assert image.format == "PNG"
    assert image.size == (128, 192)
    assert image.mode == "RGB"
    assert not result["images"][0]["image"].startswith("data:")


def test_image_i_uses_seed_plus_i() -> None:
    result = run(seed=1000, num_images=3)

    assert [item["seed"] for item in result["images"]] == [1000, 1001, 1002]
    assert result["metadata"]["seeds"] == [1000, 1001, 1002]


def test_seeds_wrap_at_2_to_the_32() -> None:
    result = run(seed=4294967295, num_images=2)

    assert result["metadata"]["seeds"] == [4294967295, 0]


@pytest.mark.parametrize("seed", [None, -1], ids=["null", "minus-one"])
def test_random_seed_is_reported_and_reproduces_the_image(seed: int | None) -> None:
    first = run(seed=seed)
    drawn = first["images"][0]["seed"]
    assert 0 <= drawn < 2**32

    again = run(seed=drawn)
    assert again["images"][0]["image"] == first["images"][0]["image"]


def test_same_request_gives_identical_bytes() -> None:
    first = run(seed=1234, num_images=2, scheduler="Euler a")
    second = run(seed=1234, num_images=2, scheduler="Euler a")

    assert [item["image"] for item in first["images"]] == [item["image"] for item in second["images"]]


def test_different_seeds_give_different_images() -> None:
    result = run(seed=5, num_images=2)

    assert result["images"][0]["image"] != result["images"][1]["image"]


@pytest.mark.parametrize("scheduler", ["DPM++ 2M Karras", "Euler a", "DPM++ 2M SDE Karras"])
def test_batch_image_matches_its_single_run(scheduler: str) -> None:
    batch = run(seed=300, num_images=3, scheduler=scheduler)

    for index, item in enumerate(batch["images"]):
        single = run(seed=300 + index, num_images=1, scheduler=scheduler)
        difference = np.abs(pixels(item) - pixels(single["images"][0])).mean()
        assert difference <= 0.5, f"image {index}: mean absolute difference {difference:.3f}"


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_every_scheduler_generates(scheduler: str) -> None:
    result = run(seed=1, scheduler=scheduler.upper())

    assert result["metadata"]["scheduler"] == scheduler
    image = pixels(result["images"][0])
    assert image.shape == (64, 64, 3)
    assert image.std() > 0, "a flat image means the sampler produced nothing"


def test_request_scheduler_does_not_change_the_shared_pipeline() -> None:
    engine = handler.get_engine()
    shared_scheduler = engine._pipeline.scheduler

    run(scheduler="Euler a")
    run(scheduler="DDIM")

    assert engine._pipeline.scheduler is shared_scheduler
    assert type(shared_scheduler).__name__ == "PNDMScheduler"
    assert handler.get_engine() is engine, "the pipeline is loaded once per process"


def test_a_prompt_longer_than_clip_reads_is_read_whole_in_chunks() -> None:
    # The tiny model's tokenizer gives 4 tokens to "a fox ": 160 tokens are 3 chunks of 75.
    result = run(prompt="a fox " * 40)

    assert result["metadata"]["warnings"] == []
    assert result["metadata"]["prompt_tokens"] == {
        "prompt": {"tokens": 160, "chunks": 3},
        "negative_prompt": {"tokens": 0, "chunks": 1},
    }


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_long_prompt_draws_no_warning_from_the_libraries(tiny_model_dir: Path) -> None:
    # A new engine: transformers warns once per tokenizer, so an engine that already warned proves nothing.
    engine = Engine.load(load_settings({"MODEL_ID": str(tiny_model_dir)}))
    request = parse_input(
        {"input": {"prompt": "a fox " * 40, "negative_prompt": "blurry " * 80, **FAST}}, engine.settings
    )
    # diffusers and transformers log through their own top loggers, which do not propagate to the root.
    records = Records()
    libraries = [logging.getLogger("diffusers"), logging.getLogger("transformers")]
    for logger in libraries:
        logger.addHandler(records)
    try:
        generation = engine.generate(request, timeout_s=600)
    finally:
        for logger in libraries:
            logger.removeHandler(records)

    assert generation.warnings == []
    assert generation.prompt_tokens["negative_prompt"]["chunks"] > 1
    assert records.messages == []


def test_short_prompt_has_no_warnings() -> None:
    assert run()["metadata"]["warnings"] == []


BAD_JOBS = [
    pytest.param(None, "job", id="job-null"),
    pytest.param([], "job", id="job-list"),
    pytest.param({}, "input", id="no-input"),
    pytest.param({"id": "j", "input": None}, "input", id="input-null"),
    pytest.param({"id": "j", "input": []}, "input", id="input-list"),
    pytest.param({"id": "j", "input": "a fox"}, "input", id="input-string"),
    pytest.param({"id": "j", "input": {"prompt": "a fox", "width": 500}}, "width=500", id="bad-width"),
    pytest.param({"id": "j", "input": {"prompt": " "}}, "prompt", id="blank-prompt"),
    pytest.param({"id": "j", "input": {"prompt": "a", "stepz": 5}}, "stepz", id="unknown-field"),
    pytest.param({"id": "j", "input": {"prompt": "a", "scheduler": "Turbo"}}, "scheduler", id="bad-scheduler"),
]


@pytest.mark.parametrize(("job", "named"), BAD_JOBS)
def test_bad_job_is_answered_with_an_error(job: object, named: str) -> None:
    result = asyncio.run(handler.handler(job))

    assert set(result) == {"error"}
    assert named in result["error"]


def test_valid_job_succeeds_after_many_bad_ones() -> None:
    for job in [param.values[0] for param in BAD_JOBS] * 3:
        assert "error" in asyncio.run(handler.handler(job))

    assert len(run()["images"]) == 1


def test_failure_inside_generation_is_logged_and_answered(caplog: pytest.LogCaptureFixture) -> None:
    unet = handler.get_engine()._pipeline.unet

    def explode(*_: object) -> None:
        raise RuntimeError("simulated failure in the UNet\nsecond line")

    hook = unet.register_forward_hook(explode)
    try:
        with caplog.at_level(logging.ERROR, logger="handler"):
            result = run()
    finally:
        hook.remove()

    assert set(result) == {"error"}
    assert result["error"].startswith("generation failed: RuntimeError: simulated failure in the UNet")
    assert "second line" not in result["error"], "the answer is short; the log has the rest"
    assert "Traceback" in caplog.text
    assert "test-job" in caplog.text
    assert len(run()["images"]) == 1, "the next job works"


def test_importing_handler_loads_nothing() -> None:
    code = "import sys, handler; print(sorted({'torch', 'diffusers'} & set(sys.modules)), handler._engine)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    )

    assert result.stdout.strip() == "[] None"


@pytest.mark.parametrize(
    ("dtype", "checks"),
    [
        pytest.param("float16", ["check_kernels", "check_fp16"], id="float16"),
        # The fp16 check's advice is DTYPE=float32: a worker that follows it must not be stopped by it.
        pytest.param("float32", ["check_kernels"], id="float32"),
        pytest.param("bfloat16", ["check_kernels"], id="bfloat16"),
    ],
)
def test_the_fp16_fitness_check_guards_only_a_worker_that_runs_fp16(
    monkeypatch: pytest.MonkeyPatch, dtype: str, checks: list[str]
) -> None:
    """serve() on a CUDA worker registers runpod's fitness checks: the fp16 one only where fp16 runs. The engine
    is a stand-in with a CUDA device (this machine has none); runpod's own registry records the checks."""
    import types

    import runpod
    import torch
    from runpod.serverless.modules import rp_fitness, rp_http, rp_scale

    # serve() also changes runpod's job loop (src/job_loop.py): restored after the test.
    monkeypatch.setattr(rp_scale.JobScaler, "stop_job", rp_scale.JobScaler.stop_job)
    monkeypatch.setattr(rp_http, "_transmit", rp_http._transmit)
    monkeypatch.setattr(rp_fitness, "_fitness_checks", [])
    monkeypatch.setattr(runpod.serverless, "start", lambda _config: None)
    monkeypatch.setattr(
        handler, "_engine", types.SimpleNamespace(device=torch.device("cuda"), dtype=getattr(torch, dtype))
    )

    handler.serve(handler.get_settings())

    assert [check.__name__ for check in rp_fitness._fitness_checks] == checks


@pytest.mark.parametrize(("level", "libraries"), [("DEBUG", "INFO"), ("INFO", "INFO"), ("WARNING", "WARNING")])
def test_log_level_sets_the_workers_own_lines_and_keeps_the_libraries_at_info_or_above(
    level: str, libraries: str
) -> None:
    # At DEBUG urllib3 logs each request's whole URL: a presigned image URL's signature, a download's token.
    before = {name: logging.getLogger(name).level for name in ("", *handler.OWN_LOGGERS)}
    try:
        handler.configure_logging(level)

        for name in ("handler", "src.prepare.images", "builder.download"):
            assert logging.getLogger(name).getEffectiveLevel() == logging.getLevelNamesMapping()[level], name
        for name in ("urllib3.connectionpool", "botocore.endpoint"):
            # At least: a library may quiet its own loggers further (or another test may have).
            assert logging.getLogger(name).getEffectiveLevel() >= logging.getLevelNamesMapping()[libraries], name
    finally:
        for name, was in before.items():
            logging.getLogger(name).setLevel(was)
