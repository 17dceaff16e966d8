"""Baking CONTROLNETS into CONTROLNET_DIR at build time (``builder/cache_model.py``), offline.

URLs are served by a real HTTP server on 127.0.0.1; the ControlNets are the tiny model's
(``builder.tiny_model --controlnet``, float32 files) and fakes with the real tensor names and
shapes of other models. The hub cannot be reached here: for hub ids, what happens before and
after the download is tested.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import handler
from builder import cache_model
from builder.tiny_lora import write_test_loras
from builder.tiny_model import CHECKPOINT_FILE, CONTROLNET_DIFFUSERS, CONTROLNET_FILE, write_tiny_model
from builder.tiny_model import write_tiny_controlnets as write_controlnets
from src.models.safetensors_header import read_header
from src.settings import Settings, load_settings
from tests.test_checkpoints import Served, fake
from tests.test_controlnets import png_base64, shapes_image

NET_FILE = CONTROLNET_FILE.removesuffix(".safetensors")
CONTROL = png_base64(shapes_image())
JOB = {"prompt": "a fox", "num_inference_steps": 2, "seed": 3, "width": 64, "height": 64}
CN = "control_model."


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model (with its checkpoint file) and its ControlNets in ``controlnets/``."""
    folder = write_tiny_model(tmp_path_factory.mktemp("tiny-bake-controlnets"), single_file=True)
    write_controlnets(folder)
    return folder


@pytest.fixture(scope="session")
def fakes(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Files that are not SD 1.5 ControlNets, with the tensor names and shapes that say what they are."""
    folder = tmp_path_factory.mktemp("fakes")
    sdxl = fake(
        folder / "sdxl-canny.safetensors",
        {
            CN + "input_hint_block.0.weight": (16, 3, 3, 3),
            CN + "zero_convs.0.0.weight": (320, 320, 1, 1),
            CN + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
            CN + "label_emb.0.0.weight": (1280, 2816),
        },
    )
    [lora] = write_test_loras(tiny, folder, count=1)
    return {"sdxl": sdxl, "lora": lora}


@pytest.fixture
def served(tiny: Path, fakes: dict[str, Path]) -> Iterator[Served]:
    """The files over HTTP, each sent whole (resuming is test_download's and test_checkpoints' subject)."""
    files = {
        f"/cn/{CONTROLNET_FILE}": tiny / "controlnets" / CONTROLNET_FILE,
        "/cn/sdxl-canny.safetensors": fakes["sdxl"],
        "/cn/style.safetensors": fakes["lora"],
        "/cn/control.pth": fakes["sdxl"],
        "/api/download/7": tiny / "controlnets" / CONTROLNET_FILE,
    }
    server = Served(files)
    server.cut.update(files)
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture
def settings_for(tiny: Path, tmp_path: Path) -> Callable[[str], Settings]:
    """Settings baking these CONTROLNETS into tmp_path/controlnets, checked against the tiny model's UNet."""

    def settings(controlnets: str) -> Settings:
        return load_settings(
            {"MODEL_DIR": str(tiny), "CONTROLNET_DIR": str(tmp_path / "controlnets"), "CONTROLNETS": controlnets}
        )

    return settings


def float_dtypes(path: Path) -> set[str]:
    header, _start = read_header(path)
    return {entry["dtype"] for key, entry in header.items() if key != "__metadata__"}


def run_worker(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], job: dict[str, Any]) -> dict[str, Any]:
    for field in Settings.model_fields.values():
        monkeypatch.delenv(str(field.alias), raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(handler, "_settings", None)
    monkeypatch.setattr(handler, "_engine", None)
    return asyncio.run(handler.handler({"id": "bake-controlnets-test", "input": job}))


# --- a URL, baked in float16 and served -------------------------------------------------------------


def test_a_url_is_baked_in_float16_and_the_worker_serves_it_as_it_served_the_original(
    served: Served, tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    baked = tmp_path / "controlnets"
    for field in Settings.model_fields.values():
        monkeypatch.delenv(str(field.alias), raising=False)
    for name, value in {
        "MODEL_ID": str(tiny / CHECKPOINT_FILE),
        "MODEL_CONFIG": str(tiny),
        "MODEL_DIR": str(tmp_path / "sd15"),
        "CONTROLNET_DIR": str(baked),
        "CONTROLNETS": f"{served.url}/cn/{CONTROLNET_FILE}",
    }.items():
        monkeypatch.setenv(name, value)

    assert cache_model.main([]) == 0

    assert f"ControlNets {NET_FILE} baked into {baked} and verified" in capsys.readouterr().out
    assert [path.name for path in baked.iterdir()] == [CONTROLNET_FILE]
    assert float_dtypes(tiny / "controlnets" / CONTROLNET_FILE) == {"F32"}
    assert float_dtypes(baked / CONTROLNET_FILE) == {"F16"}
    original, stored = load_file(tiny / "controlnets" / CONTROLNET_FILE), load_file(baked / CONTROLNET_FILE)
    assert original.keys() == stored.keys()
    assert all(torch.equal(original[key].half(), stored[key]) for key in original)
    assert not list((tmp_path / ".downloads").iterdir()), "the download is removed once baked"

    job = {**JOB, "controlnets": [{"model": NET_FILE, "image": CONTROL}]}
    from_bake = run_worker(monkeypatch, {"MODEL_ID": str(tiny), "CONTROLNET_DIR": str(baked)}, job)
    from_original = run_worker(monkeypatch, {"MODEL_ID": str(tiny), "CONTROLNET_DIR": str(tiny / "controlnets")}, job)
    without = run_worker(monkeypatch, {"MODEL_ID": str(tiny)}, JOB)

    assert "error" not in from_bake, from_bake
    assert from_bake["metadata"]["controlnets"][0]["model"] == NET_FILE
    # The tiny weights are float16 values stored as float32: the baked file holds the same numbers.
    assert from_bake["images"][0]["image"] == from_original["images"][0]["image"]
    assert pixels(from_bake) != pixels(without)


def pixels(result: dict[str, Any]) -> bytes:
    with Image.open(io.BytesIO(base64.b64decode(result["images"][0]["image"]))) as image:
        return image.convert("RGB").tobytes()


def test_a_controlnet_already_there_is_kept_without_a_download(
    served: Served, settings_for: Callable[[str], Settings], caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(f"{served.url}/cn/{CONTROLNET_FILE}")
    assert cache_model.bake_controlnets(settings) == [NET_FILE]
    requests = len(served.requests)

    with caplog.at_level("INFO", logger="cache_model"):
        assert cache_model.bake_controlnets(settings) == [NET_FILE]

    assert len(served.requests) == requests
    assert f"already holds the ControlNet {CONTROLNET_FILE}; keeping it" in caplog.text


def test_a_download_named_otherwise_than_safetensors_is_deleted_unopened(
    served: Served, settings_for: Callable[[str], Settings], tmp_path: Path
) -> None:
    with pytest.raises(cache_model.CacheError) as caught:
        cache_model.bake_controlnets(settings_for(f"{served.url}/api/download/7"))

    message = str(caught.value)
    assert f"{served.url}/api/download/7 sent the file '7', not a .safetensors file; it was deleted unopened" in message
    assert list((tmp_path / "controlnets").iterdir()) == []
    assert list((tmp_path / ".downloads").iterdir()) == []


# --- what stops the bake -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("/cn/sdxl-canny.safetensors", "an SDXL ControlNet (label_emb, cross-attention 2048 wide)"),
        ("/cn/style.safetensors", "not a ControlNet: a LoRA"),
    ],
)
def test_a_url_that_is_no_sd15_controlnet_stops_the_bake_naming_it(
    served: Served, settings_for: Callable[[str], Settings], path: str, problem: str
) -> None:
    url = served.url + path
    with pytest.raises(cache_model.CacheError) as caught:
        cache_model.bake_controlnets(settings_for(f"{served.url}/cn/{CONTROLNET_FILE}, {url}"))

    message = str(caught.value)
    assert message.startswith(f"CONTROLNETS: {url} ({path.rsplit('/', 1)[1]}) cannot be used: {problem}")
    assert "Bake SD 1.5 ControlNets only" in message
    assert CONTROLNET_FILE not in message


def test_a_missing_url_is_named(served: Served, settings_for: Callable[[str], Settings]) -> None:
    url = f"{served.url}/cn/gone.safetensors"
    with pytest.raises(cache_model.CacheError) as caught:
        cache_model.bake_controlnets(settings_for(url))

    assert str(caught.value) == f"{url}: HTTP 404 Not Found: check the URL"


@pytest.mark.parametrize(("name", "kind"), [("control.pth", "a pickle"), ("canny.zip", "not safetensors")])
def test_a_url_of_another_file_type_is_refused_before_any_download(
    served: Served, settings_for: Callable[[str], Settings], name: str, kind: str
) -> None:
    url = f"{served.url}/cn/{name}?token=secret"
    with pytest.raises(cache_model.CacheError) as caught:
        cache_model.bake_controlnets(settings_for(f"{served.url}/cn/{CONTROLNET_FILE},{url}"))

    shown = f"{served.url}/cn/{name}?<hidden>"
    assert str(caught.value).startswith(f"CONTROLNETS: {shown} names '{name}' ({kind}")
    assert served.requests == [], "nothing is downloaded, not even the good ControlNet"


def test_an_item_that_is_not_a_url_nor_a_hub_id_is_named_without_its_query(
    settings_for: Callable[[str], Settings],
) -> None:
    with pytest.raises(cache_model.CacheError) as caught:
        cache_model.bake_controlnets(settings_for("ftp://h.example/canny.safetensors?token=s3cret"))

    assert str(caught.value) == (
        "CONTROLNETS: 'ftp://h.example/canny.safetensors?<hidden>' is neither a hub id (owner/name) nor an "
        "http(s):// URL"
    )


def test_two_items_of_one_name_are_refused_before_any_download(
    served: Served, settings_for: Callable[[str], Settings]
) -> None:
    items = f"lllyasviel/{NET_FILE},{served.url}/cn/{CONTROLNET_FILE}"
    with pytest.raises(cache_model.CacheError) as caught:
        cache_model.bake_controlnets(settings_for(items))

    assert str(caught.value) == (
        f"CONTROLNETS: lllyasviel/{NET_FILE} and {served.url}/cn/{CONTROLNET_FILE} would both be the ControlNet "
        f"{NET_FILE!r}; keep one"
    )
    assert served.requests == []


# --- hub ids ---------------------------------------------------------------------------------------------------


def test_hub_ids_and_urls_are_told_apart_and_named() -> None:
    sources = cache_model.controlnet_sources(
        [
            "lllyasviel/control_v11p_sd15_canny",
            "https://example.com/files/control_v11f1p_sd15_depth.safetensors?download=true",
            "HTTPS://civitai.com/api/download/models/12345",
        ]
    )

    assert [(source.is_url, source.name) for source in sources] == [
        (False, "control_v11p_sd15_canny"),
        (True, "control_v11f1p_sd15_depth"),
        (True, None),  # named by the download's Content-Disposition
    ]
    assert sources[1].shown == "https://example.com/files/control_v11f1p_sd15_depth.safetensors?<hidden>"


@pytest.mark.parametrize(
    "item", ["control_v11p_sd15_canny", "lllyasviel/control/v11", "s3://bucket/canny.safetensors", "a/..", "./x"]
)
def test_an_item_that_is_neither_a_hub_id_nor_a_url_is_refused(item: str) -> None:
    with pytest.raises(cache_model.CacheError) as caught:
        cache_model.controlnet_sources([item])

    assert str(caught.value) == f"CONTROLNETS: {item!r} is neither a hub id (owner/name) nor an http(s):// URL"


def tiny_diffusers_controlnet(tiny: Path, folder: Path, weights: str, dtype: torch.dtype) -> Path:
    """The tiny diffusers ControlNet as a hub download would leave it: config.json and ``weights`` in ``dtype``."""
    folder.mkdir(parents=True)
    shutil.copy(tiny / "controlnets" / CONTROLNET_DIFFUSERS / "config.json", folder / "config.json")
    state = load_file(tiny / "controlnets" / CONTROLNET_DIFFUSERS / cache_model.CONTROLNET_WEIGHTS)
    save_file({key: tensor.to(dtype) for key, tensor in state.items()}, str(folder / weights))
    return folder


@pytest.mark.parametrize(
    ("weights", "dtype"),
    [(cache_model.CONTROLNET_FP16_WEIGHTS, torch.float16), (cache_model.CONTROLNET_WEIGHTS, torch.float32)],
)
def test_a_hub_download_is_left_as_one_float16_safetensors(
    tiny: Path, tmp_path: Path, weights: str, dtype: torch.dtype
) -> None:
    folder = tiny_diffusers_controlnet(tiny, tmp_path / "download", weights, dtype)

    cache_model.finish_hub_controlnet(folder, "someone/tiny-controlnet")

    assert sorted(path.name for path in folder.iterdir()) == ["config.json", cache_model.CONTROLNET_WEIGHTS]
    assert float_dtypes(folder / cache_model.CONTROLNET_WEIGHTS) == {"F16"}


def test_a_hub_repo_without_safetensors_is_refused(tiny: Path, tmp_path: Path) -> None:
    folder = tmp_path / "download"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))

    with pytest.raises(cache_model.CacheError) as caught:
        cache_model.finish_hub_controlnet(folder, "someone/bin-only")

    assert str(caught.value).startswith(
        "CONTROLNETS: someone/bin-only has no diffusion_pytorch_model.safetensors (nor "
        "diffusion_pytorch_model.fp16.safetensors): it is not a diffusers ControlNet repo with safetensors weights"
    )


def test_a_hub_controlnet_already_there_is_kept_and_checked_without_the_hub(
    tiny: Path, settings_for: Callable[[str], Settings], caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(f"someone/{CONTROLNET_DIFFUSERS}")
    baked = Path(settings.controlnet_dir or "")
    tiny_diffusers_controlnet(tiny, baked / CONTROLNET_DIFFUSERS, cache_model.CONTROLNET_WEIGHTS, torch.float16)

    with caplog.at_level("INFO", logger="cache_model"):
        assert cache_model.bake_controlnets(settings) == [CONTROLNET_DIFFUSERS]

    assert f"{baked / CONTROLNET_DIFFUSERS} already holds the ControlNet {CONTROLNET_DIFFUSERS}" in caplog.text


def test_a_hub_controlnet_of_another_unet_stops_the_bake(tiny: Path, settings_for: Callable[[str], Settings]) -> None:
    settings = settings_for(f"someone/{CONTROLNET_DIFFUSERS}")
    folder = tiny_diffusers_controlnet(
        tiny, Path(settings.controlnet_dir or "") / CONTROLNET_DIFFUSERS, cache_model.CONTROLNET_WEIGHTS, torch.float16
    )
    config = json.loads((folder / "config.json").read_text())
    config["cross_attention_dim"] *= 2
    (folder / "config.json").write_text(json.dumps(config))

    with pytest.raises(cache_model.CacheError) as caught:
        cache_model.bake_controlnets(settings)

    assert str(caught.value).startswith(
        f"CONTROLNETS: someone/{CONTROLNET_DIFFUSERS} ({CONTROLNET_DIFFUSERS}) cannot be used: not shaped as this "
        "pipeline's ControlNets"
    )


# --- the image ---------------------------------------------------------------------------------------------------


def test_the_image_serves_what_it_bakes_and_leaves_controlnet_off_without_it() -> None:
    from tests.test_builder import full_stage_env

    with_controlnets = full_stage_env({"CONTROLNETS": f"lllyasviel/{NET_FILE}"})
    without = full_stage_env({})

    assert load_settings(with_controlnets).controlnet_dir == "/models/controlnets"
    # What the image sets without CONTROLNETS: an empty CONTROLNET_DIR, read as unset.
    assert without["CONTROLNET_DIR"] == ""
    assert load_settings(without).controlnet_dir is None
