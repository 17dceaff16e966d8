"""The random LoRAs of builder/tiny_lora.py load through diffusers' own loader and change the image.

Each layout is loaded the way the worker will load a published file, with
``load_lora_weights``, into the tiny real pipeline; 2-step 64x64 images are
compared against the pipeline without a LoRA.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from builder.tiny_lora import build_lora_state_dict, main, save_lora, write_test_loras
from tests.conftest import ROOT
from tests.forked import run_module


def load_pipeline(model_dir: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: StableDiffusionPipeline) -> np.ndarray:
    """A 2-step 64x64 image with a fixed seed, as floats in [0, 1]."""
    generator = torch.Generator().manual_seed(0)
    output = pipe("a red cube", num_inference_steps=2, height=64, width=64, output_type="np", generator=generator)
    return np.asarray(output.images)


@contextlib.contextmanager
def loader_complaints() -> Iterator[list[str]]:
    """Collect the warnings diffusers, transformers and peft log or raise, such as "No LoRA keys ... found".

    diffusers' and transformers' loggers do not propagate to the root logger, so
    pytest's caplog would miss them; a handler goes on each directly.
    """
    complaints: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            complaints.append(f"{record.name}: {record.getMessage()}")

    handler = Collect(logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield complaints
        complaints.extend(str(warning.message) for warning in caught)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path) -> tuple[Any, Any]:
    """The tiny pipeline's UNet and text encoder, for building state dicts (never loaded into)."""
    pipe = load_pipeline(tiny_model_dir)
    return pipe.unet, pipe.text_encoder


@pytest.fixture(scope="module")
def plain_image(tiny_model_dir: Path) -> np.ndarray:
    return generate(load_pipeline(tiny_model_dir))


def test_peft_layout_keys_follow_diffusers(models: tuple[Any, Any]) -> None:
    state_dict = build_lora_state_dict(*models, rank=4)
    down = state_dict["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"]
    up = state_dict["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.lora_B.weight"]
    assert down.shape == (4, 64)
    assert up.shape == (64, 4)
    assert "text_encoder.text_model.encoder.layers.1.self_attn.out_proj.lora_B.weight" in state_dict
    # 4 transformer blocks (down 1, mid 1, up 2) x 2 attentions x 4 projections, 2 text layers x 4; A and B each.
    assert len(state_dict) == 2 * (4 * 2 * 4 + 2 * 4)
    assert all(tensor.dtype == torch.float32 for tensor in state_dict.values())
    assert all(tensor.abs().sum() > 0 for key, tensor in state_dict.items() if key.endswith("lora_B.weight"))


def test_kohya_layout_keys_follow_a1111(models: tuple[Any, Any]) -> None:
    state_dict = build_lora_state_dict(*models, rank=8, layout="kohya")
    stem = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
    assert state_dict[f"{stem}.lora_down.weight"].shape == (8, 32)
    assert state_dict[f"{stem}.lora_up.weight"].shape == (64, 8)
    assert state_dict[f"{stem}.alpha"].item() == 4.0
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in state_dict
    assert len(state_dict) == 3 * (4 * 2 * 4 + 2 * 4)


def test_unet_only_has_no_text_encoder_keys(models: tuple[Any, Any]) -> None:
    unet, text_encoder = models
    alone = build_lora_state_dict(unet, None, text_encoder_layers=False)
    assert alone
    assert all(key.startswith("unet.") for key in alone)
    # The UNet's weights are drawn first, so leaving the text encoder out changes none of them.
    full = build_lora_state_dict(unet, text_encoder)
    assert all(torch.equal(tensor, full[key]) for key, tensor in alone.items())


def test_bad_arguments_are_named_together(models: tuple[Any, Any]) -> None:
    unet, _ = models
    with pytest.raises(ValueError, match="rank=0: must be at least 1") as raised:
        build_lora_state_dict(unet, None, rank=0, layout="lycoris", targets="mlp")
    message = str(raised.value)
    assert "layout='lycoris'" in message
    assert "targets='mlp'" in message
    assert "text_encoder=None" in message


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_layout_loads_into_unet_and_text_encoder_and_changes_the_image(
    layout: str, models: tuple[Any, Any], tiny_model_dir: Path, plain_image: np.ndarray, tmp_path: Path
) -> None:
    path = save_lora(build_lora_state_dict(*models, layout=layout), tmp_path / f"{layout}.safetensors")
    pipe = load_pipeline(tiny_model_dir)
    with loader_complaints() as complaints:
        pipe.load_lora_weights(str(path), adapter_name="x")
    assert complaints == []
    assert "x" in pipe.unet.peft_config
    assert "x" in pipe.text_encoder.peft_config
    image = generate(pipe)
    assert np.isfinite(image).all()
    assert np.abs(image - plain_image).mean() > 0.005


def test_both_layouts_of_one_seed_are_the_same_lora(models: tuple[Any, Any], tiny_model_dir: Path) -> None:
    """Equal images also show that diffusers applies the kohya files' alpha (rank / 2)."""
    images = []
    for layout in ("peft", "kohya"):
        pipe = load_pipeline(tiny_model_dir)
        pipe.load_lora_weights(build_lora_state_dict(*models, seed=3, layout=layout, targets="all"), adapter_name="x")
        images.append(generate(pipe))
    np.testing.assert_allclose(images[0], images[1], atol=1e-6)


def test_scale_sets_the_strength(models: tuple[Any, Any], tiny_model_dir: Path, plain_image: np.ndarray) -> None:
    changes = []
    for scale in (0.1, 1.0):
        pipe = load_pipeline(tiny_model_dir)
        pipe.load_lora_weights(build_lora_state_dict(*models, scale=scale), adapter_name="x")
        changes.append(np.abs(generate(pipe) - plain_image).mean())
    weak, strong = changes
    assert 0 < weak < strong / 5


def test_a_model_carrying_an_adapter_gives_the_same_lora(models: tuple[Any, Any], tiny_model_dir: Path) -> None:
    pipe = load_pipeline(tiny_model_dir)
    pipe.load_lora_weights(build_lora_state_dict(*models), adapter_name="x")
    again = build_lora_state_dict(pipe.unet, pipe.text_encoder, seed=1)
    fresh = build_lora_state_dict(*models, seed=1)
    assert again.keys() == fresh.keys()
    assert all(torch.equal(tensor, fresh[key]) for key, tensor in again.items())


def test_write_test_loras_alternates_layouts_and_records_them(tiny_model_dir: Path, tmp_path: Path) -> None:
    paths = write_test_loras(tiny_model_dir, tmp_path, count=3, rank=2)
    assert [path.name for path in paths] == [
        "tiny-peft-0.safetensors",
        "tiny-kohya-1.safetensors",
        "tiny-peft-2.safetensors",
    ]
    key = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    with safe_open(str(paths[1]), "pt") as file:
        assert file.metadata() == {
            "format": "pt",
            "generator": "builder.tiny_lora",
            "layout": "kohya",
            "rank": "2",
            "seed": "1",
        }
        assert file.get_tensor(key).shape == (2, 64)


def test_cli_writes_the_files_and_prints_their_paths(tiny_model_dir: Path, tmp_path: Path) -> None:
    arguments = [str(tiny_model_dir), str(tmp_path), "--count", "2", "--layout", "kohya", "--seed", "5", "--unet-only"]
    result = run_module("builder.tiny_lora", *arguments, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    expected = [tmp_path / "tiny-kohya-5.safetensors", tmp_path / "tiny-kohya-6.safetensors"]
    assert result.stdout.splitlines() == [str(path) for path in expected]
    with safe_open(str(expected[0]), "pt") as file:
        assert all(key.startswith("lora_unet_") for key in file.keys())  # noqa: SIM118 (safe_open is no dict)


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    assert "--unet-only" in capsys.readouterr().out
