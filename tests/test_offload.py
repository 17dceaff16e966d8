"""The low profile's model offload on the tiny real pipeline, on the CPU: accelerate's hooks move each model
between "cpu" and the execution device "cpu:0" as they would between host memory and a GPU, and the test
tells the two apart by watching each model's moves. After every job, however it ends, no model is left on
the execution device (the per-request pipelines never run diffusers' ``maybe_free_model_hooks``). Which
models sit beside the UNet while it denoises only a GPU shows: on the CPU, accelerate never offloads the
model before the UNet, whose weights already count as "cpu"; tests/test_gpu.py checks that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from src.errors import GenerationTimeoutError
from src.prepare.inputs import prepare_inputs
from src.run.engine import Engine, apply_offload
from src.run.memory import Profile
from src.schema import parse_input
from src.settings import load_settings
from tests.conftest import box_mask, noise_image
from tests.test_resilience import FakeClock, clock_moves, injected
from tests.test_tasks import png_base64

MODELS = ("text_encoder", "unet", "vae")


@pytest.fixture
def low_engine(tiny_model_dir: Path) -> Engine:
    """An engine of the low profile on the CPU, offloading onto "cpu:0"."""
    engine = offloaded_engine(tiny_model_dir, Profile.LOW)
    engine.clock = FakeClock()
    return engine


def offloaded_engine(model_dir: Path, profile: Profile) -> Engine:
    """An engine of ``profile`` on the CPU, its offload's hooks on the models."""
    settings = load_settings({"MODEL_ID": str(model_dir)})
    loaded = Engine.load(settings)
    engine = Engine(
        loaded._pipeline,
        settings=settings,
        device=torch.device("cpu"),
        dtype=torch.float32,
        profile=profile,
        gpu_bytes=None,
    )
    apply_offload(engine._pipeline, profile, torch.device("cpu"))
    return engine


@pytest.fixture
def on_device(low_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The names of the models on the execution device now, kept up to date by watching each model's ``to``."""
    placed: set[str] = set()
    for name in MODELS:
        model = getattr(low_engine._pipeline, name)

        def moved(*args: Any, _name: str = name, _to: Any = model.to, **kwargs: Any) -> Any:
            target = kwargs.get("device", args[0] if args else None)
            if isinstance(target, str | torch.device):
                (placed.add if torch.device(target) != torch.device("cpu") else placed.discard)(_name)
            return _to(*args, **kwargs)

        monkeypatch.setattr(model, "to", moved)
    return placed


def run(engine: Engine, timeout_s: float = 600, **fields: Any) -> Any:
    job = {"prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 1, **fields}
    return engine.generate(parse_input({"input": job}, engine.settings), timeout_s=timeout_s)


def test_after_each_job_no_model_stays_on_the_device(low_engine: Engine, on_device: set[str]) -> None:
    run(low_engine)
    assert on_device == set(), "the VAE, which ran last, went back to host memory"
    run(low_engine)
    assert on_device == set()


def test_after_a_timed_out_job_no_model_stays_on_the_device(low_engine: Engine, on_device: set[str]) -> None:
    with injected(low_engine._pipeline.unet, clock_moves(low_engine, 100)), pytest.raises(GenerationTimeoutError):
        run(low_engine, timeout_s=60)
    assert on_device == set(), "the UNet, stopped at its step, went back to host memory"
    result = run(low_engine)
    assert len(result.images) == 1
    assert on_device == set()


def test_inpaint_runs_with_the_models_offloaded(tiny_model_dir: Path) -> None:
    """Inpaint encodes its image itself (src/run/inpaint.py), on the execution device, where the offload's hooks
    bring the VAE. Where the VAE's weights wait between jobs (host memory, or "meta" in the minimal profile,
    whose layer-by-layer offload does not run on the CPU) only a GPU tells apart: tests/test_gpu.py runs inpaint
    in both small profiles there."""
    engine = offloaded_engine(tiny_model_dir, Profile.LOW)
    image, mask = noise_image(64, 64), box_mask(64, 64, (16, 16, 48, 48))

    job = {"prompt": "a fox", "num_inference_steps": 2, "image": png_base64(image), "mask": png_base64(mask)}
    inputs = prepare_inputs(parse_input({"input": job}, engine.settings), engine.settings, None)
    result = engine.generate(inputs.request, images=inputs.images, timeout_s=600)

    assert len(result.images) == 1
    kept = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(result.images[0])[kept], np.asarray(image)[kept])
