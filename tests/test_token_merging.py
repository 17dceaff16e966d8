"""Token merging (``tome_ratio``, src/run/token_merging.py, tomesd) through the handler on the tiny model: the UNet's
transformer blocks are ToMe's for the job's pipeline call only, the same request gives the same bytes, and a ratio
out of range is refused (with FAST_MODE, tests/test_fast_path.py runs it uncompiled). The tiny UNet has no
attention at its full resolution, where ToMe merges, so its pixels do not move; bench/speed_options.py measures
the merge on SD 1.5's architecture."""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

import pytest
from PIL import Image

import handler
from src.schema import InputError, parse_input
from src.settings import load_settings

JOB = {"prompt": "a lighthouse", "num_inference_steps": 3, "seed": 8, "width": 64, "height": 64}


def run(**fields: Any) -> dict[str, Any]:
    result = asyncio.run(handler.handler({"id": "tome", "input": {**JOB, **fields}}))
    assert "error" not in result, result["error"]
    return result


def image_bytes(result: dict[str, Any]) -> bytes:
    return base64.b64decode(result["images"][0]["image"])


def test_the_blocks_are_tomes_for_the_call_only_and_the_image_repeats(worker: None) -> None:
    run()
    unet = handler.get_engine()._pipeline.unet
    blocks = [module for module in unet.modules() if type(module).__name__ == "BasicTransformerBlock"]
    seen: list[str] = []
    hook = blocks[0].register_forward_pre_hook(lambda module, _args: seen.append(type(module).__name__))
    try:
        first = run(tome_ratio=0.5)
    finally:
        hook.remove()
    assert set(seen) == {"ToMeBlock"}, "every evaluation ran ToMe's block"
    assert all(type(block).__name__ == "BasicTransformerBlock" for block in blocks), "put back after the job"
    assert not hasattr(unet, "_tome_info") or not unet._tome_info["hooks"]
    assert image_bytes(run(tome_ratio=0.5)) == image_bytes(first), "the same request, the same bytes"
    assert first["metadata"]["tome_ratio"] == 0.5
    with Image.open(io.BytesIO(image_bytes(first))) as image:
        assert "Token merging ratio: 0.5" in image.text["parameters"]


def test_it_is_refused_out_of_range() -> None:
    with pytest.raises(InputError, match=r"tome_ratio=0\.9"):
        parse_input({"input": {**JOB, "tome_ratio": 0.9}}, load_settings({}))
    assert parse_input({"input": {**JOB, "tome_ratio": 0.5}}, load_settings({"FAST_MODE": "true"})).tome_ratio == 0.5
