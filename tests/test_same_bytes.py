"""The same jobs give the same bytes: one job per task, compared with digests recorded before the code was reshaped.

The digests were written by this file's jobs on the code as it stood before the job's path was split into
prepare, run and finish (commit c92f0f7), with ``RECORD_DIGESTS=1 python -m pytest tests/test_same_bytes.py -s``,
which prints the table below. Each digest covers the image files as the response carries them (pixels and embedded
parameters) and the response's metadata, less its timings and the fields added since at their neutral values
(``NEUTRAL_SINCE``). A change that moves code without changing behaviour
leaves every digest as it is; a change that means to change an output records them again and says why.

The tiny model's weights are seeded, so the digests hold wherever torch 2.13's CPU kernels give the same floats;
where another kind of CPU rounds differently, its digests are recorded beside the others, on code whose output
has already matched the recorded digests on a known CPU (three kinds so far: Intel Xeons with and without
AVX-512/AMX, and an AMD EPYC). They were recorded with two torch threads (torch's
default on 2 cores), and the number of threads changes how sums are split: the jobs run in a process of their
own with two (``python -m tests.test_same_bytes`` from the folder the test prepares prints the digests).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import warnings
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import handler
from builder.tiny_lora import write_test_loras
from builder.tiny_model import write_tiny_controlnets
from src.settings import Settings
from tests.conftest import ROOT, box_mask, noise_image


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


IMAGE = _png(noise_image(64, 64, seed=3))
MASK = _png(box_mask(64, 64, (16, 16, 48, 48)))
CONTROL = _png(box_mask(64, 64, (8, 24, 56, 40)).convert("RGB"))
BASE = {"num_inference_steps": 3, "seed": 7, "width": 64, "height": 64}

JOBS: dict[str, dict[str, Any]] = {
    "txt2img": {"prompt": "a (red:1.3) fox [in the snow:at dusk:0.5]", "negative_prompt": "blurry", "num_images": 2},
    "txt2img-jpeg": {"prompt": "a fox", "output_format": "jpeg", "scheduler": "euler_a"},
    "txt2img-webp": {"prompt": "a fox", "output_format": "webp", "scheduler": "dpmpp_2m_karras"},
    "img2img": {"prompt": "a fox", "image": IMAGE, "strength": 0.7},
    "inpaint": {"prompt": "a fox", "image": IMAGE, "mask": MASK, "strength": 0.9},
    "inpaint-masked": {"prompt": "a fox", "image": IMAGE, "mask": MASK, "inpaint_area": "masked", "mask_blur": 2},
    "outpaint": {"prompt": "a fox", "image": IMAGE, "outpaint": {"left": 64}, "width": 128},
    "hires-latent": {"prompt": "a fox", "hires": {"scale": 1.5, "upscaler": "latent", "steps": 2}},
    "hires-lanczos": {"prompt": "a fox", "hires": {"scale": 2, "upscaler": "lanczos", "strength": 0.5}},
    "lora": {"prompt": "a fox <lora:tiny-kohya-1:0.6>", "loras": [{"name": "tiny-peft-0", "scale": 0.8}]},
    "controlnet": {"prompt": "a fox", "controlnets": [{"model": "tiny-controlnet", "image": CONTROL, "scale": 0.9}]},
    "inpaint-lora-controlnet": {
        "prompt": "a fox",
        "image": IMAGE,
        "mask": MASK,
        "loras": [{"name": "tiny-peft-0"}],
        "controlnets": [{"model": "tiny-controlnet-file", "image": CONTROL, "preprocess": "canny"}],
    },
}

# Each job's digests, one per kind of CPU they were recorded on: torch's CPU kernels (oneDNN and MKL pick theirs
# by the CPU's instruction sets) may round differently on another CPU. The first was recorded on the machine
# that ran the code before the reshaping; the second on an x86_64 Xeon with AVX-512 and AMX (family 6, model
# 167), on the reshaped code after the first had passed there.
DIGESTS: dict[str, tuple[str, ...]] = {
    "txt2img": (
        "63a92ad7d8bfe36019cd5d0ee945ccde9e116011a828a83f58c393143741024d",
        "55a55ee7e0a8794890ca963c86be0a02d9d114b27d64e80ae79964b019852ef9",
        "f40c7ca9819195249480ab7d40b3a9292edb1587ab86d144139a3d96676ee3d2",
    ),
    # Recorded again on an AMD EPYC when Euler a took k-diffusion's sigmas (timestep_spacing "linspace", as
    # A1111's); its digest before was one on all three kinds of CPU. Both again when the EXIF UserComment was
    # typed UNDEFINED, as A1111 writes it (the pixels are those of the earlier digests), and again when the
    # parameters said the noise's source (RNG: CPU).
    "txt2img-jpeg": ("194111e0fb54d52e0f7e4701bfd8f9bdfc83a53b7ce509f5ced66a6af50271d7",),
    "txt2img-webp": ("12b3f46ec636b10dc3f31f4f880f5389c52accb441c656afde35c61b53b63132",),
    # Recorded again on an AMD EPYC when every pass drew its noise as A1111's ImageRNG (a fresh generator per
    # image, the input image encoded at the VAE's mean): the jobs with an input image or a hires pass. Until
    # recorded on another kind of CPU, they are compared on this kind only (RECORDED_ON). The jobs with an input
    # image again when img2img ran A1111's count of steps and inpaint A1111's latent mask and blend.
    "img2img": ("86c2075b2e0c842f6b642ba1bdf0e7d47c2fa23fe1b37b62e992f979d4a828b2",),
    "inpaint": ("dd28e6e1b24cd658dda76fcbe44a7a4c58bf1a24f153574e5415e2b591db1c11",),
    "inpaint-masked": ("fddc377cac5ae006c8af02e7dda44b97c3accf1dc65620ed6df92905798fbee2",),
    "outpaint": ("e1ee18a2b297667ea6b41b618844be9e8463029435b9c717a93a7d6b361b1eb1",),
    "hires-latent": ("98b99d4196a22b5273014bff8dda22c8550fc2d32997b576305948cbfb8eb12f",),
    "hires-lanczos": ("00cf60ba6c1249722b1399aa0364c96481930973d3c4347d1a790824b3614794",),
    "lora": (
        "57a2948a4b6470f71e55fce7b04bc2a1c59b882071a33ffe484a206802872848",
        "ad7684fbef7f326dc7e812037bfc10a909ee52b3304332fb1f36a6c731484e3c",
        "5aee650dce7d018e07e8124aa53a6de4556b51414431eeb2ea7a48fa2b1cea2b",
    ),
    "controlnet": (
        "aeede06eed50b787c40869b71909def3419989e4529b911aee340c1af651a8a1",
        "d59380c403f51fef933f1d5072410246eeae87cab0077e7c7ae9902be4e6ddd7",
    ),
    "inpaint-lora-controlnet": ("711ad017dab37fafb30c5c72bf02b839ea4f0901e74f3d61f470a3374f729689",),
}


# The jobs recorded again on fewer kinds of CPU than the others, and those kinds (``cpu_kind``): on another kind,
# whose float kernels may round differently, they are left out of the comparison with a warning.
AMD_EPYC_ZEN3 = "AuthenticAMD family 25 model 17"
RERECORDED = ("img2img", "inpaint", "inpaint-masked", "outpaint", "hires-latent", "hires-lanczos")
RECORDED_ON: dict[str, tuple[str, ...]] = dict.fromkeys((*RERECORDED, "inpaint-lora-controlnet"), (AMD_EPYC_ZEN3,))


def cpu_kind(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's vendor, family and model, as /proc/cpuinfo names them: what picks torch's CPU kernels."""
    try:
        fields = dict(line.split(":", 1) for line in cpuinfo.read_text().splitlines()[:10] if ":" in line)
    except OSError:
        return "unknown"
    named = {key.strip(): value.strip() for key, value in fields.items()}
    return f"{named.get('vendor_id')} family {named.get('cpu family')} model {named.get('model')}"


@pytest.fixture(scope="module")
def same_bytes_folder(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model (as ``tiny-sd15``), the tiny builders' LoRAs and ControlNets, in one folder."""
    folder = tmp_path_factory.mktemp("same-bytes")
    # write_tiny_controlnets copies the model's UNet; a link keeps the shared model folder untouched.
    (folder / "unet").symlink_to(tiny_model_dir / "unet", target_is_directory=True)
    write_tiny_controlnets(folder)
    (folder / "loras").mkdir()
    write_test_loras(tiny_model_dir, folder / "loras", count=2)
    # The model's name is in the metadata and the embedded parameters: a relative path keeps it the same in every run.
    (folder / "tiny-sd15").symlink_to(tiny_model_dir, target_is_directory=True)
    return folder


# Metadata fields added after the digests were recorded, at the values that leave every image as it was: left
# out of the digest only at those values (a random variation seed acts with a strength above 0 only).
NEUTRAL_SINCE = {
    "tiling": False,
    "subseed_strength": 0.0,
    "seed_resize_from_w": 0,
    "seed_resize_from_h": 0,
    "deepcache_interval": 1,
    "tome_ratio": 0.0,
    "pad_conds": False,
    # Inpaint's and outpaint's only; absent from the other tasks' metadata.
    "inpaint_fill": "original",
    "mask_invert": False,
    "mask_round": False,
}


# Parameters written into every image after the digests were recorded: taken out of a PNG's text before its bytes are
# hashed, so that its digests on each kind of CPU hold (a JPEG's or WebP's, one for every CPU, were recorded again).
PARAMETERS_SINCE = (b", RNG: CPU",)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def without_parameters_since(png: bytes) -> bytes:
    """The PNG's bytes as written before ``PARAMETERS_SINCE``: each taken out of its ``parameters`` text chunk once,
    the chunk's length and CRC written again; every other byte as it is."""
    out, position = bytearray(png[:8]), 8
    while position < len(png):
        length = int.from_bytes(png[position : position + 4], "big")
        kind, data = png[position + 4 : position + 8], png[position + 8 : position + 8 + length]
        if kind == b"tEXt" and data.startswith(b"parameters\0"):
            for added in PARAMETERS_SINCE:
                assert data.count(added) == 1, data
                data = data.replace(added, b"")
            out += len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
        else:
            out += png[position : position + 12 + length]
        position += 12 + length
    return bytes(out)


def digest(response: dict[str, Any]) -> str:
    """SHA-256 of the response's image files (a PNG's less ``PARAMETERS_SINCE``) and its metadata, less the
    timings and the fields of ``NEUTRAL_SINCE`` at their neutral values."""
    assert "error" not in response, response
    hashed = hashlib.sha256()
    for image in response["images"]:
        data = base64.b64decode(image["image"])
        hashed.update(without_parameters_since(data) if data.startswith(PNG_SIGNATURE) else data)
    metadata = response["metadata"]
    assert all(metadata.get(key, value) == value for key, value in NEUTRAL_SINCE.items()), "they are left neutral"
    left_out = {"timings_ms", "phases_ms", "subseed", "subseeds", *NEUTRAL_SINCE}
    metadata = {key: value for key, value in metadata.items() if key not in left_out}
    hashed.update(json.dumps(metadata, sort_keys=True).encode())
    return hashed.hexdigest()


def print_digests() -> None:
    """Run every job through ``handler.handler`` in this process, from the folder; print their digests as JSON."""
    found = {
        name: digest(asyncio.run(handler.handler({"id": name, "input": {**BASE, **job}}))) for name, job in JOBS.items()
    }
    print(json.dumps(found))


def test_each_task_gives_the_bytes_it_gave_before(same_bytes_folder: Path) -> None:
    # A fresh worker process with two torch threads, as the digests were recorded: a thread that this suite's
    # process started earlier keeps the number of threads it started with (tests/conftest.py gives one).
    worker_variables = {str(field.alias) for field in Settings.model_fields.values()}
    env = {name: value for name, value in os.environ.items() if name not in worker_variables}
    env.update(
        MODEL_ID="tiny-sd15",
        LORA_DIR=str(same_bytes_folder / "loras"),
        CONTROLNET_DIR=str(same_bytes_folder / "controlnets"),
        OMP_NUM_THREADS="2",
        PYTHONPATH=str(ROOT),
    )
    completed = subprocess.run(
        [sys.executable, "-m", "tests.test_same_bytes"],
        cwd=same_bytes_folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    found = json.loads(completed.stdout.splitlines()[-1])
    if os.environ.get("RECORD_DIGESTS"):
        print("\nDIGESTS = {")
        for name, value in found.items():
            print(f'    "{name}": "{value}",')
        print("}")
    kind = cpu_kind()
    unrecorded = [name for name in JOBS if name in RECORDED_ON and kind not in RECORDED_ON[name]]
    if unrecorded:
        warnings.warn(f"not compared on this kind of CPU ({kind}), where none was recorded: {unrecorded}", stacklevel=1)
    changed = [name for name in JOBS if found[name] not in DIGESTS[name] and name not in unrecorded]
    assert not changed, f"these jobs no longer give the bytes they gave: {changed}"


if __name__ == "__main__":
    print_digests()
