"""FAST_MODE's compiled path (src/run/fast_path.py) on the CPU, with the tiny model.

FAST_MODE itself runs on CUDA only; here its changes are made to a loaded worker by ``apply_fast_mode`` with a
counting backend that runs what dynamo traced as it is (no CUDA graphs, which tests/test_gpu.py covers). Dynamo's
tracing, guards and recompiles are the ones inductor gets, so each kind of job is checked to give the pixels of
the modules as written, exactly, and to go through the compiled call.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from torch._dynamo.testing import CompileCounterWithBackend

from builder.tiny_lora import write_test_loras
from builder.tiny_model import write_tiny_model, write_tiny_models
from src.concurrency import on_gpu_thread
from src.prepare import JobPlan, prepare
from src.run import engine as engine_module
from src.run.engine import Engine, Generation
from src.run.fast_path import CompiledCall, _copied, apply_fast_mode, compiled_modules, uncompiled
from src.run.startup import _loras
from src.settings import load_settings

pytestmark = pytest.mark.xdist_group("fast_path")

JOB = {"prompt": "a lighthouse", "num_inference_steps": 3, "seed": 5, "width": 64, "height": 64}
LORAS = ["tiny-peft-10", "tiny-peft-11"]


# Each kind that compiles again costs the suite a trace of the whole UNet; a batch at a new size and ControlNet
# units are checked on a GPU (tests/test_gpu.py), and with inductor by bench/fast_path.py (sizes and batches).
KINDS: dict[str, dict[str, Any]] = {
    "default": {},
    "hires": {"hires": {"scale": 1.5, "steps": 2}},
    "a LoRA": {"loras": [{"name": LORAS[0], "scale": 0.8}]},
    "tiling": {"tiling": True},
    # Two chunks against the empty negative's one, its padding masked out of cross-attention: one more input.
    "a longer prompt": {"prompt": "a lighthouse BREAK on a rock"},
    "DeepCache": {"deepcache_interval": 2},
    "ToMe": {"tome_ratio": 0.5},
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with two LoRAs and MODELS_DIR's models."""
    folder = write_tiny_model(tmp_path_factory.mktemp("tiny-fast"))
    write_test_loras(folder, folder / "loras", count=2, rank=4, layout="peft", seed=10)
    write_tiny_models(folder / "models")
    return folder


@pytest.fixture(scope="module")
def fast(folder: Path) -> tuple[Engine, CompileCounterWithBackend]:
    """A worker with FAST_MODE's changes, compiled by a counting backend."""
    settings = {"MODEL_ID": str(folder), "LORA_DIR": str(folder / "loras"), "MODELS_DIR": str(folder / "models")}
    engine = Engine.load(load_settings({**settings, "MODEL_CONFIG": str(folder)}))
    # Its LoRAs in hot-swap slots, as a FAST_MODE worker loads them on a GPU.
    engine.loras = _loras(engine._pipeline, engine.settings, engine.device, engine.profile, fast=True)
    counter = CompileCounterWithBackend("eager")
    apply_fast_mode(engine._pipeline, engine.loras, graphs=False, backend=counter)
    return engine, counter


def generate(engine: Engine, **fields: Any) -> Generation:
    """A job through the worker's prepare and run stages, as the handler runs them."""
    plan = prepare({"input": {**JOB, **fields}}, engine.settings, catalog=lambda: engine.catalog, storage=None)
    assert isinstance(plan, JobPlan), plan
    return engine.run(plan, timeout_s=600)


def pixels(generation: Generation) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in generation.images])


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_of_job_gives_the_pixels_of_the_modules_as_written(
    fast: tuple[Engine, CompileCounterWithBackend], kind: str
) -> None:
    engine, counter = fast
    unet = engine._pipeline.unet
    call, through = unet._compiled_call_impl, []

    def counted(*args: Any, **kwargs: Any) -> Any:
        through.append(kind)
        return call(*args, **kwargs)

    unet._compiled_call_impl = counted
    try:
        compiled = pixels(generate(engine, **KINDS[kind]))
    finally:
        unet._compiled_call_impl = call
    with uncompiled(*compiled_modules(engine._pipeline)):
        written = pixels(generate(engine, **KINDS[kind]))

    assert np.array_equal(compiled, written)
    assert compiled_modules(engine._pipeline) == [unet, engine._pipeline.vae.decoder], "compiled again after"
    assert not unet._compiled_call_impl.failed_masked
    if kind in ("DeepCache", "tiling", "ToMe"):
        assert not through, f"{kind}'s evaluations run the UNet as written"
    else:
        assert len(through) >= JOB["num_inference_steps"], "each step's UNet evaluation is the compiled call"
        assert counter.frame_count > 0


def test_a_model_swap_and_a_lora_swap_compile_nothing_again(fast: tuple[Engine, CompileCounterWithBackend]) -> None:
    engine, counter = fast
    default = pixels(generate(engine))
    for name in LORAS:  # each number of LoRAs on, compiled once
        generate(engine, loras=[{"name": name, "scale": 0.7}])
    graphs = counter.frame_count
    first = pixels(generate(engine, loras=[{"name": LORAS[0], "scale": 0.3}]))
    second = pixels(generate(engine, loras=[{"name": LORAS[1], "scale": 1.1}]))
    swapped = pixels(generate(engine, model="tiny-a"))
    with uncompiled(*compiled_modules(engine._pipeline)):
        written = pixels(generate(engine, model="tiny-a"))
    back = pixels(generate(engine))

    assert counter.frame_count == graphs, "LoRAs hot-swap into the UNet's slots; a model's weights copy into it"
    assert not np.array_equal(first, second)
    assert np.array_equal(swapped, written), "the compiled UNet runs the swapped-in model's weights"
    assert not np.array_equal(swapped, default)
    assert np.array_equal(back, default)


def test_a_scheduler_with_float_timesteps_compiles_nothing_again(
    fast: tuple[Engine, CompileCounterWithBackend],
) -> None:
    """DPM++ 2M Karras (the default, the warm-up's) gives int64 timesteps, Euler, Heun and LMS float32 ones; the
    compiled UNet takes them all as float32, so a job with another scheduler compiles nothing in its time."""
    engine, counter = fast
    generate(engine)
    graphs = counter.frame_count
    for scheduler in ("Euler", "LMS"):
        compiled = pixels(generate(engine, scheduler=scheduler))
        with uncompiled(*compiled_modules(engine._pipeline)):
            written = pixels(generate(engine, scheduler=scheduler))
        assert np.array_equal(compiled, written), scheduler

    assert counter.frame_count == graphs


def test_the_slots_say_what_they_make_of_the_graph_for_the_compile_cache(
    fast: tuple[Engine, CompileCounterWithBackend],
) -> None:
    """COMPILE_CACHE_DIR's file name carries the slots' count, rank and layers: kernels compiled for other slots
    are another file (src/run/startup.py)."""
    engine, _ = fast
    shape = engine.loras.slot_shape

    assert shape["count"] == engine.loras.slot_count > 0
    assert shape["rank"] == 4, "the folder's largest rank"
    assert len(shape["layers"]) == 16


def test_the_unet_compiles_whole_with_a_cross_attention_mask(folder: Path) -> None:
    """The mask of a prompt and a negative of different lengths (src/run/cross_attention.py) traced in one graph,
    with dynamic shapes, where each batch is a size of its own."""
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    counter = CompileCounterWithBackend("eager")
    call = CompiledCall(unet, backend=counter, graphs=False, fullgraph=True, timestep=True)
    sample = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    states = torch.randn((2, 154, unet.config.cross_attention_dim), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1.0] * 77 + [0.0] * 77, [1.0] * 154])
    arguments = {"encoder_hidden_states": states, "encoder_attention_mask": mask, "return_dict": False}

    with torch.no_grad():
        compiled = call(sample, torch.tensor(500.0), **arguments)[0]
        written = unet(sample, torch.tensor(500.0), **arguments)[0]

    assert not call.failed_masked
    assert counter.frame_count == 1
    torch.testing.assert_close(compiled, written)


class Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(self.linear(sample))


def test_a_compile_that_fails_leaves_the_module_uncompiled(caplog: pytest.LogCaptureFixture) -> None:
    module = Small()
    sample = torch.randn(2, 4)
    written = module(sample)

    def broken(_graph: torch.fx.GraphModule, _inputs: list[Any]) -> Any:
        raise RuntimeError("the compiler broke (injected)")

    module._compiled_call_impl = CompiledCall(module, backend=broken, graphs=False, fullgraph=True)
    with caplog.at_level(logging.WARNING):
        compiled = module(sample)

    assert torch.equal(compiled, written)
    assert module._compiled_call_impl is None, "not compiled again at each call"
    assert "compiling the Small failed; it runs uncompiled from now on" in caplog.text
    assert "the compiler broke (injected)" in caplog.text


def test_a_warm_up_that_fails_drops_fast_mode_and_the_worker_serves_on(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = Engine.load(load_settings({"MODEL_ID": str(folder)}))
    apply_fast_mode(engine._pipeline, engine.loras, graphs=False, backend="eager")

    def capture_fails(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing (injected)")

    engine._pipeline.unet._compiled_call_impl = capture_fails
    with caplog.at_level(logging.ERROR):
        engine_module._warm_up(engine)

    assert compiled_modules(engine._pipeline) == []
    assert "FAST_MODE's warm-up failed" in caplog.text
    assert len(generate(engine).images) == 1


def test_the_warm_up_runs_on_the_gpu_thread_and_a_load_from_there_does_not_wait_for_itself() -> None:
    assert on_gpu_thread(lambda: threading.current_thread().name).startswith("job-gpu")
    nested = on_gpu_thread(lambda: on_gpu_thread(lambda: threading.current_thread().name))
    assert nested.startswith("job-gpu")


def test_a_cuda_graph_output_is_copied_out_of_the_graphs_memory() -> None:
    sample = torch.ones(2, 4, 8, 8)

    [copied] = _copied((sample,))
    output = _copied(type("Output", (), {"sample": sample})())

    assert copied.data_ptr() != sample.data_ptr()
    assert torch.equal(copied, sample)
    assert output.sample.data_ptr() != sample.data_ptr()
