"""Where a job's time on the device goes (src/run/phases.py), through the handler on the tiny model: the phases a
job passed through, in order, adding up to its inference time."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

import handler
from src.run.phases import PHASES, Phases

JOB = {"prompt": "a fox", "num_inference_steps": 2, "seed": 1, "width": 64, "height": 64}


def timings(**fields: Any) -> dict[str, Any]:
    result = asyncio.run(handler.handler({"id": "phases", "input": {**JOB, **fields}}))
    assert "error" not in result, result["error"]
    metadata = result["metadata"]
    return {**metadata["timings_ms"], "phases": metadata["phases_ms"]}


@pytest.mark.parametrize(
    ("fields", "phases"),
    [
        pytest.param({}, ["text_encoding", "denoising", "decoding", "to_images"], id="txt2img"),
        pytest.param(
            {"hires": {"scale": 2, "steps": 1}},
            ["text_encoding", "denoising", "hires_upscale", "decoding", "to_images"],
            id="hires",
        ),
        pytest.param({"num_images": 2}, ["text_encoding", "denoising", "decoding", "to_images"], id="batch"),
    ],
)
def test_a_jobs_phases_are_the_ones_it_went_through_and_add_up_to_its_inference(
    worker: None, fields: dict[str, Any], phases: list[str]
) -> None:
    spent = timings(**fields)
    assert list(spent["phases"]) == phases
    assert all(value >= 0 for value in spent["phases"].values())
    # The phases run from the job's start on the device to its pictures; inference adds the adapters' setup.
    assert sum(spent["phases"].values()) <= spent["inference"] + 1


def test_a_phase_marked_twice_adds_up_and_the_order_is_phases_order() -> None:
    clock = iter([0.0, 1.0, 3.0, 6.0, 10.0])
    phases = Phases(torch.device("cpu"))
    phases._now = lambda: next(clock)  # type: ignore[method-assign]
    phases.start()
    phases.mark("decoding")
    phases.mark("denoising")
    phases.mark("denoising")
    phases.mark("text_encoding")
    assert phases.milliseconds() == {"text_encoding": 4000.0, "denoising": 5000.0, "decoding": 1000.0}
    assert tuple(phases.milliseconds()) == tuple(name for name in PHASES if name in phases.milliseconds())


def test_no_marks_no_phases() -> None:
    phases = Phases(torch.device("cpu"))
    phases.mark("denoising")  # before start: not timed
    assert phases.milliseconds() == {}
