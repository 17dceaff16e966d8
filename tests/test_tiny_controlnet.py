"""The tiny ControlNets of ``builder.tiny_model --controlnet``, and the LDM layout of ``builder.single_file``.

The folder loads with ``ControlNetModel.from_pretrained``; the single files are read back through
diffusers' own ``convert_controlnet_checkpoint`` (what ``from_single_file`` runs); the names written
for a full-size SD 1.5 ControlNet are checked against those of lllyasviel's ``control_v11p_sd15_*``
files; and 2-step 64x64 images show that the ControlNet, its scale and its control image all count.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from PIL import Image
from safetensors.torch import load_file

from bench.sd15_random import UNET_CONFIG
from builder import single_file
from builder.tiny_model import (
    CONTROLNET_B_FILE,
    CONTROLNET_DIFFUSERS,
    CONTROLNET_ENTRIES,
    CONTROLNET_FILE,
    CONTROLNET_FOLDER,
    CONTROLNET_NAMES,
    main,
    write_tiny_controlnets,
    write_tiny_model,
)

# The 340 tensors of a control_v11p_sd15_* file, by the part of ``control_model`` they sit in.
# input_blocks: conv_in (2), 8 resnets (10 tensors each, 2 more for each of the 2 with a skip
# connection), 6 transformers (26 each), 3 downsamplers (2 each); middle_block: 2 resnets and a
# transformer; 12 zero convolutions and the hint block's 8 convolutions, a weight and a bias each.
SD15_CONTROLNET_PARTS = {
    "input_blocks": 248,
    "middle_block": 46,
    "zero_convs": 24,
    "input_hint_block": 16,
    "time_embed": 4,
    "middle_block_out": 2,
}
# Well-known names and shapes from control_v11p_sd15_canny.
SD15_CONTROLNET_SHAPES = {
    "control_model.time_embed.0.weight": (1280, 320),
    "control_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "control_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "control_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "control_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "control_model.input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
    "control_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight": (1280, 1280),
    "control_model.middle_block.2.emb_layers.1.weight": (1280, 1280),
    "control_model.input_hint_block.0.weight": (16, 3, 3, 3),
    "control_model.input_hint_block.12.weight": (256, 96, 3, 3),
    "control_model.input_hint_block.14.weight": (320, 256, 3, 3),
    "control_model.zero_convs.0.0.weight": (320, 320, 1, 1),
    "control_model.zero_convs.11.0.weight": (1280, 1280, 1, 1),
    "control_model.middle_block_out.0.weight": (1280, 1280, 1, 1),
}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline with its ControlNets, as ``python -m builder.tiny_model DIR --controlnet`` writes them."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-controlnet"), controlnet=True)


@pytest.fixture(scope="session")
def controlnet(model_dir: Path) -> ControlNetModel:
    return ControlNetModel.from_pretrained(model_dir / CONTROLNET_FOLDER / CONTROLNET_DIFFUSERS)


def read_single_file(path: Path, config: Any) -> dict[str, torch.Tensor]:
    """A ControlNet file's tensors under diffusers' names, converted as ``from_single_file`` converts them."""
    state = load_file(str(path))
    assert all(key.startswith("control_model.") for key in state), path.name
    return convert_controlnet_checkpoint(state, dict(config))


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


def assert_same_tensors(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert found.keys() == expected.keys()
    assert [key for key in expected if not torch.equal(found[key], expected[key])] == []


# --- the files ---------------------------------------------------------------------------------------


def test_the_three_controlnets_are_written_beside_the_pipeline(model_dir: Path) -> None:
    folder = model_dir / CONTROLNET_FOLDER
    assert CONTROLNET_NAMES == ("tiny-controlnet", "tiny-controlnet-file", "tiny-controlnet-b")
    assert sorted(path.name for path in folder.iterdir()) == sorted(CONTROLNET_ENTRIES)
    assert (folder / CONTROLNET_DIFFUSERS / "config.json").is_file()
    assert (folder / CONTROLNET_DIFFUSERS / "diffusion_pytorch_model.safetensors").is_file()


def test_the_folder_is_a_copy_of_the_pipelines_unet_encoder(model_dir: Path, controlnet: ControlNetModel) -> None:
    unet = StableDiffusionPipeline.from_pretrained(model_dir).unet
    for name in ("block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim"):
        assert controlnet.config[name] == unet.config[name], name
    copied = {key: value for key, value in unet.state_dict().items() if key.startswith(("conv_in.", "time_", "down_"))}
    copied |= {key: value for key, value in unet.state_dict().items() if key.startswith("mid_block.")}
    assert_same_tensors({key: controlnet.state_dict()[key] for key in copied}, copied)


def test_the_output_convolutions_are_random_float16_values_not_zeros(controlnet: ControlNetModel) -> None:
    outputs = {"controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out"}
    state = controlnet.state_dict()
    for key in [key for key in state if key.rsplit(".", 1)[0].startswith(tuple(outputs))]:
        assert state[key].abs().min() > 0, key
    for key, tensor in state.items():
        assert torch.equal(tensor, tensor.half().float()), key


def test_the_single_file_reads_back_tensor_for_tensor(model_dir: Path, controlnet: ControlNetModel) -> None:
    found = read_single_file(model_dir / CONTROLNET_FOLDER / CONTROLNET_FILE, controlnet.config)

    assert_same_tensors(found, controlnet.state_dict())


def test_diffusers_from_single_file_reads_it_with_the_folders_config(
    model_dir: Path, controlnet: ControlNetModel
) -> None:
    folder = model_dir / CONTROLNET_FOLDER
    read = ControlNetModel.from_single_file(
        str(folder / CONTROLNET_FILE), config=str(folder / CONTROLNET_DIFFUSERS), local_files_only=True
    )

    assert_same_tensors(read.state_dict(), controlnet.state_dict())


def test_the_b_file_is_another_controlnet_on_the_same_unet(model_dir: Path, controlnet: ControlNetModel) -> None:
    other = read_single_file(model_dir / CONTROLNET_FOLDER / CONTROLNET_B_FILE, controlnet.config)
    own = controlnet.state_dict()

    assert shapes(other) == shapes(own)
    differ = {key.split(".")[0] for key in own if not torch.equal(other[key], own[key])}
    assert differ == {"controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding"}


@pytest.mark.parametrize("prefix", ["control_model.", ""])
def test_both_prefixes_read_back_through_diffusers(controlnet: ControlNetModel, prefix: str) -> None:
    state = single_file.controlnet_state_dict(controlnet, prefix=prefix)

    assert_same_tensors(convert_controlnet_checkpoint(state, dict(controlnet.config)), controlnet.state_dict())


def test_writing_controlnets_without_a_pipeline_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no unet/ folder; write the tiny model there first$"):
        write_tiny_controlnets(tmp_path)


def test_the_command_line_writes_them_and_says_where(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path), "--controlnet", "--single-file"]) == 0

    assert f"written to {tmp_path / CONTROLNET_FOLDER}\n" in capsys.readouterr().out
    assert sorted(path.name for path in (tmp_path / CONTROLNET_FOLDER).iterdir()) == sorted(CONTROLNET_ENTRIES)


# --- the layout at SD 1.5's size ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15_controlnet() -> ControlNetModel:
    """SD 1.5's ControlNet (361 M parameters) on the meta device: names and shapes, no memory."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return ControlNetModel.from_unet(UNet2DConditionModel(**UNET_CONFIG))


def test_an_sd15_controlnet_gets_the_names_and_shapes_of_control_v11p_sd15(sd15_controlnet: ControlNetModel) -> None:
    state = single_file.controlnet_state_dict(sd15_controlnet)

    assert Counter(key.split(".")[1] for key in state) == SD15_CONTROLNET_PARTS
    assert len(state) == 340
    assert {key: tuple(state[key].shape) for key in SD15_CONTROLNET_SHAPES} == SD15_CONTROLNET_SHAPES


def test_an_sd15_controlnet_reads_back_through_diffusers_name_for_name(sd15_controlnet: ControlNetModel) -> None:
    state = single_file.controlnet_state_dict(sd15_controlnet)
    found = convert_controlnet_checkpoint(state, dict(sd15_controlnet.config))

    assert shapes(found) == shapes(sd15_controlnet.state_dict())


# --- images ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(model_dir: Path, controlnet: ControlNetModel) -> StableDiffusionControlNetPipeline:
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        model_dir, controlnet=controlnet, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def control_image(kind: str) -> Image.Image:
    if kind == "noise":
        return Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    bar = np.zeros((64, 64, 3), dtype=np.uint8)
    bar[16:48, 30:34] = 255
    return Image.fromarray(bar)


def generate(pipe: StableDiffusionControlNetPipeline, scale: float, kind: str = "noise") -> np.ndarray:
    """A 2-step 64x64 image with a fixed seed, as floats in [0, 1]."""
    output = pipe(
        "a lighthouse",
        image=control_image(kind),
        num_inference_steps=2,
        height=64,
        width=64,
        controlnet_conditioning_scale=scale,
        generator=torch.Generator().manual_seed(7),
        output_type="np",
    )
    return np.asarray(output.images[0])


def test_the_controlnet_changes_the_image_at_scale_1_and_not_at_scale_0(
    model_dir: Path, pipeline: StableDiffusionControlNetPipeline
) -> None:
    plain = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    plain.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(7)
    without = plain("a lighthouse", num_inference_steps=2, height=64, width=64, generator=generator, output_type="np")

    at_0, at_1 = generate(pipeline, 0.0), generate(pipeline, 1.0)

    assert np.array_equal(at_0, without.images[0])
    assert np.abs(at_1 - at_0).mean() > 0.02
    assert np.isfinite(generate(pipeline, 2.0)).all()


def test_the_control_image_steers_the_image(pipeline: StableDiffusionControlNetPipeline) -> None:
    assert np.abs(generate(pipeline, 1.0, "noise") - generate(pipeline, 1.0, "bar")).mean() > 0.01
