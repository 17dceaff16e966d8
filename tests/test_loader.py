"""Where the weights come from: the baked folder must hold everything the settings load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from src.errors import ModelLoadError
from src.models.loader import load_pipeline, resolve_dtype
from src.models.locate import BAKED_SOURCE_FILE, BakedSource
from src.settings import DEFAULT_MODEL_ID, DEFAULT_MODEL_REVISION, load_settings
from tests.conftest import as_baked_without_the_checker


def bake_label(folder: Path, *, safety_checker: bool) -> None:
    label = {
        "model_id": DEFAULT_MODEL_ID,
        "revision": DEFAULT_MODEL_REVISION,
        "variant": None,
        "safety_checker": safety_checker,
    }
    (folder / BAKED_SOURCE_FILE).write_text(json.dumps(label))


def test_folder_baked_without_the_checker_is_refused_with_how_to_bake_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    baked = tmp_path / "sd15"
    shutil.copytree(tiny_model_dir, baked)
    bake_label(baked, safety_checker=False)
    settings = load_settings({"MODEL_DIR": str(baked), "SAFETY_CHECKER": "true"})

    with pytest.raises(ModelLoadError) as raised:
        load_pipeline(settings, torch.float32)

    message = str(raised.value)
    assert "without the safety checker" in message
    assert "SAFETY_CHECKER=true python -m builder.cache_model" in message
    assert "--build-arg SAFETY_CHECKER=true" in message


def test_folder_baked_with_the_checker_serves_without_it(tiny_model_with_checker_dir: Path, tmp_path: Path) -> None:
    baked = tmp_path / "sd15"
    shutil.copytree(tiny_model_with_checker_dir, baked)
    bake_label(baked, safety_checker=True)

    pipeline = load_pipeline(load_settings({"MODEL_DIR": str(baked)}), torch.float32)

    assert pipeline.safety_checker is None


def test_sd15_baked_without_the_checker_loads_though_its_index_names_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    """SD 1.5's model_index.json names a safety checker and a feature extractor; the default bake downloads
    neither. diffusers looks for every component the index names that it is not given as None."""
    baked = as_baked_without_the_checker(tiny_model_dir, tmp_path / "sd15")
    bake_label(baked, safety_checker=False)

    for settings in ({"MODEL_DIR": str(baked)}, {"MODEL_ID": str(baked)}):  # baked, and as a folder of its own
        pipeline = load_pipeline(load_settings(settings), torch.float32)

        assert pipeline.safety_checker is None
        assert pipeline.feature_extractor is None


@pytest.mark.parametrize(
    ("baked", "wanted", "matches"),
    [(False, False, True), (True, False, True), (True, True, True), (False, True, False)],
)
def test_baked_folder_matches_when_it_holds_the_checker(baked: bool, wanted: bool, matches: bool) -> None:
    source = BakedSource(DEFAULT_MODEL_ID, DEFAULT_MODEL_REVISION, "fp16", baked)

    assert source.matches(DEFAULT_MODEL_ID, DEFAULT_MODEL_REVISION, wanted) is matches
    assert not source.matches(DEFAULT_MODEL_ID, "another-revision", wanted)


@pytest.mark.parametrize(
    ("setting", "device", "expected"),
    [
        ("auto", "cpu", torch.float32),
        ("auto", "cuda", torch.float16),
        ("float16", "cpu", torch.float16),
        ("bfloat16", "cpu", torch.bfloat16),
        ("float32", "cuda", torch.float32),
    ],
)
def test_dtype_is_float32_on_the_cpu_unless_asked(setting: str, device: str, expected: torch.dtype) -> None:
    assert resolve_dtype(setting, torch.device(device)) is expected


@pytest.mark.parametrize("way", ["folder", "baked"])
def test_a_folder_with_a_file_cut_short_is_refused_naming_the_setting(
    tiny_model_dir: Path, tmp_path: Path, way: str
) -> None:
    """A network volume still being synced leaves a file cut short: a refusal naming the setting, not a traceback."""
    folder = tmp_path / "sd15"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    if way == "baked":
        bake_label(folder, safety_checker=False)
    variables = {"MODEL_DIR": str(folder)} if way == "baked" else {"MODEL_ID": str(folder)}

    with pytest.raises(ModelLoadError) as raised:
        load_pipeline(load_settings(variables), torch.float32)

    setting = "MODEL_DIR" if way == "baked" else "MODEL_ID"
    assert str(raised.value).startswith(f"{setting}={str(folder)!r}: the diffusers folder {folder} cannot be loaded")
    assert "cut short" in str(raised.value)
