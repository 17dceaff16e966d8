"""Single-file checkpoints and VAEs: the LDM layout, the checks before loading, conversion, baking and naming.

Everything runs on the tiny model written as one checkpoint file (``builder.tiny_model --single-file``),
through the worker's own handler; fakes of other models are written with their real tensor names and shapes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

import handler
from builder import cache_model, single_file
from builder.tiny_lora import write_test_loras
from builder.tiny_model import CHECKPOINT_FILE, VAE_FILE, write_tiny_model, write_tiny_models
from src.errors import ModelLoadError
from src.models.checkpoints import (
    CONVERT_PICKLE,
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    check_checkpoint,
    convert_checkpoint,
)
from src.models.loader import load_model
from src.models.locate import BAKED_SOURCE_FILE, locate_model, read_baked_source, url_key
from src.settings import Settings, SettingsError, load_settings, redact_url
from src.settings.load import CHECKPOINT_SUFFIXES
from tests.conftest import ROOT, as_baked_without_the_checker
from tests.forked import run_module

JOB = {"prompt": "a lighthouse", "num_inference_steps": 2, "seed": 7, "width": 64, "height": 64}


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's folder, with its checkpoint file and another VAE file inside, as the builder writes them."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-single-file"), single_file=True)


@pytest.fixture
def run_worker(monkeypatch: pytest.MonkeyPatch) -> Callable[..., dict[str, Any]]:
    """Start a fresh worker with these variables (nothing else of ours set) and run one job on it."""

    def run(env: dict[str, str], job: dict[str, Any] | None = None) -> dict[str, Any]:
        for field in Settings.model_fields.values():
            monkeypatch.delenv(str(field.alias), raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(handler, "_settings", None)
        monkeypatch.setattr(handler, "_engine", None)
        result = asyncio.run(handler.handler({"id": "checkpoint-test", "input": job or JOB}))
        assert "error" not in result, result
        return result

    return run


def pixels(result: dict[str, Any]) -> bytes:
    with Image.open(io.BytesIO(base64.b64decode(result["images"][0]["image"]))) as image:
        return image.convert("RGB").tobytes()


def parameters(result: dict[str, Any]) -> str:
    with Image.open(io.BytesIO(base64.b64decode(result["images"][0]["image"]))) as image:
        return str(image.text["parameters"])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the layout ----------------------------------------------------------------------------------


def test_the_tiny_checkpoint_has_the_ldm_layout_and_reads_back_tensor_for_tensor(tiny_files: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(tiny_files / CHECKPOINT_FILE), "pt") as handle:
        keys = list(handle.keys())
    assert {key.split(".")[0] + "." + key.split(".")[1] for key in keys} == {
        "model.diffusion_model",
        "first_stage_model.encoder",
        "first_stage_model.decoder",
        "first_stage_model.quant_conv",
        "first_stage_model.post_quant_conv",
        "cond_stage_model.transformer",
    }
    folder = StableDiffusionPipeline.from_pretrained(tiny_files, safety_checker=None, requires_safety_checker=False)
    read = StableDiffusionPipeline.from_single_file(
        str(tiny_files / CHECKPOINT_FILE), config=str(tiny_files), local_files_only=True, safety_checker=None
    )
    for name in ("unet", "vae", "text_encoder"):
        expected, found = getattr(folder, name).state_dict(), getattr(read, name).state_dict()
        assert expected.keys() == found.keys(), name
        assert all(torch.equal(expected[key], found[key]) for key in expected), name


def test_the_tiny_weights_are_float16_values_so_baking_in_float16_loses_nothing(tiny_files: Path) -> None:
    folder = StableDiffusionPipeline.from_pretrained(tiny_files, safety_checker=None, requires_safety_checker=False)
    for name in ("unet", "vae", "text_encoder"):
        for tensor in getattr(folder, name).state_dict().values():
            if tensor.is_floating_point():
                assert torch.equal(tensor, tensor.half().float())


# --- the worker on a checkpoint --------------------------------------------------------------------


def test_the_worker_on_the_file_matches_the_worker_on_its_folder_byte_for_byte(
    tiny_files: Path, run_worker: Callable[..., dict[str, Any]]
) -> None:
    plain = {"EMBED_PARAMETERS": "false"}
    from_folder = run_worker({**plain, "MODEL_ID": str(tiny_files)})
    from_file = run_worker({**plain, "MODEL_ID": str(tiny_files / CHECKPOINT_FILE), "MODEL_CONFIG": str(tiny_files)})

    assert from_file["images"][0]["image"] == from_folder["images"][0]["image"]


def test_a_checkpoint_is_named_as_a1111_names_it(tiny_files: Path, run_worker: Callable[..., dict[str, Any]]) -> None:
    checkpoint = tiny_files / CHECKPOINT_FILE
    result = run_worker({"MODEL_ID": str(checkpoint), "MODEL_CONFIG": str(tiny_files)})

    metadata = result["metadata"]
    assert metadata["model"] == "tiny-sd15"
    assert metadata["model_hash"] == sha256(checkpoint)[:10]
    assert "vae" not in metadata
    assert f"Model: tiny-sd15, Model hash: {sha256(checkpoint)[:10]}" in parameters(result)
    assert "VAE" not in parameters(result)


def test_a_vae_file_replaces_the_checkpoints_vae(tiny_files: Path, run_worker: Callable[..., dict[str, Any]]) -> None:
    base = {"MODEL_ID": str(tiny_files / CHECKPOINT_FILE), "MODEL_CONFIG": str(tiny_files)}
    own = run_worker(base)
    other = run_worker({**base, "VAE_ID": str(tiny_files / VAE_FILE)})

    assert pixels(other) != pixels(own)
    assert other["metadata"]["vae"] == "tiny-vae"
    assert other["metadata"]["vae_hash"] == sha256(tiny_files / VAE_FILE)[:10]
    assert f"VAE: tiny-vae, VAE hash: {sha256(tiny_files / VAE_FILE)[:10]}" in parameters(other)


def test_a_vae_folder_works_too_and_its_own_vae_changes_nothing(
    tiny_files: Path, tmp_path: Path, run_worker: Callable[..., dict[str, Any]]
) -> None:
    # Another VAE folder: the model's own, with its decoder's last bias moved, so its pixels differ.
    other = tmp_path / "other-vae"
    shutil.copytree(tiny_files / "vae", other)
    weights = other / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["decoder.conv_out.bias"] = tensors["decoder.conv_out.bias"] + 0.5
    save_file(tensors, weights)
    base = {"MODEL_ID": str(tiny_files), "EMBED_PARAMETERS": "false"}
    own = run_worker(base)
    same = run_worker({**base, "VAE_ID": str(tiny_files / "vae")})
    whole_folder = run_worker({**base, "VAE_ID": str(tiny_files)})
    replaced = run_worker({**base, "VAE_ID": str(other)})

    assert pixels(same) == pixels(own) == pixels(whole_folder)
    assert same["metadata"]["vae"] == "vae"
    assert pixels(replaced) != pixels(own), "VAE_ID's folder decodes the image"
    assert replaced["metadata"]["vae"] == "other-vae"


def test_baked_at_build_and_converted_at_startup_give_identical_images(
    tiny_files: Path, tmp_path: Path, run_worker: Callable[..., dict[str, Any]]
) -> None:
    source = tmp_path / "download" / CHECKPOINT_FILE
    source.parent.mkdir()
    shutil.copy(tiny_files / CHECKPOINT_FILE, source)
    checkpoint = str(source)
    baked = tmp_path / "baked"
    cache_model.bake(load_settings({"MODEL_ID": checkpoint, "MODEL_CONFIG": str(tiny_files), "MODEL_DIR": str(baked)}))
    label = read_baked_source(baked)
    assert label is not None
    assert label.checkpoint is not None
    assert label.checkpoint["sha256"] == sha256(source)
    assert {path.name for path in (baked / "unet").iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    at_startup = run_worker({"MODEL_ID": checkpoint, "MODEL_CONFIG": str(tiny_files), "MODEL_DIR": str(tmp_path)})
    # Moved away, with its config folder out of reach: the baked worker must not need the file any more.
    source.rename(tmp_path / "elsewhere.safetensors")
    assert not source.exists()
    from_baked = run_worker({"MODEL_ID": checkpoint, "MODEL_DIR": str(baked)})

    assert from_baked["images"][0]["image"] == at_startup["images"][0]["image"]
    assert (
        from_baked["metadata"]["model_hash"] == at_startup["metadata"]["model_hash"] == label.checkpoint["sha256"][:10]
    )


def test_model_cache_dir_keeps_the_conversion_for_the_next_worker(
    tiny_files: Path, tmp_path: Path, run_worker: Callable[..., dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint = tmp_path / "volume" / "my-model.safetensors"
    checkpoint.parent.mkdir()
    shutil.copy(tiny_files / CHECKPOINT_FILE, checkpoint)
    cache = tmp_path / "volume" / "converted"
    cache.mkdir()
    env = {"MODEL_ID": str(checkpoint), "MODEL_CONFIG": str(tiny_files), "MODEL_CACHE_DIR": str(cache)}

    first = run_worker(env)
    [folder] = [path for path in cache.iterdir() if not path.name.startswith(".")]
    assert folder.name == f"my-model-{sha256(checkpoint)[:10]}"
    assert (folder / BAKED_SOURCE_FILE).is_file()
    caplog.clear()
    with caplog.at_level("INFO", logger="src.models.loader"):
        second = run_worker(env)

    assert second["images"][0]["image"] == first["images"][0]["image"]
    assert "converted earlier" in caplog.text
    assert "SHA-256" not in caplog.text, "found by name, size and time, without reading the file again"
    assert second["metadata"]["model"] == "my-model"
    assert second["metadata"]["model_hash"] == sha256(checkpoint)[:10]


def test_two_files_of_one_name_size_and_time_in_two_folders_get_their_own_conversions(
    tiny_files: Path, tmp_path: Path, run_worker: Callable[..., dict[str, Any]]
) -> None:
    # Pruned SD 1.5 files of one format all have one size; a name is often reused across folders (model.safetensors).
    models = write_tiny_models(tmp_path / "written")
    first, second = tmp_path / "anime" / "model.safetensors", tmp_path / "real" / "model.safetensors"
    for source, target in ((models / "tiny-a.safetensors", first), (models / "styles" / "tiny-b.safetensors", second)):
        target.parent.mkdir()
        shutil.copy(source, target)
        os.utime(target, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    assert first.stat().st_size == second.stat().st_size
    cache = tmp_path / "converted"
    cache.mkdir()

    def run_on(checkpoint: Path) -> dict[str, Any]:
        return run_worker({"MODEL_ID": str(checkpoint), "MODEL_CONFIG": str(tiny_files), "MODEL_CACHE_DIR": str(cache)})

    anime, real = run_on(first), run_on(second)

    assert anime["metadata"]["model_hash"] == sha256(first)[:10]
    assert real["metadata"]["model_hash"] == sha256(second)[:10], "not the other file's conversion"
    assert anime["images"][0]["image"] != real["images"][0]["image"]


def test_model_sha256_must_match_the_file(tiny_files: Path) -> None:
    settings = load_settings(
        {"MODEL_ID": str(tiny_files / CHECKPOINT_FILE), "MODEL_CONFIG": str(tiny_files), "MODEL_SHA256": "0" * 64}
    )
    with pytest.raises(ModelLoadError, match=r"its SHA-256 is [0-9a-f]{64}, and MODEL_SHA256 says 0{64}"):
        load_model(settings, torch.float32)


def test_a_checkpoint_runs_with_a_lora(
    tiny_files: Path, tmp_path: Path, run_worker: Callable[..., dict[str, Any]]
) -> None:
    loras = tmp_path / "loras"
    write_test_loras(tiny_files, loras)
    env = {"MODEL_ID": str(tiny_files / CHECKPOINT_FILE), "MODEL_CONFIG": str(tiny_files), "LORA_DIR": str(loras)}
    name = sorted(path.stem for path in loras.glob("*.safetensors"))[0]

    plain = run_worker(env)
    result = run_worker(env, {**JOB, "loras": [{"name": name}]})

    assert result["metadata"]["loras"][0]["name"] == name
    assert pixels(result) != pixels(plain), "the LoRA changes the checkpoint's image"
    assert pixels(run_worker(env)) == pixels(plain), "and only its own job's"


# --- refusals, before anything is loaded ------------------------------------------------------


def fake(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """A safetensors file with these tensor names and shapes (zeros, float16)."""
    save_file({key: torch.zeros(shape, dtype=torch.float16) for key, shape in shapes.items()}, str(path))
    return path


UNET = "model.diffusion_model."
TEXT = "cond_stage_model.transformer.text_model."
VAE = "first_stage_model."


def write_sdxl(path: Path) -> Path:
    return fake(
        path,
        {
            UNET + "input_blocks.0.0.weight": (320, 4, 3, 3),
            UNET + "label_emb.0.0.weight": (1280, 2816),
            UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
            "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
            "conditioner.embedders.1.model.ln_final.weight": (1280,),
            VAE + "encoder.conv_in.weight": (128, 3, 3, 3),
        },
    )


def write_sd2(path: Path) -> Path:
    return fake(
        path,
        {
            UNET + "input_blocks.0.0.weight": (320, 4, 3, 3),
            UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
            "cond_stage_model.model.ln_final.weight": (1024,),
            "cond_stage_model.model.positional_embedding": (77, 1024),
            VAE + "encoder.conv_in.weight": (128, 3, 3, 3),
        },
    )


def write_inpainting(path: Path) -> Path:
    return fake(
        path,
        {
            UNET + "input_blocks.0.0.weight": (320, 9, 3, 3),
            UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
            TEXT + "embeddings.position_embedding.weight": (77, 768),
            VAE + "encoder.conv_in.weight": (128, 3, 3, 3),
        },
    )


def write_truncated(path: Path, source: Path) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_wider(path: Path, tiny_files: Path) -> Path:
    """The tiny checkpoint with a text encoder 48 wide instead of 32: SD 1.5's names, other shapes."""
    from safetensors.torch import load_file

    state = load_file(str(tiny_files / CHECKPOINT_FILE))
    state[TEXT + "final_layer_norm.weight"] = torch.zeros(48)
    save_file(state, str(path))
    return path


def write_old_text_layout(path: Path, tiny_files: Path) -> Path:
    """The tiny checkpoint with its text encoder under transformers' old names (no ``text_model.``)."""
    from safetensors.torch import load_file

    state = load_file(str(tiny_files / CHECKPOINT_FILE))
    renamed = {key.replace("transformer.text_model.", "transformer."): value for key, value in state.items()}
    save_file(renamed, str(path))
    return path


class Pickled:
    """Unpickling this writes a file: the proof that a refused .ckpt was never unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.marker, "unpickled"))


REFUSALS: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "ckpt": (
        lambda folder, tiny: _pickle(folder / "model.ckpt"),
        r"a pickled checkpoint \(\.ckpt\); pickles can run code when loaded, so they are refused unopened. "
        r"Convert it to \.safetensors",
    ),
    "sdxl": (lambda folder, tiny: write_sdxl(folder / "xl.safetensors"), r"an SDXL checkpoint \(its text encoders"),
    "sd2": (lambda folder, tiny: write_sd2(folder / "v2.safetensors"), r"an SD 2\.x checkpoint \(its text encoder is"),
    "inpainting": (
        lambda folder, tiny: write_inpainting(folder / "inpaint.safetensors"),
        r"an inpainting checkpoint \(its UNet takes 9 input channels",
    ),
    "lora": (lambda folder, tiny: _lora(folder / "loras", tiny), r"a LoRA \(its tensors are low-rank up/down pairs\)"),
    "vae": (lambda folder, tiny: tiny / VAE_FILE, r"a VAE alone, not a checkpoint; a VAE file goes in VAE_ID"),
    "truncated": (
        lambda folder, tiny: write_truncated(folder / "cut.safetensors", tiny / CHECKPOINT_FILE),
        r"the file is cut short: \d+ bytes, its header says \d+; was its download interrupted\?",
    ),
    "empty": (lambda folder, tiny: _write(folder / "empty.safetensors", b""), r"the file is empty \(0 bytes\)"),
    "text": (
        lambda folder, tiny: _write(folder / "notes.safetensors", b"a text file, renamed\n" * 10),
        r"not a safetensors file \(its header would be \d+ bytes\)",
    ),
    "missing": (lambda folder, tiny: folder / "nowhere.safetensors", r"no such file"),
    "null shape": (
        lambda folder, tiny: _header_only(
            folder / "null.safetensors", b'{"w": {"dtype": "F16", "shape": null, "data_offsets": [0, 0]}}'
        ),
        r"not a safetensors file \(its header cannot be read\): its entry 'w' gives no dtype, shape or two offsets",
    ),
    "nested header": (
        lambda folder, tiny: _header_only(
            folder / "deep.safetensors", b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        ),
        r"not a safetensors file \(its header is not JSON\)",
    ),
    "old text encoder names": (
        lambda folder, tiny: write_old_text_layout(folder / "old.safetensors", tiny),
        r"its text encoder lacks \d+ of \d+ tensors, such as embeddings",
    ),
    "other shapes": (
        lambda folder, tiny: write_wider(folder / "wider.safetensors", tiny),
        r"not shaped as SD 1\.5 \(the pipeline in .*\): text encoder final_layer_norm.weight is \[48\], "
        r"expected \[32\]",
    ),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _header_only(path: Path, header: bytes) -> Path:
    """A file of a safetensors header alone: its length, then ``header``."""
    return _write(path, len(header).to_bytes(8, "little") + header)


def _pickle(path: Path) -> Path:
    with path.open("wb") as handle:
        pickle.dump({"state_dict": Pickled(path.with_suffix(".unpickled"))}, handle)
    return path


def _lora(folder: Path, tiny: Path) -> Path:
    write_test_loras(tiny, folder)
    return sorted(folder.glob("*.safetensors"))[0]


@pytest.mark.parametrize("case", list(REFUSALS))
def test_what_is_not_an_sd15_checkpoint_is_refused_saying_what_it_is(
    case: str, tiny_files: Path, tmp_path: Path
) -> None:
    write, expected = REFUSALS[case]
    path = write(tmp_path, tiny_files)
    settings = load_settings({"MODEL_ID": str(path), "MODEL_CONFIG": str(tiny_files), "MODEL_DIR": str(tmp_path)})

    with pytest.raises(ModelLoadError, match=expected) as raised:
        load_model(settings, torch.float32)

    assert str(raised.value).startswith(f"MODEL_ID={str(path)!r}: ")
    assert not path.with_suffix(".unpickled").exists(), "the pickle was never opened"


def test_the_refusal_does_not_read_the_file_name(tiny_files: Path, tmp_path: Path) -> None:
    disguised = write_sdxl(tmp_path / "sd15-pruned-emaonly.safetensors")

    with pytest.raises(ModelLoadError, match="an SDXL checkpoint"):
        check_checkpoint(disguised, tiny_files)


def test_a_checkpoint_without_a_config_folder_says_how_to_get_one(tiny_files: Path, tmp_path: Path) -> None:
    settings = load_settings({"MODEL_ID": str(tiny_files / CHECKPOINT_FILE), "MODEL_DIR": str(tmp_path / "empty")})

    with pytest.raises(ModelLoadError) as raised:
        load_model(settings, torch.float32)

    message = str(raised.value)
    assert "is not an SD 1.5 config folder" in message
    assert "MODEL_CONFIG" in message
    assert "python -m builder.cache_model" in message


def test_a_vae_of_other_shapes_is_refused_at_startup(tiny_files: Path, tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    wide = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
    )
    path = single_file.save(single_file.vae_state_dict(wide, prefix=""), tmp_path / "wide-vae.safetensors")
    settings = load_settings({"MODEL_ID": str(tiny_files), "VAE_ID": str(path)})

    with pytest.raises(ModelLoadError, match=r"^VAE_ID='.*wide-vae.safetensors': not shaped as this model's VAE: "):
        load_model(settings, torch.float32)


@pytest.mark.parametrize(
    ("vae", "expected"),
    [
        (lambda tiny: tiny / CHECKPOINT_FILE, "a whole checkpoint, not a VAE"),
        (lambda tiny: tiny / "nowhere", "no such file or folder"),
        (lambda tiny: tiny / "scheduler", "a folder without a VAE"),
    ],
)
def test_vae_id_that_is_not_a_vae_is_refused(vae: Callable[[Path], Path], expected: str, tiny_files: Path) -> None:
    settings = load_settings({"MODEL_ID": str(tiny_files), "VAE_ID": str(vae(tiny_files))})

    with pytest.raises(ModelLoadError, match=expected):
        load_model(settings, torch.float32)


def test_the_readme_conversion_command_turns_a_ckpt_into_a_checkpoint_the_worker_takes(
    tiny_files: Path, tmp_path: Path
) -> None:
    """The one-line command the refusal and the README give, run on a pickle of the tiny checkpoint."""
    from safetensors.torch import load_file

    torch.save({"state_dict": load_file(str(tiny_files / CHECKPOINT_FILE))}, tmp_path / "model.ckpt")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert CONVERT_PICKLE in readme

    result = subprocess.run(
        ["bash", "-c", CONVERT_PICKLE.replace("python ", f"{sys.executable} ", 1)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    check_checkpoint(tmp_path / "model.safetensors", tiny_files)


def test_a_checkpoint_converts_with_sd15_configs_baked_without_the_checker(tiny_files: Path, tmp_path: Path) -> None:
    """The default image's MODEL_CONFIG is SD 1.5 baked without the checker: its index names the checker and its
    feature extractor, whose folders are not there."""
    config = as_baked_without_the_checker(tiny_files, tmp_path / "config")

    pipeline = convert_checkpoint(tiny_files / CHECKPOINT_FILE, config)

    assert pipeline.safety_checker is None
    assert pipeline.feature_extractor is None


def test_the_worker_exits_with_the_refusal_when_started_on_a_pickle(
    tiny_files: Path, tmp_path: Path, offline_env: dict[str, str]
) -> None:
    ckpt = _pickle(tmp_path / "model.ckpt")
    env = {**offline_env, "MODEL_ID": str(ckpt), "MODEL_CONFIG": str(tiny_files), "PYTHONPROFILEIMPORTTIME": "1"}

    result = subprocess.run(
        [sys.executable, str(ROOT / "handler.py"), "--test_input", json.dumps({"input": JOB})],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert result.returncode != 0
    assert "a pickled checkpoint (.ckpt)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not ckpt.with_suffix(".unpickled").exists()
    # Refused from its name, before torch was imported: Python lists each import (PYTHONPROFILEIMPORTTIME).
    assert not re.search(r"^import time:.*\| +torch$", result.stderr, re.MULTILINE)


# --- MODEL_URL: downloaded and converted at build time -----------------------------------------


class Served:
    """Files over HTTP on 127.0.0.1; the first GET of each path is cut off half way, once."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self.requests: list[tuple[str, str | None]] = []
        self.cut: set[str] = set()
        served = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                served.requests.append((self.path, self.headers.get("Range")))
                path = served.files.get(self.path)
                if path is None:
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                # A validator, as real hosts give one: a download cut short resumes only with one.
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.end_headers()
                if self.path not in served.cut:
                    served.cut.add(self.path)
                    self.wfile.write(data[start : len(data) // 2])
                    self.wfile.flush()
                    self.connection.close()
                    return
                self.wfile.write(data[start:])

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@contextlib.contextmanager
def serving(files: dict[str, Path], *, cut_once: bool = True) -> Iterator[Served]:
    """``files`` served on 127.0.0.1 while the block runs; each cut short at its first GET unless not ``cut_once``."""
    server = Served(files)
    if not cut_once:
        server.cut.update(files)
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()


@pytest.fixture
def served(tiny_files: Path) -> Iterator[Served]:
    files = {"/files/tiny-sd15.safetensors": tiny_files / CHECKPOINT_FILE, "/vae/ft.safetensors": tiny_files / VAE_FILE}
    with serving(files) as server:
        yield server


def bake_env(tiny_files: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"MODEL_CONFIG": str(tiny_files), "MODEL_DIR": str(tmp_path / "models" / "sd15"), **extra}


def test_model_url_is_downloaded_with_a_resume_converted_and_served(
    served: Served, tiny_files: Path, tmp_path: Path, run_worker: Callable[..., dict[str, Any]]
) -> None:
    url = f"{served.url}/files/tiny-sd15.safetensors"
    env = bake_env(tiny_files, tmp_path, MODEL_URL=url, MODEL_SHA256=sha256(tiny_files / CHECKPOINT_FILE))

    cache_model.bake(load_settings(env))

    ranges = [header for path, header in served.requests if path == "/files/tiny-sd15.safetensors"]
    assert ranges[0] is None
    assert ranges[1] is not None
    assert ranges[1].startswith("bytes=")
    assert not list((tmp_path / "models" / ".downloads").glob("*")), "the download is removed once converted"
    served_file = run_worker({"MODEL_ID": str(tiny_files / CHECKPOINT_FILE), "MODEL_CONFIG": str(tiny_files)})
    # MODEL_URL is the model, whatever MODEL_ID says (the log says MODEL_ID is not used).
    baked = run_worker({"MODEL_URL": url, "MODEL_DIR": env["MODEL_DIR"], "MODEL_ID": str(tiny_files)})
    assert baked["images"][0]["image"] == served_file["images"][0]["image"]
    assert baked["metadata"]["model"] == "tiny-sd15"


def test_vae_url_is_baked_in_place_of_the_models_vae(
    served: Served, tiny_files: Path, tmp_path: Path, run_worker: Callable[..., dict[str, Any]]
) -> None:
    url, vae_url = f"{served.url}/files/tiny-sd15.safetensors", f"{served.url}/vae/ft.safetensors"
    env = bake_env(tiny_files, tmp_path, MODEL_URL=url, VAE_URL=vae_url)

    cache_model.bake(load_settings(env))
    baked = run_worker({"MODEL_URL": url, "VAE_URL": vae_url, "MODEL_DIR": env["MODEL_DIR"]})
    at_startup = run_worker(
        {
            "MODEL_ID": str(tiny_files / CHECKPOINT_FILE),
            "MODEL_CONFIG": str(tiny_files),
            "VAE_ID": str(tiny_files / VAE_FILE),
        }
    )

    assert pixels(baked) == pixels(at_startup)
    assert baked["metadata"]["vae"] == "ft"
    assert baked["metadata"]["vae_hash"] == sha256(tiny_files / VAE_FILE)[:10]


def test_the_image_serves_its_baked_model_url_and_vae_url_without_them_in_its_environment(
    served: Served, tiny_files: Path, tmp_path: Path, run_worker: Callable[..., dict[str, Any]]
) -> None:
    """The Dockerfile's build reads the URLs as arguments; the image keeps none, and serves MODEL_DIR's label."""
    from tests.test_builder import full_stage_env

    build_args = {
        "MODEL_URL": f"{served.url}/files/tiny-sd15.safetensors",
        "VAE_URL": f"{served.url}/vae/ft.safetensors",
        "VAE_SHA256": sha256(tiny_files / VAE_FILE),
    }
    model_dir = str(tmp_path / "models" / "sd15")
    image_env = {**full_stage_env(build_args), "MODEL_DIR": model_dir}
    # The RUN that bakes sees the arguments and the ENV, as `docker build` gives them.
    cache_model.bake(load_settings({**build_args, **image_env, "MODEL_CONFIG": str(tiny_files)}))

    baked = run_worker(image_env)
    at_startup = run_worker(
        {
            "MODEL_ID": str(tiny_files / CHECKPOINT_FILE),
            "MODEL_CONFIG": str(tiny_files),
            "VAE_ID": str(tiny_files / VAE_FILE),
        }
    )

    assert "MODEL_URL" not in image_env
    assert pixels(baked) == pixels(at_startup)
    assert (baked["metadata"]["model"], baked["metadata"]["vae"]) == ("tiny-sd15", "ft")


def test_model_url_with_another_checksum_stops_the_build(served: Served, tiny_files: Path, tmp_path: Path) -> None:
    env = bake_env(tiny_files, tmp_path, MODEL_URL=f"{served.url}/files/tiny-sd15.safetensors", MODEL_SHA256="a" * 64)

    with pytest.raises(cache_model.CacheError, match=r"a{64}") as raised:
        cache_model.bake(load_settings(env))

    assert sha256(tiny_files / CHECKPOINT_FILE) in str(raised.value)
    assert not (tmp_path / "models" / "sd15").exists()


def test_model_url_that_is_not_found_is_named(
    served: Served,
    tiny_files: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"{served.url}/files/gone.safetensors?token=secret"
    for name, value in bake_env(tiny_files, tmp_path, MODEL_URL=url).items():
        monkeypatch.setenv(name, value)

    assert cache_model.main([]) == 1

    error = capsys.readouterr().err
    assert "HTTP 404" in error
    assert "/files/gone.safetensors" in error
    assert "secret" not in error


def test_the_worker_refuses_a_model_url_that_was_not_baked(tiny_files: Path, tmp_path: Path) -> None:
    settings = load_settings({"MODEL_URL": "https://example.com/m.safetensors?token=x", "MODEL_DIR": str(tmp_path)})

    with pytest.raises(ModelLoadError) as raised:
        load_model(settings, torch.float32)

    message = str(raised.value)
    assert "is downloaded and converted at build time" in message
    assert "python -m builder.cache_model" in message
    assert "token=x" not in message


# --- baking: what a bake keeps, replaces and refuses --------------------------------------------


@pytest.fixture
def whole(tiny_files: Path, tmp_path: Path) -> Iterator[Served]:
    """Files served whole at once (never cut short): two checkpoints picked by the query, as Civitai's ``fp=``
    picks them, at a URL that names no file; a VAE, an HTML page, a LoRA and a whole checkpoint given as a VAE."""
    halved = {
        key: value / 2 if value.is_floating_point() else value
        for key, value in load_file(tiny_files / CHECKPOINT_FILE).items()
    }
    save_file(halved, str(tmp_path / "halved.safetensors"))
    write_test_loras(tiny_files, tmp_path / "loras", count=1)
    (tmp_path / "login.html").write_text("\n<!DOCTYPE html><html><body>Please log in</body></html>")
    files = {
        "/api/download/models/128713?fp=fp32": tiny_files / CHECKPOINT_FILE,
        "/api/download/models/128713?fp=fp16": tmp_path / "halved.safetensors",
        "/api/download/models/1": tmp_path / "login.html",
        "/files/lora.safetensors": next((tmp_path / "loras").glob("*.safetensors")),
        "/vae/ft.safetensors": tiny_files / VAE_FILE,
        "/vae/whole.safetensors": tiny_files / CHECKPOINT_FILE,
    }
    with serving(files, cut_once=False) as server:
        yield server


def downloads_left(tmp_path: Path) -> list[str]:
    """What the bakes left in the build's folder of downloads, beside MODEL_DIR."""
    folder = tmp_path / "models" / ".downloads"
    return sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []


def test_a_model_url_that_differs_in_its_query_only_is_another_checkpoint(
    whole: Served, tiny_files: Path, tmp_path: Path
) -> None:
    fp32, fp16 = (f"{whole.url}/api/download/models/128713?fp={fp}" for fp in ("fp32", "fp16"))
    env = bake_env(tiny_files, tmp_path)

    cache_model.bake(load_settings({**env, "MODEL_URL": fp32}))
    cache_model.bake(load_settings({**env, "MODEL_URL": fp16}))

    label = read_baked_source(Path(env["MODEL_DIR"]))
    assert label is not None
    assert label.checkpoint is not None
    assert label.checkpoint["sha256"] == sha256(tmp_path / "halved.safetensors")
    assert label.url == f"{whole.url}/api/download/models/128713?<hidden>"
    assert locate_model(load_settings({**env, "MODEL_URL": fp16})).label == label
    with pytest.raises(ModelLoadError, match="downloaded from a URL with another query"):
        locate_model(load_settings({**env, "MODEL_URL": fp32}))


@pytest.mark.parametrize(
    ("url", "served"),
    [
        ("https://example.com/m.safetensors", True),
        ("https://example.com/m.safetensors?fp=fp16", False),  # the hidden form cannot tell queries apart
    ],
)
def test_a_label_an_older_build_wrote_without_a_url_key_serves_a_url_without_a_query_only(
    url: str, served: bool, tmp_path: Path
) -> None:
    label = {"model_id": redact_url(url), "revision": None, "variant": None, "safety_checker": False}
    (tmp_path / BAKED_SOURCE_FILE).write_text(json.dumps({**label, "url": redact_url(url), "checkpoint": None}))
    settings = load_settings({"MODEL_URL": url, "MODEL_DIR": str(tmp_path)})

    if served:
        assert locate_model(settings).way == "baked-url"
    else:
        with pytest.raises(ModelLoadError, match="baked by an older build, which kept no key of it"):
            locate_model(settings)
    # The image's case: no MODEL_URL in its environment; the label names what was baked.
    assert locate_model(load_settings({"MODEL_DIR": str(tmp_path)})).way == "baked-url"


def test_the_url_key_keeps_the_query_and_leaves_out_credentials() -> None:
    assert url_key("https://a:b@example.com/m?fp=fp16") == url_key("https://example.com/m?fp=fp16")
    assert url_key("https://example.com/m?fp=fp16") != url_key("https://example.com/m?fp=fp32")
    assert url_key("https://example.com/m?fp=fp16") == hashlib.sha256(b"https://example.com/m?fp=fp16").hexdigest()


def test_a_model_url_that_names_no_file_is_judged_by_its_content(
    whole: Served, tiny_files: Path, tmp_path: Path
) -> None:
    env = bake_env(tiny_files, tmp_path, MODEL_URL=f"{whole.url}/api/download/models/128713?fp=fp32")

    cache_model.bake(load_settings(env))

    label = read_baked_source(Path(env["MODEL_DIR"]))
    assert label is not None
    assert label.checkpoint == {
        "name": "128713",
        "sha256": sha256(tiny_files / CHECKPOINT_FILE),
        "file": "128713.safetensors",
    }
    assert downloads_left(tmp_path) == []


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param(
            "/api/download/models/1",
            "MODEL_URL='{url}/api/download/models/1': the server sent an HTML page ('1'), not the file: a login or "
            "error page?",
            id="an-html-page",
        ),
        pytest.param(
            "/files/lora.safetensors",
            "MODEL_URL='{url}/files/lora.safetensors' (the file 'lora.safetensors'): a LoRA",
            id="a-lora",
        ),
    ],
)
def test_a_refused_model_url_is_named_and_its_download_deleted(
    whole: Served, tiny_files: Path, tmp_path: Path, path: str, expected: str
) -> None:
    env = bake_env(tiny_files, tmp_path, MODEL_URL=f"{whole.url}{path}")

    with pytest.raises(cache_model.CacheError) as raised:
        cache_model.bake(load_settings(env))

    assert str(raised.value).startswith(expected.format(url=whole.url))
    assert ".downloads" not in str(raised.value)
    assert downloads_left(tmp_path) == []
    assert not (tmp_path / "models" / "sd15").exists()
    assert sorted(path.name for path in (tmp_path / "models").iterdir()) == [".downloads"]


@pytest.mark.parametrize("setting", ["MODEL_URL", "VAE_URL"])
def test_a_url_that_names_a_pickle_is_refused_before_any_request(
    whole: Served, tiny_files: Path, tmp_path: Path, setting: str
) -> None:
    pickle_url = f"{whole.url}/files/model.ckpt?token=secret"
    urls = {"MODEL_URL": f"{whole.url}/api/download/models/128713?fp=fp32", setting: pickle_url}

    with pytest.raises(cache_model.CacheError) as raised:
        cache_model.bake(load_settings(bake_env(tiny_files, tmp_path, **urls)))

    assert str(raised.value).startswith(
        f"{setting}='{whole.url}/files/model.ckpt?<hidden>' names 'model.ckpt', a pickle, which can run code when "
        "loaded: it is never downloaded or opened."
    )
    assert whole.requests == []


def test_a_refused_vae_url_leaves_the_baked_model_as_it_was(whole: Served, tiny_files: Path, tmp_path: Path) -> None:
    env = bake_env(tiny_files, tmp_path, MODEL_URL=f"{whole.url}/api/download/models/128713?fp=fp32")
    cache_model.bake(load_settings(env))
    before = {path: path.read_bytes() for path in Path(env["MODEL_DIR"]).rglob("*") if path.is_file()}
    vae_url = f"{whole.url}/vae/whole.safetensors"

    with pytest.raises(cache_model.CacheError) as raised:
        cache_model.bake(load_settings({**env, "VAE_URL": vae_url}))

    assert str(raised.value).startswith(
        f"VAE_URL='{vae_url}' (the file 'whole.safetensors'): a whole checkpoint, not a VAE"
    )
    assert {path: path.read_bytes() for path in Path(env["MODEL_DIR"]).rglob("*") if path.is_file()} == before
    assert locate_model(load_settings(env)).way == "baked-url"
    assert downloads_left(tmp_path) == []


def test_a_hub_bake_without_vae_url_any_more_bakes_the_repo_s_vae_again(
    whole: Served, tiny_files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_builder import hub_cache_of

    hub_cache_of(tiny_files, tmp_path / "cache", "someone/tiny-sd15")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    env = {"MODEL_ID": "someone/tiny-sd15", "MODEL_DIR": str(tmp_path / "models" / "sd15")}
    vae = Path(env["MODEL_DIR"]) / "vae" / "diffusion_pytorch_model.fp16.safetensors"

    cache_model.bake(load_settings({**env, "VAE_URL": f"{whole.url}/vae/ft.safetensors"}), tmp_path / "cache")
    with_vae_url = vae.read_bytes()
    cache_model.bake(load_settings(env), tmp_path / "cache")

    label = read_baked_source(Path(env["MODEL_DIR"]))
    assert label is not None
    assert label.vae is None
    assert vae.read_bytes() != with_vae_url
    assert vae.read_bytes() == (tiny_files / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("env", "refused"),
    [
        ({"MODEL_ID": "someone/model"}, True),
        ({"MODEL_ID": "/models/some-folder"}, True),
        ({"MODEL_ID": "/models/model.safetensors"}, False),
        ({"MODEL_ID": "someone/model", "MODEL_URL": "https://example.com/m.safetensors"}, False),
        ({}, False),  # the image's: MODEL_DIR's label may name the checkpoint baked from MODEL_URL
    ],
)
def test_model_sha256_needs_a_checkpoint_to_check(env: dict[str, str], refused: bool) -> None:
    settings = {**env, "MODEL_SHA256": "a" * 64}

    if refused:
        with pytest.raises(SettingsError, match=f"MODEL_SHA256={'a' * 64}: it checks the single-file checkpoint"):
            load_settings(settings)
    else:
        load_settings(settings)


def test_model_sha256_with_the_default_hub_model_stops_the_build(tmp_path: Path) -> None:
    settings = load_settings({"MODEL_SHA256": "a" * 64, "MODEL_DIR": str(tmp_path / "sd15")})

    with pytest.raises(
        cache_model.CacheError, match=r"and MODEL_ID='stable-diffusion-v1-5/stable-diffusion-v1-5' is a hub repo"
    ):
        cache_model.bake(settings)

    assert list(tmp_path.iterdir()) == []


def test_model_sha256_with_a_hub_bake_stops_the_start(tmp_path: Path) -> None:
    # The image keeps MODEL_SHA256 and no MODEL_URL in its environment; a hub repo's bake has no file to check.
    from src.models.locate import BakedSource
    from src.settings import DEFAULT_MODEL_ID, DEFAULT_MODEL_REVISION

    folder = tmp_path / "sd15"
    folder.mkdir()
    BakedSource(DEFAULT_MODEL_ID, DEFAULT_MODEL_REVISION, "fp16", safety_checker=False).write(folder)
    settings = load_settings({"MODEL_SHA256": "a" * 64, "MODEL_DIR": str(folder)})

    with pytest.raises(ModelLoadError, match=f"holds the hub repo '{DEFAULT_MODEL_ID}', which has none"):
        locate_model(settings)


def test_the_settings_read_a_model_id_file_as_the_loader_does() -> None:
    assert set(CHECKPOINT_SUFFIXES) == set(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)


def test_tiny_model_cli_writes_the_single_files_beside_the_folder(tmp_path: Path) -> None:
    result = run_module("builder.tiny_model", str(tmp_path / "tiny"), "--single-file", cwd=ROOT, timeout=300)

    assert result.returncode == 0, result.stderr
    assert (tmp_path / "tiny" / "model_index.json").is_file()
    assert str(tmp_path / "tiny" / CHECKPOINT_FILE) in result.stdout
    assert str(tmp_path / "tiny" / VAE_FILE) in result.stdout
