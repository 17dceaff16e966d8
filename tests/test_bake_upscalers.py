"""Baking UPSCALERS into UPSCALER_DIR at build time (``builder/bake_upscalers.py``), offline.

URLs are served by a real HTTP server on 127.0.0.1; the upscalers are spandrel's own architectures at tiny
sizes, and the files an upscaler folder must refuse (``builder.tiny_upscalers --bad``). What is baked is then
listed and read by the worker's own ``scan_upscalers`` and ``read_upscaler``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from builder import bake_upscalers, cache_model
from builder.tiny_upscalers import write_tiny_upscalers
from src.adapters.upscalers import read_upscaler, scan_upscalers, upscalers_from
from src.settings import Settings, SettingsError, load_settings, redact_url
from tests.test_checkpoints import Served, serving

ESRGAN, COMPACT = "tiny-esrgan-4x.pth", "tiny-compact-2x.safetensors"
SECRET = "s3cret-never-shown"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny upscalers, and under ``bad/`` the files an upscaler folder must refuse."""
    return write_tiny_upscalers(tmp_path_factory.mktemp("tiny-bake-upscalers"), bad=True)


@pytest.fixture(scope="module")
def server(tiny: Path) -> Iterator[Served]:
    """The files over HTTP, each sent whole (resuming is test_download's and test_checkpoints' subject)."""
    files = {
        f"/up/{ESRGAN}": tiny / ESRGAN,
        f"/up/{COMPACT}": tiny / COMPACT,
        "/up/restoration-1x.safetensors": tiny / "bad" / "restoration-1x.safetensors",
        "/up/unknown.safetensors": tiny / "bad" / "unknown.safetensors",
        f"/up/hostile.pth?token={SECRET}": tiny / "bad" / "hostile.pth",
        "/api/download/9": tiny / ESRGAN,
    }
    with serving(files, cut_once=False) as served:
        yield served


@pytest.fixture
def served(server: Served) -> Served:
    """The module's server, its record of requests emptied for this test."""
    server.requests.clear()
    return server


@pytest.fixture
def settings_for(tmp_path: Path) -> Callable[[str], Settings]:
    """Settings baking these UPSCALERS into tmp_path/upscalers."""

    def settings(upscalers: str) -> Settings:
        return load_settings({"UPSCALER_DIR": str(tmp_path / "upscalers"), "UPSCALERS": upscalers})

    return settings


def files_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# --- baked, then served by the worker ------------------------------------------------------------------------


def test_a_pth_and_a_safetensors_url_are_baked_unchanged_and_the_worker_serves_them(
    served: Served, tiny: Path, settings_for: Callable[[str], Settings], tmp_path: Path
) -> None:
    settings = settings_for(f"{served.url}/up/{ESRGAN}, {served.url}/up/{COMPACT}")

    assert bake_upscalers.bake_upscalers(settings) == ["tiny-esrgan-4x", "tiny-compact-2x"]

    baked = tmp_path / "upscalers"
    assert files_in(baked) == [COMPACT, ESRGAN]
    assert all((baked / name).read_bytes() == (tiny / name).read_bytes() for name in (ESRGAN, COMPACT))
    assert files_in(tmp_path / ".downloads") == [], "the downloads are removed once baked"
    entries = scan_upscalers(settings.upscaler_dir)
    assert {name: entry.problem for name, entry in entries.items()} == {"tiny-compact-2x": None, "tiny-esrgan-4x": None}
    assert [read_upscaler(entries[name].path).scale for name in ("tiny-esrgan-4x", "tiny-compact-2x")] == [4, 2]
    worker = upscalers_from(load_settings({"UPSCALER_DIR": str(baked)}), torch.device("cpu"), torch.float32)
    assert worker.upscale("tiny-esrgan-4x", torch.rand(1, 3, 8, 8)).shape == (1, 3, 32, 32)


def test_the_build_prints_the_upscalers_it_baked_or_why_it_stopped(
    served: Served,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for field in Settings.model_fields.values():
        monkeypatch.delenv(str(field.alias), raising=False)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "sd15"))
    monkeypatch.setenv("UPSCALER_DIR", str(tmp_path / "upscalers"))
    monkeypatch.setenv("UPSCALERS", f"{served.url}/up/{COMPACT}")
    # The model's own bake is test_checkpoints' subject; here it is skipped, to keep this test to the upscalers.
    monkeypatch.setattr(cache_model, "bake", lambda settings, _hub_cache: Path(settings.model_dir))

    assert cache_model.main([]) == 0

    assert f"Upscalers tiny-compact-2x baked into {tmp_path / 'upscalers'} and verified" in capsys.readouterr().out
    monkeypatch.setenv("UPSCALERS", f"{served.url}/up/unknown.safetensors")
    assert cache_model.main([]) == 1
    assert capsys.readouterr().err.startswith(
        f"cache_model: UPSCALERS: {served.url}/up/unknown.safetensors cannot be used: unknown.safetensors: spandrel "
        "does not recognise its architecture"
    )


def test_a_rebuild_keeps_the_upscalers_without_a_request(
    served: Served, settings_for: Callable[[str], Settings], caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(f"{served.url}/up/{ESRGAN},{served.url}/up/{COMPACT}")
    assert bake_upscalers.bake_upscalers(settings) == ["tiny-esrgan-4x", "tiny-compact-2x"]
    requests = len(served.requests)

    with caplog.at_level(logging.INFO, logger="cache_model"):
        assert bake_upscalers.bake_upscalers(settings) == ["tiny-esrgan-4x", "tiny-compact-2x"]

    assert len(served.requests) == requests
    assert f"already holds the upscaler {ESRGAN}; keeping it" in caplog.text
    assert f"already holds the upscaler {COMPACT}; keeping it" in caplog.text


# --- what the worker could not use stops the build, named, and is deleted -------------------------------------


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        (
            "/up/restoration-1x.safetensors",
            "restoration-1x.safetensors is not an image super-resolution model (spandrel reads it as",
        ),
        ("/up/unknown.safetensors", "unknown.safetensors: spandrel does not recognise its architecture"),
        (
            f"/up/hostile.pth?token={SECRET}",
            "hostile.pth holds Python objects besides tensors, which are never built (weights-only loading)",
        ),
    ],
    ids=["1x restoration", "unrecognised", "pickle of objects"],
)
def test_a_file_the_worker_could_not_use_stops_the_build_naming_it_and_is_deleted(
    served: Served,
    settings_for: Callable[[str], Settings],
    capsys: pytest.CaptureFixture[str],
    path: str,
    problem: str,
) -> None:
    settings = settings_for(served.url + path)

    with pytest.raises(cache_model.CacheError) as caught:
        bake_upscalers.bake_upscalers(settings)

    message = str(caught.value)
    assert message.startswith(f"UPSCALERS: {redact_url(served.url + path)} cannot be used: {problem}")
    assert "What cannot be used was deleted" in message
    assert SECRET not in message
    folder = Path(settings.upscaler_dir or "")
    assert files_in(folder) == []
    assert files_in(folder.parent / ".downloads") == []
    assert "a pickle ran code" not in capsys.readouterr().out


def test_a_download_named_otherwise_than_pth_or_safetensors_is_deleted_unopened(
    served: Served, settings_for: Callable[[str], Settings], tmp_path: Path
) -> None:
    with pytest.raises(cache_model.CacheError) as caught:
        bake_upscalers.bake_upscalers(settings_for(f"{served.url}/api/download/9"))

    assert str(caught.value) == (
        f"UPSCALERS: {served.url}/api/download/9 sent the file '9' (neither .pth nor .safetensors); it was deleted "
        "unopened. Give the URL of a .pth or .safetensors file"
    )
    assert files_in(tmp_path / "upscalers") == []
    assert files_in(tmp_path / ".downloads") == []


# --- what is refused before any request ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (
            f"ftp://h.example/4x.pth?token={SECRET}",
            "UPSCALERS: 'ftp://h.example/4x.pth?<hidden>' is not an http(s):// URL; give the URL of a .pth or "
            ".safetensors file",
        ),
        (
            "RealESRGAN_x4plus.pth",
            "UPSCALERS: 'RealESRGAN_x4plus.pth' is not an http(s):// URL; give the URL of a .pth or .safetensors file",
        ),
        (
            "{url}/up/4x.pt",
            "UPSCALERS: {url}/up/4x.pt names '4x.pt' (a .pt file, which the worker never reads: it reads .pth files, "
            "as tensors only, and .safetensors); give the URL of a .pth or .safetensors file",
        ),
        (
            f"{{url}}/up/4x.ckpt?token={SECRET}",
            "UPSCALERS: {url}/up/4x.ckpt?<hidden> names '4x.ckpt' (a .ckpt file, which the worker never reads: it "
            "reads .pth files, as tensors only, and .safetensors); give the URL of a .pth or .safetensors file",
        ),
        (
            "{url}/up/4x.zip",
            "UPSCALERS: {url}/up/4x.zip names '4x.zip' (neither .pth nor .safetensors); give the URL of a .pth or "
            ".safetensors file",
        ),
        (
            "{url}/mirror/tiny-esrgan-4x.safetensors",
            "UPSCALERS: {url}/up/tiny-esrgan-4x.pth and {url}/mirror/tiny-esrgan-4x.safetensors would both be the "
            "upscaler 'tiny-esrgan-4x'; keep one",
        ),
    ],
    ids=["ftp", "a bare name", ".pt", ".ckpt", ".zip", "one name twice"],
)
def test_a_bad_item_is_refused_before_any_request(
    served: Served, settings_for: Callable[[str], Settings], tmp_path: Path, item: str, message: str
) -> None:
    items = f"{served.url}/up/{ESRGAN},{item.format(url=served.url)}"

    with pytest.raises(cache_model.CacheError) as caught:
        bake_upscalers.bake_upscalers(settings_for(items))

    assert str(caught.value) == message.format(url=served.url)
    assert served.requests == [], "nothing is downloaded, not even the good upscaler"
    assert not (tmp_path / "upscalers").exists()


def test_items_are_named_by_their_urls_file_names() -> None:
    sources = bake_upscalers.upscaler_sources(
        [
            "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.1.0/RealESRGAN_x4plus.pth",
            "https://example.com/files/4x-UltraSharp.safetensors?download=true",
            "HTTPS://civitai.com/api/download/models/12345",
        ]
    )

    assert [source.name for source in sources] == [
        "RealESRGAN_x4plus",
        "4x-UltraSharp",
        None,  # named by the download's Content-Disposition
    ]
    assert sources[1].shown == "https://example.com/files/4x-UltraSharp.safetensors?<hidden>"


# --- the settings and the image -----------------------------------------------------------------------------


def test_upscalers_need_an_upscaler_dir() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"UPSCALERS": f"https://example.com/4x.pth?token={SECRET}"})

    assert str(caught.value) == "invalid configuration: UPSCALERS are baked into UPSCALER_DIR, which is not set"
    assert load_settings({}).upscalers_to_bake_list == []
    assert load_settings(
        {"UPSCALER_DIR": "/u", "UPSCALERS": " https://a/x.pth, ,https://b/y.pth"}
    ).upscalers_to_bake_list == [
        "https://a/x.pth",
        "https://b/y.pth",
    ]


def test_the_image_serves_what_it_bakes_and_keeps_no_url_in_its_environment() -> None:
    from tests.test_builder import full_stage_env

    with_upscalers = full_stage_env({"UPSCALERS": f"https://example.com/4x.pth?token={SECRET}"})
    without = full_stage_env({})

    assert not [name for name, value in with_upscalers.items() if SECRET in value or "://" in value]
    assert load_settings(with_upscalers).upscaler_dir == "/models/upscalers"
    # What the image sets without UPSCALERS: an empty UPSCALER_DIR, read as unset.
    assert without["UPSCALER_DIR"] == ""
    assert load_settings(without).upscaler_dir is None
