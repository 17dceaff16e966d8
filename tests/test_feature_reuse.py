"""DeepCache-style feature reuse (``deepcache_interval``, src/run/feature_reuse.py) through the handler on the tiny
model: the deep blocks run on every Nth UNet evaluation only, the outer ones on each, the UNet is as it was after
the job, and a job without it gives the bytes it gave before."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

import handler
from src.schema import InputError, parse_input
from src.settings import load_settings

JOB = {"prompt": "a lighthouse", "num_inference_steps": 6, "seed": 5, "width": 64, "height": 64}


def run(**fields: Any) -> dict[str, Any]:
    result = asyncio.run(handler.handler({"id": "deepcache", "input": {**JOB, **fields}}))
    assert "error" not in result, result["error"]
    return result


def pixels(result: dict[str, Any]) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(result["images"][0]["image"]))) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture
def calls(worker: None) -> Iterator[dict[str, int]]:
    """How many times the UNet's middle block (deep) and its last up block (outer) ran."""
    run()  # the worker loaded
    unet = handler.get_engine()._pipeline.unet
    counted = {"deep": 0, "outer": 0}

    def count(name: str) -> Any:
        return lambda *_args: counted.__setitem__(name, counted[name] + 1)

    hooks = [
        unet.mid_block.register_forward_hook(count("deep")),
        unet.up_blocks[-1].register_forward_hook(count("outer")),
    ]
    yield counted
    for hook in hooks:
        hook.remove()


def test_every_nth_evaluation_runs_the_deep_blocks_and_each_the_outer_ones(calls: dict[str, int]) -> None:
    result = run(deepcache_interval=3)
    assert calls == {"deep": 2, "outer": 6}, "evaluations 0 and 3 whole; the 4 between reuse their features"
    assert result["metadata"]["deepcache_interval"] == 3
    with Image.open(io.BytesIO(base64.b64decode(result["images"][0]["image"]))) as image:
        assert "DeepCache interval: 3" in image.text["parameters"]


def test_each_pass_starts_whole(calls: dict[str, int]) -> None:
    run(deepcache_interval=3, hires={"scale": 2, "steps": 3})
    assert calls == {"deep": 3, "outer": 9}, "6 first-pass steps (2 whole), then 3 hires steps (1 whole)"


def test_reuse_changes_the_image_a_little_and_leaves_the_unet_as_it_was(calls: dict[str, int]) -> None:
    before = pixels(run())
    reused = pixels(run(deepcache_interval=2))
    difference = np.abs(reused - before)
    assert 0 < difference.mean() < 32, "close to the default's, not the same"
    unet = handler.get_engine()._pipeline.unet
    assert "forward" not in unet.__dict__, "the UNet's own forward again"
    calls.update(deep=0, outer=0)
    assert np.array_equal(pixels(run()), before)
    assert calls == {"deep": 6, "outer": 6}
    assert np.array_equal(pixels(run(deepcache_interval=1)), before), "1 is off"


def test_it_is_refused_with_controlnets_and_out_of_range() -> None:
    limits = load_settings({"CONTROLNET_DIR": "/controlnets"})
    unit = {"model": "canny", "image": "aGVsbG8="}
    with pytest.raises(InputError, match="deepcache_interval=3: not with controlnets"):
        parse_input({"input": {**JOB, "deepcache_interval": 3, "controlnets": [unit]}}, limits)
    with pytest.raises(InputError, match="deepcache_interval=11"):
        parse_input({"input": {**JOB, "deepcache_interval": 11}}, limits)
