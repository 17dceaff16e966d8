"""On a machine with an NVIDIA GPU (`pytest -m gpu`, a few minutes with FAST_MODE's compiles), with the tiny model:

- float16 on CUDA, and a seed that gives the same image twice; variation seeds and seed resize;
- the `balanced` profile (MEMORY_PROFILE=balanced): a 2-image job decodes one image at a time
  (VAE slicing), gives the same pictures as the `high` profile, and leaves no switch on;
- real CUDA out-of-memory errors: from the caching allocator under the GPU_MEMORY_GB cap,
  answered with the worker's own error or recovered by its frugal retry, and the next job works;
- image tasks, A1111 prompts and LoRAs in float16, in each memory profile;
- a single-file checkpoint converted at startup, and a VAE file, in float16 on CUDA;
- MODELS_DIR's models swapped in place from pinned host memory, with and without model offload;
- ESRGAN-family hires upscalers in float16 (with spandrel's wheels in the kit);
- ControlNet units in float16, in each memory profile, and where the ControlNets wait between jobs;
- FAST_MODE: the UNet replayed as CUDA graphs within a grey level of the default path, with dynamic shapes,
  LoRAs hot-swapped, ControlNets and model swaps; compiled without graphs in the balanced profile; its
  compiled kernels kept in COMPILE_CACHE_DIR.

Needs only torch, transformers, accelerate, diffusers, pydantic and pytest, as the GPU machine
has (tests/test_gpu_kit.py checks that this file collects without boto3, moto, requests or yaml).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from src.errors import OutOfMemoryError
from src.run.engine import Engine, Generation
from src.run.memory import Profile
from src.run.noise import job_noise, randn
from src.schema import GenerateRequest, parse_input
from src.settings import load_settings

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU machine)"),
]

MIB = 2**20


def load_engine(model_dir: Path, **variables: str) -> Engine:
    return Engine.load(load_settings({"MODEL_ID": str(model_dir), "DEVICE": "cuda", **variables}))


def request_for(engine: Engine, **fields: object) -> GenerateRequest:
    job = {"input": {"prompt": "a fox", "num_inference_steps": 4, "seed": 3, **fields}}
    return parse_input(job, engine.settings)


def generate(engine: Engine, **fields: object) -> Generation:
    return engine.generate(request_for(engine, **fields), timeout_s=120)


@pytest.fixture(scope="module")
def cuda_engine(tiny_model_dir: Path) -> Engine:
    """The default setup on a large card: float16, the `high` profile."""
    return load_engine(tiny_model_dir)


@pytest.fixture(scope="module")
def balanced_engine(tiny_model_dir: Path) -> Engine:
    return load_engine(tiny_model_dir, MEMORY_PROFILE="balanced")


@pytest.fixture
def decoder_batches() -> Iterator[Callable[[Engine], list[int]]]:
    """Record the batch size of every call of an engine's VAE decoder, through a forward pre-hook."""
    handles = []

    def watch(engine: Engine) -> list[int]:
        batches: list[int] = []
        decoder = engine._pipeline.vae.decoder
        handles.append(decoder.register_forward_pre_hook(lambda _module, args: batches.append(args[0].shape[0])))
        return batches

    yield watch
    for handle in handles:
        handle.remove()


def pixels(generation: Generation) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.int16) for image in generation.images]


# --- float16 and seeds ----------------------------------------------------------------------------


def test_cuda_runs_float16_and_a_seed_gives_the_same_image_twice(cuda_engine: Engine) -> None:
    first = generate(cuda_engine)
    allocated_after_first = torch.cuda.memory_allocated()
    second = generate(cuda_engine)

    assert cuda_engine.dtype == torch.float16
    assert cuda_engine._pipeline.unet.dtype == torch.float16
    assert cuda_engine._pipeline.unet.device.type == "cuda"
    assert cuda_engine.profile is Profile.HIGH, "a card of 10 GiB or more"
    assert first.images[0].size == (512, 512)
    assert first.images[0].tobytes() == second.images[0].tobytes()
    assert not first.warnings, "no NaN re-decode, no black image"
    assert torch.cuda.memory_allocated() <= allocated_after_first, "a job leaves nothing allocated behind"


def test_variation_seeds_and_seed_resize_draw_the_cpus_noise_on_cuda(cuda_engine: Engine) -> None:
    """A1111's variation seeds and seed resize mix noise drawn on the CPU with the seed's, which the pipeline has
    already moved to the GPU: the mix is made on the CPU, so a CUDA worker starts from the CPU's very noise."""
    drawn = randn(3, (2, 4, 16, 16))
    for resize_from in (None, (96, 160)):
        make = job_noise([3, 3], subseeds=[7, 8], strength=0.4, resize_from=resize_from)
        assert torch.equal(make(drawn.cuda()), make(drawn)), resize_from

    plain = pixels(generate(cuda_engine))
    varied = generate(cuda_engine, subseed=7, subseed_strength=0.4)
    resized = generate(cuda_engine, subseed=7, subseed_strength=0.4, seed_resize_from_w=448, seed_resize_from_h=576)

    assert pixels(varied)[0].tobytes() != plain[0].tobytes()
    assert pixels(resized)[0].tobytes() not in {plain[0].tobytes(), pixels(varied)[0].tobytes()}
    assert not varied.warnings
    assert not resized.warnings


def test_phases_are_timed_by_cuda_events_and_add_up_to_the_inference(cuda_engine: Engine) -> None:
    generation = generate(cuda_engine, hires={"scale": 1.5, "steps": 2})
    phases = generation.phases_ms
    assert list(phases) == ["text_encoding", "denoising", "hires_upscale", "decoding", "to_images"]
    assert all(value >= 0 for value in phases.values())
    assert sum(phases.values()) <= generation.inference_ms + 1
    assert phases["denoising"] > phases["hires_upscale"], "the UNet's steps outweigh a latent upscale"


# --- the balanced profile ---------------------------------------------------------------------------


def test_balanced_profile_decodes_a_batch_one_image_at_a_time(
    balanced_engine: Engine, cuda_engine: Engine, decoder_batches: Callable[[Engine], list[int]]
) -> None:
    balanced_calls, high_calls = decoder_batches(balanced_engine), decoder_batches(cuda_engine)

    balanced = generate(balanced_engine, num_images=2, width=256, height=256, seed=5)
    high = generate(cuda_engine, num_images=2, width=256, height=256, seed=5)

    assert balanced_engine.profile is Profile.BALANCED
    assert balanced_calls == [1, 1], "VAE slicing: one decode per image"
    assert high_calls == [2], "the high profile decodes the batch at once"
    assert balanced.seeds == high.seeds == [5, 6]
    for sliced, whole in zip(pixels(balanced), pixels(high), strict=True):
        assert np.abs(sliced - whole).mean() < 0.5, "slicing does not change the picture"
    vae = balanced_engine._pipeline.vae
    assert not vae.use_slicing, "the switches are undone after the job"
    assert not vae.use_tiling


# --- real out-of-memory errors --------------------------------------------------------------------


def test_oom_in_a_batched_decode_is_retried_one_image_at_a_time(
    cuda_engine: Engine, decoder_batches: Callable[[Engine], list[int]]
) -> None:
    calls = decoder_batches(cuda_engine)
    card = torch.cuda.get_device_properties(0).total_memory

    def allocate_too_much(_module: object, args: tuple[torch.Tensor, ...]) -> None:
        if args[0].shape[0] > 1:
            # Twice the card: the caching allocator raises torch.cuda.OutOfMemoryError.
            torch.empty(2 * card, dtype=torch.uint8, device="cuda")

    handle = cuda_engine._pipeline.vae.decoder.register_forward_pre_hook(allocate_too_much)
    try:
        retried = generate(cuda_engine, num_images=2, width=256, height=256, seed=5)
    finally:
        handle.remove()
    clean = generate(cuda_engine, width=256, height=256, seed=5)

    assert calls == [2, 1, 1, 1], "the batched decode failed, the retry decoded one image at a time"
    assert len(retried.images) == 2
    assert any("ran out of memory" in warning for warning in retried.warnings), retried.warnings
    assert not clean.warnings, "the next job runs normally"


@pytest.fixture
def capped_engine(tiny_model_dir: Path) -> Iterator[Engine]:
    """An engine under GPU_MEMORY_GB=8, which caps this process; the cap is lifted afterwards."""
    torch.cuda.reset_peak_memory_stats()
    try:
        yield load_engine(tiny_model_dir, GPU_MEMORY_GB="8", MEMORY_PROFILE="high")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def test_real_oom_under_the_cap_is_answered_and_the_next_job_works(capped_engine: Engine) -> None:
    cap = capped_engine.gpu_bytes
    assert cap == 8 * 2**30
    generate(capped_engine, num_inference_steps=2)  # warm: cuBLAS and cuDNN set up their workspaces
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    # Fill the capped memory but for 8 MiB (in 2 MiB blocks, as the allocator rounds), so a
    # 2-image 512² job needs more than is left.
    hog_bytes = (cap - torch.cuda.memory_reserved() - 8 * MIB) // (2 * MIB) * (2 * MIB)
    hog = torch.empty(hog_bytes, dtype=torch.uint8, device="cuda")
    outcome: Generation | OutOfMemoryError
    try:
        outcome = generate(capped_engine, num_images=2, num_inference_steps=2)
    except OutOfMemoryError as error:
        outcome = error
    finally:
        del hog
        torch.cuda.empty_cache()
    after = generate(capped_engine, num_images=2, num_inference_steps=2)

    if isinstance(outcome, OutOfMemoryError):
        # Even one image at a time did not fit: the worker's own message, naming size and memory.
        assert "512x512 x2 ran out of GPU memory (8.0 GiB" in str(outcome)
    else:
        # The frugal retry fit in what was left.
        assert any("ran out of memory" in warning for warning in outcome.warnings), outcome.warnings
        assert len(outcome.images) == 2
    assert len(after.images) == 2
    assert not after.warnings, "the next job runs normally"
    assert torch.cuda.max_memory_reserved() <= cap, "the process never held more than GPU_MEMORY_GB"


# --- image tasks in float16 -------------------------------------------------------------------------


def test_image_tasks_run_in_float16_on_the_gpu(cuda_engine: Engine) -> None:
    """img2img, inpaint (whole and masked), outpaint and both hires upscalers: finite, the right size,
    the same twice, and inpaint keeps the unmasked pixels exactly."""
    run_image_tasks(cuda_engine)


@pytest.mark.parametrize("profile", ["balanced", "low", "minimal"])
def test_image_tasks_run_in_the_small_card_profiles(tiny_model_dir: Path, profile: str) -> None:
    """The same tasks with VAE slicing and tiling (balanced), with model CPU offload (low) and layer-by-layer
    offload (minimal), where the VAE's encode must reach the GPU through the offload's hooks (the VAE's own
    weights wait in host memory, or on "meta")."""
    run_image_tasks(load_engine(tiny_model_dir, MEMORY_PROFILE=profile))


def run_image_tasks(cuda_engine: Engine) -> None:
    from PIL import Image

    from src.prepare.canvas import prepare
    from src.schema import resolve_size

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (128, 192, 3), dtype=np.uint8))
    mask = Image.new("L", (192, 128), 0)
    mask.paste(255, (64, 32, 128, 96))
    cases = [
        ({"image": "x"}, None, (192, 128)),
        ({"image": "x", "mask": "y"}, mask, (192, 128)),
        ({"image": "x", "mask": "y", "inpaint_area": "masked"}, mask, (192, 128)),
        ({"image": "x", "outpaint": {"left": 64}}, None, (256, 128)),
        ({"width": 128, "height": 128, "hires": {"scale": 1.5}}, None, (192, 192)),
        ({"width": 128, "height": 128, "hires": {"scale": 2.0, "upscaler": "lanczos"}}, None, (256, 256)),
    ]
    for fields, case_mask, size in cases:
        request = request_for(cuda_engine, num_images=2, **fields)
        images = None
        if request.image is not None:
            request, _ = resolve_size(request, image.size, cuda_engine.settings)
            images, _ = prepare(request, image, case_mask)
        first = cuda_engine.generate(request, images=images, timeout_s=120)
        second = cuda_engine.generate(request, images=images, timeout_s=120)
        assert [picture.size for picture in first.images] == [size, size], fields
        assert not any("NaN" in warning for warning in first.warnings), first.warnings
        for a, b in zip(pixels(first), pixels(second), strict=True):
            assert np.abs(a - b).max() <= 2, f"{fields}: the same seed gives the same picture"
        if fields.get("mask") and "inpaint_area" not in fields:
            kept = np.asarray(mask) == 0
            assert (pixels(first)[0][kept] == np.asarray(image, dtype=np.int16)[kept]).all()


# --- prompts in float16 ------------------------------------------------------------------------------


def test_long_weighted_prompts_and_clip_skip_in_float16(cuda_engine: Engine) -> None:
    """A1111 prompts on CUDA in float16: several chunks, weights, BREAK and clip skip 2 give finite
    images, the same twice, and a plain prompt is untouched by the weighting path."""
    prompt = "(a red fox:1.3), [blurry], ((snow)), " * 8 + "BREAK a forest at dawn"
    for clip_skip in (1, 2):
        request = request_for(cuda_engine, prompt=prompt, negative_prompt="(ugly:1.2), " * 30, clip_skip=clip_skip)
        first = cuda_engine.generate(request, timeout_s=120)
        second = cuda_engine.generate(request, timeout_s=120)
        assert first.prompt_tokens["prompt"]["chunks"] >= 3
        assert not any("NaN" in warning for warning in first.warnings), first.warnings
        assert np.abs(pixels(first)[0] - pixels(second)[0]).max() <= 2
    plain = generate(cuda_engine, prompt="a fox in the snow")
    same = generate(cuda_engine, prompt="a (fox:1.0) in the snow")
    assert np.array_equal(pixels(plain)[0], pixels(same)[0])


# --- LoRA ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from builder.tiny_lora import write_test_loras

    folder = tmp_path_factory.mktemp("loras")
    write_test_loras(tiny_model_dir, folder, count=2)
    return folder


def _lora_devices(engine: Engine, adapter: str | None = None) -> set[str]:
    """The devices of every LoRA weight in the UNet and the text encoder (of one adapter, when named)."""
    pipeline = engine._pipeline
    return {
        parameter.device.type
        for model in (pipeline.unet, pipeline.text_encoder)
        for module in model.modules()
        for table in ("lora_A", "lora_B")
        if isinstance(getattr(module, table, None), torch.nn.ModuleDict)
        for name, layer in getattr(module, table).items()
        if adapter is None or name == adapter
        for parameter in layer.parameters()
    }


@pytest.mark.parametrize("profile", ["high", "balanced", "low"])
def test_loras_in_float16_change_only_their_jobs(tiny_model_dir: Path, lora_dir: Path, profile: str) -> None:
    """LoRAs on CUDA in float16, in each profile: they change the image, a plain job after them is
    the same as before, and (without offloading) cached adapters wait in host memory between jobs, and during a
    job that loads another LoRA (diffusers' loader moves the text encoder whole to the GPU)."""
    engine = load_engine(tiny_model_dir, LORA_DIR=str(lora_dir), MEMORY_PROFILE=profile)
    first, second = engine.loras.names
    plain = pixels(generate(engine))[0]
    one = pixels(generate(engine, loras=[{"name": first}]))[0]
    waiting = engine.loras._state.cached[first].adapter
    during: list[set[str]] = []
    watch = engine._pipeline.unet.register_forward_pre_hook(
        lambda _module, _args: during.append(_lora_devices(engine, waiting))
    )
    other = pixels(generate(engine, loras=[{"name": second}]))[0]
    watch.remove()
    both = pixels(generate(engine, loras=[{"name": first}, {"name": second, "scale": 0.5}]))[0]
    after = pixels(generate(engine))[0]
    assert np.array_equal(plain, after)
    assert np.abs(one - plain).max() > 0
    assert np.abs(other - plain).max() > 0
    assert np.abs(both - one).max() > 0
    assert engine.loras.cached == [first, second]
    if profile != "low":
        assert _lora_devices(engine) == {"cpu"}
        assert during, "the UNet ran"
        assert all(devices == {"cpu"} for devices in during), "the first LoRA waits while the second runs"


def test_a_single_file_checkpoint_on_the_gpu_matches_its_folder(tmp_path: Path) -> None:
    """The tiny model written as one checkpoint, converted at startup, gives the folder's pixels in float16;
    a VAE file changes them."""
    from builder.tiny_model import CHECKPOINT_FILE, VAE_FILE, write_tiny_model

    folder = write_tiny_model(tmp_path / "tiny", single_file=True)
    checkpoint = {"MODEL_CONFIG": str(folder), "MODEL_DIR": str(tmp_path / "none")}
    from_folder = pixels(generate(load_engine(folder), seed=3))
    from_file = pixels(generate(load_engine(folder / CHECKPOINT_FILE, **checkpoint), seed=3))
    with_vae = pixels(
        generate(load_engine(folder / CHECKPOINT_FILE, VAE_ID=str(folder / VAE_FILE), **checkpoint), seed=3)
    )

    assert all(np.array_equal(a, b) for a, b in zip(from_folder, from_file, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(from_folder, with_vae, strict=True))


@pytest.mark.parametrize("profile", ["high", "low"])
def test_models_swapped_in_place_on_the_gpu_give_a_fresh_workers_pixels(
    tiny_model_dir: Path, tmp_path: Path, profile: str
) -> None:
    """MODELS_DIR's models swapped into the modules on CUDA (and, with "low", into the offloaded modules): from
    pinned host memory, A -> B -> A gives A's pixels, and each model's equal a worker's started with it."""
    from builder.tiny_model import write_tiny_models

    models = write_tiny_models(tmp_path / "models")
    engine = load_engine(
        tiny_model_dir, MODELS_DIR=str(models), MODEL_CONFIG=str(tiny_model_dir), MEMORY_PROFILE=profile
    )
    first = {name: pixels(generate(engine, model=name)) for name in ("tiny-a", "tiny-c")}
    default = pixels(generate(engine))
    again = pixels(generate(engine, model="tiny-a"))
    fresh = pixels(
        generate(load_engine(models / "tiny-a.safetensors", MODEL_CONFIG=str(tiny_model_dir), MEMORY_PROFILE=profile))
    )

    assert all(np.array_equal(a, b) for a, b in zip(first["tiny-a"], again, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(first["tiny-a"], fresh, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first["tiny-a"], default, strict=True))
    assert engine.models.reads == {"tiny-a": 1, "tiny-c": 1}
    cached = engine.models._cache["tiny-a"].parts["unet"].values()
    assert all(tensor.is_pinned() for tensor in cached), "the host cache is pinned, for fast copies to the GPU"


def test_hires_through_esrgan_family_upscalers_in_float16(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The builder's tiny RRDB and compact models through spandrel on CUDA, in float16 (both support it), as a
    hires pass's upscaler. Needs spandrel, einops and the torchvision that matches the machine's torch in
    .gpu/wheels (../shared/gpu/README.md); skipped, saying so, without them."""
    try:
        import spandrel  # noqa: F401
    except Exception as error:  # absent, or a torchvision that does not match torch
        pytest.skip(f"spandrel cannot be imported here ({type(error).__name__}: {error})")
    from builder.tiny_upscalers import write_tiny_upscalers

    folder = write_tiny_upscalers(tmp_path / "upscalers")
    engine = load_engine(tiny_model_dir, UPSCALER_DIR=str(folder))
    for name in ("tiny-esrgan-4x", "tiny-compact-2x"):
        generation = generate(engine, width=64, height=64, hires={"scale": 2.0, "steps": 2, "upscaler": name})
        assert generation.images[0].size == (128, 128)
        assert np.asarray(generation.images[0]).std() > 0, "not a blank image"
    assert {str(model.dtype) for model in engine.upscalers._cache.values()} == {"torch.float16"}


def test_an_upscale_job_in_float16_on_the_gpu_matches_the_cpu_in_float32(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The upscale task on CUDA: the builder's tiny RRDB and compact models in float16, in tiles of 64 (several
    per image), against the same job on the CPU in float32: within 2 grey levels on average (float16 rounding).
    Needs spandrel in the kit, as the hires case above; skipped, saying so, without it."""
    try:
        import spandrel  # noqa: F401
    except Exception as error:  # absent, or a torchvision that does not match torch
        pytest.skip(f"spandrel cannot be imported here ({type(error).__name__}: {error})")
    import base64
    import io

    from PIL import Image

    from builder.tiny_upscalers import write_tiny_upscalers
    from src.prepare.upscale import prepare_upscale
    from src.run.upscale import upscale_job

    folder = write_tiny_upscalers(tmp_path / "upscalers")
    variables = {"UPSCALER_DIR": str(folder), "UPSCALE_TILE": "64", "UPSCALE_TILE_OVERLAP": "16"}
    gpu = load_engine(tiny_model_dir, **variables)
    cpu = Engine.load(load_settings({"MODEL_ID": str(tiny_model_dir), "DEVICE": "cpu", **variables}))
    buffer = io.BytesIO()
    pixels_in = np.random.default_rng(3).integers(0, 256, (96, 160, 3), dtype=np.uint8)
    Image.fromarray(pixels_in, "RGB").save(buffer, format="PNG")
    photo = base64.b64encode(buffer.getvalue()).decode()

    def upscale(engine: Engine, name: str) -> tuple[np.ndarray, str | None]:
        job = {"input": {"task": "upscale", "image": photo, "upscaler": name, "scale": 2}}
        plan = prepare_upscale(job, engine.settings, catalog=lambda: engine.catalog, storage=None)
        result = upscale_job(engine, plan, timeout_s=120)
        return np.asarray(result.image, dtype=np.float32), result.dtype

    for name in ("tiny-esrgan-4x", "tiny-compact-2x"):
        (on_gpu, dtype), (on_cpu, _) = upscale(gpu, name), upscale(cpu, name)
        assert on_gpu.shape == (192, 320, 3)
        assert dtype == "float16"
        assert np.abs(on_gpu - on_cpu).mean() < 2.0, name


@pytest.mark.parametrize("profile", ["high", "balanced", "low"])
def test_controlnet_units_in_float16_change_only_their_jobs(tmp_path: Path, profile: str) -> None:
    """One and two units on the GPU; the ControlNets stay on it between jobs, but with model offload ("low"), and
    CONTROLNET_PRELOAD's wait where a job's would."""
    import base64
    import io

    from PIL import Image

    from builder.tiny_model import write_tiny_controlnets, write_tiny_model
    from src.prepare.inputs import prepare_inputs

    folder = write_tiny_model(tmp_path / "tiny")
    write_tiny_controlnets(folder)
    engine = load_engine(
        folder,
        MEMORY_PROFILE=profile,
        CONTROLNET_DIR=str(folder / "controlnets"),
        CONTROLNET_PRELOAD="tiny-controlnet-b",
    )
    waits = "cpu" if profile == "low" else "cuda"
    assert next(engine.controlnets._loaded["tiny-controlnet-b"].parameters()).device.type == waits, "preloaded"
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buffer, format="PNG")
    control = base64.b64encode(buffer.getvalue()).decode()

    def run(*names: str) -> list[np.ndarray]:
        units = [{"model": name, "image": control} for name in names]
        inputs = prepare_inputs(request_for(engine, controlnets=units), engine.settings, None)
        return pixels(engine.generate(inputs.request, controls=inputs.controls, timeout_s=120))

    plain = run()
    one = run("tiny-controlnet")
    two = run("tiny-controlnet", "tiny-controlnet-b")

    assert not np.array_equal(one[0], plain[0])
    assert not np.array_equal(two[0], one[0])
    assert np.array_equal(run()[0], plain[0])
    devices = {str(next(net.parameters()).device.type) for net in engine.controlnets._loaded.values()}
    assert devices == {waits}


def test_a_job_that_fits_only_without_the_cached_controlnets_runs_whole_without_them(tmp_path: Path) -> None:
    """A ControlNet the cache keeps on the card goes to host memory for a job that fits whole only without it, and
    waits there until a job uses it, which brings it back."""
    from builder.tiny_model import write_tiny_controlnets, write_tiny_model
    from src.errors import AdmissionError
    from src.prepare import prepare
    from src.run.engine import _admit, _plan
    from src.run.memory import Plan

    folder = write_tiny_model(tmp_path / "tiny")
    write_tiny_controlnets(folder)
    engine = load_engine(
        folder,
        MEMORY_PROFILE="balanced",
        CONTROLNET_DIR=str(folder / "controlnets"),
        CONTROLNET_PRELOAD="tiny-controlnet",
    )
    net = engine.controlnets._loaded["tiny-controlnet"]
    job = {"input": {"prompt": "a fox", "num_inference_steps": 2, "seed": 3, "num_images": 2}}
    plan = prepare(job, engine.settings, catalog=lambda: engine.catalog, storage=None)
    low, high = 1, 64 * 2**30  # the least memory in which the job runs whole without the cached ControlNet
    while high - low > 1:
        engine.gpu_bytes = (low + high) // 2
        try:
            fits = _plan(engine, plan, cached=False) == Plan(2)
        except AdmissionError:
            fits = False
        low, high = (low, engine.gpu_bytes) if fits else (engine.gpu_bytes, high)
    engine.gpu_bytes = high
    assert _admit(engine, plan) == (Plan(2), True)

    result = engine.generate(request_for(engine, num_images=2, num_inference_steps=2), timeout_s=120)

    assert len(result.images) == 2
    assert next(net.parameters()).device.type == "cpu", "it waits in host memory"
    assert _admit(engine, plan) == (Plan(2), False)
    control = {"model": "tiny-controlnet", "image": _white_png()}
    from src.prepare.inputs import prepare_inputs

    inputs = prepare_inputs(request_for(engine, controlnets=[control]), engine.settings, None)
    engine.gpu_bytes = 64 * 2**30
    engine.generate(inputs.request, controls=inputs.controls, timeout_s=120)
    assert next(net.parameters()).device.type == "cuda", "a job used it: back on the card"


def _white_png() -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# --- CPU offload: LoRAs that fail to load, and what stays on the GPU between jobs ------------------------------


def _unet_input_devices(engine: Engine) -> list[str]:
    """The device of each UNet call's latents, through a forward pre-hook."""
    devices: list[str] = []
    engine._pipeline.unet.register_forward_pre_hook(lambda _module, args: devices.append(args[0].device.type))
    return devices


@pytest.mark.parametrize("profile", ["low", "minimal"])
@pytest.mark.parametrize("misfit", ["wider-text-encoder", "unequal-ranks"])
def test_a_lora_that_fails_to_load_leaves_the_offload_in_place(
    tiny_model_dir: Path, tmp_path: Path, profile: str, misfit: str
) -> None:
    """diffusers' LoRA loaders take accelerate's offload hooks off and put them back only after a load that
    succeeded: a failed one left the models without hooks, and every later job failed ("Expected all tensors
    to be on the same device") or ran on the CPU. A file whose shapes do not fit is refused before the loader
    runs; one PEFT refuses (ranks that disagree) is refused after it, and the profile's offload is put back.
    The plain job after it must run its UNet on the GPU."""
    from builder.tiny_lora import build_lora_state_dict, save_lora, write_test_loras
    from src.errors import AdapterError

    write_test_loras(tiny_model_dir, tmp_path, count=1)
    engine = load_engine(tiny_model_dir, LORA_DIR=str(tmp_path), MEMORY_PROFILE=profile)
    pipeline = engine._pipeline
    state = build_lora_state_dict(pipeline.unet, pipeline.text_encoder, rank=4, seed=7)
    if misfit == "wider-text-encoder":
        state = {
            key: torch.randn(value.shape[0], value.shape[1] + 1)
            if key.startswith("text_encoder.") and ".lora_A." in key
            else value.float().cpu()
            for key, value in state.items()
        }
    else:
        state = {key: value.float().cpu() for key, value in state.items()}
        up = next(key for key in state if key.startswith("unet.") and ".lora_B." in key)
        state[up] = state[up][:, :3]
    save_lora(state, tmp_path / f"{misfit}.safetensors")
    engine = load_engine(tiny_model_dir, LORA_DIR=str(tmp_path), MEMORY_PROFILE=profile)
    plain = pixels(generate(engine))[0]

    with pytest.raises(AdapterError, match=r"cannot be loaded into this SD 1\.5 model"):
        generate(engine, loras=[{"name": misfit}])
    devices = _unet_input_devices(engine)
    after = pixels(generate(engine))[0]
    with_lora = generate(engine, loras=[{"name": "tiny-peft-0"}])

    assert devices
    assert set(devices) == {"cuda"}, devices
    assert np.array_equal(after, plain)
    assert np.abs(pixels(with_lora)[0] - plain).max() > 0
    assert set(devices) == {"cuda"}, "the LoRA job ran on the GPU too"


def test_the_low_profile_leaves_no_model_on_the_gpu_between_jobs(tiny_model_dir: Path) -> None:
    """The per-request pipelines never run diffusers' maybe_free_model_hooks: the VAE, which runs last, stayed
    on the GPU through the next job's denoising, beside the UNet that admission counted alone. Now every model
    goes back to host memory after each job, and a text-to-image job's UNet denoises alone."""
    engine = load_engine(tiny_model_dir, MEMORY_PROFILE="low")
    pipeline = engine._pipeline
    beside: list[set[str]] = []

    def record(_module: object, _args: object, _output: object) -> None:
        beside.append({name for name in ("text_encoder", "vae") if next(getattr(pipeline, name).parameters()).is_cuda})

    generate(engine)
    on_gpu = {name for name in ("text_encoder", "unet", "vae") if next(getattr(pipeline, name).parameters()).is_cuda}
    pipeline.unet.register_forward_hook(record)
    generate(engine)

    assert on_gpu == set()
    assert beside
    assert all(models == set() for models in beside), beside


# --- a CUDA error that breaks the GPU -------------------------------------------------------------------------

# Run in a child process: after a device-side assert no CUDA call of that process works again.
_DEVICE_SIDE_ASSERT_JOB = """
import asyncio, json, os, sys, torch, handler

conv_out = handler.get_engine()._pipeline.unet.conv_out

def out_of_range(_module, _inputs, output):
    # index_select checks its indices on the device: past the end is a device-side assert. The output keeps its
    # batch (the pipeline splits it in two for guidance), and the assert is raised here, at the synchronization,
    # as torch.AcceleratorError "CUDA error: device-side assert triggered" (the next kernel could word it as
    # cuBLAS or cuDNN does).
    index = torch.full((output.shape[0],), output.shape[0] + 1000, device=output.device)
    broken = output.index_select(0, index)
    torch.cuda.synchronize()
    return broken

conv_out.register_forward_hook(out_of_range)
job = {"prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 1}
first = asyncio.run(handler.handler({"id": "assert-1", "input": job}))
second = asyncio.run(handler.handler({"id": "assert-2", "input": job}))
try:
    (torch.ones(1, device="cuda") + 1).cpu()
    still_broken = False
except RuntimeError:
    still_broken = True
print(json.dumps({"first": first, "second": second, "still_broken": still_broken}))
sys.stdout.flush()
os._exit(0)  # no CUDA teardown in a broken context
"""


def test_a_real_device_side_assert_is_answered_and_asks_for_a_new_worker(offline_env: dict[str, str]) -> None:
    """A real device-side assert (an out-of-range ``index_select`` in a UNet hook) inside a job, in a child
    process: the job is answered with the CUDA error and ``refresh_worker``, which runpod turns into
    ``stopPod`` (tests/test_resilience.py drives runpod's loop on the CPU with the same errors injected),
    and the next job is refused without touching the GPU. The child also checks the premise: after the
    assert even ``torch.ones(1, device="cuda") + 1`` fails, so only a new process could serve again.
    """
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    result = subprocess.run(
        [sys.executable, "-c", _DEVICE_SIDE_ASSERT_JOB],
        cwd=ROOT,
        env={**offline_env, "DEVICE": "cuda"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    assert answers["still_broken"], "the premise: a device-side assert breaks every later CUDA call"
    first, second = answers["first"], answers["second"]
    assert set(first) == {"error", "refresh_worker"}, first
    assert first["refresh_worker"] is True
    assert "device-side assert triggered" in first["error"]
    assert set(second) == {"error", "refresh_worker"}, second
    assert second["error"].startswith("not run: an earlier job on this worker broke its GPU")


# --- FAST_MODE: the UNet compiled whole and replayed as CUDA graphs (last: the compiles take the longest) ----


@pytest.fixture(scope="module")
def fast_engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """FAST_MODE in the high profile, with LoRAs (hot-swap slots), ControlNets and MODELS_DIR's models."""
    from builder.tiny_lora import write_test_loras
    from builder.tiny_model import write_tiny_controlnets, write_tiny_model, write_tiny_models

    root = tmp_path_factory.mktemp("fast")
    folder = write_tiny_model(root / "tiny")
    write_tiny_controlnets(folder)
    write_test_loras(folder, root / "loras", count=2)
    models = write_tiny_models(root / "models")
    variables = {"LORA_DIR": str(root / "loras"), "CONTROLNET_DIR": str(folder / "controlnets")}
    return load_engine(folder, FAST_MODE="true", MODELS_DIR=str(models), MODEL_CONFIG=str(folder), **variables)


def fast_job(engine: Engine, **fields: object) -> list[np.ndarray]:
    """A job's pixels through FAST_MODE's compiled modules, its ControlNet images decoded as prepare does."""
    from src.prepare.inputs import prepare_inputs

    inputs = prepare_inputs(request_for(engine, **fields), engine.settings, None)
    return pixels(engine.generate(inputs.request, controls=inputs.controls, timeout_s=120))


def as_written(engine: Engine, **fields: object) -> list[np.ndarray]:
    """The same job with the modules as written: the default path's pixels."""
    from src.run.fast_path import compiled_modules, uncompiled

    with uncompiled(*compiled_modules(engine._pipeline)):
        return fast_job(engine, **fields)


def grey_levels(first: list[np.ndarray], second: list[np.ndarray]) -> float:
    return float(np.mean([np.abs(a - b).mean() for a, b in zip(first, second, strict=True)]))


def control_image() -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_fast_mode_replays_cuda_graphs_within_a_grey_level_of_the_default_path(fast_engine: Engine) -> None:
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    from src.run.fast_path import CompiledCall

    unet_call = fast_engine._pipeline.unet._compiled_call_impl
    assert isinstance(unet_call, CompiledCall)
    assert unet_call.graphs, "the high profile replays the UNet as CUDA graphs"
    kinds = {"default": {}, "batch": {"num_images": 2, "width": 128}, "no CFG": {"guidance_scale": 1.0}}
    kinds["hires"] = {"hires": {"scale": 1.5, "steps": 2}}
    # Two chunks against the empty negative's one: the cross-attention mask, one more input of the graphs.
    kinds["a longer prompt"] = {"prompt": "a lighthouse BREAK on a rock"}
    for name, fields in kinds.items():
        compiled = fast_job(fast_engine, **fields)
        assert grey_levels(compiled, as_written(fast_engine, **fields)) <= 1.0, name
        assert all(np.array_equal(a, b) for a, b in zip(compiled, fast_job(fast_engine, **fields), strict=True))
    graphs = counters["stats"]["unique_graphs"]
    fast_job(fast_engine, num_images=3, width=192, height=128)
    assert counters["stats"]["unique_graphs"] == graphs, "a new size and batch replay the dynamic graphs"
    assert cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False) is not None
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


def test_fast_mode_keeps_loras_controlnets_and_model_swaps_working(fast_engine: Engine) -> None:
    from torch._dynamo.utils import counters

    first, second = fast_engine.loras.names
    plain = fast_job(fast_engine)
    one = fast_job(fast_engine, loras=[{"name": first}])
    assert grey_levels(one, as_written(fast_engine, loras=[{"name": first}])) <= 1.0
    graphs = counters["stats"]["unique_graphs"]
    other = fast_job(fast_engine, loras=[{"name": second, "scale": 0.5}])
    assert counters["stats"]["unique_graphs"] == graphs, "another LoRA hot-swaps into the compiled UNet's slot"
    assert grey_levels(other, as_written(fast_engine, loras=[{"name": second, "scale": 0.5}])) <= 1.0
    assert grey_levels(one, plain) > 0

    unit = [{"model": "tiny-controlnet", "image": control_image()}]
    controlled = fast_job(fast_engine, controlnets=unit)
    assert grey_levels(controlled, as_written(fast_engine, controlnets=unit)) <= 1.0
    assert grey_levels(controlled, plain) > 0

    swapped = fast_job(fast_engine, model="tiny-a")
    assert grey_levels(swapped, as_written(fast_engine, model="tiny-a")) <= 1.0
    assert grey_levels(swapped, plain) > 0
    assert all(np.array_equal(a, b) for a, b in zip(fast_job(fast_engine), plain, strict=True)), "back to default"


def test_fast_mode_in_the_balanced_profile_compiles_without_cuda_graphs(tiny_model_dir: Path) -> None:
    from src.run.fast_path import CompiledCall

    engine = load_engine(tiny_model_dir, FAST_MODE="true", MEMORY_PROFILE="balanced")
    unet_call = engine._pipeline.unet._compiled_call_impl
    assert isinstance(unet_call, CompiledCall)
    assert not unet_call.graphs
    fields = {"num_images": 2, "width": 128}
    assert grey_levels(fast_job(engine, **fields), as_written(engine, **fields)) <= 1.0


def test_fast_mode_keeps_its_compiled_kernels_and_a_second_engine_loads_them(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "compile-cache"
    first = load_engine(tiny_model_dir, FAST_MODE="true", COMPILE_CACHE_DIR=str(folder))
    [kept] = folder.iterdir()
    assert kept.name.startswith("nvidia-") or "-sm" in kept.name
    assert kept.stat().st_size > 0
    pixels = generate(first).images[0].tobytes()
    del first
    second = load_engine(tiny_model_dir, FAST_MODE="true", COMPILE_CACHE_DIR=str(folder))
    assert list(folder.iterdir()) == [kept]
    assert generate(second).images[0].tobytes() == pixels
