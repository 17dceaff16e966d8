"""Many models on one worker: MODELS_DIR scanned by name, the model chosen per request and swapped in place.

The tiny builder's models (``builder.tiny_model.write_tiny_models``: two single files, one in a subfolder, and a
diffusers folder, each with weights of its own) beside files that are not SD 1.5 checkpoints. Every model's
image is compared with the image of a fresh worker started with that model as MODEL_ID.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import handler
from builder import single_file
from builder.tiny_lora import write_test_loras
from builder.tiny_model import MODELS, build_tiny_vae, write_tiny_controlnets, write_tiny_models
from src.errors import ModelLoadError
from src.models.library import scan_models
from src.run.models import machine_memory_bytes
from src.settings import Settings
from tests.conftest import rss_bytes
from tests.test_checkpoints import write_sdxl, write_truncated
from tests.test_same_bytes import CONTROL, IMAGE, MASK

JOB = {"prompt": "a lighthouse", "num_inference_steps": 2, "seed": 7, "width": 64, "height": 64}
NAMES = ["tiny-a", "styles/tiny-b", "tiny-c"]


# The same-bytes jobs' input image, mask and control image.
TASKS = {
    "txt2img": {},
    "img2img": {"image": IMAGE, "strength": 0.7},
    "inpaint": {"image": IMAGE, "mask": MASK},
    "hires": {"hires": {"scale": 1.5, "steps": 2}},
    "lora": {"loras": [{"name": "tiny-peft-0", "scale": 0.8}]},
    "controlnet": {"controlnets": [{"model": "tiny-controlnet", "image": CONTROL}]},
}


@pytest.fixture(scope="module")
def volume(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A volume: MODELS_DIR (``models/``, with files that are not SD 1.5 checkpoints), LoRAs and ControlNets."""
    root = tmp_path_factory.mktemp("volume")
    models = write_tiny_models(root / "models")
    write_sdxl(models / "xl.safetensors")
    write_truncated(models / "cut.safetensors", models / "tiny-a.safetensors")
    write_test_loras(tiny_model_dir, root / "loras", count=1)
    shutil.copy(root / "loras" / "tiny-peft-0.safetensors", models / "a-lora.safetensors")
    # write_tiny_controlnets copies the model's UNet; a link keeps the shared model folder untouched.
    (root / "unet").symlink_to(tiny_model_dir / "unet", target_is_directory=True)
    write_tiny_controlnets(root)
    (root / "vaes").mkdir()
    single_file.save(
        single_file.vae_state_dict(build_tiny_vae(seed=5), prefix=""), root / "vaes" / "tiny-vae.safetensors"
    )
    shutil.copy(models / "tiny-a.safetensors", root / "vaes" / "not-a-vae.safetensors")
    return root


@pytest.fixture
def start(tiny_model_dir: Path, volume: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Start a fresh worker on these variables: the tiny model, MODELS_DIR, the LoRAs and ControlNets, unless
    ``variables`` says otherwise (None removes one)."""

    def start_worker(**variables: str | None) -> None:
        for field in Settings.model_fields.values():
            monkeypatch.delenv(str(field.alias), raising=False)
        defaults: dict[str, str | None] = {
            "MODEL_ID": str(tiny_model_dir),
            "MODEL_CONFIG": str(tiny_model_dir),
            "MODELS_DIR": str(volume / "models"),
            "LORA_DIR": str(volume / "loras"),
            "CONTROLNET_DIR": str(volume / "controlnets"),
            "VAE_DIR": str(volume / "vaes"),
            "EMBED_PARAMETERS": "false",
        }
        for name, value in {**defaults, **variables}.items():
            if value is not None:
                monkeypatch.setenv(name, value)
        monkeypatch.setattr(handler, "_settings", None)
        monkeypatch.setattr(handler, "_engine", None)

    return start_worker


def run(model: str | None = None, **fields: Any) -> dict[str, Any]:
    job = {**JOB, **fields, **({"model": model} if model is not None else {})}
    job = {key: value for key, value in job.items() if value is not None}
    return asyncio.run(handler.handler({"id": "models-test", "input": job}))


def image_bytes(result: dict[str, Any]) -> bytes:
    assert "error" not in result, result
    return base64.b64decode(result["images"][0]["image"])


def pixels(result: dict[str, Any]) -> bytes:
    with Image.open(io.BytesIO(image_bytes(result))) as image:
        return image.convert("RGB").tobytes()


def test_the_scan_names_models_by_path_without_extension_and_says_why_others_are_not_served(
    start: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    start()
    with caplog.at_level("WARNING"):
        entries = handler.get_engine().models.entries

    usable = sorted(name for name, entry in entries.items() if entry.problem is None)
    assert usable == sorted(NAMES)
    assert "an SDXL checkpoint" in str(entries["xl"].problem)
    assert "cut short" in str(entries["cut"].problem)
    assert "a LoRA" in str(entries["a-lora"].problem)
    assert all(f"MODELS_DIR: {name} is not served" in caplog.text for name in ("xl", "cut", "a-lora"))


def test_a_to_b_to_a_gives_a_s_exact_bytes_and_the_default_stays_the_default(start: Callable[..., None]) -> None:
    start()
    default = image_bytes(run())
    first = {name: image_bytes(run(name)) for name in NAMES}
    # A LoRA's layers in the modules when the next model is swapped in: they stay, and take nothing of it along.
    assert "images" in run("tiny-a", **TASKS["lora"])
    again = {name: image_bytes(run(name)) for name in reversed(NAMES)}

    assert again == first
    assert image_bytes(run()) == default
    assert len({default, *first.values()}) == 4, "each model draws its own image"
    assert handler.get_engine().models.reads == dict.fromkeys(NAMES, 1), "each model read once, then cached"


@pytest.mark.parametrize("name", NAMES)
def test_every_task_on_a_swapped_in_model_gives_the_image_of_a_worker_started_with_it(
    start: Callable[..., None], volume: Path, name: str
) -> None:
    start()
    run("tiny-c" if name != "tiny-c" else "tiny-a")  # another model in the modules first
    swapped = {task: pixels(run(name, **fields)) for task, fields in TASKS.items()}

    path = volume / "models" / (name if name in MODELS else f"{name}.safetensors")
    start(MODEL_ID=str(path), MODELS_DIR=None)
    fresh = {task: pixels(run(None, **fields)) for task, fields in TASKS.items()}

    assert swapped == fresh


def test_fused_qkv_projections_hold_the_swapped_in_models_weights(start: Callable[..., None], volume: Path) -> None:
    """FAST_MODE fuses the attention's QKV projections (without LORA_DIR): a swap copies into the fused ones too.
    That its compiled UNet compiles nothing again on a swap is tests/test_fast_path.py's."""
    start(LORA_DIR=None)
    handler.get_engine()._pipeline.fuse_qkv_projections()
    swapped = pixels(run("tiny-a"))

    start(MODEL_ID=str(volume / "models" / "tiny-a.safetensors"), MODELS_DIR=None, LORA_DIR=None)
    handler.get_engine()._pipeline.fuse_qkv_projections()
    assert pixels(run()) == swapped


def test_the_response_and_parameters_name_the_model_as_a1111_does(start: Callable[..., None], volume: Path) -> None:
    start(EMBED_PARAMETERS="true")
    digest = hashlib.sha256((volume / "models" / "styles" / "tiny-b.safetensors").read_bytes()).hexdigest()

    result = run("styles/tiny-b")
    folder = run("tiny-c")

    assert (result["metadata"]["model"], result["metadata"]["model_hash"]) == ("styles/tiny-b", digest[:10])
    with Image.open(io.BytesIO(image_bytes(result))) as image:
        assert f"Model: styles/tiny-b, Model hash: {digest[:10]}" in image.text["parameters"]
    assert folder["metadata"]["model"] == "tiny-c"
    assert "model_hash" not in folder["metadata"]


@pytest.mark.parametrize(
    ("model", "says"),
    [
        ("../x", "model='../x': a name from MODELS_DIR"),
        ("/models/tiny-a.safetensors", "model='/models/tiny-a.safetensors': a name from MODELS_DIR, not a path"),
        ("https://example.com/m.safetensors", "this worker downloads no files: DOWNLOAD_HOSTS is not set"),
        ("ftp://example.com/m.safetensors", "a name from MODELS_DIR, not a URL"),
        ("xl", "model='xl': xl.safetensors cannot be used: an SDXL checkpoint"),
        ("cut", "model='cut': cut.safetensors cannot be used: the file is cut short"),
        ("a-lora", "model='a-lora': a-lora.safetensors cannot be used: a LoRA"),
        ("tiny-z", "model='tiny-z': not a model in MODELS_DIR; the closest are"),
    ],
)
def test_a_refused_model_names_the_field_and_the_next_job_works(
    start: Callable[..., None], model: str, says: str
) -> None:
    start()
    refused = run(model)

    assert says in refused["error"]
    assert "images" in run("tiny-a")


def test_a_model_removed_after_the_scan_is_refused_and_the_modules_keep_their_model(
    start: Callable[..., None], volume: Path, tmp_path: Path
) -> None:
    moved = tmp_path / "models"
    shutil.copytree(volume / "models", moved)
    start(MODELS_DIR=str(moved))
    before = image_bytes(run("tiny-c"))
    (moved / "tiny-a.safetensors").unlink()

    refused = run("tiny-a")

    assert "model='tiny-a': its file is no longer in MODELS_DIR" in refused["error"]
    assert image_bytes(run("tiny-c")) == before


def test_a_swap_under_sequential_offload_is_refused_before_anything_is_read(start: Callable[..., None]) -> None:
    """The minimal profile's sequential CPU offload (a GPU's, under 3.5 GiB) keeps the weights in accelerate's hooks
    and leaves the modules' own on the meta device: a model or a VAE to swap in is refused, naming it, before its
    file is read or the default model's weights are copied."""
    from accelerate import cpu_offload

    start()
    engine = handler.get_engine()
    before = image_bytes(run())
    for part in ("unet", "text_encoder", "vae"):  # what diffusers' enable_sequential_cpu_offload does, on the CPU
        cpu_offload(getattr(engine._pipeline, part), execution_device=torch.device("cpu"))

    refused = {"model": run("tiny-a"), "vae": run(vae="tiny-vae")}

    says = "another model cannot be swapped in while sequential CPU offload holds the weights"
    assert f"model='tiny-a': {says}" in refused["model"]["error"]
    assert f"vae='tiny-vae': {says}" in refused["vae"]["error"]
    assert engine.models.cached == [], "nothing read"
    assert image_bytes(run()) == before, "the default model, offloaded, still serves"


def test_model_without_models_dir_is_refused(start: Callable[..., None]) -> None:
    start(MODELS_DIR=None)

    refused = run("tiny-a")

    assert "model='tiny-a': this worker serves its default model only: MODELS_DIR is not set" in refused["error"]
    assert "images" in run()


@pytest.fixture
def four_models(tmp_path: Path) -> Path:
    """The builder's three models and a fourth, a copy of the first under another name."""
    folder = tmp_path / "models"
    write_tiny_models(folder)
    shutil.copy(folder / "tiny-a.safetensors", folder / "tiny-d.safetensors")
    return folder


def test_sixty_jobs_cycling_four_models_with_a_cache_for_two_keep_memory_bounded_and_the_lru_order(
    start: Callable[..., None], four_models: Path
) -> None:
    names = [*NAMES, "tiny-d"]
    start(MODELS_DIR=str(four_models))
    models = handler.get_engine().models
    run(names[0])
    one_model = sum(tensor.nbytes for part in models._cache[names[0]].parts.values() for tensor in part.values())
    # Room for two models, not three: MODEL_CACHE_RAM_MB in whole MiB.
    start(MODELS_DIR=str(four_models), MODEL_CACHE_RAM_MB=str((one_model * 5 // 2) >> 20 or 1))
    models = handler.get_engine().models
    assert 2 * one_model <= models.cache_bytes < 3 * one_model

    for index in range(8):
        assert "images" in run(names[index % 4])
    settled = rss_bytes()
    for index in range(8, 60):
        assert "images" in run(names[index % 4])
    grown = rss_bytes() - settled

    assert models.cached == names[2:], "the two most recently used, the last last"
    assert grown < 3 * one_model + (24 << 20), f"RSS grew {grown >> 20} MiB over 52 jobs"
    reads = dict(models.reads)
    run(names[3])  # cached: no file read
    assert dict(models.reads) == reads


def test_the_describe_job_lists_what_the_worker_has_without_the_gpu(start: Callable[..., None], volume: Path) -> None:
    start()
    engine = handler.get_engine()
    run("tiny-a")
    digest = hashlib.sha256((volume / "models" / "tiny-a.safetensors").read_bytes()).hexdigest()

    # Another job holds the GPU meanwhile: the describe job does not wait for it.
    with engine._lock:
        answer = asyncio.run(handler.handler({"id": "describe", "input": {"describe": True}}))["describe"]

    models = {entry["name"]: entry for entry in answer["models"]}
    assert [entry["default"] for entry in answer["models"]] == [True, False, False, False]
    assert answer["models"][0]["name"] == engine.identity.name
    assert models["tiny-a"] == {"name": "tiny-a", "hash": digest[:10], "default": False, "cached": True}
    assert models["tiny-c"] == {"name": "tiny-c", "hash": None, "default": False, "cached": False}
    assert {entry["name"] for entry in answer["refused"] if entry["kind"] == "model"} == {"xl", "cut", "a-lora"}
    assert answer["loras"] == ["tiny-peft-0"]
    assert "tiny-controlnet" in answer["controlnets"]
    assert {"name": "Euler a", "aliases": ["euler_ancestral", "k_euler_a", "k_euler_ancestral"]} in answer["schedulers"]
    assert answer["hires_upscalers"] == ["latent", "lanczos"]
    assert "latent-nearest-exact" in answer["hires_latent_variants"]
    assert answer["limits"]["max_side"] == engine.settings.max_side
    assert (answer["device"], answer["memory_profile"]) == ("cpu", "cpu")


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ({"describe": False}, "describe=False: must be true"),
        ({"describe": True, "prompt": "a fox"}, "describe: a describe job takes no other field; got prompt"),
    ],
)
def test_a_describe_job_with_anything_else_is_refused(
    start: Callable[..., None], given: dict[str, Any], says: str
) -> None:
    start()

    assert says in asyncio.run(handler.handler({"id": "describe", "input": given}))["error"]


def test_a_vae_of_vae_dir_replaces_the_models_own_for_the_job_only(start: Callable[..., None], volume: Path) -> None:
    start(EMBED_PARAMETERS="true")
    own = image_bytes(run("tiny-a"))
    with_vae = run("tiny-a", vae="tiny-vae")
    again = image_bytes(run("tiny-a"))
    digest = hashlib.sha256((volume / "vaes" / "tiny-vae.safetensors").read_bytes()).hexdigest()

    assert again == own, "the model's own VAE is back for the next job"
    assert image_bytes(with_vae) != own
    assert (with_vae["metadata"]["vae"], with_vae["metadata"]["vae_hash"]) == ("tiny-vae", digest[:10])
    with Image.open(io.BytesIO(image_bytes(with_vae))) as image:
        assert f"VAE: tiny-vae, VAE hash: {digest[:10]}" in image.text["parameters"]
    swapped = pixels(with_vae)
    start(MODEL_ID=str(volume / "models" / "tiny-a.safetensors"), VAE_ID=str(volume / "vaes" / "tiny-vae.safetensors"))
    assert pixels(run()) == swapped, "the image of a worker started with that model and VAE_ID"


@pytest.mark.parametrize(
    ("variables", "vae", "says"),
    [
        ({}, "tiny-vea", "vae='tiny-vea': not a VAE in VAE_DIR; the closest are tiny-vae"),
        ({}, "not-a-vae", "vae='not-a-vae': not-a-vae.safetensors cannot be used: a whole checkpoint, not a VAE"),
        ({"VAE_DIR": None}, "tiny-vae", "vae='tiny-vae': this worker uses each model's own VAE: VAE_DIR is not set"),
    ],
)
def test_a_refused_vae_names_the_field_and_the_next_job_works(
    start: Callable[..., None], variables: dict[str, str | None], vae: str, says: str
) -> None:
    start(**variables)

    assert says in run("tiny-a" if variables.get("VAE_DIR", "") is not None else None, vae=vae)["error"]
    assert "images" in run()


def test_models_preload_reads_them_at_startup_and_names_an_unknown_one(start: Callable[..., None]) -> None:
    start(MODELS_PRELOAD="tiny-c, styles/tiny-b")
    models = handler.get_engine().models

    assert models.cached == ["tiny-c", "styles/tiny-b"]
    assert "images" in run("tiny-c")
    assert models.reads == {"tiny-c": 1, "styles/tiny-b": 1}, "preloaded: no file read at the job"

    start(MODELS_PRELOAD="tiny-z")
    with pytest.raises(ModelLoadError, match="MODELS_PRELOAD names 'tiny-z', which is not a model in MODELS_DIR"):
        handler.get_engine()


def test_model_cache_ram_mb_above_what_the_machine_holds_is_refused(start: Callable[..., None]) -> None:
    total_mib = machine_memory_bytes() >> 20
    start(MODEL_CACHE_RAM_MB=str(total_mib))

    with pytest.raises(ModelLoadError, match=rf"MODEL_CACHE_RAM_MB={total_mib}: more than 80% of this machine's"):
        handler.get_engine()


HIRES = {"scale": 2, "steps": 2, "upscaler": "lanczos"}


def test_hires_model_runs_the_second_pass_on_its_own_model_and_prompts(
    start: Callable[..., None], volume: Path, tmp_path: Path
) -> None:
    """A1111's hr_checkpoint_name. The same weights under another name give the same bytes (the swap between the
    passes, the generators carried across it, the prompts encoded again by the same text encoder); another
    model's give another image; the next job is the job's model's again."""
    models = tmp_path / "models"
    shutil.copytree(volume / "models", models)
    shutil.copy(models / "tiny-a.safetensors", models / "tiny-a-copy.safetensors")
    start(MODELS_DIR=str(models), EMBED_PARAMETERS="true")
    plain = run("tiny-a", hires=HIRES)

    same_weights = run("tiny-a", hires={**HIRES, "model": "tiny-a-copy"})
    other = run("tiny-a", hires={**HIRES, "model": "tiny-c"})
    second_on_c = run("tiny-c", hires=HIRES)

    assert pixels(same_weights) == pixels(plain)
    assert handler.get_engine().models.reads["tiny-a-copy"] == 1, "swapped in for the second pass"
    assert len({pixels(plain), pixels(other), pixels(second_on_c)}) == 3
    assert (other["metadata"]["model"], other["metadata"]["hires"]["model"]) == ("tiny-a", "tiny-c")
    with Image.open(io.BytesIO(image_bytes(other))) as image:
        assert "Model: tiny-a, " in image.text["parameters"]
        assert "Hires checkpoint: tiny-c" in image.text["parameters"]
    assert image_bytes(run("tiny-a", hires=HIRES)) == image_bytes(plain)


@pytest.mark.parametrize(
    ("fields", "variables", "says"),
    [
        ({"model": "tiny-z"}, {}, "hires.model='tiny-z': not a model in MODELS_DIR; the closest are"),
        ({"model": "xl"}, {}, "hires.model='xl': xl.safetensors cannot be used: an SDXL checkpoint"),
        (
            {"model": "tiny-c", "loras": True},
            {},
            "hires.model='tiny-c': not with loras: a job's LoRAs apply to its model for both passes",
        ),
        (
            {"model": "tiny-c"},
            {"MODELS_DIR": None},
            "hires.model='tiny-c': this worker serves its default model only: MODELS_DIR is not set",
        ),
    ],
    ids=["unknown", "sdxl", "with-loras", "no-models-dir"],
)
def test_a_refused_hires_model_names_the_field_and_the_next_job_works(
    start: Callable[..., None], fields: dict[str, Any], variables: dict[str, str | None], says: str
) -> None:
    start(**variables)
    loras = TASKS["lora"] if fields.pop("loras", False) else {}

    refused = run(None, hires={**HIRES, **fields}, **loras)

    assert says in refused["error"], refused
    assert "images" in run(None, hires=HIRES)


def test_a_pickle_never_hides_a_safetensors_file_of_its_name(
    tiny_model_dir: Path, volume: Path, tmp_path: Path
) -> None:
    # A1111 folders often hold both (vae-ft-mse-840000.pt and .safetensors); .ckpt sorts first.
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(volume / "models" / "tiny-a.safetensors", folder / "dreamshaper_8.safetensors")
    (folder / "dreamshaper_8.ckpt").write_bytes(b"PK\x03\x04" + b"\0" * 64)

    [entry] = scan_models(folder, tiny_model_dir).values()

    assert entry.name == "dreamshaper_8"
    assert entry.path.suffix == ".safetensors"
    assert entry.problem is None


def _with_a_wrong_dtype(source: Path, target: Path, key: str) -> None:
    """``source`` with one tensor's dtype wrong in its header (its data no longer fits): a file damaged after it was
    scanned, or written badly, whose header still reads."""
    data = source.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header[key]["dtype"] = "F64"
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    target.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length :])


def test_a_damaged_vae_or_model_fails_the_job_naming_its_field(
    start: Callable[..., None], volume: Path, tmp_path: Path
) -> None:
    vaes, models = tmp_path / "vaes", tmp_path / "models"
    vaes.mkdir()
    models.mkdir()
    vae = volume / "vaes" / "tiny-vae.safetensors"
    _with_a_wrong_dtype(vae, vaes / "broken-vae.safetensors", "decoder.conv_out.bias")
    _with_a_wrong_dtype(
        volume / "models" / "tiny-a.safetensors", models / "broken.safetensors", "model.diffusion_model.out.2.bias"
    )
    start(VAE_DIR=str(vaes), MODELS_DIR=str(models))

    vae_error, model_error = run(vae="broken-vae")["error"], run("broken")["error"]

    assert "vae='broken-vae': " in vae_error, vae_error
    assert "generation failed" not in vae_error
    assert "model='broken': " in model_error, model_error
    assert "generation failed" not in model_error
    assert "MODEL_ID=" not in model_error, "the job named a model of MODELS_DIR, not MODEL_ID"
    assert "images" in run()
