"""On a machine with an NVIDIA GPU (`pytest -m gpu`): fp16 on CUDA, the balanced profile, a real OOM."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from src.engine import Engine
from src.memory import Profile
from src.schema import parse_input
from src.settings import load_settings

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU machine)"),
]


@pytest.fixture(scope="module")
def cuda_engine(tiny_model_dir: Path) -> Engine:
    return Engine.load(load_settings({"MODEL_ID": str(tiny_model_dir), "DEVICE": "cuda"}))


def test_cuda_runs_float16_and_matches_the_seed(cuda_engine: Engine) -> None:
    request = parse_input({"input": {"prompt": "a fox", "num_inference_steps": 4, "seed": 3}}, cuda_engine.settings)

    first = cuda_engine.generate(request, timeout_s=60)
    second = cuda_engine.generate(request, timeout_s=60)

    assert cuda_engine.dtype == torch.float16
    assert cuda_engine.profile is not Profile.CPU
    assert first.images[0].size == (512, 512)
    assert first.images[0].tobytes() == second.images[0].tobytes()
    assert torch.cuda.memory_allocated() < 2 * 2**30, "nothing is left allocated after a job"
