"""Token merging (``tome_ratio``, src/run/token_merging.py, tomesd) through the handler on the tiny model: the UNet's
transformer blocks are ToMe's for the job's pipeline call only, the same request gives the same bytes, and a ratio
out of range is refused (with FAST_MODE, tests/test_fast_path.py runs it uncompiled). The tiny UNet has no
attention at its full resolution, where ToMe merges, so its pixels do not move; bench/speed_options.py measures
the merge on SD 1.5's architecture."""

from __future__ import annotations

import asyncio
import base64
import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import handler
from src.run.engine import Engine
from src.schema import InputError, parse_input
from src.settings import load_settings
from tests.conftest import split_by_admission

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


def attention_at_full_resolution(tiny: Path, folder: Path) -> Path:
    """The tiny model with a UNet that has attention at its full latent resolution, where ToMe merges, as SD 1.5's."""
    from diffusers import UNet2DConditionModel

    shutil.copytree(tiny, folder)
    config = dict(UNet2DConditionModel.load_config(tiny / "unet"))
    config["down_block_types"] = ["CrossAttnDownBlock2D"] * len(config["down_block_types"])
    config["up_block_types"] = ["CrossAttnUpBlock2D"] * len(config["up_block_types"])
    torch.manual_seed(0)
    shutil.rmtree(folder / "unet")
    UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet")
    return folder


def test_each_image_keeps_its_pixels_however_admission_splits_the_job(tiny_model_dir: Path, tmp_path: Path) -> None:
    # ToMe draws one merge pattern for a whole batch: seeded by a sub-batch's first image, image 2 of three run in a
    # sub-batch of its own (a smaller GPU, the out-of-memory retry) differed from the same image run in one batch.
    whole = Engine.load(load_settings({"MODEL_ID": str(attention_at_full_resolution(tiny_model_dir, tmp_path / "m"))}))
    split = split_by_admission(whole, 64, 64, 3)

    def pictures(engine: Engine, **fields: Any) -> list[np.ndarray]:
        request = parse_input({"input": {**JOB, "num_images": 3, **fields}}, engine.settings)
        return [np.asarray(image, dtype=np.int16) for image in engine.generate(request, timeout_s=600).images]

    merged = pictures(whole, tome_ratio=0.5)
    # Within one grey level: a batch of two and one of three round a few values differently, merged or not.
    differences = [int(np.abs(a - b).max()) for a, b in zip(merged, pictures(split, tome_ratio=0.5), strict=True)]
    assert max(differences) <= 1, differences
    assert np.abs(merged[2] - pictures(whole)[2]).max() > 1, "on this UNet the merge changes the pixels"
