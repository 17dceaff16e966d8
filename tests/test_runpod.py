"""The handler under runpod's own job wrapper, as the serverless worker and local runs call it."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest
from runpod.serverless.modules.rp_job import run_job

import handler
from tests.conftest import decode_png

pytestmark = pytest.mark.usefixtures("worker")


def test_run_job_returns_the_output() -> None:
    job = {"id": "rp-1", "input": {"prompt": "a fox", "width": 64, "height": 128, "num_inference_steps": 2}}

    result = asyncio.run(run_job(handler.handler, job))

    assert set(result) == {"output"}
    output = result["output"]
    assert decode_png(output["images"][0]["image"]).size == (64, 128)
    assert output["metadata"]["seeds"] == [output["images"][0]["seed"]]


def test_run_job_reports_bad_input_as_a_job_error() -> None:
    job = {"id": "rp-2", "input": {"prompt": "a fox", "num_images": 99}}

    result = asyncio.run(run_job(handler.handler, job))

    assert set(result) == {"error"}
    assert "num_images=99" in result["error"]
    assert "MAX_IMAGES" in result["error"]


def test_each_job_s_end_is_logged_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    good = {"id": "rp-3", "input": {"prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 1}}
    bad = {"id": "rp-4", "input": {"prompt": "a fox", "num_images": 99}}

    with caplog.at_level(logging.INFO, logger="handler"):
        asyncio.run(run_job(handler.handler, good))
        asyncio.run(run_job(handler.handler, bad))

    ends = [record.getMessage() for record in caplog.records if record.name == "handler"]
    assert re.fullmatch(r"job rp-3 COMPLETED in \d+ ms", ends[0])
    assert re.fullmatch(r"job rp-4 FAILED in \d+ ms: invalid input: num_images=99: .*", ends[1])
    assert "\n" not in ends[1]
    assert len(ends) == 2
