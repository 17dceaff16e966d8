"""ESRGAN-family upscalers (src/adapters/upscalers.py) with the real spandrel, on the CPU.

The builder's tiny models are spandrel's own architectures at tiny sizes, saved as published files are
(``builder/tiny_upscalers.py``). torchvision's CUDA wheels do not import beside the suite's CPU torch, so
spandrel imports the two torchvision names it needs from a stand-in (tests/stand_ins/torchvision, put on the
path by tests/conftest.py when the real one does not import); the ESRGAN-family paths never call them.
"""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import handler
from builder.tiny_upscalers import write_tiny_upscalers
from src.adapters.upscalers import Upscalers, read_upscaler, scan_upscalers, tiled, upscalers_from
from src.errors import AdapterError
from src.settings import Settings, load_settings
from tests.test_resilience import injected

JOB = {"prompt": "a lighthouse", "num_inference_steps": 2, "seed": 4, "width": 64, "height": 64}
HIRES = {"scale": 2.0, "steps": 2}


@pytest.fixture(scope="module")
def upscaler_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_upscalers(tmp_path_factory.mktemp("upscalers"), bad=True)


@pytest.fixture
def worker(tiny_model_dir: Path, upscaler_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for field in Settings.model_fields.values():
        monkeypatch.delenv(str(field.alias), raising=False)
    monkeypatch.setenv("MODEL_ID", str(tiny_model_dir))
    monkeypatch.setenv("UPSCALER_DIR", str(upscaler_dir))
    monkeypatch.setattr(handler, "_settings", None)
    monkeypatch.setattr(handler, "_engine", None)


def run(**fields: Any) -> dict[str, Any]:
    return asyncio.run(handler.handler({"id": "upscalers", "input": {**JOB, **fields}}))


def image_of(result: dict[str, Any]) -> Image.Image:
    assert "images" in result, result
    with Image.open(io.BytesIO(base64.b64decode(result["images"][0]["image"]))) as image:
        image.load()
        return image


# --- the files ----------------------------------------------------------------------------------------------


def test_the_scan_lists_pth_and_safetensors_by_name_and_refuses_other_files(upscaler_dir: Path) -> None:
    entries = scan_upscalers(str(upscaler_dir))

    usable = sorted(name for name, entry in entries.items() if entry.problem is None)
    assert "tiny-esrgan-4x" in usable
    assert "tiny-compact-2x" in usable
    assert "only .pth (read as tensors only) and .safetensors" in str(entries["bad/scripted"].problem)


@pytest.mark.parametrize(
    ("name", "architecture", "scale"),
    [("tiny-esrgan-4x.pth", "ESRGAN", 4), ("tiny-compact-2x.safetensors", "RealESRGAN Compact", 2)],
)
def test_spandrel_detects_the_tiny_models_as_it_detects_the_real_ones(
    upscaler_dir: Path, name: str, architecture: str, scale: int
) -> None:
    model = read_upscaler(upscaler_dir / name)

    assert (model.architecture.name, model.scale, model.purpose) == (architecture, scale, "SR")
    assert model(torch.rand(1, 3, 8, 8)).shape == (1, 3, 8 * scale, 8 * scale)


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("restoration-1x.safetensors", "is not an image super-resolution model (spandrel reads it as"),
        ("unknown.safetensors", "spandrel does not recognise its architecture"),
        ("hostile.pth", "holds Python objects besides tensors, which are never built"),
    ],
)
def test_a_file_that_is_not_a_super_resolution_model_is_refused_by_name(
    upscaler_dir: Path, name: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(AdapterError, match=f"^{name}") as refused:
        read_upscaler(upscaler_dir / "bad" / name)

    assert says in str(refused.value)
    assert "a pickle ran code" not in capsys.readouterr().out, "the hostile pickle built nothing"


def test_tiles_give_the_whole_images_upscale(upscaler_dir: Path) -> None:
    """A model that sees a few pixels around each one (the compact model: four 3x3 convolutions) gives the same
    image in tiles as whole when the overlap is wider than that."""
    model = read_upscaler(upscaler_dir / "tiny-compact-2x.safetensors")
    images = torch.rand(2, 3, 70, 45)
    with torch.inference_mode():
        whole = model(images)
        parts = tiled(model, images, 2, tile=24, overlap=12)

    assert parts.shape == whole.shape
    assert torch.allclose(parts, whole, atol=1e-5)


# --- hires through an upscaler --------------------------------------------------------------------------------


@pytest.mark.usefixtures("worker")
def test_hires_through_an_esrgan_model_as_a1111() -> None:
    esrgan = run(hires={**HIRES, "upscaler": "tiny-esrgan-4x"})
    lanczos = run(hires={**HIRES, "upscaler": "Lanczos"})
    compact = run(hires={**HIRES, "upscaler": "tiny-compact-2x"})

    assert image_of(esrgan).size == image_of(lanczos).size == image_of(compact).size == (128, 128)
    assert image_of(esrgan).tobytes() != image_of(lanczos).tobytes()
    assert "Hires upscaler: tiny-esrgan-4x" in image_of(esrgan).text["parameters"]
    assert esrgan["metadata"]["hires"]["upscaler"] == "tiny-esrgan-4x"
    assert run(hires={**HIRES, "upscaler": "tiny-esrgan-4x"})["images"] == esrgan["images"]
    upscalers = handler.get_engine().upscalers
    assert upscalers.reads == 2, "each model read once, then cached"


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize(("upscaler", "names_the_tile"), [("tiny-esrgan-4x", True), ("Lanczos", False)])
def test_out_of_memory_on_every_try_points_a_model_upscalers_job_at_its_tiles(
    upscaler: str, names_the_tile: bool
) -> None:
    def out_of_memory(_module: Any, _inputs: Any, _output: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    run()  # the engine loaded
    hook = handler.get_engine()._pipeline.unet.register_forward_hook(out_of_memory)
    try:
        result = run(hires={**HIRES, "upscaler": upscaler})
    finally:
        hook.remove()

    assert result["error"].startswith("128x128 x1 ran out of GPU memory"), result
    # The retry ran a model upscaler in tiles half as large as UPSCALE_TILE's 512: the message says so.
    tiles = "one image at a time with VAE tiling and the hires upscaler in tiles of 256 pixels; ask for a smaller size"
    named = f"or a hires upscaler other than {upscaler!r} (a lower UPSCALE_TILE takes less memory)"
    assert (tiles in result["error"] and named in result["error"]) is names_the_tile, result["error"]
    assert "images" in run(hires={**HIRES, "upscaler": upscaler}), "the next job runs"


def larger_than(side: int) -> Any:
    """A forward hook's fault: the GPU out of memory for an input wider or taller than ``side`` pixels."""

    def fault(_call: int, inputs: Any, output: Any) -> Any:
        if max(inputs[0].shape[-2:]) > side:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return output

    return fault


def test_the_retrys_smaller_tiles_overlap_by_a_quarter_at_most_so_they_advance(upscaler_dir: Path) -> None:
    settings = {"UPSCALER_DIR": str(upscaler_dir), "UPSCALE_TILE": "512", "UPSCALE_TILE_OVERLAP": "300"}
    upscalers = upscalers_from(load_settings(settings), torch.device("cpu"), torch.float32)
    tile = upscalers.frugal_tile()
    assert tile == 256
    sides: list[tuple[int, ...]] = []

    def record(_call: int, inputs: Any, output: Any) -> Any:
        sides.append(tuple(inputs[0].shape[-2:]))
        return output

    with injected(upscalers._model("tiny-compact-2x").model, record):
        upscalers.upscale("tiny-compact-2x", torch.rand(1, 3, 600, 600), tile=tile)

    # Tiles of 256 overlapping by 64 (not 300, which would step back): 3 a side.
    assert len(sides) == 9, sides
    assert max(max(side) for side in sides) == 256


@pytest.fixture
def small_tiles(worker: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker with UPSCALE_TILE=128 (the frugal retry's tiles: 64) and UPSCALE_TILE_OVERLAP=8."""
    monkeypatch.setenv("UPSCALE_TILE", "128")
    monkeypatch.setenv("UPSCALE_TILE_OVERLAP", "8")


@pytest.mark.usefixtures("small_tiles")
def test_a_hires_upscaler_out_of_memory_in_its_tiles_is_retried_in_tiles_half_as_large() -> None:
    job = {"width": 128, "height": 128, "hires": {**HIRES, "scale": 1.5, "upscaler": "tiny-compact-2x"}}
    upscalers = handler.get_engine().upscalers
    seen: list[int] = []

    def fault(call: int, inputs: Any, output: Any) -> Any:
        seen.append(max(inputs[0].shape[-2:]))
        return larger_than(64)(call, inputs, output)

    with injected(upscalers._model("tiny-compact-2x").model, fault):
        result = run(**job)

    assert "images" in result, result
    retried = "the job was retried one image at a time with VAE tiling and the hires upscaler in tiles of 64 pixels"
    assert any(retried in warning for warning in result["metadata"]["warnings"]), result["metadata"]["warnings"]
    assert seen[0] == 128, "the first try: the whole image, one tile of UPSCALE_TILE=128"
    assert max(seen[1:]) == 64, "the retry: tiles of 64"


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize(
    ("upscaler", "says"),
    [
        ("tiny-esrgan", "hires.upscaler='tiny-esrgan': neither latent, lanczos nor an upscaler in UPSCALER_DIR; "),
        ("../x", "hires.upscaler='../x': must be latent, lanczos or an upscaler's name"),
        ("bad/scripted", "hires.upscaler='bad/scripted': scripted.pt cannot be used: a .pt file"),
        ("bad/unknown", "unknown.safetensors: spandrel does not recognise its architecture"),
        ("bad/restoration-1x", "is not an image super-resolution model"),
    ],
)
def test_a_bad_upscaler_is_refused_naming_the_field_and_the_next_job_works(upscaler: str, says: str) -> None:
    error = run(hires={**HIRES, "upscaler": upscaler})["error"]

    assert says in error, error
    assert "images" in run(hires={**HIRES, "upscaler": "tiny-compact-2x"})


@pytest.mark.usefixtures("worker")
def test_the_describe_job_lists_the_hires_upscalers() -> None:
    described = asyncio.run(handler.handler({"id": "d", "input": {"describe": True}}))["describe"]

    assert described["hires_upscalers"][:2] == ["latent", "lanczos"]
    assert {"tiny-esrgan-4x", "tiny-compact-2x"} <= set(described["hires_upscalers"])


@pytest.mark.usefixtures("worker")
def test_admission_counts_an_upscalers_weights_and_one_tiles_features() -> None:
    upscalers = handler.get_engine().upscalers
    tile = upscalers.tile
    weights = upscalers.entries["tiny-esrgan-4x"].path.stat().st_size

    assert upscalers.gpu_bytes("latent", 2) == upscalers.gpu_bytes(None, 2) == 0
    assert upscalers.gpu_bytes("tiny-esrgan-4x", 2) == weights + 3 * 64 * (tile * 4) ** 2 * 2
    run(hires={**HIRES, "upscaler": "tiny-compact-2x"})  # loaded: its own scale from now on
    compact = upscalers.entries["tiny-compact-2x"].path.stat().st_size
    # And its own precision: this worker runs it in float32, 4 bytes a value, whatever the guess before it loaded
    # (spandrel runs HAT, DAT and others in float32 on a half-precision worker).
    assert upscalers._cache["tiny-compact-2x"].dtype == torch.float32
    assert upscalers.gpu_bytes("tiny-compact-2x", 2) == compact + 3 * 64 * (tile * 2) ** 2 * 4


def test_on_a_gpu_admission_counts_the_upscalers_the_cache_keeps_there(upscaler_dir: Path) -> None:
    """The cache keeps upscalers on the device: on a GPU they take its memory during every job, and admission
    counts them all."""
    entries = scan_upscalers(str(upscaler_dir))
    options: dict[str, Any] = {"dtype": torch.float32, "tile": 64, "overlap": 8}
    upscalers = Upscalers(entries, device=torch.device("cpu"), cache_bytes=10**9, **options)
    for name in ("tiny-esrgan-4x", "tiny-compact-2x"):
        upscalers.facts(name)  # loaded, on the CPU
    plain = upscalers.gpu_bytes("tiny-compact-2x", 4)
    assert upscalers.gpu_bytes(None, 4) == 0, "on the CPU, nothing is on a GPU"

    upscalers.device = torch.device("cuda")  # what a GPU worker holding the same two would count
    esrgan = sum(tensor.nbytes for tensor in upscalers._cache["tiny-esrgan-4x"].model.state_dict().values())
    compact = sum(tensor.nbytes for tensor in upscalers._cache["tiny-compact-2x"].model.state_dict().values())
    assert upscalers.gpu_bytes(None, 4) == esrgan + compact
    assert upscalers.gpu_bytes("tiny-compact-2x", 4) == plain + esrgan, "the job's own counted once"
    assert upscalers.gpu_bytes("Lanczos", 4) == esrgan + compact

    # Loading the compact model into a cache with room for one drops the ESRGAN; admission, which cannot know a
    # file's loaded size before loading it (a float32 file in half precision takes half), counts the ESRGAN still.
    weights = entries["tiny-compact-2x"].path.stat().st_size
    for dtype, dtype_bytes in ((torch.float32, 4), (torch.float16, 2)):
        small = Upscalers(entries, device=torch.device("cpu"), cache_bytes=1, **{**options, "dtype": dtype})
        small.facts("tiny-esrgan-4x")
        small.device = torch.device("cuda")
        kept = sum(tensor.nbytes for tensor in small._cache["tiny-esrgan-4x"].model.state_dict().values())
        assert small.gpu_bytes("tiny-compact-2x", dtype_bytes) == weights + 3 * 64 * (64 * 4) ** 2 * dtype_bytes + kept
        small.device = torch.device("cpu")
        small.facts("tiny-compact-2x")
        assert small.cached == ["tiny-compact-2x"], "it was counted, though the load dropped it"


@pytest.mark.usefixtures("worker")
def test_a_batch_goes_through_the_upscaler_one_image_at_a_time_as_each_would_alone() -> None:
    batch = run(num_images=2, hires={**HIRES, "upscaler": "tiny-compact-2x"})
    second = run(seed=JOB["seed"] + 1, hires={**HIRES, "upscaler": "tiny-compact-2x"})

    one = np.asarray(image_of({"images": batch["images"][1:]}), dtype=np.int16)
    alone = np.asarray(image_of(second), dtype=np.int16)
    assert np.abs(one - alone).mean() < 1.0, "within float rounding of a batch (docs/input.md, Seeds)"


def test_upscaler_preload_loads_them_at_startup_and_names_an_unknown_one(
    tiny_model_dir: Path, upscaler_dir: Path
) -> None:
    from src.run.engine import Engine
    from src.settings import load_settings

    base = {"MODEL_ID": str(tiny_model_dir), "UPSCALER_DIR": str(upscaler_dir)}
    engine = Engine.load(load_settings({**base, "UPSCALER_PRELOAD": "tiny-compact-2x"}))
    assert engine.upscalers.cached == ["tiny-compact-2x"]

    with pytest.raises(AdapterError, match="UPSCALER_PRELOAD names 'tiny-esrgan': 'tiny-esrgan' is not an upscaler"):
        Engine.load(load_settings({**base, "UPSCALER_PRELOAD": "tiny-esrgan"}))


# --- models that cannot be used, and where a tiled image is kept ----------------------------------------------


@pytest.fixture(scope="module")
def channel_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A greyscale (1-channel) and an RGBA (4-channel) compact model: spandrel reads both as super-resolution."""
    from safetensors.torch import save_file
    from spandrel.architectures.Compact.__arch.SRVGG import SRVGGNetCompact

    folder = tmp_path_factory.mktemp("channels")
    for name, channels in (("grey-2x", 1), ("rgba-2x", 4)):
        torch.manual_seed(0)
        network = SRVGGNetCompact(num_in_ch=channels, num_out_ch=channels, num_feat=8, num_conv=2, upscale=2)
        save_file(
            {key: value.contiguous() for key, value in network.state_dict().items()}, folder / f"{name}.safetensors"
        )
    return folder


@pytest.mark.parametrize(("name", "channels"), [("grey-2x", 1), ("rgba-2x", 4)])
def test_a_model_of_other_than_three_channels_is_refused_by_name_when_read(
    channel_models: Path, name: str, channels: int
) -> None:
    with pytest.raises(AdapterError, match=f"^{name}.safetensors takes {channels}-channel images") as refused:
        read_upscaler(channel_models / f"{name}.safetensors")

    assert "only a 3-channel model is used" in str(refused.value)
    upscalers = Upscalers(
        scan_upscalers(str(channel_models)),
        device=torch.device("cpu"),
        dtype=torch.float32,
        cache_bytes=10**9,
        tile=64,
        overlap=8,
    )
    with pytest.raises(AdapterError, match=f"^{name}.safetensors takes {channels}-channel images"):
        upscalers.enlarge(name, torch.rand(1, 3, 20, 20), (40, 40))


@pytest.mark.parametrize("size", [(30, 20), (70, 45)], ids=["one-tile", "tiles"])
def test_a_tiled_image_is_kept_in_float32_on_the_cpu_one_tile_at_a_time(
    upscaler_dir: Path, size: tuple[int, int]
) -> None:
    """Each tile's output, in the model's dtype on its device, is copied into a float32 image on the CPU: the
    device holds one tile, whatever the image's size (tiles in half precision here, as on a GPU)."""
    model = read_upscaler(upscaler_dir / "tiny-compact-2x.safetensors")
    images = torch.rand(1, 3, size[1], size[0])
    made: list[torch.Size] = []

    def run_half(part: torch.Tensor) -> torch.Tensor:
        out = model(part).half()
        made.append(out.shape)
        return out

    with torch.inference_mode():
        whole = model(images)
        parts = tiled(run_half, images, 2, tile=32, overlap=12)

    assert (parts.dtype, parts.device.type) == (torch.float32, "cpu")
    assert torch.allclose(parts, whole, atol=1e-2)
    assert max(shape[-1] * shape[-2] for shape in made) <= (32 * 2) ** 2, "no tile larger than UPSCALE_TILE"
